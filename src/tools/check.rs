//! `uthin check`: walks every tree, recounts every reference to every metadata and data block
//! and compares with the space maps (thin-provisioning-tools' `thin_check` is the model), then
//! compares volumes.json with the metadata.
//!
//! What it reports, each with block numbers or dev ids:
//! - unreadable blocks: bad checksum, wrong block number, malformed node, I/O error;
//! - structure: key order, node fill, a device in one tree but not the other, a wrong
//!   mapped-block count, a mapping to a data block outside the pool (out of range);
//! - counts: *leaked* (the space map counts references nobody holds), *dangling* (a block in
//!   use that the space map says is free), *doubly owned* (more holders than the space map
//!   counts) — for metadata and data blocks alike;
//! - volumes.json: an interrupted operation, a transaction id that disagrees, names of devices
//!   that do not exist, two names for one device.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;
use uthin_btree::{BytesValue, DataRef, Discrepancy, MetaBlock, RefCounter, U64Value};

use crate::pool::details::{BlockTime, DEVICE_DETAILS_SIZE, DeviceDetails};
use crate::pool::files::{PoolLock, PoolPaths};
use crate::pool::metadata::{BlockTree, DetailsTree, Metadata, TopTree};
use crate::pool::volumes::{VolumesFile, VolumesStore};
use crate::pool::{Pool, PoolError};

/// What kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A block could not be read or validated.
    BadBlock,
    /// The trees are malformed (order, fill, missing entries, wrong counts, out of range).
    Structure,
    /// A block the space map counts but nothing references.
    Leaked,
    /// A referenced block the space map says is free.
    Dangling,
    /// A block referenced more often than the space map counts.
    DoublyOwned,
    /// A space map's own figures are wrong.
    SpaceMap,
    /// volumes.json disagrees with the metadata.
    Volumes,
}

