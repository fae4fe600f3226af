//! Helpers of the repair tests: a pool with several devices and snapshots whose data blocks carry
//! tags, an independent reader of the metadata's trees (which device and virtual blocks sit under
//! each node: the oracle of what a corrupted block held), corruption, and the expected result.
#![allow(dead_code)]

#[path = "../pool_common/mod.rs"]
mod pool_common;
#[allow(unused_imports)] // each test binary uses a different subset
pub use pool_common::{Loop, text, thin_check, thin_dump, uthin};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use uthin::pool::{CreateOptions, Pool};
use uthin::tools::xml::{XmlDevice, XmlSuperblock, parse_xml};
use uthin::units::{DevId, VirtBlock};

pub const BLOCK_SIZE: u64 = 64 << 10;
/// Data blocks of the test pool (a sparse data file of 5 GiB).
pub const NR_DATA_BLOCKS: u64 = 80_000;
/// Mappings of the big origin: > 252 full leaves, so its tree has internal nodes below the root.
pub const BASE_MAPPINGS: u64 = 70_000;

/// The pool built by [`build_pool`] and what every device should read.
pub struct Built {
    pub dir: PathBuf,
    /// (dev, virtual block) -> tag its data block holds.
    pub expected: HashMap<(u32, u64), String>,
    /// Device 6 as thin_dump showed it just before it was deleted.
    pub deleted: XmlDevice,
}

fn tag(dev: u32, vb: u64, generation: u32) -> String {
    format!("dev {dev} vb {vb} gen {generation};")
}

fn write_tag(data: &std::fs::File, block: u64, t: &str) {
    data.write_all_at(t.as_bytes(), block * BLOCK_SIZE).unwrap();
}

/// Builds, in `dir`: `base` (dev 1, 70,000 mappings), `snap1` (dev 2, a snapshot of base taken
/// before base rewrote virtual blocks 100..400), `snap2` (dev 3, a snapshot of snap1 never
/// written: the same tree), `other` (dev 4, a few mappings low and high), `other-snap` (dev 5,
/// a snapshot of other that rewrote 5..8), and a device 6 created, written and deleted (stale
/// nodes). Every provisioned data block starts with a tag naming who wrote it.
pub fn build_pool(dir: &Path) -> Built {
    let mut pool = Pool::create(
        dir,
        &CreateOptions {
            data_size: NR_DATA_BLOCKS * BLOCK_SIZE,
            block_size: BLOCK_SIZE,
            metadata_size: Some(8 << 20),
            force: false,
        },
    )
    .unwrap();
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(pool.data_path())
        .unwrap();
    let mut expected: HashMap<(u32, u64), String> = HashMap::new();
    let provision =
        |pool: &mut Pool, dev: u32, vb: u64, generation: u32, exp: &mut HashMap<_, _>| {
            let t = tag(dev, vb, generation);
            let b = pool.provision(DevId(dev), VirtBlock(vb)).unwrap();
            write_tag(&data, b.0, &t);
            exp.insert((dev, vb), t);
        };
    let base = pool.create_volume("base", 1 << 40).unwrap().dev_id.0;
    assert_eq!(base, 1);
    for vb in 0..BASE_MAPPINGS {
        provision(&mut pool, base, vb, 0, &mut expected);
    }
    pool.commit().unwrap();
    let snap1 = pool.snapshot("base", "snap1", false).unwrap().dev_id.0;
    for vb in 0..BASE_MAPPINGS {
        let t = expected[&(base, vb)].clone();
        expected.insert((snap1, vb), t);
    }
    for vb in 100..400 {
        let (_, new) = pool.break_sharing(DevId(base), VirtBlock(vb)).unwrap();
        let t = tag(base, vb, 1);
        write_tag(&data, new.0, &t);
        expected.insert((base, vb), t);
    }
    pool.commit().unwrap();
    let snap2 = pool.snapshot("snap1", "snap2", true).unwrap().dev_id.0;
    for vb in 0..BASE_MAPPINGS {
        let t = expected[&(snap1, vb)].clone();
        expected.insert((snap2, vb), t);
    }
    let other = pool.create_volume("other", 1 << 40).unwrap().dev_id.0;
    for vb in (5..11).chain(1_000_000..1_000_600) {
        provision(&mut pool, other, vb, 0, &mut expected);
    }
    pool.commit().unwrap();
    let osnap = pool
        .snapshot("other", "other-snap", false)
        .unwrap()
        .dev_id
        .0;
    for vb in (5..11).chain(1_000_000..1_000_600) {
        let t = expected[&(other, vb)].clone();
        expected.insert((osnap, vb), t);
    }
    for vb in 5..9 {
        let (_, new) = pool.break_sharing(DevId(osnap), VirtBlock(vb)).unwrap();
        let t = tag(osnap, vb, 1);
        write_tag(&data, new.0, &t);
        expected.insert((osnap, vb), t);
    }
    pool.commit().unwrap();
    let tmp = pool.create_volume("tmp", 1 << 30).unwrap().dev_id.0;
    for vb in 0..1000 {
        pool.provision(DevId(tmp), VirtBlock(vb)).unwrap();
    }
    pool.commit().unwrap();
    let deleted = thin_dump(&dir.join("metadata"))
        .devices
        .into_iter()
        .find(|d| d.dev_id == tmp)
        .unwrap();
    let c = pool.delete_volume("tmp").unwrap();
    pool.punch_freed(&c.freed).unwrap();
    assert_eq!([base, snap1, snap2, other, osnap], [1, 2, 3, 4, 5]);
    Built {
        dir: dir.to_path_buf(),
        expected,
        deleted,
    }
}

