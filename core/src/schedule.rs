//! Turning pages into large, aligned I/O extents and sharing them among channel threads.
//!
//! QEMU's channels write every non-zero page with its own `pwritev` as soon as zero pages are
//! scattered through RAM (spec §d.3): with `O_DIRECT` that means single-page writes at
//! descending offsets, which reach only a small fraction of the disk's bandwidth. This module
//! plans the I/O of our engine instead:
//!
//! * The RAM of all blocks is cut into **chunks** of a fixed number of pages ([`Chunk`]); chunk
//!   boundaries are multiples of the chunk size inside each block, and since every block's page
//!   region starts on a 1 MiB boundary of the file, a chunk whose size divides 1 MiB (or is a
//!   multiple of it) is also aligned in the file.
//! * A [`WorkQueue`] hands the chunks out to the channel threads: [`WorkQueue::claim`] is one
//!   atomic `fetch_add` on a shared cursor (lock-free, no queue to fill, no allocation), chunks
//!   come out block by block in ascending order and none is handed out twice.
//!   [`WorkQueue::stop`] cancels the remaining work.
//! * The thread that claimed a chunk runs zero-page detection on the chunk's memory itself
//!   (it is in the cache of that thread's core afterwards), then [`write_extents`] turns the
//!   chunk into [`Extent`]s under a [`WritePolicy`]: runs of non-zero pages, merged across short
//!   runs of zero pages, cut at [`WritePolicy::max_io`]. Each extent is one `pwritev` of `len`
//!   bytes from `ram + mem_offset` to `file_offset`.
//! * On restore the same queue is used, and [`read_extents`] turns runs of set bits of the
//!   block's stored-page bitmap into reads of at most [`ReadPolicy::max_io`] bytes, optionally
//!   merged across short runs of clear bits.
//!
//! Every extent is page aligned in the file and in memory, its length is a multiple of the page
//! size (so `O_DIRECT`, spec §e, only needs a logical block size that divides the page size and
//! page-aligned guest RAM), it never leaves its chunk, and the extents of a chunk ascend.
//!
//! ## Zero pages inside extents
//!
//! A write extent may contain short runs of zero pages (at most [`WritePolicy::max_gap_pages`]
//! each, never at the extent's ends): one larger I/O is cheaper than two smaller ones. The file
//! then holds zeros at those pages, so the caller may either set their bitmap bits (QEMU's
//! loader then reads longer runs) or leave them clear (a clear bit means "zero", spec §d.5);
//! both give a correct file.
//!
//! A read extent may likewise contain clear-bit pages (at most [`ReadPolicy::max_gap_pages`] in
//! a row). The file holds no meaningful data there — possibly stale bytes of a page that later
//! became zero (spec §a.3) — so **the caller must zero the clear pages of an extent after the
//! read completes**. The default read policy never merges (QEMU's behaviour).
//!
//! ## Example: channels saving two blocks
//!
//! ```
//! use std::sync::Mutex;
//! use mapped_ram_core::bitmap::{words_for, Bitmap};
//! use mapped_ram_core::layout::Planner;
//! use mapped_ram_core::schedule::{write_extents, WorkQueue, WritePolicy, WriteStats, DEFAULT_MAX_IO};
//!
//! let mut planner = Planner::new(0x5c, 4096, false).unwrap();
//! let layouts = [
//!     planner.push("pc.ram".len(), 4 << 20).unwrap(),   // 1024 pages
//!     planner.push("pc.bios".len(), 64 << 10).unwrap(), // 16 pages
//! ];
//! let queue = WorkQueue::new(&layouts, DEFAULT_MAX_IO).unwrap();
//! assert_eq!(queue.total_chunks(), 5); // 4 chunks of 256 pages, then one of 16
//!
//! let writes = Mutex::new(Vec::new());
//! let totals = Mutex::new(WriteStats::default());
//! std::thread::scope(|s| {
//!     for _channel in 0..2 {
//!         s.spawn(|| {
//!             let policy = WritePolicy::default();
//!             // One zero-page bitmap per channel, big enough for a chunk.
//!             let mut words = vec![0u64; words_for(queue.chunk_pages()) as usize];
//!             while let Some(chunk) = queue.claim() {
//!                 let layout = &layouts[chunk.block];
//!                 // Zero-page detection on the chunk's memory (here: pretend pages whose
//!                 // index is a multiple of 3 are zero).
//!                 let mut zero = Bitmap::new(&mut words, chunk.pages()).unwrap();
//!                 zero.clear_all();
//!                 for page in chunk.start..chunk.end {
//!                     if page % 3 == 0 {
//!                         zero.set(page - chunk.start).unwrap();
//!                     }
//!                 }
//!                 let stats = write_extents(layout, chunk.block, &chunk, &zero.as_ref(), &policy, |e| {
//!                     // Here a channel would do:
//!                     // pwritev(fd, [ram[chunk.block] + e.mem_offset .. + e.len], e.file_offset)
//!                     writes.lock().unwrap().push(e);
//!                 })
//!                 .unwrap();
//!                 *totals.lock().unwrap() += stats;
//!             }
//!         });
//!     }
//! });
//! let writes = writes.into_inner().unwrap();
//! // Every chunk became a single write: the zero pages in between are short gaps.
//! assert_eq!(writes.len(), 5);
//! let first = writes.iter().find(|e| e.block == 0 && e.first_page == 1).unwrap();
//! assert_eq!(first.file_offset, layouts[0].pages_offset + 4096);
//! assert_eq!(first.len, 254 * 4096); // pages 1..255: pages 0 and 255 are zero and skipped
//! let totals = totals.into_inner().unwrap();
//! assert_eq!(totals.data_pages + totals.zero_pages_written + totals.zero_pages_skipped, 1040);
//! ```
//!
//! ## Example: restoring a block
//!
//! ```
//! use mapped_ram_core::bitmap::Bitmap;
//! use mapped_ram_core::layout::Planner;
//! use mapped_ram_core::schedule::{read_extents, ReadPolicy, WorkQueue};
//!
//! let mut planner = Planner::new(0x5c, 4096, false).unwrap();
//! let layouts = [planner.push(7, 64 << 10).unwrap()]; // 16 pages
//! // The block's stored-page bitmap, as read from the file.
//! let mut words = [0u64; 1];
//! let mut stored = Bitmap::new(&mut words, 16).unwrap();
//! stored.set_range(0..4).unwrap();
//! stored.set_range(6..9).unwrap();
//!
//! let queue = WorkQueue::new(&layouts, 1 << 20).unwrap();
//! let chunk = queue.claim().unwrap();
//! let mut reads = Vec::new();
//! // QEMU's behaviour: one read per run of stored pages.
//! read_extents(&layouts[0], 0, &chunk, &stored.as_ref(), &ReadPolicy::default(), |e| reads.push(e))
//!     .unwrap();
//! assert_eq!(reads.iter().map(|e| (e.first_page, e.pages)).collect::<Vec<_>>(), [(0, 4), (6, 3)]);
//! // Merging across gaps of up to 2 pages: one read, pages 4 and 5 must be zeroed afterwards.
//! reads.clear();
//! let policy = ReadPolicy { max_gap_pages: 2, ..ReadPolicy::default() };
//! let stats = read_extents(&layouts[0], 0, &chunk, &stored.as_ref(), &policy, |e| reads.push(e))
//!     .unwrap();
//! assert_eq!(reads.iter().map(|e| (e.first_page, e.pages)).collect::<Vec<_>>(), [(0, 9)]);
//! assert_eq!((stats.pages_read, stats.gap_pages_read), (7, 2));
//! assert!(queue.claim().is_none());
//! ```

use core::fmt;
use core::ops::{AddAssign, Range};
#[cfg(target_has_atomic = "ptr")]
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::bitmap::BitmapRef;
use crate::layout::BlockLayout;

