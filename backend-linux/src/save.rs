//! Saving guest RAM to a mapped-ram file.
//!
//! The file is written to a temporary file in the target's directory and renamed over the
//! target only once it is complete and synced, so a failed, cancelled or killed save never
//! costs the previous snapshot.
//!
//! Descriptors (see the format notes in the crate docs):
//! * the *main* descriptor, buffered, carries the stream: preamble, RAM section start, block
//!   records and headers, the bitmaps (written last, as QEMU does) and the tail;
//! * one descriptor per channel, opened separately by path with `O_DIRECT` when direct I/O is
//!   on. Channel threads claim 1 MiB chunks from the core's [`WorkQueue`], detect zero pages
//!   themselves and `pwritev` large extents straight from guest memory.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mapped_ram_core::bitmap::{self, AtomicBitmap, Bitmap};
use mapped_ram_core::caps::Capabilities;
use mapped_ram_core::layout::{BlockLayout, Planner};
use mapped_ram_core::schedule::{self, Chunk, WorkQueue, WritePolicy};
use mapped_ram_core::stream::{self, Config};
use rustix::fs::OFlags;

use crate::error::{IoFailure, Op, RegionError, SaveError};
use crate::file::{self, DirectIo, VecSink};
use crate::integrity;
use crate::progress::{Cancel, Progress, ProgressFn};
use crate::sys::{is_aligned, AlignedBuf};
use crate::zero;

/// The RAM section's id in files we write (QEMU uses 1; 0 is rejected by its loader).
pub const RAM_SECTION_ID: u32 = 1;

/// One guest RAM block to save.
#[derive(Debug, Clone, Copy)]
pub struct SaveRegion<'a> {
    /// The block's id string (QEMU's `idstr`, e.g. `pc.ram`, or the memory backend's id).
    pub name: &'a str,
    /// The block's memory.
    pub memory: &'a [u8],
    /// The target page size (4096 on x86-64).
    pub page_size: u64,
}

/// What to do with pages that are entirely zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroPages {
    /// Detect them in the channel threads and leave their bitmap bit clear (QEMU's default).
    /// Short runs of zero pages between data pages are still written, as zeros with a clear
    /// bit, when that keeps writes large (see [`WritePolicy`]).
    #[default]
    Detect,
    /// Write every page and set every bit (QEMU's `zero-page-detection=none`).
    Write,
}

impl std::str::FromStr for ZeroPages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "detect" => Ok(ZeroPages::Detect),
            "write" => Ok(ZeroPages::Write),
            _ => Err(format!("zero-pages must be detect or write, not {s:?}")),
        }
    }
}

/// How to save.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Channel threads, each with its own descriptor (1..=255).
    pub channels: usize,
    /// `O_DIRECT` for page data.
    pub direct_io: DirectIo,
    /// Zero-page handling.
    pub zero_pages: ZeroPages,
    /// Machine type written in the configuration section; QEMU refuses to load a file whose
    /// machine differs from the destination's.
    pub machine: String,
    /// Bytes written after the RAM END section instead of a bare `QEMU_VM_EOF`: the device
    /// state of a QEMU file of the same guest shape (see [`crate::inspect::read_device_state`]).
    pub device_state: Option<Vec<u8>>,
    /// Bytes before the stream (`file:PATH,offset=N`); kept from the existing target, zero in
    /// a new file.
    pub offset: u64,
    /// `fdatasync` the file and `fsync` its directory (QEMU never syncs; we do by default).
    pub fsync: bool,
    /// Bytes of guest RAM per unit of channel work, and the largest single write.
    pub chunk_bytes: u64,
    /// Longest run of zero pages written inside an extent instead of splitting the write.
    pub max_gap_pages: u64,
    /// Store a CRC-32C of every stored page and of the file's metadata where QEMU does not
    /// look (see [`crate::integrity`]); `verify` then checks every page without the RAM.
    /// On by default: it costs less than 5 % of the save time (RELIABILITY.md).
    pub checksums: bool,
    /// With `O_DIRECT`, allocate each block's page region (`fallocate(2)`) before the channels
    /// write, then punch the runs of at least [`PUNCH_MIN_PAGES`] zero pages back out.
    ///
    /// On ext4 an `O_DIRECT` write into a hole allocates blocks and so takes the inode lock
    /// exclusively: the channels' writes queue behind each other. Into allocated (unwritten)
    /// space they run in parallel. Measured on this project's ext4 development disk: 10–25 %
    /// faster saves (BENCHMARKS.md). The file stays about as sparse as without it: zero runs
    /// shorter than [`PUNCH_MIN_PAGES`] outside written extents stay allocated (ext4 even
    /// writes zeros into such small unwritten gaps itself), which costs a little disk space
    /// (+0.3 % for a guest with 25 % scattered zero pages) and makes them data, not holes, to
    /// `SEEK_HOLE`.
    ///
    /// Skipped for buffered writes, on tmpfs, where the file system cannot allocate, and with
    /// [`max_gap_pages`](Self::max_gap_pages) `0` — the policy that asks for a hole under every
    /// zero page (so that a [lazy restore](crate::lazy) maps it without reading it).
    pub preallocate: bool,
    /// Cancellation handle.
    pub cancel: Option<Cancel>,
}