/// A copy of the pool in `to`: metadata and volumes.json copied, the data file symlinked (the
/// tests never write data, and a copy of a sparse file may not stay sparse).
pub fn copy_pool(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("metadata"), to.join("metadata")).unwrap();
    std::fs::copy(from.join("volumes.json"), to.join("volumes.json")).unwrap();
    std::os::unix::fs::symlink(from.join("data"), to.join("data")).unwrap();
}

// ------------------------------------------------------------------------------------------
// An independent reader of dm-thin's node format (not the code under test).

pub fn read_block(metadata: &Path, b: u64) -> Vec<u8> {
    let f = std::fs::File::open(metadata).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, b * 4096).unwrap();
    buf
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A node: leaf?, keys, 8-byte values (internal children or leaf values).
pub struct RawNode {
    pub leaf: bool,
    pub keys: Vec<u64>,
    pub values: Vec<u64>,
}

pub fn parse_node(block: &[u8]) -> RawNode {
    let leaf = le32(block, 4) == 2;
    let nr = le32(block, 16) as usize;
    let max = le32(block, 20) as usize;
    let vs = le32(block, 24) as usize;
    let keys = (0..nr).map(|i| le64(block, 32 + 8 * i)).collect();
    let values = if vs == 8 {
        (0..nr).map(|i| le64(block, 32 + 8 * max + 8 * i)).collect()
    } else {
        Vec::new()
    };
    RawNode { leaf, keys, values }
}

/// Superblock fields: (data mapping root, device details root, time, transaction id).
pub fn superblock_roots(metadata: &Path) -> (u64, u64, u32, u64) {
    let sb = read_block(metadata, 0);
    (le64(&sb, 320), le64(&sb, 328), le32(&sb, 44), le64(&sb, 48))
}

/// Every node of every device's block tree, with the (dev, virtual block) mappings under it;
/// also the top level's nodes (all mappings of the devices under them).
pub fn mapping_nodes(metadata: &Path) -> BTreeMap<u64, BTreeSet<(u32, u64)>> {
    let (top_root, ..) = superblock_roots(metadata);
    let mut devs: Vec<(u32, u64)> = Vec::new();
    let mut top_nodes: Vec<(u64, Vec<u32>)> = Vec::new();
    fn walk_top(m: &Path, b: u64, devs: &mut Vec<(u32, u64)>, nodes: &mut Vec<(u64, Vec<u32>)>) {
        let n = parse_node(&read_block(m, b));
        let before = devs.len();
        if n.leaf {
            devs.extend(
                n.keys
                    .iter()
                    .map(|k| *k as u32)
                    .zip(n.values.iter().copied()),
            );
        } else {
            for c in &n.values {
                walk_top(m, *c, devs, nodes);
            }
        }
        nodes.push((b, devs[before..].iter().map(|(d, _)| *d).collect()));
    }
    walk_top(metadata, top_root, &mut devs, &mut top_nodes);
    let mut out: BTreeMap<u64, BTreeSet<(u32, u64)>> = BTreeMap::new();
    let mut per_dev: BTreeMap<u32, BTreeSet<(u32, u64)>> = BTreeMap::new();
    fn walk(m: &Path, b: u64, dev: u32, out: &mut BTreeMap<u64, BTreeSet<(u32, u64)>>) -> Vec<u64> {
        let n = parse_node(&read_block(m, b));
        let vbs: Vec<u64> = if n.leaf {
            n.keys.clone()
        } else {
            n.values
                .iter()
                .flat_map(|c| walk(m, *c, dev, out))
                .collect()
        };
        out.entry(b)
            .or_default()
            .extend(vbs.iter().map(|v| (dev, *v)));
        vbs
    }
    for (dev, root) in &devs {
        let vbs = walk(metadata, *root, *dev, &mut out);
        per_dev.insert(*dev, vbs.into_iter().map(|v| (*dev, v)).collect());
    }
    for (b, ds) in top_nodes {
        let set = out.entry(b).or_default();
        for d in ds {
            set.extend(per_dev[&d].iter().copied());
        }
    }
    out
}

