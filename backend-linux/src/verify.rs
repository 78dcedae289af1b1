//! Checking a snapshot: its structure, its page checksums (when it has them), and optionally
//! that it holds exactly given RAM contents.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::schedule::{Chunk, WorkQueue};

use crate::blocks::{self, Wanted};
use crate::error::{BlockMismatch, FormatError, IoFailure, Op};
use crate::executor::{self, Control, FileChannels, Job, Pages, Stopped, Storage};
use crate::inspect::{open_snapshot, BlockInfo, SnapshotInfo};
use crate::integrity;
use crate::save::{default_channels, SaveRegion};

/// The first page of a block whose content in the snapshot differs from the expected RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The block.
    pub block: String,
    /// Page index within the block.
    pub page: u64,
    /// Absolute file offset of the page's slot.
    pub file_offset: u64,
    /// Whether the page is stored in the file (bit set); a clear bit means "zero".
    pub stored: bool,
    /// Number of differing pages in the block.
    pub pages_differing: u64,
}

/// The first page of a block that fails its stored checksum (see [`crate::integrity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptPage {
    /// The block.
    pub block: String,
    /// Page index within the block.
    pub page: u64,
    /// Absolute file offset of the page.
    pub file_offset: u64,
    /// The checksum stored in the file.
    pub expected: u32,
    /// The checksum of the page's bytes as read.
    pub actual: u32,
    /// Number of pages of the block that fail their checksum.
    pub pages_bad: u64,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The snapshot's structure (always checked).
    pub info: SnapshotInfo,
    /// Blocks whose contents were compared.
    pub blocks_compared: Vec<String>,
    /// Blocks whose contents differ, with the first differing page of each.
    pub mismatches: Vec<Mismatch>,
    /// Stored pages checked against their checksums; `None` when the file has none.
    pub pages_checksummed: Option<u64>,
    /// Blocks with pages that fail their checksum, with the first such page of each.
    pub corrupt: Vec<CorruptPage>,
}

impl VerifyReport {
    /// `true` when the structure is valid, every compared block matched and every page
    /// matched its checksum.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty() && self.corrupt.is_empty()
    }
}

/// Why a verification could not be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The snapshot is unreadable or malformed.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// A region does not fit the snapshot's block.
    #[error("{0}")]
    Block(#[from] BlockMismatch),
}

/// First finding and count of one kind, per block.
#[derive(Default)]
struct Findings {
    count: AtomicU64,
    /// (page, stored / expected, actual) of the lowest page found.
    first: Mutex<Option<(u64, u32, u32, bool)>>,
}

impl Findings {
    fn note(&self, page: u64, a: u32, b: u32, flag: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none_or(|f| page < f.0) {
            *first = Some((page, a, b, flag));
        }
    }
}

/// The channel work of a verification: a chunk's stored pages read and checked against their
/// checksums and the expected RAM; its clear pages checked to be zero in the RAM.
struct VerifyJob<'a> {
    storage: &'a dyn Storage,
    path: &'a Path,
    blocks: &'a [BlockInfo],
    memory: &'a [Option<&'a [u8]>],
    tables: Option<&'a [Vec<u32>]>,
    mismatches: &'a [Findings],
    corrupt: &'a [Findings],
    checksummed: &'a AtomicU64,
    chunk_bytes: usize,
}

impl Job for VerifyJob<'_> {
    type Scratch = Vec<u8>;
    type Error = FormatError;

    fn scratch(&self) -> Vec<u8> {
        vec![0u8; self.chunk_bytes]
    }

    fn chunk(&self, ch: usize, buf: &mut Vec<u8>, chunk: &Chunk) -> Result<u64, FormatError> {
        let b = chunk.block;
        let block = &self.blocks[b];
        let layout = block.layout;
        let ps = layout.page_size;
        let memory = self.memory[b];
        let sums = self.tables.map(|t| t[b].as_slice());
        if memory.is_none() && sums.is_none() {
            return Ok(chunk.pages() * ps);
        }
        let map = block.bitmap_ref();
        if let Some(memory) = memory {
            for run in map.runs_in(chunk.range(), false) {
                for page in run {
                    let off = (page * ps) as usize;
                    if !crate::zero::is_zero(&memory[off..off + ps as usize]) {
                        self.mismatches[b].note(page, 0, 0, false);
                    }
                }
            }
        }
        for run in map.runs_in(chunk.range(), true) {
            let bytes = ((run.end - run.start) * ps) as usize;
            let at = layout.pages_offset + run.start * ps;
            let pages = Pages {
                block: b,
                first: run.start,
                page_size: ps,
            };
            self.storage
                .read_pages(ch, pages, &mut buf[..bytes], at)
                .map_err(|e| {
                    FormatError::from(IoFailure::new(Op::ReadPages, self.path, Some(at), e))
                })?;
            for (i, data) in buf[..bytes].chunks_exact(ps as usize).enumerate() {
                let page = run.start + i as u64;
                if let Some(sums) = sums {
                    let want = sums[page as usize];
                    let got = integrity::page_checksum(data, page);
                    self.checksummed.fetch_add(1, Ordering::Relaxed);
                    if got != want {
                        self.corrupt[b].note(page, want, got, true);
                    }
                }
                if let Some(memory) = memory {
                    let m = (page * ps) as usize;
                    if data != &memory[m..m + ps as usize] {
                        self.mismatches[b].note(page, 0, 0, true);
                    }
                }
            }
        }
        Ok(chunk.pages() * ps)
    }
}

