//! The one block matcher, over the core's [`mapped_ram_core::matching`]: which block of a
//! snapshot a region names, checked the same way by restore, lazy restore, update and verify,
//! with errors that name the block.

use mapped_ram_core::matching::{self, MatchError};

pub(crate) use mapped_ram_core::matching::Wanted;

use crate::error::BlockMismatch;
use crate::inspect::BlockInfo;

fn names(blocks: &[BlockInfo]) -> String {
    blocks
        .iter()
        .map(|b| b.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The index of the block `want` names, after checking its length, page size and page region.
pub(crate) fn find(blocks: &[BlockInfo], want: Wanted<'_>) -> Result<usize, BlockMismatch> {
    let all = blocks.iter().map(|b| (b.name.as_str(), &b.layout));
    matching::find(all, &want).map_err(|e| {
        let name = want.name.to_string();
        match e {
            MatchError::Unknown => BlockMismatch::Unknown {
                name,
                available: names(blocks),
            },
            MatchError::Length { file, region } => BlockMismatch::Length {
                name,
                file_length: file,
                region_length: region,
            },
            MatchError::PageSize { file, region } => BlockMismatch::PageSize { name, file, region },
            MatchError::NoPages => BlockMismatch::NoPages { name },
        }
    })
}

/// Matches every region to its block; returns the block indices in region order.
pub(crate) fn find_all<'n>(
    blocks: &[BlockInfo],
    wanted: impl Iterator<Item = Wanted<'n>>,
) -> Result<Vec<usize>, BlockMismatch> {
    wanted.map(|w| find(blocks, w)).collect()
}

/// Checks that `chosen` (block indices) covers every block of the snapshot.
pub(crate) fn check_complete(blocks: &[BlockInfo], chosen: &[usize]) -> Result<(), BlockMismatch> {
    let missing: Vec<&str> = blocks
        .iter()
        .enumerate()
        .filter(|(i, _)| !chosen.contains(i))
        .map(|(_, b)| b.name.as_str())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BlockMismatch::Missing {
            names: missing.join(", "),
        })
    }
}
