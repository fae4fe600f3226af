//! Helpers shared by the pool and CLI tests: running thin-provisioning-tools on a metadata
//! image and reading its view of the pool.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use uthin::tools::xml::{XmlSuperblock, parse_xml};

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

/// Runs `thin_dump` on a metadata file and parses its XML.
pub fn thin_dump(metadata: &Path) -> XmlSuperblock {
    let out = Command::new("thin_dump")
        .arg(metadata)
        .output()
        .expect("thin_dump runs");
    assert!(
        out.status.success(),
        "thin_dump failed: {}",
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