/// Shortest run of zero pages that [`SaveOptions::preallocate`] punches back out of the file.
pub const PUNCH_MIN_PAGES: u64 = 16;

impl Default for SaveOptions {
    fn default() -> Self {
        let policy = WritePolicy::default();
        Self {
            channels: default_channels(),
            direct_io: DirectIo::Auto,
            zero_pages: ZeroPages::Detect,
            machine: "none".into(),
            device_state: None,
            offset: 0,
            fsync: true,
            chunk_bytes: schedule::DEFAULT_MAX_IO,
            max_gap_pages: policy.max_gap_pages,
            checksums: true,
            preallocate: true,
            cancel: None,
        }
    }
}

/// The default channel count: 8, whatever the number of CPUs.
///
/// Channel threads spend most of their time waiting for the disk, so even a 2-CPU host gains
/// from many of them: the disk then has several 1 MiB requests in flight. Measured on the
/// 2-CPU development machine (BENCHMARKS.md, 2 GiB images, `O_DIRECT`): 8 channels saved
/// 5–30 % and restored 15–17 % faster than 4, and 4 faster than 2, at 2.6 MiB of memory
/// besides the guest's.
pub fn default_channels() -> usize {
    8
}

/// What a save did.
#[derive(Debug, Clone)]
pub struct SaveReport {
    /// The snapshot written.
    pub path: PathBuf,
    /// Bytes of guest RAM saved.
    pub ram_bytes: u64,
    /// Bytes of page data written (data pages plus zero pages inside extents).
    pub data_bytes: u64,
    /// Pages in all blocks.
    pub pages: u64,
    /// Pages stored (bitmap bit set).
    pub pages_stored: u64,
    /// Zero pages (bit clear).
    pub zero_pages: u64,
    /// Page-data writes issued.
    pub writes: u64,
    /// Wall-clock seconds, sync included.
    pub seconds: f64,
    /// Whether page data went through `O_DIRECT`.
    pub direct_io: bool,
    /// Why `auto` fell back to buffered I/O, if it did.
    pub direct_io_fallback: Option<String>,
    /// Channels used.
    pub channels: usize,
    /// Size of the snapshot file.
    pub file_size: u64,
    /// Stale temporary files of earlier, interrupted saves that were removed.
    pub stale_temporaries_removed: Vec<PathBuf>,
    /// Whether page checksums were stored ([`SaveOptions::checksums`], and room for the
    /// anchor record, which every block layout we write has unless its bitmap ends within
    /// 64 bytes of a 1 MiB boundary).
    pub checksums: bool,
}

impl SaveReport {
    /// Guest RAM saved per second, in GiB/s.
    pub fn gib_per_second(&self) -> f64 {
        gib_per_s(self.ram_bytes, self.seconds)
    }
}

pub(crate) fn gib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / f64::from(1u32 << 30)
    } else {
        0.0
    }
}

/// Checks region names, page sizes and lengths; returns the common page size.
pub(crate) fn check_regions<'n>(
    names_lengths: impl Iterator<Item = (&'n str, u64, u64)>,
) -> Result<u64, RegionError> {
    let mut seen = std::collections::HashSet::new();
    let mut common = None;
    for (name, length, page_size) in names_lengths {
        if name.is_empty() || name.len() > 255 {
            return Err(RegionError::BadName { name: name.into() });
        }
        if !seen.insert(name) {
            return Err(RegionError::Duplicate { name: name.into() });
        }
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(RegionError::BadPageSize {
                name: name.into(),
                page_size,
            });
        }
        if length % page_size != 0 {
            return Err(RegionError::NotPageMultiple {
                name: name.into(),
                length,
                page_size,
            });
        }
        match common {
            None => common = Some(page_size),
            Some(expected) if expected != page_size => {
                return Err(RegionError::MixedPageSizes {
                    name: name.into(),
                    page_size,
                    expected,
                })
            }
            Some(_) => {}
        }
    }
    Ok(common.unwrap_or(4096))
}

/// The file's structure, computed before anything is written.
pub(crate) struct Plan {
    pub head: Vec<u8>,
    pub layouts: Vec<BlockLayout>,
    pub records: Vec<Vec<u8>>,
    pub device_stream_start: u64,
    pub tail: Vec<u8>,
    /// Where the page checksums go, when they are stored (see [`crate::integrity`]).
    pub integrity: Option<PlannedIntegrity>,
}

