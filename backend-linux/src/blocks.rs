//! The one block matcher: which block of a snapshot a region names, checked the same way by
//! restore, lazy restore, update and verify.

use mapped_ram_core::layout::BlockLayout;

use crate::error::BlockMismatch;
use crate::inspect::BlockInfo;

/// What a region asks of a block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted<'n> {
    pub name: &'n str,
    /// Its length in bytes, when the caller has memory of a fixed size.
    pub length: Option<u64>,
    /// Its page size, when the caller has one.
    pub page_size: Option<u64>,
    /// The block must have a page region in the file (not `x-ignore-shared`).
    pub needs_pages: bool,
}

fn names(blocks: &[BlockInfo]) -> String {
    blocks
        .iter()
        .map(|b| b.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The index of the block `want` names, after checking its length, page size and page region.
pub(crate) fn find(blocks: &[BlockInfo], want: Wanted<'_>) -> Result<usize, BlockMismatch> {
    let Some(index) = blocks.iter().position(|b| b.name == want.name) else {
        return Err(BlockMismatch::Unknown {
            name: want.name.into(),
            available: names(blocks),
        });
    };
    let layout: &BlockLayout = &blocks[index].layout;
    if let Some(length) = want.length {
        if layout.length != length {
            return Err(BlockMismatch::Length {
                name: want.name.into(),
                file_length: layout.length,
                region_length: length,
            });
        }
    }
    if let Some(page_size) = want.page_size {
        if layout.page_size != page_size {
            return Err(BlockMismatch::PageSize {
                name: want.name.into(),
                file: layout.page_size,
                region: page_size,
            });
        }
    }
    if want.needs_pages && layout.is_empty() && layout.length > 0 {
        return Err(BlockMismatch::NoPages {
            name: want.name.into(),
        });
    }
    Ok(index)
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
