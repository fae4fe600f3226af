//! Crash tests of the volume layer (issue 5) over the real pool: the metadata lives in the
//! btree crate's fault-injecting engine (`FaultyIo`: unsynced metadata writes lost, kept or
//! torn at 512-byte sectors, syncs made to fail) and the data in the data model (`DataModel`:
//! unsynced data writes and punches lost, kept or torn). Random writes, FUA writes, discards,
//! write-zeroes, flushes, snapshots and deletes; then a power loss, either between requests or
//! in the middle of a commit (a metadata sync fails, as when the power goes during it). After
//! reopening from the crash image:
//!
//! - `uthin check` and thin-provisioning-tools' `thin_check` find the metadata clean;
//! - every byte written before the last acknowledged flush (or snapshot/delete, which commit)
//!   reads back exactly;
//! - a byte written after it reads as its old value or one of the values written since;
//! - so never another volume's data, never a discarded block's old data where zeros are due
//!   after a flush, never non-zero data in a never-written range.
//!
//! Then the pool keeps working from there (reusing blocks whose punch was lost) and crashes
//! again, and the same holds.

mod volume_common;

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use uthin::data::{DataFile, DataModel, PowerLoss};
use uthin::device::BlockDevice;
use uthin::pool::{OpenOptions, Pool};
use uthin::volume::{Volume, VolumePool};
use uthin_btree::io::fault::WriteFate;
use uthin_btree::io::{BlockIo, FailRule, FaultyIo, IoOp, MemIo};
use volume_common::{BS, create_opts, pattern, runtime, thin_check_bytes, uthin_check_volumes};

const VOL: u64 = BS * 10;
const DATA_BLOCKS: u64 = 128;
const META_BYTES: u64 = 2 << 20;
const META_BLOCKS: u64 = META_BYTES / 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: usize,
        off: u64,
        len: u64,
        fua: bool,
    },
    Discard {
        vol: usize,
        off: u64,
        len: u64,
    },
    Zeroes {
        vol: usize,
        off: u64,
        len: u64,
        unmap: bool,
    },
    Flush,
    Snapshot {
        vol: usize,
    },
    Delete {
        vol: usize,
    },
}

/// How the power goes.
#[derive(Debug, Clone, Copy)]
struct Crash {
    /// `Some(k)`: during a flush whose `k`-th metadata sync fails (0: before the superblock is
    /// written; 1: after it was written, before it was synced). `None`: between requests.
    during_commit: Option<u64>,
    /// Fates of the unsynced metadata writes (a seed; 0 = all lost, 1 = all written).
    meta_seed: u64,
    /// What becomes of the unsynced data writes and punches.
    data: PowerLoss,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..VOL, 1..2 * BS + 100).prop_map(|(off, len)| (off, len.min(VOL - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..6usize, range(), 0..8u8)
            .prop_map(|(vol, (off, len), f)| Op::Write { vol, off, len, fua: f == 0 }),
        2 => (0..6usize, range()).prop_map(|(vol, (off, len))| Op::Discard { vol, off, len }),
        1 => (0..6usize, range(), any::<bool>())
            .prop_map(|(vol, (off, len), unmap)| Op::Zeroes { vol, off, len, unmap }),
        2 => Just(Op::Flush),
        1 => (0..6usize).prop_map(|vol| Op::Snapshot { vol }),
        1 => (0..6usize).prop_map(|vol| Op::Delete { vol }),
    ]
}

fn crash() -> impl Strategy<Value = Crash> {
    let data = prop_oneof![
        Just(PowerLoss::KeepAll),
        Just(PowerLoss::DropAll),
        any::<u64>().prop_map(PowerLoss::Random),
    ];
    (prop::option::of(0..2u64), any::<u64>(), data).prop_map(|(during_commit, meta_seed, data)| {
        Crash {
            during_commit,
            meta_seed,
            data,
        }
    })
}

