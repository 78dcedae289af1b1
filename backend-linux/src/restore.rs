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
use std::time::Instant;

use mapped_ram_core::bitmap::BitmapRef;
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::{self, Chunk, ReadPolicy, WorkQueue};

use crate::blocks::{self, Wanted};
use crate::error::{GuestMemoryState, IoFailure, Op, RestoreError, RestoreErrorKind, SaveError};
use crate::executor::{
    self, open_channels, BadChecksum, ChannelError, Control, FileChannels, Job, Pages, Stopped,
    Storage, Verifying,
};
use crate::file::DirectIo;
use crate::inspect::{open_snapshot, BlockInfo, SnapshotInfo};
use crate::progress::{Cancel, Progress, ProgressFn};
use crate::save::{default_channels, gib_per_s};

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
    /// Also read the snapshot's device state (the bytes after the RAM END section) into
    /// [`RestoreReport::device_state`] — from the same open file as the pages, before any page
    /// is read, so RAM and device state always come from one snapshot.
    pub read_device_state: bool,
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
            read_device_state: false,
            cancel: None,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// The device state, when [`RestoreOptions::read_device_state`] asked for it.
    pub device_state: Option<Vec<u8>>,
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
    check_specs(
        regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64, r.page_size)),
        opts,
    )
}

fn check_specs<'n>(
    specs: impl Iterator<Item = (&'n str, u64, u64)>,
    opts: &RestoreOptions,
) -> Result<u64, RestoreError> {
    crate::plan::check_options(opts.channels, opts.chunk_bytes, specs).map_err(|e| match e {
        SaveError::Region(r) => RestoreErrorKind::Region(r).into(),
        SaveError::Options(o) => RestoreErrorKind::Options(o).into(),
        other => RestoreErrorKind::Internal(other.to_string()).into(),
    })
}

