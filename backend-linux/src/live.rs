//! Live save: saving a running guest in passes.
//!
//! mapped-ram gives every page one fixed place in the file, so a guest can be saved while it
//! runs: a first pass writes all of RAM, each further pass rewrites only the pages the guest
//! dirtied since the previous one — in place, the file never grows — and a last pass with the
//! guest paused makes the file exact. This is QEMU's precopy migration to a `file:` URI.
//!
//! ```text
//! let mut live = LiveSave::begin(path, &regions, &LiveOptions::default())?; // stream start, block records
//! live.pass(&[&dirty])?;           // first pass: everything (the bitmap is ignored)
//! live.pass(&[&kvm_dirty_log])?;   // as often as useful: only the dirty pages
//! /* pause the vCPUs */
//! live.finish(&[&kvm_dirty_log], Some(&device_state))?;  // last pass, bitmaps, tail, sync, rename
//! ```
//!
//! * **Dirty bitmaps** use KVM's dirty-log layout (`KVM_GET_DIRTY_LOG`): one bit per page of the
//!   region, page `k` is bit `k % 64` of `u64` word `k / 64` (little-endian words on the hosts we
//!   support), so a VMM passes KVM's log for the region's memory slot straight in. Bits past the
//!   region's pages are ignored. The first pass writes every page whatever its bitmap says; a
//!   VMM fetches (and so clears) the dirty log *before* each pass, so that a page written during
//!   the pass shows up in the next log.
//! * **Bitmap semantics are QEMU's** (spec §d.5): a page's bit is set when the last pass that
//!   processed it found data, and cleared when it found the page all zero. A page written in an
//!   early pass and zero later has its bit cleared; its old bytes would stay in the file as
//!   stale data under a clear bit, as QEMU leaves them. By default
//!   ([`LiveOptions::punch_holes`]) we punch a hole there (`fallocate(PUNCH_HOLE)`), so the file
//!   holds zeros wherever a bit is clear — which lets a lazy restore ([`crate::lazy`]) map the
//!   file without reading those pages.
//! * **Reading a running guest**: guest memory is a [`GuestMemory`], which never makes a `&[u8]`
//!   of memory that may change. Each run of dirty pages is copied (with atomic or volatile loads)
//!   into a channel's aligned buffer, and zero detection, checksums and the `pwritev` all work
//!   on that copy: a page in the file is always one consistent copy of the page, never a mix of
//!   what the guest wrote while the kernel read it.
//! * Everything else is as in [`crate::save()`]: a temporary file beside the target, renamed
//!   over it only by [`LiveSave::finish`] after the data is synced (dropping a `LiveSave` removes
//!   the temporary file and leaves the previous snapshot); channel threads, each with its own
//!   descriptor (`O_DIRECT` when on), claim 1 MiB chunks, detect zero pages and write large
//!   extents; the bitmaps are written once, at the end.
//!
//! The finished file records nothing about how it was written: a file saved in 20 passes is
//! byte-for-byte a file that a single save of the final memory could have produced (apart
//! from the bytes of pages whose bit is clear, which no reader looks at).

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mapped_ram_core::bitmap::{self, words_for, AtomicBitmap, Bitmap, BitmapRef};
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::{self, Chunk, WorkQueue, WritePolicy};
use rustix::fs::FallocateFlags;

use crate::error::{IoFailure, Op, SaveError};
use crate::file;
use crate::integrity;
use crate::mem::GuestMemory;
use crate::progress::Cancel;
use crate::save::{
    self, open_channels, parent_dir, Plan, SaveOptions, SaveReport, TempFile, ZeroPages,
};
use crate::sys::AlignedBuf;
use crate::zero;

/// One guest RAM block of a live save or an incremental update.
#[derive(Debug, Clone, Copy)]
pub struct LiveRegion<'m> {
    /// The block's id string (QEMU's `idstr`, e.g. `pc.ram`).
    pub name: &'m str,
    /// The block's memory, which the guest may keep writing.
    pub memory: GuestMemory<'m>,
    /// The target page size (4096 on x86-64); dirty bitmaps have one bit per such page.
    pub page_size: u64,
}

