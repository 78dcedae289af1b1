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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use mapped_ram_core::bitmap::{words_for, AtomicBitmap};
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::WorkQueue;
use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::error::{FormatError, IoFailure, Op, SaveError};
use crate::file::{self, DirectIo};
use crate::inspect::{open_snapshot, BlockInfo};
use crate::integrity;
use crate::live::{self, Dirty, LiveRegion, PassEngine, PassIo};
use crate::progress::Cancel;
use crate::save::{
    self, open_channels, parent_dir, ChannelOpenError, Plan, PlannedIntegrity, SaveOptions,
};
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
pub enum UpdateError {
    /// Writing the new file failed.
    #[error("{0}")]
    Save(#[from] SaveError),
    /// The snapshot cannot be read.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The snapshot's layout does not match the regions.
    #[error("{path}: cannot update: {message}")]
    Mismatch {
        /// The snapshot.
        path: PathBuf,
        /// What differs.
        message: String,
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

fn mismatch(path: &Path, message: String) -> UpdateError {
    UpdateError::Mismatch {
        path: path.to_path_buf(),
        message,
    }
}

/// Checks that the snapshot's blocks are exactly the regions; returns them in region order.
fn match_blocks<'i>(
    path: &Path,
    blocks: &'i [BlockInfo],
    regions: &[LiveRegion<'_>],
) -> Result<Vec<&'i BlockInfo>, UpdateError> {
    let describe = |items: Vec<String>| items.join(", ");
    let file_blocks = || {
        describe(
            blocks
                .iter()
                .map(|b| format!("{} ({} bytes)", b.name, b.layout.length))
                .collect(),
        )
    };
    let mut chosen = Vec::with_capacity(regions.len());
    for r in regions {
        let Some(b) = blocks.iter().find(|b| b.name == r.name) else {
            return Err(mismatch(
                path,
                format!(
                    "block {:?} is not in the snapshot (it holds: {})",
                    r.name,
                    file_blocks()
                ),
            ));
        };
        if b.layout.length != r.memory.len() as u64 {
            return Err(mismatch(
                path,
                format!(
                    "block {:?} is {} bytes in the snapshot but the memory given is {} bytes",
                    r.name,
                    b.layout.length,
                    r.memory.len()
                ),
            ));
        }
        if b.layout.page_size != r.page_size {
            return Err(mismatch(
                path,
                format!(
                    "block {:?} has page size {} in the snapshot but {} was given",
                    r.name, b.layout.page_size, r.page_size
                ),
            ));
        }
        if b.layout.is_empty() {
            return Err(mismatch(
                path,
                format!(
                    "block {:?} has no page region in the snapshot (x-ignore-shared)",
                    r.name
                ),
            ));
        }
        chosen.push(b);
    }
    if blocks.len() != regions.len() {
        let missing: Vec<String> = blocks
            .iter()
            .filter(|b| !regions.iter().any(|r| r.name == b.name))
            .map(|b| b.name.clone())
            .collect();
        return Err(mismatch(
            path,
            format!(
                "the snapshot also holds block(s) {} that no region names (give every block)",
                describe(missing)
            ),
        ));
    }
    Ok(chosen)
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
    let page_size = save::check_options(
        so,
        regions
            .iter()
            .map(|r| (r.name, r.memory.len() as u64, r.page_size)),
    )?;
    let snap = open_snapshot(path, so.offset)?;
    let info = &snap.info;
    let chosen = match_blocks(path, &info.blocks, regions)?;
    let layouts: Vec<BlockLayout> = chosen.iter().map(|b| b.layout).collect();
    let pages: u64 = layouts.iter().map(BlockLayout::num_pages).sum();

    let computed: Vec<Vec<u64>> = match changes {
        Changes::Compare => compare(snap.fd.as_fd(), path, &chosen, regions, so)?,
        _ => Vec::new(),
    };
    let refs: Vec<&[u64]> = computed.iter().map(Vec::as_slice).collect();
    let (dirty, pages_compared) = match changes {
        Changes::All => (Dirty::All, 0),
        Changes::Dirty(maps) => (Dirty::Bitmaps(maps), 0),
        Changes::Compare => (Dirty::Bitmaps(&refs), pages),
    };
    let pages_stored_before: u64 = chosen.iter().map(|b| b.pages_stored()).sum();
    if matches!(changes, Changes::Compare)
        && so.device_state.is_none()
        && computed.iter().all(|m| m.iter().all(|w| *w == 0))
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

    // The copy.
    let mode = rustix::fs::fstat(snap.fd.as_fd())
        .map(|st| st.st_mode & 0o7777)
        .unwrap_or(0o600);
    let (mut temp, main, stale) = save::create_temp(path, mode)?;
    let tmp_path = temp.path.clone();
    let (copy, copy_bytes) = clone_or_copy(
        snap.fd.as_fd(),
        main.as_fd(),
        info.file_size,
        opts.copy,
        path,
        &tmp_path,
    )?;

    // The changed pages.
    let probe = save::probe_offset(&layouts, page_size);
    let (channels, direct) = open_update_channels(&tmp_path, so.channels, so.direct_io, probe)?;
    let mut engine = PassEngine::new(layouts.clone(), page_size, so, opts.punch_holes, false);
    for (block, info_block) in chosen.iter().enumerate() {
        for (i, w) in info_block.bitmap.iter().enumerate() {
            engine.stored[block][i].store(*w, Ordering::Relaxed);
            engine.bytes[block][i].store(*w, Ordering::Relaxed);
        }
    }
    if let Some(integ) = &info.integrity {
        let file_layouts: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
        let tables = integrity::read_table(snap.fd.as_fd(), path, integ, &file_layouts)?;
        let by_name = |name: &str| {
            info.blocks
                .iter()
                .position(|b| b.name == name)
                .map(|i| &tables[i])
        };
        engine.sums = Some(
            regions
                .iter()
                .map(|r| {
                    by_name(r.name)
                        .map(|t| t.iter().map(|s| AtomicU32::new(*s)).collect())
                        .unwrap_or_default()
                })
                .collect(),
        );
    }
    let io = PassIo {
        main: main.as_fd(),
        channels: channels.iter().map(|f| f.as_fd()).collect(),
        path: &tmp_path,
        cancel: so.cancel.as_ref(),
    };
    let pass = engine.run(&io, regions, dirty, 0)?;
    drop(io);
    drop(channels);

    // Device state, bitmaps, checksums.
    let fail = |op: Op, offset: Option<u64>| {
        let p = tmp_path.clone();
        move |e: std::io::Error| UpdateError::from(IoFailure::new(op, p, offset, e))
    };
    let mut stream_end = info.device_state_end();
    if let Some(ds) = &so.device_state {
        file::write_all_at(main.as_fd(), ds, info.device_state_offset, Op::WriteStream)
            .map_err(fail(Op::WriteStream, Some(info.device_state_offset)))?;
        stream_end = info.device_state_offset + ds.len() as u64;
        file::set_len(main.as_fd(), stream_end).map_err(fail(Op::Truncate, Some(stream_end)))?;
    }
    let pages_stored = live::write_bitmaps(&engine, main.as_fd(), &tmp_path)?;
    if let (Some(integ), Some(sums)) = (&info.integrity, &engine.sums) {
        // The table in file block order.
        let file_layouts: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
        let file_sums: Vec<Vec<AtomicU32>> = info
            .blocks
            .iter()
            .map(|b| {
                let r = regions.iter().position(|r| r.name == b.name);
                r.map(|r| {
                    sums[r]
                        .iter()
                        .map(|s| AtomicU32::new(s.load(Ordering::Relaxed)))
                        .collect()
                })
                .unwrap_or_default()
            })
            .collect();
        let table_len = integ.record.table_len;
        let file_size = stream_end + table_len + integrity::RECORD_LEN;
        file::set_len(main.as_fd(), file_size).map_err(fail(Op::Truncate, Some(file_size)))?;
        let first_record = file_layouts
            .first()
            .map(|l| l.record_offset)
            .unwrap_or(stream_end);
        let crc = live::metadata_crc(
            main.as_fd(),
            &tmp_path,
            so.offset,
            first_record,
            &file_layouts,
            info.device_stream_start,
            stream_end,
        )?;
        let plan = Plan {
            head: Vec::new(),
            layouts: file_layouts,
            records: Vec::new(),
            device_stream_start: info.device_stream_start,
            tail: Vec::new(),
            integrity: None,
        };
        let planned = PlannedIntegrity {
            anchor_offset: integ.anchor_offset,
            table_offset: stream_end,
            table_len,
        };
        save::write_checksums(
            main.as_fd(),
            &tmp_path,
            &plan,
            &planned,
            &file_sums,
            crc,
            page_size,
            file_size,
        )?;
    }
    if so.fsync {
        file::fdatasync(main.as_fd()).map_err(fail(Op::Sync, None))?;
    }
    drop(main);
    if so.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
        return Err(SaveError::Cancelled.into());
    }
    file::rename(&tmp_path, path).map_err(|e| IoFailure::new(Op::Rename, path, None, e))?;
    temp.committed = true;
    if so.fsync {
        let dir = parent_dir(path);
        file::fsync_dir(&dir).map_err(|e| IoFailure::new(Op::SyncDir, dir, None, e))?;
    }
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
        pages_stored,
        full_save_bytes: pages_stored * page_size,
        checksums: info.integrity.is_some(),
        direct_io: direct,
        channels: so.channels,
        seconds: started.elapsed().as_secs_f64(),
        stale_temporaries_removed: stale,
    })
}

