//! Property test of the volume layer against a byte-array model per volume (issue 5), over the
//! real pool (dm-thin metadata in a file) and a real sparse data file: random unaligned and
//! block-spanning reads, writes (with and without FUA), discards, write-zeroes, snapshots,
//! deletes, flushes, concurrent writes (several to one block) and clean reopens.
//!
//! After every case: every volume equals its model and block_status agrees with it; `uthin
//! check` finds the metadata clean (live, and again offline after the pool is closed); the
//! data file holds data only in mapped blocks (SEEK_DATA) and its allocated space (st_blocks)
//! is bounded by the mapped blocks; every fourth case also runs thin-provisioning-tools'
//! `thin_check` on the metadata file.

mod volume_common;

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use uthin::data::{AlignedBuf, CacheMode};
use uthin::device::{BlockDevice, DevError, Extent};
use uthin::pool::Pool;
use uthin::tools::check::check_pool;
use uthin::units::DataBlock;
use uthin::volume::{Volume, VolumePool};
use volume_common::{BS, create_opts, pattern, runtime, thin_check, uthin_check_volumes};

const VOL_BLOCKS: u64 = 12;
const VOL: u64 = BS * VOL_BLOCKS;
/// Enough for the volumes a case can make (no ENOSPC here; see volume_enospc).
const DATA_BLOCKS: u64 = 256;
const META_BYTES: u64 = 2 << 20;

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

/// Offsets and lengths are multiples of 512 bytes or not, about half and half, so both
/// sector-aligned client I/O and odd ranges are covered.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..VOL, 1..3 * BS + 2, any::<bool>()).prop_map(|(off, len, align)| {
        let (off, len) = if align {
            (off / 512 * 512, (len / 512).max(1) * 512)
        } else {
            (off, len)
        };
        (off, len.min(VOL - off))
    })
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

struct Harness {
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
    cache: CacheMode,
    pool: Option<VolumePool>,
    /// (name, handle) per live volume, parallel to `model`; no handles while closed.
    vols: Vec<(String, Option<Arc<Volume>>)>,
    model: Vec<Vec<u8>>,
    next_name: u32,
    next_id: u64,
}

fn open_pool(dir: &Path, cache: CacheMode) -> VolumePool {
    // A tiny cache, so eviction and refills are exercised too.
    let vp = VolumePool::open_with(Pool::open(dir).unwrap(), 64, cache).unwrap();
    assert_eq!(
        vp.data().cache_mode(),
        cache,
        "the storage refused O_DIRECT"
    );
    vp
}

/// `data` in a page-aligned buffer, so that aligned ranges can take the direct path.
fn aligned_copy(data: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(data.len());
    b.copy_from_slice(data);
    b
}

/// Where a buffer is cut in two: at a 512-byte boundary, so both halves stay aligned.
fn cut_at(len: u64, parts: u64) -> usize {
    (len / parts / 512 * 512) as usize
}

impl Harness {
    fn new(dir: &Path, cache: CacheMode) -> Harness {
        drop(Pool::create(dir, &create_opts(DATA_BLOCKS, META_BYTES)).unwrap());
        let mut h = Harness {
            rt: runtime(),
            dir: dir.to_path_buf(),
            cache,
            pool: Some(open_pool(dir, cache)),
            vols: Vec::new(),
            model: Vec::new(),
            next_name: 1,
            next_id: 1,
        };
        let name = h.fresh_name();
        let vp = h.pool().clone();
        h.rt.block_on(vp.create_volume(&name, VOL)).unwrap();
        let v = Arc::new(vp.volume(&name).unwrap());
        h.vols.push((name, Some(v)));
        h.model.push(vec![0; VOL as usize]);
        h
    }

    fn fresh_name(&mut self) -> String {
        self.next_name += 1;
        format!("v{}", self.next_name - 1)
    }

    fn vol(&self, i: usize) -> Arc<Volume> {
        self.vols[i].1.clone().expect("pool is open")
    }

    fn pool(&self) -> &VolumePool {
        self.pool.as_ref().expect("pool is open")
    }

