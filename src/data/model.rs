//! [`DataModel`]: an in-memory data file that remembers what was synced, for crash tests.
//!
//! It behaves like a sparse regular file whose writes, copies and hole punches sit in a
//! volatile cache until [`sync`](DataModel::sync). A simulated power loss
//! ([`power_loss`](DataModel::power_loss)) keeps everything synced and, for each unsynced
//! change, keeps it, drops it, or (for writes) tears it at 512-byte sectors, as a disk with a
//! volatile write cache may. Punches are treated like writes of zeros that also free space: a
//! lost punch leaves the old data in place, which is exactly the case the volume layer must
//! survive (a block freed by a durable commit but not yet punched).

use std::collections::HashMap;
use std::io;

use parking_lot::Mutex;

/// Sector size at which an unsynced write may be torn by a power loss.
pub const SECTOR: usize = 512;

/// What a simulated power loss does with the changes made since the last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Every unsynced change reached the disk.
    KeepAll,
    /// No unsynced change reached the disk.
    DropAll,
    /// Each unsynced change is kept or dropped at random, and a write may be torn: each of its
    /// 512-byte sectors kept or dropped on its own. The seed makes a run reproducible.
    Random(u64),
}

#[derive(Debug, Clone)]
enum Change {
    /// Bytes written at an absolute file offset.
    Write { off: u64, data: Vec<u8> },
    /// A whole block made a hole.
    Punch { block: u64 },
}

#[derive(Default)]
struct State {
    block_size: u64,
    nr_blocks: u64,
    /// What the "disk" holds: block → contents. A missing block is a hole (reads zeros).
    durable: HashMap<u64, Box<[u8]>>,
    /// What reads see now: durable plus every unsynced change.
    current: HashMap<u64, Box<[u8]>>,
    /// Unsynced changes, oldest first.
    pending: Vec<Change>,
    syncs: u64,
    bytes_written: u64,
    /// When set, every I/O fails with EIO (a dead disk).
    failing: bool,
}

impl State {
    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        if self.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        match off.checked_add(len) {
            Some(end) if end <= self.block_size * self.nr_blocks => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "model data file: bytes {off}+{len} are past its end ({} blocks)",
                    self.nr_blocks
                ),
            )),
        }
    }
}