/// Restores the blocks named by `regions` from the snapshot at `path`.
///
/// Every region must name a block of the snapshot with exactly its length; blocks no region
/// names are skipped and listed in the report. On failure the error says which regions' memory
/// was written ([`GuestMemoryState`]); validation failures always leave memory untouched.
/// The snapshot is opened once: every channel reads the same file, even if another save
/// renames a new snapshot over `path` meanwhile.
pub fn restore(
    path: &Path,
    regions: &mut [RestoreRegion<'_>],
    opts: &RestoreOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<RestoreReport, RestoreError> {
    restore_to(path, Dest::Slices(regions), opts, progress)
}

/// [`restore()`] into either kind of destination.
pub(crate) fn restore_to(
    path: &Path,
    dest: Dest<'_, '_>,
    opts: &RestoreOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let page_size = match &dest {
        Dest::Slices(regions) => check_options(regions, opts)?,
        Dest::CopyOut(specs, _) => check_specs(specs.iter().copied(), opts)?,
    };
    let snap = open_snapshot(path, opts.offset)?;
    let main = snap.fd.as_fd();
    let mut open = |probe: Option<u64>| {
        open_channels(main, path, false, opts.channels, opts.direct_io, probe)
            .map(|c| (Channels::Owned(c.fds), c.direct, c.fallback))
            .map_err(|e| match e {
                ChannelError::DirectRefused { filesystem, source } => {
                    RestoreErrorKind::DirectIoRefused {
                        path: path.to_path_buf(),
                        filesystem,
                        source,
                    }
                }
                ChannelError::Io(f) => RestoreErrorKind::Io(f),
            })
    };
    run_restore(
        &snap.info, main, path, page_size, started, dest, opts, progress, &mut open,
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
    run_restore(
        &info,
        main,
        &label,
        page_size,
        started,
        Dest::Slices(regions),
        opts,
        progress,
        &mut open,
    )
}

/// Channel descriptors: derived from the main one, or one caller-provided descriptor shared
/// by all.
enum Channels<'a> {
    Owned(Vec<OwnedFd>),
    Shared(BorrowedFd<'a>, usize),
    /// Not descriptors: a storage of its own (an object store).
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    Storage(&'a dyn Storage),
}

impl Channels<'_> {
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Channels::Owned(v) => v.iter().map(|f| f.as_fd()).collect(),
            Channels::Shared(fd, n) => vec![*fd; *n],
            Channels::Storage(_) => Vec::new(),
        }
    }
}

/// Restores `regions` from the snapshot `info` whose metadata `main` holds and whose pages
/// `storage` reads (an object store): the same checks, job and report as [`restore()`].
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
pub(crate) fn restore_from_storage(
    info: &SnapshotInfo,
    main: BorrowedFd<'_>,
    label: &Path,
    storage: &dyn Storage,
    regions: &mut [RestoreRegion<'_>],
    opts: &RestoreOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let page_size = check_options(regions, opts)?;
    let mut open = |_probe: Option<u64>| Ok((Channels::Storage(storage), false, None));
    run_restore(
        info,
        main,
        label,
        page_size,
        started,
        Dest::Slices(regions),
        opts,
        progress,
        &mut open,
    )
}

type OpenChannels<'o> =
    dyn FnMut(Option<u64>) -> Result<(Channels<'o>, bool, Option<String>), RestoreErrorKind> + 'o;

/// Where restored pages go: the caller's `&mut` memory, or a function that copies a chunk
/// out (memory the library may only write through the owner's accessors, e.g. `vm-memory`'s
/// volatile `write_slice`).
pub(crate) enum Dest<'r, 'm> {
    Slices(&'r mut [RestoreRegion<'m>]),
    /// (name, length, page size) per region, and the function that writes `bytes` at `offset`
    /// of region `region` (used by the `vm-memory` integration).
    #[cfg_attr(not(feature = "vm-memory"), allow(dead_code))]
    CopyOut(Vec<(&'r str, u64, u64)>, &'r WriteOut<'r>),
}

/// Writes `bytes` at `offset` of region `region` (see [`Dest::CopyOut`]).
pub(crate) type WriteOut<'r> = dyn Fn(usize, u64, &[u8]) -> std::io::Result<()> + Sync + 'r;

#[allow(clippy::too_many_arguments)]
fn run_restore<'o>(
    info: &SnapshotInfo,
    main: BorrowedFd<'_>,
    path: &Path,
    page_size: u64,
    started: Instant,
    dest: Dest<'_, '_>,
    opts: &RestoreOptions,
    mut progress: Option<ProgressFn<'_>>,
    open: &mut OpenChannels<'o>,
) -> Result<RestoreReport, RestoreError> {
    let specs: Vec<(&str, u64, u64)> = match &dest {
        Dest::Slices(regions) => regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64, r.page_size))
            .collect(),
        Dest::CopyOut(specs, _) => specs.clone(),
    };
    // Match regions to blocks before touching anything.
    let index = blocks::find_all(
        &info.blocks,
        specs.iter().map(|&(name, length, page_size)| Wanted {
            name,
            length: Some(length),
            page_size: Some(page_size),
            needs_pages: false,
        }),
    )
    .map_err(RestoreErrorKind::from)?;
    let chosen: Vec<&BlockInfo> = index.iter().map(|&i| &info.blocks[i]).collect();
    let blocks_skipped = info
        .blocks
        .iter()
        .enumerate()
        .filter(|(i, _)| !index.contains(i))
        .map(|(_, b)| b.name.clone())
        .collect();
    let layouts: Vec<BlockLayout> = chosen.iter().map(|b| b.layout).collect();
    // Page checksums of the chosen blocks, read and checked before anything is written.
    let tables = match (&info.integrity, opts.verify_checksums) {
        (Some(integrity), true) => {
            let all: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
            let mut tables = crate::integrity::read_table(main, path, integrity, &all)?;
            Some(
                index
                    .iter()
                    .map(|&i| std::mem::take(&mut tables[i]))
                    .collect::<Vec<_>>(),
            )
        }
        _ => None,
    };
    let device_state = if opts.read_device_state {
        Some(crate::inspect::device_state_of(main, path, info)?)
    } else {
        None
    };
    let probe = crate::writer::probe_offset(&layouts, page_size);
    let (channels, direct, fallback) = open(probe)?;
    let files = FileChannels::new(channels.fds(), direct, opts.chunk_bytes);
    let base: &dyn Storage = match &channels {
        Channels::Storage(s) => *s,
        _ => &files,
    };
    let queue = WorkQueue::new(&layouts, opts.chunk_bytes)
        .map_err(|e| RestoreErrorKind::Internal(e.to_string()))?;

    // Split every region into the chunks the queue hands out, so each channel gets exclusive
    // `&mut` access to the memory of the chunk it claimed — no unsafe sharing needed.
    let touched: Vec<AtomicBool> = specs.iter().map(|_| AtomicBool::new(false)).collect();
    let names: Vec<&str> = specs.iter().map(|s| s.0).collect();
    let (slots, write_out): (Slots<'_>, Option<&WriteOut<'_>>) = match dest {
        Dest::Slices(regions) => (
            regions
                .iter_mut()
                .map(|r| {
                    r.memory
                        .chunks_mut(opts.chunk_bytes as usize)
                        .map(|c| Mutex::new(Some(c)))
                        .collect()
                })
                .collect(),
            None,
        ),
        Dest::CopyOut(_, f) => (Vec::new(), Some(f)),
    };
    let stored: Vec<BitmapRef<'_>> = chosen.iter().map(|b| b.bitmap_ref()).collect();
    let policy = ReadPolicy {
        max_io: opts.chunk_bytes,
        max_gap_pages: opts.max_gap_pages,
    };
    let counters = Counters::default();
    let total: u64 = layouts.iter().map(|l| l.length).sum();
    let verifying = tables.as_ref().map(|tables| Verifying {
        inner: base,
        tables,
        stored: &stored,
    });
    let storage: &dyn Storage = match &verifying {
        Some(v) => v,
        None => base,
    };
    let job = RestoreJob {
        blocks: &chosen,
        stored: &stored,
        storage,
        slots: &slots,
        write_out,
        touched: &touched,
        policy: &policy,
        counters: &counters,
        path,
        zeroed: opts.memory_is_zeroed,
        populate: opts.populate,
        chunk_bytes: opts.chunk_bytes,
    };
    let ctl = Control {
        cancel: opts.cancel.as_ref(),
        progress: progress.as_mut(),
        total,
    };
    let result = executor::execute(opts.channels, &queue, &job, ctl);
    drop(channels);
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
    let kind = match result {
        Ok(()) => None,
        Err(Stopped::Failed(kind)) => Some(kind),
        Err(Stopped::Cancelled) => Some(RestoreErrorKind::Cancelled),
    };
    if let Some(kind) = kind {
        return Err(RestoreError {
            kind,
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
        device_state,
    })
}

#[derive(Default)]
struct Counters {
    data_bytes: AtomicU64,
    reads: AtomicU64,
}

type Slots<'m> = Vec<Vec<Mutex<Option<&'m mut [u8]>>>>;

/// The channel work of a restore: a chunk's stored pages, from the file into guest memory.
struct RestoreJob<'a, 'm> {
    blocks: &'a [&'a BlockInfo],
    stored: &'a [BitmapRef<'a>],
    storage: &'a dyn Storage,
    slots: &'a Slots<'m>,
    write_out: Option<&'a WriteOut<'a>>,
    touched: &'a [AtomicBool],
    policy: &'a ReadPolicy,
    counters: &'a Counters,
    path: &'a Path,
    zeroed: bool,
    populate: bool,
    chunk_bytes: u64,
}

