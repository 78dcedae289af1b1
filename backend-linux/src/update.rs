//! Incremental snapshots: updating an existing snapshot with only the pages that changed.
//!
//! Because every page has a fixed place, a snapshot can be brought up to date by rewriting
//! just the pages dirtied since it was taken — Firecracker's diff snapshots, without a chain of
//! diff files to merge: the result is again one ordinary mapped-ram file, which QEMU and
//! [`crate::restore()`] read like any other.
//!
//! [`update()`] takes the changed pages either as dirty bitmaps (KVM's dirty-log layout, as in
//! [`crate::live`]), or finds them itself by comparing every page of the memory with the
//! snapshot ([`Changes::Compare`], what `mapped-ram save --update` does).
//!
//! # Crash safety
//!
//! The snapshot is never written in place. The update
//!
//! 1. checks that the snapshot's layout matches the regions (names, lengths, page size),
//! 2. makes a copy beside it: a **reflink** (`ioctl(FICLONE)`: the copy shares all data
//!    extents with the original, costs no data I/O and takes milliseconds) where the file
//!    system supports it (XFS with `reflink=1`, btrfs, bcachefs, OCFS2), otherwise — ext4,
//!    tmpfs — a **full sparse copy** (`copy_file_range` of the data segments found with
//!    `SEEK_DATA`/`SEEK_HOLE`; holes stay holes),
//! 3. writes the changed pages, the bitmaps, the device state (if a new one is given) and the
//!    checksums (if the file has them) into the copy, `fdatasync`s it,
//! 4. renames it over the snapshot and `fsync`s the directory.
//!
//! A crash or `kill -9` at any moment leaves either the old snapshot or the new one at the
//! path — never a mix — plus at most a temporary file that the next save or update of the same
//! target removes. With the full-copy fallback the update still writes the whole file once
//! (the copy); [`UpdateReport::copy_bytes`] says how much.
//!
//! A lazily restored guest ([`crate::lazy`]) that maps the old snapshot keeps seeing the old
//! file: the rename gives the path a new inode and never changes the mapped one.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use mapped_ram_core::bitmap::{words_for, AtomicBitmap};
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::{Chunk, WorkQueue};

use crate::blocks::{self, Wanted};
use crate::error::{BlockMismatch, FormatError, IoFailure, Op, SaveError};
use crate::executor::{self, Control, Job, Stopped};
use crate::file;
use crate::inspect::{open_snapshot, BlockInfo};
use crate::integrity;
use crate::live::LiveRegion;
use crate::save::SaveOptions;
use crate::writer::{Block, Dirty, Writer};
use crate::zero;

/// How the updated file is made from the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// A reflink where the file system supports it, else a full copy.
    #[default]
    Auto,
    /// A reflink, or fail with [`UpdateError::NoReflink`].
    Reflink,
    /// Always a full (sparse) copy.
    Full,
}

/// How the updated file was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Nothing changed: the snapshot was left as it was.
    None,
    /// A reflink (`FICLONE`): no data copied.
    Reflink,
    /// A full copy of the old file's data.
    Full,
}

impl CopyKind {
    /// `none`, `reflink` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::None => "none",
            CopyKind::Reflink => "reflink",
            CopyKind::Full => "full",
        }
    }
}

/// Which pages changed since the snapshot was taken.
#[derive(Debug, Clone, Copy)]
pub enum Changes<'d> {
    /// The pages marked in these bitmaps (one per region, in region order, KVM dirty-log
    /// layout: page `k` is bit `k % 64` of word `k / 64`).
    Dirty(&'d [&'d [u64]]),
    /// Find them: compare every page of the memory with the snapshot's page (a page whose bit
    /// is clear counts as zero) and update only the pages that differ.
    Compare,
    /// Every page (rewrites all of RAM in the copy).
    All,
}

