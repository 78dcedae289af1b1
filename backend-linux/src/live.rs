//! Live save: saving a running guest in passes.
//!
//! mapped-ram gives every page one fixed place in the file, so a guest can be saved while it
//! runs: a first pass writes all of RAM, each further pass rewrites only the pages the guest
//! dirtied since the previous one — in place, the file never grows — and a last pass with the
//! guest paused makes the file exact. This is QEMU's precopy migration to a `file:` URI.
//!
//! ```text
//! let mut live = LiveSave::begin(path, &regions, &LiveOptions::default())?; // stream start, block records
//! live.pass_all()?;                                            // first pass: everything
//! live.pass(&[DirtyLog::new("pc.ram", &kvm_dirty_log)])?;      // as often as useful: only the dirty pages
//! /* pause the vCPUs */
//! let done = live.finish_pass(&[DirtyLog::new("pc.ram", &kvm_dirty_log)], Some(&device_state))?;
//! /* the guest may resume now */
//! done.commit()?;                  // sync, rename, directory sync: durable
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
//!   over it only by [`FinishedSave::commit`] after the data is synced (dropping a `LiveSave` removes
//!   the temporary file and leaves the previous snapshot); channel threads, each with its own
//!   descriptor (`O_DIRECT` when on), claim 1 MiB chunks, detect zero pages and write large
//!   extents; the bitmaps are written once, at the end.
//!
//! The finished file records nothing about how it was written: a file saved in 20 passes is
//! byte-for-byte a file that a single save of the final memory could have produced (apart
//! from the bytes of pages whose bit is clear, which no reader looks at).

use std::path::Path;

use crate::error::{OptionError, SaveError};
use crate::mem::GuestMemory;
use crate::save::{SaveOptions, SaveReport};
use crate::writer::{Block, Dirty, Finished, Writer};

pub use crate::writer::PassReport;

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
    /// policy, preallocation and cancellation, as for [`crate::save()`]. `device_state` is
    /// used by [`LiveSave::finish`] unless it is given one.
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

/// What a live save did in all.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LiveReport {
    /// Totals over all passes, as a save reports them (`data_bytes` and `writes` summed,
    /// `seconds` from [`LiveSave::begin`] to the end of the commit).
    pub save: SaveReport,
    /// Each pass, the final one last.
    pub passes: Vec<PassReport>,
}

impl<'m> From<&LiveRegion<'m>> for Block<'m> {
    fn from(r: &LiveRegion<'m>) -> Self {
        Block {
            name: r.name,
            memory: r.memory,
            page_size: r.page_size,
        }
    }
}

pub(crate) fn blocks<'m>(regions: &[LiveRegion<'m>]) -> Vec<Block<'m>> {
    regions.iter().map(Block::from).collect()
}

/// A live save in progress (see the module docs).
///
/// Dropping it without [`finish`](LiveSave::finish) removes the temporary file; the previous
/// snapshot at the target stays as it was.
pub struct LiveSave<'m> {
    writer: Writer<'m, 'static>,
}

impl std::fmt::Debug for LiveSave<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSave")
            .field("target", &self.writer.target())
            .field("temp", &self.writer.path())
            .field("passes", &self.writer.passes.len())
            .finish_non_exhaustive()
    }
}

impl<'m> LiveSave<'m> {
    /// Starts a live save to `path`: creates the temporary file beside it, writes the stream
    /// start and the block records, opens the channel descriptors and — for `O_DIRECT` —
    /// preallocates the page regions. No page is written yet.
    pub fn begin(
        path: &Path,
        regions: &[LiveRegion<'m>],
        opts: &LiveOptions,
    ) -> Result<Self, SaveError> {
        Ok(Self {
            writer: Writer::create(path, blocks(regions), &opts.save, opts.punch_holes)?,
        })
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        self.writer.path()
    }

    /// Whether page data goes through `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.writer.direct
    }

    /// Passes run so far.
    pub fn passes(&self) -> &[PassReport] {
        &self.writer.passes
    }

    fn run(&mut self, dirty: Dirty<'_>) -> Result<PassReport, SaveError> {
        let dirty = if self.writer.passes.is_empty() {
            Dirty::All
        } else {
            dirty
        };
        self.writer.pass(dirty, None)
    }

