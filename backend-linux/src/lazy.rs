//! Lazy restore: mapping a snapshot's pages instead of reading them.
//!
//! A copying restore ([`crate::restore()`]) reads every stored page before the guest can run.
//! [`restore_lazy()`] instead maps each block's page region straight from the file with
//! `mmap(MAP_PRIVATE)` — possible because every block's `pages_offset` is 1 MiB aligned, so page
//! `k` sits at a page-aligned file offset — and returns as soon as the mappings are in place:
//! the guest resumes at once and each page is read from the file (or the page cache) the first
//! time it is touched; pages the guest writes become private copies and the file is never
//! changed. Firecracker and Cloud Hypervisor restore guests this way.
//!
//! # Pages whose bit is clear
//!
//! A clear bit means "zero", but the file may hold anything there: a hole (QEMU's zero pages,
//! our skipped zero runs, pages we punched in live passes), zeros our writer put inside a large
//! write, or **stale bytes** of a page that QEMU wrote in an early pass of a live migration and
//! found zero later (spec §a.3). Every clear page must read as zero, so the restore:
//!
//! 1. finds which clear pages lie in holes of the file (`SEEK_DATA`/`SEEK_HOLE`) — they read as
//!    zero already and cost nothing;
//! 2. maps fresh anonymous zero pages (`MAP_FIXED`) over the longest runs of clear pages that
//!    hold data, up to [`LazyOptions::max_zero_maps`] mappings (each costs a VMA; the kernel
//!    allows 65530 per process by default) — no I/O, no memory;
//! 3. reads the remaining clear pages that hold data (with several threads) and zeroes, in the
//!    private mapping, those that are not zero — which costs reading them, once, at restore.
//!
//! **Our files skip all of this**: when the snapshot's (checked) integrity record carries
//! [`crate::integrity::FLAG_CLEAN_ZERO`] — our writer sets it only when every byte under a
//! clear bit is zero in the file — the restore maps the file as it is and reads nothing but
//! the headers, bitmaps and records ([`LazyReport::zero_pages_clean`]). QEMU's files, and ours
//! without integrity records, take the steps above.
//!
//! Files written by [`crate::LiveSave`] (which punches holes) or by QEMU have their clear pages
//! in holes, so step 3 has nothing to do. Files of [`crate::save()`] with its default write
//! policy hold short runs of zeros under clear bits between data pages (to keep writes large);
//! for the fastest lazy restore, save with [`crate::SaveOptions::max_gap_pages`] 0
//! (`--write-gap-pages 0`). BENCHMARKS.md has the numbers.
//!
//! # Rules while a lazy restore is mapped
//!
//! The mapping reads the file for as long as it lives, so the snapshot must not be truncated
//! (touching a page past the end raises `SIGBUS`) or changed in place while it is mapped. Our
//! own saves and updates never do either: they write a new file and rename it over the old
//! path, and the mapping keeps the old inode.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use mapped_ram_core::bitmap::BitmapRef;
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::Chunk;

use crate::blocks::{self, Wanted};
use crate::error::{IoFailure, Op, OptionError, RestoreError, RestoreErrorKind};
use crate::executor::{self, ChunkList, Control, Job, Stopped};
use crate::file;
use crate::inspect::{open_snapshot, BlockInfo, SnapshotInfo};
use crate::mem::{host_page_size, PrivateMapping};
use crate::save::default_channels;
use crate::zero;

/// Default [`LazyOptions::max_zero_maps`].
pub const DEFAULT_MAX_ZERO_MAPS: usize = 4096;

/// How to restore lazily.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// Bytes before the stream (`file:PATH,offset=N`).
    pub offset: u64,
    /// Most anonymous zero mappings placed over clear pages that hold data (each splits the
    /// block's mapping, costing VMAs); the rest of those pages are read and zeroed.
    pub max_zero_maps: usize,
    /// Threads that read clear pages holding data to find stale bytes.
    pub threads: usize,
    /// Also read the snapshot's device state into [`LazyRestore::device_state`], from the same
    /// open file as the mappings.
    pub read_device_state: bool,
    /// Start reading every block's pages in the background right away
    /// (`madvise(MADV_WILLNEED)`), so that first touches find them in the page cache.
    pub prefetch: bool,
}