/// How to update.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    /// Channels, direct I/O, zero pages, offset, fsync, chunk size, gap policy and
    /// cancellation as for [`crate::save()`]; `device_state`, when set, replaces the snapshot's
    /// device state. The machine type and capabilities of the snapshot are kept (`machine` and
    /// `checksums` are ignored: a snapshot with checksums keeps them up to date, one without
    /// stays without).
    pub save: SaveOptions,
    /// How the new file is made.
    pub copy: CopyMode,
    /// Punch holes where a stored page turned zero (see [`crate::LiveOptions::punch_holes`]).
    pub punch_holes: bool,
}

impl Default for UpdateOptions {
    fn default() -> Self {
        Self {
            save: SaveOptions::default(),
            copy: CopyMode::Auto,
            punch_holes: true,
        }
    }
}

/// What an update did.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// The snapshot.
    pub path: PathBuf,
    /// How the new file was made.
    pub copy: CopyKind,
    /// Bytes of data copied from the old file (0 with a reflink or when nothing changed).
    pub copy_bytes: u64,
    /// Pages in all blocks.
    pub pages: u64,
    /// Pages compared with the snapshot ([`Changes::Compare`]; 0 otherwise).
    pub pages_compared: u64,
    /// Pages processed: marked dirty, or found to differ.
    pub pages_changed: u64,
    /// Of those, pages written as data.
    pub pages_written: u64,
    /// Of those, zero pages (bit cleared).
    pub zero_pages: u64,
    /// Pages punched out of the file because they turned zero.
    pub pages_punched: u64,
    /// Bytes of page data written.
    pub data_bytes: u64,
    /// Page-data writes issued.
    pub writes: u64,
    /// Pages stored in the updated snapshot.
    pub pages_stored: u64,
    /// Bytes of page data a full save of the same memory would write (at least the stored
    /// pages), for comparison with `data_bytes` (+ `copy_bytes`).
    pub full_save_bytes: u64,
    /// Whether the snapshot has page checksums (kept up to date).
    pub checksums: bool,
    /// Whether page data went through `O_DIRECT`.
    pub direct_io: bool,
    /// Channels used.
    pub channels: usize,
    /// Wall-clock seconds, comparison, copy and sync included.
    pub seconds: f64,
    /// Stale temporary files of earlier, interrupted saves or updates that were removed.
    pub stale_temporaries_removed: Vec<PathBuf>,
}

impl UpdateReport {
    /// `true` when no page differed and the snapshot was left untouched.
    pub fn unchanged(&self) -> bool {
        self.copy == CopyKind::None
    }
}

/// Why an update failed. The snapshot at the path is always left as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// Writing the new file failed.
    #[error("{0}")]
    Save(#[from] SaveError),
    /// The snapshot cannot be read.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The snapshot's blocks do not match the regions.
    #[error("{path}: cannot update: {source}")]
    Mismatch {
        /// The snapshot.
        path: PathBuf,
        /// What differs.
        source: BlockMismatch,
    },
    /// [`CopyMode::Reflink`] and the file system cannot share extents.
    #[error(
        "{path}: the file system cannot make a reflink copy ({source}); use copy mode auto or full"
    )]
    NoReflink {
        /// The snapshot.
        path: PathBuf,
        /// The kernel's answer to `FICLONE`.
        source: std::io::Error,
    },
}

impl From<IoFailure> for UpdateError {
    fn from(f: IoFailure) -> Self {
        UpdateError::Save(SaveError::Io(f))
    }
}

