//! Checking a snapshot: its structure, its page checksums (when it has them), and optionally
//! that it holds exactly given RAM contents.

use std::os::fd::AsFd;
use std::path::Path;

use crate::error::{FormatError, IoFailure, Op};
use crate::file;
use crate::inspect::{open_snapshot, SnapshotInfo};
use crate::integrity;
use crate::save::SaveRegion;

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
pub enum VerifyError {
    /// The snapshot is unreadable or malformed.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// A region names a block the snapshot does not hold.
    #[error("block {name:?} is not in the snapshot")]
    UnknownBlock {
        /// The region's name.
        name: String,
    },
    /// A region's size differs from the block's length.
    #[error("block {name:?}: the snapshot holds {file_length} bytes but the RAM given has {region_length}")]
    SizeMismatch {
        /// The block.
        name: String,
        /// Length in the snapshot.
        file_length: u64,
        /// Length of the region.
        region_length: u64,
    },
}

/// Validates the snapshot's structure; checks every stored page against its checksum when the
/// file has checksums (see [`crate::integrity`]); and, for each of `expected`, compares the
/// block's contents page by page: a stored page must equal the RAM, a page with a clear bit
/// must be zero in the RAM.
pub fn verify(
    path: &Path,
    offset: u64,
    expected: &[SaveRegion<'_>],
) -> Result<VerifyReport, VerifyError> {
    let snap = open_snapshot(path, offset)?;
    let layouts: Vec<_> = snap.info.blocks.iter().map(|b| b.layout).collect();
    let tables = match &snap.info.integrity {
        Some(i) => Some(integrity::read_table(snap.fd.as_fd(), path, i, &layouts)?),
        None => None,
    };
    let mut regions: Vec<Option<&[u8]>> = vec![None; snap.info.blocks.len()];
    let mut blocks_compared = Vec::new();
    for region in expected {
        let Some(index) = snap.info.blocks.iter().position(|b| b.name == region.name) else {
            return Err(VerifyError::UnknownBlock {
                name: region.name.into(),
            });
        };
        let layout = snap.info.blocks[index].layout;
        if layout.length != region.memory.len() as u64 {
            return Err(VerifyError::SizeMismatch {
                name: region.name.into(),
                file_length: layout.length,
                region_length: region.memory.len() as u64,
            });
        }
        regions[index] = Some(region.memory);
        blocks_compared.push(region.name.to_string());
    }
    let mut mismatches = Vec::new();
    let mut corrupt = Vec::new();
    let mut pages_checksummed = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (index, block) in snap.info.blocks.iter().enumerate() {
        let layout = block.layout;
        let memory = regions[index];
        let sums = tables.as_ref().map(|t| t[index].as_slice());
        if layout.is_empty() || (memory.is_none() && sums.is_none()) {
            continue;
        }
        let ps = layout.page_size;
        let map = block.bitmap_ref();
        let mut first: Option<(u64, bool)> = None;
        let mut differing = 0u64;
        let mut note = |page: u64, stored: bool| {
            differing += 1;
            if first.is_none_or(|(p, _)| page < p) {
                first = Some((page, stored));
            }
        };
        let mut bad: Option<(u64, u32, u32)> = None;
        let mut pages_bad = 0u64;
        if let Some(memory) = memory {
            for run in map.runs(false) {
                for page in run {
                    let off = (page * ps) as usize;
                    if !crate::zero::is_zero(&memory[off..off + ps as usize]) {
                        note(page, false);
                    }
                }
            }
        }
        let pages_per_buf = (buf.len() as u64) / ps;
        for run in map.runs(true) {
            let mut page = run.start;
            while page < run.end {
                let n = (run.end - page).min(pages_per_buf);
                let bytes = (n * ps) as usize;
                let file_off = layout.pages_offset + page * ps;
                file::read_exact_at(snap.fd.as_fd(), &mut buf[..bytes], file_off).map_err(|e| {
                    FormatError::from(IoFailure::new(Op::ReadPages, path, Some(file_off), e))
                })?;
                for i in 0..n {
                    let a = (i * ps) as usize;
                    let data = &buf[a..a + ps as usize];
                    if let Some(sums) = sums {
                        let want = sums[(page + i) as usize];
                        let got = integrity::page_checksum(data, page + i);
                        pages_checksummed += 1;
                        if got != want {
                            pages_bad += 1;
                            bad.get_or_insert((page + i, want, got));
                        }
                    }
                    if let Some(memory) = memory {
                        let m = ((page + i) * ps) as usize;
                        if data != &memory[m..m + ps as usize] {
                            note(page + i, true);
                        }
                    }
                }
                page += n;
            }
        }
        if let Some((page, stored)) = first {
            mismatches.push(Mismatch {
                block: block.name.clone(),
                page,
                file_offset: layout.pages_offset + page * ps,
                stored,
                pages_differing: differing,
            });
        }
        if let Some((page, expected, actual)) = bad {
            corrupt.push(CorruptPage {
                block: block.name.clone(),
                page,
                file_offset: layout.pages_offset + page * ps,
                expected,
                actual,
                pages_bad,
            });
        }
    }
    Ok(VerifyReport {
        pages_checksummed: tables.as_ref().map(|_| pages_checksummed),
        info: snap.info,
        blocks_compared,
        mismatches,
        corrupt,
    })
}
