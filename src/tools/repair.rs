//! `uthin repair`: rebuilds damaged metadata from what can still be read (thin-provisioning-tools'
//! `thin_repair` is the model).
//!
//! # What it does
//! 1. **Reads without trusting.** The metadata is opened read-only without its space maps
//!    ([`TransactionManager::open_read_only`]): they are rebuilt, never read, so a damaged
//!    bitmap or index costs nothing. Every block is validated (checksum, its own block number,
//!    node header, key order and the key range its parent gives it) and the device details tree,
//!    the mapping tree's top level and each device's block tree are walked with
//!    [`salvage_btree`]: a block that fails loses only its own subtree, and the report says which
//!    block, which tree or device, which key range and why.
//! 2. **Keeps what is sound.** Every readable mapping is kept unless it points outside the data
//!    device or maps a data block that the same device already maps at a lower virtual block
//!    (dm-thin never maps one data block twice in a device: one of the two is damage). A device
//!    known to only one of the two trees is kept: without details they are rebuilt (mapped count
//!    from the mappings, times and transaction id from the superblock, so the kernel's time-based
//!    sharing test errs on the side of copying); without a readable mapping tree it is kept
//!    empty, so its name and id stay and the report says it lost everything.
//! 3. **Writes fresh metadata** through restore's writer (`super::restore::write_device`) into a
//!    temp file beside the old one: trees and both space maps rebuilt from the salvaged
//!    references, so every count is exact and data blocks shared between devices stay shared
//!    (count > 1, copy on write). Devices whose trees had the same root (snapshots not written
//!    since) share one tree again. Transaction id, time, data block size and uuid come from the
//!    old superblock. The result is checked ([`super::check`]) before it replaces anything.
//! 4. **Replaces atomically and keeps the damaged file**: the old file gets a second name
//!    (`metadata.damaged-<UTC time>`), the temp file is fsynced and renamed over `metadata`, the
//!    directory fsynced. A metadata block device is copied aside, then overwritten superblock last.
//! 5. **Reconciles volumes.json**: a pending operation is resolved as on open, names of devices
//!    that are gone are removed (and reported); devices without a name stay adoptable.
//!
//! It refuses while another process owns the pool (`uthin serve`), and when the superblock is
//! unreadable unless the data block size is given: the roots of the trees are then found by
//! scanning every metadata block for B-tree nodes and picking the newest consistent pair of a
//! mapping tree and a details tree (thin_repair 0.9 too needs the transaction id, data block
//! size and number of data blocks on its command line then).
//! `--dry-run` does all the reading and reports, and writes nothing.
//!
//! Memory does not grow with a device: its tree is walked twice (count, then stream into the
//! new metadata) and its duplicate check is a bit set over the data ranges it maps; the rest is
//! the two block caches and the final check's counters. A scan (lost superblock or roots, a lost
//! top-level entry) keeps a summary per B-tree node. Older copies of lost nodes are used only
//! when they match what survives (see `recover_lost_roots`) or when nothing else is left.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use uthin_btree::io::BlockIo;
use uthin_btree::salvage::{LostSubtree, read_node, salvage_btree};
use uthin_btree::space_map::MAX_METADATA_BLOCKS;
use uthin_btree::{BLOCK_SIZE, BytesValue, FileIo, MetaBlock, SmRoot, TmConfig, U64Value};
use uthin_btree::{TransactionManager, Validator};

use crate::pool::details::{BlockTime, DEVICE_DETAILS_SIZE, DeviceDetails};
use crate::pool::files::{PoolLock, PoolPaths, file_or_device_size, sync_dir};
use crate::pool::metadata::{Metadata, SUPERBLOCK_VALIDATOR, TopTree};
use crate::pool::superblock::Superblock;
use crate::pool::volumes::{Reconciled, VolumesFile, VolumesStore, rfc3339_now};
use crate::pool::{PoolError, size};
use crate::tools::check::{CheckReport, check_metadata};
use crate::tools::restore::{add_mapping, begin_device, write_device};
use crate::tools::xml::{XmlDevice, XmlMapping};
use crate::units::DevId;

/// Options of [`repair_pool`].
#[derive(Debug, Clone, Default)]
pub struct RepairOptions {
    /// Read and report only; write nothing.
    pub dry_run: bool,
    /// Data block size in bytes, for when the superblock is unreadable (required then).
    pub data_block_size: Option<u64>,
    /// Data blocks in the pool, for when the superblock is unreadable (default: the data
    /// file's size divided by the block size).
    pub nr_data_blocks: Option<u64>,
    /// Transaction id, for when the superblock is unreadable (default: volumes.json's, else
    /// the highest one in the device details).
    pub transaction_id: Option<u64>,
}

/// Where the new superblock's roots and fields came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderSource {
    /// The old superblock was read and validated.
    Superblock,
    /// The old superblock was unreadable: the trees were found by scanning the metadata, the
    /// block size (and maybe more) came from the command line.
    Scan {
        /// Why the superblock was rejected.
        superblock_error: String,
        /// Candidate (unreferenced, consistent) mapping-tree roots found.
        mapping_candidates: usize,
        /// Candidate device-details-tree roots found.
        details_candidates: usize,
    },
}

/// What kind of loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// A subtree could not be read: the entries under it are lost.
    Unreadable,
    /// A device's whole mapping tree is lost (the device is kept, empty).
    MappingsLost,
    /// A device's entry in the mapping tree's top level was lost, and its tree was found
    /// through an older copy of that node: it matches the device's details, but it may
    /// predate the device's last changes.
    OlderCopy,
    /// A device's details are lost and were rebuilt.
    DetailsRebuilt,
    /// Mappings pointing outside the data device were dropped.
    OutsideDataDevice,
    /// Mappings of a data block the same device already maps were dropped.
    Duplicate,
    /// A name in volumes.json whose device is gone was removed.
    NameRemoved,
    /// Anything else (an impossible device id, an unreadable volumes.json).
    Other,
}

impl LossKind {
    fn label(self) -> &'static str {
        match self {
            LossKind::Unreadable => "unreadable",
            LossKind::MappingsLost => "mapping tree lost",
            LossKind::OlderCopy => "tree found through an older copy",
            LossKind::DetailsRebuilt => "details rebuilt",
            LossKind::OutsideDataDevice => "outside the data device",
            LossKind::Duplicate => "duplicate",
            LossKind::NameRemoved => "name removed",
            LossKind::Other => "other",
        }
    }
}

/// One thing that was lost or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// Its kind.
    pub kind: LossKind,
    /// The device it concerns, if one.
    pub dev_id: Option<u32>,
    /// The metadata block that could not be used, if one.
    pub block: Option<u64>,
    /// What was lost and why, in words (names the tree, the key range, the block).
    pub message: String,
}

/// One device of the repaired metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Device id.
    pub dev_id: u32,
    /// Mappings kept.
    pub mappings: u64,
    /// Mapped blocks the old details claimed (when they were readable).
    pub mapped_before: Option<u64>,
    /// A device whose tree this one shares again (same root in the old metadata).
    pub shares_tree_with: Option<u32>,
}

/// What a repair found and did.
#[derive(Debug, Clone)]
pub struct RepairReport {
    /// The pool directory.
    pub dir: PathBuf,
    /// Where the header and roots came from.
    pub source: HeaderSource,
    /// Transaction id written.
    pub transaction_id: u64,
    /// Pool time written.
    pub time: u32,
    /// Data block size in bytes.
    pub data_block_size: u64,
    /// Data blocks in the pool.
    pub nr_data_blocks: u64,
    /// Metadata blocks of the new metadata.
    pub metadata_blocks: u64,
    /// The devices kept, in id order.
    pub devices: Vec<DeviceSummary>,
    /// Everything lost or dropped; empty when the repair lost nothing.
    pub losses: Vec<Loss>,
    /// Things worth knowing that lose nothing (a released metadata snapshot, a resolved
    /// pending operation, grown metadata).
    pub notes: Vec<String>,
    /// Devices without a name after the repair (`uthin adopt` names them).
    pub unnamed: Vec<u32>,
    /// Nothing was written.
    pub dry_run: bool,
    /// Where the damaged metadata was kept (not for a dry run).
    pub damaged_copy: Option<PathBuf>,
}