/// The leaves (with their depth-first order) and internal nodes of device `dev`'s tree.
pub fn device_nodes(metadata: &Path, dev: u32) -> (Vec<u64>, Vec<u64>) {
    let (top_root, ..) = superblock_roots(metadata);
    let mut root = None;
    let mut stack = vec![top_root];
    while let Some(b) = stack.pop() {
        let n = parse_node(&read_block(metadata, b));
        if n.leaf {
            if let Some(i) = n.keys.iter().position(|k| *k == u64::from(dev)) {
                root = Some(n.values[i]);
            }
        } else {
            stack.extend(n.values.iter().copied());
        }
    }
    let mut leaves = Vec::new();
    let mut internal = Vec::new();
    fn walk(m: &Path, b: u64, leaves: &mut Vec<u64>, internal: &mut Vec<u64>) {
        let n = parse_node(&read_block(m, b));
        if n.leaf {
            leaves.push(b);
        } else {
            internal.push(b);
            for c in &n.values {
                walk(m, *c, leaves, internal);
            }
        }
    }
    walk(
        metadata,
        root.expect("device in the top level"),
        &mut leaves,
        &mut internal,
    );
    (leaves, internal)
}

/// Flips a byte in the middle of block `b`: its checksum no longer matches.
pub fn corrupt(metadata: &Path, b: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(metadata)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, b * 4096 + 2000).unwrap();
    byte[0] ^= 0x5a;
    f.write_all_at(&byte, b * 4096 + 2000).unwrap();
}

/// Rewrites block `b` with `edit` applied and a valid checksum (damage a checksum cannot see).
pub fn rewrite_sealed(metadata: &Path, b: u64, xor: u32, edit: impl FnOnce(&mut [u8])) {
    let mut block = read_block(metadata, b);
    edit(&mut block);
    let csum = uthin_btree::dm_checksum(&block[4..], xor);
    block[0..4].copy_from_slice(&csum.to_le_bytes());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(metadata)
        .unwrap();
    f.write_all_at(&block, b * 4096).unwrap();
}

// ------------------------------------------------------------------------------------------
// thin-provisioning-tools

/// thin_repair 0.9 of `damaged` into a fresh file: its dump, or its error. The output gets 8×
/// the input's size: thin_repair writes every snapshot's tree separately and its leaves half
/// full, so the input's size is not enough for a pool with snapshots.
pub fn thin_repair(damaged: &Path, scratch: &Path) -> Result<XmlSuperblock, String> {
    thin_repair_with(damaged, scratch, &[])
}

/// [`thin_repair`] with extra arguments (e.g. `--transaction-id 7` for a lost superblock).
pub fn thin_repair_with(
    damaged: &Path,
    scratch: &Path,
    args: &[&str],
) -> Result<XmlSuperblock, String> {
    let out_path = scratch.join("thin_repair.out");
    let f = std::fs::File::create(&out_path).unwrap();
    f.set_len(8 * std::fs::metadata(damaged).unwrap().len())
        .unwrap();
    drop(f);
    let out = Command::new("thin_repair")
        .arg("-i")
        .arg(damaged)
        .arg("-o")
        .arg(&out_path)
        .args(args)
        .output()
        .expect("thin_repair runs");
    if !out.status.success() {
        return Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_string());
    }
    let dump = Command::new("thin_dump").arg(&out_path).output().unwrap();
    if !dump.status.success() {
        return Err(format!(
            "its output does not dump: {}",
            String::from_utf8_lossy(&dump.stderr).trim()
        ));
    }
    parse_xml(&String::from_utf8_lossy(&dump.stdout)).map_err(|e| e.to_string())
}

/// Every (dev, virtual block, data block) of a dump.
pub fn triples(x: &XmlSuperblock) -> BTreeSet<(u32, u64, u64)> {
    x.devices
        .iter()
        .flat_map(|d| d.mappings.iter().map(move |m| (d.dev_id, m.origin, m.data)))
        .collect()
}

/// `original` without the mappings in `lost`, mapped counts following.
pub fn without(original: &XmlSuperblock, lost: &BTreeSet<(u32, u64)>) -> XmlSuperblock {
    let mut x = original.clone();
    for d in &mut x.devices {
        d.mappings.retain(|m| !lost.contains(&(d.dev_id, m.origin)));
        d.mapped_blocks = d.mappings.len() as u64;
    }
    x
}

/// Leaves shaped like the mapping tree's top level (keys are small device ids, values blocks
/// of this small metadata) or like the details tree (24-byte values): current or stale.
pub fn top_or_details_shaped(block: &[u8]) -> (bool, bool) {
    let leaf = block[4..8] == 2u32.to_le_bytes();
    let nr = u32::from_le_bytes(block[16..20].try_into().unwrap());
    let details = leaf && block[24..28] == 24u32.to_le_bytes() && nr <= 126;
    let leaf8 = leaf
        && block[20..24] == 252u32.to_le_bytes()
        && block[24..28] == 8u32.to_le_bytes()
        && nr <= 252;
    let top = leaf8 && {
        let n = parse_node(block);
        !n.keys.is_empty()
            && n.keys.iter().all(|k| *k < 16)
            && n.values.iter().all(|v| *v > 0 && *v < 2048)
    };
    (top, details)
}