/// Updates the snapshot at `path` with the pages of `regions` that changed (see the module
/// docs). `regions` must name every block of the snapshot with its exact length and page size.
///
/// ```no_run
/// use mapped_ram_linux::{update, Changes, GuestMemory, LiveRegion, UpdateOptions};
///
/// let ram = vec![0u8; 16 << 20]; // the guest's memory now
/// let regions = [LiveRegion { name: "pc.ram", memory: GuestMemory::from_slice(&ram), page_size: 4096 }];
/// let dirty = vec![0u64; 64]; // KVM's dirty log since the snapshot was taken
/// let report = update("/var/tmp/guest.mr".as_ref(), &regions, Changes::Dirty(&[&dirty]),
///                     &UpdateOptions::default())?;
/// println!("{} pages written, {} bytes copied", report.pages_written, report.copy_bytes);
/// # Ok::<(), mapped_ram_linux::UpdateError>(())
/// ```
pub fn update(
    path: &Path,
    regions: &[LiveRegion<'_>],
    changes: Changes<'_>,
    opts: &UpdateOptions,
) -> Result<UpdateReport, UpdateError> {
    let started = Instant::now();
    let so = &opts.save;
    let page_size = crate::plan::check_options(
        so.channels,
        so.chunk_bytes,
        regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64, r.page_size)),
    )?;
    let snap = open_snapshot(path, so.offset)?;
    let info = &snap.info;
    // Every block, each named once: region `i` is block `index[i]` of the file.
    let mismatch = |source| UpdateError::Mismatch {
        path: path.to_path_buf(),
        source,
    };
    let index = blocks::find_all(
        &info.blocks,
        regions.iter().map(|r| Wanted {
            name: r.name,
            length: Some(r.memory.len() as u64),
            page_size: Some(r.page_size),
            needs_pages: true,
        }),
    )
    .map_err(mismatch)?;
    blocks::check_complete(&info.blocks, &index).map_err(mismatch)?;
    // The engine works in file order.
    let mut by_file: Vec<Option<&LiveRegion<'_>>> = vec![None; info.blocks.len()];
    for (r, &i) in regions.iter().zip(&index) {
        by_file[i] = Some(r);
    }
    let file_regions: Vec<&LiveRegion<'_>> = by_file.into_iter().flatten().collect();
    let pages: u64 = info.blocks.iter().map(|b| b.layout.num_pages()).sum();
    let pages_stored_before: u64 = info.blocks.iter().map(BlockInfo::pages_stored).sum();

    let (logs, pages_compared): (Vec<Vec<u64>>, u64) = match changes {
        Changes::Compare => (
            compare(snap.fd.as_fd(), path, info, &file_regions, so)?,
            pages,
        ),
        Changes::Dirty(maps) => {
            if maps.len() != regions.len() {
                return Err(SaveError::from(crate::error::OptionError::DirtyLogCount {
                    logs: maps.len(),
                    blocks: regions.len(),
                })
                .into());
            }
            let mut logs = vec![Vec::new(); info.blocks.len()];
            for (map, &i) in maps.iter().zip(&index) {
                logs[i] = map.to_vec();
            }
            (logs, 0)
        }
        Changes::All => (Vec::new(), 0),
    };
    if matches!(changes, Changes::Compare)
        && so.device_state.is_none()
        && logs.iter().all(|m| m.iter().all(|w| *w == 0))
    {
        return Ok(UpdateReport {
            path: path.to_path_buf(),
            copy: CopyKind::None,
            copy_bytes: 0,
            pages,
            pages_compared,
            pages_changed: 0,
            pages_written: 0,
            zero_pages: 0,
            pages_punched: 0,
            data_bytes: 0,
            writes: 0,
            pages_stored: pages_stored_before,
            full_save_bytes: pages_stored_before * page_size,
            checksums: info.integrity.is_some(),
            direct_io: false,
            channels: so.channels,
            seconds: started.elapsed().as_secs_f64(),
            stale_temporaries_removed: Vec::new(),
        });
    }
    let tables = match &info.integrity {
        Some(integ) => {
            let layouts: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
            Some(integrity::read_table(
                snap.fd.as_fd(),
                path,
                integ,
                &layouts,
            )?)
        }
        None => None,
    };
    let engine_blocks = file_regions.iter().map(|r| Block::from(*r)).collect();
    let (mut w, copy, copy_bytes) = Writer::from_snapshot(
        path,
        snap.fd.as_fd(),
        info,
        tables,
        engine_blocks,
        so,
        opts.punch_holes,
        opts.copy,
    )?;
    let refs: Vec<&[u64]> = logs.iter().map(Vec::as_slice).collect();
    let dirty = match changes {
        Changes::All => Dirty::All,
        _ => Dirty::Logs(&refs),
    };
    let pass = w.pass(dirty, None)?;
    let finished = w.finish(None)?;
    let direct = w.direct;
    let stale = w.stale_removed.clone();
    w.commit()?.release_in_background();
    Ok(UpdateReport {
        path: path.to_path_buf(),
        copy,
        copy_bytes,
        pages,
        pages_compared,
        pages_changed: pass.pages_dirty,
        pages_written: pass.pages_written,
        zero_pages: pass.zero_pages,
        pages_punched: pass.pages_punched,
        data_bytes: pass.data_bytes,
        writes: pass.writes,
        pages_stored: finished.pages_stored,
        full_save_bytes: finished.pages_stored * page_size,
        checksums: finished.checksums,
        direct_io: direct,
        channels: so.channels,
        seconds: started.elapsed().as_secs_f64(),
        stale_temporaries_removed: stale,
    })
}

