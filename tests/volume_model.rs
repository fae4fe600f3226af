//! Property test of the volume layer against a byte-array model per volume (issue 5): random
//! unaligned and block-spanning reads, writes (with and without FUA), discards, write-zeroes,
//! snapshots, deletes, flushes, concurrent writes (several to one block) and clean reopens,
//! over a real sparse data file and the in-memory thin metadata. After every case the
//! metadata's reference counts are checked and the data file's allocated space (st_blocks)
//! must equal the mapped blocks once freed blocks are punched.

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use uthin::data::DataFile;
use uthin::device::{BlockDevice, DevError, Extent};
use uthin::units::{DataBlock, DevId};
use uthin::volume::{Drain, MemMetaDisk, MemMetadata, Volume, VolumePool};

const BS: u64 = 4096;
const VOL_BLOCKS: u64 = 12;
const VOL: u64 = BS * VOL_BLOCKS;
/// Enough for the volumes a case can make (no ENOSPC here; see volume_enospc).
const DATA_BLOCKS: u64 = 256;

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: usize,
        off: u64,
        len: u64,
        fua: bool,
    },
    Read {
        vol: usize,
        off: u64,
        len: u64,
    },
    Discard {
        vol: usize,
        off: u64,
        len: u64,
    },
    WriteZeroes {
        vol: usize,
        off: u64,
        len: u64,
        unmap: bool,
    },
    Snapshot {
        vol: usize,
    },
    Delete {
        vol: usize,
    },
    Flush,
    Reopen,
    Concurrent {
        writes: Vec<(usize, u64, u64)>,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..VOL, 1..3 * BS + 2).prop_map(|(off, len)| (off, len.min(VOL - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..8usize, range(), any::<bool>())
            .prop_map(|(vol, (off, len), fua)| Op::Write { vol, off, len, fua: fua && len % 3 == 0 }),
        4 => (0..8usize, range()).prop_map(|(vol, (off, len))| Op::Read { vol, off, len }),
        2 => (0..8usize, range()).prop_map(|(vol, (off, len))| Op::Discard { vol, off, len }),
        2 => (0..8usize, range(), any::<bool>())
            .prop_map(|(vol, (off, len), unmap)| Op::WriteZeroes { vol, off, len, unmap }),
        2 => (0..8usize).prop_map(|vol| Op::Snapshot { vol }),
        1 => (0..8usize).prop_map(|vol| Op::Delete { vol }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        2 => proptest::collection::vec((0..8usize, 0..VOL, 1..BS), 2..8)
            .prop_map(|writes| Op::Concurrent { writes }),
    ]
}

/// The bytes a write with id `id` puts at position `i` of its buffer: never zero, different
/// for every write, so a misplaced or lost write shows.
fn pattern(id: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((id.wrapping_mul(131) + i * 7) % 251 + 1) as u8)
        .collect()
}

struct Harness {
    rt: tokio::runtime::Runtime,
    path: std::path::PathBuf,
    disk: MemMetaDisk,
    pool: Option<VolumePool<MemMetadata>>,
    vols: Vec<(DevId, Arc<Volume<MemMetadata>>)>,
    model: Vec<Vec<u8>>,
    next_dev: u32,
    next_id: u64,
}

fn open_pool(path: &Path, disk: &MemMetaDisk) -> VolumePool<MemMetadata> {
    let data = DataFile::open(path, BS as u32, true).unwrap();
    data.grow(DATA_BLOCKS).unwrap();
    // A tiny cache, so eviction and refills are exercised too.
    VolumePool::new(MemMetadata::open(disk), data, 64)
}

