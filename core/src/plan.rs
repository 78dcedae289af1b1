//! The file-level operations of a save, decided here and carried out by a backend: which byte
//! ranges to allocate before the channels write, and which to punch out again afterwards.
//! Together with [`crate::schedule`] (which extents to write or read, by which channel),
//! [`crate::integrity::MetadataRanges`] (which bytes the metadata checksum covers) and
//! [`crate::bitmap`] (the bitmaps' bytes), a backend only executes what the core plans.
//!
//! The order of a save, as the Linux backend's write engine runs it:
//!
//! 1. [`Step::SizeFile`] to the end of the page regions, [`Step::WriteHead`], one
//!    [`Step::WriteRecord`] per block;
//! 2. [`Step::Allocate`] for each range of [`allocations`] (with `O_DIRECT`, where it pays);
//! 3. the passes: [`crate::schedule::write_extents`] per chunk;
//! 4. [`Step::WriteTail`], [`Step::SizeFile`] to the full size, [`Step::Punch`] for each range
//!    of [`punches`] (after preallocation), one [`Step::WriteBitmap`] per block,
//!    [`Step::WriteChecksums`];
//! 5. [`Step::Commit`].

use core::ops::Range;

use crate::bitmap::{BitmapRef, Runs};
use crate::layout::BlockLayout;

/// A file-level step of a save (see the module docs for their order).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Step {
    /// Set the file's size.
    SizeFile(u64),
    /// Write the stream head at the stream start.
    WriteHead,
    /// Write block `n`'s record and header.
    WriteRecord(usize),
    /// Allocate this byte range without changing the file size.
    Allocate(Range<u64>),
    /// Write the stream after the last block's pages (RAM END, device state).
    WriteTail,
    /// Make this byte range a hole again.
    Punch(Range<u64>),
    /// Write block `n`'s bitmap.
    WriteBitmap(usize),
    /// Write the checksum table and records.
    WriteChecksums,
    /// Sync, and put the file at its path.
    Commit,
}

/// The page regions of the blocks with data, as byte ranges: what to allocate before
/// `O_DIRECT` writes (into allocated space they do not serialise on the inode lock).
pub fn allocations(layouts: &[BlockLayout]) -> impl Iterator<Item = Range<u64>> + '_ {
    layouts
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.pages_offset..l.pages_end())
}

/// The byte ranges of the runs of at least `min_pages` clear pages of a block (`stored` is its
/// bitmap): what to punch out of preallocated space after the writes, so that the file is as
/// sparse as without preallocation.
pub fn punches<'a>(layout: &'a BlockLayout, stored: BitmapRef<'a>, min_pages: u64) -> Punches<'a> {
    Punches {
        layout,
        runs: stored.runs_in(0..layout.num_pages(), false),
        min_pages,
    }
}

/// The iterator of [`punches`].
#[derive(Debug, Clone)]
pub struct Punches<'a> {
    layout: &'a BlockLayout,
    runs: Runs<'a>,
    min_pages: u64,
}

impl Iterator for Punches<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        if self.layout.is_empty() {
            return None;
        }
        loop {
            let run = self.runs.next()?;
            if run.end.saturating_sub(run.start) < self.min_pages {
                continue;
            }
            let ps = self.layout.page_size;
            let start = run
                .start
                .checked_mul(ps)?
                .checked_add(self.layout.pages_offset)?;
            let end = run
                .end
                .checked_mul(ps)?
                .checked_add(self.layout.pages_offset)?;
            return Some(start..end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::Bitmap;
    use crate::layout::Planner;

    #[test]
    fn allocations_and_punches() {
        let mut p = Planner::new(0x40, 4096, false).unwrap();
        let a = p.push(6, 1 << 20).unwrap(); // 256 pages
        let e = p.push_empty(3, 1 << 20).unwrap();
        let b = p.push(7, 64 << 10).unwrap();
        let layouts = [a, e, b];
        let allocs: std::vec::Vec<_> = allocations(&layouts).collect();
        assert_eq!(
            allocs,
            [a.pages_offset..a.pages_end(), b.pages_offset..b.pages_end()]
        );
        let mut words = [0u64; 4];
        let mut map = Bitmap::new(&mut words, 256).unwrap();
        map.set_range(0..10).unwrap(); // clear 10..256 except a short hole
        map.set_range(20..200).unwrap(); // clear 10..20 (10 pages) and 200..256 (56 pages)
        let holes: std::vec::Vec<_> = punches(&a, map.as_ref(), 16).collect();
        assert_eq!(holes.len(), 1);
        assert_eq!(holes[0], a.pages_offset + 200 * 4096..a.pages_end());
        let holes: std::vec::Vec<_> = punches(&a, map.as_ref(), 8).collect();
        assert_eq!(holes.len(), 2);
    }
}