/// Places of the checksum records and table in a planned file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlannedIntegrity {
    pub anchor_offset: u64,
    pub table_offset: u64,
    pub table_len: u64,
}

impl Plan {
    /// End of the QEMU stream (after the tail): where the checksum table goes.
    pub fn stream_end(&self) -> u64 {
        self.device_stream_start
            .saturating_add(self.tail.len() as u64)
    }

    pub fn file_size(&self) -> u64 {
        match &self.integrity {
            Some(i) => i
                .table_offset
                .saturating_add(i.table_len)
                .saturating_add(integrity::RECORD_LEN),
            None => self.stream_end(),
        }
    }

    /// Plans page checksums for this file, if its blocks leave room for the anchor.
    pub fn with_checksums(mut self) -> Result<Self, SaveError> {
        let overflow = || mapped_ram_core::layout::LayoutError::Overflow {
            what: "checksum table",
        };
        let Some(anchor_offset) = integrity::anchor_offset(&self.layouts) else {
            return Ok(self);
        };
        let table_len = integrity::table_len(&self.layouts).ok_or_else(overflow)?;
        let table_offset = self.stream_end();
        table_offset
            .checked_add(table_len)
            .and_then(|e| e.checked_add(integrity::RECORD_LEN))
            .ok_or_else(overflow)?;
        self.integrity = Some(PlannedIntegrity {
            anchor_offset,
            table_offset,
            table_len,
        });
        Ok(self)
    }
}

/// Lays out the file: stream head at `offset`, block records, tail.
pub(crate) fn plan(
    blocks: &[(&str, u64)],
    page_size: u64,
    machine: &str,
    offset: u64,
    device_state: Option<&[u8]>,
) -> Result<Plan, SaveError> {
    let config = Config::new(machine, Capabilities::MAPPED_RAM)
        .map_err(|e| SaveError::Options(format!("machine name {machine:?}: {e}")))?;
    let mut planner = Planner::new(0, page_size, false)?;
    for (name, length) in blocks {
        planner.push(name.len(), *length)?;
    }
    let total = planner.total_ram();
    let mut head = VecSink::default();
    let infallible = |r: Result<(), std::convert::Infallible>| match r {
        Ok(()) => (),
        Err(never) => match never {},
    };
    infallible(stream::encode_preamble(&config, &mut head));
    infallible(stream::encode_ram_start(RAM_SECTION_ID, total, &mut head));
    let first_record = offset.checked_add(head.0.len() as u64).ok_or(
        mapped_ram_core::layout::LayoutError::Overflow {
            what: "first block record",
        },
    )?;
    let mut planner = Planner::new(first_record, page_size, false)?;
    let mut layouts = Vec::with_capacity(blocks.len());
    let mut records = Vec::with_capacity(blocks.len());
    for (name, length) in blocks {
        let layout = planner.push(name.len(), *length)?;
        let mut rec = VecSink::default();
        infallible(stream::encode_block_record(
            name,
            *length,
            None,
            &layout.header(),
            &mut rec,
        ));
        records.push(rec.0);
        layouts.push(layout);
    }
    let device_stream_start = planner.cursor();
    let mut tail = VecSink::default();
    infallible(stream::encode_eos_footer(RAM_SECTION_ID, &mut tail));
    infallible(stream::encode_ram_end(RAM_SECTION_ID, &mut tail));
    match device_state {
        Some(bytes) => tail.0.extend_from_slice(bytes),
        None => infallible(stream::encode_eof(&mut tail)),
    }
    Ok(Plan {
        head: head.0,
        layouts,
        records,
        device_stream_start,
        tail: tail.0,
        integrity: None,
    })
}

/// Removes the temporary file unless the save committed it.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    pub(crate) committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

const TEMP_MARK: &str = ".mapped-ram-tmp.";

pub(crate) fn temp_name(target: &Path) -> (PathBuf, String) {
    let dir = parent_dir(target);
    let base = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let prefix = format!(".{base}{TEMP_MARK}");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (
        dir.join(format!("{prefix}{}.{nanos:08x}", std::process::id())),
        prefix,
    )
}

pub(crate) fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes temporary files left by saves of the same target whose process is gone.
/// Creates the temporary file a save writes beside `target` (`O_EXCL`, with `mode`), after
/// removing the temporaries that earlier, killed saves of `target` left behind. Returns the
/// guard that removes the file unless committed, its descriptor, and the stale files removed.
pub(crate) fn create_temp(
    target: &Path,
    mode: u32,
) -> Result<(TempFile, OwnedFd, Vec<PathBuf>), IoFailure> {
    let (path, prefix) = temp_name(target);
    let stale = remove_stale_temporaries(target, &prefix);
    let fd = file::open(&path, OFlags::RDWR | OFlags::CREATE | OFlags::EXCL, mode)
        .map_err(|e| IoFailure::new(Op::Open, &path, None, e))?;
    Ok((
        TempFile {
            path,
            committed: false,
        },
        fd,
        stale,
    ))
}