/// Default largest single I/O: 1 MiB, QEMU's `MAPPED_RAM_LOAD_BUF_SIZE` and the alignment of
/// every block's page region.
pub const DEFAULT_MAX_IO: u64 = 1 << 20;

/// Default chunk size for [`WorkQueue::new`]: [`DEFAULT_MAX_IO`], so that a chunk without zero
/// pages is exactly one full-size I/O aligned to 1 MiB in the file.
pub const DEFAULT_CHUNK_BYTES: u64 = DEFAULT_MAX_IO;

/// Bytes of zero pages that the default [`WritePolicy`] writes rather than split an extent:
/// 64 KiB (see [`WritePolicy::default`] for why).
pub const DEFAULT_WRITE_GAP_BYTES: u64 = 64 << 10;

/// [`DEFAULT_WRITE_GAP_BYTES`] in 4 KiB pages: the default [`WritePolicy::max_gap_pages`].
pub const DEFAULT_WRITE_MAX_GAP_PAGES: u64 = 16;

/// Default [`ReadPolicy::max_gap_pages`]: 0, one read per run of stored pages, as QEMU does.
pub const DEFAULT_READ_MAX_GAP_PAGES: u64 = 0;

/// Something the scheduler was given does not describe valid work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ScheduleError {
    /// `max_io` is zero or not a multiple of the page size.
    BadMaxIo {
        /// The `max_io` of the policy.
        max_io: u64,
        /// The block's page size.
        page_size: u64,
    },
    /// The chunk size is zero or not a multiple of the page size (or, with no blocks, zero).
    BadChunkSize {
        /// The chunk size given, in bytes.
        chunk_bytes: u64,
        /// The page size of the blocks (0 when there are none).
        page_size: u64,
    },
    /// Not all blocks have the same page size.
    MixedPageSizes,
    /// A block's page size is not a power of two.
    BadPageSize {
        /// Index of the block.
        block: usize,
        /// Its page size.
        page_size: u64,
    },
    /// A block's length is not a multiple of its page size.
    BadLength {
        /// Index of the block.
        block: usize,
        /// Its length.
        length: u64,
        /// Its page size.
        page_size: u64,
    },
    /// A block's page region does not start on a page boundary of the file.
    BadAlignment {
        /// Index of the block.
        block: usize,
        /// Its `pages_offset`.
        pages_offset: u64,
    },
    /// Pages were asked of a block without a page region in the file (a 0/0 header).
    NoPageRegion {
        /// Index of the block.
        block: usize,
    },
    /// The chunk belongs to another block than the one given.
    WrongBlock {
        /// The block index passed with the layout.
        block: usize,
        /// The block index in the chunk.
        chunk_block: usize,
    },
    /// The chunk's page range is reversed or reaches past the end of the block.
    BadChunk {
        /// First page of the chunk.
        start: u64,
        /// One past its last page.
        end: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A page bitmap has fewer bits than the pages it must describe.
    BitmapTooShort {
        /// Bits in the bitmap.
        bits: u64,
        /// Bits needed.
        needed: u64,
    },
    /// An offset, a length or a count would not fit in 64 bits (or the number of chunks in
    /// the platform's `usize`).
    Overflow,
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleError::BadMaxIo { max_io, page_size } => write!(
                f,
                "maximum I/O size {max_io} is not a non-zero multiple of the page size {page_size}"
            ),
            ScheduleError::BadChunkSize {
                chunk_bytes,
                page_size,
            } => write!(
                f,
                "chunk size {chunk_bytes} is not a non-zero multiple of the page size {page_size}"
            ),
            ScheduleError::MixedPageSizes => write!(f, "RAM blocks have different page sizes"),
            ScheduleError::BadPageSize { block, page_size } => write!(
                f,
                "block {block}: page size {page_size} is not a power of two"
            ),
            ScheduleError::BadLength {
                block,
                length,
                page_size,
            } => write!(
                f,
                "block {block}: length {length:#x} is not a multiple of the page size {page_size}"
            ),
            ScheduleError::BadAlignment {
                block,
                pages_offset,
            } => write!(
                f,
                "block {block}: page region at {pages_offset:#x} is not page aligned"
            ),
            ScheduleError::NoPageRegion { block } => {
                write!(f, "block {block} has no page region in the file")
            }
            ScheduleError::WrongBlock { block, chunk_block } => write!(
                f,
                "chunk of block {chunk_block} scheduled against the layout of block {block}"
            ),
            ScheduleError::BadChunk { start, end, pages } => write!(
                f,
                "chunk of pages {start}..{end} does not lie in a block of {pages} pages"
            ),
            ScheduleError::BitmapTooShort { bits, needed } => {
                write!(f, "bitmap of {bits} bits cannot describe {needed} pages")
            }
            ScheduleError::Overflow => write!(f, "offset or size does not fit in 64 bits"),
        }
    }
}

impl core::error::Error for ScheduleError {}

/// One I/O: `len` bytes at absolute file offset `file_offset` to or from the block's memory at
/// `mem_offset` (an offset inside the block's RAM).
///
/// Both offsets are page aligned (given a page-aligned `pages_offset`, which every checked
/// layout has), `len` is a multiple of the page size and `0 < len <= max_io`.
/// `file_offset == layout.page_offset(first_page)` and `mem_offset == first_page * page_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Extent {
    /// Index of the block in the layout list.
    pub block: usize,
    /// First page of the block covered by the extent.
    pub first_page: u64,
    /// Number of pages covered (at least 1).
    pub pages: u64,
    /// Absolute file offset of `first_page`.
    pub file_offset: u64,
    /// Offset of `first_page` inside the block's RAM.
    pub mem_offset: u64,
    /// Length of the I/O in bytes (`pages * page_size`).
    pub len: u64,
}

impl Extent {
    /// One past the last page covered.
    pub fn end_page(&self) -> u64 {
        self.first_page.saturating_add(self.pages)
    }

    /// The block pages covered.
    pub fn page_range(&self) -> Range<u64> {
        self.first_page..self.end_page()
    }
}

/// A unit of work: pages `start..end` of block `block`.
///
/// Chunks handed out by a [`WorkQueue`] start on a multiple of the chunk size inside the block
/// and are full-size except the last one of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Chunk {
    /// Index of the block in the layout list.
    pub block: usize,
    /// First page (index inside the block).
    pub start: u64,
    /// One past the last page.
    pub end: u64,
}

impl Chunk {
    /// Number of pages in the chunk.
    pub fn pages(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// `true` when the chunk has no pages.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The chunk's pages as a range of block page indices.
    pub fn range(&self) -> Range<u64> {
        self.start..self.end
    }
}

/// How [`write_extents`] turns a chunk into writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct WritePolicy {
    /// Largest write in bytes; a non-zero multiple of the page size.
    pub max_io: u64,
    /// Longest run of zero pages that is written (as part of one extent) rather than skipped,
    /// when it lies between two non-zero pages. 0: never write a zero page.
    pub max_gap_pages: u64,
    /// Write every page, zero or not (QEMU's `zero-page-detection=none`).
    pub write_zero_pages: bool,
}

impl Default for WritePolicy {
    /// `max_io` 1 MiB, `max_gap_pages` 16, `write_zero_pages` false.
    ///
    /// Why 16 pages (64 KiB of 4 KiB pages): splitting an extent at a gap costs one more
    /// `pwritev` — a system call plus, with `O_DIRECT`, one more device command whose latency
    /// the channel waits for — on the order of 10–30 µs on NVMe; writing a zero page costs its
    /// transfer time, about 1.5–2 µs at 2–3 GB/s. A gap of up to roughly 16 pages is therefore
    /// cheaper to write than to skip, and 64 KiB is also about the request size below which
    /// SSD write bandwidth starts to fall off. Even in the worst case (one data page, 16 zero
    /// pages, repeated) the bytes written stay within one `max_io` per chunk, i.e. never more
    /// than writing the chunk whole. Use [`WritePolicy::for_page_size`] for other page sizes.
    fn default() -> Self {
        Self {
            max_io: DEFAULT_MAX_IO,
            max_gap_pages: DEFAULT_WRITE_MAX_GAP_PAGES,
            write_zero_pages: false,
        }
    }
}

