//! File-level I/O over rustix: opening with or without `O_DIRECT`, positional reads and
//! writes that survive short transfers and `EINTR`, and naming the file system.
//!
//! # Retry policy
//!
//! * A short read or write is continued from where it stopped, as often as it takes (each
//!   round moves at least one byte, or the end of the file / a zero-length write ends it).
//! * `EINTR` is retried at once, without limit: it means a signal arrived before the call did
//!   anything, so retrying is always correct.
//! * `EAGAIN` (`EWOULDBLOCK`) is retried at most [`EAGAIN_RETRIES`] times with an exponential
//!   back-off starting at 1 ms (about 0.5 s in all), then reported as the failure of the
//!   operation. Regular files never return it for blocking descriptors; some network and FUSE
//!   file systems do under pressure, and a transient condition deserves a short wait — but a
//!   persistent one must not hang a save or restore.
//! * Every other error fails the operation at once, naming it ([`Op`]), the path and the offset.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::io::{Errno, IoSlice, IoSliceMut};

use crate::error::Op;
use crate::fault::{self, Injected};

/// Whether page data bypasses the page cache (`O_DIRECT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// Buffered I/O through the page cache.
    Off,
    /// `O_DIRECT`; fail with [`crate::SaveError::DirectIoRefused`] if the file system refuses it.
    On,
    /// Probe `O_DIRECT`; fall back to buffered I/O (and say so in the report) if refused.
    #[default]
    Auto,
}

impl std::str::FromStr for DirectIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(DirectIo::Off),
            "on" => Ok(DirectIo::On),
            "auto" => Ok(DirectIo::Auto),
            _ => Err(format!("direct-io must be auto, on or off, not {s:?}")),
        }
    }
}

/// Converts a rustix error into `std::io::Error`.
pub(crate) fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// How many times `EAGAIN` is retried before it fails the operation (see the module docs).
pub const EAGAIN_RETRIES: u32 = 9;

/// Counts `EAGAIN` retries of one operation and decides whether an error is retried.
#[derive(Default)]
struct Retry {
    again: u32,
}

impl Retry {
    /// `true` if the operation should be tried again after `e` (having waited, for `EAGAIN`).
    fn again(&mut self, e: &io::Error) -> bool {
        match e.raw_os_error() {
            Some(code) if code == Errno::INTR.raw_os_error() => true,
            Some(code) if code == Errno::AGAIN.raw_os_error() && self.again < EAGAIN_RETRIES => {
                std::thread::sleep(std::time::Duration::from_millis(1 << self.again));
                self.again += 1;
                true
            }
            _ => false,
        }
    }
}

