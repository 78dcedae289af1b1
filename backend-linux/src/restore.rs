//! Restoring guest RAM from a mapped-ram file (ours or QEMU's).
//!
//! Everything about the file is validated first — stream, every block header, every bitmap,
//! every region against the file size and against each other, every destination region against
//! its block — and only then does the first byte land in guest memory. Channel threads claim
//! chunks from the core's [`WorkQueue`], `preadv` the stored pages straight into guest memory
//! (with `O_DIRECT` when on) and zero the pages whose bit is clear.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::{self, Chunk, ReadPolicy, WorkQueue};

use crate::error::{GuestMemoryState, IoFailure, Op, RestoreError, RestoreErrorKind};
use crate::file::{self, DirectIo};
use crate::inspect::{open_snapshot, BlockInfo, SnapshotInfo};
use crate::progress::{Cancel, Progress, ProgressFn};
use crate::save::{check_regions, default_channels, gib_per_s, open_channels, ChannelOpenError};
use crate::sys::{is_aligned, AlignedBuf};

/// One guest RAM block to restore into.
#[derive(Debug)]
pub struct RestoreRegion<'a> {
    /// The block's id string in the snapshot.
    pub name: &'a str,
    /// Destination memory, exactly the block's length.
    pub memory: &'a mut [u8],
    /// The target page size (4096 on x86-64).
    pub page_size: u64,
}

/// Default longest run of clear-bit pages read through (and then zeroed) inside one read:
/// 64 KiB of 4 KiB pages. With scattered zero pages, QEMU's loader (no gaps) splits a 1 MiB
/// chunk into reads of ~12 KiB; reading the few zero pages in between keeps reads large. On
/// the 1 GiB demo image here: 0.20 GiB/s with no gap, 0.8 GiB/s with 16 pages.
pub const DEFAULT_READ_GAP_PAGES: u64 = 16;

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Channel threads, each with its own descriptor (1..=255); need not match the save.
    pub channels: usize,
    /// `O_DIRECT` for page data.
    pub direct_io: DirectIo,
    /// Bytes before the stream (`file:PATH,offset=N`).
    pub offset: u64,
    /// The destination is known to be all zero (fresh anonymous memory, a new file): pages
    /// whose bit is clear need not be zeroed.
    pub memory_is_zeroed: bool,
    /// Bytes of guest RAM per unit of channel work, and the largest single read.
    pub chunk_bytes: u64,
    /// Longest run of clear-bit pages read inside one extent (and zeroed afterwards) instead
    /// of splitting the read.
    pub max_gap_pages: u64,
    /// Check every page read against its stored checksum, when the snapshot has checksums
    /// (see [`crate::integrity`]); a bad page fails the restore with
    /// [`RestoreErrorKind::Checksum`]. The metadata checksum is always checked, before any
    /// guest memory is written.
    pub verify_checksums: bool,
    /// Before reading a chunk, fault in its destination memory for writing with one
    /// `MADV_POPULATE_WRITE` call per chunk (in the channel threads, so in parallel) instead of
    /// one page fault per page during the reads (see [`crate::sys::populate_write`]).
    pub populate: bool,
    /// Cancellation handle.
    pub cancel: Option<Cancel>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            channels: default_channels(),
            direct_io: DirectIo::Auto,
            offset: 0,
            memory_is_zeroed: false,
            chunk_bytes: schedule::DEFAULT_MAX_IO,
            max_gap_pages: DEFAULT_READ_GAP_PAGES,
            verify_checksums: false,
            populate: true,
            cancel: None,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Blocks restored.
    pub blocks_restored: Vec<String>,
    /// Blocks of the snapshot that no region asked for.
    pub blocks_skipped: Vec<String>,
    /// Bytes of guest RAM restored.
    pub ram_bytes: u64,
    /// Bytes of page data read from the file.
    pub data_bytes: u64,
    /// Pages whose bit was set.
    pub pages_stored: u64,
    /// Pages whose bit was clear (zero in the guest).
    pub zero_pages: u64,
    /// Page-data reads issued.
    pub reads: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Whether page data went through `O_DIRECT`.
    pub direct_io: bool,
    /// Why `auto` fell back to buffered I/O, if it did.
    pub direct_io_fallback: Option<String>,
    /// Channels used.
    pub channels: usize,
    /// Machine type recorded in the snapshot.
    pub machine: String,
    /// Whether every page read was checked against its stored checksum.
    pub checksums_verified: bool,
}

