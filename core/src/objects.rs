//! A mapped-ram file cut into fixed-size *objects* for an object store.
//!
//! An object store has no partial writes: an object is uploaded whole, once. So a save to a
//! store cuts the file into objects of `object_bytes` each (object `i` holds file bytes
//! `i * object_bytes .. (i + 1) * object_bytes`), and an object that would hold only zeros is
//! not uploaded at all: it reads as zeros (the way s3backer stores a sparse file). A store
//! snapshot therefore costs no upload and no storage for its zero regions, while its bytes are
//! exactly those of a plain mapped-ram file.
//!
//! The plan of such a save is [`object_chunks`]: the pages of every block, split at object
//! boundaries, each piece marked [`ObjectChunk::whole`] when it *is* one entire object. A whole
//! object holds nothing but that chunk's pages, so a channel uploads it as soon as it has
//! written the chunk. Every other object (the file's head, each block's record, header and
//! bitmap, a block's last partial object, the tail with the device state and the checksums)
//! holds metadata that is written last: those objects are assembled locally and uploaded after
//! the bitmaps are known. [`is_whole`] answers the same question for one object, for a reader
//! that needs to know which objects hold metadata.

use core::ops::Range;

use crate::layout::BlockLayout;
use crate::schedule::Chunk;

/// One piece of a block's pages inside one object (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ObjectChunk {
    /// The pages: block index and page range.
    pub chunk: Chunk,
    /// The object the pages' first byte lies in.
    pub object: u64,
    /// `true` when the pages fill exactly object `object`, nothing more and nothing less.
    pub whole: bool,
}

/// The pages of every block with data, split at multiples of `object_bytes` in the file (see
/// the module docs). A page that straddles an object boundary (a huge page in a region that is
/// aligned to less than its size) ends a piece after it; such pieces are never whole.
/// `object_bytes` of zero yields nothing.
pub fn object_chunks(layouts: &[BlockLayout], object_bytes: u64) -> ObjectChunks<'_> {
    ObjectChunks {
        layouts,
        object_bytes,
        block: 0,
        page: 0,
    }
}

/// Iterator of [`object_chunks`].
#[derive(Debug, Clone)]
pub struct ObjectChunks<'a> {
    layouts: &'a [BlockLayout],
    object_bytes: u64,
    block: usize,
    page: u64,
}

impl Iterator for ObjectChunks<'_> {
    type Item = ObjectChunk;

    fn next(&mut self) -> Option<ObjectChunk> {
        if self.object_bytes == 0 {
            return None;
        }
        loop {
            let layout = self.layouts.get(self.block)?;
            let pages = layout.num_pages();
            let ps = layout.page_size;
            if layout.is_empty() || ps == 0 || self.page >= pages {
                self.block = self.block.checked_add(1)?;
                self.page = 0;
                continue;
            }
            let start = self.page;
            let offset = layout.pages_offset.checked_add(start.checked_mul(ps)?)?;
            let object = offset.checked_div(self.object_bytes)?;
            let boundary = object.checked_add(1)?.checked_mul(self.object_bytes)?;
            // Pages up to the boundary, at least one.
            let fit = boundary.checked_sub(offset)?.div_ceil(ps).max(1);
            let end = start.saturating_add(fit).min(pages);
            self.page = end;
            let end_offset = layout.pages_offset.checked_add(end.checked_mul(ps)?)?;
            let whole = offset == object.checked_mul(self.object_bytes)? && end_offset == boundary;
            return Some(ObjectChunk {
                chunk: Chunk {
                    block: self.block,
                    start,
                    end,
                },
                object,
                whole,
            });
        }
    }
}

/// Whether object `object` is filled by exactly one piece of [`object_chunks`]: lies wholly
/// inside one block's pages, starting and ending on page boundaries.
pub fn is_whole(layouts: &[BlockLayout], object_bytes: u64, object: u64) -> bool {
    let Some(range) = object_range(object, object_bytes) else {
        return false;
    };
    layouts.iter().any(|l| {
        !l.is_empty()
            && l.page_size > 0
            && range.start >= l.pages_offset
            && range.end <= l.pages_end()
            && range
                .start
                .checked_sub(l.pages_offset)
                .and_then(|d| d.checked_rem(l.page_size))
                == Some(0)
            && range
                .end
                .checked_sub(l.pages_offset)
                .and_then(|d| d.checked_rem(l.page_size))
                == Some(0)
    })
}

/// The file bytes of object `object`; `None` on overflow or for `object_bytes` of zero.
pub fn object_range(object: u64, object_bytes: u64) -> Option<Range<u64>> {
    if object_bytes == 0 {
        return None;
    }
    let start = object.checked_mul(object_bytes)?;
    Some(start..start.checked_add(object_bytes)?)
}

/// How many objects a file of `file_size` bytes has.
pub fn object_count(file_size: u64, object_bytes: u64) -> u64 {
    if object_bytes == 0 {
        0
    } else {
        file_size.div_ceil(object_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(pages_offset: u64, length: u64, page_size: u64) -> BlockLayout {
        BlockLayout {
            record_offset: 0,
            header_offset: 0,
            length,
            page_size,
            bitmap_offset: 0,
            bitmap_size: 0,
            pages_offset,
        }
    }

    #[test]
    fn splits_at_object_boundaries() {
        const M: u64 = 1 << 20;
        // Block 0: pages 1 MiB .. 1 MiB + 9 MiB + 8 KiB; objects of 4 MiB.
        let l = [layout(M, 9 * M + 8192, 4096)];
        let v: heapless::Vec<ObjectChunk, 8> = object_chunks(&l, 4 * M).collect();
        let ps = 4096;
        assert_eq!(v.len(), 3);
        let first = (v[0].chunk.start, v[0].chunk.end, v[0].object, v[0].whole);
        assert_eq!(first, (0, 3 * M / ps, 0, false));
        assert_eq!((v[1].object, v[1].whole), (1, true));
        let last = (v[2].chunk.end, v[2].object, v[2].whole);
        assert_eq!(
            last,
            ((9 * M + 8192) / ps, 2, false),
            "ends at 10 MiB + 8 KiB"
        );
        assert!(is_whole(&l, 4 * M, 1));
        assert!(!is_whole(&l, 4 * M, 0));
        assert!(!is_whole(&l, 4 * M, 2));
        assert_eq!(object_count(10 * M + 1, 4 * M), 3);
    }

    #[test]
    fn huge_page_straddling_a_boundary_is_never_whole() {
        const M: u64 = 1 << 20;
        let l = [layout(M, 8 * M, 2 * M)];
        for c in object_chunks(&l, 2 * M) {
            assert!(!c.whole);
            assert_eq!(c.chunk.pages(), 1);
        }
        assert_eq!(object_chunks(&l, 0).count(), 0);
    }
}
