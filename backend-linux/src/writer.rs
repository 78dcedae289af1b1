//! The one write engine behind [`crate::save()`], [`crate::LiveSave`], [`crate::update()`] and
//! the `vm-memory` saves: a snapshot file being written, pass by pass, then finished and
//! committed.
//!
//! * **Begin** — a new file ([`Writer::create`]: temporary beside the target, stream head and
//!   block records, page regions preallocated for `O_DIRECT`) or a copy of an existing
//!   snapshot ([`Writer::from_snapshot`]: reflink or sparse copy, its bitmaps and checksums as
//!   the starting state), or caller-provided descriptors ([`Writer::to_fds`]).
//! * **Pass** — [`Writer::pass`] runs the [`PassJob`] on the [executor](crate::executor): each
//!   channel claims 1 MiB chunks, takes the chunk's dirty pages (all of them, or the runs of a
//!   dirty log), reads them from guest memory (in place for memory that cannot change, else
//!   into the channel's aligned buffer), detects zero pages, writes large extents and updates
//!   the file's bitmap — punching pages that had bytes and turned zero.
//! * **Finish** — [`Writer::finish`]: the stream tail (RAM END, device state), the bitmaps,
//!   long zero runs punched out of preallocated space, the checksum table and records. After
//!   it, the guest may run again.
//! * **Commit** — [`Writer::commit`]: the one commit step ([`crate::commit`]), durable.

use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use mapped_ram_core::bitmap::{self, words_for, AtomicBitmap, Bitmap, BitmapRef};
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::objects::object_chunks;
use mapped_ram_core::schedule::{self, Chunk, WorkQueue, WritePolicy};
use rustix::fs::OFlags;

use crate::commit::{self, Retired, Temp};
use crate::error::{IoFailure, Op, OptionError, SaveError};
use crate::executor::{
    self, open_channels, ChannelError, ChunkList, Claim, Control, FileChannels, Job, Pages,
    Stopped, Storage, Summing,
};
use crate::file::{self, DirectIo};
use crate::integrity;
use crate::mem::GuestMemory;
use crate::plan;
use crate::progress::{Cancel, ProgressFn};
use crate::save::{SaveOptions, ZeroPages, PUNCH_MIN_PAGES};
use crate::sys::AlignedBuf;
use crate::zero;
use mapped_ram_core::plan as core_plan;

/// One block to write: its name, memory and page size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Block<'m> {
    pub name: &'m str,
    pub memory: GuestMemory<'m>,
    pub page_size: u64,
}

/// Which pages a pass writes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dirty<'d> {
    /// Every page.
    All,
    /// The pages whose bit is set, one log per block in the writer's block order (KVM
    /// dirty-log layout: page `k` is bit `k % 64` of word `k / 64`).
    Logs(&'d [&'d [u64]]),
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PassReport {
    /// Pass number, from 0.
    pub pass: u32,
    /// Pages processed (marked dirty, or all pages in a full pass).
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

/// Where the file is written.
enum Dest<'f> {
    /// A temporary file beside `target`, renamed over it at commit.
    Temp { temp: Temp, target: PathBuf },
    /// Caller-provided descriptors, written in place.
    Fds {
        main: BorrowedFd<'f>,
        data: BorrowedFd<'f>,
        label: PathBuf,
    },
}

/// The device state after the RAM section.
#[derive(Debug, Clone, Copy)]
enum Stream {
    /// A new file: the tail is written at finish.
    New,
    /// An existing snapshot's tail, device state at `device_state_offset .. end`.
    Kept { device_state_offset: u64, end: u64 },
}

/// What the file holds for every page, updated by passes.
struct State {
    /// The file's bitmap (bit set = page stored), per block.
    stored: Vec<Vec<AtomicU64>>,
    /// Pages whose slot in the file may hold non-zero bytes, per block.
    bytes: Vec<Vec<AtomicU64>>,
    /// Checksum of the bytes last written to each page, per block, when the file has them.
    sums: Option<Vec<Vec<AtomicU32>>>,
    /// Some page whose bit is clear may hold non-zero bytes in the file (a copied snapshot
    /// not known to be clean, or a page that turned zero and was not punched): the file must
    /// not claim [`integrity::FLAG_CLEAN_ZERO`].
    unclean: AtomicBool,
}