impl Default for LazyOptions {
    fn default() -> Self {
        Self {
            offset: 0,
            max_zero_maps: DEFAULT_MAX_ZERO_MAPS,
            threads: default_channels(),
            prefetch: false,
            read_device_state: false,
        }
    }
}

/// One block of a lazy restore: guest memory mapped from the snapshot.
#[derive(Debug)]
pub struct LazyBlock {
    name: String,
    page_size: u64,
    mapping: PrivateMapping,
}

impl LazyBlock {
    /// The block's id string.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The target page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The guest memory (a private mapping of the snapshot).
    pub fn mapping(&self) -> &PrivateMapping {
        &self.mapping
    }

    /// The guest memory, writable (writes never reach the file).
    pub fn mapping_mut(&mut self) -> &mut PrivateMapping {
        &mut self.mapping
    }

    /// Takes the mapping out (to keep it for the guest's whole life).
    pub fn into_mapping(self) -> PrivateMapping {
        self.mapping
    }
}

/// What a lazy restore did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LazyReport {
    /// Blocks mapped.
    pub blocks_restored: Vec<String>,
    /// Blocks of the snapshot not asked for.
    pub blocks_skipped: Vec<String>,
    /// Bytes of guest RAM mapped.
    pub ram_bytes: u64,
    /// Pages whose bit is set (read from the file on first touch).
    pub pages_stored: u64,
    /// Pages whose bit is clear (zero).
    pub zero_pages: u64,
    /// Clear pages in holes of the file: nothing to do.
    pub zero_pages_in_holes: u64,
    /// Clear pages holding data that got anonymous zero mappings.
    pub zero_pages_mapped: u64,
    /// Anonymous zero mappings placed.
    pub zero_maps: u64,
    /// Clear pages holding data that were read to check them.
    pub zero_pages_checked: u64,
    /// Of those, pages holding stale non-zero bytes, zeroed in the private mapping.
    pub stale_pages_zeroed: u64,
    /// Bytes read to check clear pages.
    pub check_bytes: u64,
    /// Clear pages trusted to read as zero without a look at the file: the snapshot's
    /// integrity record carries [`crate::integrity::FLAG_CLEAN_ZERO`].
    pub zero_pages_clean: u64,
    /// Wall-clock seconds until the guest could resume.
    pub seconds: f64,
    /// Machine type recorded in the snapshot.
    pub machine: String,
}

/// A lazily restored guest: its blocks' memory and what it took.
#[derive(Debug)]
pub struct LazyRestore {
    /// The blocks, in the order asked for.
    pub blocks: Vec<LazyBlock>,
    /// What was done.
    pub report: LazyReport,
    /// The device state, when [`LazyOptions::read_device_state`] asked for it.
    pub device_state: Option<Vec<u8>>,
}

impl LazyRestore {
    /// The block named `name`.
    pub fn block(&self, name: &str) -> Option<&LazyBlock> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// The block named `name`, mutably.
    pub fn block_mut(&mut self, name: &str) -> Option<&mut LazyBlock> {
        self.blocks.iter_mut().find(|b| b.name == name)
    }
}

/// Memory that a lazy restore fixes up: the private mapping of one block.
pub(crate) trait LazyTarget {
    /// Maps anonymous zero pages over `offset .. offset + len` (host-page aligned).
    fn map_zero(&mut self, offset: usize, len: usize) -> io::Result<()>;
    /// The bytes, writable.
    fn bytes_mut(&mut self) -> io::Result<&mut [u8]>;
}