impl Job for RestoreJob<'_, '_> {
    type Scratch = Vec<u8>;
    type Error = RestoreErrorKind;

    fn scratch(&self) -> Vec<u8> {
        match self.write_out {
            // Aligned enough for O_DIRECT through the storage's bounce buffer either way.
            Some(_) => vec![0u8; self.chunk_bytes as usize],
            None => Vec::new(),
        }
    }

    fn chunk(
        &self,
        ch: usize,
        scratch: &mut Vec<u8>,
        chunk: &Chunk,
    ) -> Result<u64, RestoreErrorKind> {
        if let Some(write_out) = self.write_out {
            // The chunk is assembled in the channel's buffer (stored pages read, clear pages
            // zero), then written out through the owner's accessor in one call.
            let ps = self.blocks[chunk.block].layout.page_size;
            let len = (chunk.pages() * ps) as usize;
            let buf = &mut scratch[..len];
            self.fill(ch, chunk, buf, false)?;
            let offset = chunk.start * ps;
            self.touched[chunk.block].store(true, Ordering::Relaxed);
            return write_out(chunk.block, offset, buf)
                .map(|()| len as u64)
                .map_err(|e| {
                    RestoreErrorKind::Io(IoFailure::new(
                        Op::WriteMemory,
                        "guest memory",
                        Some(offset),
                        e,
                    ))
                });
        }
        let block = self.blocks[chunk.block];
        let layout = &block.layout;
        let ps = layout.page_size;
        let base = chunk.start * ps;
        let index = (base / self.chunk_bytes) as usize;
        let mut guard = self.slots[chunk.block][index]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(memory) = guard.take() else {
            return Err(RestoreErrorKind::Internal(format!(
                "chunk at page {} of block {:?} handed out twice",
                chunk.start, block.name
            )));
        };
        self.fill(ch, chunk, memory, self.zeroed)
    }
}