    fn read(&self, i: usize, off: u64, len: u64) -> Vec<u8> {
        let vol = self.vol(i);
        // Two buffers, to exercise scatter-gather splitting.
        let mut buf = AlignedBuf::zeroed(len as usize);
        buf.fill(0xEE);
        let (a, b) = buf.split_at_mut(cut_at(len, 3));
        self.rt
            .block_on(vol.read(off, &mut [IoSliceMut::new(a), IoSliceMut::new(b)]))
            .unwrap();
        buf.to_vec()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.vols.len();
        match op.clone() {
            Op::Write { vol, off, len, fua } => {
                let i = vol % n;
                let data = aligned_copy(&pattern(self.next_id, len));
                self.next_id += 1;
                let v = self.vol(i);
                let (x, y) = data.split_at(cut_at(len, 2));
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
                let v = self.vol(i);
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
                let v = self.vol(i);
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
                let origin = self.vols[i].0.clone();
                let name = self.fresh_name();
                let vp = self.pool().clone();
                self.rt
                    .block_on(vp.snapshot(&origin, &name, false))
                    .unwrap();
                let v = Arc::new(vp.volume(&name).unwrap());
                self.vols.push((name, Some(v)));
                let copy = self.model[i].clone();
                self.model.push(copy);
            }
            Op::Delete { vol } => {
                if n < 2 {
                    return Ok(());
                }
                let i = vol % n;
                let (name, handle) = self.vols.remove(i);
                let handle = handle.expect("pool is open");
                self.model.remove(i);
                let vp = self.pool().clone();
                self.rt.block_on(vp.delete_volume(&name)).unwrap();
                let mut b = [0u8; 512];
                let err = self
                    .rt
                    .block_on(handle.read(0, &mut [IoSliceMut::new(&mut b)]))
                    .unwrap_err();
                prop_assert!(matches!(err, DevError::Gone(_)), "{err}");
            }
            Op::Flush => {
                let v = self.vol(0);
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
                    let data = aligned_copy(&pattern(self.next_id, len));
                    self.next_id += 1;
                    self.model[i][off as usize..(off + len) as usize].copy_from_slice(&data);
                    let v = self.vol(i);
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

    fn close(&mut self) {
        let v = self.vol(0);
        self.rt.block_on(v.flush()).unwrap();
        drop(v);
        for (_, v) in &mut self.vols {
            // Handles keep the pool alive.
            *v = None;
        }
        let pool = self.pool.take().expect("pool is open");
        drop(pool.into_pool().expect("no other handle"));
    }

    fn reopen(&mut self) {
        self.close();
        let pool = open_pool(&self.dir, self.cache);
        for (name, v) in &mut self.vols {
            *v = Some(Arc::new(pool.volume(name).unwrap()));
        }
        self.pool = Some(pool);
    }

    fn check_all(&mut self) -> Result<(), TestCaseError> {
        for i in 0..self.vols.len() {
            let got = self.read(i, 0, VOL);
            prop_assert!(got == self.model[i], "volume {i} differs from the model");
            let st = self.rt.block_on(self.vol(i).block_status(0, VOL)).unwrap();
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
        let v = self.vol(0);
        self.rt.block_on(v.flush()).unwrap();
        let vp = self.pool();
        uthin_check_volumes(vp).map_err(TestCaseError::fail)?;
        let status = vp.pool().status().unwrap();
        let mapped: std::collections::BTreeSet<u64> = {
            let pool = vp.pool();
            let mut m = std::collections::BTreeSet::new();
            for info in pool.list().unwrap() {
                m.extend(
                    pool.mappings(info.dev_id)
                        .unwrap()
                        .into_iter()
                        .map(|(_, bt)| bt.block.0),
                );
            }
            m
        };
        prop_assert_eq!(mapped.len() as u64, status.data_used_blocks);
        // Sparse: no unmapped block holds data (SEEK_DATA), and the file's allocated space
        // (st_blocks) is at most the mapped blocks, give or take ext4's extent-tree blocks.
        // XFS (the second run of scripts/test.sh) sometimes reports a punched block as data
        // and counts more in st_blocks, most likely space it keeps for itself and reclaims in
        // the background (not verified; seen in about one run of this test in ten: a punched
        // block that SEEK_DATA called data, whose data-fork extent map said hole and which
        // read back as zeros). There an unmapped block must read as zeros instead, and
        // st_blocks is not bounded.
        let on_xfs = is_xfs(&self.dir);
        let unmapped_data: Vec<u64> = (0..DATA_BLOCKS)
            .filter(|b| !mapped.contains(b) && !vp.data().is_hole(DataBlock(*b)).unwrap())
            .filter(|b| !on_xfs || !reads_zeros(&self.dir.join("data"), *b))
            .collect();
        prop_assert!(
            unmapped_data.is_empty(),
            "unmapped blocks with data: {:?}",
            unmapped_data
        );
        let alloc = vp.data().allocated_bytes().unwrap();
        prop_assert!(
            on_xfs || alloc <= mapped.len() as u64 * BS + 64 * 1024,
            "{} bytes allocated for {} mapped data blocks",
            alloc,
            mapped.len()
        );
        Ok(())
    }
}

/// Whether `dir` is on XFS (`statfs`'s `f_type` is `XFS_SUPER_MAGIC`).
fn is_xfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero `struct statfs` is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a live `struct statfs` the kernel fills.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == XFS_SUPER_MAGIC }
}

/// Whether data block `b` of the data file at `path` reads as zeros.
fn reads_zeros(path: &Path, b: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; BS as usize];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, b * BS))
        .is_ok_and(|()| buf.iter().all(|&x| x == 0))
}