impl RepairReport {
    /// True when nothing was lost: the new metadata holds everything the old one did.
    pub fn is_clean(&self) -> bool {
        self.losses.is_empty()
    }

    /// Mappings kept over all devices.
    pub fn mappings_kept(&self) -> u64 {
        self.devices.iter().map(|d| d.mappings).sum()
    }

    fn lose(&mut self, kind: LossKind, dev_id: Option<u32>, block: Option<u64>, message: String) {
        self.losses.push(Loss {
            kind,
            dev_id,
            block,
            message,
        });
    }

    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        match &self.source {
            HeaderSource::Superblock => {
                let _ = writeln!(s, "superblock read");
            }
            HeaderSource::Scan {
                superblock_error,
                mapping_candidates,
                details_candidates,
            } => {
                let _ = writeln!(
                    s,
                    "superblock unreadable ({superblock_error}): trees found by scanning the metadata \
                     (newest of {mapping_candidates} mapping-tree and {details_candidates} details-tree candidates)"
                );
            }
        }
        let _ = writeln!(
            s,
            "transaction {}, time {}, {} data blocks of {}",
            self.transaction_id,
            self.time,
            self.nr_data_blocks,
            size::format_size(self.data_block_size)
        );
        for d in &self.devices {
            let before = match d.mapped_before {
                Some(b) if b != d.mappings => format!(" (its details said {b})"),
                _ => String::new(),
            };
            let shared = d
                .shares_tree_with
                .map(|o| format!(", shares its tree with device {o}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "device {}: {} mappings kept{before}{shared}",
                d.dev_id, d.mappings
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for l in &self.losses {
            let _ = writeln!(s, "lost ({}): {}", l.kind.label(), l.message);
        }
        if !self.unnamed.is_empty() {
            let _ = writeln!(
                s,
                "devices without a name (see `uthin adopt`): {:?}",
                self.unnamed
            );
        }
        let what = format!(
            "{} devices, {} mappings",
            self.devices.len(),
            self.mappings_kept()
        );
        if self.dry_run {
            let _ = writeln!(s, "dry run: nothing written; a repair would keep {what}");
        } else {
            let _ = writeln!(s, "wrote fresh metadata with {what}");
            if let Some(p) = &self.damaged_copy {
                let _ = writeln!(s, "the damaged metadata is kept as {}", p.display());
            }
        }
        if self.is_clean() {
            let _ = writeln!(s, "clean: nothing was lost");
        } else {
            let n = self.losses.len();
            let _ = writeln!(
                s,
                "{n} loss{} (listed above): check what the devices hold",
                if n == 1 { "" } else { "es" }
            );
        }
        s
    }

    /// Machine-readable report.
    pub fn to_json(&self) -> serde_json::Value {
        let source = match &self.source {
            HeaderSource::Superblock => json!({ "from": "superblock" }),
            HeaderSource::Scan {
                superblock_error,
                mapping_candidates,
                details_candidates,
            } => json!({
                "from": "scan",
                "superblock_error": superblock_error,
                "mapping_candidates": mapping_candidates,
                "details_candidates": details_candidates,
            }),
        };
        json!({
            "pool": self.dir.display().to_string(),
            "clean": self.is_clean(),
            "dry_run": self.dry_run,
            "source": source,
            "transaction_id": self.transaction_id,
            "time": self.time,
            "data_block_size": self.data_block_size,
            "nr_data_blocks": self.nr_data_blocks,
            "metadata_blocks": self.metadata_blocks,
            "mappings_kept": self.mappings_kept(),
            "devices": self.devices.iter().map(|d| json!({
                "dev_id": d.dev_id,
                "mappings": d.mappings,
                "mapped_before": d.mapped_before,
                "shares_tree_with": d.shares_tree_with,
            })).collect::<Vec<_>>(),
            "losses": self.losses.iter().map(|l| json!({
                "kind": l.kind.label(),
                "dev_id": l.dev_id,
                "block": l.block,
                "message": l.message,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
            "unnamed_devices": self.unnamed,
            "damaged_copy": self.damaged_copy.as_ref().map(|p| p.display().to_string()),
        })
    }
}

/// The old metadata's header: from its superblock, or from a scan and the command line.
#[derive(Debug, Clone)]
struct Header {
    uuid: [u8; 16],
    time: u32,
    transaction_id: u64,
    data_block_sectors: u32,
    nr_data_blocks: u64,
    mapping_root: u64,
    details_root: Option<u64>,
    held_root: u64,
    source: HeaderSource,
}

/// Repairs the pool in `dir` (see the module documentation). Errors are for what stops a
/// repair from being made at all (the pool in use, an unreadable superblock without
/// `--data-block-size`, I/O); everything lost along the way is in the report.
pub fn repair_pool(dir: &Path, opts: &RepairOptions) -> Result<RepairReport, PoolError> {
    let paths = PoolPaths::new(dir);
    let meta_path = paths.metadata();
    if std::fs::symlink_metadata(&meta_path).is_err() {
        return Err(PoolError::NoPool(dir.to_path_buf()));
    }
    let _lock = PoolLock::acquire(&paths).map_err(|e| match e {
        PoolError::Locked { dir, pid } => PoolError::InvalidArgument(format!(
            "cannot repair {}: the pool is in use by {} (a running `uthin serve`?); stop it first, \
             repair replaces the metadata file",
            dir.display(),
            pid.map_or("another process".to_string(), |p| format!("process {p}"))
        )),
        other => other,
    })?;
    let io: Arc<dyn BlockIo> = Arc::new(
        FileIo::open(&meta_path)
            .map_err(|e| PoolError::io(format!("cannot open {}", meta_path.display()), e))?,
    );
    // The walks read each block once or twice in a row: a small cache does, and it is alive
    // together with the new metadata's.
    let tm = TransactionManager::open_read_only(io.clone(), &TmConfig::with_cache_bytes(16 << 20));
    let store = VolumesStore::new(dir, paths.volumes());
    let header = read_header(io.as_ref(), &tm, opts, &paths, &store)?;

    let metadata_blocks = io
        .nr_blocks()
        .max(size::MIN_METADATA_SIZE / BLOCK_SIZE as u64)
        .min(MAX_METADATA_BLOCKS);
    let mut report = RepairReport {
        dir: dir.to_path_buf(),
        source: header.source.clone(),
        transaction_id: header.transaction_id,
        time: header.time,
        data_block_size: u64::from(header.data_block_sectors) * 512,
        nr_data_blocks: header.nr_data_blocks,
        metadata_blocks,
        devices: Vec::new(),
        losses: Vec::new(),
        notes: Vec::new(),
        unnamed: Vec::new(),
        dry_run: opts.dry_run,
        damaged_copy: None,
    };
    if let HeaderSource::Scan {
        superblock_error, ..
    } = &header.source
    {
        report.lose(
            LossKind::Unreadable,
            None,
            Some(0),
            format!(
                "the superblock ({superblock_error}): the trees were found by scanning and may \
                 predate the last commit; uuid and metadata snapshot are lost, the time is the \
                 latest one in the trees"
            ),
        );
    }
    if header.held_root != 0 {
        report.notes.push(format!(
            "the metadata snapshot held at block {} is released (fresh metadata holds none)",
            header.held_root
        ));
    }

    let target = Target::resolve(&meta_path)?;
    let mut writer = if opts.dry_run {
        None
    } else {
        Some(Writer::create(&target.temp, metadata_blocks, &header)?)
    };
    let named: Option<BTreeSet<u32>> = store
        .read()
        .ok()
        .map(|v| v.dev_ids())
        .filter(|ids| !ids.is_empty());
    let salvaged = salvage(&tm, &header, named.as_ref(), &mut report, writer.as_mut());
    // The old metadata's cache is not needed for the commit and the check below.
    drop(tm);
    let written = salvaged.and_then(|devices| {
        Ok((
            devices,
            writer.map(|w| w.finish(&header)).transpose()?.flatten(),
        ))
    });
    let (devices, grown) = match written {
        Ok(x) => x,
        Err(e) => {
            // Nothing was replaced: the damaged metadata is where it was.
            let _ = std::fs::remove_file(&target.temp);
            return Err(e);
        }
    };
    if !opts.dry_run {
        if let Some(blocks) = grown {
            report.metadata_blocks = blocks;
            report.notes.push(format!(
                "the metadata grew to {} ({} blocks): trees shared between snapshots in the old \
                 metadata are written once per device",
                size::format_size(blocks * BLOCK_SIZE as u64),
                blocks
            ));
        }
        let stamp = stamp();
        report.damaged_copy = Some(target.install(&meta_path, &stamp)?);
    }
    reconcile_names(&store, &devices, &header, &mut report)?;
    Ok(report)
}

/// Reads block 0; when it is unreadable, falls back to the command line and a scan.
fn read_header(
    io: &dyn BlockIo,
    tm: &TransactionManager,
    opts: &RepairOptions,
    paths: &PoolPaths,
    store: &VolumesStore,
) -> Result<Header, PoolError> {
    let mut block = [0u8; BLOCK_SIZE];
    let sb = io
        .read(MetaBlock(0), &mut block)
        .map_err(|e| PoolError::io("cannot read the superblock (metadata block 0)", e))
        .and_then(|()| Superblock::unpack(&block));
    let error = match sb {
        Ok(sb) => {
            let nr_data_blocks = match SmRoot::unpack(&sb.data_sm_root) {
                Ok(r) => r.nr_blocks,
                Err(e) => {
                    return Err(PoolError::Corrupt {
                        block: 0,
                        what: format!(
                            "the superblock's data space map root is unreadable ({e}); give the \
                             number of data blocks with --nr-data-blocks"
                        ),
                    });
                }
            };
            return Ok(Header {
                uuid: sb.uuid,
                time: sb.time,
                transaction_id: sb.transaction_id,
                data_block_sectors: sb.data_block_size_sectors,
                nr_data_blocks: opts.nr_data_blocks.unwrap_or(nr_data_blocks),
                mapping_root: sb.data_mapping_root,
                details_root: Some(sb.device_details_root),
                held_root: sb.held_root,
                source: HeaderSource::Superblock,
            });
        }
        Err(e) => e.to_string(),
    };
    let Some(block_size) = opts.data_block_size else {
        return Err(PoolError::Corrupt {
            block: 0,
            what: format!(
                "the superblock is unreadable ({error}). It holds the roots of every tree, the data \
                 block size and the transaction id; without them no tool can repair the pool \
                 (thin_repair needs them on its command line too). If you know the pool's data \
                 block size, `uthin repair --data-block-size SIZE [--nr-data-blocks N] \
                 [--transaction-id N]` scans the metadata for its newest trees (the transaction \
                 id defaults to volumes.json's, the number of data blocks to the data file's size)"
            ),
        });
    };
    size::check_data_block_size(block_size).map_err(PoolError::InvalidArgument)?;
    let nr_data_blocks = match opts.nr_data_blocks {
        Some(n) => n,
        None => {
            let data = paths.data();
            let f = std::fs::File::open(&data)
                .map_err(|e| PoolError::io(format!("cannot open {}", data.display()), e))?;
            file_or_device_size(&f, &data)? / block_size
        }
    };
    let named: Option<BTreeSet<u32>> = store
        .read()
        .ok()
        .map(|v| v.dev_ids())
        .filter(|ids| !ids.is_empty());
    let found = scan(tm, io.nr_blocks())
        .newest_roots(named.as_ref())
        .ok_or_else(|| PoolError::Corrupt {
        block: 0,
        what: format!(
            "the superblock is unreadable ({error}) and a scan of the metadata found no mapping tree"
        ),
    })?;
    let transaction_id = opts
        .transaction_id
        .or_else(|| store.read().ok().map(|v| v.transaction_id))
        .unwrap_or(found.max_tid);
    Ok(Header {
        uuid: [0; 16],
        time: found.max_time,
        transaction_id,
        data_block_sectors: (block_size / 512) as u32,
        nr_data_blocks,
        mapping_root: found.mapping_root,
        details_root: found.details_root,
        held_root: 0,
        source: HeaderSource::Scan {
            superblock_error: error,
            mapping_candidates: found.mapping_candidates,
            details_candidates: found.details_candidates,
        },
    })
}

// ------------------------------------------------------------------------------------------
// Salvage

/// What a walk of one device's block tree found (its mappings go to a callback: memory does
/// not grow with the device).
struct DeviceSalvage {
    /// Mappings kept.
    kept: u64,
    lost: Vec<LostSubtree>,
    /// (virtual block, data block) of mappings outside the data device.
    outside: Vec<(u64, u64)>,
    /// (virtual block, data block) of mappings dropped because a lower virtual block of the
    /// device maps the same data block.
    duplicates: Vec<(u64, u64)>,
}

/// A set of data blocks: bits in chunks of 2^16 blocks allocated on first use, so memory
/// follows the ranges a device maps, not the size of the pool.
#[derive(Default)]
struct BlockSet {
    chunks: HashMap<u64, Box<[u64; 1024]>>,
}

impl BlockSet {
    /// Adds `b`; false if it was there already.
    fn insert(&mut self, b: u64) -> bool {
        let chunk = self
            .chunks
            .entry(b >> 16)
            .or_insert_with(|| Box::new([0; 1024]));
        let bit = b & 0xffff;
        // bit < 2^16, so bit / 64 < 1024: in bounds.
        let word = &mut chunk[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        let fresh = *word & mask == 0;
        *word |= mask;
        fresh
    }
}

/// Walks one device's block tree: every readable mapping inside the data device whose data
/// block the device does not already map at a lower virtual block goes to `keep`, in virtual
/// block order; the rest is counted in the result. The same tree always gives the same result,
/// so a first walk can count and a second one write.
fn walk_device(
    tm: &TransactionManager,
    root: MetaBlock,
    nr_data: u64,
    keep: &mut dyn FnMut(XmlMapping),
) -> DeviceSalvage {
    let mut kept = 0;
    let mut outside = Vec::new();
    let mut duplicates = Vec::new();
    let mut lost = Vec::new();
    // One data block mapped at two virtual blocks of one device is damage (dm-thin never does
    // it): the walk goes in virtual block order, so the lowest one is kept.
    let mut seen = BlockSet::default();
    salvage_btree::<U64Value>(
        tm,
        root,
        &mut |vb, raw| {
            let bt = BlockTime::unpack(raw);
            if bt.block.0 >= nr_data {
                outside.push((vb, bt.block.0));
            } else if !seen.insert(bt.block.0) {
                duplicates.push((vb, bt.block.0));
            } else {
                kept += 1;
                keep(XmlMapping {
                    origin: vb,
                    data: bt.block.0,
                    time: bt.time,
                });
            }
        },
        &mut |l| lost.push(l),
    );
    DeviceSalvage {
        kept,
        lost,
        outside,
        duplicates,
    }
}

/// Consecutive runs of `items` (sorted by the key) as `(first, last, count)`.
fn runs(keys: impl Iterator<Item = u64>) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for k in keys {
        match out.last_mut() {
            Some((_, last, n)) if k == *last + 1 => {
                *last = k;
                *n += 1;
            }
            _ => out.push((k, k, 1)),
        }
    }
    out
}

fn vblocks(first: u64, last: u64) -> String {
    if first == last {
        format!("virtual block {first}")
    } else {
        format!("virtual blocks {first}..={last}")
    }
}

fn report_device_losses(
    report: &mut RepairReport,
    dev: u32,
    s: &DeviceSalvage,
    kept_for_duplicates: &HashMap<u64, u64>,
    nr_data: u64,
) {
    for l in &s.lost {
        let what = match (l.first_key, l.end_key) {
            (0, None) => "all its mappings".to_string(),
            (lo, None) => format!("virtual blocks {lo} and above"),
            (lo, Some(hi)) => format!("virtual blocks {lo}..{hi}"),
        };
        report.lose(
            LossKind::Unreadable,
            Some(dev),
            Some(l.block.0),
            format!("device {dev}: {what} are lost: {}", l.reason),
        );
    }
    for (first, last, n) in runs(s.outside.iter().map(|(vb, _)| *vb)) {
        let example = s
            .outside
            .iter()
            .find(|(vb, _)| *vb == first)
            .map_or(0, |(_, d)| *d);
        report.lose(
            LossKind::OutsideDataDevice,
            Some(dev),
            None,
            format!(
                "device {dev}: {} ({n} mappings) pointed outside the data device's {nr_data} blocks \
                 (e.g. to data block {example}); dropped",
                vblocks(first, last)
            ),
        );
    }
    for (vb, data) in &s.duplicates {
        let kept = kept_for_duplicates
            .get(data)
            .map_or(String::new(), |k| format!(" ({k})"));
        report.lose(
            LossKind::Duplicate,
            Some(dev),
            None,
            format!(
                "device {dev}: virtual block {vb} mapped data block {data}, which a lower virtual \
                 block{kept} of the same device maps too; dropped"
            ),
        );
    }
}

/// What the walks of the details tree and the mapping tree's top level found.
#[derive(Default)]
struct Trees {
    details: BTreeMap<u32, DeviceDetails>,
    details_lost: Vec<LostSubtree>,
    /// Dev id -> root of its block tree.
    roots: BTreeMap<u32, u64>,
    top_lost: Vec<LostSubtree>,
    /// Keys that are no device id: (which tree, key).
    bad_keys: Vec<(&'static str, u64)>,
}

impl Trees {
    /// True when neither tree could be read at its root (nothing is known of any device).
    fn both_roots_lost(&self, details_root: Option<u64>) -> bool {
        let root_lost = |lost: &[LostSubtree]| lost.iter().any(|l| l.depth == 0);
        root_lost(&self.top_lost) && (details_root.is_none() || root_lost(&self.details_lost))
    }
}

fn walk_trees(tm: &TransactionManager, mapping_root: u64, details_root: Option<u64>) -> Trees {
    let mut t = Trees::default();
    if let Some(root) = details_root {
        salvage_btree::<BytesValue<DEVICE_DETAILS_SIZE>>(
            tm,
            MetaBlock(root),
            &mut |k, raw| match dev_id(k) {
                Some(d) => {
                    t.details.insert(d, DeviceDetails::unpack(&raw));
                }
                None => t.bad_keys.push(("device details tree", k)),
            },
            &mut |l| t.details_lost.push(l),
        );
    }
    salvage_btree::<U64Value>(
        tm,
        MetaBlock(mapping_root),
        &mut |k, root| match dev_id(k) {
            Some(d) => {
                t.roots.insert(d, root);
            }
            None => t.bad_keys.push(("mapping tree's top level", k)),
        },
        &mut |l| t.top_lost.push(l),
    );
    t
}

/// Walks the old trees, reports every loss, and hands each device to the writer (when there
/// is one). `named`: the devices volumes.json names, when it names any. Returns the ids of
/// the devices kept.
fn salvage(
    tm: &TransactionManager,
    header: &Header,
    named: Option<&BTreeSet<u32>>,
    report: &mut RepairReport,
    mut writer: Option<&mut Writer>,
) -> Result<BTreeSet<u32>, PoolError> {
    let nr_data = header.nr_data_blocks;
    let nr_meta = tm.nr_blocks();
    if header.details_root.is_none() {
        report.notes.push(
            "no device details tree was found: every device's details are rebuilt".to_string(),
        );
    }
    let mut trees = walk_trees(tm, header.mapping_root, header.details_root);
    let mut from_older_copy = matches!(header.source, HeaderSource::Scan { .. });
    if trees.both_roots_lost(header.details_root) {
        // Nothing current is left to say which devices exist: fall back to the newest
        // consistent pair of trees on the disk, as when the superblock is lost.
        for l in trees.top_lost.iter().chain(&trees.details_lost) {
            report.lose(
                LossKind::Unreadable,
                None,
                Some(l.block.0),
                format!(
                    "the root of a tree the superblock names is unreadable: {}",
                    l.reason
                ),
            );
        }
        if let Some(found) = scan(tm, nr_meta).newest_roots(named) {
            report.notes.push(format!(
                "both trees' roots are unreadable: using the newest consistent pair a scan of the \
                 metadata found (mapping tree at block {}, details tree at {}); it may predate the \
                 last changes",
                found.mapping_root,
                found
                    .details_root
                    .map_or("none".to_string(), |b| b.to_string())
            ));
            trees = walk_trees(tm, found.mapping_root, found.details_root);
            from_older_copy = true;
        }
    }
    let Trees {
        details,
        details_lost,
        mut roots,
        top_lost,
        bad_keys,
    } = trees;
    for (tree, k) in bad_keys {
        report.lose(
            LossKind::Other,
            None,
            None,
            format!(
                "the {tree} has key {k}, not a device id (at most {}); that entry is dropped",
                DevId::MAX.0
            ),
        );
    }
    if !top_lost.is_empty() {
        recover_lost_roots(tm, &details, &top_lost, &mut roots, report);
    }
    for l in &top_lost {
        let in_range =
            |d: &u32| u64::from(*d) >= l.first_key && l.end_key.is_none_or(|e| u64::from(*d) < e);
        let known: Vec<u32> = details
            .keys()
            .copied()
            .filter(|d| in_range(d) && !roots.contains_key(d))
            .collect();
        report.lose(
            LossKind::Unreadable,
            None,
            Some(l.block.0),
            format!(
                "mapping tree, top level: the entries for device ids {} are lost: {}; devices \
                 of the details tree among them left without a mapping tree (kept empty): \
                 {known:?}",
                l.key_range(),
                l.reason
            ),
        );
    }
    for l in &details_lost {
        report.lose(
            LossKind::Unreadable,
            None,
            Some(l.block.0),
            format!(
                "device details tree: the entries for device ids {} are lost: {}; their details \
                 are rebuilt",
                l.key_range(),
                l.reason
            ),
        );
    }
    if from_older_copy && let Some(named) = named {
        for d in details.keys().chain(roots.keys()).collect::<BTreeSet<_>>() {
            if !named.contains(d) {
                report.lose(
                    LossKind::Other,
                    Some(*d),
                    None,
                    format!(
                        "device {d} comes from trees found by scanning and volumes.json has no \
                         name for it: it may have been deleted (its data blocks may since have \
                         been reused); kept without a name"
                    ),
                );
            }
        }
    }

    let ids: BTreeSet<u32> = details.keys().chain(roots.keys()).copied().collect();
    // Old root -> (device written with it, its salvage summary), to share trees again.
    let mut by_root: HashMap<u64, (u32, u64, Vec<Loss>)> = HashMap::new();
    for &dev in &ids {
        let old_details = details.get(&dev).copied();
        if old_details.is_none() {
            report.lose(
                LossKind::DetailsRebuilt,
                Some(dev),
                None,
                format!(
                    "device {dev}: its details are lost; rebuilt with the mapped count of its \
                     mappings and the pool's time ({}) and transaction id ({})",
                    header.time, header.transaction_id
                ),
            );
        }
        let mut xml = XmlDevice {
            dev_id: dev,
            mapped_blocks: 0,
            transaction: old_details.map_or(header.transaction_id, |d| d.transaction_id),
            creation_time: old_details.map_or(header.time, |d| d.creation_time),
            // The kernel copies a block on write when its time is below this: the pool's time
            // makes it copy (safe) rather than overwrite a block that may be shared.
            snap_time: old_details.map_or(header.time, |d| d.snapshotted_time),
            mappings: Vec::new(),
        };
        let mut summary = DeviceSummary {
            dev_id: dev,
            mappings: 0,
            mapped_before: old_details.map(|d| d.mapped_blocks),
            shares_tree_with: None,
        };
        match roots.get(&dev).copied() {
            None => {
                report.lose(
                    LossKind::MappingsLost,
                    Some(dev),
                    None,
                    format!(
                        "device {dev}: its mapping tree is lost (no entry in the mapping tree's \
                         top level); kept with no mappings"
                    ),
                );
                if let Some(w) = writer.as_deref_mut() {
                    w.device(&xml)?;
                }
            }
            Some(root) if root == 0 || root >= nr_meta => {
                report.lose(
                    LossKind::MappingsLost,
                    Some(dev),
                    None,
                    format!(
                        "device {dev}: its mapping tree's root {root} is outside the metadata's \
                         {nr_meta} blocks; kept with no mappings"
                    ),
                );
                if let Some(w) = writer.as_deref_mut() {
                    w.device(&xml)?;
                }
            }
            Some(root) => {
                if let Some((origin, kept, losses)) = by_root.get(&root) {
                    // A snapshot not written since: the same tree, salvaged once, shared again.
                    xml.mapped_blocks = *kept;
                    summary.mappings = *kept;
                    summary.shares_tree_with = Some(*origin);
                    for l in losses {
                        report.losses.push(Loss {
                            dev_id: Some(dev),
                            message: l.message.replacen(
                                &format!("device {origin}:"),
                                &format!("device {dev}:"),
                                1,
                            ),
                            ..l.clone()
                        });
                    }
                    if let Some(w) = writer.as_deref_mut() {
                        w.shared_device(&xml, *origin)?;
                    }
                } else {
                    // First walk: count. Second walk (only to write, or to name the
                    // mappings that duplicates lost to): the same mappings again, streamed.
                    let s = walk_device(tm, MetaBlock(root), nr_data, &mut |_| {});
                    xml.mapped_blocks = s.kept;
                    summary.mappings = s.kept;
                    let dup_blocks: HashSet<u64> = s.duplicates.iter().map(|(_, d)| *d).collect();
                    let mut kept_for: HashMap<u64, u64> = HashMap::new();
                    if writer.is_some() || !dup_blocks.is_empty() {
                        let mut sink = writer.as_deref_mut().map(|w| w.stream(&xml)).transpose()?;
                        let mut failed: Option<PoolError> = None;
                        let again = walk_device(tm, MetaBlock(root), nr_data, &mut |m| {
                            if dup_blocks.contains(&m.data) {
                                kept_for.insert(m.data, m.origin);
                            }
                            if failed.is_none()
                                && let Some(sink) = sink.as_mut()
                                && let Err(e) = sink.add(&m)
                            {
                                failed = Some(e);
                            }
                        });
                        if let Some(e) = failed {
                            return Err(e);
                        }
                        if again.kept != s.kept {
                            return Err(PoolError::Corrupt {
                                block: root,
                                what: format!(
                                    "device {dev}'s tree read differently twice ({} then {} \
                                     mappings): is something writing the metadata?",
                                    s.kept, again.kept
                                ),
                            });
                        }
                    }
                    let before = report.losses.len();
                    report_device_losses(report, dev, &s, &kept_for, nr_data);
                    by_root.insert(root, (dev, s.kept, report.losses[before..].to_vec()));
                }
            }
        }
        report.devices.push(summary);
    }
    Ok(ids)
}

/// Devices whose entry in the mapping tree's top level is lost but whose details survive: an
/// older copy of the lost top-level node (a freed block keeps its contents until it is reused)
/// may record their trees. A tree is taken only when that is unambiguous: it is structurally
/// whole, holds exactly the mapped count the details give, and is the only such tree with the
/// latest mapping time (a later commit of the device gives later times). The report says so
/// either way.
fn recover_lost_roots(
    tm: &TransactionManager,
    details: &BTreeMap<u32, DeviceDetails>,
    top_lost: &[LostSubtree],
    roots: &mut BTreeMap<u32, u64>,
    report: &mut RepairReport,
) {
    let in_lost_range = |d: u32| {
        top_lost
            .iter()
            .any(|l| u64::from(d) >= l.first_key && l.end_key.is_none_or(|e| u64::from(d) < e))
    };
    let orphans: Vec<u32> = details
        .keys()
        .copied()
        .filter(|d| !roots.contains_key(d) && in_lost_range(*d))
        .collect();
    if orphans.is_empty() {
        return;
    }
    let found = scan(tm, tm.nr_blocks());
    for dev in orphans {
        let want = details[&dev].mapped_blocks;
        let matching: Vec<(u64, u64, u32)> = found
            .recorded_roots(dev)
            .into_iter()
            .filter(|(_, (_, n, _))| *n == want)
            .map(|(root, (leaf, _, time))| (root, leaf, time))
            .collect();
        let Some(latest) = matching.iter().map(|m| m.2).max() else {
            continue;
        };
        let newest: Vec<&(u64, u64, u32)> = matching.iter().filter(|m| m.2 == latest).collect();
        if let [(root, leaf, _)] = newest[..] {
            roots.insert(dev, *root);
            report.lose(
                LossKind::OlderCopy,
                Some(dev),
                Some(*leaf),
                format!(
                    "device {dev}: its entry in the mapping tree's top level is lost; an older copy \
                     of that node (metadata block {leaf}) records a tree at block {root} that holds \
                     exactly the {want} mappings its details count: kept, but it may predate the \
                     device's last changes (check its data)"
                ),
            );
        } else {
            report.notes.push(format!(
                "device {dev}: {} trees recorded for it in older copies of the top level match its \
                 details equally well; none is taken",
                newest.len()
            ));
        }
    }
}

fn dev_id(key: u64) -> Option<u32> {
    u32::try_from(key).ok().filter(|d| *d <= DevId::MAX.0)
}

// ------------------------------------------------------------------------------------------
// Finding the trees when the superblock is lost

/// The newest consistent trees a scan found.
struct FoundRoots {
    mapping_root: u64,
    details_root: Option<u64>,
    max_time: u32,
    max_tid: u64,
    mapping_candidates: usize,
    details_candidates: usize,
}

/// What the scan keeps of each B-tree node (not its entries: memory stays small).
enum Scanned {
    Internal {
        keys: Vec<u64>,
        children: Vec<u64>,
    },
    /// A leaf with 8-byte values: a mapping leaf, or a top-level leaf when every value is a
    /// metadata block holding a mapping tree (`entries` kept only when that is possible).
    Leaf8 {
        first: u64,
        last: u64,
        n: u64,
        max_time: u32,
        entries: Option<Vec<(u64, u64)>>,
    },
    Details {
        devs: Vec<u64>,
        max_tid: u64,
        max_time: u32,
    },
}

/// What a node turned out to be, with what its subtree holds.
#[derive(Clone)]
enum Class {
    /// A device's block tree (or a subtree of one).
    Mapping {
        first: u64,
        last: u64,
        n: u64,
        max_time: u32,
    },
    /// The mapping tree's top level (or a subtree of it).
    Top {
        devs: Vec<u64>,
        mappings: u64,
        max_time: u32,
    },
    /// The device details tree (or a subtree of it).
    Details {
        devs: Vec<u64>,
        max_tid: u64,
        max_time: u32,
    },
    Invalid,
}

impl Class {
    fn key_span(&self) -> Option<(u64, u64)> {
        match self {
            Class::Mapping { first, last, n, .. } => (*n > 0).then_some((*first, *last)),
            Class::Top { devs, .. } | Class::Details { devs, .. } => {
                Some((*devs.first()?, *devs.last()?))
            }
            Class::Invalid => None,
        }
    }
}

struct Classifier<'a> {
    nodes: &'a HashMap<u64, Scanned>,
    /// `None` while a node is being classified (a cycle makes it invalid).
    memo: HashMap<u64, Option<Class>>,
}

impl Classifier<'_> {
    fn class(&mut self, b: u64, depth: usize) -> Class {
        match self.memo.get(&b) {
            Some(Some(c)) => return c.clone(),
            Some(None) => return Class::Invalid,
            None => {}
        }
        if depth > 2 * uthin_btree::btree::MAX_DEPTH {
            return Class::Invalid;
        }
        self.memo.insert(b, None);
        let c = self.classify(b, depth);
        self.memo.insert(b, Some(c.clone()));
        c
    }

    fn classify(&mut self, b: u64, depth: usize) -> Class {
        let Some(node) = self.nodes.get(&b) else {
            return Class::Invalid;
        };
        match node {
            Scanned::Details {
                devs,
                max_tid,
                max_time,
            } => Class::Details {
                devs: devs.clone(),
                max_tid: *max_tid,
                max_time: *max_time,
            },
            Scanned::Leaf8 {
                first,
                last,
                n,
                max_time,
                entries,
            } => {
                if let Some(entries) = entries {
                    let mut mappings = 0;
                    let mut time = 0;
                    let mut all_trees = !entries.is_empty();
                    for &(_, root) in entries {
                        match self.class(root, depth + 1) {
                            Class::Mapping { n, max_time, .. } => {
                                mappings += n;
                                time = time.max(max_time);
                            }
                            _ => {
                                all_trees = false;
                                break;
                            }
                        }
                    }
                    if all_trees {
                        return Class::Top {
                            devs: entries.iter().map(|(k, _)| *k).collect(),
                            mappings,
                            max_time: time,
                        };
                    }
                }
                Class::Mapping {
                    first: *first,
                    last: *last,
                    n: *n,
                    max_time: *max_time,
                }
            }
            Scanned::Internal { keys, children } => {
                let kids: Vec<Class> = children.iter().map(|c| self.class(*c, depth + 1)).collect();
                let mut out: Option<Class> = None;
                for (i, kid) in kids.into_iter().enumerate() {
                    // Every child's keys lie within the range its key in this node gives it.
                    if let Some((lo, hi)) = kid.key_span() {
                        let next = keys.get(i + 1).copied();
                        if lo < keys[i] || next.is_some_and(|n| hi >= n) {
                            return Class::Invalid;
                        }
                    }
                    out = Some(match (out, kid) {
                        (
                            None,
                            k @ (Class::Mapping { .. } | Class::Top { .. } | Class::Details { .. }),
                        ) => k,
                        (
                            Some(Class::Mapping {
                                first, n, max_time, ..
                            }),
                            Class::Mapping {
                                last: l2,
                                n: n2,
                                max_time: t2,
                                first: f2,
                            },
                        ) => Class::Mapping {
                            first: if n == 0 { f2 } else { first },
                            last: l2,
                            n: n + n2,
                            max_time: max_time.max(t2),
                        },
                        (
                            Some(Class::Top {
                                mut devs,
                                mappings,
                                max_time,
                            }),
                            Class::Top {
                                devs: d2,
                                mappings: m2,
                                max_time: t2,
                            },
                        ) => {
                            devs.extend(d2);
                            Class::Top {
                                devs,
                                mappings: mappings + m2,
                                max_time: max_time.max(t2),
                            }
                        }
                        (
                            Some(Class::Details {
                                mut devs,
                                max_tid,
                                max_time,
                            }),
                            Class::Details {
                                devs: d2,
                                max_tid: x2,
                                max_time: t2,
                            },
                        ) => {
                            devs.extend(d2);
                            Class::Details {
                                devs,
                                max_tid: max_tid.max(x2),
                                max_time: max_time.max(t2),
                            }
                        }
                        _ => return Class::Invalid,
                    });
                }
                out.unwrap_or(Class::Invalid)
            }
        }
    }
}

/// Every B-tree node of the metadata, summarised, and what each turned out to be.
struct Scan {
    nodes: HashMap<u64, Scanned>,
    classes: HashMap<u64, Class>,
}

/// Reads every metadata block as a B-tree node (those that validate) and classifies them.
/// Stale nodes of earlier transactions are found too: blocks freed since keep their contents
/// until reused.
fn scan(tm: &TransactionManager, nr_blocks: u64) -> Scan {
    let mut nodes: HashMap<u64, Scanned> = HashMap::new();
    for b in 1..nr_blocks {
        let Ok(n) = read_node(tm, MetaBlock(b)) else {
            continue;
        };
        let scanned = match (n.leaf, n.value_size) {
            (false, _) => Scanned::Internal {
                children: (0..n.len()).filter_map(|i| n.value_u64(i)).collect(),
                keys: n.keys,
            },
            (true, 8) => {
                let values: Vec<u64> = (0..n.len()).filter_map(|i| n.value_u64(i)).collect();
                let could_be_top = n.keys.iter().all(|k| dev_id(*k).is_some())
                    && values.iter().all(|v| *v > 0 && *v < nr_blocks);
                Scanned::Leaf8 {
                    first: n.keys.first().copied().unwrap_or(0),
                    last: n.keys.last().copied().unwrap_or(0),
                    n: n.len() as u64,
                    max_time: values
                        .iter()
                        .map(|v| BlockTime::unpack(*v).time)
                        .max()
                        .unwrap_or(0),
                    entries: could_be_top.then(|| n.keys.iter().copied().zip(values).collect()),
                }
            }
            (true, DEVICE_DETAILS_SIZE) => {
                let details: Vec<DeviceDetails> = (0..n.len())
                    .filter_map(|i| n.value(i))
                    .filter_map(|v| <[u8; DEVICE_DETAILS_SIZE]>::try_from(v).ok())
                    .map(|v| DeviceDetails::unpack(&v))
                    .collect();
                if !n.keys.iter().all(|k| dev_id(*k).is_some()) {
                    continue;
                }
                Scanned::Details {
                    max_tid: details.iter().map(|d| d.transaction_id).max().unwrap_or(0),
                    max_time: details
                        .iter()
                        .map(|d| d.creation_time.max(d.snapshotted_time))
                        .max()
                        .unwrap_or(0),
                    devs: n.keys,
                }
            }
            _ => continue,
        };
        nodes.insert(b, scanned);
    }
    let mut c = Classifier {
        nodes: &nodes,
        memo: HashMap::new(),
    };
    let blocks: Vec<u64> = nodes.keys().copied().collect();
    let classes = blocks.into_iter().map(|b| (b, c.class(b, 0))).collect();
    Scan { nodes, classes }
}

impl Scan {
    /// Picks the newest mapping tree with a details tree listing the same devices among the
    /// trees no valid node points at: first the pairs whose devices are exactly those
    /// volumes.json names (`named`; uthin keeps the two in step, so this tells the current
    /// trees from those before a delete), then the highest transaction id in the details, the
    /// latest time, the most mappings. `None` when there is no mapping tree at all.
    fn newest_roots(&self, named: Option<&BTreeSet<u32>>) -> Option<FoundRoots> {
        let is_named = |devs: &Vec<u64>| {
            named.is_some_and(|n| {
                devs.len() == n.len() && devs.iter().zip(n).all(|(d, n)| *d == u64::from(*n))
            })
        };
        // A node some valid node points at is not a root.
        let mut referenced: HashSet<u64> = HashSet::new();
        for (b, class) in &self.classes {
            match (self.nodes.get(b), class) {
                (_, Class::Invalid) => {}
                (Some(Scanned::Internal { children, .. }), _) => referenced.extend(children),
                (
                    Some(Scanned::Leaf8 {
                        entries: Some(e), ..
                    }),
                    Class::Top { .. },
                ) => {
                    referenced.extend(e.iter().map(|(_, r)| *r));
                }
                _ => {}
            }
        }
        let mut roots: Vec<(&u64, &Class)> = self
            .classes
            .iter()
            .filter(|(b, _)| !referenced.contains(b))
            .collect();
        roots.sort_unstable_by_key(|(b, _)| **b);
        let tops: Vec<(u64, &Vec<u64>, u64, u32)> = roots
            .iter()
            .filter_map(|(b, c)| match c {
                Class::Top {
                    devs,
                    mappings,
                    max_time,
                } => Some((**b, devs, *mappings, *max_time)),
                _ => None,
            })
            .collect();
        let details: Vec<(u64, &Vec<u64>, u64, u32)> = roots
            .iter()
            .filter_map(|(b, c)| match c {
                Class::Details {
                    devs,
                    max_tid,
                    max_time,
                } => Some((**b, devs, *max_tid, *max_time)),
                _ => None,
            })
            .collect();
        // Newest matching pair; else the newest of each on its own.
        let pair = tops
            .iter()
            .flat_map(|t| details.iter().map(move |d| (t, d)))
            .filter(|(t, d)| t.1 == d.1)
            .max_by_key(|(t, d)| (is_named(t.1), d.2, t.3.max(d.3), t.2, t.0));
        let (top, det) = match pair {
            Some((t, d)) => (*t, Some(*d)),
            None => (
                *tops.iter().max_by_key(|t| (is_named(t.1), t.3, t.2, t.0))?,
                details
                    .iter()
                    .max_by_key(|d| (is_named(d.1), d.2, d.3, d.0))
                    .copied(),
            ),
        };
        Some(FoundRoots {
            mapping_root: top.0,
            details_root: det.map(|d| d.0),
            max_time: top.3.max(det.map_or(0, |d| d.3)),
            max_tid: det.map_or(0, |d| d.2),
            mapping_candidates: tops.len(),
            details_candidates: details.len(),
        })
    }

    /// Roots of mapping trees that some top-level-shaped leaf (current or stale) records for
    /// `dev`, with the leaf and the tree's mapping count and latest time.
    fn recorded_roots(&self, dev: u32) -> BTreeMap<u64, (u64, u64, u32)> {
        let mut out = BTreeMap::new();
        for (leaf, node) in &self.nodes {
            let Scanned::Leaf8 {
                entries: Some(entries),
                ..
            } = node
            else {
                continue;
            };
            for &(k, root) in entries {
                if k != u64::from(dev) {
                    continue;
                }
                if let Some(Class::Mapping { n, max_time, .. }) = self.classes.get(&root) {
                    out.entry(root).or_insert((*leaf, *n, *max_time));
                }
            }
        }
        out
    }
}

// ------------------------------------------------------------------------------------------
// Writing

/// Fresh metadata being written into a temp file.
struct Writer {
    meta: Metadata,
    since_commit: u64,
    grown_to: Option<u64>,
}

impl Writer {
    fn create(temp: &Path, nr_blocks: u64, header: &Header) -> Result<Writer, PoolError> {
        let _ = std::fs::remove_file(temp);
        let io = FileIo::create(temp, nr_blocks)
            .map_err(|e| PoolError::io(format!("cannot create {}", temp.display()), e))?;
        let meta = Metadata::format(
            Arc::new(io),
            nr_blocks,
            header.nr_data_blocks,
            header.data_block_sectors,
        )?;
        Ok(Writer {
            meta,
            since_commit: 0,
            grown_to: None,
        })
    }

    /// Grows the temp metadata when `mappings` more might not fit (trees shared between
    /// snapshots in the old metadata are written once per device, so the new metadata can
    /// need more room than the old).
    fn ensure_room(&mut self, mappings: u64) -> Result<(), PoolError> {
        // ~16 bytes per mapping when written in key order, plus the pool's own reserve.
        let need = mappings / 128 + self.meta.metadata_reserve() + 64;
        if self.meta.metadata_nr_free()? >= need {
            return Ok(());
        }
        let have = self.meta.metadata_nr_blocks();
        let want = (have + 2 * need)
            .max(have + have / 4)
            .min(MAX_METADATA_BLOCKS);
        if want <= have {
            return Err(PoolError::NoMetadataSpace);
        }
        self.meta.grow_metadata(want)?;
        self.grown_to = Some(want);
        Ok(())
    }

    fn device(&mut self, d: &XmlDevice) -> Result<(), PoolError> {
        self.ensure_room(d.mappings.len() as u64)?;
        write_device(&mut self.meta, d, &mut self.since_commit)
    }

    /// Begins device `d` (details, `d.mapped_blocks` mappings to come); the mappings follow
    /// through [`DeviceStream::add`].
    fn stream(&mut self, d: &XmlDevice) -> Result<DeviceStream<'_>, PoolError> {
        self.ensure_room(d.mapped_blocks)?;
        begin_device(&mut self.meta, d)?;
        Ok(DeviceStream {
            writer: self,
            dev: DevId(d.dev_id),
        })
    }

    /// A device whose old tree had the same root as `origin`'s: the new one shares `origin`'s
    /// new tree (one reference on its root), as the snapshot did.
    fn shared_device(&mut self, d: &XmlDevice, origin: u32) -> Result<(), PoolError> {
        self.ensure_room(0)?;
        let empty = XmlDevice {
            mappings: Vec::new(),
            ..d.clone()
        };
        write_device(&mut self.meta, &empty, &mut self.since_commit)?;
        let meta = &mut self.meta;
        let mut top = TopTree::open(MetaBlock(meta.sb.data_mapping_root));
        let root = top
            .lookup(&meta.tm, u64::from(origin))?
            .ok_or(PoolError::NoSuchDevice(origin))?;
        meta.tm.inc(root)?;
        // Replaces the empty tree, whose reference the insert releases.
        top.insert(&mut meta.tm, u64::from(d.dev_id), &root)?;
        meta.sb.data_mapping_root = top.root().0;
        Ok(())
    }

    /// Sets the header, commits, and checks the result as `uthin check` would. Returns the new
    /// size in blocks if the metadata had to grow.
    fn finish(mut self, header: &Header) -> Result<Option<u64>, PoolError> {
        self.meta.restore_header(header.time, header.transaction_id);
        self.meta.sb.uuid = header.uuid;
        self.meta.commit()?;
        let mut check = CheckReport::default();
        check_metadata(&self.meta, None, false, &mut check);
        if !check.is_clean() {
            return Err(PoolError::Corrupt {
                block: 0,
                what: format!(
                    "the rebuilt metadata does not check clean, so nothing was replaced (a bug in \
                     repair; please report it): {}",
                    check.to_text()
                ),
            });
        }
        Ok(self.grown_to)
    }
}

/// A device being written mapping by mapping.
struct DeviceStream<'a> {
    writer: &'a mut Writer,
    dev: DevId,
}

impl DeviceStream<'_> {
    fn add(&mut self, m: &XmlMapping) -> Result<(), PoolError> {
        let w = &mut *self.writer;
        add_mapping(&mut w.meta, self.dev, m, &mut w.since_commit)
    }
}

/// Where the new metadata is written and how it replaces the old.
struct Target {
    /// The temp file the new metadata is written to.
    temp: PathBuf,
    kind: TargetKind,
}

enum TargetKind {
    /// A regular file (maybe behind a symlink): renamed over, the old one kept by a second name.
    File(PathBuf),
    /// A block device: copied aside, then overwritten.
    Device(PathBuf),
}

impl Target {
    fn resolve(meta_path: &Path) -> Result<Target, PoolError> {
        let real = std::fs::canonicalize(meta_path)
            .map_err(|e| PoolError::io(format!("cannot resolve {}", meta_path.display()), e))?;
        let is_device = std::fs::metadata(&real)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "metadata".into());
        if is_device {
            // The temp file lives in the pool directory.
            Ok(Target {
                temp: meta_path.with_file_name("metadata.repair-tmp"),
                kind: TargetKind::Device(real),
            })
        } else {
            // Beside the real file, so the rename stays within one file system.
            Ok(Target {
                temp: real.with_file_name(format!("{name}.repair-tmp")),
                kind: TargetKind::File(real),
            })
        }
    }