impl RestoreJob<'_, '_> {
    /// Reads the stored pages of `chunk` into `memory` (the chunk's bytes) and zeroes its
    /// clear pages (all of them unless `zeroed` says the memory is zero already).
    fn fill(
        &self,
        ch: usize,
        chunk: &Chunk,
        memory: &mut [u8],
        zeroed: bool,
    ) -> Result<u64, RestoreErrorKind> {
        let block = self.blocks[chunk.block];
        let layout = &block.layout;
        let ps = layout.page_size;
        let base = chunk.start * ps;
        let stored = &self.stored[chunk.block];
        // Memory that will be written — read into, or zeroed — is faulted in at once. A chunk
        // of only clear pages in memory known to be zero is left alone (never allocated).
        if self.populate
            && (!zeroed
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
        schedule::read_extents(layout, chunk.block, chunk, stored, self.policy, |ext| {
            if result.is_err() {
                return;
            }
            touched.store(true, Ordering::Relaxed);
            read_any = true;
            let start = (ext.mem_offset - base) as usize;
            let dst = &mut memory[start..start + ext.len as usize];
            let pages = Pages {
                block: chunk.block,
                first: ext.first_page,
                page_size: ps,
            };
            match self.storage.read_pages(ch, pages, dst, ext.file_offset) {
                Ok(()) => {
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .data_bytes
                        .fetch_add(ext.len, Ordering::Relaxed);
                }
                Err(e) => {
                    result = Err(match BadChecksum::from_io(&e) {
                        Some(bad) => RestoreErrorKind::Checksum {
                            path: self.path.to_path_buf(),
                            block: block.name.clone(),
                            page: bad.page,
                            file_offset: bad.file_offset,
                            expected: bad.expected,
                            actual: bad.actual,
                        },
                        None => RestoreErrorKind::Io(IoFailure::new(
                            Op::ReadPages,
                            self.path,
                            Some(ext.file_offset),
                            e,
                        )),
                    })
                }
            }
        })
        .map_err(|e| RestoreErrorKind::Internal(e.to_string()))?;
        result?;
        // Pages with a clear bit read as zero — also where a gap read brought in stale bytes.
        if !zeroed || read_any {
            for run in stored.runs_in(chunk.start..chunk.end, false) {
                touched.store(true, Ordering::Relaxed);
                let from = ((run.start - chunk.start) * ps) as usize;
                let to = ((run.end - chunk.start) * ps) as usize;
                memory[from..to].fill(0);
            }
        }
        Ok(chunk.pages() * ps)
    }
}