impl RestoreReport {
    /// Guest RAM restored per second, in GiB/s.
    pub fn gib_per_second(&self) -> f64 {
        gib_per_s(self.ram_bytes, self.seconds)
    }
}

/// Checks channel count, regions and chunk size; returns the page size.
fn check_options(
    regions: &[RestoreRegion<'_>],
    opts: &RestoreOptions,
) -> Result<u64, RestoreError> {
    if opts.channels == 0 || opts.channels > 255 {
        return Err(RestoreErrorKind::Options(format!(
            "channels must be between 1 and 255, not {}",
            opts.channels
        ))
        .into());
    }
    let page_size = check_regions(
        regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64, r.page_size)),
    )?;
    if opts.chunk_bytes < page_size || opts.chunk_bytes % page_size != 0 {
        return Err(RestoreErrorKind::Options(format!(
            "chunk size {} is not a multiple of the page size {page_size}",
            opts.chunk_bytes
        ))
        .into());
    }
    Ok(page_size)
}

/// Restores the blocks named by `regions` from the snapshot at `path`.
///
/// Every region must name a block of the snapshot with exactly its length; blocks no region
/// names are skipped and listed in the report. On failure the error says which regions' memory
/// was written ([`GuestMemoryState`]); validation failures always leave memory untouched.
pub fn restore(
    path: &Path,
    regions: &mut [RestoreRegion<'_>],
    opts: &RestoreOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let page_size = check_options(regions, opts)?;
    let snap = open_snapshot(path, opts.offset)?;
    let mut open = |probe: Option<u64>| {
        open_channels(path, false, opts.channels, opts.direct_io, probe)
            .map(|(fds, direct, fallback)| (Channels::Owned(fds), direct, fallback))
            .map_err(|e| match e {
                ChannelOpenError::Refused(r) => RestoreErrorKind::DirectIoRefused {
                    path: path.to_path_buf(),
                    filesystem: r.filesystem,
                    source: r.source,
                },
                ChannelOpenError::Io(f) => RestoreErrorKind::Io(f),
            })
    };
    restore_engine(
        &snap.info,
        snap.fd.as_fd(),
        path,
        page_size,
        started,
        regions,
        opts,
        progress,
        &mut open,
    )
}

/// Restores from two descriptors the caller opened on the same snapshot — QEMU's fdset
/// model: `main` (buffered) is used for the stream, headers and bitmaps, `data` for page data
/// and may have `O_DIRECT` (read from its status flags). All channel threads share `data`.
pub fn restore_from_fds(
    main: BorrowedFd<'_>,
    data: BorrowedFd<'_>,
    regions: &mut [RestoreRegion<'_>],
    opts: &RestoreOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let page_size = check_options(regions, opts)?;
    let label = PathBuf::from(format!("fd {}", main.as_raw_fd()));
    let info = crate::inspect::read_structure(main, &label, opts.offset)?;
    let direct = rustix::fs::fcntl_getfl(data)
        .map(|f| f.contains(rustix::fs::OFlags::DIRECT))
        .unwrap_or(false);
    let mut open = |_probe: Option<u64>| Ok((Channels::Shared(data, opts.channels), direct, None));
    restore_engine(
        &info, main, &label, page_size, started, regions, opts, progress, &mut open,
    )
}

/// Channel descriptors: opened by path, or one caller-provided descriptor shared by all.
enum Channels<'a> {
    Owned(Vec<OwnedFd>),
    Shared(BorrowedFd<'a>, usize),
}

impl Channels<'_> {
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Channels::Owned(v) => v.iter().map(|f| f.as_fd()).collect(),
            Channels::Shared(fd, n) => vec![*fd; *n],
        }
    }
}

