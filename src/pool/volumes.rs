//! `DIR/volumes.json`: names and sizes of the thin devices, kept consistent with the metadata
//! through the superblock's transaction id.
//!
//! dm-thin numbers its devices and keeps nothing else about them; their names and sizes live
//! outside its metadata (LVM metadata, Docker's per-device JSON). uthin keeps them here.
//!
//! # Crash consistency (the protocol)
//!
//! Every write of the file is atomic: temp file, fsync, rename over the old one, fsync of the
//! directory ([`VolumesStore::write`]). An operation that changes both files (create, snapshot,
//! delete) runs in three steps, as Docker's devicemapper driver does with `set_transaction_id`:
//!
//! 1. write volumes.json with a **pending** record: the operation and the transaction id `T+1`
//!    it will produce (the committed file still says `T`);
//! 2. change the metadata, set its transaction id to `T+1`, commit (superblock written last);
//! 3. write volumes.json final: the operation applied, transaction id `T+1`, no pending record.
//!
//! On open, the metadata's transaction id `M` says whether the pending operation happened
//! ([`VolumesFile::reconcile`]): `M == T+1` → it did, apply it (roll forward); `M == T` → it did
//! not, drop it (roll back). A crash anywhere leaves one of these two cases, so no name ever
//! points at a missing device and no device is lost. Rename and adopt touch only this file and
//! are one atomic write.
//!
//! # Format
//!
//! ```json
//! { "format": 1, "transaction_id": 3, "min_free_space_percent": 10,
//!   "volumes": [ { "name": "vm1", "dev_id": 1, "size": 10737418240, "read_only": false,
//!                  "origin": null, "created": "2026-11-23T15:00:00Z" } ],
//!   "pending": null }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::PoolError;
use super::files::sync_dir;

/// The volumes.json format version uthin writes.
pub const VOLUMES_FORMAT: u32 = 1;
/// Docker's `dm.min_free_space` default: new volumes and snapshots are refused when less than
/// this share of the data space is free.
pub const DEFAULT_MIN_FREE_SPACE_PERCENT: u8 = 10;

/// One named thin device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The volume's name (unique in the pool).
    pub name: String,
    /// dm-thin device id in the metadata.
    pub dev_id: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Writes are refused.
    #[serde(default)]
    pub read_only: bool,
    /// Name of the volume this one is a snapshot of, when it was taken.
    #[serde(default)]
    pub origin: Option<String>,
    /// Creation date, RFC 3339 UTC.
    #[serde(default)]
    pub created: String,
}

/// An operation in flight between the two files (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingOp {
    /// A device is being created (new thin volume or snapshot) under this record.
    Create(VolumeRecord),
    /// A device is being deleted.
    Delete {
        /// Its name.
        name: String,
        /// Its dev id.
        dev_id: u32,
    },
}

/// The pending record: the operation and the metadata transaction id that means it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Metadata transaction id once the operation is committed.
    pub transaction_id: u64,
    /// The operation.
    pub op: PendingOp,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumesFile {
    /// Format version ([`VOLUMES_FORMAT`]).
    pub format: u32,
    /// The metadata transaction id this file agrees with.
    pub transaction_id: u64,
    /// Minimum free data space (percent) below which new volumes and snapshots are refused.
    #[serde(default = "default_min_free")]
    pub min_free_space_percent: u8,
    /// Named devices, by name.
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// An operation in flight, if a crash interrupted one.
    #[serde(default)]
    pub pending: Option<Pending>,
}

fn default_min_free() -> u8 {
    DEFAULT_MIN_FREE_SPACE_PERCENT
}

/// What [`VolumesFile::reconcile`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// The two files already agreed.
    Consistent,
    /// A pending operation had reached the metadata; it was applied to the names.
    RolledForward(PendingOp),
    /// A pending operation had not reached the metadata; it was dropped.
    RolledBack(PendingOp),
    /// The transaction ids disagree in a way no uthin crash produces (the metadata was changed
    /// by another tool): nothing was changed or deleted; `uthin check` reports the details.
    Disagree {
        /// Transaction id in volumes.json.
        volumes: u64,
        /// Transaction id in the metadata.
        metadata: u64,
    },
}

impl VolumesFile {
    /// An empty file agreeing with metadata transaction id `transaction_id`.
    pub fn new(transaction_id: u64) -> VolumesFile {
        VolumesFile {
            format: VOLUMES_FORMAT,
            transaction_id,
            min_free_space_percent: DEFAULT_MIN_FREE_SPACE_PERCENT,
            volumes: BTreeMap::new(),
            pending: None,
        }
    }

