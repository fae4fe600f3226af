//! Helpers shared by the pool, CLI, volume and repair tests (`volume_common` and
//! `repair_common` re-export them): running thin-provisioning-tools on a metadata image and
//! reading its view of the pool, and loop devices for the block-device tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use uthin::tools::xml::{XmlSuperblock, parse_xml};

/// Runs the built `uthin` binary on the pool in `pool` (with `$UTHIN_POOL` unset).
pub fn uthin(pool: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uthin"))
        .arg("--pool")
        .arg(pool)
        .args(args)
        .env_remove("UTHIN_POOL")
        .output()
        .expect("uthin runs")
}

/// A command's stdout followed by its stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `thin_check` on a metadata file; Err carries its output.
pub fn thin_check(metadata: &Path) -> Result<(), String> {
    let out = Command::new("thin_check")
        .arg(metadata)
        .output()
        .map_err(|e| format!("cannot run thin_check: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "thin_check {} failed ({}):\n{}{}",
            metadata.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `thin_check` on a metadata image held in memory (written to a temporary file).
pub fn thin_check_bytes(image: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("metadata");
    std::fs::write(&path, image).map_err(|e| e.to_string())?;
    thin_check(&path)
}

/// A loop device over a file, detached on drop. The tests that use one need root and loop
/// devices, and say so when they are missing.
pub struct Loop(pub String);

impl Loop {
    /// Attaches `image` to the first free loop device.
    pub fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "this test needs root and loop devices: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Runs `thin_dump` on a metadata file and parses its XML.
pub fn thin_dump(metadata: &Path) -> XmlSuperblock {
    let out = Command::new("thin_dump")
        .arg(metadata)
        .output()
        .expect("thin_dump runs");
    assert!(
        out.status.success(),
        "thin_dump {} failed: {}",
        metadata.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_xml(&String::from_utf8_lossy(&out.stdout)).expect("thin_dump's XML parses")
}

/// thin_dump's devices as dev id → (virtual block → data block).
pub fn dump_mappings(sb: &XmlSuperblock) -> BTreeMap<u32, BTreeMap<u64, u64>> {
    sb.devices
        .iter()
        .map(|d| {
            (
                d.dev_id,
                d.mappings.iter().map(|m| (m.origin, m.data)).collect(),
            )
        })
        .collect()
}

/// Runs `thin_restore` from XML text into a fresh metadata file of `size` bytes.
pub fn thin_restore(xml: &str, metadata: &Path, size: u64) {
    let xml_path = metadata.with_extension("xml");
    std::fs::write(&xml_path, xml).unwrap();
    let f = std::fs::File::create(metadata).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let out = Command::new("thin_restore")
        .arg("-i")
        .arg(&xml_path)
        .arg("-o")
        .arg(metadata)
        .output()
        .expect("thin_restore runs");
    assert!(
        out.status.success(),
        "thin_restore failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `thin_ls` of a metadata file: dev id → (mapped, exclusive, shared) blocks.
pub fn thin_ls(metadata: &Path) -> BTreeMap<u32, (u64, u64, u64)> {
    let out = Command::new("thin_ls")
        .arg("--no-headers")
        .arg("--format")
        .arg("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS")
        .arg(metadata)
        .output()
        .expect("thin_ls runs");
    assert!(
        out.status.success(),
        "thin_ls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            (f.len() == 4).then(|| (f[0] as u32, (f[1], f[2], f[3])))
        })
        .collect()
}