    /// Puts the new metadata in place; returns where the damaged one is kept.
    fn install(&self, meta_path: &Path, stamp: &str) -> Result<PathBuf, PoolError> {
        match &self.kind {
            TargetKind::File(real) => {
                let dir = real.parent().unwrap_or(Path::new("."));
                let kept = free_name(real, stamp);
                // A second name for the damaged file (no copy), durable before the rename
                // takes the first one away.
                if std::fs::hard_link(real, &kept).is_err() {
                    std::fs::copy(real, &kept).map_err(|e| {
                        PoolError::io(format!("cannot keep a copy as {}", kept.display()), e)
                    })?;
                    fsync_file(&kept)?;
                }
                sync_dir(dir)?;
                fsync_file(&self.temp)?;
                std::fs::rename(&self.temp, real).map_err(|e| {
                    PoolError::io(
                        format!(
                            "cannot rename {} to {}",
                            self.temp.display(),
                            real.display()
                        ),
                        e,
                    )
                })?;
                sync_dir(dir)?;
                Ok(kept)
            }
            TargetKind::Device(dev) => {
                let pool_dir = meta_path.parent().unwrap_or(Path::new("."));
                let kept = free_name(meta_path, stamp);
                copy_device_aside(dev, &kept)?;
                sync_dir(pool_dir)?;
                overwrite_device(&self.temp, dev)?;
                let _ = std::fs::remove_file(&self.temp);
                sync_dir(pool_dir)?;
                Ok(kept)
            }
        }
    }
}