/// Allocates every block's page region ([`SaveOptions::preallocate`]); `false` where the file
/// system cannot (then nothing more is tried). A failure comes with the offset it was at.
fn allocate_page_regions(
    fd: BorrowedFd<'_>,
    layouts: &[BlockLayout],
) -> Result<bool, (u64, std::io::Error)> {
    for l in layouts.iter().filter(|l| !l.is_empty()) {
        let len = l.pages_end() - l.pages_offset;
        if !file::allocate(fd, l.pages_offset, len).map_err(|e| (l.pages_offset, e))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where `O_DIRECT` is probed: the first page of the first block that has a page region.
pub(crate) fn probe_offset(layouts: &[BlockLayout], page_size: u64) -> Option<u64> {
    layouts
        .iter()
        .find(|l| !l.is_empty() && l.length >= page_size)
        .map(|l| l.pages_offset)
}

pub(crate) fn remove_stale_temporaries(target: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent_dir(target)) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid: Option<i32> = rest.split('.').next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Checks the options that every kind of save shares (channel count, chunk size) against the
/// regions, given as (name, length, page size); returns their common page size.
pub(crate) fn check_options<'n>(
    opts: &SaveOptions,
    regions: impl Iterator<Item = (&'n str, u64, u64)>,
) -> Result<u64, SaveError> {
    if opts.channels == 0 || opts.channels > 255 {
        return Err(SaveError::Options(format!(
            "channels must be between 1 and 255, not {}",
            opts.channels
        )));
    }
    let page_size = check_regions(regions)?;
    if opts.chunk_bytes < page_size || opts.chunk_bytes % page_size != 0 {
        return Err(SaveError::Options(format!(
            "chunk size {} is not a multiple of the page size {page_size}",
            opts.chunk_bytes
        )));
    }
    Ok(page_size)
}

/// Checks the options and regions and lays out the file; returns the plan and page size.
fn prepare(regions: &[SaveRegion<'_>], opts: &SaveOptions) -> Result<(Plan, u64), SaveError> {
    let blocks: Vec<(&str, u64, u64)> = regions
        .iter()
        .map(|r| (r.name, r.memory.len() as u64, r.page_size))
        .collect();
    plan_blocks(&blocks, opts, opts.device_state.as_deref())
}

/// [`check_options`] for `blocks` (name, length, page size), then the file's layout with
/// `device_state` after RAM, and page checksums if the options ask for them; returns the plan
/// and the page size.
pub(crate) fn plan_blocks(
    blocks: &[(&str, u64, u64)],
    opts: &SaveOptions,
    device_state: Option<&[u8]>,
) -> Result<(Plan, u64), SaveError> {
    let page_size = check_options(opts, blocks.iter().copied())?;
    let names_lengths: Vec<(&str, u64)> = blocks.iter().map(|&(n, l, _)| (n, l)).collect();
    let mut plan = plan(
        &names_lengths,
        page_size,
        &opts.machine,
        opts.offset,
        device_state,
    )?;
    if opts.checksums {
        plan = plan.with_checksums()?;
    }
    Ok((plan, page_size))
}

/// Saves `regions` to `path` in QEMU's mapped-ram format.
///
/// The snapshot is written to a temporary file beside `path` (a buffered main descriptor for
/// the stream, headers and bitmaps, plus one descriptor per channel opened by path, with
/// `O_DIRECT` as [`SaveOptions::direct_io`] says), synced, and renamed over `path`; the
/// directory is synced too. Until the rename the previous file at `path` is untouched.
///
/// ```no_run
/// use mapped_ram_linux::{save, SaveOptions, SaveRegion};
///
/// let ram = vec![0u8; 64 << 20];
/// let regions = [SaveRegion { name: "pc.ram", memory: &ram, page_size: 4096 }];
/// let report = save("/var/lib/vm/guest.mr".as_ref(), &regions, &SaveOptions::default(), None)?;
/// println!("{:.2} GiB/s", report.gib_per_second());
/// # Ok::<(), mapped_ram_linux::SaveError>(())
/// ```
pub fn save(
    path: &Path,
    regions: &[SaveRegion<'_>],
    opts: &SaveOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    let (plan, page_size) = prepare(regions, opts)?;
    let (mut temp, main, stale_temporaries_removed) = create_temp(path, 0o600)?;
    let tmp_path = temp.path.clone();
    // The prefix of `file:PATH,offset=N` belongs to someone else: keep the target's bytes.
    if opts.offset > 0 {
        copy_prefix(path, main.as_fd(), opts.offset, &tmp_path)?;
    }
    let probe = probe_offset(&plan.layouts, page_size);
    let (fds, direct, fallback) =
        open_channels(&tmp_path, true, opts.channels, opts.direct_io, probe)
            .map_err(|e| e.into_save_error(path))?;
    let channel_fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut report = write_snapshot(
        main.as_fd(),
        &channel_fds,
        direct,
        &tmp_path,
        &plan,
        page_size,
        regions,
        opts,
        progress,
    )?;
    drop(fds);
    drop(main);
    if opts.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
        return Err(SaveError::Cancelled);
    }
    file::rename(&tmp_path, path)
        .map_err(|e| SaveError::Io(IoFailure::new(Op::Rename, path, None, e)))?;
    temp.committed = true;
    if opts.fsync {
        let dir = parent_dir(path);
        file::fsync_dir(&dir)
            .map_err(|e| SaveError::Io(IoFailure::new(Op::SyncDir, dir, None, e)))?;
    }
    report.path = path.to_path_buf();
    report.direct_io_fallback = fallback;
    report.stale_temporaries_removed = stale_temporaries_removed;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Saves `regions` through two descriptors the caller opened on the same file — QEMU's fdset
/// model: `main` (buffered, writable) carries the stream, headers and bitmaps; `data` carries
/// the page data and may have `O_DIRECT` (whether it does is read from its status flags).
/// They must be opened separately, not `dup`ed: `dup`ed descriptors share their status flags.
///
/// The file is written in place: it is truncated to [`SaveOptions::offset`] first (leaving
/// the prefix) and its previous contents are lost. All channel threads share `data`.
pub fn save_to_fds(
    main: BorrowedFd<'_>,
    data: BorrowedFd<'_>,
    regions: &[SaveRegion<'_>],
    opts: &SaveOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    let (plan, page_size) = prepare(regions, opts)?;
    let label = PathBuf::from(format!("fd {}", main.as_raw_fd()));
    let direct = rustix::fs::fcntl_getfl(data)
        .map(|f| f.contains(OFlags::DIRECT))
        .unwrap_or(false);
    file::set_len(main, opts.offset)
        .map_err(|e| IoFailure::new(Op::Truncate, &label, Some(opts.offset), e))?;
    let channel_fds = vec![data; opts.channels];
    let mut report = write_snapshot(
        main,
        &channel_fds,
        direct,
        &label,
        &plan,
        page_size,
        regions,
        opts,
        progress,
    )?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The engine: writes the stream head, block records and tail through `main`, runs one
/// channel thread per entry of `channel_fds`, writes the bitmaps and syncs.
#[allow(clippy::too_many_arguments)]
fn write_snapshot(
    main: BorrowedFd<'_>,
    channel_fds: &[BorrowedFd<'_>],
    direct: bool,
    path: &Path,
    plan: &Plan,
    page_size: u64,
    regions: &[SaveRegion<'_>],
    opts: &SaveOptions,
    mut progress: Option<ProgressFn<'_>>,
) -> Result<SaveReport, SaveError> {
    let io = |op: Op, offset: Option<u64>| {
        move |e: std::io::Error| SaveError::Io(IoFailure::new(op, path, offset, e))
    };
    let cancelled = || opts.cancel.as_ref().is_some_and(Cancel::is_cancelled);
    let file_size = plan.file_size();
    file::set_len(main, file_size).map_err(io(Op::Truncate, Some(file_size)))?;
    let preallocated = direct
        && opts.preallocate
        && opts.max_gap_pages > 0
        && !file::is_tmpfs(main)
        && allocate_page_regions(main, &plan.layouts)
            .map_err(|(at, e)| io(Op::Allocate, Some(at))(e))?;
    file::write_all_at(main, &plan.head, opts.offset, Op::WriteStream)
        .map_err(io(Op::WriteStream, Some(opts.offset)))?;
    for (layout, record) in plan.layouts.iter().zip(&plan.records) {
        file::write_all_at(main, record, layout.record_offset, Op::WriteStream)
            .map_err(io(Op::WriteStream, Some(layout.record_offset)))?;
    }
    file::write_all_at(main, &plan.tail, plan.device_stream_start, Op::WriteStream)
        .map_err(io(Op::WriteStream, Some(plan.device_stream_start)))?;

    let bitmaps: Vec<Vec<AtomicU64>> = plan
        .layouts
        .iter()
        .map(|l| (0..l.bitmap_words()).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let sums: Option<Vec<Vec<AtomicU32>>> = plan.integrity.map(|_| {
        plan.layouts
            .iter()
            .map(|l| (0..l.num_pages()).map(|_| AtomicU32::new(0)).collect())
            .collect()
    });
    let queue = WorkQueue::new(&plan.layouts, opts.chunk_bytes)
        .map_err(|e| SaveError::Options(e.to_string()))?;
    let policy = WritePolicy {
        max_io: opts.chunk_bytes,
        max_gap_pages: opts.max_gap_pages,
        write_zero_pages: opts.zero_pages == ZeroPages::Write,
    };
    let counters = Counters::default();
    let failure: Mutex<Option<SaveError>> = Mutex::new(None);
    let total: u64 = plan.layouts.iter().map(|l| l.length).sum();
    let ctx = ChannelCtx {
        regions,
        layouts: &plan.layouts,
        bitmaps: &bitmaps,
        queue: &queue,
        policy: &policy,
        counters: &counters,
        failure: &failure,
        path,
        direct,
        page_size,
        cancel: opts.cancel.as_ref(),
    };
    // Page checksums are computed by helper threads from the chunks the channels have
    // written, so that the CRC work overlaps the channels' I/O instead of delaying it.
    let (tx, rx) = std::sync::mpsc::channel::<SumJob>();
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        if let Some(sums) = sums.as_deref() {
            for _ in 0..checksum_threads(channel_fds.len()) {
                let rx = &rx;
                handles.push(s.spawn(move || sum_worker(rx, regions, sums, page_size)));
            }
        }
        for fd in channel_fds {
            let ctx = &ctx;
            let fd = *fd;
            let tx = sums.is_some().then(|| tx.clone());
            handles.push(s.spawn(move || ctx.run(fd, tx)));
        }
        drop(tx);
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
    if let Some(err) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    if cancelled() {
        return Err(SaveError::Cancelled);
    }

    // Bitmaps last, through the main descriptor, as QEMU does.
    let mut pages_stored = 0u64;
    let mut metadata_crc = crc32c::crc32c(&plan.head);
    for ((layout, words), record) in plan.layouts.iter().zip(&bitmaps).zip(&plan.records) {
        let map = AtomicBitmap::new(words, layout.num_pages())
            .map_err(|e| SaveError::Options(e.to_string()))?;
        let mut snap = vec![0u64; words.len()];
        map.snapshot(&mut snap)
            .map_err(|e| SaveError::Options(e.to_string()))?;
        let stored = Bitmap::new(&mut snap, layout.num_pages())
            .map_err(|e| SaveError::Options(e.to_string()))?;
        pages_stored += stored.count_ones();
        if preallocated {
            // Long zero runs become holes again, as they are without preallocation.
            for run in stored.as_ref().runs_in(0..layout.num_pages(), false) {
                if run.end - run.start < PUNCH_MIN_PAGES {
                    continue;
                }
                let at = layout.pages_offset + run.start * page_size;
                file::punch_hole(main, at, (run.end - run.start) * page_size)
                    .map_err(io(Op::Allocate, Some(at)))?;
            }
        }
        let mut bytes = vec![0u8; snap.len() * 8];
        bitmap::encode_le(&snap, &mut bytes).map_err(|e| SaveError::Options(e.to_string()))?;
        file::write_all_at(main, &bytes, layout.bitmap_offset, Op::WriteBitmap)
            .map_err(io(Op::WriteBitmap, Some(layout.bitmap_offset)))?;
        metadata_crc = crc32c::crc32c_append(metadata_crc, record);
        metadata_crc = crc32c::crc32c_append(metadata_crc, &bytes);
    }
    metadata_crc = crc32c::crc32c_append(metadata_crc, &plan.tail);
    if let (Some(planned), Some(sums)) = (&plan.integrity, &sums) {
        write_checksums(
            main,
            path,
            plan,
            planned,
            sums,
            metadata_crc,
            page_size,
            file_size,
        )?;
    }
    if opts.fsync {
        file::fdatasync(main).map_err(io(Op::Sync, None))?;
    }
    if let Some(cb) = progress.as_mut() {
        cb(Progress { done: total, total });
    }
    let pages: u64 = plan.layouts.iter().map(BlockLayout::num_pages).sum();
    Ok(SaveReport {
        path: path.to_path_buf(),
        ram_bytes: total,
        data_bytes: counters.data_bytes.load(Ordering::Relaxed),
        pages,
        pages_stored,
        zero_pages: pages - pages_stored,
        writes: counters.writes.load(Ordering::Relaxed),
        seconds: 0.0,
        direct_io: direct,
        direct_io_fallback: None,
        channels: channel_fds.len(),
        file_size,
        stale_temporaries_removed: Vec::new(),
        checksums: plan.integrity.is_some(),
    })
}

/// Writes the checksum table, then the anchor and footer records (see [`crate::integrity`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_checksums(
    main: BorrowedFd<'_>,
    path: &Path,
    plan: &Plan,
    planned: &PlannedIntegrity,
    sums: &[Vec<AtomicU32>],
    metadata_crc: u32,
    page_size: u64,
    file_size: u64,
) -> Result<(), SaveError> {
    let io = |offset: u64| {
        move |e: std::io::Error| {
            SaveError::Io(IoFailure::new(Op::WriteChecksums, path, Some(offset), e))
        }
    };
    let mut table_crc = 0u32;
    let mut at = planned.table_offset;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for (layout, entries) in plan.layouts.iter().zip(sums) {
        if layout.is_empty() {
            continue;
        }
        for piece in entries.chunks(1 << 18) {
            buf.clear();
            for e in piece {
                buf.extend_from_slice(&e.load(Ordering::Relaxed).to_le_bytes());
            }
            table_crc = crc32c::crc32c_append(table_crc, &buf);
            file::write_all_at(main, &buf, at, Op::WriteChecksums).map_err(io(at))?;
            at += buf.len() as u64;
        }
    }
    let record = integrity::Record {
        table_offset: planned.table_offset,
        table_len: planned.table_len,
        file_size,
        page_size: u32::try_from(page_size).unwrap_or(u32::MAX),
        blocks: u32::try_from(plan.layouts.len()).unwrap_or(u32::MAX),
        metadata_crc,
        table_crc,
    }
    .encode();
    let footer = file_size - integrity::RECORD_LEN;
    for offset in [planned.anchor_offset, footer] {
        file::write_all_at(main, &record, offset, Op::WriteChecksums).map_err(io(offset))?;
    }
    Ok(())
}

pub(crate) fn copy_prefix(
    target: &Path,
    main: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    tmp: &Path,
) -> Result<(), SaveError> {
    let old = match file::open(target, OFlags::RDONLY, 0) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IoFailure::new(Op::Open, target, None, e).into()),
    };
    let mut buf = vec![0u8; offset.min(1 << 20) as usize];
    let mut pos = 0u64;
    while pos < offset {
        let want = (offset - pos).min(buf.len() as u64) as usize;
        let n = file::pread_some(old.as_fd(), &mut buf[..want], pos)
            .map_err(|e| IoFailure::new(Op::ReadStream, target, Some(pos), e))?;
        if n == 0 {
            break;
        }
        file::write_all_at(main, &buf[..n], pos, Op::WriteStream)
            .map_err(|e| IoFailure::new(Op::WriteStream, tmp, Some(pos), e))?;
        pos += n as u64;
    }
    Ok(())
}

pub(crate) enum ChannelOpenError {
    Refused(file::DirectRefused),
    Io(IoFailure),
}

impl ChannelOpenError {
    /// The save error: `O_DIRECT` refused for a save to `target`, or the failure itself.
    pub(crate) fn into_save_error(self, target: &Path) -> SaveError {
        match self {
            ChannelOpenError::Refused(r) => SaveError::DirectIoRefused {
                path: target.to_path_buf(),
                filesystem: r.filesystem,
                source: r.source,
            },
            ChannelOpenError::Io(f) => SaveError::Io(f),
        }
    }
}

/// Opens `n` channel descriptors; returns them, whether they use `O_DIRECT`, and why `auto`
/// fell back if it did.
pub(crate) fn open_channels(
    path: &Path,
    write: bool,
    n: usize,
    mode: DirectIo,
    probe: Option<u64>,
) -> Result<(Vec<OwnedFd>, bool, Option<String>), ChannelOpenError> {
    let want_direct = mode != DirectIo::Off;
    let mut fds = Vec::with_capacity(n);
    let mut direct = want_direct;
    let mut fallback = None;
    for i in 0..n {
        let probe_here = if i == 0 { probe } else { None };
        match file::open_channel(path, write, direct, probe_here) {
            Ok(c) => fds.push(c.fd),
            Err(Ok(refused)) if mode == DirectIo::Auto && fds.is_empty() => {
                fallback = Some(format!(
                    "{} refused O_DIRECT ({}); using buffered I/O",
                    refused.filesystem, refused.source
                ));
                direct = false;
                let c = file::open_channel(path, write, false, None).map_err(|e| match e {
                    Ok(r) => ChannelOpenError::Refused(r),
                    Err(f) => ChannelOpenError::Io(f),
                })?;
                fds.push(c.fd);
            }
            Err(Ok(refused)) => return Err(ChannelOpenError::Refused(refused)),
            Err(Err(f)) => return Err(ChannelOpenError::Io(f)),
        }
    }
    Ok((fds, direct, fallback))
}

#[derive(Default)]
struct Counters {
    ram_done: AtomicU64,
    data_bytes: AtomicU64,
    writes: AtomicU64,
}

/// Pages whose checksums a helper thread computes: runs of stored pages of one block.
struct SumJob {
    block: usize,
    runs: Vec<std::ops::Range<u64>>,
}

/// Helper threads for page checksums: one per two channels (CRC-32C runs at several GB/s per
/// core, faster than a channel writes).
fn checksum_threads(channels: usize) -> usize {
    channels.div_ceil(2)
}

/// Computes the checksums of the pages of the jobs it receives until every channel is done.
fn sum_worker(
    rx: &Mutex<std::sync::mpsc::Receiver<SumJob>>,
    regions: &[SaveRegion<'_>],
    sums: &[Vec<AtomicU32>],
    page_size: u64,
) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let memory = regions[job.block].memory;
        let sums = &sums[job.block];
        for run in job.runs {
            for index in run {
                let off = (index * page_size) as usize;
                let page = &memory[off..off + page_size as usize];
                sums[index as usize]
                    .store(integrity::page_checksum(page, index), Ordering::Relaxed);
            }
        }
    }
}

struct ChannelCtx<'a> {
    regions: &'a [SaveRegion<'a>],
    layouts: &'a [BlockLayout],
    bitmaps: &'a [Vec<AtomicU64>],
    queue: &'a WorkQueue<'a>,
    policy: &'a WritePolicy,
    counters: &'a Counters,
    failure: &'a Mutex<Option<SaveError>>,
    path: &'a Path,
    direct: bool,
    page_size: u64,
    cancel: Option<&'a Cancel>,
}

impl ChannelCtx<'_> {
    fn run(&self, fd: BorrowedFd<'_>, sums: Option<std::sync::mpsc::Sender<SumJob>>) {
        let chunk_pages = self.queue.chunk_pages();
        let mut zero_words = vec![0u64; chunk_pages.div_ceil(64) as usize];
        let mut bounce: Option<AlignedBuf> = None;
        while let Some(chunk) = self.queue.claim() {
            if self.cancel.is_some_and(Cancel::is_cancelled) {
                self.queue.stop();
                return;
            }
            if let Err(e) = self.chunk(fd, &chunk, &mut zero_words, &mut bounce, sums.as_ref()) {
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
        zero_words: &mut [u64],
        bounce: &mut Option<AlignedBuf>,
        sums: Option<&std::sync::mpsc::Sender<SumJob>>,
    ) -> Result<(), SaveError> {
        let layout = &self.layouts[chunk.block];
        let memory = self.regions[chunk.block].memory;
        let ps = self.page_size;
        let pages = chunk.end - chunk.start;
        zero_words.iter_mut().for_each(|w| *w = 0);
        // One call maps the whole chunk instead of a page fault every few pages while the
        // zero scan, the checksums and O_DIRECT's page pinning first touch it.
        let base = (chunk.start * ps) as usize;
        crate::sys::populate_read(&memory[base..base + (pages * ps) as usize]);
        let mut zmap =
            Bitmap::new(zero_words, pages).map_err(|e| SaveError::Options(e.to_string()))?;
        if !self.policy.write_zero_pages {
            for i in 0..pages {
                let off = ((chunk.start + i) * ps) as usize;
                if zero::is_zero(&memory[off..off + ps as usize]) {
                    let _ = zmap.set(i);
                }
            }
        }
        let zref = zmap.as_ref();
        if let Some(tx) = sums {
            let runs = zref
                .runs_in(0..pages, false)
                .map(|r| chunk.start + r.start..chunk.start + r.end)
                .collect();
            // A send fails only when every helper is gone, which happens only at the end.
            let _ = tx.send(SumJob {
                block: chunk.block,
                runs,
            });
        }
        let map = AtomicBitmap::new(&self.bitmaps[chunk.block], layout.num_pages())
            .map_err(|e| SaveError::Options(e.to_string()))?;
        let mut result = Ok(());
        schedule::write_extents(layout, chunk.block, chunk, &zref, self.policy, |ext| {
            if result.is_err() {
                return;
            }
            let start = ext.mem_offset as usize;
            let data = &memory[start..start + ext.len as usize];
            let write = if self.direct && !is_aligned(data) {
                let buf =
                    bounce.get_or_insert_with(|| AlignedBuf::new(self.policy.max_io as usize));
                let dst = &mut buf.as_mut_slice()[..data.len()];
                dst.copy_from_slice(data);
                file::pwritev_all(fd, dst, ext.file_offset)
            } else {
                file::pwritev_all(fd, data, ext.file_offset)
            };
            if let Err(e) = write {
                result = Err(SaveError::Io(IoFailure::new(
                    Op::WritePages,
                    self.path,
                    Some(ext.file_offset),
                    e,
                )));
                return;
            }
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
            self.counters
                .data_bytes
                .fetch_add(ext.len, Ordering::Relaxed);
        })
        .map_err(|e| SaveError::Options(e.to_string()))?;
        result?;
        // Bits: set for every page written as data; zero pages stay clear.
        for run in zref.runs_in(0..pages, false) {
            map.update_range(chunk.start + run.start..chunk.start + run.end, true)
                .map_err(|e| SaveError::Options(e.to_string()))?;
        }
        self.counters
            .ram_done
            .fetch_add(pages * ps, Ordering::Relaxed);
        Ok(())
    }
}