/// How to save live.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// Channels, direct I/O, zero pages, machine, offset, fsync, checksums, chunk size, gap
    /// policy and cancellation, as for [`crate::save()`]. `device_state` is used by
    /// [`LiveSave::finish`] unless it is given one.
    pub save: SaveOptions,
    /// Punch a hole (`fallocate(PUNCH_HOLE)`) where a page that had been written turned out
    /// zero in a later pass, so the file holds zeros under every clear bit. Off: the old bytes
    /// stay, as QEMU leaves them (stale bytes under a clear bit).
    pub punch_holes: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            save: SaveOptions::default(),
            punch_holes: true,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Pass number, from 0.
    pub pass: u32,
    /// Pages processed (marked dirty, or all pages in the first pass).
    pub pages_dirty: u64,
    /// Of those, pages written as data (bit set).
    pub pages_written: u64,
    /// Of those, zero pages (bit cleared).
    pub zero_pages: u64,
    /// Pages whose earlier bytes were punched out because they turned zero.
    pub pages_punched: u64,
    /// Bytes of page data written (data pages plus zero pages inside extents).
    pub data_bytes: u64,
    /// Page-data writes issued.
    pub writes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// What a live save did in all.
#[derive(Debug, Clone)]
pub struct LiveReport {
    /// Totals over all passes, as a save reports them (`data_bytes` and `writes` summed,
    /// `seconds` from [`LiveSave::begin`] to the end of [`LiveSave::finish`]).
    pub save: SaveReport,
    /// Each pass, the final one last.
    pub passes: Vec<PassReport>,
}

/// Which pages a pass processes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dirty<'d> {
    /// Every page.
    All,
    /// The pages whose bit is set, one bitmap per region (KVM dirty-log layout).
    Bitmaps(&'d [&'d [u64]]),
}

/// The descriptors a pass writes through.
pub(crate) struct PassIo<'a> {
    /// Buffered main descriptor: hole punching.
    pub main: BorrowedFd<'a>,
    /// One descriptor per channel thread.
    pub channels: Vec<BorrowedFd<'a>>,
    /// The file, for error messages.
    pub path: &'a Path,
    /// Cancellation.
    pub cancel: Option<&'a Cancel>,
}

/// The state that passes update: what the file holds for every page.
pub(crate) struct PassEngine {
    /// Block layouts, in region order.
    pub layouts: Vec<BlockLayout>,
    /// The file bitmap (bit set = page stored), per block.
    pub stored: Vec<Vec<AtomicU64>>,
    /// Pages whose slot in the file may hold non-zero bytes, per block.
    pub bytes: Vec<Vec<AtomicU64>>,
    /// Page checksums (0 for clear bits), when the file has them.
    pub sums: Option<Vec<Vec<AtomicU32>>>,
    pub policy: WritePolicy,
    pub page_size: u64,
    pub punch: bool,
    pub chunk_bytes: u64,
}

fn atomic_words(words: u64) -> Vec<AtomicU64> {
    (0..words).map(|_| AtomicU64::new(0)).collect()
}

fn opt_err(e: impl std::fmt::Display) -> SaveError {
    SaveError::Options(e.to_string())
}

#[derive(Default)]
struct PassCounters {
    pages_dirty: AtomicU64,
    pages_written: AtomicU64,
    zero_pages: AtomicU64,
    pages_punched: AtomicU64,
    data_bytes: AtomicU64,
    writes: AtomicU64,
}

impl PassEngine {
    /// An engine for a new, empty file: nothing stored.
    pub fn new(
        layouts: Vec<BlockLayout>,
        page_size: u64,
        opts: &SaveOptions,
        punch: bool,
        checksums: bool,
    ) -> Self {
        let stored = layouts
            .iter()
            .map(|l| atomic_words(l.bitmap_words()))
            .collect();
        let bytes = layouts
            .iter()
            .map(|l| atomic_words(l.bitmap_words()))
            .collect();
        let sums = checksums.then(|| {
            layouts
                .iter()
                .map(|l| (0..l.num_pages()).map(|_| AtomicU32::new(0)).collect())
                .collect()
        });
        Self {
            layouts,
            stored,
            bytes,
            sums,
            policy: WritePolicy {
                max_io: opts.chunk_bytes,
                max_gap_pages: opts.max_gap_pages,
                write_zero_pages: opts.zero_pages == ZeroPages::Write,
            },
            page_size,
            punch,
            chunk_bytes: opts.chunk_bytes,
        }
    }