impl WritePolicy {
    /// The default policy with the zero-gap limit expressed as [`DEFAULT_WRITE_GAP_BYTES`] of
    /// pages of `page_size` bytes (16 pages of 4 KiB, 1 page of 64 KiB, 0 for larger pages).
    pub fn for_page_size(page_size: u64) -> Self {
        Self {
            max_gap_pages: DEFAULT_WRITE_GAP_BYTES.checked_div(page_size).unwrap_or(0),
            ..Self::default()
        }
    }
}

/// How [`read_extents`] turns a chunk into reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ReadPolicy {
    /// Largest read in bytes; a non-zero multiple of the page size.
    pub max_io: u64,
    /// Longest run of clear-bit pages that is read (as part of one extent, to be zeroed by the
    /// caller afterwards) rather than skipped, when it lies between two stored pages.
    pub max_gap_pages: u64,
}

impl Default for ReadPolicy {
    /// `max_io` 1 MiB and `max_gap_pages` 0: exactly QEMU's loader (spec §d.6), which reads
    /// each run of stored pages in pieces of at most 1 MiB.
    fn default() -> Self {
        Self {
            max_io: DEFAULT_MAX_IO,
            max_gap_pages: DEFAULT_READ_MAX_GAP_PAGES,
        }
    }
}

/// What [`write_extents`] did with the pages of a chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct WriteStats {
    /// Extents emitted.
    pub extents: u64,
    /// Non-zero pages written (all of the chunk's non-zero pages).
    pub data_pages: u64,
    /// Zero pages written because they lie inside an extent (or all zero pages with
    /// [`WritePolicy::write_zero_pages`]).
    pub zero_pages_written: u64,
    /// Zero pages not written.
    pub zero_pages_skipped: u64,
}

impl WriteStats {
    /// Pages written in all: `data_pages + zero_pages_written`.
    pub fn pages_written(&self) -> u64 {
        self.data_pages.saturating_add(self.zero_pages_written)
    }
}

impl AddAssign for WriteStats {
    /// Adds the counts of another chunk (saturating).
    fn add_assign(&mut self, other: Self) {
        self.extents = self.extents.saturating_add(other.extents);
        self.data_pages = self.data_pages.saturating_add(other.data_pages);
        self.zero_pages_written = self
            .zero_pages_written
            .saturating_add(other.zero_pages_written);
        self.zero_pages_skipped = self
            .zero_pages_skipped
            .saturating_add(other.zero_pages_skipped);
    }
}

/// What [`read_extents`] did with the pages of a chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ReadStats {
    /// Extents emitted.
    pub extents: u64,
    /// Stored pages (set bits) read: all of the chunk's stored pages.
    pub pages_read: u64,
    /// Clear-bit pages read because they lie inside an extent; the caller zeroes them.
    pub gap_pages_read: u64,
}

impl ReadStats {
    /// Pages read in all: `pages_read + gap_pages_read`.
    pub fn pages_total(&self) -> u64 {
        self.pages_read.saturating_add(self.gap_pages_read)
    }
}

impl AddAssign for ReadStats {
    /// Adds the counts of another chunk (saturating).
    fn add_assign(&mut self, other: Self) {
        self.extents = self.extents.saturating_add(other.extents);
        self.pages_read = self.pages_read.saturating_add(other.pages_read);
        self.gap_pages_read = self.gap_pages_read.saturating_add(other.gap_pages_read);
    }
}

/// Pages per I/O for `max_io` bytes, checking that `max_io` is a non-zero page multiple.
fn max_io_pages(max_io: u64, page_size: u64) -> Result<u64, ScheduleError> {
    match (max_io.checked_div(page_size), max_io.checked_rem(page_size)) {
        (Some(pages), Some(0)) if pages > 0 => Ok(pages),
        _ => Err(ScheduleError::BadMaxIo { max_io, page_size }),
    }
}

/// Number of pages of block `block`, checking page size and length.
fn block_pages(block: usize, layout: &BlockLayout) -> Result<u64, ScheduleError> {
    let page_size = layout.page_size;
    if !page_size.is_power_of_two() {
        return Err(ScheduleError::BadPageSize { block, page_size });
    }
    match (
        layout.length.checked_div(page_size),
        layout.length.checked_rem(page_size),
    ) {
        (Some(pages), Some(0)) => Ok(pages),
        _ => Err(ScheduleError::BadLength {
            block,
            length: layout.length,
            page_size,
        }),
    }
}

/// Checks that the block's page region can be addressed: present, page aligned, and ending
/// below 2^64.
fn check_region(block: usize, layout: &BlockLayout) -> Result<(), ScheduleError> {
    if layout.is_empty() {
        return Err(ScheduleError::NoPageRegion { block });
    }
    if layout.pages_offset.checked_rem(layout.page_size) != Some(0) {
        return Err(ScheduleError::BadAlignment {
            block,
            pages_offset: layout.pages_offset,
        });
    }
    layout
        .pages_offset
        .checked_add(layout.length)
        .map(|_| ())
        .ok_or(ScheduleError::Overflow)
}

/// Validates a chunk against its block and returns the pages per I/O allowed by `max_io`.
fn check_chunk(
    layout: &BlockLayout,
    block: usize,
    chunk: &Chunk,
    max_io: u64,
) -> Result<u64, ScheduleError> {
    let pages = block_pages(block, layout)?;
    let max_pages = max_io_pages(max_io, layout.page_size)?;
    if chunk.block != block {
        return Err(ScheduleError::WrongBlock {
            block,
            chunk_block: chunk.block,
        });
    }
    if chunk.start > chunk.end || chunk.end > pages {
        return Err(ScheduleError::BadChunk {
            start: chunk.start,
            end: chunk.end,
            pages,
        });
    }
    if !chunk.is_empty() {
        check_region(block, layout)?;
    }
    Ok(max_pages)
}

/// A planned extent in block page indices, with the number of "wanted" (data / stored) pages
/// in it; the rest are gap pages.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    wanted: u64,
}

