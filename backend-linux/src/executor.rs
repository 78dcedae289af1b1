//! The one executor: every operation that moves page data — save, live passes, update, restore,
//! lazy restore's scan and verify — runs its channel work here.
//!
//! Two small pieces, modelled on smoltcp's `phy::Device` and its `FaultInjector<D>` wrapper:
//!
//! * [`Storage`] is *where* page data goes to or comes from: one call per I/O request
//!   (`write_pages`, `read_pages`) on a channel. [`FileChannels`] — one descriptor per channel,
//!   `pwritev(2)` / `preadv(2)`, optionally `O_DIRECT` with an aligned bounce buffer for
//!   unaligned memory — is the first implementation; io_uring or an object store would be
//!   another. Page checksums are wrappers around any storage: [`Summing`] records the CRC of
//!   exactly the bytes each write sends, [`Verifying`] checks each page a read brings in.
//!   Fault injection sits one level lower, in [`crate::file`]'s system-call wrappers, where
//!   every call that touches a snapshot passes (so injected `EINTR`s meet the retry policy).
//! * [`execute`] runs a [`Job`] over the chunks of a [`WorkQueue`] with N channel threads: the
//!   claim loop, the first-failure slot, stopping the other channels, cancellation and progress
//!   are here and nowhere else. A job only says what one chunk is.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use mapped_ram_core::bitmap::BitmapRef;
use mapped_ram_core::schedule::{Chunk, WorkQueue};
use rustix::fs::OFlags;

use crate::error::{IoFailure, Op};
use crate::file::{self, DirectIo};
use crate::integrity;
use crate::progress::{Cancel, Progress, ProgressFn};
use crate::sys::{is_aligned, AlignedBuf, DIRECT_IO_ALIGN};

/// How often the calling thread looks at the cancel handle and reports progress while the
/// channels work; the same for every operation.
pub(crate) const POLL: Duration = Duration::from_millis(10);

/// Pages of one block that an I/O request carries: block index (in the operation's block
/// order), first page index and page size. Wrappers use it to know which pages they see.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pages {
    pub block: usize,
    pub first: u64,
    pub page_size: u64,
}

/// Where page data is written to and read from (see the module docs).
pub(crate) trait Storage: Sync {
    /// Writes `data` (whole pages, starting with `pages.first`) at file offset `offset`, on
    /// channel `channel`.
    fn write_pages(&self, channel: usize, pages: Pages, data: &[u8], offset: u64)
        -> io::Result<()>;
    /// Reads `buf.len()` bytes of page data at `offset` into `buf`, on channel `channel`.
    fn read_pages(
        &self,
        channel: usize,
        pages: Pages,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()>;
    /// The job has written everything of its current chunk on `channel`: a storage that
    /// gathers a chunk's writes into one request (an object store's `PUT`) sends it now.
    fn end_chunk(&self, _channel: usize) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Storage + ?Sized> Storage for &S {
    fn end_chunk(&self, channel: usize) -> io::Result<()> {
        (**self).end_chunk(channel)
    }
    fn write_pages(
        &self,
        channel: usize,
        pages: Pages,
        data: &[u8],
        offset: u64,
    ) -> io::Result<()> {
        (**self).write_pages(channel, pages, data, offset)
    }
    fn read_pages(
        &self,
        channel: usize,
        pages: Pages,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        (**self).read_pages(channel, pages, buf, offset)
    }
}

/// The channel descriptors of one file: `pwritev(2)` / `preadv(2)` on channel `i`'s own
/// descriptor, with `O_DIRECT` when [`direct`](Self::direct).
pub(crate) struct FileChannels<'f> {
    fds: Vec<BorrowedFd<'f>>,
    direct: bool,
    bounce: Vec<Mutex<Option<AlignedBuf>>>,
    max_io: usize,
}

impl<'f> FileChannels<'f> {
    /// Channels over `fds` (one per channel; the same descriptor may repeat).
    pub fn new(fds: Vec<BorrowedFd<'f>>, direct: bool, max_io: u64) -> Self {
        let bounce = fds.iter().map(|_| Mutex::new(None)).collect();
        Self {
            fds,
            direct,
            bounce,
            max_io: usize::try_from(max_io).unwrap_or(usize::MAX),
        }
    }

    fn fd(&self, channel: usize) -> BorrowedFd<'f> {
        self.fds[channel % self.fds.len()]
    }

    /// Runs `f` on the channel's aligned bounce buffer (allocated on first use).
    fn with_bounce<T>(&self, channel: usize, f: impl FnOnce(&mut AlignedBuf) -> T) -> T {
        let slot = &self.bounce[channel % self.bounce.len()];
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        let buf = guard.get_or_insert_with(|| AlignedBuf::new(self.max_io.max(DIRECT_IO_ALIGN)));
        f(buf)
    }
}