    /// The current bitmap of block `block`, masked to its pages.
    pub fn bitmap(&self, block: usize) -> Result<Vec<u64>, SaveError> {
        let layout = &self.layouts[block];
        let words = &self.stored[block];
        let map = AtomicBitmap::new(words, layout.num_pages()).map_err(opt_err)?;
        let mut snap = vec![0u64; words.len()];
        map.snapshot(&mut snap).map_err(opt_err)?;
        Ok(snap)
    }

    /// Checks that `dirty` has one bitmap per region, each long enough.
    fn check_dirty(&self, regions: &[LiveRegion<'_>], dirty: Dirty<'_>) -> Result<(), SaveError> {
        let Dirty::Bitmaps(maps) = dirty else {
            return Ok(());
        };
        if maps.len() != regions.len() {
            return Err(SaveError::Options(format!(
                "{} dirty bitmaps for {} regions (give one per region, in region order)",
                maps.len(),
                regions.len()
            )));
        }
        for ((map, region), layout) in maps.iter().zip(regions).zip(&self.layouts) {
            let needed = words_for(layout.num_pages());
            if (map.len() as u64) < needed {
                return Err(SaveError::Options(format!(
                    "dirty bitmap of block {:?} has {} words; its {} pages need {needed}",
                    region.name,
                    map.len(),
                    layout.num_pages()
                )));
            }
        }
        Ok(())
    }

    /// Runs one pass: every channel thread claims chunks and writes the dirty pages of each.
    pub fn run(
        &self,
        io: &PassIo<'_>,
        regions: &[LiveRegion<'_>],
        dirty: Dirty<'_>,
        pass: u32,
    ) -> Result<PassReport, SaveError> {
        let started = Instant::now();
        if regions.len() != self.layouts.len() {
            return Err(SaveError::Options(format!(
                "{} regions for a file of {} blocks",
                regions.len(),
                self.layouts.len()
            )));
        }
        self.check_dirty(regions, dirty)?;
        let queue = WorkQueue::new(&self.layouts, self.chunk_bytes).map_err(opt_err)?;
        let counters = PassCounters::default();
        let failure: Mutex<Option<SaveError>> = Mutex::new(None);
        let cancelled = || io.cancel.is_some_and(Cancel::is_cancelled);
        std::thread::scope(|s| {
            let handles: Vec<_> = io
                .channels
                .iter()
                .map(|fd| {
                    let (queue, counters, failure) = (&queue, &counters, &failure);
                    let fd = *fd;
                    s.spawn(move || {
                        let mut work = ChannelWork::new(self, queue.chunk_pages());
                        while let Some(chunk) = queue.claim() {
                            if cancelled() {
                                queue.stop();
                                return;
                            }
                            let done = work.chunk(self, io, fd, regions, dirty, &chunk, counters);
                            if let Err(e) = done {
                                queue.stop();
                                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                                slot.get_or_insert(e);
                                return;
                            }
                        }
                    })
                })
                .collect();
            while handles.iter().any(|h| !h.is_finished()) {
                if cancelled() {
                    queue.stop();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        if let Some(err) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(err);
        }
        if cancelled() {
            return Err(SaveError::Cancelled);
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(PassReport {
            pass,
            pages_dirty: get(&counters.pages_dirty),
            pages_written: get(&counters.pages_written),
            zero_pages: get(&counters.zero_pages),
            pages_punched: get(&counters.pages_punched),
            data_bytes: get(&counters.data_bytes),
            writes: get(&counters.writes),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// A channel thread's buffers.
struct ChannelWork {
    /// Copy of the run of dirty pages being written (aligned for `O_DIRECT`).
    copy: AlignedBuf,
    /// Zero pages of the run.
    zero: Vec<u64>,
    /// Pages of the run written by an extent.
    written: Vec<u64>,
}

impl ChannelWork {
    fn new(engine: &PassEngine, chunk_pages: u64) -> Self {
        let words = words_for(chunk_pages) as usize;
        Self {
            copy: AlignedBuf::new(engine.chunk_bytes as usize),
            zero: vec![0; words],
            written: vec![0; words],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        engine: &PassEngine,
        io: &PassIo<'_>,
        fd: BorrowedFd<'_>,
        regions: &[LiveRegion<'_>],
        dirty: Dirty<'_>,
        chunk: &Chunk,
        counters: &PassCounters,
    ) -> Result<(), SaveError> {
        let layout = &engine.layouts[chunk.block];
        let pages = layout.num_pages();
        let runs: Vec<Range<u64>> = match dirty {
            Dirty::All => vec![chunk.range()],
            Dirty::Bitmaps(maps) => BitmapRef::new(maps[chunk.block], pages)
                .map_err(opt_err)?
                .runs_in(chunk.range(), true)
                .collect(),
        };
        for run in runs {
            self.run(
                engine,
                io,
                fd,
                &regions[chunk.block],
                chunk.block,
                run,
                counters,
            )?;
        }
        Ok(())
    }

    /// Writes the dirty pages `run` (inside one chunk) of block `block`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        engine: &PassEngine,
        io: &PassIo<'_>,
        fd: BorrowedFd<'_>,
        region: &LiveRegion<'_>,
        block: usize,
        run: Range<u64>,
        counters: &PassCounters,
    ) -> Result<(), SaveError> {
        let layout = &engine.layouts[block];
        let ps = engine.page_size;
        let n = run.end - run.start;
        let copy = &mut self.copy.as_mut_slice()[..(n * ps) as usize];
        region.memory.copy_to((run.start * ps) as usize, copy);
        let copy = &*copy;
        let page = |i: u64| &copy[(i * ps) as usize..((i + 1) * ps) as usize];

        let mut zmap = Bitmap::new(&mut self.zero, n).map_err(opt_err)?;
        zmap.clear_all();
        if !engine.policy.write_zero_pages {
            for i in 0..n {
                if zero::is_zero(page(i)) {
                    zmap.set(i).map_err(opt_err)?;
                }
            }
        }
        let zref = zmap.as_ref();
        if let Some(sums) = &engine.sums {
            let sums = &sums[block];
            for i in 0..n {
                let index = run.start + i;
                let sum = if zref.test(i) {
                    0
                } else {
                    integrity::page_checksum(page(i), index)
                };
                sums[index as usize].store(sum, Ordering::Relaxed);
            }
        }
        let mut written = Bitmap::new(&mut self.written, n).map_err(opt_err)?;
        written.clear_all();
        let sub = Chunk {
            block,
            start: run.start,
            end: run.end,
        };
        let mut result = Ok(());
        schedule::write_extents(layout, block, &sub, &zref, &engine.policy, |ext| {
            if result.is_err() {
                return;
            }
            let from = ((ext.first_page - run.start) * ps) as usize;
            let data = &copy[from..from + ext.len as usize];
            if let Err(e) = file::pwritev_all(fd, data, ext.file_offset) {
                result = Err(SaveError::Io(IoFailure::new(
                    Op::WritePages,
                    io.path,
                    Some(ext.file_offset),
                    e,
                )));
                return;
            }
            let rel = ext.first_page - run.start;
            let _ = written.set_range(rel..rel + ext.pages);
            counters.writes.fetch_add(1, Ordering::Relaxed);
            counters.data_bytes.fetch_add(ext.len, Ordering::Relaxed);
        })
        .map_err(opt_err)?;
        result?;

        let stored =
            AtomicBitmap::new(&engine.stored[block], layout.num_pages()).map_err(opt_err)?;
        let bytes = AtomicBitmap::new(&engine.bytes[block], layout.num_pages()).map_err(opt_err)?;
        let wref = written.as_ref();
        for r in wref.runs_in(0..n, true) {
            bytes
                .update_range(run.start + r.start..run.start + r.end, true)
                .map_err(opt_err)?;
        }
        for r in zref.runs_in(0..n, false) {
            stored
                .update_range(run.start + r.start..run.start + r.end, true)
                .map_err(opt_err)?;
        }
        let mut zeros = 0u64;
        let mut punched = 0u64;
        for r in zref.runs_in(0..n, true) {
            zeros += r.end - r.start;
            stored
                .update_range(run.start + r.start..run.start + r.end, false)
                .map_err(opt_err)?;
            if !engine.punch {
                continue;
            }
            // Zero pages that were not rewritten now but may hold old bytes: punch them out.
            let mut hole: Option<Range<u64>> = None;
            for i in r.clone() {
                let index = run.start + i;
                let stale = !wref.test(i) && bytes.test(index);
                match (&mut hole, stale) {
                    (Some(h), true) if h.end == index => h.end += 1,
                    (_, true) => {
                        if let Some(h) = hole.take() {
                            punched += punch(io, layout, h, &bytes)?;
                        }
                        hole = Some(index..index + 1);
                    }
                    (_, false) => {}
                }
            }
            if let Some(h) = hole {
                punched += punch(io, layout, h, &bytes)?;
            }
        }
        counters.pages_dirty.fetch_add(n, Ordering::Relaxed);
        counters
            .pages_written
            .fetch_add(n - zeros, Ordering::Relaxed);
        counters.zero_pages.fetch_add(zeros, Ordering::Relaxed);
        counters.pages_punched.fetch_add(punched, Ordering::Relaxed);
        Ok(())
    }
}

/// Punches pages `pages` of a block out of the file (they read as zero afterwards) and marks
/// them as holding no bytes. Where the file system cannot punch holes, writes zeros.
fn punch(
    io: &PassIo<'_>,
    layout: &BlockLayout,
    pages: Range<u64>,
    bytes: &AtomicBitmap<'_>,
) -> Result<u64, SaveError> {
    let ps = layout.page_size;
    let offset = layout.page_offset(pages.start).map_err(opt_err)?;
    let len = (pages.end - pages.start) * ps;
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    if let Err(e) = rustix::fs::fallocate(io.main, flags, offset, len) {
        if e != rustix::io::Errno::OPNOTSUPP {
            return Err(SaveError::Io(IoFailure::new(
                Op::Truncate,
                io.path,
                Some(offset),
                file::io_err(e),
            )));
        }
        let zeros = vec![0u8; len as usize];
        file::write_all_at(io.main, &zeros, offset, Op::WritePages)
            .map_err(|e| SaveError::Io(IoFailure::new(Op::WritePages, io.path, Some(offset), e)))?;
    }
    bytes.update_range(pages.clone(), false).map_err(opt_err)?;
    Ok(pages.end - pages.start)
}

/// Writes the bitmaps of all blocks through `main` (in `engine` block order), returns the
/// number of stored pages.
pub(crate) fn write_bitmaps(
    engine: &PassEngine,
    main: BorrowedFd<'_>,
    path: &Path,
) -> Result<u64, SaveError> {
    let mut stored = 0u64;
    for (block, layout) in engine.layouts.iter().enumerate() {
        if layout.is_empty() {
            continue;
        }
        let mut words = engine.bitmap(block)?;
        stored += Bitmap::new(&mut words, layout.num_pages())
            .map(|b| b.count_ones())
            .unwrap_or(0);
        let mut bytes = vec![0u8; words.len() * 8];
        bitmap::encode_le(&words, &mut bytes).map_err(opt_err)?;
        file::write_all_at(main, &bytes, layout.bitmap_offset, Op::WriteBitmap).map_err(|e| {
            SaveError::Io(IoFailure::new(
                Op::WriteBitmap,
                path,
                Some(layout.bitmap_offset),
                e,
            ))
        })?;
    }
    Ok(stored)
}

/// The CRC-32C of a file's metadata ranges, read back from the file (see
/// [`crate::integrity`]).
pub(crate) fn metadata_crc(
    main: BorrowedFd<'_>,
    path: &Path,
    stream_start: u64,
    first_record: u64,
    file_order_layouts: &[BlockLayout],
    device_stream_start: u64,
    table_offset: u64,
) -> Result<u32, SaveError> {
    let ranges = integrity::metadata_ranges(
        stream_start,
        first_record,
        file_order_layouts,
        device_stream_start,
        table_offset,
    );
    integrity::crc_of_ranges(main, path, &ranges).map_err(|e| match e {
        crate::error::FormatError::Io(f) => SaveError::Io(f),
        other => SaveError::Options(other.to_string()),
    })
}

/// A live save in progress (see the module docs).
///
/// Dropping it without [`finish`](LiveSave::finish) removes the temporary file; the previous
/// snapshot at the target stays as it was.
pub struct LiveSave<'m> {
    target: PathBuf,
    temp: TempFile,
    main: OwnedFd,
    channels: Vec<OwnedFd>,
    direct: bool,
    fallback: Option<String>,
    regions: Vec<LiveRegion<'m>>,
    plan: Plan,
    engine: PassEngine,
    opts: LiveOptions,
    passes: Vec<PassReport>,
    started: Instant,
    stale: Vec<PathBuf>,
}

impl std::fmt::Debug for LiveSave<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSave")
            .field("target", &self.target)
            .field("temp", &self.temp.path)
            .field("passes", &self.passes.len())
            .finish_non_exhaustive()
    }
}

impl<'m> LiveSave<'m> {
    /// Starts a live save to `path`: creates the temporary file beside it, writes the stream
    /// start and the block records, and opens the channel descriptors. No page is written yet.
    pub fn begin(
        path: &Path,
        regions: &[LiveRegion<'m>],
        opts: &LiveOptions,
    ) -> Result<Self, SaveError> {
        let started = Instant::now();
        let so = &opts.save;
        let blocks: Vec<(&str, u64, u64)> = regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64, r.page_size))
            .collect();
        // The device state comes at `finish`.
        let (plan, page_size) = save::plan_blocks(&blocks, so, None)?;
        let (temp, main, stale) = save::create_temp(path, 0o600)?;
        let tmp_path = temp.path.clone();
        if so.offset > 0 {
            save::copy_prefix(path, main.as_fd(), so.offset, &tmp_path)?;
        }
        let probe = save::probe_offset(&plan.layouts, page_size);
        let (channels, direct, fallback) =
            open_channels(&tmp_path, true, so.channels, so.direct_io, probe)
                .map_err(|e| e.into_save_error(path))?;
        let io = |op: Op, offset: Option<u64>| {
            let p = tmp_path.clone();
            move |e: std::io::Error| SaveError::Io(IoFailure::new(op, p, offset, e))
        };
        file::set_len(main.as_fd(), plan.device_stream_start)
            .map_err(io(Op::Truncate, Some(plan.device_stream_start)))?;
        file::write_all_at(main.as_fd(), &plan.head, so.offset, Op::WriteStream)
            .map_err(io(Op::WriteStream, Some(so.offset)))?;
        for (layout, record) in plan.layouts.iter().zip(&plan.records) {
            file::write_all_at(main.as_fd(), record, layout.record_offset, Op::WriteStream)
                .map_err(io(Op::WriteStream, Some(layout.record_offset)))?;
        }
        let engine = PassEngine::new(
            plan.layouts.clone(),
            page_size,
            so,
            opts.punch_holes,
            plan.integrity.is_some(),
        );
        Ok(Self {
            target: path.to_path_buf(),
            temp,
            main,
            channels,
            direct,
            fallback,
            regions: regions.to_vec(),
            plan,
            engine,
            opts: opts.clone(),
            passes: Vec::new(),
            started,
            stale,
        })
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp.path
    }

    /// Whether page data goes through `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// Passes run so far.
    pub fn passes(&self) -> &[PassReport] {
        &self.passes
    }

    fn run(&mut self, dirty: Dirty<'_>) -> Result<PassReport, SaveError> {
        let dirty = if self.passes.is_empty() {
            Dirty::All
        } else {
            dirty
        };
        let io = PassIo {
            main: self.main.as_fd(),
            channels: self.channels.iter().map(|f| f.as_fd()).collect(),
            path: &self.temp.path,
            cancel: self.opts.save.cancel.as_ref(),
        };
        let report = self
            .engine
            .run(&io, &self.regions, dirty, self.passes.len() as u32)?;
        self.passes.push(report.clone());
        Ok(report)
    }

    /// Writes the pages marked in `dirty` (one KVM-layout bitmap per region, in region order),
    /// while the guest may keep running. The first pass writes every page and ignores `dirty`.
    pub fn pass(&mut self, dirty: &[&[u64]]) -> Result<PassReport, SaveError> {
        self.run(Dirty::Bitmaps(dirty))
    }

    /// Writes every page (a full pass).
    pub fn pass_all(&mut self) -> Result<PassReport, SaveError> {
        self.run(Dirty::All)
    }

    /// The last pass, to be run with the guest paused: writes the pages marked in `dirty`
    /// (every page if no pass ran yet), then the RAM END section and the device state
    /// (`device_state`, else [`SaveOptions::device_state`], else a bare `QEMU_VM_EOF`), the
    /// bitmaps and the checksums; syncs the file and renames it over the target.
    pub fn finish(
        mut self,
        dirty: &[&[u64]],
        device_state: Option<&[u8]>,
    ) -> Result<LiveReport, SaveError> {
        self.run(Dirty::Bitmaps(dirty))?;
        let so = &self.opts.save;
        let path = self.temp.path.clone();
        let io = |op: Op, offset: Option<u64>| {
            let p = path.clone();
            move |e: std::io::Error| SaveError::Io(IoFailure::new(op, p, offset, e))
        };
        let page_size = self.engine.page_size;
        let blocks: Vec<(&str, u64)> = self
            .regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64))
            .collect();
        let device_state = device_state.or(so.device_state.as_deref());
        let mut full = save::plan(&blocks, page_size, &so.machine, so.offset, device_state)?;
        if self.plan.integrity.is_some() {
            full = full.with_checksums()?;
        }
        let main = self.main.as_fd();
        let file_size = full.file_size();
        file::set_len(main, file_size).map_err(io(Op::Truncate, Some(file_size)))?;
        file::write_all_at(main, &full.tail, full.device_stream_start, Op::WriteStream)
            .map_err(io(Op::WriteStream, Some(full.device_stream_start)))?;
        let pages_stored = write_bitmaps(&self.engine, main, &path)?;
        if let (Some(planned), Some(sums)) = (&full.integrity, &self.engine.sums) {
            let first_record = so.offset + full.head.len() as u64;
            let crc = metadata_crc(
                main,
                &path,
                so.offset,
                first_record,
                &full.layouts,
                full.device_stream_start,
                planned.table_offset,
            )?;
            save::write_checksums(main, &path, &full, planned, sums, crc, page_size, file_size)?;
        }
        if so.fsync {
            file::fdatasync(main).map_err(io(Op::Sync, None))?;
        }
        if so.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Err(SaveError::Cancelled);
        }
        self.channels.clear();
        file::rename(&path, &self.target)
            .map_err(|e| SaveError::Io(IoFailure::new(Op::Rename, &self.target, None, e)))?;
        self.temp.committed = true;
        if so.fsync {
            let dir = parent_dir(&self.target);
            file::fsync_dir(&dir)
                .map_err(|e| SaveError::Io(IoFailure::new(Op::SyncDir, dir, None, e)))?;
        }
        let pages: u64 = full.layouts.iter().map(BlockLayout::num_pages).sum();
        let save = SaveReport {
            path: self.target.clone(),
            ram_bytes: full.layouts.iter().map(|l| l.length).sum(),
            data_bytes: self.passes.iter().map(|p| p.data_bytes).sum(),
            pages,
            pages_stored,
            zero_pages: pages - pages_stored,
            writes: self.passes.iter().map(|p| p.writes).sum(),
            seconds: self.started.elapsed().as_secs_f64(),
            direct_io: self.direct,
            direct_io_fallback: self.fallback.clone(),
            channels: self.channels_count(),
            file_size,
            stale_temporaries_removed: std::mem::take(&mut self.stale),
            checksums: full.integrity.is_some(),
        };
        Ok(LiveReport {
            save,
            passes: std::mem::take(&mut self.passes),
        })
    }

    fn channels_count(&self) -> usize {
        self.opts.save.channels
    }
}
