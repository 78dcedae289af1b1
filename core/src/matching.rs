//! Block matching: which block of a snapshot a region of guest memory names, checked the same
//! way by every operation that reads a snapshot into memory or writes memory into one.

use crate::layout::BlockLayout;

/// What a region asks of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Wanted<'n> {
    /// The block's id string.
    pub name: &'n str,
    /// Its length in bytes, when the caller has memory of a fixed size.
    pub length: Option<u64>,
    /// Its page size, when the caller has one.
    pub page_size: Option<u64>,
    /// The block must have a page region in the file (not `x-ignore-shared`).
    pub needs_pages: bool,
}

/// Why a region does not fit a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MatchError {
    /// No block of that name.
    Unknown,
    /// The block's length differs.
    Length {
        /// Length in the file.
        file: u64,
        /// Length of the region.
        region: u64,
    },
    /// The block's page size differs.
    PageSize {
        /// Page size in the file.
        file: u64,
        /// Page size of the region.
        region: u64,
    },
    /// The block has no page region in the file.
    NoPages,
}

/// The index of the block among `blocks` (name and layout, in file order) that `want` names,
/// after checking its length, page size and page region.
pub fn find<'b>(
    blocks: impl IntoIterator<Item = (&'b str, &'b BlockLayout)>,
    want: &Wanted<'_>,
) -> Result<usize, MatchError> {
    let (index, layout) = blocks
        .into_iter()
        .enumerate()
        .find(|(_, (name, _))| *name == want.name)
        .map(|(i, (_, l))| (i, l))
        .ok_or(MatchError::Unknown)?;
    if let Some(region) = want.length {
        if layout.length != region {
            return Err(MatchError::Length {
                file: layout.length,
                region,
            });
        }
    }
    if let Some(region) = want.page_size {
        if layout.page_size != region {
            return Err(MatchError::PageSize {
                file: layout.page_size,
                region,
            });
        }
    }
    if want.needs_pages && layout.is_empty() && layout.length > 0 {
        return Err(MatchError::NoPages);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Planner;

    #[test]
    fn finds_and_checks() {
        let mut p = Planner::new(0x40, 4096, false).unwrap();
        let a = p.push(6, 1 << 20).unwrap();
        let b = p.push(7, 64 << 10).unwrap();
        let blocks = [("pc.ram", &a), ("pc.bios", &b)];
        let want = |name, length, page_size| Wanted {
            name,
            length,
            page_size,
            needs_pages: true,
        };
        assert_eq!(
            find(blocks, &want("pc.bios", Some(64 << 10), Some(4096))),
            Ok(1)
        );
        assert_eq!(
            find(blocks, &want("nope", None, None)),
            Err(MatchError::Unknown)
        );
        assert_eq!(
            find(blocks, &want("pc.ram", Some(1), None)),
            Err(MatchError::Length {
                file: 1 << 20,
                region: 1
            })
        );
        assert_eq!(
            find(blocks, &want("pc.ram", None, Some(8192))),
            Err(MatchError::PageSize {
                file: 4096,
                region: 8192
            })
        );
    }
}
