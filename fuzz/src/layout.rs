//! Fuzz body for `mapped_ram_core::layout`: arbitrary block lists through `Planner`, compared
//! with a 128-bit model of QEMU's layout formulas; every layout must round-trip through its
//! 28-byte header and `BlockLayout::from_header`.
//!
//! Input layout (missing bytes read as zero, so every input is valid):
//!
//! | bytes | meaning |
//! |---|---|
//! | 1 | flags: 1 gpa, 2 raw page size, 4 first record near `u64::MAX` |
//! | 1 or 8 | page size: `1 << (b % 64)`, or (flag 2) a raw u64 |
//! | 8 | first record offset (flag 4: `u64::MAX - v`) |
//! | 1 | number of blocks (`b % 16`) |
//! | per block | kind (`& 1` empty, `>> 1 & 3` length mode), id length (u16 `% 300`), length (u32 or u64 by mode) |

use mapped_ram_core::layout::{
    BlockError, BlockLayout, HeaderError, LayoutError, MappedRamHeader, Planner,
    FILE_OFFSET_ALIGNMENT, HEADER_SIZE,
};

/// Reads little-endian values from the front of the input, zero once it is exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

/// What the model expects from a push.
#[derive(Debug, PartialEq)]
enum Expect {
    Layout(BlockLayout),
    NotPageMultiple,
    BadId,
    Overflow,
}

const MAX: u128 = u64::MAX as u128;

/// QEMU's formulas in 128-bit arithmetic (spec §a.2).
fn model(
    cursor: u64,
    total: u64,
    ps: u64,
    gpa: bool,
    id_len: usize,
    length: u64,
    empty: bool,
) -> Expect {
    if length.checked_rem(ps) != Some(0) {
        return Expect::NotPageMultiple;
    }
    if !(1..=255).contains(&id_len) {
        return Expect::BadId;
    }
    let pages = u128::from(length / ps);
    let header = u128::from(cursor) + 1 + id_len as u128 + 8 + if gpa { 8 } else { 0 };
    let bitmap_size = pages.div_ceil(64) * 8;
    let (bitmap, pages_offset, end) = if empty {
        (0, 0, header + HEADER_SIZE as u128)
    } else {
        let bitmap = header + HEADER_SIZE as u128;
        let align = u128::from(FILE_OFFSET_ALIGNMENT);
        let pages_offset = (bitmap + bitmap_size).div_ceil(align) * align;
        (bitmap, pages_offset, pages_offset + u128::from(length))
    };
    let new_total = u128::from(total) + u128::from(length);
    if header > MAX || end > MAX || new_total > MAX || bitmap + bitmap_size > MAX {
        return Expect::Overflow;
    }
    Expect::Layout(BlockLayout {
        record_offset: cursor,
        header_offset: header as u64,
        length,
        page_size: ps,
        bitmap_offset: bitmap as u64,
        bitmap_size: bitmap_size as u64,
        pages_offset: pages_offset as u64,
    })
}

