//! Checking a snapshot: its structure, and optionally that it holds exactly given RAM contents.

use std::os::fd::AsFd;
use std::path::Path;

use crate::error::{FormatError, IoFailure, Op};
use crate::file;
use crate::inspect::{open_snapshot, SnapshotInfo};
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

/// The outcome of [`verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The snapshot's structure (always checked).
    pub info: SnapshotInfo,
    /// Blocks whose contents were compared.
    pub blocks_compared: Vec<String>,
    /// Blocks whose contents differ, with the first differing page of each.
    pub mismatches: Vec<Mismatch>,
}

impl VerifyReport {
    /// `true` when the structure is valid and every compared block matched.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
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

/// Validates the snapshot's structure and, for each of `expected`, compares the block's
/// contents page by page: a stored page must equal the RAM, a page with a clear bit must be
/// zero in the RAM.
pub fn verify(
    path: &Path,
    offset: u64,
    expected: &[SaveRegion<'_>],
) -> Result<VerifyReport, VerifyError> {
    let snap = open_snapshot(path, offset)?;
    let mut mismatches = Vec::new();
    let mut blocks_compared = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in expected {
        let Some(block) = snap.info.block(region.name) else {
            return Err(VerifyError::UnknownBlock {
                name: region.name.into(),
            });
        };
        let layout = block.layout;
        if layout.length != region.memory.len() as u64 {
            return Err(VerifyError::SizeMismatch {
                name: region.name.into(),
                file_length: layout.length,
                region_length: region.memory.len() as u64,
            });
        }
        blocks_compared.push(block.name.clone());
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
        if layout.is_empty() {
            continue;
        }
        for run in map.runs(false) {
            for page in run {
                let off = (page * ps) as usize;
                if !crate::zero::is_zero(&region.memory[off..off + ps as usize]) {
                    note(page, false);
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
                    let m = ((page + i) * ps) as usize;
                    if buf[a..a + ps as usize] != region.memory[m..m + ps as usize] {
                        note(page + i, true);
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
    }
    Ok(VerifyReport {
        info: snap.info,
        blocks_compared,
        mismatches,
    })
}
