//! A metadata device in a regular file or a block device.

use super::{BlockIo, out_of_range};
use crate::{BLOCK_SIZE, Block, MetaBlock};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// pread/pwrite on a file or block device; `sync` is fdatasync.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    nr_blocks: AtomicU64,
    block_device: bool,
}

impl FileIo {
    /// Opens an existing file or block device for reading and writing. Its size in blocks is
    /// its length divided by 4096 (a partial last block is ignored).
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        // A block device reports length 0 in its metadata; seeking to its end gives its size.
        let len = if block_device {
            file.seek(SeekFrom::End(0))?
        } else {
            file.metadata()?.len()
        };
        Ok(FileIo {
            file,
            nr_blocks: AtomicU64::new(len / BLOCK_SIZE as u64),
            block_device,
        })
    }

    /// Creates (or truncates) a regular file of `nr_blocks` zeroed blocks (sparse).
    pub fn create(path: &Path, nr_blocks: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(nr_blocks * BLOCK_SIZE as u64)?;
        Ok(FileIo {
            file,
            nr_blocks: AtomicU64::new(nr_blocks),
            block_device: false,
        })
    }

    fn check(&self, nr: MetaBlock) -> io::Result<u64> {
        let n = self.nr_blocks.load(Ordering::Acquire);
        if nr.0 >= n {
            return Err(out_of_range(nr, n));
        }
        Ok(nr.0 * BLOCK_SIZE as u64)
    }
}

impl BlockIo for FileIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read(&self, nr: MetaBlock, buf: &mut Block) -> io::Result<()> {
        let off = self.check(nr)?;
        self.file.read_exact_at(buf, off)
    }

    fn write(&self, nr: MetaBlock, buf: &Block) -> io::Result<()> {
        let off = self.check(nr)?;
        self.file.write_all_at(buf, off)
    }

    fn write_run(&self, start: MetaBlock, data: &[u8]) -> io::Result<()> {
        let nr = (data.len() / BLOCK_SIZE) as u64;
        if data.len() % BLOCK_SIZE != 0 || nr == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write_run needs whole blocks",
            ));
        }
        let off = self
            .check(MetaBlock(start.0 + nr - 1))
            .map(|_| start.0 * BLOCK_SIZE as u64)?;
        self.file.write_all_at(data, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn grow(&self, nr_blocks: u64) -> io::Result<()> {
        if nr_blocks <= self.nr_blocks() {
            return Ok(());
        }
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cannot grow a block device to {nr_blocks} blocks (it has {})",
                    self.nr_blocks()
                ),
            ));
        }
        self.file.set_len(nr_blocks * BLOCK_SIZE as u64)?;
        // The new length must survive a crash before anything is written past the old end.
        self.file.sync_all()?;
        self.nr_blocks.store(nr_blocks, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_grow_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let io = FileIo::create(&path, 4).unwrap();
        assert_eq!(io.nr_blocks(), 4);
        let mut b = [7u8; BLOCK_SIZE];
        io.write(MetaBlock(3), &b).unwrap();
        assert!(
            io.write(MetaBlock(4), &b).is_err(),
            "writes past the end are refused"
        );
        io.grow(10).unwrap();
        io.write(MetaBlock(9), &b).unwrap();
        io.sync().unwrap();
        drop(io);
        let io = FileIo::open(&path).unwrap();
        assert_eq!(io.nr_blocks(), 10);
        b.fill(0);
        io.read(MetaBlock(3), &mut b).unwrap();
        assert_eq!(b[100], 7);
        io.read(MetaBlock(5), &mut b).unwrap();
        assert_eq!(b[100], 0);
        assert!(io.read(MetaBlock(10), &mut b).is_err());
    }
}