/// Runs a non-transfer system call (`open`, `rename`, `fdatasync`, ...) under the retry
/// policy, asking the fault hook for `op` before each attempt.
fn retrying<T>(op: Op, mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut retry = Retry::default();
    loop {
        let result = match fault::check(op) {
            Some(Injected::Fail(e)) => Err(e),
            Some(Injected::Interrupt) => {
                Err(io::Error::from_raw_os_error(Errno::INTR.raw_os_error()))
            }
            Some(Injected::Delay(d)) => {
                std::thread::sleep(d);
                call()
            }
            Some(Injected::Status(_)) | Some(Injected::Reset) => {
                Err(io::Error::from_raw_os_error(Errno::IO.raw_os_error()))
            }
            Some(Injected::Short(_)) | None => call(),
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) if retry.again(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// What one attempt of a transfer loop should do after asking the fault hook: go on with at
/// most this many bytes, or fail with an (injected) error that the retry policy judges.
fn attempt(op: Op, len: usize) -> Result<usize, io::Error> {
    match fault::check(op) {
        None => Ok(len),
        Some(Injected::Fail(e)) => Err(e),
        Some(Injected::Short(n)) => Ok(len.min(n.max(1))),
        Some(Injected::Interrupt) => Err(io::Error::from_raw_os_error(Errno::INTR.raw_os_error())),
        Some(Injected::Delay(d)) => {
            std::thread::sleep(d);
            Ok(len)
        }
        Some(Injected::Status(_)) | Some(Injected::Reset) => {
            Err(io::Error::from_raw_os_error(Errno::IO.raw_os_error()))
        }
    }
}

/// Opens `path` with `flags` (`open(2)`), close-on-exec.
pub(crate) fn open(path: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
    let op = if flags.contains(OFlags::DIRECT) {
        Op::OpenDirect
    } else {
        Op::Open
    };
    retrying(op, || {
        rfs::open(path, flags | OFlags::CLOEXEC, Mode::from_raw_mode(mode)).map_err(io_err)
    })
}

/// `rename(2)` of `from` over `to`.
pub(crate) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    retrying(Op::Rename, || std::fs::rename(from, to))
}

/// `pwrite(2)` all of `buf` at `offset`, retrying on `EINTR` and short writes; `op` names
/// what is written (stream records or a bitmap).
pub(crate) fn write_all_at(
    fd: BorrowedFd<'_>,
    mut buf: &[u8],
    mut offset: u64,
    op: Op,
) -> io::Result<()> {
    let mut retry = Retry::default();
    while !buf.is_empty() {
        let result = attempt(op, buf.len())
            .and_then(|len| rustix::io::pwrite(fd, &buf[..len], offset).map_err(io_err));
        match result {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = buf.get(n..).unwrap_or(&[]);
                offset = offset.saturating_add(n as u64);
            }
            Err(e) if retry.again(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pwritev(2)` all of `buf` at `offset` as one vector, retrying on `EINTR` and short writes.
/// Page data goes through here straight from guest memory.
/// One vector entry, so `IOV_MAX` is never a concern.
pub(crate) fn pwritev_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    let mut retry = Retry::default();
    while !buf.is_empty() {
        let result = attempt(Op::WritePages, buf.len()).and_then(|len| {
            rustix::io::pwritev(fd, &[IoSlice::new(&buf[..len])], offset).map_err(io_err)
        });
        match result {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = buf.get(n..).unwrap_or(&[]);
                offset = offset.saturating_add(n as u64);
            }
            Err(e) if retry.again(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `preadv(2)` exactly `buf.len()` bytes of page data at `offset`; end of file first is
/// `UnexpectedEof`.
pub(crate) fn preadv_exact(
    fd: BorrowedFd<'_>,
    mut buf: &mut [u8],
    mut offset: u64,
) -> io::Result<()> {
    let mut retry = Retry::default();
    while !buf.is_empty() {
        let result = attempt(Op::ReadPages, buf.len()).and_then(|len| {
            rustix::io::preadv(fd, &mut [IoSliceMut::new(&mut buf[..len])], offset).map_err(io_err)
        });
        match result {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => {
                buf = buf.get_mut(n..).unwrap_or(&mut []);
                offset = offset.saturating_add(n as u64);
            }
            Err(e) if retry.again(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `pread(2)` up to `buf.len()` bytes at `offset` under the retry policy; returns bytes read.
pub(crate) fn pread_some(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    pread_some_op(fd, buf, offset, Op::ReadStream)
}

/// [`pread_some`], asking the fault hook for `op`.
fn pread_some_op(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64, op: Op) -> io::Result<usize> {
    let mut retry = Retry::default();
    loop {
        let result = attempt(op, buf.len())
            .and_then(|len| rustix::io::pread(fd, &mut buf[..len], offset).map_err(io_err));
        match result {
            Ok(n) => return Ok(n),
            Err(e) if retry.again(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads exactly `buf.len()` bytes at `offset` with `pread(2)`, asking the fault hook for `op`;
/// end of file first is `UnexpectedEof`.
pub(crate) fn pread_exact(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
    op: Op,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or(&mut []);
        let n = pread_some_op(fd, rest, offset.saturating_add(done as u64), op)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done = done.saturating_add(n);
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes of the stream at `offset` with plain `pread(2)`.
pub(crate) fn read_exact_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
    pread_exact(fd, buf, offset, Op::ReadStream)
}

/// The file system's name, from `fstatfs(2)`'s magic number, for error messages.
pub fn filesystem_name(fd: BorrowedFd<'_>) -> String {
    let Ok(st) = rfs::fstatfs(fd) else {
        return "the file system".into();
    };
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64;
    let name = match magic {
        0xEF53 => "ext4",
        0x0102_1994 => "tmpfs",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x6969 => "nfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0x6573_5546 => "fuse",
        0x0102_1997 => "9p",
        0xF15F => "ecryptfs",
        0x8584_58F6 => "ramfs",
        _ => return format!("the file system (magic {magic:#x})"),
    };
    name.to_string()
}

pub(crate) fn libc_einval() -> i32 {
    Errno::INVAL.raw_os_error()
}

/// A [`mapped_ram_core::stream::ByteSource`] over a file descriptor, with `pread(2)`.
pub(crate) struct FdSource<'a> {
    pub fd: BorrowedFd<'a>,
}

impl mapped_ram_core::stream::ByteSource for FdSource<'_> {
    type Error = io::Error;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, io::Error> {
        pread_some(self.fd, buf, offset)
    }
}

/// A [`mapped_ram_core::stream::ByteSink`] collecting bytes in memory.
#[derive(Default)]
pub(crate) struct VecSink(pub Vec<u8>);

impl mapped_ram_core::stream::ByteSink for VecSink {
    type Error = std::convert::Infallible;
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Descriptor-level helpers used by the engines.
pub(crate) fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retrying(Op::Sync, || rfs::fdatasync(fd).map_err(io_err))
}

/// `fsync(2)` of a directory, making a rename in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    let fd = retrying(Op::SyncDir, || {
        rfs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)
    })?;
    retrying(Op::SyncDir, || rfs::fsync(fd.as_fd()).map_err(io_err))
}

/// `ftruncate(2)`.
pub(crate) fn set_len(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    retrying(Op::Truncate, || rfs::ftruncate(fd, len).map_err(io_err))
}

/// Allocates `len` bytes of disk space at `offset` without changing the file size
/// (`fallocate(2)` with `FALLOC_FL_KEEP_SIZE`); the range reads as zeros until written.
/// Returns `Ok(false)` where the file system cannot do it (`EOPNOTSUPP`).
///
/// See [fallocate(2)](https://man7.org/linux/man-pages/man2/fallocate.2.html).
pub(crate) fn allocate(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<bool> {
    fallocate(
        Op::Allocate,
        fd,
        rfs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Deallocates `len` bytes at `offset` (`fallocate(2)` with `FALLOC_FL_PUNCH_HOLE |
/// FALLOC_FL_KEEP_SIZE`); the range then reads as zeros and takes no disk space.
/// Returns `Ok(false)` where the file system cannot do it (`EOPNOTSUPP`).
pub(crate) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<bool> {
    fallocate(
        Op::Punch,
        fd,
        rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

fn fallocate(
    op: Op,
    fd: BorrowedFd<'_>,
    flags: rfs::FallocateFlags,
    offset: u64,
    len: u64,
) -> io::Result<bool> {
    match retrying(op, || {
        rfs::fallocate(fd, flags, offset, len).map_err(io_err)
    }) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(Errno::OPNOTSUPP.raw_os_error()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where the file's next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) at or after `pos` is
/// (`lseek(2)`). `Ok(None)`: no data after `pos` (`ENXIO`); `Err` with `EINVAL`/`EOPNOTSUPP`:
/// the file system cannot tell (callers then treat everything as data).
///
/// See [lseek(2)](https://man7.org/linux/man-pages/man2/lseek.2.html).
pub(crate) fn seek(fd: BorrowedFd<'_>, pos: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        rfs::SeekFrom::Data(pos)
    } else {
        rfs::SeekFrom::Hole(pos)
    };
    match retrying(Op::Seek, || rfs::seek(fd, whence).map_err(io_err)) {
        Ok(at) => Ok(Some(at)),
        Err(e) if e.raw_os_error() == Some(Errno::NXIO.raw_os_error()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `true` for the errors of a file system that cannot answer `SEEK_DATA`/`SEEK_HOLE`.
pub(crate) fn seek_unsupported(e: &io::Error) -> bool {
    [Errno::INVAL, Errno::OPNOTSUPP]
        .iter()
        .any(|x| e.raw_os_error() == Some(x.raw_os_error()))
}

/// `copy_file_range(2)` of up to `len` bytes at `offset` of `src` to the same offset of `dst`;
/// returns the bytes copied (0 at the end of `src`).
///
/// See [copy_file_range(2)](https://man7.org/linux/man-pages/man2/copy_file_range.2.html).
pub(crate) fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    retrying(Op::CopyRange, || {
        let (mut from, mut to) = (offset, offset);
        rfs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), len).map_err(io_err)
    })
}

/// `true` for the errors that mean "`copy_file_range` cannot do this pair of files".
pub(crate) fn copy_range_unsupported(e: &io::Error) -> bool {
    [Errno::XDEV, Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP]
        .iter()
        .any(|x| e.raw_os_error() == Some(x.raw_os_error()))
}

/// Makes `dst` share all of `src`'s data extents (`ioctl(FICLONE)`, a reflink).
///
/// See [ioctl_ficlone(2)](https://man7.org/linux/man-pages/man2/ioctl_ficlone.2.html).
pub(crate) fn clone_file(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    retrying(Op::Clone, || rfs::ioctl_ficlone(dst, src).map_err(io_err))
}

/// Takes an exclusive `flock(2)` lock on `fd` without waiting; `Ok(false)` when another
/// open file description holds it.
///
/// See [flock(2)](https://man7.org/linux/man-pages/man2/flock.2.html).
pub(crate) fn try_lock(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match retrying(Op::Lock, || {
        rfs::flock(fd, rfs::FlockOperation::NonBlockingLockExclusive).map_err(io_err)
    }) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(Errno::WOULDBLOCK.raw_os_error()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Drops the file's clean pages from the page cache (`posix_fadvise(2)` with
/// `POSIX_FADV_DONTNEED`): for a snapshot whose pages were copied into guest memory, so that
/// the restore leaves no second copy of the guest in the page cache.
///
/// See [posix_fadvise(2)](https://man7.org/linux/man-pages/man2/posix_fadvise.2.html).
pub(crate) fn drop_cached(fd: BorrowedFd<'_>) -> io::Result<()> {
    retrying(Op::Advise, || {
        rfs::fadvise(fd, 0, None, rfs::Advice::DontNeed).map_err(io_err)
    })
}

/// Device and inode of an open file (`fstat(2)`).
pub(crate) fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    retrying(Op::Stat, || {
        #[allow(clippy::unnecessary_cast)]
        rfs::fstat(fd)
            .map(|st| (st.st_dev as u64, st.st_ino as u64))
            .map_err(io_err)
    })
}

/// Opens the file that `fd` refers to once more, as a new open file description with its own
/// status flags (`O_DIRECT` or not) — never by the path, which another process may have
/// renamed over or replaced with a symbolic link in the meantime. Goes through
/// `/proc/self/fd/N` (a magic link to the open inode); without `/proc`, opens `path` with
/// `O_NOFOLLOW`. Either way the result is checked to be the same inode (`st_dev`/`st_ino`),
/// else it fails with `ESTALE`.
pub(crate) fn reopen(fd: BorrowedFd<'_>, path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let magic = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let new = match open(&magic, flags, 0) {
        Ok(new) => new,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !Path::new("/proc/self/fd").exists() => {
            open(path, flags | OFlags::NOFOLLOW, 0)?
        }
        Err(e) => return Err(e),
    };
    if identity(new.as_fd())? != identity(fd)? {
        return Err(io::Error::from_raw_os_error(Errno::STALE.raw_os_error()));
    }
    Ok(new)
}

/// `true` when `fd` is on tmpfs, where space is memory and allocating it ahead gains nothing.
pub(crate) fn is_tmpfs(fd: BorrowedFd<'_>) -> bool {
    #[allow(clippy::unnecessary_cast)]
    rfs::fstatfs(fd).is_ok_and(|st| st.f_type as u64 == 0x0102_1994)
}

/// File size from `fstat(2)`.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    retrying(Op::Stat, || {
        rfs::fstat(fd).map(|st| st.st_size as u64).map_err(io_err)
    })
}