impl Harness {
    fn new(dir: &Path) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let path = dir.join("data");
        let disk = MemMetadata::new(DATA_BLOCKS).disk();
        let pool = open_pool(&path, &disk);
        let mut h = Harness {
            rt,
            path,
            disk,
            pool: Some(pool),
            vols: Vec::new(),
            model: Vec::new(),
            next_dev: 1,
            next_id: 1,
        };
        h.create();
        h
    }

    fn pool(&self) -> &VolumePool<MemMetadata> {
        self.pool.as_ref().expect("pool is open")
    }

    fn create(&mut self) {
        let dev = DevId(self.next_dev);
        self.next_dev += 1;
        let pool = self.pool().clone();
        self.rt
            .block_on(pool.exclusive(Drain::None, move |m| m.create(dev)))
            .unwrap();
        self.vols
            .push((dev, Arc::new(self.pool().volume(dev, VOL, false))));
        self.model.push(vec![0; VOL as usize]);
    }

    fn read(&self, i: usize, off: u64, len: u64) -> Vec<u8> {
        let vol = &self.vols[i].1;
        // Two buffers, to exercise scatter-gather splitting.
        let cut = (len / 3) as usize;
        let mut a = vec![0xEEu8; cut];
        let mut b = vec![0xEEu8; len as usize - cut];
        self.rt
            .block_on(vol.read(off, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)]))
            .unwrap();
        a.extend_from_slice(&b);
        a
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.vols.len();
        match op.clone() {
            Op::Write { vol, off, len, fua } => {
                let i = vol % n;
                let data = pattern(self.next_id, len);
                self.next_id += 1;
                let v = self.vols[i].1.clone();
                let (x, y) = data.split_at(data.len() / 2);
                self.rt
                    .block_on(v.write(off, &[IoSlice::new(x), IoSlice::new(y)], fua))
                    .unwrap();
                self.model[i][off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Read { vol, off, len } => {
                let i = vol % n;
                let got = self.read(i, off, len);
                prop_assert!(
                    got == self.model[i][off as usize..(off + len) as usize],
                    "read {off}+{len} of volume {i} differs from the model"
                );
            }
            Op::Discard { vol, off, len } => {
                let i = vol % n;
                let v = self.vols[i].1.clone();
                self.rt.block_on(v.discard(off, len)).unwrap();
                self.model[i][off as usize..(off + len) as usize].fill(0);
            }
            Op::WriteZeroes {
                vol,
                off,
                len,
                unmap,
            } => {
                let i = vol % n;
                let v = self.vols[i].1.clone();
                self.rt
                    .block_on(v.write_zeroes(off, len, unmap, false))
                    .unwrap();
                self.model[i][off as usize..(off + len) as usize].fill(0);
                if !unmap {
                    // Without unmap every touched block stays allocated.
                    let st = self.rt.block_on(v.block_status(off, len)).unwrap();
                    prop_assert!(st.iter().all(|e| e.allocated), "{st:?}");
                }
            }
            Op::Snapshot { vol } => {
                let i = vol % n;
                if n >= 6 {
                    return Ok(());
                }
                let origin = self.vols[i].0;
                let snap = DevId(self.next_dev);
                self.next_dev += 1;
                let pool = self.pool().clone();
                self.rt
                    .block_on(
                        pool.exclusive(Drain::Snapshot(origin), move |m| m.snapshot(origin, snap)),
                    )
                    .unwrap();
                self.vols
                    .push((snap, Arc::new(self.pool().volume(snap, VOL, false))));
                let copy = self.model[i].clone();
                self.model.push(copy);
            }
            Op::Delete { vol } => {
                if n < 2 {
                    return Ok(());
                }
                let i = vol % n;
                let (dev, handle) = self.vols.remove(i);
                self.model.remove(i);
                let pool = self.pool().clone();
                self.rt
                    .block_on(pool.exclusive(Drain::Delete(dev), move |m| m.delete(dev)))
                    .unwrap();
                let mut b = [0u8; 512];
                let err = self
                    .rt
                    .block_on(handle.read(0, &mut [IoSliceMut::new(&mut b)]))
                    .unwrap_err();
                prop_assert!(matches!(err, DevError::Gone(_)), "{err}");
            }
            Op::Flush => {
                let v = self.vols[0].1.clone();
                self.rt.block_on(v.flush()).unwrap();
            }
            Op::Reopen => self.reopen(),
            Op::Concurrent { writes } => {
                // Keep byte ranges disjoint (several may share a block): the outcome is then
                // fully determined whatever the interleaving.
                let mut taken: Vec<(usize, u64, u64)> = Vec::new();
                for (vol, off, len) in writes {
                    let i = vol % n;
                    let len = len.min(VOL - off);
                    if taken
                        .iter()
                        .all(|&(j, o, l)| j != i || off + len <= o || o + l <= off)
                    {
                        taken.push((i, off, len));
                    }
                }
                let mut tasks = Vec::new();
                for &(i, off, len) in &taken {
                    let data = pattern(self.next_id, len);
                    self.next_id += 1;
                    self.model[i][off as usize..(off + len) as usize].copy_from_slice(&data);
                    let v = self.vols[i].1.clone();
                    tasks.push(
                        self.rt.spawn(
                            async move { v.write(off, &[IoSlice::new(&data)], false).await },
                        ),
                    );
                }
                for t in tasks {
                    self.rt.block_on(t).unwrap().unwrap();
                }
            }
        }
        Ok(())
    }

    fn reopen(&mut self) {
        let v = self.vols[0].1.clone();
        self.rt.block_on(v.flush()).unwrap();
        let devs: Vec<DevId> = self.vols.iter().map(|(d, _)| *d).collect();
        self.vols.clear();
        drop(v);
        self.pool = None;
        let pool = open_pool(&self.path, &self.disk);
        self.vols = devs
            .into_iter()
            .map(|d| (d, Arc::new(pool.volume(d, VOL, false))))
            .collect();
        self.pool = Some(pool);
    }

    fn check_all(&mut self) -> Result<(), TestCaseError> {
        for i in 0..self.vols.len() {
            let got = self.read(i, 0, VOL);
            prop_assert!(got == self.model[i], "volume {i} differs from the model");
            let st = self
                .rt
                .block_on(self.vols[i].1.block_status(0, VOL))
                .unwrap();
            prop_assert_eq!(st.iter().map(|e| e.len).sum::<u64>(), VOL);
            // Unallocated ranges must be zeros in the model too.
            let mut pos = 0u64;
            for Extent { len, zero, .. } in st {
                if zero {
                    prop_assert!(
                        self.model[i][pos as usize..(pos + len) as usize]
                            .iter()
                            .all(|&b| b == 0)
                    );
                }
                pos += len;
            }
        }
        let v = self.vols[0].1.clone();
        self.rt.block_on(v.flush()).unwrap();
        let pool = self.pool();
        let meta = pool.meta();
        meta.check().map_err(TestCaseError::fail)?;
        let used = meta.used_blocks();
        let mut mapped = std::collections::BTreeSet::new();
        for (d, _) in &self.vols {
            mapped.extend(meta.mappings(*d).into_iter().map(|(_, b)| b.0));
        }
        drop(meta);
        // Sparse: no unmapped block holds data (SEEK_DATA), and st_blocks tracks the mapped
        // blocks (4 KiB blocks = fs blocks), give or take ext4's extent-tree blocks.
        let alloc = pool.data().allocated_bytes().unwrap() / BS;
        let unmapped_data: Vec<u64> = (0..DATA_BLOCKS)
            .filter(|b| !mapped.contains(b) && !pool.data().is_hole(DataBlock(*b)).unwrap())
            .collect();
        prop_assert!(
            unmapped_data.is_empty(),
            "unmapped blocks with data: {:?}",
            unmapped_data
        );
        prop_assert!(
            alloc >= used && alloc <= used + 2 + used / 64,
            "{} fs blocks allocated for {} mapped data blocks",
            alloc,
            used
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn volumes_behave_like_byte_arrays(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(dir.path());
        for op in &ops {
            h.apply(op)?;
        }
        h.check_all()?;
        h.reopen();
        h.check_all()?;
    }
}