impl Storage for FileChannels<'_> {
    fn write_pages(&self, channel: usize, _: Pages, data: &[u8], offset: u64) -> io::Result<()> {
        let fd = self.fd(channel);
        if self.direct && !is_aligned(data) {
            return self.with_bounce(channel, |buf| {
                let mut at = 0usize;
                while at < data.len() {
                    let n = (data.len() - at).min(buf.as_slice().len());
                    let dst = &mut buf.as_mut_slice()[..n];
                    dst.copy_from_slice(&data[at..at + n]);
                    file::pwritev_all(fd, dst, offset + at as u64)?;
                    at += n;
                }
                Ok(())
            });
        }
        file::pwritev_all(fd, data, offset)
    }

    fn read_pages(&self, channel: usize, _: Pages, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let fd = self.fd(channel);
        if self.direct && !is_aligned(buf) {
            return self.with_bounce(channel, |bounce| {
                let mut at = 0usize;
                while at < buf.len() {
                    let n = (buf.len() - at).min(bounce.as_slice().len());
                    let tmp = &mut bounce.as_mut_slice()[..n];
                    file::preadv_exact(fd, tmp, offset + at as u64)?;
                    buf[at..at + n].copy_from_slice(tmp);
                    at += n;
                }
                Ok(())
            });
        }
        file::preadv_exact(fd, buf, offset)
    }
}

/// A storage wrapper that records the checksum of every page written, computed from exactly
/// the bytes handed to the write (see [`crate::integrity`]). `sums[block][page]`.
pub(crate) struct Summing<'s, S> {
    pub inner: S,
    pub sums: &'s [Vec<AtomicU32>],
}

impl<S: Storage> Storage for Summing<'_, S> {
    fn end_chunk(&self, channel: usize) -> io::Result<()> {
        self.inner.end_chunk(channel)
    }

    fn write_pages(&self, channel: usize, at: Pages, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(sums) = self.sums.get(at.block) {
            for (i, page) in data.chunks_exact(at.page_size as usize).enumerate() {
                let index = at.first + i as u64;
                if let Some(slot) = sums.get(index as usize) {
                    slot.store(integrity::page_checksum(page, index), Ordering::Relaxed);
                }
            }
        }
        self.inner.write_pages(channel, at, data, offset)
    }

    fn read_pages(&self, channel: usize, at: Pages, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_pages(channel, at, buf, offset)
    }
}

/// A page that failed its stored checksum, carried inside an `io::Error` of kind
/// `InvalidData` from [`Verifying`] to the job that maps it to its own error.
#[derive(Debug)]
pub(crate) struct BadChecksum {
    pub page: u64,
    pub file_offset: u64,
    pub expected: u32,
    pub actual: u32,
}

impl std::fmt::Display for BadChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "page {} fails its checksum (stored {:#010x}, computed {:#010x})",
            self.page, self.expected, self.actual
        )
    }
}

impl std::error::Error for BadChecksum {}

impl BadChecksum {
    /// The mismatch inside `e`, if `e` came from [`Verifying`].
    pub fn from_io(e: &io::Error) -> Option<&BadChecksum> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// A storage wrapper that checks every stored page a read brings in against its checksum
/// (`tables[block][page]`); pages whose bit is clear in `stored[block]` (gap pages read through)
/// are not checked.
pub(crate) struct Verifying<'s, S> {
    pub inner: S,
    pub tables: &'s [Vec<u32>],
    pub stored: &'s [BitmapRef<'s>],
}

impl<S: Storage> Storage for Verifying<'_, S> {
    fn end_chunk(&self, channel: usize) -> io::Result<()> {
        self.inner.end_chunk(channel)
    }

    fn write_pages(&self, channel: usize, at: Pages, data: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_pages(channel, at, data, offset)
    }

    fn read_pages(&self, channel: usize, at: Pages, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_pages(channel, at, buf, offset)?;
        let (Some(table), Some(stored)) = (self.tables.get(at.block), self.stored.get(at.block))
        else {
            return Ok(());
        };
        for (i, page) in buf.chunks_exact(at.page_size as usize).enumerate() {
            let index = at.first + i as u64;
            if !stored.test(index) {
                continue;
            }
            let expected = table.get(index as usize).copied().unwrap_or(0);
            let actual = integrity::page_checksum(page, index);
            if actual != expected {
                let bad = BadChecksum {
                    page: index,
                    file_offset: offset + i as u64 * at.page_size,
                    expected,
                    actual,
                };
                return Err(io::Error::new(io::ErrorKind::InvalidData, bad));
            }
        }
        Ok(())
    }
}