fn atomic_words(n: u64) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl State {
    fn empty(layouts: &[BlockLayout], checksums: bool) -> Self {
        Self {
            stored: layouts
                .iter()
                .map(|l| atomic_words(l.bitmap_words()))
                .collect(),
            bytes: layouts
                .iter()
                .map(|l| atomic_words(l.bitmap_words()))
                .collect(),
            sums: checksums.then(|| {
                layouts
                    .iter()
                    .map(|l| (0..l.num_pages()).map(|_| AtomicU32::new(0)).collect())
                    .collect()
            }),
            unclean: AtomicBool::new(false),
        }
    }

    /// Block `block`'s bitmap words, masked to its pages.
    fn bitmap(&self, block: usize, layout: &BlockLayout) -> Result<Vec<u64>, SaveError> {
        let words = &self.stored[block];
        let map = AtomicBitmap::new(words, layout.num_pages())?;
        let mut snap = vec![0u64; words.len()];
        map.snapshot(&mut snap)?;
        Ok(snap)
    }
}

/// The engine's options, the same for every kind of save.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub channels: usize,
    pub chunk_bytes: u64,
    pub policy: WritePolicy,
    pub punch: bool,
    pub fsync: bool,
    pub cancel: Option<Cancel>,
    pub device_state: Option<Vec<u8>>,
    pub preallocate: bool,
    pub guest_ranges: Vec<crate::save::GuestRanges>,
}

impl Settings {
    pub fn new(so: &SaveOptions, punch: bool) -> Self {
        Self {
            channels: so.channels,
            chunk_bytes: so.chunk_bytes,
            policy: WritePolicy {
                max_io: so.chunk_bytes,
                max_gap_pages: so.max_gap_pages,
                write_zero_pages: so.zero_pages == ZeroPages::Write,
            },
            punch,
            fsync: so.fsync,
            cancel: so.cancel.clone(),
            device_state: so.device_state.clone(),
            preallocate: so.preallocate,
            guest_ranges: so.guest_ranges.clone(),
        }
    }
}

/// What [`Writer::finish`] wrote.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    pub pages: u64,
    pub pages_stored: u64,
    pub file_size: u64,
    pub checksums: bool,
}

/// A snapshot file being written (see the module docs).
pub(crate) struct Writer<'m, 'f> {
    dest: Dest<'f>,
    channels: Vec<OwnedFd>,
    pub direct: bool,
    pub fallback: Option<String>,
    blocks: Vec<Block<'m>>,
    pub layouts: Vec<BlockLayout>,
    page_size: u64,
    stream_start: u64,
    device_stream_start: u64,
    stream: Stream,
    /// Where the anchor record goes, when the file has checksums.
    anchor: Option<u64>,
    /// What the extension records before this save's changes (an update's snapshot's).
    extension: integrity::Extension,
    state: State,
    settings: Settings,
    preallocated: bool,
    pub passes: Vec<PassReport>,
    pub started: Instant,
    pub stale_removed: Vec<PathBuf>,
    /// Where page data goes instead of the channel descriptors (an object store), and the
    /// object size it gathers writes into (see [`Writer::with_sink`]).
    sink: Option<(&'f dyn Storage, u64)>,
}

fn io(op: Op, path: &Path, offset: Option<u64>) -> impl FnOnce(std::io::Error) -> SaveError + '_ {
    move |e| SaveError::Io(IoFailure::new(op, path, offset, e))
}

fn channel_error(e: ChannelError, path: &Path) -> SaveError {
    match e {
        ChannelError::DirectRefused { filesystem, source } => SaveError::DirectIoRefused {
            path: path.to_path_buf(),
            filesystem,
            source,
        },
        ChannelError::Io(f) => SaveError::Io(f),
    }
}

/// Where `O_DIRECT` is probed: the first page of the first block that has a page region.
pub(crate) fn probe_offset(layouts: &[BlockLayout], page_size: u64) -> Option<u64> {
    layouts
        .iter()
        .find(|l| !l.is_empty() && l.length >= page_size)
        .map(|l| l.pages_offset)
}