/// `PATH.damaged-STAMP`, or with `-N` appended if that exists.
fn free_name(path: &Path, stamp: &str) -> PathBuf {
    let base = format!(
        "{}.damaged-{stamp}",
        path.file_name()
            .map_or("metadata".into(), |n| n.to_string_lossy())
    );
    let mut candidate = path.with_file_name(&base);
    let mut n = 1;
    while std::fs::symlink_metadata(&candidate).is_ok() {
        candidate = path.with_file_name(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// The current UTC time as `20261123T150000Z` (for file names).
fn stamp() -> String {
    rfc3339_now().replace(['-', ':'], "")
}

fn fsync_file(path: &Path) -> Result<(), PoolError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| PoolError::io(format!("cannot sync {}", path.display()), e))
}

fn copy_device_aside(dev: &Path, to: &Path) -> Result<(), PoolError> {
    let io_err = |what: &str, e| PoolError::io(format!("{what} {}", to.display()), e);
    let mut src = std::fs::File::open(dev)
        .map_err(|e| PoolError::io(format!("cannot open {}", dev.display()), e))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| io_err("cannot create", e))?;
    std::io::copy(&mut src, &mut out)
        .map_err(|e| io_err("cannot copy the damaged metadata to", e))?;
    out.sync_all().map_err(|e| io_err("cannot sync", e))
}