impl Span {
    fn pages(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Greedily packs ascending, disjoint runs of wanted pages into spans of at most `max_pages`
/// pages, joining runs separated by at most `max_gap` unwanted pages. Spans start and end with
/// wanted pages; a span is closed when it is full, when the next gap is too long, or when the
/// gap plus at least one wanted page would not fit any more.
fn plan_spans<E>(
    runs: impl Iterator<Item = Range<u64>>,
    max_pages: u64,
    max_gap: u64,
    mut flush: impl FnMut(Span) -> Result<(), E>,
) -> Result<(), E> {
    let max_pages = max_pages.max(1);
    let mut current: Option<Span> = None;
    for run in runs {
        let mut pos = run.start;
        while pos < run.end {
            let left = run.end.saturating_sub(pos);
            match current {
                Some(mut span) => {
                    let gap = pos.saturating_sub(span.end);
                    let room = max_pages.saturating_sub(span.pages());
                    if gap <= max_gap && gap < room {
                        let take = left.min(room.saturating_sub(gap));
                        span.end = pos.saturating_add(take);
                        span.wanted = span.wanted.saturating_add(take);
                        pos = span.end;
                        current = Some(span);
                    } else {
                        flush(span)?;
                        current = None;
                        continue;
                    }
                }
                None => {
                    let take = left.min(max_pages);
                    let end = pos.saturating_add(take);
                    current = Some(Span {
                        start: pos,
                        end,
                        wanted: take,
                    });
                    pos = end;
                }
            }
            if let Some(span) = current {
                if span.pages() >= max_pages {
                    flush(span)?;
                    current = None;
                }
            }
        }
    }
    match current {
        Some(span) => flush(span),
        None => Ok(()),
    }
}

/// Builds the extent of block pages `span` (already checked to lie in the block's region).
fn extent(layout: &BlockLayout, block: usize, span: &Span) -> Result<Extent, ScheduleError> {
    let pages = span.pages();
    Ok(Extent {
        block,
        first_page: span.start,
        pages,
        file_offset: layout
            .page_offset(span.start)
            .map_err(|_| ScheduleError::Overflow)?,
        mem_offset: span
            .start
            .checked_mul(layout.page_size)
            .ok_or(ScheduleError::Overflow)?,
        len: pages
            .checked_mul(layout.page_size)
            .ok_or(ScheduleError::Overflow)?,
    })
}

/// Emits the write extents for `chunk` of block `block` (whose layout is `layout`).
///
/// `zero` has a bit per page of the chunk, indexed relative to `chunk.start`: set means the
/// page is all zero. Without [`WritePolicy::write_zero_pages`]:
///
/// * every non-zero page is covered by exactly one extent;
/// * a run of zero pages between two non-zero pages is written as part of one extent when it is
///   at most [`WritePolicy::max_gap_pages`] long and the extent stays within `max_io`
///   (otherwise the extent ends before the gap);
/// * zero pages at the chunk's ends and longer zero runs are skipped; every extent starts and
///   ends with a non-zero page.
///
/// With `write_zero_pages` every page of the chunk is written, in extents of `max_io`.
///
/// Extents ascend, never leave the chunk and are at most `max_io` bytes. All checks happen
/// before the first extent is emitted, so on error nothing has been emitted. Bits of `zero`
/// past the chunk's page count are ignored.
pub fn write_extents(
    layout: &BlockLayout,
    block: usize,
    chunk: &Chunk,
    zero: &BitmapRef<'_>,
    policy: &WritePolicy,
    mut emit: impl FnMut(Extent),
) -> Result<WriteStats, ScheduleError> {
    let max_pages = check_chunk(layout, block, chunk, policy.max_io)?;
    let pages = chunk.pages();
    if zero.len() < pages {
        return Err(ScheduleError::BitmapTooShort {
            bits: zero.len(),
            needed: pages,
        });
    }
    let zeros = zero.count_ones_in(0..pages);
    let mut stats = WriteStats::default();
    let mut span_out = |span: Span| -> Result<(), ScheduleError> {
        // `span` is relative to the chunk; shift it to block pages.
        let abs = Span {
            start: chunk.start.saturating_add(span.start),
            end: chunk.start.saturating_add(span.end),
            wanted: span.wanted,
        };
        let e = extent(layout, block, &abs)?;
        stats.extents = stats.extents.saturating_add(1);
        emit(e);
        Ok(())
    };
    if policy.write_zero_pages {
        plan_spans(core::iter::once(0..pages), max_pages, 0, &mut span_out)?;
        stats.data_pages = pages.saturating_sub(zeros);
        stats.zero_pages_written = zeros;
        return Ok(stats);
    }
    let mut written = 0u64;
    plan_spans(
        zero.runs_in(0..pages, false),
        max_pages,
        policy.max_gap_pages,
        |span| {
            written = written.saturating_add(span.pages());
            span_out(span)
        },
    )?;
    stats.data_pages = pages.saturating_sub(zeros);
    stats.zero_pages_written = written.saturating_sub(stats.data_pages);
    stats.zero_pages_skipped = zeros.saturating_sub(stats.zero_pages_written);
    Ok(stats)
}

/// Emits the read extents for pages `chunk.start..chunk.end` of block `block`.
///
/// `stored` is the block's stored-page bitmap, indexed by block page (bit set = the file holds
/// the page); it needs at least `chunk.end` bits. Runs of set bits become reads of at most
/// [`ReadPolicy::max_io`] bytes; runs separated by at most [`ReadPolicy::max_gap_pages`] clear
/// bits are merged into one read as long as it stays within `max_io` — **the caller must zero
/// those gap pages after the read** (their file contents are not the page's). Every stored page
/// of the chunk is read exactly once, extents start and end with stored pages, ascend, and never
/// read a page outside the chunk. All checks happen before the first extent is emitted.
pub fn read_extents(
    layout: &BlockLayout,
    block: usize,
    chunk: &Chunk,
    stored: &BitmapRef<'_>,
    policy: &ReadPolicy,
    mut emit: impl FnMut(Extent),
) -> Result<ReadStats, ScheduleError> {
    let max_pages = check_chunk(layout, block, chunk, policy.max_io)?;
    if stored.len() < chunk.end {
        return Err(ScheduleError::BitmapTooShort {
            bits: stored.len(),
            needed: chunk.end,
        });
    }
    let mut stats = ReadStats::default();
    plan_spans(
        stored.runs_in(chunk.range(), true),
        max_pages,
        policy.max_gap_pages,
        |span| -> Result<(), ScheduleError> {
            let e = extent(layout, block, &span)?;
            stats.extents = stats.extents.saturating_add(1);
            stats.pages_read = stats.pages_read.saturating_add(span.wanted);
            stats.gap_pages_read = stats
                .gap_pages_read
                .saturating_add(span.pages().saturating_sub(span.wanted));
            emit(e);
            Ok(())
        },
    )?;
    Ok(stats)
}

/// Shares the chunks of all blocks among channel threads.
///
/// [`claim`](Self::claim) is a single atomic `fetch_add` on a cursor over the global chunk
/// sequence (block 0's chunks in ascending order, then block 1's, ...), so it is lock-free,
/// needs no allocation and never hands out a chunk twice. Blocks without a page region
/// ([`BlockLayout::is_empty`]) or without pages yield no chunks. Mapping a chunk number to its
/// block walks the layout list, which is short (a handful of RAM blocks).
///
/// The queue only borrows the layouts; share it between threads by reference
/// (`std::thread::scope`) or in an `Arc`.
#[cfg(target_has_atomic = "ptr")]
#[derive(Debug)]
pub struct WorkQueue<'a> {
    layouts: &'a [BlockLayout],
    page_size: u64,
    chunk_pages: u64,
    total_pages: u64,
    total_chunks: u64,
    /// `total_chunks` as `usize`; at most `usize::MAX / 2`, so that the cursor, which only
    /// moves past it once per racing claim, can never wrap.
    limit: usize,
    next: AtomicUsize,
    stopped: AtomicBool,
}

#[cfg(target_has_atomic = "ptr")]
impl<'a> WorkQueue<'a> {
    /// Plans the chunks of `layouts` with chunks of `chunk_bytes` bytes (a non-zero multiple of
    /// the page size; [`DEFAULT_CHUNK_BYTES`] is a good choice).
    ///
    /// All blocks must share one power-of-two page size and have lengths that are page
    /// multiples; blocks with a page region must have it page aligned and ending below 2^64.
    pub fn new(layouts: &'a [BlockLayout], chunk_bytes: u64) -> Result<Self, ScheduleError> {
        let page_size = match layouts.first() {
            Some(first) => first.page_size,
            // No blocks: nothing to chunk, only the chunk size itself can be wrong.
            None if chunk_bytes == 0 => {
                return Err(ScheduleError::BadChunkSize {
                    chunk_bytes,
                    page_size: 0,
                })
            }
            None => 0,
        };
        if layouts.iter().any(|l| l.page_size != page_size) {
            return Err(ScheduleError::MixedPageSizes);
        }
        let chunk_pages = if layouts.is_empty() {
            1
        } else {
            if !page_size.is_power_of_two() {
                return Err(ScheduleError::BadPageSize {
                    block: 0,
                    page_size,
                });
            }
            match (
                chunk_bytes.checked_div(page_size),
                chunk_bytes.checked_rem(page_size),
            ) {
                (Some(n), Some(0)) if n > 0 => n,
                _ => {
                    return Err(ScheduleError::BadChunkSize {
                        chunk_bytes,
                        page_size,
                    })
                }
            }
        };
        let mut total_pages = 0u64;
        let mut total_chunks = 0u64;
        for (block, layout) in layouts.iter().enumerate() {
            let pages = block_pages(block, layout)?;
            if layout.is_empty() || pages == 0 {
                continue;
            }
            check_region(block, layout)?;
            total_pages = total_pages
                .checked_add(pages)
                .ok_or(ScheduleError::Overflow)?;
            total_chunks = total_chunks
                .checked_add(pages.div_ceil(chunk_pages))
                .ok_or(ScheduleError::Overflow)?;
        }
        let limit = usize::try_from(total_chunks)
            .ok()
            .filter(|n| *n <= usize::MAX / 2)
            .ok_or(ScheduleError::Overflow)?;
        Ok(Self {
            layouts,
            page_size,
            chunk_pages,
            total_pages,
            total_chunks,
            limit,
            next: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        })
    }