impl<'m, 'f> Writer<'m, 'f> {
    fn main(&self) -> BorrowedFd<'_> {
        match &self.dest {
            Dest::Temp { temp, .. } => temp.fd.as_fd(),
            Dest::Fds { main, .. } => *main,
        }
    }

    fn cancelled(&self) -> bool {
        self.settings
            .cancel
            .as_ref()
            .is_some_and(Cancel::is_cancelled)
    }

    /// The file being written (the temporary, or the descriptor's label), for errors.
    pub fn path(&self) -> &Path {
        match &self.dest {
            Dest::Temp { temp, .. } => &temp.path,
            Dest::Fds { label, .. } => label,
        }
    }

    /// The snapshot's final path (the target, or the descriptor's label).
    pub fn target(&self) -> &Path {
        match &self.dest {
            Dest::Temp { target, .. } => target,
            Dest::Fds { label, .. } => label,
        }
    }

    /// The blocks' names, in block order.
    pub fn block_names(&self) -> Vec<&'m str> {
        self.blocks.iter().map(|b| b.name).collect()
    }

    /// Channels in use.
    pub fn channel_count(&self) -> usize {
        self.settings.channels
    }

    /// A new file at `target` (written to a temporary beside it) holding `blocks`.
    pub fn create(
        target: &Path,
        blocks: Vec<Block<'m>>,
        so: &SaveOptions,
        punch: bool,
    ) -> Result<Self, SaveError> {
        let mut temp = Temp::create(target, 0o600)?;
        if so.offset > 0 {
            commit::copy_prefix(target, temp.fd.as_fd(), so.offset, &temp.path)?;
        }
        let stale_removed = std::mem::take(&mut temp.stale_removed);
        Self::new_file(
            Dest::Temp {
                temp,
                target: target.to_path_buf(),
            },
            blocks,
            so,
            punch,
            stale_removed,
        )
    }

    /// A new file written in place through caller-provided descriptors: `main` (buffered) for
    /// the stream, `data` (possibly `O_DIRECT`) for page data, shared by all channels.
    pub fn to_fds(
        main: BorrowedFd<'f>,
        data: BorrowedFd<'f>,
        blocks: Vec<Block<'m>>,
        so: &SaveOptions,
    ) -> Result<Self, SaveError> {
        let label = PathBuf::from(format!("fd {}", main.as_raw_fd()));
        file::set_len(main, so.offset).map_err(io(Op::Truncate, &label, Some(so.offset)))?;
        Self::new_file(
            Dest::Fds { main, data, label },
            blocks,
            so,
            true,
            Vec::new(),
        )
    }

    fn new_file(
        dest: Dest<'f>,
        blocks: Vec<Block<'m>>,
        so: &SaveOptions,
        punch: bool,
        stale_removed: Vec<PathBuf>,
    ) -> Result<Self, SaveError> {
        let started = Instant::now();
        let page_size = plan::check_options(
            so.channels,
            so.chunk_bytes,
            blocks
                .iter()
                .map(|b| (b.name, b.memory.len() as u64, b.page_size)),
        )?;
        let names: Vec<(&str, u64)> = blocks
            .iter()
            .map(|b| (b.name, b.memory.len() as u64))
            .collect();
        let plan = plan::plan(&names, page_size, &so.machine, so.offset)?;
        let anchor = if so.checksums {
            integrity::anchor_offset(&plan.layouts)
        } else {
            None
        };
        let mut w = Writer {
            dest,
            channels: Vec::new(),
            direct: false,
            fallback: None,
            blocks,
            layouts: plan.layouts.clone(),
            page_size,
            stream_start: so.offset,
            device_stream_start: plan.device_stream_start,
            stream: Stream::New,
            anchor,
            extension: integrity::Extension {
                device_state_given: false,
                guest_ranges: vec![Vec::new(); plan.layouts.len()],
            },
            state: State::empty(&plan.layouts, anchor.is_some()),
            settings: Settings::new(so, punch),
            preallocated: false,
            passes: Vec::new(),
            started,
            stale_removed,
            sink: None,
        };
        let path = w.path().to_path_buf();
        let main = w.main();
        file::set_len(main, plan.device_stream_start).map_err(io(
            Op::Truncate,
            &path,
            Some(plan.device_stream_start),
        ))?;
        file::write_all_at(main, &plan.head, so.offset, Op::WriteStream).map_err(io(
            Op::WriteStream,
            &path,
            Some(so.offset),
        ))?;
        for (layout, record) in plan.layouts.iter().zip(&plan.records) {
            file::write_all_at(main, record, layout.record_offset, Op::WriteStream).map_err(io(
                Op::WriteStream,
                &path,
                Some(layout.record_offset),
            ))?;
        }
        w.open_channels(so.direct_io, true)?;
        Ok(w)
    }

    /// Sends page data to `sink` instead of the descriptors: chunks are cut at multiples of
    /// `object_bytes` ([`mapped_ram_core::objects::object_chunks`]) and the sink is told when
    /// each is complete ([`Storage::end_chunk`]). The main descriptor still receives the
    /// stream, the bitmaps and the checksums.
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub fn with_sink(mut self, sink: &'f dyn Storage, object_bytes: u64, label: &Path) -> Self {
        if let Dest::Fds { label: l, .. } = &mut self.dest {
            *l = label.to_path_buf();
        }
        self.sink = Some((sink, object_bytes));
        self
    }

    /// A copy of the existing snapshot `old` (open on `old_fd`, structure `info`), made as
    /// `copy` says, to be updated with `blocks` (in the snapshot's block order) and committed
    /// over `target`. Returns the writer, how the copy was made and the bytes it copied.
    #[allow(clippy::too_many_arguments)]
    pub fn from_snapshot(
        target: &Path,
        old_fd: BorrowedFd<'_>,
        info: &crate::inspect::SnapshotInfo,
        tables: Option<Vec<Vec<u32>>>,
        blocks: Vec<Block<'m>>,
        so: &SaveOptions,
        punch: bool,
        copy: crate::update::CopyMode,
    ) -> Result<(Self, crate::update::CopyKind, u64), crate::update::UpdateError> {
        let started = Instant::now();
        let page_size = blocks.first().map(|b| b.page_size).unwrap_or(4096);
        let mode = rustix::fs::fstat(old_fd)
            .map(|st| st.st_mode & 0o7777)
            .unwrap_or(0o600);
        let mut temp = Temp::create(target, mode)?;
        let (kind, copied) = crate::update::clone_or_copy(
            old_fd,
            temp.fd.as_fd(),
            info.file_size,
            copy,
            target,
            &temp.path,
        )?;
        let layouts: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
        let state = State::empty(&layouts, tables.is_some());
        // The copy's clear pages read as zero only if its writer said so; QEMU's files (and
        // ours without records) may hold stale bytes there.
        let clean = info
            .integrity
            .is_some_and(|i| i.record.flags & integrity::FLAG_CLEAN_ZERO != 0);
        state.unclean.store(!clean, Ordering::Relaxed);
        for (block, b) in info.blocks.iter().enumerate() {
            for (i, w) in b.bitmap.iter().enumerate() {
                state.stored[block][i].store(*w, Ordering::Relaxed);
                state.bytes[block][i].store(*w, Ordering::Relaxed);
            }
            if let (Some(sums), Some(tables)) = (&state.sums, &tables) {
                for (slot, v) in sums[block].iter().zip(&tables[block]) {
                    slot.store(*v, Ordering::Relaxed);
                }
            }
        }
        let stale_removed = std::mem::take(&mut temp.stale_removed);
        let mut w = Writer {
            dest: Dest::Temp {
                temp,
                target: target.to_path_buf(),
            },
            channels: Vec::new(),
            direct: false,
            fallback: None,
            blocks,
            layouts,
            page_size,
            stream_start: info.offset,
            device_stream_start: info.device_stream_start,
            stream: Stream::Kept {
                device_state_offset: info.device_state_offset,
                end: info.device_state_end(),
            },
            anchor: info.integrity.map(|i| i.anchor_offset),
            extension: integrity::Extension {
                device_state_given: info.device_state_given.unwrap_or(true),
                guest_ranges: info.blocks.iter().map(|b| b.guest_ranges.clone()).collect(),
            },
            state,
            settings: Settings::new(so, punch),
            preallocated: false,
            passes: Vec::new(),
            started,
            stale_removed,
            sink: None,
        };
        // The copy holds data already: probe O_DIRECT with a read, never a write.
        w.open_channels(so.direct_io, false)?;
        Ok((w, kind, copied))
    }

    /// Opens the channel descriptors (derived from the main one) and, for `O_DIRECT` into a
    /// new file, preallocates the page regions ([`SaveOptions::preallocate`]).
    fn open_channels(&mut self, mode: DirectIo, new_file: bool) -> Result<(), SaveError> {
        let path = self.path().to_path_buf();
        let probe = probe_offset(&self.layouts, self.page_size);
        if let Dest::Fds { data, .. } = &self.dest {
            self.direct = rustix::fs::fcntl_getfl(*data)
                .map(|f| f.contains(OFlags::DIRECT))
                .unwrap_or(false);
        } else {
            // A new file proves O_DIRECT with a write of its first page slot; a copy of a
            // snapshot already holds data there, so it is proved with a read first (and `Auto`
            // falls back to buffered I/O when that is refused), then opened without a probe.
            let (mode, probe_write, fallback) = if new_file {
                (mode, probe, None)
            } else {
                let read = open_channels(self.main(), &path, false, 1, mode, probe)
                    .map_err(|e| channel_error(e, self.target()))?;
                let mode = if read.direct {
                    DirectIo::On
                } else {
                    DirectIo::Off
                };
                (mode, None, read.fallback)
            };
            let mut opened = open_channels(
                self.main(),
                &path,
                true,
                self.settings.channels,
                mode,
                probe_write,
            )
            .map_err(|e| channel_error(e, self.target()))?;
            opened.fallback = opened.fallback.or(fallback);
            self.channels = opened.fds;
            self.direct = opened.direct;
            self.fallback = opened.fallback;
        }
        self.preallocated = self.direct
            && self.settings.policy.max_gap_pages > 0
            && self.settings.preallocate
            && !file::is_tmpfs(self.main())
            && allocate_page_regions(self.main(), &self.layouts)
                .map_err(|(at, e)| io(Op::Allocate, &path, Some(at))(e))?;
        Ok(())
    }

    /// Runs one pass over the pages `dirty` marks (see the module docs).
    pub fn pass(
        &mut self,
        dirty: Dirty<'_>,
        progress: Option<&mut ProgressFn<'_>>,
    ) -> Result<PassReport, SaveError> {
        let started = Instant::now();
        if let Dirty::Logs(logs) = dirty {
            self.check_logs(logs)?;
        }
        let counters = Counters::default();
        let empty = match dirty {
            Dirty::All => false,
            Dirty::Logs(logs) => logs.iter().all(|l| l.iter().all(|w| *w == 0)),
        };
        if !empty {
            let fds: Vec<BorrowedFd<'_>> = match &self.dest {
                Dest::Fds { data, .. } => vec![*data; self.settings.channels],
                Dest::Temp { .. } => self.channels.iter().map(|f| f.as_fd()).collect(),
            };
            let files = FileChannels::new(fds, self.direct, self.settings.chunk_bytes);
            let (target, queue): (&dyn Storage, Box<dyn Claim + '_>) = match self.sink {
                Some((sink, object_bytes)) => (
                    sink,
                    Box::new(ChunkList::new(
                        object_chunks(&self.layouts, object_bytes)
                            .map(|c| c.chunk)
                            .collect(),
                    )),
                ),
                None => (
                    &files,
                    Box::new(WorkQueue::new(&self.layouts, self.settings.chunk_bytes)?),
                ),
            };
            let total = self.layouts.iter().map(|l| l.length).sum();
            let summing = self.state.sums.as_ref().map(|sums| Summing {
                inner: target,
                sums,
            });
            let storage: &dyn Storage = match &summing {
                Some(s) => s,
                None => target,
            };
            let job = PassJob {
                blocks: &self.blocks,
                layouts: &self.layouts,
                state: &self.state,
                dirty,
                storage,
                policy: &self.settings.policy,
                punch: self.settings.punch,
                main: self.main(),
                path: self.path(),
                counters: &counters,
                chunk_bytes: self.settings.chunk_bytes,
            };
            let ctl = Control {
                cancel: self.settings.cancel.as_ref(),
                progress,
                total,
            };
            let result = executor::execute(self.settings.channels, &*queue, &job, ctl);
            match result {
                Ok(()) => {}
                Err(Stopped::Failed(e)) => return Err(e),
                Err(Stopped::Cancelled) => return Err(SaveError::Cancelled),
            }
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let report = PassReport {
            pass: self.passes.len() as u32,
            pages_dirty: get(&counters.pages_dirty),
            pages_written: get(&counters.pages_written),
            zero_pages: get(&counters.zero_pages),
            pages_punched: get(&counters.pages_punched),
            data_bytes: get(&counters.data_bytes),
            writes: get(&counters.writes),
            seconds: started.elapsed().as_secs_f64(),
        };
        self.passes.push(report.clone());
        Ok(report)
    }

    fn check_logs(&self, logs: &[&[u64]]) -> Result<(), SaveError> {
        for ((log, block), layout) in logs.iter().zip(&self.blocks).zip(&self.layouts) {
            let needed = words_for(layout.num_pages());
            if (log.len() as u64) < needed {
                return Err(OptionError::DirtyLogTooShort {
                    block: block.name.into(),
                    words: log.len(),
                    pages: layout.num_pages(),
                    needed,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Writes the stream tail (RAM END and `device_state`, else the settings' device state,
    /// else `QEMU_VM_EOF`; an existing snapshot keeps its own unless one is given), the
    /// bitmaps, and the checksums. After it the guest may run again; [`Writer::commit`] makes
    /// the file durable.
    pub fn finish(&mut self, device_state: Option<&[u8]>) -> Result<Finished, SaveError> {
        if self.cancelled() {
            return Err(SaveError::Cancelled);
        }
        let path = self.path().to_path_buf();
        let main = self.main();
        let given = device_state.or(self.settings.device_state.as_deref());
        let stream_end =
            match (self.stream, given) {
                (Stream::New, ds) => {
                    let tail = plan::tail(ds);
                    file::write_all_at(main, &tail, self.device_stream_start, Op::WriteStream)
                        .map_err(io(Op::WriteStream, &path, Some(self.device_stream_start)))?;
                    self.device_stream_start + tail.len() as u64
                }
                (
                    Stream::Kept {
                        device_state_offset,
                        ..
                    },
                    Some(ds),
                ) => {
                    let ds: &[u8] = if ds.is_empty() { &EOF } else { ds };
                    file::write_all_at(main, ds, device_state_offset, Op::WriteStream)
                        .map_err(io(Op::WriteStream, &path, Some(device_state_offset)))?;
                    device_state_offset + ds.len() as u64
                }
                (Stream::Kept { end, .. }, None) => end,
            };
        let table_len = match self.anchor {
            Some(_) => integrity::table_len(&self.layouts).ok_or(
                mapped_ram_core::layout::LayoutError::Overflow {
                    what: "checksum table",
                },
            )?,
            None => 0,
        };
        // The extension (files with checksums): whether a device state was given, and the
        // blocks' guest address ranges.
        let mut ext = self.extension.clone();
        match (self.stream, given) {
            (_, Some(ds)) => ext.device_state_given = !ds.is_empty(),
            (Stream::New, None) => ext.device_state_given = false,
            (Stream::Kept { .. }, None) => {}
        }
        for (ranges, block) in ext.guest_ranges.iter_mut().zip(&self.blocks) {
            if let Some(g) = self
                .settings
                .guest_ranges
                .iter()
                .find(|g| g.block == block.name)
            {
                ranges.clone_from(&g.ranges);
            }
        }
        let ext_bytes = match self.anchor {
            Some(_) => ext.encode(),
            None => Vec::new(),
        };
        let table_offset = stream_end + ext_bytes.len() as u64;
        let file_size = match self.anchor {
            Some(_) => table_offset + table_len + integrity::RECORD_LEN,
            None => stream_end,
        };
        file::set_len(main, file_size).map_err(io(Op::Truncate, &path, Some(file_size)))?;
        let mut pages_stored = 0u64;
        let mut bitmaps = Vec::with_capacity(self.layouts.len());
        for (block, layout) in self.layouts.iter().enumerate() {
            let mut words = self.state.bitmap(block, layout)?;
            if layout.is_empty() {
                bitmaps.push(words);
                continue;
            }
            let map = Bitmap::new(&mut words, layout.num_pages())?;
            pages_stored += map.count_ones();
            if self.preallocated {
                // Long zero runs become holes again, as they are without preallocation.
                for hole in core_plan::punches(layout, map.as_ref(), PUNCH_MIN_PAGES) {
                    let at = hole.start;
                    file::punch_hole(main, at, hole.end - at).map_err(io(
                        Op::Punch,
                        &path,
                        Some(at),
                    ))?;
                }
            }
            let mut bytes = vec![0u8; words.len() * 8];
            bitmap::encode_le(&words, &mut bytes)?;
            file::write_all_at(main, &bytes, layout.bitmap_offset, Op::WriteBitmap).map_err(io(
                Op::WriteBitmap,
                &path,
                Some(layout.bitmap_offset),
            ))?;
            bitmaps.push(words);
        }
        if let (Some(anchor), Some(sums)) = (self.anchor, &self.state.sums) {
            file::write_all_at(main, &ext_bytes, stream_end, Op::WriteChecksums).map_err(io(
                Op::WriteChecksums,
                &path,
                Some(stream_end),
            ))?;
            let place = integrity::Place {
                anchor_offset: anchor,
                table_offset,
                table_len,
                file_size,
                flags: self.flags() | integrity::FLAG_EXTENSION,
            };
            let first_record = self
                .layouts
                .first()
                .map(|l| l.record_offset)
                .unwrap_or(self.device_stream_start);
            integrity::write(
                main,
                &path,
                &place,
                &self.layouts,
                &bitmaps,
                sums,
                integrity::Geometry {
                    stream_start: self.stream_start,
                    first_record,
                    device_stream_start: self.device_stream_start,
                    page_size: self.page_size,
                },
            )?;
        }
        Ok(Finished {
            pages: self.layouts.iter().map(BlockLayout::num_pages).sum(),
            pages_stored,
            file_size,
            checksums: self.anchor.is_some() && self.state.sums.is_some(),
        })
    }

    /// The record flags the file has earned: [`integrity::FLAG_CLEAN_ZERO`] when every page
    /// whose bit is clear reads as zero in the file (written as zero, punched, or never
    /// written in a file that started empty).
    fn flags(&self) -> u32 {
        if self.state.unclean.load(Ordering::Relaxed) {
            0
        } else {
            integrity::FLAG_CLEAN_ZERO
        }
    }

    /// Makes the finished file durable and, for a temporary, the snapshot at the target (the
    /// one [commit step](crate::commit)). Returns the previous snapshot's inode, still open.
    pub fn commit(mut self) -> Result<Retired, SaveError> {
        self.channels.clear();
        if self.cancelled() {
            return Err(SaveError::Cancelled);
        }
        let fsync = self.settings.fsync;
        match self.dest {
            Dest::Temp { temp, target } => Ok(temp.commit(&target, fsync)?),
            Dest::Fds { main, label, .. } => {
                if fsync {
                    file::fdatasync(main).map_err(io(Op::Sync, &label, None))?;
                }
                Ok(Retired::none())
            }
        }
    }
}

/// `QEMU_VM_EOF`: the device state of a file that has none.
const EOF: [u8; 1] = [0x00];

/// Allocates every block's page region; `false` where the file system cannot (then nothing
/// more is tried). A failure comes with the offset it was at.
fn allocate_page_regions(
    fd: BorrowedFd<'_>,
    layouts: &[BlockLayout],
) -> Result<bool, (u64, std::io::Error)> {
    for r in mapped_ram_core::plan::allocations(layouts) {
        if !file::allocate(fd, r.start, r.end - r.start).map_err(|e| (r.start, e))? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[derive(Default)]
struct Counters {
    pages_dirty: AtomicU64,
    pages_written: AtomicU64,
    zero_pages: AtomicU64,
    pages_punched: AtomicU64,
    data_bytes: AtomicU64,
    writes: AtomicU64,
}

/// The channel work of one pass: a chunk's dirty pages, from guest memory to the file.
struct PassJob<'a, 'm> {
    blocks: &'a [Block<'m>],
    layouts: &'a [BlockLayout],
    state: &'a State,
    dirty: Dirty<'a>,
    storage: &'a dyn Storage,
    policy: &'a WritePolicy,
    punch: bool,
    main: BorrowedFd<'a>,
    path: &'a Path,
    counters: &'a Counters,
    chunk_bytes: u64,
}

/// A channel's buffers.
struct Scratch {
    /// Copy of the run of pages being written, for memory that may change (aligned for
    /// `O_DIRECT`).
    copy: Option<AlignedBuf>,
    /// Zero pages of the run.
    zero: Vec<u64>,
    /// Pages of the run written by an extent.
    written: Vec<u64>,
}

impl Job for PassJob<'_, '_> {
    type Scratch = Scratch;
    type Error = SaveError;

    fn scratch(&self) -> Scratch {
        let words = words_for(self.chunk_bytes / 4096).max(1) as usize;
        Scratch {
            copy: None,
            zero: vec![0; words],
            written: vec![0; words],
        }
    }

    fn chunk(&self, ch: usize, scratch: &mut Scratch, chunk: &Chunk) -> Result<u64, SaveError> {
        let layout = &self.layouts[chunk.block];
        match self.dirty {
            Dirty::All => self.run(ch, scratch, chunk.block, chunk.range())?,
            Dirty::Logs(logs) => {
                let log = BitmapRef::new(logs[chunk.block], layout.num_pages())?;
                for run in log.runs_in(chunk.range(), true) {
                    self.run(ch, scratch, chunk.block, run)?;
                }
            }
        }
        self.storage.end_chunk(ch).map_err(|e| {
            let at = layout.page_offset(chunk.start).ok();
            SaveError::Io(IoFailure::new(Op::WritePages, self.path, at, e))
        })?;
        Ok(chunk.pages() * layout.page_size)
    }
}

impl PassJob<'_, '_> {
    /// Writes the pages `run` (inside one chunk) of block `block`.
    fn run(
        &self,
        ch: usize,
        scratch: &mut Scratch,
        block: usize,
        run: Range<u64>,
    ) -> Result<(), SaveError> {
        let layout = &self.layouts[block];
        let memory = self.blocks[block].memory;
        let ps = layout.page_size;
        let n = run.end - run.start;
        let (from, len) = ((run.start * ps) as usize, (n * ps) as usize);
        // Memory that cannot change is written in place; anything else is copied first, so
        // that zero detection, checksums and the write all see one consistent copy.
        let data: &[u8] = match memory.as_stable_slice() {
            Some(all) => {
                let data = &all[from..from + len];
                // One call maps the run instead of a page fault every few pages.
                crate::sys::populate_read(data);
                data
            }
            None => {
                let copy = scratch
                    .copy
                    .get_or_insert_with(|| AlignedBuf::new(self.chunk_bytes as usize));
                let dst = &mut copy.as_mut_slice()[..len];
                memory.read_into(from, dst).map_err(|e| {
                    SaveError::Io(IoFailure::new(
                        Op::ReadMemory,
                        memory.describe(),
                        Some(from as u64),
                        e,
                    ))
                })?;
                dst
            }
        };
        let page = |i: u64| &data[(i * ps) as usize..((i + 1) * ps) as usize];
        let mut zmap = Bitmap::new(&mut scratch.zero, n)?;
        zmap.clear_all();
        if !self.policy.write_zero_pages {
            for i in 0..n {
                if zero::is_zero(page(i)) {
                    zmap.set(i)?;
                }
            }
        }
        let zref = zmap.as_ref();
        let mut written = Bitmap::new(&mut scratch.written, n)?;
        written.clear_all();
        let sub = Chunk {
            block,
            start: run.start,
            end: run.end,
        };
        let mut result = Ok(());
        schedule::write_extents(layout, block, &sub, &zref, self.policy, |ext| {
            if result.is_err() {
                return;
            }
            let at = ((ext.first_page - run.start) * ps) as usize;
            let bytes = &data[at..at + ext.len as usize];
            let pages = Pages {
                block,
                first: ext.first_page,
                page_size: ps,
            };
            if let Err(e) = self.storage.write_pages(ch, pages, bytes, ext.file_offset) {
                result = Err(SaveError::Io(IoFailure::new(
                    Op::WritePages,
                    self.path,
                    Some(ext.file_offset),
                    e,
                )));
                return;
            }
            let rel = ext.first_page - run.start;
            let _ = written.set_range(rel..rel + ext.pages);
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
            self.counters
                .data_bytes
                .fetch_add(ext.len, Ordering::Relaxed);
        })?;
        result?;

        let stored = AtomicBitmap::new(&self.state.stored[block], layout.num_pages())?;
        let bytes = AtomicBitmap::new(&self.state.bytes[block], layout.num_pages())?;
        let wref = written.as_ref();
        for r in wref.runs_in(0..n, true) {
            bytes.update_range(run.start + r.start..run.start + r.end, true)?;
        }
        for r in zref.runs_in(0..n, false) {
            stored.update_range(run.start + r.start..run.start + r.end, true)?;
        }
        let mut zeros = 0u64;
        let mut punched = 0u64;
        for r in zref.runs_in(0..n, true) {
            zeros += r.end - r.start;
            stored.update_range(run.start + r.start..run.start + r.end, false)?;
            if !self.punch {
                // A zero page not rewritten now whose slot held bytes keeps them: stale.
                if r.clone()
                    .any(|i| !wref.test(i) && bytes.test(run.start + i))
                {
                    self.state.unclean.store(true, Ordering::Relaxed);
                }
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
                            punched += self.punch_pages(layout, h, &bytes)?;
                        }
                        hole = Some(index..index + 1);
                    }
                    (_, false) => {}
                }
            }
            if let Some(h) = hole {
                punched += self.punch_pages(layout, h, &bytes)?;
            }
        }
        self.counters.pages_dirty.fetch_add(n, Ordering::Relaxed);
        self.counters
            .pages_written
            .fetch_add(n - zeros, Ordering::Relaxed);
        self.counters.zero_pages.fetch_add(zeros, Ordering::Relaxed);
        self.counters
            .pages_punched
            .fetch_add(punched, Ordering::Relaxed);
        Ok(())
    }

    /// Punches pages `pages` of a block out of the file (they read as zero afterwards) and
    /// marks them as holding no bytes. Where the file system cannot punch holes, writes zeros.
    fn punch_pages(
        &self,
        layout: &BlockLayout,
        pages: Range<u64>,
        bytes: &AtomicBitmap<'_>,
    ) -> Result<u64, SaveError> {
        let ps = layout.page_size;
        let offset = layout.page_offset(pages.start)?;
        let len = (pages.end - pages.start) * ps;
        if !file::punch_hole(self.main, offset, len).map_err(io(
            Op::Punch,
            self.path,
            Some(offset),
        ))? {
            let zeros = vec![0u8; len as usize];
            file::write_all_at(self.main, &zeros, offset, Op::WritePages).map_err(io(
                Op::WritePages,
                self.path,
                Some(offset),
            ))?;
        }
        bytes.update_range(pages.clone(), false)?;
        Ok(pages.end - pages.start)
    }
}
