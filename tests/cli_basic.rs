//! The `uthin` binary: commands, output, exit codes (0 ok, 1 error, 2 usage) and clear errors
//! for bad input, a corrupt metadata file and a pool held by another process.

mod pool_common;

use pool_common::{text, uthin};

use std::path::Path;
use std::process::Command;

fn ok(pool: &Path, args: &[&str]) -> String {
    let o = uthin(pool, args);
    assert!(o.status.success(), "uthin {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(pool: &Path, args: &[&str], code: i32, needle: &str) {
    let o = uthin(pool, args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "uthin {args:?}: {t}");
    assert!(
        t.contains(needle),
        "uthin {args:?} should mention `{needle}`: {t}"
    );
    assert!(!t.contains("panicked"), "uthin {args:?} panicked: {t}");
}

fn new_pool() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    ok(
        &pool,
        &[
            "pool",
            "create",
            "--data-size",
            "1G",
            "--metadata-size",
            "4M",
        ],
    );
    (dir, pool)
}

#[test]
fn lifecycle_with_json_output() {
    let (_d, pool) = new_pool();
    ok(&pool, &["create", "vm1", "--size", "10G"]);
    ok(&pool, &["snapshot", "vm1", "vm1-snap", "--read-only"]);
    ok(&pool, &["rename", "vm1-snap", "golden"]);
    let list: serde_json::Value = serde_json::from_str(&ok(&pool, &["list", "--json"])).unwrap();
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    let golden = arr.iter().find(|v| v["name"] == "golden").unwrap();
    assert_eq!(golden["read_only"], true);
    assert_eq!(golden["origin"], "vm1");
    assert_eq!(golden["size"], 10u64 << 30);
    let st: serde_json::Value =
        serde_json::from_str(&ok(&pool, &["pool", "status", "--json"])).unwrap();
    assert_eq!(st["block_size"], 65536);
    assert_eq!(st["data_total_blocks"], 16384);
    assert_eq!(st["volume_count"], 2);
    assert_eq!(st["transaction_id"], 2);
    assert_eq!(st["metadata_total_blocks"], 1024);
    let human = ok(&pool, &["pool", "status"]);
    assert!(
        human.contains("Data space total:") && human.contains("16384 blocks"),
        "{human}"
    );
    let table = ok(&pool, &["list"]);
    assert!(table.contains("golden") && table.contains("ro"), "{table}");
    ok(&pool, &["delete", "vm1"]);
    ok(&pool, &["pool", "grow", "--data-size", "2G"]);
    let st: serde_json::Value =
        serde_json::from_str(&ok(&pool, &["pool", "status", "--json"])).unwrap();
    assert_eq!(st["data_total_blocks"], 32768);
    ok(&pool, &["check"]);
    pool_common::thin_check(&pool.join("metadata")).unwrap();
}

#[test]
fn pool_from_environment_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_uthin"))
        .args(["pool", "create", "--data-size", "64M"])
        .env("UTHIN_POOL", dir.path().join("envpool"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.path().join("envpool/metadata").exists());
    let o = Command::new(env!("CARGO_BIN_EXE_uthin"))
        .args(["pool", "create", "--data-size", "64M"])
        .env_remove("UTHIN_POOL")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.path().join("uthin-pool/metadata").exists());
}

#[test]
fn usage_errors_exit_2() {
    let (_d, pool) = new_pool();
    fails(&pool, &["create", "x", "--size", "10X"], 2, "10X");
    fails(&pool, &["create", "x", "--size", "-5G"], 2, "-5");
    fails(&pool, &["create", "x", "--size", "5.5G"], 2, "5.5G");
    fails(&pool, &["create", "x"], 2, "--size");
    fails(&pool, &["frobnicate"], 2, "frobnicate");
    fails(
        &pool,
        &["pool", "create", "--block-size", "lots"],
        2,
        "lots",
    );
}