/// Writes the temp metadata onto the device: block 0 zeroed first (an interrupted copy then
/// leaves an unreadable superblock, never an old superblock over new blocks), then every other
/// block, then block 0.
fn overwrite_device(temp: &Path, dev: &Path) -> Result<(), PoolError> {
    let dev_err = |e| {
        PoolError::io(
            format!("cannot write the new metadata to {}", dev.display()),
            e,
        )
    };
    let mut src = std::fs::File::open(temp)
        .map_err(|e| PoolError::io(format!("cannot open {}", temp.display()), e))?;
    let out = OpenOptions::new().write(true).open(dev).map_err(dev_err)?;
    let dev_size = file_or_device_size(&out, dev)?;
    let len = src
        .seek(SeekFrom::End(0))
        .map_err(|e| PoolError::io(format!("cannot read {}", temp.display()), e))?;
    if len > dev_size {
        return Err(PoolError::InvalidArgument(format!(
            "the repaired metadata needs {} but {} holds {}; it is left in {}",
            size::format_size(len),
            dev.display(),
            size::format_size(dev_size),
            temp.display()
        )));
    }
    let mut block = vec![0u8; BLOCK_SIZE];
    out.write_all_at(&block, 0).map_err(dev_err)?;
    out.sync_data().map_err(dev_err)?;
    let mut first = [0u8; BLOCK_SIZE];
    src.seek(SeekFrom::Start(0))
        .and_then(|_| src.read_exact(&mut first))
        .map_err(|e| PoolError::io(format!("cannot read {}", temp.display()), e))?;
    let mut off = BLOCK_SIZE as u64;
    while off < len {
        src.read_exact(&mut block)
            .map_err(|e| PoolError::io(format!("cannot read {}", temp.display()), e))?;
        out.write_all_at(&block, off).map_err(dev_err)?;
        off += BLOCK_SIZE as u64;
    }
    out.sync_data().map_err(dev_err)?;
    // The superblock was sealed by the commit; check it before it goes out.
    SUPERBLOCK_VALIDATOR
        .check(MetaBlock(0), &first)
        .map_err(PoolError::from)?;
    out.write_all_at(&first, 0).map_err(dev_err)?;
    out.sync_data().map_err(dev_err)
}