impl ProblemKind {
    fn label(self) -> &'static str {
        match self {
            ProblemKind::BadBlock => "bad block",
            ProblemKind::Structure => "structure",
            ProblemKind::Leaked => "leaked",
            ProblemKind::Dangling => "dangling",
            ProblemKind::DoublyOwned => "doubly owned",
            ProblemKind::SpaceMap => "space map",
            ProblemKind::Volumes => "volumes.json",
        }
    }
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Its kind.
    pub kind: ProblemKind,
    /// What exactly, with block numbers or dev ids.
    pub message: String,
}

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Problems found; empty when clean.
    pub problems: Vec<Problem>,
    /// Devices in the metadata.
    pub devices: u64,
    /// Mappings walked (per device; shared ones once per device).
    pub mappings: u64,
    /// Metadata transaction id.
    pub transaction_id: u64,
    /// Metadata blocks in use.
    pub metadata_used: u64,
    /// Data blocks in use.
    pub data_used: u64,
    /// Devices without a name (not a problem; `uthin adopt` names them).
    pub unnamed: Vec<u32>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn add(&mut self, kind: ProblemKind, message: impl Into<String>) {
        self.problems.push(Problem {
            kind,
            message: message.into(),
        });
    }

    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "transaction {}, {} devices, {} mappings, {} metadata blocks and {} data blocks in use",
            self.transaction_id, self.devices, self.mappings, self.metadata_used, self.data_used
        );
        if !self.unnamed.is_empty() {
            let _ = writeln!(
                s,
                "devices without a name (see `uthin adopt`): {:?}",
                self.unnamed
            );
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "clean");
        } else {
            let _ = writeln!(s, "{} problems:", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(s, "  {}: {}", p.kind.label(), p.message);
            }
        }
        s
    }

    /// Machine-readable report.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "clean": self.is_clean(),
            "transaction_id": self.transaction_id,
            "devices": self.devices,
            "mappings": self.mappings,
            "metadata_used_blocks": self.metadata_used,
            "data_used_blocks": self.data_used,
            "unnamed_devices": self.unnamed,
            "problems": self.problems.iter().map(|p| json!({
                "kind": p.kind.label(),
                "message": p.message,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Checks the pool in `dir` as committed on disk, without changing anything (volumes.json is
/// not reconciled). Takes the pool lock, so it fails while another process owns the pool. A
/// progress bar goes to stderr when `progress` and the pool has over a million mappings.
pub fn check_pool(dir: &Path, progress: bool) -> Result<CheckReport, PoolError> {
    let paths = PoolPaths::new(dir);
    if !paths.metadata().exists() {
        return Err(PoolError::NoPool(dir.to_path_buf()));
    }
    let _lock = PoolLock::acquire(&paths)?;
    let mut report = CheckReport::default();
    let io = crate::pool::metadata::file_io(&paths.metadata())?;
    let meta = match Metadata::open(io) {
        Ok(m) => m,
        Err(e) => {
            report.add(ProblemKind::BadBlock, e.to_string());
            return Ok(report);
        }
    };
    let store = VolumesStore::new(dir, paths.volumes());
    let volumes = if store.exists() {
        match store.read() {
            Ok(v) => Some(v),
            Err(e) => {
                report.add(ProblemKind::Volumes, e.to_string());
                None
            }
        }
    } else {
        None
    };
    check_metadata(&meta, volumes.as_ref(), progress, &mut report);
    Ok(report)
}

/// Checks an open pool's current state (committed or not): what the model tests run after
/// every step.
pub fn check_live(pool: &Pool) -> Result<CheckReport, PoolError> {
    let mut report = CheckReport::default();
    check_metadata(
        pool.metadata(),
        Some(pool.volumes_file()),
        false,
        &mut report,
    );
    Ok(report)
}

fn bad(report: &mut CheckReport, e: impl Into<PoolError>) {
    report.add(ProblemKind::BadBlock, e.into().to_string());
}

fn check_metadata(
    meta: &Metadata,
    volumes: Option<&VolumesFile>,
    progress: bool,
    report: &mut CheckReport,
) {
    let tm = &meta.tm;
    let sb = &meta.sb;
    report.transaction_id = sb.transaction_id;
    let nr_data = meta.data_nr_blocks();
    let mut c = RefCounter::with_capacity(meta.metadata_nr_blocks(), nr_data);
    // Walk errors make the counts incomplete; comparing them would only add false alarms.
    let mut complete = true;
    c.inc_meta(MetaBlock(0));
    if let Err(e) = tm.count_space_map_blocks(&mut c) {
        bad(report, e);
        complete = false;
    }

    // The device details tree.
    let details_root = MetaBlock(sb.device_details_root);
    if let Err(e) =
        uthin_btree::check::count_btree::<BytesValue<DEVICE_DETAILS_SIZE>>(tm, details_root, &mut c)
    {
        bad(report, e);
        complete = false;
    }
    let mut details: Vec<(u32, DeviceDetails)> = Vec::new();
    for entry in DetailsTree::open(details_root).iter(tm, ..) {
        match entry {
            Ok((k, raw)) => details.push((k as u32, DeviceDetails::unpack(&raw))),
            Err(e) => {
                bad(report, e);
                complete = false;
                break;
            }
        }
    }

    // The mapping tree: top level, then each device's block tree.
    let top_root = MetaBlock(sb.data_mapping_root);
    if let Err(e) = uthin_btree::check::count_btree::<U64Value>(tm, top_root, &mut c) {
        bad(report, e);
        complete = false;
    }
    let mut roots: Vec<(u32, MetaBlock)> = Vec::new();
    for entry in TopTree::open(top_root).iter(tm, ..) {
        match entry {
            Ok((k, root)) => roots.push((k as u32, root)),
            Err(e) => {
                bad(report, e);
                complete = false;
                break;
            }
        }
    }
    report.devices = roots.len() as u64;

    let detail_ids: BTreeSet<u32> = details.iter().map(|(d, _)| *d).collect();
    let mapping_ids: BTreeSet<u32> = roots.iter().map(|(d, _)| *d).collect();
    for d in detail_ids.difference(&mapping_ids) {
        report.add(
            ProblemKind::Structure,
            format!("device {d} has details but no mapping tree"),
        );
    }
    for d in mapping_ids.difference(&detail_ids) {
        report.add(
            ProblemKind::Structure,
            format!("device {d} has a mapping tree but no details"),
        );
    }

    let total_mapped: u64 = details.iter().map(|(_, d)| d.mapped_blocks).sum();
    let bar = if progress && total_mapped > 1_000_000 {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(total_mapped),
            indicatif::ProgressDrawTarget::stderr(),
        );
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "checking {bar:40} {pos}/{len} mappings ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };

    for (dev, root) in &roots {
        if let Err(e) = uthin_btree::check::count_btree::<DataRef<24>>(tm, *root, &mut c) {
            report.add(
                ProblemKind::BadBlock,
                format!("device {dev}: {}", PoolError::from(e)),
            );
            complete = false;
            continue;
        }
        let mut n = 0u64;
        for entry in BlockTree::open(*root).iter(tm, ..) {
            match entry {
                Ok((vb, raw)) => {
                    n += 1;
                    let bt = BlockTime::unpack(raw);
                    if bt.block.0 >= nr_data {
                        report.add(
                            ProblemKind::Structure,
                            format!(
                                "device {dev}: virtual block {vb} maps to data block {}, outside the pool's {nr_data} blocks",
                                bt.block.0
                            ),
                        );
                    }
                    if n % 65_536 == 0
                        && let Some(b) = &bar
                    {
                        b.inc(65_536);
                    }
                }
                Err(e) => {
                    report.add(
                        ProblemKind::BadBlock,
                        format!("device {dev}: {}", PoolError::from(e)),
                    );
                    complete = false;
                    break;
                }
            }
        }
        if let Some(b) = &bar {
            b.inc(n % 65_536);
        }
        report.mappings += n;
        // The live pool keeps changed counts in memory until its commit.
        let current = meta.details(crate::units::DevId(*dev)).ok().flatten();
        if let Some(d) = current
            && d.mapped_blocks != n
        {
            report.add(
                ProblemKind::Structure,
                format!(
                    "device {dev}: details say {} mapped blocks, its tree has {n}",
                    d.mapped_blocks
                ),
            );
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    // A held metadata snapshot keeps its own copy of the superblock and a reference on both
    // trees' roots.
    if sb.held_root != 0 {
        c.inc_meta(MetaBlock(sb.held_root));
        match meta.read_held_copy(sb.held_root) {
            Ok(copy) => {
                let counted =
                    uthin_btree::check::count_btree::<uthin_btree::SubtreeRef<DataRef<24>>>(
                        tm,
                        MetaBlock(copy.data_mapping_root),
                        &mut c,
                    )
                    .and_then(|()| {
                        uthin_btree::check::count_btree::<BytesValue<DEVICE_DETAILS_SIZE>>(
                            tm,
                            MetaBlock(copy.device_details_root),
                            &mut c,
                        )
                    });
                if let Err(e) = counted {
                    report.add(
                        ProblemKind::BadBlock,
                        format!(
                            "metadata snapshot at block {}: {}",
                            sb.held_root,
                            PoolError::from(e)
                        ),
                    );
                    complete = false;
                }
            }
            Err(e) => {
                report.add(ProblemKind::BadBlock, e.to_string());
                complete = false;
            }
        }
    }

    for p in c.problems() {
        report.add(ProblemKind::Structure, p.clone());
    }

    if complete {
        match tm.verify_metadata_counts(&c) {
            Ok(d) => d.iter().for_each(|d| add_discrepancy(report, d)),
            Err(e) => bad(report, e),
        }
        match tm.verify_data_counts(&c) {
            Ok(d) => d.iter().for_each(|d| add_discrepancy(report, d)),
            Err(e) => bad(report, e),
        }
    }
    report.metadata_used = meta.metadata_nr_blocks() - meta.metadata_nr_free().unwrap_or(0);
    report.data_used = nr_data - meta.data_nr_free().unwrap_or(0);

    check_volumes(volumes, &mapping_ids, sb.transaction_id, report);
}

fn add_discrepancy(report: &mut CheckReport, d: &Discrepancy) {
    if d.is_hint() {
        // Search hints (free counts, first free entry): the kernel and thin_check do not rely
        // on them and thin_restore does not write them exact; uthin recomputes them.
        return;
    }
    let Some(block) = d.block else {
        report.add(ProblemKind::SpaceMap, d.to_string());
        return;
    };
    if d.what != "reference count" {
        report.add(ProblemKind::SpaceMap, d.to_string());
        return;
    }
    let (kind, msg) = if d.expected == 0 {
        (
            ProblemKind::Leaked,
            format!(
                "{} block {block}: the space map counts {} references, nothing refers to it",
                d.space, d.actual
            ),
        )
    } else if d.actual == 0 {
        (
            ProblemKind::Dangling,
            format!(
                "{} block {block}: referenced {} times but free in the space map",
                d.space, d.expected
            ),
        )
    } else if d.expected > d.actual {
        (
            ProblemKind::DoublyOwned,
            format!(
                "{} block {block}: referenced {} times but counted {}",
                d.space, d.expected, d.actual
            ),
        )
    } else {
        (
            ProblemKind::Leaked,
            format!(
                "{} block {block}: counted {} times but referenced {}",
                d.space, d.actual, d.expected
            ),
        )
    };
    report.add(kind, msg);
}

fn check_volumes(
    volumes: Option<&VolumesFile>,
    devices: &BTreeSet<u32>,
    txid: u64,
    report: &mut CheckReport,
) {
    let Some(v) = volumes else {
        report.unnamed = devices.iter().copied().collect();
        return;
    };
    if let Some(p) = &v.pending {
        report.add(
            ProblemKind::Volumes,
            format!(
                "an interrupted operation is pending (transaction {}): {:?}; opening the pool finishes or drops it",
                p.transaction_id, p.op
            ),
        );
    }
    if v.transaction_id != txid {
        report.add(
            ProblemKind::Volumes,
            format!(
                "volumes.json is at transaction {} but the metadata at {txid}",
                v.transaction_id
            ),
        );
    }
    let mut seen = BTreeSet::new();
    for rec in v.volumes.values() {
        if !devices.contains(&rec.dev_id) {
            report.add(
                ProblemKind::Volumes,
                format!(
                    "volume `{}` names device {}, which is not in the metadata",
                    rec.name, rec.dev_id
                ),
            );
        }
        if !seen.insert(rec.dev_id) {
            report.add(
                ProblemKind::Volumes,
                format!("device {} has more than one name", rec.dev_id),
            );
        }
    }
    report.unnamed = devices.difference(&seen).copied().collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc(expected: u64, actual: u64, what: &'static str) -> Discrepancy {
        Discrepancy {
            space: "data",
            block: Some(42),
            expected,
            actual,
            what,
        }
    }

    #[test]
    fn discrepancies_are_named_by_kind_and_block() {
        let cases = [
            (disc(0, 1, "reference count"), ProblemKind::Leaked),
            (disc(2, 0, "reference count"), ProblemKind::Dangling),
            (disc(3, 1, "reference count"), ProblemKind::DoublyOwned),
            (disc(1, 2, "reference count"), ProblemKind::Leaked),
        ];
        for (d, kind) in cases {
            let mut r = CheckReport::default();
            add_discrepancy(&mut r, &d);
            assert_eq!(r.problems.len(), 1);
            assert_eq!(r.problems[0].kind, kind, "{d}");
            assert!(
                r.problems[0].message.contains("block 42"),
                "{:?}",
                r.problems
            );
            assert!(!r.is_clean());
            assert!(r.to_text().contains(kind.label()));
        }
        // Search hints are not problems (thin_restore writes them inexact).
        let mut r = CheckReport::default();
        add_discrepancy(&mut r, &disc(5, 4, "free entries of bitmap"));
        assert!(r.is_clean());
    }

    #[test]
    fn volumes_disagreements_name_the_device() {
        let mut v = VolumesFile::new(3);
        for (name, dev) in [("a", 1), ("b", 5), ("c", 5)] {
            v.volumes.insert(
                name.into(),
                crate::pool::volumes::VolumeRecord {
                    name: name.into(),
                    dev_id: dev,
                    size: 1,
                    read_only: false,
                    origin: None,
                    created: String::new(),
                },
            );
        }
        let devices: BTreeSet<u32> = [1, 2].into_iter().collect();
        let mut r = CheckReport::default();
        check_volumes(Some(&v), &devices, 4, &mut r);
        let text = r.to_text();
        assert!(
            text.contains("transaction 3 but the metadata at 4"),
            "{text}"
        );
        assert!(text.contains("names device 5"), "{text}");
        assert!(text.contains("device 5 has more than one name"), "{text}");
        assert_eq!(r.unnamed, vec![2]);
    }
}