#[test]
fn errors_name_the_thing_and_exit_1() {
    let (_d, pool) = new_pool();
    ok(&pool, &["create", "a", "--size", "1G"]);
    fails(
        &pool,
        &["create", "a", "--size", "1G"],
        1,
        "`a` already exists",
    );
    fails(&pool, &["delete", "ghost"], 1, "ghost");
    fails(&pool, &["snapshot", "ghost", "s"], 1, "ghost");
    fails(&pool, &["rename", "ghost", "b"], 1, "ghost");
    fails(
        &pool,
        &["create", "bad/name", "--size", "1G"],
        1,
        "bad/name",
    );
    fails(&pool, &["adopt", "77", "b", "--size", "1G"], 1, "77");
    fails(
        &pool,
        &["pool", "create", "--data-size", "1G"],
        1,
        "--force",
    );
    fails(
        &pool,
        &[
            "pool",
            "create",
            "--data-size",
            "1G",
            "--block-size",
            "96K",
            "--force",
        ],
        1,
        "power of two",
    );
    fails(&pool, &["pool", "grow", "--data-size", "10M"], 1, "shrink");
    // serve refuses to start (exit 1, naming the argument) rather than serve half of what was asked.
    let vhost_sock = format!("missing={}", pool.with_file_name("v.sock").display());
    let nbd_sock = format!("unix:{}", pool.with_file_name("n.sock").display());
    fails(
        &pool,
        &["serve", "--nbd", &nbd_sock, "--vhost-user", &vhost_sock],
        1,
        "no volume named `missing`",
    );
    fails(
        &pool,
        &["serve", "--nbd", "127.0.0.1:notaport"],
        2,
        "127.0.0.1:notaport",
    );
    fails(&pool, &["serve", "--cache", "none"], 2, "--cache");
    for bad in ["10", "99999999999", "many"] {
        fails(
            &pool,
            &["serve", "--mapping-cache-entries", bad],
            2,
            "--mapping-cache-entries",
        );
    }
    for bad in ["0", "257", "some"] {
        fails(&pool, &["serve", "--threads", bad], 2, "--threads");
    }
    let nowhere = pool.with_file_name("nowhere");
    fails(&nowhere, &["list"], 1, "no pool");
    // --force really recreates.
    ok(&pool, &["pool", "create", "--data-size", "1G", "--force"]);
    assert_eq!(ok(&pool, &["list", "--json"]).trim(), "[]");
}

#[test]
fn corrupt_metadata_is_reported_not_a_panic() {
    let (_d, pool) = new_pool();
    ok(&pool, &["create", "a", "--size", "1G"]);
    let meta = pool.join("metadata");
    let mut bytes = std::fs::read(&meta).unwrap();
    bytes[100] ^= 0xff; // inside the superblock: checksum fails
    std::fs::write(&meta, &bytes).unwrap();
    fails(&pool, &["list"], 1, "block 0");
    fails(&pool, &["check"], 1, "block 0");

    // Corrupt a tree node instead: the error names a block number.
    let (_d2, pool2) = new_pool();
    ok(&pool2, &["create", "a", "--size", "1G"]);
    let meta2 = pool2.join("metadata");
    let mut bytes = std::fs::read(&meta2).unwrap();
    let sb_details_root = u64::from_le_bytes(bytes[328..336].try_into().unwrap()) as usize;
    bytes[sb_details_root * 4096 + 200] ^= 0xff;
    std::fs::write(&meta2, &bytes).unwrap();
    fails(&pool2, &["list"], 1, &format!("{sb_details_root}"));
    fails(&pool2, &["check"], 1, &format!("{sb_details_root}"));
}

#[test]
fn check_reports_volumes_json_disagreements() {
    let (_d, pool) = new_pool();
    ok(&pool, &["create", "a", "--size", "1G"]);
    let path = pool.join("volumes.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["volumes"]["a"]["dev_id"] = serde_json::json!(77);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let o = uthin(&pool, &["check"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("names device 77"), "{t}");
    assert!(t.contains("[1]"), "the real device 1 is now unnamed: {t}");
    let j: serde_json::Value =
        serde_json::from_slice(&uthin(&pool, &["check", "--json"]).stdout).unwrap();
    assert_eq!(j["clean"], false);
    // The device itself is untouched: list shows it unnamed, adopt names it again.
    let list = ok(&pool, &["list"]);
    assert!(
        list.contains("(unnamed)") && list.contains("(missing)"),
        "{list}"
    );
}

#[test]
fn a_held_lock_names_its_holder() {
    let (_d, pool) = new_pool();
    // Hold the lock from a child process (flock is per open file description).
    let mut holder = Command::new("flock")
        .arg("--exclusive")
        .arg(pool.join("lock"))
        .args(["sh", "-c", "echo $$ > /dev/null; sleep 30"])
        .spawn()
        .expect("flock(1) runs");
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(pool.join("lock"), format!("{}\n", holder.id())).unwrap();
    let o = uthin(&pool, &["list"]);
    let _ = holder.kill();
    let _ = holder.wait();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("in use") && t.contains(&holder.id().to_string()),
        "{t}"
    );
}