type OpenChannels<'o> =
    dyn FnMut(Option<u64>) -> Result<(Channels<'o>, bool, Option<String>), RestoreErrorKind> + 'o;

#[allow(clippy::too_many_arguments)]
fn restore_engine<'o>(
    info: &SnapshotInfo,
    main: BorrowedFd<'_>,
    path: &Path,
    page_size: u64,
    started: Instant,
    regions: &mut [RestoreRegion<'_>],
    opts: &RestoreOptions,
    mut progress: Option<ProgressFn<'_>>,
    open: &mut OpenChannels<'o>,
) -> Result<RestoreReport, RestoreError> {
    // Match regions to blocks before touching anything.
    let mut chosen: Vec<&BlockInfo> = Vec::with_capacity(regions.len());
    for region in regions.iter() {
        let block = info.block_for_restore(region.name)?;
        if block.layout.length != region.memory.len() as u64 {
            return Err(RestoreErrorKind::SizeMismatch {
                name: region.name.into(),
                file_length: block.layout.length,
                region_length: region.memory.len() as u64,
            }
            .into());
        }
        if block.layout.page_size != region.page_size {
            return Err(RestoreErrorKind::PageSizeMismatch {
                name: region.name.into(),
                file: block.layout.page_size,
                region: region.page_size,
            }
            .into());
        }
        chosen.push(block);
    }
    let blocks_skipped = info
        .blocks
        .iter()
        .filter(|b| !regions.iter().any(|r| r.name == b.name))
        .map(|b| b.name.clone())
        .collect();
    let layouts: Vec<BlockLayout> = chosen.iter().map(|b| b.layout).collect();
    // Page checksums of the chosen blocks, read and checked before anything is written.
    let tables = match (&info.integrity, opts.verify_checksums) {
        (Some(integrity), true) => {
            let all: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
            let mut tables = crate::integrity::read_table(main, path, integrity, &all)?;
            let mut picked = Vec::with_capacity(chosen.len());
            for block in &chosen {
                let index = info
                    .blocks
                    .iter()
                    .position(|b| b.name == block.name)
                    .unwrap_or(0);
                picked.push(std::mem::take(&mut tables[index]));
            }
            Some(picked)
        }
        _ => None,
    };
    let probe = crate::save::probe_offset(&layouts, page_size);
    let (channels, direct, fallback) = open(probe)?;
    let fds = channels.fds();
    let queue = WorkQueue::new(&layouts, opts.chunk_bytes)
        .map_err(|e| RestoreErrorKind::Options(e.to_string()))?;

    // Split every region into the chunks the queue hands out, so each channel gets exclusive
    // `&mut` access to the memory of the chunk it claimed — no unsafe sharing needed.
    let touched: Vec<AtomicBool> = regions.iter().map(|_| AtomicBool::new(false)).collect();
    let names: Vec<&str> = regions.iter().map(|r| r.name).collect();
    let slots: Vec<Vec<Mutex<Option<&mut [u8]>>>> = regions
        .iter_mut()
        .map(|r| {
            r.memory
                .chunks_mut(opts.chunk_bytes as usize)
                .map(|c| Mutex::new(Some(c)))
                .collect()
        })
        .collect();
    let policy = ReadPolicy {
        max_io: opts.chunk_bytes,
        max_gap_pages: opts.max_gap_pages,
    };
    let counters = Counters::default();
    let failure: Mutex<Option<RestoreErrorKind>> = Mutex::new(None);
    let total: u64 = layouts.iter().map(|l| l.length).sum();
    let cancelled = || opts.cancel.as_ref().is_some_and(Cancel::is_cancelled);
    let ctx = ChannelCtx {
        blocks: &chosen,
        sums: tables.as_deref(),
        slots: &slots,
        touched: &touched,
        queue: &queue,
        policy: &policy,
        counters: &counters,
        failure: &failure,
        path,
        direct,
        page_size,
        zeroed: opts.memory_is_zeroed,
        populate: opts.populate,
        chunk_bytes: opts.chunk_bytes,
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = fds
            .iter()
            .map(|fd| {
                let ctx = &ctx;
                s.spawn(move || ctx.run(*fd))
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            if cancelled() {
                queue.stop();
            }
            if let Some(cb) = progress.as_mut() {
                cb(Progress {
                    done: counters.ram_done.load(Ordering::Relaxed),
                    total,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    drop(fds);
    let memory_state = || {
        let blocks: Vec<String> = names
            .iter()
            .zip(&touched)
            .filter(|(_, t)| t.load(Ordering::Relaxed))
            .map(|(n, _)| n.to_string())
            .collect();
        if blocks.is_empty() {
            GuestMemoryState::Untouched
        } else {
            GuestMemoryState::Modified { blocks }
        }
    };
    if let Some(kind) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(RestoreError {
            kind,
            memory: memory_state(),
        });
    }
    if cancelled() {
        return Err(RestoreError {
            kind: RestoreErrorKind::Cancelled,
            memory: memory_state(),
        });
    }
    if let Some(cb) = progress.as_mut() {
        cb(Progress { done: total, total });
    }
    let pages_stored: u64 = chosen.iter().map(|b| b.pages_stored()).sum();
    let pages: u64 = layouts.iter().map(BlockLayout::num_pages).sum();
    Ok(RestoreReport {
        blocks_restored: chosen.iter().map(|b| b.name.clone()).collect(),
        blocks_skipped,
        ram_bytes: total,
        data_bytes: counters.data_bytes.load(Ordering::Relaxed),
        pages_stored,
        zero_pages: pages - pages_stored,
        reads: counters.reads.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        direct_io: direct,
        direct_io_fallback: fallback,
        channels: opts.channels,
        machine: info.machine.clone(),
        checksums_verified: tables.is_some(),
    })
}

#[derive(Default)]
struct Counters {
    ram_done: AtomicU64,
    data_bytes: AtomicU64,
    reads: AtomicU64,
}

type Slots<'m> = Vec<Vec<Mutex<Option<&'m mut [u8]>>>>;

struct ChannelCtx<'a, 'm> {
    blocks: &'a [&'a BlockInfo],
    sums: Option<&'a [Vec<u32>]>,
    slots: &'a Slots<'m>,
    touched: &'a [AtomicBool],
    queue: &'a WorkQueue<'a>,
    policy: &'a ReadPolicy,
    counters: &'a Counters,
    failure: &'a Mutex<Option<RestoreErrorKind>>,
    path: &'a Path,
    direct: bool,
    page_size: u64,
    zeroed: bool,
    populate: bool,
    chunk_bytes: u64,
}

/// Why reading an extent failed.
enum ReadFailure {
    Io(std::io::Error),
    Checksum(RestoreErrorKind),
}

impl ChannelCtx<'_, '_> {
    /// Checks the stored pages of an extent just read into `dst` against their checksums.
    fn check_pages(
        &self,
        block: usize,
        sums: &[u32],
        ext: &schedule::Extent,
        dst: &[u8],
        stored: &mapped_ram_core::bitmap::BitmapRef<'_>,
    ) -> Result<(), ReadFailure> {
        let ps = self.page_size;
        let first = ext.mem_offset / ps;
        for (i, data) in dst.chunks_exact(ps as usize).enumerate() {
            let page = first + i as u64;
            if !stored.test(page) {
                continue;
            }
            let expected = sums.get(page as usize).copied().unwrap_or(0);
            let actual = crate::integrity::page_checksum(data, page);
            if actual != expected {
                let layout = &self.blocks[block].layout;
                return Err(ReadFailure::Checksum(RestoreErrorKind::Checksum {
                    path: self.path.to_path_buf(),
                    block: self.blocks[block].name.clone(),
                    page,
                    file_offset: layout.pages_offset + page * ps,
                    expected,
                    actual,
                }));
            }
        }
        Ok(())
    }

    fn run(&self, fd: BorrowedFd<'_>) {
        let mut bounce: Option<AlignedBuf> = None;
        while let Some(chunk) = self.queue.claim() {
            if let Err(e) = self.chunk(fd, &chunk, &mut bounce) {
                self.queue.stop();
                let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
                return;
            }
        }
    }

    fn chunk(
        &self,
        fd: BorrowedFd<'_>,
        chunk: &Chunk,
        bounce: &mut Option<AlignedBuf>,
    ) -> Result<(), RestoreErrorKind> {
        let block = self.blocks[chunk.block];
        let layout = &block.layout;
        let ps = self.page_size;
        let base = chunk.start * ps;
        let index = (base / self.chunk_bytes) as usize;
        let mut guard = self.slots[chunk.block][index]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(memory) = guard.take() else {
            return Err(RestoreErrorKind::Options(format!(
                "chunk at page {} of block {:?} handed out twice",
                chunk.start, block.name
            )));
        };
        let stored = block.bitmap_ref();
        // Memory that will be written — read into, or zeroed — is faulted in at once. A chunk
        // of only clear pages in memory known to be zero is left alone (never allocated).
        if self.populate
            && (!self.zeroed
                || stored
                    .runs_in(chunk.start..chunk.end, true)
                    .next()
                    .is_some())
        {
            crate::sys::populate_write(memory);
        }
        let mut result = Ok(());
        let mut read_any = false;
        let touched = &self.touched[chunk.block];
        let pages = chunk.end - chunk.start;
        schedule::read_extents(layout, chunk.block, chunk, &stored, self.policy, |ext| {
            if result.is_err() {
                return;
            }
            touched.store(true, Ordering::Relaxed);
            read_any = true;
            let start = (ext.mem_offset - base) as usize;
            let dst = &mut memory[start..start + ext.len as usize];
            let read = if self.direct && !is_aligned(dst) {
                let buf =
                    bounce.get_or_insert_with(|| AlignedBuf::new(self.policy.max_io as usize));
                let tmp = &mut buf.as_mut_slice()[..dst.len()];
                file::preadv_exact(fd, tmp, ext.file_offset)
                    .map(|()| dst.copy_from_slice(tmp))
                    .map_err(ReadFailure::Io)
            } else {
                file::preadv_exact(fd, dst, ext.file_offset).map_err(ReadFailure::Io)
            };
            let read = read.and_then(|()| match self.sums {
                Some(sums) => self.check_pages(chunk.block, &sums[chunk.block], &ext, dst, &stored),
                None => Ok(()),
            });
            match read {
                Ok(()) => {
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .data_bytes
                        .fetch_add(ext.len, Ordering::Relaxed);
                }
                Err(ReadFailure::Io(e)) => {
                    result = Err(RestoreErrorKind::Io(IoFailure::new(
                        Op::ReadPages,
                        self.path,
                        Some(ext.file_offset),
                        e,
                    )))
                }
                Err(ReadFailure::Checksum(kind)) => result = Err(kind),
            }
        })
        .map_err(|e| RestoreErrorKind::Options(e.to_string()))?;
        result?;
        // Pages with a clear bit read as zero — also where a gap read brought in stale bytes.
        if !self.zeroed || read_any {
            for run in stored.runs_in(chunk.start..chunk.end, false) {
                touched.store(true, Ordering::Relaxed);
                let from = ((run.start - chunk.start) * ps) as usize;
                let to = ((run.end - chunk.start) * ps) as usize;
                memory[from..to].fill(0);
            }
        }
        self.counters
            .ram_done
            .fetch_add(pages * ps, Ordering::Relaxed);
        Ok(())
    }
}