/// Invariants of a layout produced by the planner.
fn check_layout(layout: &BlockLayout, prev_end: u64) {
    let ps = layout.page_size;
    assert!(layout.record_offset >= prev_end, "regions overlap");
    assert!(layout.header_offset > layout.record_offset);
    let header_end = layout.header_offset + HEADER_SIZE as u64;
    let pages = layout.length / ps;
    assert_eq!(layout.num_pages(), pages);
    assert_eq!(layout.bitmap_size, pages.div_ceil(64) * 8);

    let header = layout.header();
    let bytes = header.encode();
    assert_eq!(MappedRamHeader::decode(&bytes), Ok(header));
    assert_eq!(MappedRamHeader::decode_any_version(&bytes), header);
    assert_eq!(header.is_empty(), layout.is_empty());

    let rebuilt = BlockLayout::from_header(
        layout.record_offset,
        layout.header_offset,
        layout.length,
        &header,
        ps,
    );
    let other_ps = if ps == 1 << 63 { 1 } else { ps << 1 };
    assert_eq!(
        BlockLayout::from_header(
            layout.record_offset,
            layout.header_offset,
            layout.length,
            &header,
            other_ps,
        ),
        Err(BlockError::PageSizeMismatch {
            header: ps,
            expected: other_ps
        })
    );
    let newer = MappedRamHeader {
        version: 2,
        ..header
    };
    assert_eq!(
        MappedRamHeader::decode(&newer.encode()),
        Err(HeaderError::UnsupportedVersion { version: 2 })
    );

    if layout.is_empty() {
        assert_eq!((layout.bitmap_offset, layout.pages_offset), (0, 0));
        assert_eq!(rebuilt, Ok(*layout));
        return;
    }
    assert_eq!(
        layout.bitmap_offset, header_end,
        "bitmap right after the header"
    );
    let bitmap_end = layout.bitmap_offset + layout.bitmap_size;
    assert!(
        bitmap_end <= layout.pages_offset,
        "bitmap runs into the pages"
    );
    assert_eq!(layout.pages_offset % FILE_OFFSET_ALIGNMENT, 0);
    assert!(layout.pages_offset - bitmap_end < FILE_OFFSET_ALIGNMENT);
    assert_eq!(layout.pages_end(), layout.pages_offset + layout.length);
    if ps <= FILE_OFFSET_ALIGNMENT {
        assert_eq!(rebuilt, Ok(*layout));
    } else {
        // Pages bigger than the 1 MiB region alignment: QEMU's formula can leave the region
        // unaligned to the page size, which its loader (and `from_header`) refuses.
        let aligned = layout.pages_offset.checked_rem(ps) == Some(0);
        assert_eq!(
            rebuilt,
            if aligned {
                Ok(*layout)
            } else {
                Err(BlockError::BadAlignment {
                    pages_offset: layout.pages_offset,
                })
            }
        );
    }
    if pages > 0 {
        assert_eq!(layout.page_offset(0), Ok(layout.pages_offset));
        assert_eq!(
            layout.page_offset(pages - 1),
            Ok(layout.pages_end() - ps),
            "last page ends the region"
        );
    }
    assert_eq!(
        layout.page_offset(pages),
        Err(LayoutError::PageOutOfRange { page: pages, pages })
    );
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input { data };
    let flags = input.byte();
    let gpa = flags & 1 != 0;
    let ps = if flags & 2 != 0 {
        input.u64()
    } else {
        1u64 << (input.byte() % 64)
    };
    let first = if flags & 4 != 0 {
        u64::MAX - u64::from(input.u32())
    } else {
        input.u64() % (1 << 40)
    };
    let mut planner = match Planner::new(first, ps, gpa) {
        Ok(p) => {
            assert!(ps.is_power_of_two());
            p
        }
        Err(e) => {
            assert!(!ps.is_power_of_two());
            assert_eq!(e, LayoutError::BadPageSize { page_size: ps });
            return;
        }
    };
    assert_eq!(planner.page_size(), ps);
    assert_eq!((planner.cursor(), planner.total_ram()), (first, 0));
    let blocks = input.byte() % 16;
    let mut prev_end = first;
    for _ in 0..blocks {
        let kind = input.byte();
        let empty = kind & 1 != 0;
        let id_len = usize::from(input.u16() % 300);
        let length = match (kind >> 1) & 3 {
            // Whole pages, up to 4 Gi of them.
            0 | 1 => u64::from(input.u32()).saturating_mul(ps),
            // Anything.
            2 => input.u64(),
            // Whole pages close to the top of the address space.
            _ => (u64::MAX - u64::from(input.u32())) & !(ps - 1),
        };
        let (cursor, total) = (planner.cursor(), planner.total_ram());
        let expected = model(cursor, total, ps, gpa, id_len, length, empty);
        let result = if empty {
            planner.push_empty(id_len, length)
        } else {
            planner.push(id_len, length)
        };
        match (&expected, result) {
            (Expect::Layout(want), Ok(got)) => {
                assert_eq!(*want, got);
                check_layout(&got, prev_end);
                let end = if got.is_empty() {
                    got.header_offset + HEADER_SIZE as u64
                } else {
                    got.pages_end()
                };
                assert_eq!(planner.cursor(), end);
                assert_eq!(planner.total_ram(), total + length);
                prev_end = end;
                continue;
            }
            (Expect::NotPageMultiple, Err(e)) => assert_eq!(
                e,
                LayoutError::LengthNotPageMultiple {
                    length,
                    page_size: ps
                }
            ),
            (Expect::BadId, Err(e)) => assert_eq!(e, LayoutError::BadIdLength { len: id_len }),
            (Expect::Overflow, Err(e)) => {
                assert!(matches!(e, LayoutError::Overflow { .. }), "{e:?}")
            }
            (want, got) => panic!("model {want:?}, planner {got:?}"),
        }
        // A refused block leaves the plan untouched.
        assert_eq!((planner.cursor(), planner.total_ram()), (cursor, total));
    }
}