    /// The logs in block order, each block's exactly once.
    fn ordered<'d>(&self, logs: &[DirtyLog<'d>]) -> Result<Vec<&'d [u64]>, SaveError> {
        let names = self.writer.block_names();
        let mut ordered: Vec<Option<&'d [u64]>> = vec![None; names.len()];
        for log in logs {
            let Some(i) = names.iter().position(|n| *n == log.block) else {
                return Err(OptionError::UnknownDirtyBlock {
                    block: log.block.into(),
                }
                .into());
            };
            if ordered[i].replace(log.bitmap).is_some() {
                return Err(OptionError::DuplicateDirtyBlock {
                    block: log.block.into(),
                }
                .into());
            }
        }
        ordered
            .into_iter()
            .zip(names)
            .map(|(log, name)| {
                log.ok_or_else(|| OptionError::MissingDirtyLog { block: name.into() }.into())
            })
            .collect()
    }

    /// Writes the pages marked in `logs` — one per block, keyed by block name, KVM's
    /// dirty-log layout — while the guest may keep running. The first pass writes every page
    /// (fetch the logs before it anyway: what the guest dirties during it shows in the next).
    pub fn pass(&mut self, logs: &[DirtyLog<'_>]) -> Result<PassReport, SaveError> {
        if self.writer.passes.is_empty() {
            return self.run(Dirty::All);
        }
        let ordered = self.ordered(logs)?;
        self.run(Dirty::Logs(&ordered))
    }

    /// Writes every page (a full pass).
    pub fn pass_all(&mut self) -> Result<PassReport, SaveError> {
        self.run(Dirty::All)
    }

    /// The last pass, to be run with the guest paused: writes the pages marked in `logs`
    /// (every page if no pass ran yet), then the RAM END section and the device state
    /// (`device_state`, else [`SaveOptions::device_state`], else a bare `QEMU_VM_EOF`), the
    /// bitmaps and the checksums. The guest may run again as soon as it returns;
    /// [`FinishedSave::commit`] then makes the snapshot durable and puts it at the path.
    ///
    /// `device_state` is stored as is after the RAM END section: QEMU's device sections (from
    /// [`crate::read_device_state`] of a QEMU file) keep the file loadable by QEMU; a VMM's own
    /// blob (vCPU registers, say) makes a file only this library reads back. `None` and an
    /// empty state both mean "no device state" (a bare `QEMU_VM_EOF`).
    pub fn finish_pass(
        mut self,
        logs: &[DirtyLog<'_>],
        device_state: Option<&[u8]>,
    ) -> Result<FinishedSave<'m>, SaveError> {
        if self.writer.passes.is_empty() {
            self.run(Dirty::All)?;
        } else {
            let ordered = self.ordered(logs)?;
            self.run(Dirty::Logs(&ordered))?;
        }
        let finished = self.writer.finish(device_state)?;
        Ok(FinishedSave {
            writer: self.writer,
            finished,
        })
    }

    /// [`finish_pass`](Self::finish_pass) and [`FinishedSave::commit`] in one call: the guest
    /// stays paused until the snapshot is durable.
    pub fn finish(
        self,
        logs: &[DirtyLog<'_>],
        device_state: Option<&[u8]>,
    ) -> Result<LiveReport, SaveError> {
        self.finish_pass(logs, device_state)?.commit()
    }
}

/// The pages of one block dirtied since the previous pass, in KVM's dirty-log layout
/// (`KVM_GET_DIRTY_LOG`: page `k` is bit `k % 64` of word `k / 64`), keyed by the block's
/// name — never by position, so two blocks' logs cannot be swapped unnoticed.
#[derive(Debug, Clone, Copy)]
pub struct DirtyLog<'d> {
    /// The block's name.
    pub block: &'d str,
    /// Its dirty bitmap (at least one bit per page; bits past the last page are ignored).
    pub bitmap: &'d [u64],
}

impl<'d> DirtyLog<'d> {
    /// The log of `block`.
    pub fn new(block: &'d str, bitmap: &'d [u64]) -> Self {
        Self { block, bitmap }
    }
}

/// A live save whose last pass is done: the file is complete but not yet durable nor at its
/// path. Dropping it removes the temporary file and keeps the previous snapshot.
pub struct FinishedSave<'m> {
    writer: Writer<'m, 'static>,
    finished: Finished,
}

impl std::fmt::Debug for FinishedSave<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinishedSave")
            .field("target", &self.writer.target())
            .finish_non_exhaustive()
    }
}

impl FinishedSave<'_> {
    /// `fdatasync`s the file, renames it over the target and `fsync`s the directory (when
    /// [`SaveOptions::fsync`]); the previous snapshot's blocks are freed in the background.
    pub fn commit(self) -> Result<LiveReport, SaveError> {
        let mut save = crate::save::report(&self.writer, &self.finished);
        let passes = self.writer.passes.clone();
        let started = self.writer.started;
        self.writer.commit()?.release_in_background();
        save.seconds = started.elapsed().as_secs_f64();
        Ok(LiveReport { save, passes })
    }
}