impl LazyTarget for PrivateMapping {
    fn map_zero(&mut self, offset: usize, len: usize) -> io::Result<()> {
        PrivateMapping::map_zero(self, offset, len)
    }
    fn bytes_mut(&mut self) -> io::Result<&mut [u8]> {
        Ok(self.as_mut_slice())
    }
}

/// Picks the blocks named (all blocks with data when `names` is empty), checking that each
/// can be mapped.
pub(crate) fn choose_blocks<'i>(
    info: &'i SnapshotInfo,
    names: &[&str],
) -> Result<Vec<&'i BlockInfo>, RestoreError> {
    let chosen: Vec<&BlockInfo> = if names.is_empty() {
        info.blocks
            .iter()
            .filter(|b| !b.layout.is_empty())
            .collect()
    } else {
        let index = blocks::find_all(
            &info.blocks,
            names.iter().map(|name| Wanted {
                name,
                length: None,
                page_size: None,
                needs_pages: true,
            }),
        )
        .map_err(RestoreErrorKind::from)?;
        index.iter().map(|&i| &info.blocks[i]).collect()
    };
    let host = host_page_size() as u64;
    for b in &chosen {
        let l = &b.layout;
        if l.page_size % host != 0 || l.pages_offset % host != 0 {
            return Err(RestoreErrorKind::Options(OptionError::NotMappable {
                block: b.name.clone(),
                reason: format!(
                    "page size {} and pages_offset {:#x} must be multiples of the host page size {host} (use a copying restore)",
                    l.page_size, l.pages_offset
                ),
            })
            .into());
        }
    }
    Ok(chosen)
}