/// Finds the pages of `regions` that differ from the snapshot; returns one dirty bitmap per
/// region.
fn compare(
    fd: BorrowedFd<'_>,
    path: &Path,
    blocks: &[&BlockInfo],
    regions: &[LiveRegion<'_>],
    so: &SaveOptions,
) -> Result<Vec<Vec<u64>>, UpdateError> {
    let layouts: Vec<BlockLayout> = blocks.iter().map(|b| b.layout).collect();
    let queue =
        WorkQueue::new(&layouts, so.chunk_bytes).map_err(|e| SaveError::Options(e.to_string()))?;
    let dirty: Vec<Vec<AtomicU64>> = layouts
        .iter()
        .map(|l| {
            (0..words_for(l.num_pages()))
                .map(|_| AtomicU64::new(0))
                .collect()
        })
        .collect();
    let failure: Mutex<Option<UpdateError>> = Mutex::new(None);
    let cancelled = || so.cancel.as_ref().is_some_and(Cancel::is_cancelled);
    std::thread::scope(|s| {
        for _ in 0..so.channels {
            s.spawn(|| {
                let chunk_len = so.chunk_bytes as usize;
                let mut mem = vec![0u8; chunk_len];
                let mut old = vec![0u8; chunk_len];
                while let Some(chunk) = queue.claim() {
                    if cancelled() {
                        queue.stop();
                        return;
                    }
                    let b = chunk.block;
                    let layout = &layouts[b];
                    let ps = layout.page_size;
                    let stored = blocks[b].bitmap_ref();
                    let base = chunk.start * ps;
                    let len = (chunk.pages() * ps) as usize;
                    regions[b].memory.copy_to(base as usize, &mut mem[..len]);
                    for run in stored.runs_in(chunk.range(), true) {
                        let from = ((run.start - chunk.start) * ps) as usize;
                        let to = ((run.end - chunk.start) * ps) as usize;
                        let at = layout.pages_offset + run.start * ps;
                        if let Err(e) = file::read_exact_at(fd, &mut old[from..to], at) {
                            queue.stop();
                            let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert(
                                IoFailure::new(Op::ReadPages, path, Some(at), e).into(),
                            );
                            return;
                        }
                    }
                    let map = AtomicBitmap::new(&dirty[b], layout.num_pages());
                    let Ok(map) = map else { continue };
                    for page in chunk.range() {
                        let from = ((page - chunk.start) * ps) as usize;
                        let now = &mem[from..from + ps as usize];
                        let differs = if stored.test(page) {
                            now != &old[from..from + ps as usize]
                        } else {
                            !zero::is_zero(now)
                        };
                        if differs {
                            let _ = map.update_range(page..page + 1, true);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if cancelled() {
        return Err(SaveError::Cancelled.into());
    }
    Ok(dirty
        .iter()
        .zip(&layouts)
        .map(|(words, l)| {
            let mut out = vec![0u64; words.len()];
            if let Ok(map) = AtomicBitmap::new(words, l.num_pages()) {
                let _ = map.snapshot(&mut out);
            }
            out
        })
        .collect())
}

/// Makes `dst` a copy of `src`: a reflink if possible (and allowed), else a sparse copy of the
/// data segments. Returns how, and the bytes of data copied.
fn clone_or_copy(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    mode: CopyMode,
    path: &Path,
    tmp: &Path,
) -> Result<(CopyKind, u64), UpdateError> {
    if mode != CopyMode::Full {
        match rustix::fs::ioctl_ficlone(dst, src) {
            Ok(()) => return Ok((CopyKind::Reflink, 0)),
            Err(e) if mode == CopyMode::Reflink => {
                return Err(UpdateError::NoReflink {
                    path: path.to_path_buf(),
                    source: file::io_err(e),
                })
            }
            Err(_) => {}
        }
    }
    file::set_len(dst, size).map_err(|e| IoFailure::new(Op::Truncate, tmp, Some(size), e))?;
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => break,
            // No SEEK_DATA here: the whole rest is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => pos,
            Err(e) => {
                return Err(IoFailure::new(Op::ReadStream, path, Some(pos), file::io_err(e)).into())
            }
        };
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(_) => size,
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
        let mut src_off = at;
        let mut dst_off = at;
        let want = (end - at).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut src_off), dst, Some(&mut dst_off), want) {
            Ok(0) => {
                return Err(IoFailure::new(
                    Op::ReadStream,
                    path,
                    Some(at),
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                )
                .into())
            }
            Ok(n) => at += n as u64,
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
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
            Err(e) => {
                return Err(IoFailure::new(Op::WritePages, tmp, Some(at), file::io_err(e)).into())
            }
        }
    }
    Ok(())
}

/// Opens the channel descriptors of an update. The copy already holds data, so `O_DIRECT` is
/// probed with a read (an `O_DIRECT` write probe would overwrite a page).
fn open_update_channels(
    tmp: &Path,
    n: usize,
    mode: DirectIo,
    probe: Option<u64>,
) -> Result<(Vec<std::os::fd::OwnedFd>, bool), UpdateError> {
    let mut direct = mode;
    if mode != DirectIo::Off {
        match file::open_channel(tmp, false, true, probe) {
            Ok(_) => direct = DirectIo::On,
            Err(Ok(refused)) if mode == DirectIo::Auto => {
                let _ = refused;
                direct = DirectIo::Off;
            }
            Err(Ok(refused)) => {
                return Err(SaveError::DirectIoRefused {
                    path: tmp.to_path_buf(),
                    filesystem: refused.filesystem,
                    source: refused.source,
                }
                .into())
            }
            Err(Err(f)) => return Err(f.into()),
        }
    }
    let (fds, is_direct, _) = open_channels(tmp, true, n, direct, None).map_err(|e| match e {
        ChannelOpenError::Io(f) => UpdateError::from(f),
        refused => refused.into_save_error(tmp).into(),
    })?;
    Ok((fds, is_direct))
}