    /// Claims the next chunk, or `None` when all chunks have been claimed or the queue was
    /// stopped. Lock-free: one atomic load and one `fetch_add`.
    pub fn claim(&self) -> Option<Chunk> {
        if self.stopped.load(Ordering::Acquire) {
            return None;
        }
        // The load keeps the cursor from running away once the work is done: it passes
        // `limit` by at most one per claim racing with the last successful one.
        if self.next.load(Ordering::Relaxed) >= self.limit {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= self.limit {
            return None;
        }
        self.chunk(u64::try_from(index).ok()?)
    }

    /// Cancels the remaining work: claims that start after this returns get `None` (a claim
    /// racing with `stop` may still get one chunk). Chunks already claimed are not affected.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// `true` once [`stop`](Self::stop) has been called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The `index`-th chunk in claim order, without claiming it (`None` past the end).
    pub fn chunk(&self, index: u64) -> Option<Chunk> {
        let mut rest = index;
        for (block, layout) in self.layouts.iter().enumerate() {
            let pages = self.pages_of(layout);
            let chunks = pages.div_ceil(self.chunk_pages.max(1));
            if rest < chunks {
                let start = rest.checked_mul(self.chunk_pages)?;
                let end = start.saturating_add(self.chunk_pages).min(pages);
                return Some(Chunk { block, start, end });
            }
            rest = rest.checked_sub(chunks)?;
        }
        None
    }

    /// Pages of a block that get chunks (0 for a block without page region).
    fn pages_of(&self, layout: &BlockLayout) -> u64 {
        if layout.is_empty() {
            0
        } else {
            layout.num_pages()
        }
    }

    /// Number of chunks over all blocks.
    pub fn total_chunks(&self) -> u64 {
        self.total_chunks
    }

    /// Number of pages over all blocks that have a page region.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Number of chunks claimed so far (at most [`total_chunks`](Self::total_chunks)).
    pub fn claimed(&self) -> u64 {
        let next = self.next.load(Ordering::Relaxed).min(self.limit);
        u64::try_from(next).unwrap_or(self.total_chunks)
    }

    /// Pages per chunk (the last chunk of a block may be shorter). A zero-page bitmap of this
    /// many bits holds any chunk.
    pub fn chunk_pages(&self) -> u64 {
        self.chunk_pages
    }

    /// The common page size of the blocks (0 when there are no blocks).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The layouts the chunks refer to (`chunk.block` indexes this slice).
    pub fn layouts(&self) -> &'a [BlockLayout] {
        self.layouts
    }