/// Why channel descriptors could not be opened.
#[derive(Debug)]
pub(crate) enum ChannelError {
    /// `O_DIRECT` was required and the file system refused it.
    DirectRefused {
        filesystem: String,
        source: io::Error,
    },
    /// A system call failed.
    Io(IoFailure),
}

/// Descriptors of the channels of one operation, all for the same open file as `main`.
pub(crate) struct OpenedChannels {
    pub fds: Vec<OwnedFd>,
    pub direct: bool,
    pub fallback: Option<String>,
}

/// Opens `n` channel descriptors for the file `main` is open on — through `/proc/self/fd`,
/// checked to be the same inode ([`file::reopen`]), never by path — with `O_DIRECT` as `mode`
/// says. The first one proves `O_DIRECT` with one aligned transfer at `probe` (a page slot of
/// the file: read, or for a new file written with zeros before its data).
pub(crate) fn open_channels(
    main: BorrowedFd<'_>,
    path: &Path,
    write: bool,
    n: usize,
    mode: DirectIo,
    probe: Option<u64>,
) -> Result<OpenedChannels, ChannelError> {
    let base = if write {
        OFlags::WRONLY
    } else {
        OFlags::RDONLY
    };
    let open = |flags: OFlags| {
        let op = if flags.contains(OFlags::DIRECT) {
            Op::OpenDirect
        } else {
            Op::Open
        };
        file::reopen(main, path, flags).map_err(|e| (op, e))
    };
    let mut fallback = None;
    let mut direct = mode != DirectIo::Off;
    if direct {
        let refused = match open(base | OFlags::DIRECT) {
            Ok(fd) => match probe_direct(fd.as_fd(), write, probe) {
                Ok(()) => {
                    let mut fds = vec![fd];
                    for _ in 1..n {
                        let fd = open(base | OFlags::DIRECT).map_err(|(op, e)| {
                            ChannelError::Io(IoFailure::new(op, path, None, e))
                        })?;
                        fds.push(fd);
                    }
                    return Ok(OpenedChannels {
                        fds,
                        direct: true,
                        fallback: None,
                    });
                }
                Err(e) if e.raw_os_error() == Some(file::libc_einval()) => e,
                Err(e) => {
                    let op = if write { Op::WritePages } else { Op::ReadPages };
                    return Err(ChannelError::Io(IoFailure::new(op, path, probe, e)));
                }
            },
            Err((_, e)) if e.raw_os_error() == Some(file::libc_einval()) => e,
            Err((op, e)) => return Err(ChannelError::Io(IoFailure::new(op, path, None, e))),
        };
        let filesystem = file::filesystem_name(main);
        if mode == DirectIo::On {
            return Err(ChannelError::DirectRefused {
                filesystem,
                source: refused,
            });
        }
        fallback = Some(format!(
            "{filesystem} refused O_DIRECT ({refused}); using buffered I/O"
        ));
        direct = false;
    }
    let mut fds = Vec::with_capacity(n);
    for _ in 0..n {
        fds.push(
            open(base).map_err(|(op, e)| ChannelError::Io(IoFailure::new(op, path, None, e)))?,
        );
    }
    Ok(OpenedChannels {
        fds,
        direct,
        fallback,
    })
}

/// One aligned `O_DIRECT` transfer at `probe`: proves the file system accepts `O_DIRECT` I/O,
/// not only the open flag. A read that meets a hole or the end of the file proves it too.
fn probe_direct(fd: BorrowedFd<'_>, write: bool, probe: Option<u64>) -> io::Result<()> {
    let Some(offset) = probe else { return Ok(()) };
    let mut buf = AlignedBuf::new(DIRECT_IO_ALIGN);
    if write {
        file::pwritev_all(fd, buf.as_slice(), offset)
    } else {
        match file::preadv_exact(fd, buf.as_mut_slice(), offset) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            other => other,
        }
    }
}

/// A source of chunks that channels claim: the core's [`WorkQueue`] (every chunk of every
/// block) or a [`ChunkList`] (chunks picked by the operation).
pub(crate) trait Claim: Sync {
    /// The next chunk, or `None` when all are handed out or the work was stopped.
    fn claim(&self) -> Option<Chunk>;
    /// Hands out nothing more.
    fn stop(&self);
    /// How many chunks there are in all.
    fn chunks(&self) -> u64;
}

impl Claim for WorkQueue<'_> {
    fn claim(&self) -> Option<Chunk> {
        WorkQueue::claim(self)
    }
    fn stop(&self) {
        WorkQueue::stop(self)
    }
    fn chunks(&self) -> u64 {
        self.total_chunks()
    }
}