    /// The record of the device `dev_id`, if it has a name.
    pub fn by_dev_id(&self, dev_id: u32) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.dev_id == dev_id)
    }

    /// Dev ids named here, including the one of a pending create.
    pub fn dev_ids(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.volumes.values().map(|v| v.dev_id).collect();
        if let Some(Pending {
            op: PendingOp::Create(rec),
            ..
        }) = &self.pending
        {
            ids.insert(rec.dev_id);
        }
        ids
    }

    /// Applies an operation to the names (the final step of the protocol).
    pub fn apply(&mut self, op: &PendingOp) {
        match op {
            PendingOp::Create(rec) => {
                self.volumes.insert(rec.name.clone(), rec.clone());
            }
            PendingOp::Delete { name, .. } => {
                self.volumes.remove(name);
            }
        }
    }

    /// Makes this file agree with metadata whose transaction id is `metadata_txid` (see the
    /// module docs). Returns what was done; the caller writes the file back when it changed.
    pub fn reconcile(&mut self, metadata_txid: u64) -> Reconciled {
        match self.pending.take() {
            Some(p) if p.transaction_id == metadata_txid => {
                self.apply(&p.op);
                self.transaction_id = metadata_txid;
                Reconciled::RolledForward(p.op)
            }
            Some(p) if self.transaction_id == metadata_txid => Reconciled::RolledBack(p.op),
            Some(p) => {
                // Keep the record: someone must look at it (check reports it).
                let volumes = self.transaction_id;
                self.pending = Some(p);
                Reconciled::Disagree {
                    volumes,
                    metadata: metadata_txid,
                }
            }
            None if self.transaction_id == metadata_txid => Reconciled::Consistent,
            None => Reconciled::Disagree {
                volumes: self.transaction_id,
                metadata: metadata_txid,
            },
        }
    }
}

/// A step of one atomic write, where a test can stop it (as a crash would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// Writing the temp file.
    WriteTemp,
    /// fsync of the temp file.
    SyncTemp,
    /// Renaming the temp file over volumes.json.
    Rename,
    /// fsync of the directory.
    SyncDir,
}

/// Steps of one atomic write, in order.
pub const WRITE_STEPS: [WriteStep; 4] = [
    WriteStep::WriteTemp,
    WriteStep::SyncTemp,
    WriteStep::Rename,
    WriteStep::SyncDir,
];

/// Stops volumes.json writes at a chosen step, for crash tests: the `n`-th step (counting from
/// 0 over every write made through stores sharing this value) fails with
/// [`PoolError::InjectedCrash`] before it runs, and so does every later one, as if the process
/// had died there.
#[derive(Debug, Clone, Default)]
pub struct CrashAt {
    remaining: Arc<AtomicU64>,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl CrashAt {
    /// Crash before step number `n` (0-based).
    pub fn after_steps(n: u64) -> CrashAt {
        let c = CrashAt::default();
        c.remaining.store(n, Ordering::SeqCst);
        c.armed.store(true, Ordering::SeqCst);
        c
    }

    /// Never crash (but count steps; see [`CrashAt::steps_taken`]).
    pub fn never() -> CrashAt {
        CrashAt::default()
    }

    fn step(&self, step: WriteStep) -> Result<(), PoolError> {
        if !self.armed.load(Ordering::SeqCst) {
            self.remaining.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let left = self.remaining.load(Ordering::SeqCst);
        if left == 0 {
            return Err(PoolError::InjectedCrash(format!(
                "volumes.json write stopped before {step:?}"
            )));
        }
        self.remaining.store(left - 1, Ordering::SeqCst);
        Ok(())
    }

    /// For an unarmed value: how many steps were taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.remaining.load(Ordering::SeqCst)
    }

    /// True once an armed crash point was reached.
    pub fn crashed(&self) -> bool {
        self.armed.load(Ordering::SeqCst) && self.remaining.load(Ordering::SeqCst) == 0
    }
}

/// Reads and atomically writes `DIR/volumes.json`.
#[derive(Debug, Clone)]
pub struct VolumesStore {
    path: PathBuf,
    dir: PathBuf,
    crash: CrashAt,
}

impl VolumesStore {
    /// The store for `path` (in directory `dir`).
    pub fn new(dir: impl Into<PathBuf>, path: impl Into<PathBuf>) -> VolumesStore {
        VolumesStore {
            path: path.into(),
            dir: dir.into(),
            crash: CrashAt::never(),
        }
    }

    /// Stops writes as `crash` says (tests).
    pub fn with_crash(mut self, crash: CrashAt) -> VolumesStore {
        self.crash = crash;
        self
    }

    fn temp_path(&self) -> PathBuf {
        self.path.with_extension("json.tmp")
    }