    /// The layout of block `block`.
    pub fn layout(&self, block: usize) -> Option<&'a BlockLayout> {
        self.layouts.get(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::{words_for, Bitmap};
    use crate::layout::Planner;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::vec::Vec;

    const PS: u64 = 4096;

    fn bitmap_words(bits: &[bool]) -> Vec<u64> {
        let mut words = vec![0u64; words_for(bits.len() as u64) as usize];
        let mut map = Bitmap::new(&mut words, bits.len() as u64).unwrap();
        for (i, b) in bits.iter().enumerate() {
            if *b {
                map.set(i as u64).unwrap();
            }
        }
        words
    }

    fn collect_writes(
        layout: &BlockLayout,
        block: usize,
        chunk: &Chunk,
        zero: &[bool],
        policy: &WritePolicy,
    ) -> Result<(Vec<Extent>, WriteStats), ScheduleError> {
        let words = bitmap_words(zero);
        let map = BitmapRef::new(&words, zero.len() as u64).unwrap();
        let mut out = Vec::new();
        let stats = write_extents(layout, block, chunk, &map, policy, |e| out.push(e))?;
        Ok((out, stats))
    }

    fn collect_reads(
        layout: &BlockLayout,
        block: usize,
        chunk: &Chunk,
        stored: &[bool],
        policy: &ReadPolicy,
    ) -> Result<(Vec<Extent>, ReadStats), ScheduleError> {
        let words = bitmap_words(stored);
        let map = BitmapRef::new(&words, stored.len() as u64).unwrap();
        let mut out = Vec::new();
        let stats = read_extents(layout, block, chunk, &map, policy, |e| out.push(e))?;
        Ok((out, stats))
    }

    fn spans(extents: &[Extent]) -> Vec<(u64, u64)> {
        extents.iter().map(|e| (e.first_page, e.pages)).collect()
    }

    fn all_chunks(q: &WorkQueue<'_>) -> Vec<Chunk> {
        (0..q.total_chunks()).map(|i| q.chunk(i).unwrap()).collect()
    }

    #[test]
    fn defaults() {
        let w = WritePolicy::default();
        assert_eq!(
            (w.max_io, w.max_gap_pages, w.write_zero_pages),
            (1 << 20, 16, false)
        );
        assert_eq!(WritePolicy::for_page_size(4096), w);
        assert_eq!(WritePolicy::for_page_size(65536).max_gap_pages, 1);
        assert_eq!(WritePolicy::for_page_size(1 << 21).max_gap_pages, 0);
        assert_eq!(WritePolicy::for_page_size(0).max_gap_pages, 0);
        let r = ReadPolicy::default();
        assert_eq!((r.max_io, r.max_gap_pages), (1 << 20, 0));
    }

    #[test]
    fn empty_blocks_yield_no_chunks() {
        let mut p = Planner::new(0x5c, PS, true).unwrap();
        let layouts = [
            p.push_empty(3, 16 << 20).unwrap(),
            p.push(4, 0).unwrap(),
            p.push(5, 3 * PS).unwrap(),
            p.push_empty(3, 8 * PS).unwrap(),
        ];
        let q = WorkQueue::new(&layouts, DEFAULT_CHUNK_BYTES).unwrap();
        assert_eq!(q.total_chunks(), 1);
        assert_eq!(q.total_pages(), 3);
        // Block smaller than a chunk: one short chunk.
        assert_eq!(
            q.claim(),
            Some(Chunk {
                block: 2,
                start: 0,
                end: 3
            })
        );
        assert_eq!(q.claim(), None);
        assert_eq!(q.claim(), None);
        assert_eq!(q.claimed(), 1);
        // An empty chunk of an empty block is fine and does nothing.
        let none = Chunk {
            block: 0,
            start: 0,
            end: 0,
        };
        let (e, s) = collect_writes(&layouts[0], 0, &none, &[], &WritePolicy::default()).unwrap();
        assert!(e.is_empty());
        assert_eq!(s, WriteStats::default());
        // Pages of a block without page region are an error.
        let some = Chunk {
            block: 0,
            start: 0,
            end: 1,
        };
        assert_eq!(
            collect_writes(&layouts[0], 0, &some, &[false], &WritePolicy::default()),
            Err(ScheduleError::NoPageRegion { block: 0 })
        );
        assert_eq!(
            collect_reads(
                &layouts[3],
                3,
                &Chunk { block: 3, ..some },
                &[true],
                &ReadPolicy::default()
            ),
            Err(ScheduleError::NoPageRegion { block: 3 })
        );
        // No blocks at all.
        let q = WorkQueue::new(&[], DEFAULT_CHUNK_BYTES).unwrap();
        assert_eq!((q.total_chunks(), q.claim()), (0, None));
        assert!(WorkQueue::new(&[], 0).is_err());
    }

    #[test]
    fn chunks_of_uneven_blocks() {
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layouts = [p.push(6, 300 * PS).unwrap(), p.push(7, 256 * PS).unwrap()];
        let q = WorkQueue::new(&layouts, 1 << 20).unwrap();
        assert_eq!(q.chunk_pages(), 256);
        assert_eq!(q.page_size(), PS);
        assert_eq!(q.total_pages(), 556);
        let chunks: Vec<_> = core::iter::from_fn(|| q.claim()).collect();
        assert_eq!(
            chunks,
            [
                Chunk {
                    block: 0,
                    start: 0,
                    end: 256
                },
                Chunk {
                    block: 0,
                    start: 256,
                    end: 300
                },
                Chunk {
                    block: 1,
                    start: 0,
                    end: 256
                },
            ]
        );
        assert_eq!(q.chunk(3), None);
        assert_eq!(q.claimed(), 3);
        // Last, short chunk: a non-zero last page of the block is written at the block's end.
        let mut zero = vec![true; 44];
        zero[43] = false;
        zero[40] = false;
        let (e, s) =
            collect_writes(&layouts[0], 0, &chunks[1], &zero, &WritePolicy::default()).unwrap();
        assert_eq!(spans(&e), [(296, 4)]);
        assert_eq!(e[0].file_offset, layouts[0].pages_offset + 296 * PS);
        assert_eq!(e[0].file_offset + e[0].len, layouts[0].pages_end());
        assert_eq!(e[0].mem_offset, 296 * PS);
        assert_eq!(
            s,
            WriteStats {
                extents: 1,
                data_pages: 2,
                zero_pages_written: 2,
                zero_pages_skipped: 40
            }
        );
    }

    #[test]
    fn bad_sizes_are_errors() {
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layouts = [p.push(6, 16 * PS).unwrap()];
        for chunk_bytes in [0, 4095, 4097, 6000] {
            assert_eq!(
                WorkQueue::new(&layouts, chunk_bytes).err(),
                Some(ScheduleError::BadChunkSize {
                    chunk_bytes,
                    page_size: PS
                })
            );
        }
        let chunk = Chunk {
            block: 0,
            start: 0,
            end: 16,
        };
        for max_io in [0, 100, 4095, 4097, (1 << 20) + 1] {
            let policy = WritePolicy {
                max_io,
                ..WritePolicy::default()
            };
            let expected = Err(ScheduleError::BadMaxIo {
                max_io,
                page_size: PS,
            });
            assert_eq!(
                collect_writes(&layouts[0], 0, &chunk, &[false; 16], &policy),
                expected
            );
            let policy = ReadPolicy {
                max_io,
                ..ReadPolicy::default()
            };
            assert_eq!(
                collect_reads(&layouts[0], 0, &chunk, &[true; 16], &policy).err(),
                expected.err()
            );
        }
        // Mixed page sizes, odd page sizes, lengths.
        let mut other = layouts[0];
        other.page_size = 8192;
        assert_eq!(
            WorkQueue::new(&[layouts[0], other], 1 << 20).err(),
            Some(ScheduleError::MixedPageSizes)
        );
        let mut odd = layouts[0];
        odd.page_size = 3000;
        assert_eq!(
            WorkQueue::new(&[odd], 6000).err(),
            Some(ScheduleError::BadPageSize {
                block: 0,
                page_size: 3000
            })
        );
        let mut short = layouts[0];
        short.length = 100;
        assert!(matches!(
            WorkQueue::new(&[short], 1 << 20),
            Err(ScheduleError::BadLength { .. })
        ));
        let mut unaligned = layouts[0];
        unaligned.pages_offset += 512;
        assert!(matches!(
            WorkQueue::new(&[unaligned], 1 << 20),
            Err(ScheduleError::BadAlignment { .. })
        ));
        assert!(matches!(
            collect_writes(&unaligned, 0, &chunk, &[false; 16], &WritePolicy::default()),
            Err(ScheduleError::BadAlignment { .. })
        ));
        let mut huge = layouts[0];
        huge.pages_offset = !(PS - 1);
        assert_eq!(
            WorkQueue::new(&[huge], 1 << 20).err(),
            Some(ScheduleError::Overflow)
        );
        assert_eq!(
            collect_reads(&huge, 0, &chunk, &[true; 16], &ReadPolicy::default()).err(),
            Some(ScheduleError::Overflow)
        );
        // Chunk and bitmap mismatches.
        let policy = WritePolicy::default();
        assert_eq!(
            collect_writes(&layouts[0], 1, &chunk, &[false; 16], &policy).err(),
            Some(ScheduleError::WrongBlock {
                block: 1,
                chunk_block: 0
            })
        );
        let past = Chunk {
            block: 0,
            start: 8,
            end: 17,
        };
        assert_eq!(
            collect_writes(&layouts[0], 0, &past, &[false; 9], &policy).err(),
            Some(ScheduleError::BadChunk {
                start: 8,
                end: 17,
                pages: 16
            })
        );
        let reversed = Chunk {
            block: 0,
            start: 9,
            end: 8,
        };
        assert!(matches!(
            collect_writes(&layouts[0], 0, &reversed, &[], &policy),
            Err(ScheduleError::BadChunk { .. })
        ));
        assert_eq!(
            collect_writes(&layouts[0], 0, &chunk, &[false; 15], &policy).err(),
            Some(ScheduleError::BitmapTooShort {
                bits: 15,
                needed: 16
            })
        );
        let tail = Chunk {
            block: 0,
            start: 8,
            end: 16,
        };
        assert_eq!(
            collect_reads(&layouts[0], 0, &tail, &[true; 15], &ReadPolicy::default()).err(),
            Some(ScheduleError::BitmapTooShort {
                bits: 15,
                needed: 16
            })
        );
        // Every error has a message.
        let msg = std::format!(
            "{}",
            ScheduleError::BadMaxIo {
                max_io: 5,
                page_size: 4096
            }
        );
        assert!(msg.contains("4096"));
    }

    #[test]
    fn scattered_zero_pages_become_one_write() {
        // The pattern that makes QEMU issue 4 KiB O_DIRECT writes: every other page zero.
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layout = p.push(6, 256 * PS).unwrap();
        let chunk = Chunk {
            block: 0,
            start: 0,
            end: 256,
        };
        let zero: Vec<bool> = (0..256).map(|i| i % 2 == 1).collect();
        let (e, s) = collect_writes(&layout, 0, &chunk, &zero, &WritePolicy::default()).unwrap();
        assert_eq!(spans(&e), [(0, 255)]);
        assert_eq!(e[0].len, 255 * PS);
        assert_eq!(
            s,
            WriteStats {
                extents: 1,
                data_pages: 128,
                zero_pages_written: 127,
                zero_pages_skipped: 1
            }
        );
        // QEMU-like policy: one write per data page.
        let strict = WritePolicy {
            max_gap_pages: 0,
            ..WritePolicy::default()
        };
        let (e, _) = collect_writes(&layout, 0, &chunk, &zero, &strict).unwrap();
        assert_eq!(e.len(), 128);
        // Writing everything.
        let all = WritePolicy {
            write_zero_pages: true,
            max_io: 100 * PS,
            ..WritePolicy::default()
        };
        let (e, s) = collect_writes(&layout, 0, &chunk, &zero, &all).unwrap();
        assert_eq!(spans(&e), [(0, 100), (100, 100), (200, 56)]);
        assert_eq!(
            s,
            WriteStats {
                extents: 3,
                data_pages: 128,
                zero_pages_written: 128,
                zero_pages_skipped: 0
            }
        );
    }

    #[test]
    fn gaps_and_max_io() {
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layout = p.push(6, 64 * PS).unwrap();
        let chunk = Chunk {
            block: 0,
            start: 0,
            end: 64,
        };
        // data: 2..6, 8..10, 30..40, 42..64; zero elsewhere.
        let zero: Vec<bool> = (0..64)
            .map(|i| {
                !((2..6).contains(&i)
                    || (8..10).contains(&i)
                    || (30..40).contains(&i)
                    || (42..64).contains(&i))
            })
            .collect();
        let policy = WritePolicy {
            max_io: 16 * PS,
            max_gap_pages: 2,
            write_zero_pages: false,
        };
        let (e, s) = collect_writes(&layout, 0, &chunk, &zero, &policy).unwrap();
        // 2..10 merged (gap 2); gap 20 skipped; 30..40 + gap 2 + 42..46 fills 16 pages.
        assert_eq!(spans(&e), [(2, 8), (30, 16), (46, 16), (62, 2)]);
        assert_eq!(s.data_pages, 38);
        assert_eq!(s.zero_pages_written, 4);
        assert_eq!(s.zero_pages_skipped, 22);
        // A gap that does not fit in the current extent ends it before the gap.
        let policy = WritePolicy {
            max_io: 11 * PS,
            ..policy
        };
        let (e, _) = collect_writes(&layout, 0, &chunk, &zero, &policy).unwrap();
        assert_eq!(spans(&e), [(2, 8), (30, 10), (42, 11), (53, 11)]);
    }

    #[test]
    fn reads_follow_stored_bits() {
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layout = p.push(6, 600 * PS).unwrap();
        // Stored: 0..300 and 303..600, chunk 256..600.
        let stored: Vec<bool> = (0..600).map(|i| !(300..303).contains(&i)).collect();
        let chunk = Chunk {
            block: 0,
            start: 256,
            end: 600,
        };
        let (e, s) = collect_reads(&layout, 0, &chunk, &stored, &ReadPolicy::default()).unwrap();
        assert_eq!(spans(&e), [(256, 44), (303, 256), (559, 41)]);
        assert_eq!(e[1].len, 1 << 20);
        assert_eq!(e[1].file_offset, layout.pages_offset + 303 * PS);
        assert_eq!(
            s,
            ReadStats {
                extents: 3,
                pages_read: 341,
                gap_pages_read: 0
            }
        );
        let merged = ReadPolicy {
            max_gap_pages: 3,
            ..ReadPolicy::default()
        };
        let (e, s) = collect_reads(&layout, 0, &chunk, &stored, &merged).unwrap();
        assert_eq!(spans(&e), [(256, 256), (512, 88)]);
        assert_eq!(
            (s.pages_read, s.gap_pages_read, s.pages_total()),
            (341, 3, 344)
        );
        // Nothing stored: nothing read.
        let (e, s) = collect_reads(&layout, 0, &chunk, &[false; 600], &merged).unwrap();
        assert!(e.is_empty());
        assert_eq!(s, ReadStats::default());
    }

    #[test]
    fn stop_cancels() {
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layouts = [p.push(6, 4 << 20).unwrap()];
        let q = WorkQueue::new(&layouts, 1 << 20).unwrap();
        assert!(q.claim().is_some());
        assert!(!q.is_stopped());
        q.stop();
        assert!(q.is_stopped());
        assert_eq!(q.claim(), None);
        assert_eq!(q.claimed(), 1);
    }

    #[test]
    fn threads_claim_every_chunk_once() {
        let mut p = Planner::new(0x5c, PS, false).unwrap();
        let layouts = [
            p.push(6, 64 << 20).unwrap(),
            p.push_empty(3, 1 << 20).unwrap(),
            p.push(7, 3 * PS).unwrap(),
            p.push(8, (33 << 20) + 5 * PS).unwrap(),
        ];
        let q = WorkQueue::new(&layouts, 64 * PS).unwrap();
        let expected = all_chunks(&q);
        assert_eq!(expected.len() as u64, q.total_chunks());
        let per_thread: Vec<Vec<Chunk>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        while let Some(c) = q.claim() {
                            mine.push(c);
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<Chunk> = Vec::new();
        for mine in &per_thread {
            // Each thread sees its chunks in ascending order.
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
            all.extend(mine);
        }
        let unique: HashSet<Chunk> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "a chunk was claimed twice");
        all.sort();
        assert_eq!(all, expected);
        assert_eq!(q.claim(), None);
        assert_eq!(q.claimed(), q.total_chunks());
    }

    /// Checks the write extents of one chunk against the zero map; returns per-page cover
    /// counts (relative to the chunk).
    fn check_writes(
        layout: &BlockLayout,
        block: usize,
        chunk: &Chunk,
        zero: &[bool],
        policy: &WritePolicy,
        extents: &[Extent],
        stats: &WriteStats,
    ) {
        let ps = layout.page_size;
        let max_pages = policy.max_io / ps;
        let mut cover = vec![0u32; zero.len()];
        let mut prev_end = chunk.start;
        for (i, e) in extents.iter().enumerate() {
            check_extent(layout, block, chunk, policy.max_io, e);
            assert!(e.first_page >= prev_end, "extents ascend without overlap");
            if i > 0 && !policy.write_zero_pages {
                // Greedy: the previous extent could not have taken this one's first page.
                let gap = e.first_page - prev_end;
                let prev = &extents[i - 1];
                assert!(
                    gap > policy.max_gap_pages || prev.pages + gap + 1 > max_pages,
                    "extents {prev:?} and {e:?} should have been merged"
                );
            }
            prev_end = e.end_page();
            for p in e.page_range() {
                cover[(p - chunk.start) as usize] += 1;
            }
            if !policy.write_zero_pages {
                let rel = |p: u64| (p - chunk.start) as usize;
                assert!(!zero[rel(e.first_page)], "extent starts with a zero page");
                assert!(!zero[rel(e.end_page() - 1)], "extent ends with a zero page");
                let mut run = 0;
                for p in e.page_range() {
                    if zero[rel(p)] {
                        run += 1;
                        assert!(run <= policy.max_gap_pages, "zero gap too long");
                    } else {
                        run = 0;
                    }
                }
            }
        }
        let mut data = 0;
        let mut zero_written = 0;
        for (i, z) in zero.iter().enumerate() {
            if policy.write_zero_pages || !z {
                assert_eq!(cover[i], 1, "page {i} not covered exactly once");
            } else {
                assert!(cover[i] <= 1);
            }
            if !z {
                data += 1;
            } else if cover[i] == 1 {
                zero_written += 1;
            }
        }
        let zeros = zero.iter().filter(|z| **z).count() as u64;
        assert_eq!(
            *stats,
            WriteStats {
                extents: extents.len() as u64,
                data_pages: data,
                zero_pages_written: zero_written,
                zero_pages_skipped: zeros - zero_written,
            }
        );
    }

    fn check_extent(layout: &BlockLayout, block: usize, chunk: &Chunk, max_io: u64, e: &Extent) {
        let ps = layout.page_size;
        assert_eq!(e.block, block);
        assert!(e.pages > 0);
        assert!(e.first_page >= chunk.start && e.end_page() <= chunk.end);
        assert_eq!(e.len, e.pages * ps);
        assert!(e.len <= max_io);
        assert_eq!(e.file_offset % ps, 0);
        assert_eq!(e.mem_offset, e.first_page * ps);
        assert_eq!(Ok(e.file_offset), layout.page_offset(e.first_page));
        assert!(e.file_offset >= layout.pages_offset);
        assert!(e.file_offset + e.len <= layout.pages_end());
    }

    fn check_reads(
        layout: &BlockLayout,
        block: usize,
        chunk: &Chunk,
        stored: &[bool],
        policy: &ReadPolicy,
        extents: &[Extent],
        stats: &ReadStats,
    ) {
        let max_pages = policy.max_io / layout.page_size;
        let mut cover = vec![0u32; stored.len()];
        let mut prev_end = chunk.start;
        let mut gaps = 0;
        for (i, e) in extents.iter().enumerate() {
            check_extent(layout, block, chunk, policy.max_io, e);
            assert!(e.first_page >= prev_end);
            if i > 0 {
                let gap = e.first_page - prev_end;
                let prev = &extents[i - 1];
                assert!(gap > policy.max_gap_pages || prev.pages + gap + 1 > max_pages);
            }
            prev_end = e.end_page();
            assert!(stored[e.first_page as usize] && stored[e.end_page() as usize - 1]);
            let mut run = 0;
            for p in e.page_range() {
                cover[p as usize] += 1;
                if stored[p as usize] {
                    run = 0;
                } else {
                    run += 1;
                    gaps += 1;
                    assert!(run <= policy.max_gap_pages);
                }
            }
        }
        for (p, s) in stored.iter().enumerate() {
            let inside = chunk.range().contains(&(p as u64));
            if *s && inside {
                assert_eq!(cover[p], 1, "stored page {p} not read exactly once");
            } else {
                assert!(cover[p] <= 1);
                if !inside {
                    assert_eq!(cover[p], 0);
                }
            }
        }
        let stored_in = chunk.range().filter(|p| stored[*p as usize]).count() as u64;
        assert_eq!(
            *stats,
            ReadStats {
                extents: extents.len() as u64,
                pages_read: stored_in,
                gap_pages_read: gaps,
            }
        );
    }

    /// A bit pattern from run lengths, repeated to `n` bits.
    fn pattern(runs: &[(bool, u64)], n: u64) -> Vec<bool> {
        let mut out = Vec::with_capacity(n as usize);
        if runs.is_empty() {
            out.resize(n as usize, false);
            return out;
        }
        'fill: loop {
            for (v, len) in runs {
                for _ in 0..*len {
                    if out.len() as u64 == n {
                        break 'fill;
                    }
                    out.push(*v);
                }
            }
        }
        out
    }