/// Fates for `n` pending metadata writes from a seed: 0 loses all, 1 keeps all, others mix
/// lost, written and torn writes.
fn fates(n: usize, seed: u64) -> Vec<WriteFate> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|_| match seed {
            0 => WriteFate::Lost,
            1 => WriteFate::Written,
            _ => match next() % 3 {
                0 => WriteFate::Lost,
                1 => WriteFate::Written,
                _ => WriteFate::Torn((next() % 254 + 1) as u8),
            },
        })
        .collect()
}

/// What each volume may read after a crash.
#[derive(Clone)]
struct VolModel {
    name: String,
    /// Contents at the last durability point.
    durable: Vec<u8>,
    /// Latest contents.
    current: Vec<u8>,
    /// Every write (offset, bytes) since the durability point: after a crash a byte reads
    /// its durable value or what one of these wrote there.
    since: Vec<(u64, Vec<u8>)>,
}

impl VolModel {
    fn new(name: &str) -> VolModel {
        VolModel {
            name: name.into(),
            durable: vec![0; VOL as usize],
            current: vec![0; VOL as usize],
            since: Vec::new(),
        }
    }
    fn set(&mut self, off: u64, data: &[u8]) {
        self.current[off as usize..off as usize + data.len()].copy_from_slice(data);
        self.since.push((off, data.to_vec()));
    }
    fn durable_now(&mut self) {
        self.durable = self.current.clone();
        self.since.clear();
    }
    /// Whether byte `j` may read `b` after a crash.
    fn allows(&self, j: usize, b: u8) -> bool {
        b == self.durable[j]
            || self.since.iter().any(|(off, data)| {
                let off = *off as usize;
                j >= off && j < off + data.len() && data[j - off] == b
            })
    }
}

struct Rig {
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
    data: Arc<DataModel>,
    meta: Arc<FaultyIo>,
    pool: VolumePool,
    vols: Vec<(VolModel, Arc<Volume>)>,
    next_name: u32,
    next_id: u64,
}

fn hooks(io: &Arc<FaultyIo>) -> OpenOptions {
    OpenOptions {
        metadata_io: Some(io.clone() as Arc<dyn BlockIo>),
        no_lock: true,
        ..OpenOptions::default()
    }
}