/// The channel work of a comparison: which pages of a chunk differ from the snapshot.
struct CompareJob<'a, 'm> {
    fd: BorrowedFd<'a>,
    path: &'a Path,
    blocks: &'a [BlockInfo],
    regions: &'a [&'a LiveRegion<'m>],
    dirty: &'a [Vec<AtomicU64>],
    chunk_bytes: usize,
}

impl Job for CompareJob<'_, '_> {
    type Scratch = (Vec<u8>, Vec<u8>);
    type Error = UpdateError;

    fn scratch(&self) -> Self::Scratch {
        (vec![0u8; self.chunk_bytes], vec![0u8; self.chunk_bytes])
    }

    fn chunk(
        &self,
        _: usize,
        (mem, old): &mut Self::Scratch,
        chunk: &Chunk,
    ) -> Result<u64, UpdateError> {
        let b = chunk.block;
        let layout = &self.blocks[b].layout;
        let ps = layout.page_size;
        let stored = self.blocks[b].bitmap_ref();
        let base = chunk.start * ps;
        let len = (chunk.pages() * ps) as usize;
        let memory = self.regions[b].memory;
        memory
            .read_into(base as usize, &mut mem[..len])
            .map_err(|e| {
                SaveError::Io(IoFailure::new(
                    Op::ReadMemory,
                    memory.describe(),
                    Some(base),
                    e,
                ))
            })?;
        for run in stored.runs_in(chunk.range(), true) {
            let from = ((run.start - chunk.start) * ps) as usize;
            let to = ((run.end - chunk.start) * ps) as usize;
            let at = layout.pages_offset + run.start * ps;
            file::preadv_exact(self.fd, &mut old[from..to], at)
                .map_err(|e| IoFailure::new(Op::ReadPages, self.path, Some(at), e))?;
        }
        let map = AtomicBitmap::new(&self.dirty[b], layout.num_pages()).map_err(SaveError::from)?;
        for page in chunk.range() {
            let from = ((page - chunk.start) * ps) as usize;
            let now = &mem[from..from + ps as usize];
            let differs = if stored.test(page) {
                now != &old[from..from + ps as usize]
            } else {
                !zero::is_zero(now)
            };
            if differs {
                map.update_range(page..page + 1, true)
                    .map_err(SaveError::from)?;
            }
        }
        Ok(chunk.pages() * ps)
    }
}