/// Applies a write of `data` at `off` to a block map.
fn apply_write(map: &mut HashMap<u64, Box<[u8]>>, bs: u64, off: u64, data: &[u8]) {
    let mut pos = 0usize;
    while pos < data.len() {
        let at = off + pos as u64;
        let block = at / bs;
        let in_block = (at % bs) as usize;
        let n = (bs as usize - in_block).min(data.len() - pos);
        let b = map
            .entry(block)
            .or_insert_with(|| vec![0u8; bs as usize].into_boxed_slice());
        b[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
        pos += n;
    }
}

/// A tiny deterministic generator (xorshift64*), so the model needs no random-number crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// An in-memory data file with explicit durability; see the module docs.
pub struct DataModel {
    state: Mutex<State>,
}

impl DataModel {
    /// An empty (all-hole) model of `nr_blocks` blocks of `block_size` bytes.
    pub fn new(block_size: u32, nr_blocks: u64) -> DataModel {
        DataModel {
            state: Mutex::new(State {
                block_size: u64::from(block_size),
                nr_blocks,
                ..State::default()
            }),
        }
    }

    pub(crate) fn block_size(&self) -> u64 {
        self.state.lock().block_size
    }

    pub(crate) fn len(&self) -> u64 {
        let s = self.state.lock();
        s.block_size * s.nr_blocks
    }

    pub(crate) fn grow_to(&self, len: u64) {
        let mut s = self.state.lock();
        s.nr_blocks = s.nr_blocks.max(len.div_ceil(s.block_size));
    }

    /// Reads `buf.len()` bytes at `off`.
    pub(crate) fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock();
        s.check(off, buf.len() as u64)?;
        let bs = s.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = off + pos as u64;
            let in_block = (at % bs) as usize;
            let n = (bs as usize - in_block).min(buf.len() - pos);
            match s.current.get(&(at / bs)) {
                Some(b) => buf[pos..pos + n].copy_from_slice(&b[in_block..in_block + n]),
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes `data` at `off` (unsynced until [`sync`](DataModel::sync)).
    pub(crate) fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check(off, data.len() as u64)?;
        let bs = s.block_size;
        apply_write(&mut s.current, bs, off, data);
        s.bytes_written += data.len() as u64;
        s.pending.push(Change::Write {
            off,
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Makes block `block` a hole (unsynced until [`sync`](DataModel::sync)).
    pub(crate) fn punch(&self, block: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        let bs = s.block_size;
        s.check(block * bs, bs)?;
        s.current.remove(&block);
        s.pending.push(Change::Punch { block });
        Ok(())
    }

    pub(crate) fn is_hole(&self, block: u64) -> io::Result<bool> {
        let s = self.state.lock();
        if s.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(!s.current.contains_key(&block))
    }

    /// Makes every change so far durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.durable = s.current.clone();
        s.pending.clear();
        s.syncs += 1;
        Ok(())
    }

    /// Simulates a power loss: reads afterwards see the synced state plus whatever `how` keeps
    /// of the unsynced changes. The model stays usable (as after a reboot).
    pub fn power_loss(&self, how: PowerLoss) {
        let mut s = self.state.lock();
        let pending = std::mem::take(&mut s.pending);
        let bs = s.block_size;
        let mut disk = std::mem::take(&mut s.durable);
        let mut rng = match how {
            PowerLoss::Random(seed) => Some(Rng(seed | 1)),
            _ => None,
        };
        for change in pending {
            let keep = match (&how, rng.as_mut()) {
                (PowerLoss::KeepAll, _) => true,
                (PowerLoss::DropAll, _) => false,
                (_, Some(r)) => r.next() % 3 != 0,
                (_, None) => false,
            };
            match change {
                Change::Punch { block } if keep => {
                    disk.remove(&block);
                }
                Change::Punch { .. } => {}
                Change::Write { off, data } => {
                    let torn = rng.as_mut().is_some_and(|r| r.next() % 4 == 0);
                    if torn {
                        // Sector by sector, on sector boundaries of the file.
                        let mut pos = 0usize;
                        while pos < data.len() {
                            let at = off + pos as u64;
                            let n = (SECTOR - (at % SECTOR as u64) as usize).min(data.len() - pos);
                            if rng.as_mut().is_some_and(Rng::coin) {
                                apply_write(&mut disk, bs, at, &data[pos..pos + n]);
                            }
                            pos += n;
                        }
                    } else if keep {
                        apply_write(&mut disk, bs, off, &data);
                    }
                }
            }
        }
        s.current = disk.clone();
        s.durable = disk;
    }

    /// Number of syncs so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Total bytes written so far (by writes and copies), to check that nothing writes blocks of
    /// zeros where a hole would do.
    pub fn bytes_written(&self) -> u64 {
        self.state.lock().bytes_written
    }

    /// Number of blocks that are not holes now (the model's st_blocks).
    pub fn allocated_blocks(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    /// Whether block `block` is a hole now.
    pub fn block_is_hole(&self, block: u64) -> bool {
        !self.state.lock().current.contains_key(&block)
    }

    /// Makes every later I/O fail with EIO (`true`) or work again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.state.lock().failing = failing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_and_unsynced_may_go() {
        let m = DataModel::new(4096, 4);
        m.write(0, &[1u8; 4096]).unwrap();
        m.sync().unwrap();
        m.write(0, &[2u8; 4096]).unwrap();
        m.write(4096, &[3u8; 100]).unwrap();
        m.power_loss(PowerLoss::DropAll);
        let mut b = [0u8; 4096];
        m.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        assert!(m.block_is_hole(1));

        m.write(0, &[2u8; 4096]).unwrap();
        m.power_loss(PowerLoss::KeepAll);
        m.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 2));
    }

    #[test]
    fn a_lost_punch_leaves_old_data() {
        let m = DataModel::new(4096, 2);
        m.write(4096, &[7u8; 4096]).unwrap();
        m.sync().unwrap();
        m.punch(1).unwrap();
        assert!(m.is_hole(1).unwrap());
        m.power_loss(PowerLoss::DropAll);
        assert!(!m.is_hole(1).unwrap());
    }

    #[test]
    fn torn_writes_keep_whole_sectors_of_old_or_new() {
        for seed in 0..50 {
            let m = DataModel::new(4096, 1);
            m.write(0, &[1u8; 4096]).unwrap();
            m.sync().unwrap();
            m.write(0, &[2u8; 4096]).unwrap();
            m.power_loss(PowerLoss::Random(seed));
            let mut b = [0u8; 4096];
            m.read(0, &mut b).unwrap();
            for sector in b.chunks(SECTOR) {
                assert!(sector.iter().all(|&x| x == sector[0]), "seed {seed}");
                assert!(sector[0] == 1 || sector[0] == 2);
            }
        }
    }

    #[test]
    fn out_of_range_is_an_error() {
        let m = DataModel::new(4096, 1);
        assert!(m.write(4000, &[0u8; 200]).is_err());
        let mut b = [0u8; 1];
        assert!(m.read(4096, &mut b).is_err());
        m.set_failing(true);
        assert!(m.read(0, &mut b).is_err());
    }
}