/// volumes.json is not under test here and needs no fsync to a disk: keep it in memory.
fn scratch_dir() -> tempfile::TempDir {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

impl Rig {
    fn new(dir: &Path) -> Rig {
        let rt = runtime();
        let meta = Arc::new(FaultyIo::new(META_BLOCKS));
        let pool =
            Pool::create_with(dir, &create_opts(DATA_BLOCKS, META_BYTES), hooks(&meta)).unwrap();
        let data = Arc::new(DataModel::new(BS as u32, DATA_BLOCKS));
        let pool = VolumePool::new(pool, DataFile::from_model(data.clone()), 32);
        rt.block_on(pool.create_volume("v1", VOL)).unwrap();
        let v = Arc::new(pool.volume("v1").unwrap());
        Rig {
            rt,
            dir: dir.to_path_buf(),
            data,
            meta,
            pool,
            vols: vec![(VolModel::new("v1"), v)],
            next_name: 2,
            next_id: 1,
        }
    }

    fn all_durable(&mut self) {
        for (m, _) in &mut self.vols {
            m.durable_now();
        }
    }

    fn apply(&mut self, op: &Op) {
        let n = self.vols.len();
        match op.clone() {
            Op::Write { vol, off, len, fua } => {
                let i = vol % n;
                let data = pattern(self.next_id, len);
                self.next_id += 1;
                let v = self.vols[i].1.clone();
                self.rt
                    .block_on(v.write(off, &[IoSlice::new(&data)], fua))
                    .unwrap();
                self.vols[i].0.set(off, &data);
                if fua {
                    self.all_durable();
                }
            }
            Op::Discard { vol, off, len } | Op::Zeroes { vol, off, len, .. } => {
                let i = vol % n;
                let v = self.vols[i].1.clone();
                match op {
                    Op::Zeroes { unmap, .. } => self
                        .rt
                        .block_on(v.write_zeroes(off, len, *unmap, false))
                        .unwrap(),
                    _ => self.rt.block_on(v.discard(off, len)).unwrap(),
                }
                self.vols[i].0.set(off, &vec![0; len as usize]);
            }
            Op::Flush => {
                let v = self.vols[0].1.clone();
                self.rt.block_on(v.flush()).unwrap();
                self.all_durable();
            }
            Op::Snapshot { vol } => {
                if n >= 5 {
                    return;
                }
                let i = vol % n;
                let origin = self.vols[i].0.name.clone();
                let name = format!("v{}", self.next_name);
                self.next_name += 1;
                let p = self.pool.clone();
                self.rt.block_on(p.snapshot(&origin, &name, false)).unwrap();
                // The snapshot commits: everything acknowledged so far is durable.
                self.all_durable();
                let mut m = self.vols[i].0.clone();
                m.name = name.clone();
                let v = Arc::new(self.pool.volume(&name).unwrap());
                self.vols.push((m, v));
            }
            Op::Delete { vol } => {
                if n < 2 {
                    return;
                }
                let i = vol % n;
                let name = self.vols[i].0.name.clone();
                let p = self.pool.clone();
                self.rt.block_on(p.delete_volume(&name)).unwrap();
                self.vols.remove(i);
                self.all_durable();
            }
        }
    }

    /// Power loss, then reopen from what survived.
    fn crash(&mut self, how: Crash) -> Result<(), TestCaseError> {
        if let Some(k) = how.during_commit {
            self.meta.inject(FailRule::nth(IoOp::Sync, k));
            let v = self.vols[0].1.clone();
            if self.rt.block_on(v.flush()).is_ok() {
                // Nothing to commit, so no metadata sync to fail: the flush held.
                self.all_durable();
            }
            self.meta.clear_faults();
        }
        let pending = self.meta.pending_writes();
        let image: MemIo = self.meta.crash_image(&fates(pending, how.meta_seed));
        self.data.power_loss(how.data);
        for (m, _) in &mut self.vols {
            m.current = m.durable.clone();
        }
        self.meta = Arc::new(FaultyIo::from_image(&image));
        let pool = Pool::open_with(&self.dir, hooks(&self.meta))
            .map_err(|e| TestCaseError::fail(format!("the pool does not reopen: {e}")))?;
        self.pool = VolumePool::new(pool, DataFile::from_model(self.data.clone()), 32);
        for (m, v) in &mut self.vols {
            *v = Arc::new(self.pool.volume(&m.name).unwrap());
        }
        uthin_check_volumes(&self.pool).map_err(TestCaseError::fail)?;
        thin_check_bytes(&image.to_bytes()).map_err(TestCaseError::fail)?;
        Ok(())
    }

    /// Reads every volume and checks each byte against what the model allows.
    fn verify(&mut self, when: &str) -> Result<(), TestCaseError> {
        for (m, v) in &mut self.vols {
            let mut got = vec![0u8; VOL as usize];
            self.rt
                .block_on(v.read(0, &mut [IoSliceMut::new(&mut got)]))
                .unwrap();
            for (j, &b) in got.iter().enumerate() {
                prop_assert!(
                    m.allows(j, b),
                    "{when}: {} byte {j} reads {b}, durable {}, {} writes since",
                    m.name,
                    m.durable[j],
                    m.since.len()
                );
            }
            // What survived is now the state to build on.
            m.durable = got.clone();
            m.current = got;
            m.since.clear();
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_flushes_survive_power_loss(
        before in proptest::collection::vec(op(), 1..30),
        crash1 in crash(),
        after in proptest::collection::vec(op(), 0..20),
        crash2 in crash(),
    ) {
        let dir = scratch_dir();
        let mut rig = Rig::new(dir.path());
        for op in &before {
            rig.apply(op);
        }
        rig.crash(crash1)?;
        rig.verify("after the first power loss")?;
        for op in &after {
            rig.apply(op);
        }
        rig.crash(crash2)?;
        rig.verify("after the second power loss")?;
    }
}

/// The case the crash test found (docs/volume.md, "Writing in place"): origin and snapshot
/// share a block; the snapshot stops using it (copies it on a write, or discards it), so in the
/// open transaction the origin owns it alone; the origin then writes it. A power loss before
/// the next commit brings back the committed snapshot, which maps the old block: it must still
/// hold the old data.
fn unshared_in_the_open_transaction(unshare: Op) {
    let dir = scratch_dir();
    let mut rig = Rig::new(dir.path());
    let full = pattern(7, BS);
    let v1 = rig.vols[0].1.clone();
    rig.rt
        .block_on(v1.write(0, &[IoSlice::new(&full)], true))
        .unwrap();
    rig.vols[0].0.set(0, &full);
    rig.all_durable();
    rig.apply(&Op::Snapshot { vol: 0 });
    // The snapshot (volume 1) lets go of block 0: its count drops to 1...
    rig.apply(&unshare);
    // ...and the origin, alone on it now, must still copy before writing.
    rig.apply(&Op::Write {
        vol: 0,
        off: 200,
        len: 10,
        fua: false,
    });
    rig.crash(Crash {
        during_commit: None,
        meta_seed: 0,
        data: PowerLoss::KeepAll,
    })
    .unwrap();
    rig.verify("after the power loss").unwrap();
    // The metadata went back to the snapshot: both volumes read the pattern, unchanged.
    let mut expected = vec![0u8; VOL as usize];
    expected[..BS as usize].copy_from_slice(&full);
    for (m, _) in &rig.vols {
        assert_eq!(m.durable, expected, "{}", m.name);
    }
}

#[test]
fn a_block_the_sharer_copied_in_the_open_transaction_is_not_written_in_place() {
    unshared_in_the_open_transaction(Op::Write {
        vol: 1,
        off: 100,
        len: 10,
        fua: false,
    });
}

#[test]
fn a_block_the_sharer_discarded_in_the_open_transaction_is_not_written_in_place() {
    unshared_in_the_open_transaction(Op::Discard {
        vol: 1,
        off: 0,
        len: BS,
    });
}

#[test]
fn a_block_the_sharer_unmapped_by_write_zeroes_is_not_written_in_place() {
    unshared_in_the_open_transaction(Op::Zeroes {
        vol: 1,
        off: 0,
        len: 2 * BS,
        unmap: true,
    });
}

/// A block freed by a durable commit whose punch is lost in a crash still holds old data; a
/// partial write that reuses it must not expose that data.
#[test]
fn reused_block_with_a_lost_punch_reads_zeros_around_a_partial_write() {
    let dir = scratch_dir();
    let mut rig = Rig::new(dir.path());
    let v = rig.vols[0].1.clone();
    let full = vec![0xABu8; BS as usize];
    rig.rt
        .block_on(async {
            for b in 0..VOL / BS {
                v.write(b * BS, &[IoSlice::new(&full)], false).await?;
            }
            v.flush().await?;
            v.discard(0, VOL).await?;
            v.flush().await
        })
        .unwrap();
    // The discard is durable; the punches were never synced and are lost.
    rig.crash(Crash {
        during_commit: None,
        meta_seed: 1,
        data: PowerLoss::DropAll,
    })
    .unwrap();
    assert!(rig.data.allocated_blocks() > 0, "old data is still there");
    let v = rig.vols[0].1.clone();
    let mut got = vec![0u8; VOL as usize];
    rig.rt
        .block_on(async {
            for b in 0..VOL / BS {
                v.write(b * BS + 100, &[IoSlice::new(&[1u8; 10])], false)
                    .await?;
            }
            v.read(0, &mut [IoSliceMut::new(&mut got)]).await
        })
        .unwrap();
    for (j, &b) in got.iter().enumerate() {
        let in_write = (100..110).contains(&(j as u64 % BS));
        assert_eq!(b, if in_write { 1 } else { 0 }, "byte {j}");
    }
}
