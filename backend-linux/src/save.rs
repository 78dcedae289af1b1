//! Saving guest RAM to a mapped-ram file: a thin driver of the [write engine](crate::writer)
//! — a new file, one full pass, finish, commit.
//!
//! The file is written to a temporary file in the target's directory and renamed over the
//! target only once it is complete and synced, so a failed, cancelled or killed save never
//! costs the previous snapshot.
//!
//! Descriptors: the *main* descriptor, buffered, carries the stream (preamble, RAM section
//! start, block records and headers, the bitmaps — written last, as QEMU does — and the tail);
//! one descriptor per channel, opened from the main one (never by path) with `O_DIRECT` when
//! direct I/O is on. Channel threads claim 1 MiB chunks, detect zero pages themselves and
//! `pwritev` large extents straight from guest memory.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use mapped_ram_core::schedule::{self, WritePolicy};

use crate::error::SaveError;
use crate::file::DirectIo;
use crate::mem::GuestMemory;
use crate::progress::{Cancel, Progress, ProgressFn};
use crate::writer::{Block, Dirty, Finished, Writer};

pub use crate::plan::RAM_SECTION_ID;

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
    /// The guest physical address ranges each block backs (a VMM's memory map, e.g. QEMU's
    /// `pc.ram` below and above the 32-bit PCI hole), recorded with the page checksums (where
    /// QEMU does not look) and returned by [`crate::inspect()`] as
    /// [`crate::BlockInfo::guest_ranges`]. Blocks not listed record none. An update keeps the
    /// snapshot's ranges unless new ones are given.
    pub guest_ranges: Vec<GuestRanges>,
    /// Cancellation handle.
    pub cancel: Option<Cancel>,
}

/// The guest physical address ranges of one block (see [`SaveOptions::guest_ranges`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRanges {
    /// The block's name.
    pub block: String,
    /// Its ranges, in the order the block's bytes back them.
    pub ranges: Vec<std::ops::Range<u64>>,
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
            guest_ranges: Vec::new(),
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
#[non_exhaustive]
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

/// The engine's blocks for `regions`: memory that does not change while borrowed.
fn blocks<'m>(regions: &[SaveRegion<'m>]) -> Vec<Block<'m>> {
    regions
        .iter()
        .map(|r| Block {
            name: r.name,
            memory: GuestMemory::from_slice(r.memory),
            page_size: r.page_size,
        })
        .collect()
}

/// The report of a finished writer.
pub(crate) fn report(w: &Writer<'_, '_>, f: &Finished) -> SaveReport {
    SaveReport {
        path: w.target().to_path_buf(),
        ram_bytes: w.layouts.iter().map(|l| l.length).sum(),
        data_bytes: w.passes.iter().map(|p| p.data_bytes).sum(),
        pages: f.pages,
        pages_stored: f.pages_stored,
        zero_pages: f.pages - f.pages_stored,
        writes: w.passes.iter().map(|p| p.writes).sum(),
        seconds: 0.0,
        direct_io: w.direct,
        direct_io_fallback: w.fallback.clone(),
        channels: w.channel_count(),
        file_size: f.file_size,
        stale_temporaries_removed: w.stale_removed.clone(),
        checksums: f.checksums,
    }
}

/// One full pass, finish, commit; the previous snapshot's blocks are freed in the background.
pub(crate) fn full_save(
    mut w: Writer<'_, '_>,
    mut progress: Option<ProgressFn<'_>>,
) -> Result<SaveReport, SaveError> {
    w.pass(Dirty::All, progress.as_mut())?;
    let finished = w.finish(None)?;
    let mut report = report(&w, &finished);
    let started = w.started;
    let total = report.ram_bytes;
    w.commit()?.release_in_background();
    if let Some(cb) = progress.as_mut() {
        cb(Progress { done: total, total });
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Saves `regions` to `path` in QEMU's mapped-ram format.
///
/// The snapshot is written to a temporary file beside `path` (a buffered main descriptor for
/// the stream, headers and bitmaps, plus one descriptor per channel, with `O_DIRECT` as
/// [`SaveOptions::direct_io`] says), synced, and renamed over `path`; the directory is synced
/// too. Until the rename the previous file at `path` is untouched. `regions` must not change
/// while they are saved (a paused guest); for a running guest use [`crate::LiveSave`].
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
    full_save(Writer::create(path, blocks(regions), opts, true)?, progress)
}

/// Saves guest memory that may change while it is read — a running guest, a RAM file another
/// process writes ([`GuestMemory::from_file`]) — to `path`: as [`save()`], with each run of
/// pages copied into the channel's buffer first, so every page in the file is one consistent
/// copy and its checksum describes exactly the bytes written.
pub fn save_memory(
    path: &Path,
    regions: &[crate::LiveRegion<'_>],
    opts: &SaveOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<SaveReport, SaveError> {
    let blocks = crate::live::blocks(regions);
    full_save(Writer::create(path, blocks, opts, true)?, progress)
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
    full_save(Writer::to_fds(main, data, blocks(regions), opts)?, progress)
}