/// A fixed list of chunks, handed out in order.
pub(crate) struct ChunkList {
    chunks: Vec<Chunk>,
    next: AtomicUsize,
}

impl ChunkList {
    /// The list.
    pub fn new(chunks: Vec<Chunk>) -> Self {
        Self {
            chunks,
            next: AtomicUsize::new(0),
        }
    }
}

impl Claim for ChunkList {
    fn claim(&self) -> Option<Chunk> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.chunks.get(i).copied()
    }
    fn stop(&self) {
        self.next.store(usize::MAX / 2, Ordering::Relaxed);
    }
    fn chunks(&self) -> u64 {
        self.chunks.len() as u64
    }
}

/// The work of one operation, one chunk at a time (see [`execute`]).
pub(crate) trait Job: Sync {
    /// Per-channel buffers, made once per channel thread.
    type Scratch;
    /// The job's error.
    type Error: Send;
    /// A channel's buffers.
    fn scratch(&self) -> Self::Scratch;
    /// Does `chunk` on channel `channel`; returns the bytes of guest RAM it accounts for
    /// (progress).
    fn chunk(
        &self,
        channel: usize,
        scratch: &mut Self::Scratch,
        chunk: &Chunk,
    ) -> Result<u64, Self::Error>;
}

/// Why [`execute`] stopped before the queue was done.
#[derive(Debug)]
pub(crate) enum Stopped<E> {
    /// The first failure of any channel (the others were stopped).
    Failed(E),
    /// The cancel handle was set.
    Cancelled,
}

/// Cancellation and progress of one run of [`execute`].
#[derive(Default)]
pub(crate) struct Control<'c, 'p> {
    pub cancel: Option<&'c Cancel>,
    pub progress: Option<&'c mut ProgressFn<'p>>,
    /// Bytes of guest RAM in all, for progress.
    pub total: u64,
}

/// Marks a channel thread finished when it ends, however it ends (a panic too), so that the
/// caller never waits for a thread that is gone.
struct Finished<'a> {
    count: &'a Mutex<usize>,
    cv: &'a Condvar,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_all();
    }
}

/// Runs `job` over every chunk of `queue` with `channels` threads (at most one per chunk).
///
/// Each thread claims chunks until the queue is empty; the first failure stops the queue and
/// is returned; the calling thread waits, looking at the cancel handle and reporting progress
/// every [`POLL`], and is woken the moment the last channel ends.
pub(crate) fn execute<J: Job>(
    channels: usize,
    queue: &dyn Claim,
    job: &J,
    mut ctl: Control<'_, '_>,
) -> Result<(), Stopped<J::Error>> {
    let cancelled = || ctl.cancel.is_some_and(Cancel::is_cancelled);
    if cancelled() {
        return Err(Stopped::Cancelled);
    }
    let threads = channels
        .max(1)
        .min(usize::try_from(queue.chunks()).unwrap_or(usize::MAX));
    if threads == 0 {
        return Ok(());
    }
    let done = AtomicU64::new(0);
    let failure: Mutex<Option<J::Error>> = Mutex::new(None);
    let finished = Mutex::new(0usize);
    let cv = Condvar::new();
    let next_channel = AtomicUsize::new(0);
    let cancel = ctl.cancel;
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (done, failure, finished, cv, next) =
                (&done, &failure, &finished, &cv, &next_channel);
            s.spawn(move || {
                let _finished = Finished {
                    count: finished,
                    cv,
                };
                let channel = next.fetch_add(1, Ordering::Relaxed);
                let mut scratch = job.scratch();
                while let Some(chunk) = queue.claim() {
                    if cancel.is_some_and(Cancel::is_cancelled) {
                        queue.stop();
                        return;
                    }
                    match job.chunk(channel, &mut scratch, &chunk) {
                        Ok(bytes) => {
                            done.fetch_add(bytes, Ordering::Relaxed);
                        }
                        Err(e) => {
                            queue.stop();
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
        let mut count = finished.lock().unwrap_or_else(|p| p.into_inner());
        while *count < threads {
            count = cv
                .wait_timeout(count, POLL)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            if cancel.is_some_and(Cancel::is_cancelled) {
                queue.stop();
            }
            if let Some(cb) = ctl.progress.as_mut() {
                cb(Progress {
                    done: done.load(Ordering::Relaxed),
                    total: ctl.total,
                });
            }
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(Stopped::Failed(e));
    }
    if cancelled() {
        return Err(Stopped::Cancelled);
    }
    Ok(())
}