    fn block_strategy() -> impl Strategy<Value = (u64, bool)> {
        (0u64..700, prop::bool::weighted(0.15))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn extents_cover_pages(
            blocks in prop::collection::vec(block_strategy(), 0..5),
            page_shift in prop::sample::select(vec![9u32, 12, 16]),
            chunk_pages in 1u64..300,
            max_io_pages in 1u64..300,
            write_gap in 0u64..24,
            read_gap in 0u64..24,
            write_zero_pages: bool,
            zero_runs in prop::collection::vec((any::<bool>(), 1u64..40), 0..12),
            stored_runs in prop::collection::vec((any::<bool>(), 1u64..40), 0..12),
            first_record in 0u64..(1 << 24),
        ) {
            let ps = 1u64 << page_shift;
            let mut planner = Planner::new(first_record, ps, false).unwrap();
            let layouts: Vec<BlockLayout> = blocks
                .iter()
                .map(|(pages, empty)| {
                    if *empty {
                        planner.push_empty(4, pages * ps).unwrap()
                    } else {
                        planner.push(4, pages * ps).unwrap()
                    }
                })
                .collect();
            let q = WorkQueue::new(&layouts, chunk_pages * ps).unwrap();
            let wpol = WritePolicy { max_io: max_io_pages * ps, max_gap_pages: write_gap, write_zero_pages };
            let rpol = ReadPolicy { max_io: max_io_pages * ps, max_gap_pages: read_gap };

            // Chunks tile every non-empty block exactly, in order, on chunk boundaries.
            let chunks: Vec<Chunk> = core::iter::from_fn(|| q.claim()).collect();
            prop_assert_eq!(chunks.len() as u64, q.total_chunks());
            prop_assert!(chunks.windows(2).all(|w| w[0] < w[1]));
            let mut expected_pages = 0;
            for (b, l) in layouts.iter().enumerate() {
                let mine: Vec<&Chunk> = chunks.iter().filter(|c| c.block == b).collect();
                let pages = if l.is_empty() { 0 } else { l.num_pages() };
                expected_pages += pages;
                let mut next = 0;
                for c in &mine {
                    prop_assert_eq!(c.start, next);
                    prop_assert_eq!(c.start % chunk_pages, 0);
                    prop_assert!(c.end > c.start && c.end <= pages);
                    prop_assert!(c.pages() == chunk_pages || c.end == pages);
                    next = c.end;
                }
                prop_assert_eq!(next, pages);
            }
            prop_assert_eq!(q.total_pages(), expected_pages);

            let mut file_ranges = Vec::new();
            for (b, l) in layouts.iter().enumerate() {
                let pages = l.num_pages();
                let zero_all = pattern(&zero_runs, pages);
                let stored = pattern(&stored_runs, pages);
                let stored_words = bitmap_words(&stored);
                let stored_map = BitmapRef::new(&stored_words, pages).unwrap();
                for c in chunks.iter().filter(|c| c.block == b) {
                    let zero = &zero_all[c.start as usize..c.end as usize];
                    let words = bitmap_words(zero);
                    let map = BitmapRef::new(&words, c.pages()).unwrap();
                    let mut out = Vec::new();
                    let stats = write_extents(l, b, c, &map, &wpol, |e| out.push(e)).unwrap();
                    check_writes(l, b, c, zero, &wpol, &out, &stats);
                    file_ranges.extend(out.iter().map(|e| (e.file_offset, e.file_offset + e.len)));

                    let mut reads = Vec::new();
                    let rstats = read_extents(l, b, c, &stored_map, &rpol, |e| reads.push(e)).unwrap();
                    check_reads(l, b, c, &stored, &rpol, &reads, &rstats);
                }
            }
            // Writes of all chunks of all blocks ascend in the file and never overlap.
            prop_assert!(file_ranges.windows(2).all(|w| w[0].1 <= w[1].0));
        }

        #[test]
        fn bad_max_io_is_an_error(extra in 1u64..4096, pages in 0u64..4) {
            let mut planner = Planner::new(0, PS, false).unwrap();
            let l = planner.push(1, 8 * PS).unwrap();
            let c = Chunk { block: 0, start: 0, end: 8 };
            let max_io = pages * PS + extra % PS;
            prop_assume!(max_io % PS != 0 || max_io == 0);
            let words = [0u64; 1];
            let map = BitmapRef::new(&words, 8).unwrap();
            let w = WritePolicy { max_io, ..WritePolicy::default() };
            prop_assert_eq!(
                write_extents(&l, 0, &c, &map, &w, |_| {}),
                Err(ScheduleError::BadMaxIo { max_io, page_size: PS })
            );
            let r = ReadPolicy { max_io, ..ReadPolicy::default() };
            prop_assert_eq!(
                read_extents(&l, 0, &c, &map, &r, |_| {}),
                Err(ScheduleError::BadMaxIo { max_io, page_size: PS })
            );
        }
    }
}