/// Maps the blocks `names` of the snapshot at `path` (every block with data when `names` is
/// empty) and returns as soon as the guest can run (see the module docs).
///
/// ```no_run
/// use mapped_ram_linux::{restore_lazy, LazyOptions};
///
/// let guest = restore_lazy("/var/tmp/guest.mr".as_ref(), &["pc.ram"], &LazyOptions::default())?;
/// let ram = guest.block("pc.ram").unwrap().mapping();
/// // hand ram.as_ptr() / ram.len() to KVM_SET_USER_MEMORY_REGION and resume the vCPUs
/// # let _ = ram;
/// # Ok::<(), mapped_ram_linux::RestoreError>(())
/// ```
pub fn restore_lazy(
    path: &Path,
    names: &[&str],
    opts: &LazyOptions,
) -> Result<LazyRestore, RestoreError> {
    let started = Instant::now();
    let snap = open_snapshot(path, opts.offset)?;
    let info = &snap.info;
    let chosen = choose_blocks(info, names)?;
    let clean = clean_zero(info);
    let mut report = LazyReport {
        machine: info.machine.clone(),
        blocks_skipped: info
            .blocks
            .iter()
            .filter(|b| !chosen.iter().any(|c| c.name == b.name))
            .map(|b| b.name.clone())
            .collect(),
        ..LazyReport::default()
    };
    let mut blocks = Vec::with_capacity(chosen.len());
    for b in chosen {
        let len = usize::try_from(b.layout.length).map_err(|_| {
            RestoreErrorKind::Options(OptionError::TooLargeToMap {
                block: b.name.clone(),
            })
        })?;
        let mut mapping = PrivateMapping::map_file(snap.fd.as_fd(), b.layout.pages_offset, len)
            .map_err(|e| IoFailure::new(Op::Map, path, Some(b.layout.pages_offset), e))?;
        if clean {
            count_clean(b, &mut report);
        } else {
            fix_clear_pages(snap.fd.as_fd(), path, b, &mut mapping, opts, &mut report)?;
        }
        if opts.prefetch {
            mapping.advise_willneed();
        }
        report.blocks_restored.push(b.name.clone());
        blocks.push(LazyBlock {
            name: b.name.clone(),
            page_size: b.layout.page_size,
            mapping,
        });
    }
    let device_state = if opts.read_device_state {
        Some(crate::inspect::device_state_of(
            snap.fd.as_fd(),
            path,
            info,
        )?)
    } else {
        None
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(LazyRestore {
        blocks,
        report,
        device_state,
    })
}

/// Whether every page under a clear bit of the snapshot reads as zero, as its (checked)
/// integrity record says: then a lazy restore maps the file as it is.
pub(crate) fn clean_zero(info: &SnapshotInfo) -> bool {
    info.integrity
        .is_some_and(|i| i.record.flags & crate::integrity::FLAG_CLEAN_ZERO != 0)
}

/// Counts block `b` in `report` for a snapshot whose clear pages are known to read as zero:
/// nothing is read, only the bitmap counted.
pub(crate) fn count_clean(b: &BlockInfo, report: &mut LazyReport) {
    let layout = &b.layout;
    let pages = layout.num_pages();
    let stored = if layout.is_empty() {
        0
    } else {
        b.bitmap_ref().count_ones()
    };
    report.ram_bytes += layout.length;
    report.pages_stored += stored;
    report.zero_pages += pages - stored;
    report.zero_pages_clean += pages - stored;
}

/// The data segments of `range` of the file (absolute offsets), rounded outward to
/// `align`; the whole range when the file system cannot tell.
fn data_segments(fd: BorrowedFd<'_>, range: Range<u64>, align: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        let data = match file::seek(fd, pos, true) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if file::seek_unsupported(&e) => return Ok(vec![range]),
            Err(e) => return Err(e),
        };
        if data >= range.end {
            break;
        }
        let hole = match file::seek(fd, data, false) {
            Ok(Some(h)) => h.min(range.end),
            Ok(None) => range.end,
            Err(e) if file::seek_unsupported(&e) => range.end,
            Err(e) => return Err(e),
        };
        let start = (data / align) * align;
        let end = hole.div_ceil(align).saturating_mul(align).min(range.end);
        match out.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => out.push(start.max(range.start)..end),
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// Makes every clear page of block `b` read as zero in `target` (see the module docs).
pub(crate) fn fix_clear_pages(
    fd: BorrowedFd<'_>,
    path: &Path,
    b: &BlockInfo,
    target: &mut dyn LazyTarget,
    opts: &LazyOptions,
    report: &mut LazyReport,
) -> Result<(), RestoreError> {
    let layout: &BlockLayout = &b.layout;
    let ps = layout.page_size;
    let pages = layout.num_pages();
    let stored: BitmapRef<'_> = b.bitmap_ref();
    let stored_pages = if layout.is_empty() {
        0
    } else {
        stored.count_ones()
    };
    report.ram_bytes += layout.length;
    report.pages_stored += stored_pages;
    report.zero_pages += pages - stored_pages;
    if pages == 0 || layout.is_empty() {
        return Ok(());
    }
    let segments = data_segments(fd, layout.pages_offset..layout.pages_end(), ps)
        .map_err(|e| IoFailure::new(Op::Seek, path, Some(layout.pages_offset), e))?;
    // Clear pages that hold data, as page ranges, by merging two ascending lists.
    let mut suspects: Vec<Range<u64>> = Vec::new();
    let mut seg = segments
        .iter()
        .map(|s| (s.start - layout.pages_offset) / ps..(s.end - layout.pages_offset) / ps)
        .peekable();
    for run in stored.runs(false) {
        while let Some(s) = seg.peek() {
            if s.end <= run.start {
                seg.next();
                continue;
            }
            if s.start >= run.end {
                break;
            }
            let from = s.start.max(run.start);
            let to = s.end.min(run.end);
            suspects.push(from..to);
            if s.end <= run.end {
                seg.next();
            } else {
                break;
            }
        }
    }
    let suspect_pages: u64 = suspects.iter().map(|r| r.end - r.start).sum();
    report.zero_pages_in_holes += (pages - stored_pages) - suspect_pages;
    // Longest runs get anonymous zero pages, the rest are read and checked.
    suspects.sort_by_key(|r| std::cmp::Reverse(r.end - r.start));
    let budget = opts
        .max_zero_maps
        .saturating_sub(report.zero_maps as usize)
        .min(suspects.len());
    let (to_map, to_check) = suspects.split_at_mut(budget);
    // Check in file order, so that reads of a cold file move forward (read-ahead helps).
    to_check.sort_by_key(|r| r.start);
    for r in to_map.iter() {
        let (off, len) = ((r.start * ps) as usize, ((r.end - r.start) * ps) as usize);
        target.map_zero(off, len).map_err(|e| {
            IoFailure::new(Op::Map, path, Some(layout.pages_offset + r.start * ps), e)
        })?;
        report.zero_maps += 1;
        report.zero_pages_mapped += r.end - r.start;
    }
    if to_check.is_empty() {
        return Ok(());
    }
    let stale = find_stale(fd, path, layout, to_check, opts.threads.max(1))?;
    report.zero_pages_checked += to_check.iter().map(|r| r.end - r.start).sum::<u64>();
    report.check_bytes += to_check.iter().map(|r| (r.end - r.start) * ps).sum::<u64>();
    let bytes = target
        .bytes_mut()
        .map_err(|e| IoFailure::new(Op::Map, path, Some(layout.pages_offset), e))?;
    for page in &stale {
        let off = (page * ps) as usize;
        bytes[off..off + ps as usize].fill(0);
    }
    report.stale_pages_zeroed += stale.len() as u64;
    Ok(())
}

/// The channel work of the scan for stale bytes: reads a chunk of clear pages that hold data
/// and notes the pages that are not all zero.
struct StaleJob<'a> {
    fd: BorrowedFd<'a>,
    path: &'a Path,
    layout: &'a BlockLayout,
    found: &'a Mutex<Vec<u64>>,
    max_bytes: usize,
}