/// Validates the snapshot's structure; checks every stored page against its checksum when the
/// file has checksums (see [`crate::integrity`]); and, for each of `expected`, compares the
/// block's contents page by page: a stored page must equal the RAM, a page with a clear bit
/// must be zero in the RAM. Pages are read by several channels, like a restore's.
pub fn verify(
    path: &Path,
    offset: u64,
    expected: &[SaveRegion<'_>],
) -> Result<VerifyReport, VerifyError> {
    let snap = open_snapshot(path, offset)?;
    let files = FileChannels::new(vec![snap.fd.as_fd()], false, 0);
    verify_on(&snap.info, snap.fd.as_fd(), path, &files, expected)
}

/// [`verify()`] of the snapshot `info` whose metadata `main` holds and whose pages `storage`
/// reads.
pub(crate) fn verify_on(
    info: &SnapshotInfo,
    main: BorrowedFd<'_>,
    path: &Path,
    storage: &dyn Storage,
    expected: &[SaveRegion<'_>],
) -> Result<VerifyReport, VerifyError> {
    let layouts: Vec<BlockLayout> = info.blocks.iter().map(|b| b.layout).collect();
    let tables = match &info.integrity {
        Some(i) => Some(integrity::read_table(main, path, i, &layouts)?),
        None => None,
    };
    let index = blocks::find_all(
        &info.blocks,
        expected.iter().map(|r| Wanted {
            name: r.name,
            length: Some(r.memory.len() as u64),
            page_size: None,
            needs_pages: false,
        }),
    )?;
    let mut memory: Vec<Option<&[u8]>> = vec![None; info.blocks.len()];
    for (r, &i) in expected.iter().zip(&index) {
        memory[i] = Some(r.memory);
    }
    let blocks_compared = expected.iter().map(|r| r.name.to_string()).collect();
    // Only blocks with pages in the file are scanned.
    let scanned: Vec<BlockLayout> = layouts
        .iter()
        .map(|l| {
            if l.is_empty() {
                BlockLayout { length: 0, ..*l }
            } else {
                *l
            }
        })
        .collect();
    let findings = |n: usize| (0..n).map(|_| Findings::default()).collect::<Vec<_>>();
    let (mismatches, corrupt) = (findings(layouts.len()), findings(layouts.len()));
    let checksummed = AtomicU64::new(0);
    let chunk_bytes = mapped_ram_core::schedule::DEFAULT_MAX_IO;
    let queue = WorkQueue::new(&scanned, chunk_bytes).map_err(|e| {
        FormatError::from(IoFailure::new(
            Op::ReadPages,
            path,
            None,
            std::io::Error::other(e.to_string()),
        ))
    })?;
    let job = VerifyJob {
        storage,
        path,
        blocks: &info.blocks,
        memory: &memory,
        tables: tables.as_deref(),
        mismatches: &mismatches,
        corrupt: &corrupt,
        checksummed: &checksummed,
        chunk_bytes: chunk_bytes as usize,
    };
    match executor::execute(default_channels(), &queue, &job, Control::default()) {
        Ok(()) => {}
        Err(Stopped::Failed(e)) => return Err(e.into()),
        Err(Stopped::Cancelled) => {}
    }
    let mut report = VerifyReport {
        pages_checksummed: tables.as_ref().map(|_| checksummed.load(Ordering::Relaxed)),
        info: info.clone(),
        blocks_compared,
        mismatches: Vec::new(),
        corrupt: Vec::new(),
    };
    for (block, (m, c)) in info.blocks.iter().zip(mismatches.iter().zip(&corrupt)) {
        let ps = block.layout.page_size;
        let at = |page: u64| block.layout.pages_offset + page * ps;
        if let Some((page, _, _, stored)) = *m.first.lock().unwrap_or_else(|p| p.into_inner()) {
            report.mismatches.push(Mismatch {
                block: block.name.clone(),
                page,
                file_offset: at(page),
                stored,
                pages_differing: m.count.load(Ordering::Relaxed),
            });
        }
        if let Some((page, expected, actual, _)) =
            *c.first.lock().unwrap_or_else(|p| p.into_inner())
        {
            report.corrupt.push(CorruptPage {
                block: block.name.clone(),
                page,
                file_offset: at(page),
                expected,
                actual,
                pages_bad: c.count.load(Ordering::Relaxed),
            });
        }
    }
    Ok(report)
}