/// Finds the pages of `regions` (in file block order) that differ from the snapshot; returns
/// one dirty log per block.
fn compare(
    fd: BorrowedFd<'_>,
    path: &Path,
    info: &crate::inspect::SnapshotInfo,
    regions: &[&LiveRegion<'_>],
    so: &SaveOptions,
) -> Result<Vec<Vec<u64>>, UpdateError> {
    let layouts: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
    let queue = WorkQueue::new(&layouts, so.chunk_bytes).map_err(SaveError::from)?;
    let dirty: Vec<Vec<AtomicU64>> = layouts
        .iter()
        .map(|l| {
            (0..words_for(l.num_pages()))
                .map(|_| AtomicU64::new(0))
                .collect()
        })
        .collect();
    let job = CompareJob {
        fd,
        path,
        blocks: &info.blocks,
        regions,
        dirty: &dirty,
        chunk_bytes: so.chunk_bytes as usize,
    };
    let ctl = Control {
        cancel: so.cancel.as_ref(),
        ..Control::default()
    };
    match executor::execute(so.channels, &queue, &job, ctl) {
        Ok(()) => {}
        Err(Stopped::Failed(e)) => return Err(e),
        Err(Stopped::Cancelled) => return Err(SaveError::Cancelled.into()),
    }
    let mut out = Vec::with_capacity(dirty.len());
    for (words, l) in dirty.iter().zip(&layouts) {
        let mut snap = vec![0u64; words.len()];
        AtomicBitmap::new(words, l.num_pages())
            .and_then(|m| m.snapshot(&mut snap))
            .map_err(SaveError::from)?;
        out.push(snap);
    }
    Ok(out)
}

/// Makes `dst` a copy of `src`: a reflink if possible (and allowed), else a sparse copy of the
/// data segments. Returns how, and the bytes of data copied. Every call goes through the
/// fault seam ([`crate::file`]).
pub(crate) fn clone_or_copy(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    mode: CopyMode,
    path: &Path,
    tmp: &Path,
) -> Result<(CopyKind, u64), UpdateError> {
    if mode != CopyMode::Full {
        match file::clone_file(dst, src) {
            Ok(()) => return Ok((CopyKind::Reflink, 0)),
            Err(e) if mode == CopyMode::Reflink => {
                return Err(UpdateError::NoReflink {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
            Err(_) => {}
        }
    }
    file::set_len(dst, size).map_err(|e| IoFailure::new(Op::Truncate, tmp, Some(size), e))?;
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let data = match file::seek(src, pos, true) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            // No SEEK_DATA here: the whole rest is data.
            Err(e) if file::seek_unsupported(&e) => pos,
            Err(e) => return Err(IoFailure::new(Op::Seek, path, Some(pos), e).into()),
        };
        let hole = match file::seek(src, data, false) {
            Ok(Some(h)) => h.min(size),
            Ok(None) => size,
            Err(e) if file::seek_unsupported(&e) => size,
            Err(e) => return Err(IoFailure::new(Op::Seek, path, Some(data), e).into()),
        };
        if hole <= data {
            pos = data.max(pos + 1);
            continue;
        }
        copy_range(src, dst, data, hole - data, path, tmp)?;
        copied += hole - data;
        pos = hole;
    }
    Ok((CopyKind::Full, copied))
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`, with
/// `copy_file_range(2)` (in-kernel, no user-space copy), or `pread`/`pwrite` where it is not
/// available.
fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    path: &Path,
    tmp: &Path,
) -> Result<(), UpdateError> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let want = (end - at).min(1 << 30) as usize;
        match file::copy_range(src, dst, at, want) {
            Ok(0) => {
                return Err(IoFailure::new(
                    Op::CopyRange,
                    path,
                    Some(at),
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                )
                .into())
            }
            Ok(n) => at += n as u64,
            Err(e) if file::copy_range_unsupported(&e) => {
                let mut buf = vec![0u8; (end - at).min(1 << 20) as usize];
                while at < end {
                    let n = (end - at).min(buf.len() as u64) as usize;
                    file::read_exact_at(src, &mut buf[..n], at)
                        .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(at), e))?;
                    file::write_all_at(dst, &buf[..n], at, Op::WritePages)
                        .map_err(|e| IoFailure::new(Op::WritePages, tmp, Some(at), e))?;
                    at += n as u64;
                }
            }
            Err(e) => return Err(IoFailure::new(Op::CopyRange, tmp, Some(at), e).into()),
        }
    }
    Ok(())
}