impl Job for StaleJob<'_> {
    type Scratch = Vec<u8>;
    type Error = RestoreError;

    fn scratch(&self) -> Vec<u8> {
        vec![0u8; self.max_bytes]
    }

    fn chunk(&self, _: usize, buf: &mut Vec<u8>, item: &Chunk) -> Result<u64, RestoreError> {
        let ps = self.layout.page_size;
        let len = (item.pages() * ps) as usize;
        let at = self.layout.pages_offset + item.start * ps;
        file::preadv_exact(self.fd, &mut buf[..len], at)
            .map_err(|e| IoFailure::new(Op::ReadPages, self.path, Some(at), e))?;
        let mine: Vec<u64> = buf[..len]
            .chunks_exact(ps as usize)
            .enumerate()
            .filter(|(_, page)| !zero::is_zero(page))
            .map(|(k, _)| item.start + k as u64)
            .collect();
        self.found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(mine);
        Ok(len as u64)
    }
}

/// Reads the page ranges `ranges` of a block and returns the pages that are not all zero.
fn find_stale(
    fd: BorrowedFd<'_>,
    path: &Path,
    layout: &BlockLayout,
    ranges: &[Range<u64>],
    threads: usize,
) -> Result<Vec<u64>, RestoreError> {
    let ps = layout.page_size;
    let max_pages = ((1u64 << 20) / ps).max(1);
    // Work items of at most 1 MiB.
    let mut items: Vec<Chunk> = Vec::new();
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            let e = (s + max_pages).min(r.end);
            items.push(Chunk {
                block: 0,
                start: s,
                end: e,
            });
            s = e;
        }
    }
    let found = Mutex::new(Vec::new());
    let job = StaleJob {
        fd,
        path,
        layout,
        found: &found,
        max_bytes: (max_pages * ps) as usize,
    };
    match executor::execute(threads, &ChunkList::new(items), &job, Control::default()) {
        Ok(()) | Err(Stopped::Cancelled) => {}
        Err(Stopped::Failed(e)) => return Err(e),
    }
    let mut pages = found.into_inner().unwrap_or_else(|p| p.into_inner());
    pages.sort_unstable();
    Ok(pages)
}