    /// True when the file exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Reads the file; a temp file left by a crash before its rename is removed (it never
    /// became the file). Errors name the file and what is wrong with it.
    pub fn read(&self) -> Result<VolumesFile, PoolError> {
        let _ = std::fs::remove_file(self.temp_path());
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| PoolError::io(format!("cannot read {}", self.path.display()), e))?;
        let file: VolumesFile = serde_json::from_str(&text)
            .map_err(|e| PoolError::BadVolumesFile(format!("{}: {e}", self.path.display())))?;
        if file.format != VOLUMES_FORMAT {
            return Err(PoolError::BadVolumesFile(format!(
                "{}: format {} is not the {VOLUMES_FORMAT} this uthin reads",
                self.path.display(),
                file.format
            )));
        }
        for (name, rec) in &file.volumes {
            if *name != rec.name {
                return Err(PoolError::BadVolumesFile(format!(
                    "{}: entry `{name}` carries the name `{}`",
                    self.path.display(),
                    rec.name
                )));
            }
        }
        Ok(file)
    }

    /// Replaces the file atomically: temp file, fsync, rename, fsync of the directory.
    pub fn write(&self, file: &VolumesFile) -> Result<(), PoolError> {
        let tmp = self.temp_path();
        // Serializing plain data to a string cannot fail.
        let text = serde_json::to_string_pretty(file).unwrap_or_default() + "\n";
        self.crash.step(WriteStep::WriteTemp)?;
        let mut f: File = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| PoolError::io(format!("cannot create {}", tmp.display()), e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| PoolError::io(format!("cannot write {}", tmp.display()), e))?;
        self.crash.step(WriteStep::SyncTemp)?;
        f.sync_all()
            .map_err(|e| PoolError::io(format!("cannot sync {}", tmp.display()), e))?;
        drop(f);
        self.crash.step(WriteStep::Rename)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            PoolError::io(
                format!("cannot rename {} to {}", tmp.display(), self.path.display()),
                e,
            )
        })?;
        self.crash.step(WriteStep::SyncDir)?;
        sync_dir(&self.dir)
    }
}

/// `now` as RFC 3339 UTC with second precision (`2026-11-23T15:00:00Z`).
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's well-known algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, dev_id: u32) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            dev_id,
            size: 1 << 20,
            read_only: false,
            origin: None,
            created: rfc3339(0),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_446_000), "2026-11-23T15:00:00Z");
    }

    #[test]
    fn reconcile_rolls_forward_or_back() {
        let mut f = VolumesFile::new(4);
        f.pending = Some(Pending {
            transaction_id: 5,
            op: PendingOp::Create(rec("a", 1)),
        });
        let mut back = f.clone();
        assert!(matches!(f.reconcile(5), Reconciled::RolledForward(_)));
        assert_eq!(f.transaction_id, 5);
        assert!(f.volumes.contains_key("a") && f.pending.is_none());
        assert!(matches!(back.reconcile(4), Reconciled::RolledBack(_)));
        assert!(back.volumes.is_empty() && back.pending.is_none());
        assert_eq!(back.transaction_id, 4);

        let mut d = f.clone();
        d.pending = Some(Pending {
            transaction_id: 6,
            op: PendingOp::Delete {
                name: "a".into(),
                dev_id: 1,
            },
        });
        let mut kept = d.clone();
        assert!(matches!(d.reconcile(6), Reconciled::RolledForward(_)));
        assert!(d.volumes.is_empty());
        assert!(matches!(kept.reconcile(5), Reconciled::RolledBack(_)));
        assert!(kept.volumes.contains_key("a"));

        let mut odd = VolumesFile::new(2);
        assert_eq!(
            odd.reconcile(9),
            Reconciled::Disagree {
                volumes: 2,
                metadata: 9
            }
        );
    }

    #[test]
    fn atomic_write_survives_a_stop_at_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumes.json");
        let old = VolumesFile::new(1);
        VolumesStore::new(dir.path(), &path).write(&old).unwrap();
        let mut new = old.clone();
        new.transaction_id = 2;
        new.volumes.insert("a".into(), rec("a", 1));
        for n in 0..WRITE_STEPS.len() as u64 {
            VolumesStore::new(dir.path(), &path).write(&old).unwrap();
            let store = VolumesStore::new(dir.path(), &path).with_crash(CrashAt::after_steps(n));
            let err = store.write(&new).unwrap_err();
            assert!(matches!(err, PoolError::InjectedCrash(_)));
            let seen = VolumesStore::new(dir.path(), &path).read().unwrap();
            // Before the rename the old file stands; from the rename on, the new one.
            if n <= 2 {
                assert_eq!(seen, old, "stopped before step {n}");
            } else {
                assert_eq!(seen, new, "stopped before step {n}");
            }
            assert!(!dir.path().join("volumes.json.tmp").exists());
        }
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volumes.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = VolumesStore::new(dir.path(), &path).read().unwrap_err();
        assert!(err.to_string().contains("volumes.json"), "{err}");
    }
}
