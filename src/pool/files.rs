//! The pool directory: `DIR/metadata`, `DIR/data` (regular files or symlinks to block devices),
//! `DIR/volumes.json` and `DIR/lock`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::PoolError;

/// Paths of a pool's files.
#[derive(Debug, Clone)]
pub struct PoolPaths {
    /// The pool directory.
    pub dir: PathBuf,
}

impl PoolPaths {
    /// Paths inside `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> PoolPaths {
        PoolPaths { dir: dir.into() }
    }
    /// `DIR/metadata`.
    pub fn metadata(&self) -> PathBuf {
        self.dir.join("metadata")
    }
    /// `DIR/data`.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// `DIR/volumes.json`.
    pub fn volumes(&self) -> PathBuf {
        self.dir.join("volumes.json")
    }
    /// `DIR/lock`.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
}

/// Size in bytes of an open file or block device (BLKGETSIZE64 for block devices, since their
/// `st_size` is 0).
pub fn file_or_device_size(file: &File, path: &Path) -> Result<u64, PoolError> {
    let meta = file
        .metadata()
        .map_err(|e| PoolError::io(format!("cannot stat {}", path.display()), e))?;
    if meta.file_type().is_block_device() {
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        let mut size: u64 = 0;
        // SAFETY: the fd is open for the duration of the call and BLKGETSIZE64 writes exactly
        // one u64 through the pointer, which points at a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(PoolError::io(
                format!("cannot get the size of block device {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

/// True when `path` is (a symlink to) a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Opens `path` read-write.
pub fn open_rw(path: &Path) -> Result<File, PoolError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| PoolError::io(format!("cannot open {}", path.display()), e))
}

/// Makes sure `path` can hold `size` bytes: a block device must already be that large; a
/// regular file (created when missing) is extended *sparsely* with `set_len`, never filled.
/// Returns the open file.
pub fn ensure_size(path: &Path, size: u64) -> Result<File, PoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!is_block_device(path))
        .truncate(false)
        .open(path)
        .map_err(|e| PoolError::io(format!("cannot open {}", path.display()), e))?;
    let have = file_or_device_size(&file, path)?;
    if is_block_device(path) {
        if have < size {
            return Err(PoolError::InvalidArgument(format!(
                "block device {} holds {have} bytes, fewer than the {size} asked for",
                path.display()
            )));
        }
    } else if have < size {
        file.set_len(size)
            .map_err(|e| PoolError::io(format!("cannot extend {}", path.display()), e))?;
    }
    Ok(file)
}

/// Punches holes over `blocks` (of `block_size` bytes) in a regular data file, so their space
/// goes back to the host file system; runs of consecutive blocks take one call.
pub fn punch_blocks(
    file: &File,
    blocks: &[crate::units::DataBlock],
    block_size: u64,
) -> std::io::Result<()> {
    let mut sorted: Vec<u64> = blocks.iter().map(|b| b.0).collect();
    sorted.sort_unstable();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut len = 1;
        while i + len < sorted.len() && sorted[i + len] == start + len as u64 {
            len += 1;
        }
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (start * block_size) as libc::off_t,
                (len as u64 * block_size) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        i += len;
    }
    Ok(())
}

/// fsyncs a directory, so a rename or a file creation in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), PoolError> {
    let d = File::open(dir)
        .map_err(|e| PoolError::io(format!("cannot open directory {}", dir.display()), e))?;
    d.sync_all()
        .map_err(|e| PoolError::io(format!("cannot sync directory {}", dir.display()), e))
}

/// One process owns a pool: an exclusive `flock` on `DIR/lock`, held while this value lives.
/// The holder writes its pid into the file so a second process can say who holds it.
#[derive(Debug)]
pub struct PoolLock {
    file: File,
    path: PathBuf,
}

impl PoolLock {
    /// Takes the lock without waiting. Fails with [`PoolError::Locked`] naming the holder's pid
    /// when another process (or another open in this process) holds it.
    pub fn acquire(paths: &PoolPaths) -> Result<PoolLock, PoolError> {
        let path = paths.lock();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| PoolError::io(format!("cannot open lock file {}", path.display()), e))?;
        // A few short retries: a process that just released the lock may still be visible
        // as its holder for an instant (a child forked while it held the lock keeps the lock's
        // file description until its exec closes it).
        let mut rc = -1;
        for attempt in 0..20 {
            // SAFETY: flock on an fd we own; no memory is passed.
            rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK)
            {
                break;
            }
            if attempt < 19 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim().parse::<u32>().ok();
                return Err(PoolError::Locked {
                    dir: paths.dir.clone(),
                    pid: holder,
                });
            }
            return Err(PoolError::io(
                format!("cannot lock {}", path.display()),
                err,
            ));
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"))
            .map_err(|e| PoolError::io(format!("cannot write {}", path.display()), e))?;
        Ok(PoolLock { file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PoolLock {
    fn drop(&mut self) {
        // Clear our pid so a stale number is never reported; the flock goes with the fd.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PoolPaths::new(dir.path());
        let held = PoolLock::acquire(&paths).unwrap();
        let err = PoolLock::acquire(&paths).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&std::process::id().to_string()),
            "error should name the holder: {text}"
        );
        drop(held);
        PoolLock::acquire(&paths).unwrap();
    }

    #[test]
    fn regular_files_are_created_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let f = ensure_size(&path, 1 << 30).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(meta.blocks() * 512 < 1 << 20, "data file must be sparse");
        assert_eq!(file_or_device_size(&f, &path).unwrap(), 1 << 30);
    }
}
