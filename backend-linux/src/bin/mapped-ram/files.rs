//! Files the tool opens besides snapshots: which file a path names (so that two names of one
//! file are caught), files created private (0600, like snapshots), and bounded reads.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::output::CliError;

/// Mode of every file the tool creates: guest memory and device state are never readable by
/// other users (the umask can only remove bits from it).
pub const PRIVATE_MODE: u32 = 0o600;

/// Which file a path names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An existing file (after symlinks): device and inode number, so hard links and
    /// symlinks of one file compare equal.
    Existing {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A file that does not exist yet: the canonical directory and the name it would get.
    New(PathBuf),
}

/// What kind of file a metadata describes, in words.
pub fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// The identity of `path` (see [`Identity`]); `what` names the file in errors.
pub fn identity(path: &Path, what: &str) -> Result<Identity, CliError> {
    let err = |e: std::io::Error| CliError::new(format!("{what} {}: {e}", path.display()));
    match std::fs::metadata(path) {
        Ok(m) => Ok(Identity::Existing {
            dev: m.dev(),
            ino: m.ino(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Follow a dangling symlink to the file it would create.
            let mut p = path.to_path_buf();
            for _ in 0..40 {
                match std::fs::read_link(&p) {
                    Ok(target) => {
                        p = match p.parent() {
                            Some(dir) => dir.join(target),
                            None => target,
                        }
                    }
                    Err(_) => break,
                }
            }
            let name = p.file_name().ok_or_else(|| err(e))?.to_owned();
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let dir = std::fs::canonicalize(&dir).map_err(err)?;
            Ok(Identity::New(dir.join(name)))
        }
        Err(e) => Err(err(e)),
    }
}

/// Refuses an existing `path` that is not a regular file (through symlinks): a FIFO would
/// block the open or the read forever, a device has no size to map. A missing file is left to
/// the open that follows, which names it.
pub fn require_regular(path: &Path, what: &str) -> Result<(), CliError> {
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(CliError::new(format!(
            "{what} {} is {}, not a regular file",
            path.display(),
            kind(&m)
        ))),
        _ => Ok(()),
    }
}

/// The identity of an open file.
pub fn identity_of(file: &File, path: &Path, what: &str) -> Result<Identity, CliError> {
    let m = file
        .metadata()
        .map_err(|e| CliError::new(format!("{what} {}: {e}", path.display())))?;
    Ok(Identity::Existing {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// Opens `path` for reading and writing, creating it with mode 0600 if it does not exist
/// (never truncating).
pub fn open_or_create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_MODE)
        .open(path)
}

/// Opens `path` for writing, truncated, creating it with mode 0600 if it does not exist.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_MODE)
        .open(path)
}

/// Reads a regular file of at most `max` bytes: FIFOs, devices and anything else are refused
/// before a byte is read (the file is opened non-blocking, so a FIFO cannot stall the open),
/// and the read stops after `max` bytes whatever the file's size says.
pub fn read_regular_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, CliError> {
    let err = |e: std::io::Error| CliError::new(format!("{what} {}: {e}", path.display()));
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(CliError::new(format!(
            "{what} {} is {}, not a regular file",
            path.display(),
            kind(&meta)
        )));
    }
    if meta.len() > max {
        return Err(CliError::new(format!(
            "{what} {} is {} bytes, more than the maximum {max}",
            path.display(),
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(err)?;
    if bytes.len() as u64 > max {
        return Err(CliError::new(format!(
            "{what} {} grew past the maximum of {max} bytes while it was read",
            path.display()
        )));
    }
    Ok(bytes)
}