// ------------------------------------------------------------------------------------------
// volumes.json

fn reconcile_names(
    store: &VolumesStore,
    devices: &BTreeSet<u32>,
    header: &Header,
    report: &mut RepairReport,
) -> Result<(), PoolError> {
    let txid = header.transaction_id;
    let dry = report.dry_run;
    let mut file = if store.exists() {
        match store.read() {
            Ok(v) => v,
            Err(e) => {
                report.lose(
                    LossKind::Other,
                    None,
                    None,
                    format!("{e}: every device is left without a name (see `uthin adopt`)"),
                );
                if !dry {
                    let path = report.dir.join("volumes.json");
                    let kept = free_name(&path, &stamp());
                    std::fs::rename(&path, &kept).map_err(|e| {
                        PoolError::io(format!("cannot keep {} aside", path.display()), e)
                    })?;
                    report.notes.push(format!(
                        "the unreadable volumes.json is kept as {}",
                        kept.display()
                    ));
                }
                VolumesFile::new(txid)
            }
        }
    } else {
        VolumesFile::new(txid)
    };
    match file.reconcile(txid) {
        Reconciled::Consistent => {}
        Reconciled::RolledForward(op) => report.notes.push(format!(
            "volumes.json: the interrupted operation {op:?} had reached the metadata; applied"
        )),
        Reconciled::RolledBack(op) => report.notes.push(format!(
            "volumes.json: the interrupted operation {op:?} had not reached the metadata; dropped"
        )),
        Reconciled::Disagree { volumes, metadata } => {
            if let Some(p) = file.pending.take() {
                report.notes.push(format!(
                    "volumes.json: dropped the pending operation {:?} (for transaction {})",
                    p.op, p.transaction_id
                ));
            }
            report.notes.push(format!(
                "volumes.json was at transaction {volumes}, the metadata at {metadata}: set to {metadata}"
            ));
            file.transaction_id = metadata;
        }
    }
    let gone: Vec<(String, u32)> = file
        .volumes
        .values()
        .filter(|r| !devices.contains(&r.dev_id))
        .map(|r| (r.name.clone(), r.dev_id))
        .collect();
    for (name, dev) in gone {
        report.lose(
            LossKind::NameRemoved,
            Some(dev),
            None,
            format!("volume `{name}`: its device {dev} is gone; the name is removed"),
        );
        file.volumes.remove(&name);
    }
    report.unnamed = devices
        .iter()
        .copied()
        .filter(|d| file.by_dev_id(*d).is_none())
        .collect();
    if !dry {
        store.write(&file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_keys() {
        assert_eq!(
            runs([1, 2, 3, 7, 9, 10].into_iter()),
            vec![(1, 3, 3), (7, 7, 1), (9, 10, 2)]
        );
        assert!(runs(std::iter::empty()).is_empty());
    }

    #[test]
    fn damaged_names_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metadata");
        let a = free_name(&p, "X");
        assert_eq!(a.file_name().unwrap(), "metadata.damaged-X");
        std::fs::write(&a, b"1").unwrap();
        let b = free_name(&p, "X");
        assert_eq!(b.file_name().unwrap(), "metadata.damaged-X-1");
        assert!(!stamp().contains(':'));
    }

    #[test]
    fn dev_ids_are_checked() {
        assert_eq!(dev_id(5), Some(5));
        assert_eq!(dev_id(u64::from(DevId::MAX.0) + 1), None);
        assert_eq!(dev_id(u64::MAX), None);
    }
}