static CASES: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn volumes_behave_like_byte_arrays(ops in proptest::collection::vec(op(), 1..40)) {
        run_case(&ops, CacheMode::Writeback)?;
    }

    /// The same with `--cache direct`: every transfer O_DIRECT, unaligned ones through
    /// bounce buffers (read-modify-write), concurrent writes into one 512-byte unit included.
    #[test]
    fn volumes_behave_like_byte_arrays_direct(ops in proptest::collection::vec(op(), 1..40)) {
        run_case(&ops, CacheMode::Direct)?;
    }
}

fn run_case(ops: &[Op], cache: CacheMode) -> Result<(), TestCaseError> {
    // On the target directory's file system: /tmp may be a tmpfs (no O_DIRECT before
    // Linux 6.6). scripts/test.sh runs this file again with `UTHIN_TEST_DIR` on XFS, where
    // copies on write clone the old block instead of copying it.
    let dir = match std::env::var_os("UTHIN_TEST_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
    };
    let mut h = Harness::new(dir.path(), cache);
    for op in ops {
        h.apply(op)?;
    }
    h.check_all()?;
    h.reopen();
    h.check_all()?;
    h.close();
    let report = check_pool(dir.path(), false).unwrap();
    prop_assert!(
        report.is_clean(),
        "uthin check (offline): {}",
        report.to_text()
    );
    if CASES.fetch_add(1, Ordering::Relaxed) % 4 == 0 {
        thin_check(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

/// Found by `volumes_behave_like_byte_arrays_direct` (its regression file has the long
/// form): block 3 is written, discarded and written again in one transaction, so its data
/// block is a reservation that lost a reference in that transaction. The cache said "owned
/// alone" for it while a lookup said "not in the last commit", so of two concurrent writes
/// into the block one wrote it in place and the other copied it, losing the first. Each
/// mode in turn, several times (the writes race).
#[test]
fn a_block_written_discarded_and_written_again_keeps_concurrent_writes() {
    let ops = [
        Op::Write {
            vol: 0,
            off: 143_345,
            len: 107_456,
            fua: false,
        },
        Op::Discard {
            vol: 0,
            off: 186_720,
            len: 157_752,
        },
        Op::Write {
            vol: 0,
            off: 214_528,
            len: 44_032,
            fua: false,
        },
        Op::Concurrent {
            writes: vec![(0, 181_081, 58_872), (0, 248_318, 57_261)],
        },
        Op::Read {
            vol: 0,
            off: 171_773,
            len: 68_028,
        },
        Op::Read {
            vol: 0,
            off: 196_608,
            len: 65_536,
        },
    ];
    for _ in 0..4 {
        for cache in [CacheMode::Direct, CacheMode::Writeback] {
            if let Err(e) = run_case(&ops, cache) {
                panic!("{cache:?}: {e}");
            }
        }
    }
}
