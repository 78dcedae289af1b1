//! Fuzz body for `mapped_ram_core::schedule`: random block lists, chunk sizes, policies and
//! zero / stored bitmaps; every chunk's write and read extents are checked against the
//! bitmaps page by page.
//!
//! Input layout (missing bytes read as zero, so every input is valid):
//!
//! | bytes | meaning |
//! |---|---|
//! | 1 | flags: 1 write zero pages, 2 bad `max_io`, 4 gpa, 8 stop halfway, 16 bad chunk size |
//! | 1 | page size `512 << (b % 8)` |
//! | 2 + 2 + 2 | chunk pages, write and read `max_io` pages (each `1 + v % 512`) |
//! | 1 + 1 | write and read gap limits (`b % 48`) |
//! | 1 | number of blocks (`b % 6`) |
//! | 4 | first record offset |
//! | 3 per block | kind byte (`& 3 == 0`: block without page region; `>> 2`: id length - 1), pages (`v % 2048`) |
//! | rest | first half: zero-page runs, second half: stored-page runs; each byte is a run of `1 + (b >> 1) % 32` pages of value `b & 1`, repeated |

use mapped_ram_core::bitmap::{words_for, Bitmap, BitmapRef};
use mapped_ram_core::layout::{BlockLayout, Planner};
use mapped_ram_core::schedule::{
    read_extents, write_extents, Chunk, Extent, ReadPolicy, ScheduleError, WorkQueue, WritePolicy,
};

/// Reads little-endian values from the front of the input, zero once it is exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
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

    fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// `n` bits from run-length bytes, cycled; all `false` without bytes.
fn runs_to_bits(runs: &[u8], n: u64) -> Vec<bool> {
    let n = n as usize;
    let mut out = Vec::with_capacity(n);
    if runs.is_empty() {
        out.resize(n, false);
        return out;
    }
    'fill: loop {
        for b in runs {
            let value = b & 1 != 0;
            for _ in 0..1 + (b >> 1) % 32 {
                if out.len() == n {
                    break 'fill;
                }
                out.push(value);
            }
        }
    }
    out
}

fn to_words(bits: &[bool]) -> Vec<u64> {
    let n = bits.len() as u64;
    let mut words = vec![0u64; words_for(n) as usize];
    let mut map = Bitmap::new(&mut words, n).expect("enough words");
    for (i, b) in bits.iter().enumerate() {
        if *b {
            map.set(i as u64).expect("in range");
        }
    }
    words
}

/// Properties every extent has, read or write.
fn check_extent(layout: &BlockLayout, block: usize, chunk: &Chunk, max_io: u64, e: &Extent) {
    let ps = layout.page_size;
    assert_eq!(e.block, block);
    assert!(e.pages > 0, "empty extent {e:?}");
    assert!(e.first_page >= chunk.start, "{e:?} starts before {chunk:?}");
    assert!(e.end_page() <= chunk.end, "{e:?} ends after {chunk:?}");
    assert_eq!(e.len, e.pages * ps);
    assert!(e.len <= max_io, "{e:?} longer than {max_io}");
    assert_eq!(e.file_offset % ps, 0);
    assert_eq!(e.mem_offset, e.first_page * ps);
    assert_eq!(Ok(e.file_offset), layout.page_offset(e.first_page));
    assert!(e.file_offset >= layout.pages_offset);
    assert!(e.file_offset + e.len <= layout.pages_end());
}

/// Checks extents against `wanted` (per chunk page: must be covered) with gap limit `max_gap`;
/// returns the number of unwanted pages covered.
#[allow(clippy::too_many_arguments)]
fn check_cover(
    layout: &BlockLayout,
    block: usize,
    chunk: &Chunk,
    max_io: u64,
    max_gap: u64,
    all_pages: bool,
    wanted: &[bool],
    extents: &[Extent],
) -> u64 {
    assert_eq!(wanted.len() as u64, chunk.pages());
    let max_pages = max_io / layout.page_size;
    let mut cover = vec![0u8; wanted.len()];
    let mut prev_end = chunk.start;
    let mut gap_pages = 0;
    for (i, e) in extents.iter().enumerate() {
        check_extent(layout, block, chunk, max_io, e);
        assert!(e.first_page >= prev_end, "extents overlap or descend");
        let rel = |p: u64| (p - chunk.start) as usize;
        if !all_pages {
            if i > 0 {
                let gap = e.first_page - prev_end;
                let prev = &extents[i - 1];
                assert!(
                    gap > max_gap || prev.pages + gap + 1 > max_pages,
                    "{prev:?} and {e:?} should have been one extent"
                );
            }
            assert!(wanted[rel(e.first_page)], "{e:?} starts with a gap page");
            assert!(wanted[rel(e.end_page() - 1)], "{e:?} ends with a gap page");
        }
        prev_end = e.end_page();
        let mut run = 0;
        for p in e.page_range() {
            cover[rel(p)] += 1;
            if wanted[rel(p)] {
                run = 0;
            } else {
                run += 1;
                gap_pages += 1;
                assert!(all_pages || run <= max_gap, "gap of {run} pages in {e:?}");
            }
        }
    }
    for (i, w) in wanted.iter().enumerate() {
        if *w || all_pages {
            assert_eq!(
                cover[i], 1,
                "page {i} of {chunk:?} covered {} times",
                cover[i]
            );
        } else {
            assert!(cover[i] <= 1);
        }
    }
    gap_pages
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input { data };
    let flags = input.byte();
    let ps = 512u64 << (input.byte() % 8);
    let chunk_pages = 1 + u64::from(input.u16() % 512);
    let write_pages = 1 + u64::from(input.u16() % 512);
    let read_pages = 1 + u64::from(input.u16() % 512);
    let write_gap = u64::from(input.byte() % 48);
    let read_gap = u64::from(input.byte() % 48);
    let nblocks = input.byte() % 6;
    let first_record = u64::from(input.u32());
    let mut planner = Planner::new(first_record, ps, flags & 4 != 0).expect("page size is 2^k");
    let mut layouts = Vec::new();
    for _ in 0..nblocks {
        let kind = input.byte();
        let length = u64::from(input.u16() % 2048) * ps;
        let id_len = 1 + usize::from(kind >> 2);
        let layout = if kind & 3 == 0 {
            planner.push_empty(id_len, length)
        } else {
            planner.push(id_len, length)
        };
        layouts.push(layout.expect("small blocks always fit"));
    }
    let rest = input.rest();
    let (zero_runs, stored_runs) = rest.split_at(rest.len() / 2);

    if flags & 16 != 0 {
        let chunk_bytes = chunk_pages * ps + 1 + u64::from(flags >> 5);
        let result = WorkQueue::new(&layouts, chunk_bytes);
        if layouts.is_empty() {
            assert!(result.is_ok());
        } else {
            assert_eq!(
                result.err(),
                Some(ScheduleError::BadChunkSize {
                    chunk_bytes,
                    page_size: ps
                })
            );
        }
    }
    let queue = WorkQueue::new(&layouts, chunk_pages * ps).expect("planner layouts are valid");
    if !layouts.is_empty() {
        assert_eq!(queue.chunk_pages(), chunk_pages);
        assert_eq!(queue.page_size(), ps);
    }

    let write = WritePolicy {
        max_io: write_pages * ps,
        max_gap_pages: write_gap,
        write_zero_pages: flags & 1 != 0,
    };
    let read = ReadPolicy {
        max_io: read_pages * ps,
        max_gap_pages: read_gap,
    };
    let bad_max_io = write_pages * ps + 1 + u64::from(flags >> 5) % (ps - 1);

    let stop_at = (flags & 8 != 0).then(|| queue.total_chunks() / 2);
    let mut claimed: Vec<Chunk> = Vec::new();
    while let Some(chunk) = queue.claim() {
        claimed.push(chunk);
        if stop_at == Some(claimed.len() as u64) {
            queue.stop();
        }
    }
    assert_eq!(queue.claim(), None);
    match stop_at {
        Some(n) if n > 0 => {
            assert!(queue.is_stopped());
            assert_eq!(claimed.len() as u64, n);
        }
        _ => assert_eq!(claimed.len() as u64, queue.total_chunks()),
    }
    for (i, c) in claimed.iter().enumerate() {
        assert_eq!(queue.chunk(i as u64), Some(*c));
    }
    assert!(claimed.windows(2).all(|w| w[0] < w[1]), "chunks ascend");

    // Chunks tile every block with a page region (all of them when not stopped).
    let mut total_pages = 0;
    for (b, l) in layouts.iter().enumerate() {
        let pages = if l.is_empty() { 0 } else { l.num_pages() };
        total_pages += pages;
        let mut next = 0;
        for c in claimed.iter().filter(|c| c.block == b) {
            assert_eq!(c.start, next);
            assert_eq!(c.start % chunk_pages, 0);
            assert!(c.end > c.start && c.end <= pages);
            assert!(c.pages() == chunk_pages || c.end == pages);
            next = c.end;
        }
        if stop_at.is_none() {
            assert_eq!(next, pages);
        }
    }
    assert_eq!(queue.total_pages(), total_pages);

    let mut last_file_end = 0;
    for (b, l) in layouts.iter().enumerate() {
        let pages = l.num_pages();
        let zero_all = runs_to_bits(zero_runs, pages);
        let stored = runs_to_bits(stored_runs, pages);
        let stored_words = to_words(&stored);
        let stored_map = BitmapRef::new(&stored_words, pages).expect("enough words");
        for c in claimed.iter().filter(|c| c.block == b) {
            let zero = &zero_all[c.start as usize..c.end as usize];
            let words = to_words(zero);
            let map = BitmapRef::new(&words, c.pages()).expect("enough words");

            let bad = WritePolicy {
                max_io: bad_max_io,
                ..write
            };
            let expect_bad = Err(ScheduleError::BadMaxIo {
                max_io: bad_max_io,
                page_size: ps,
            });
            assert_eq!(write_extents(l, b, c, &map, &bad, |_| panic!()), expect_bad);

            let mut writes = Vec::new();
            let stats =
                write_extents(l, b, c, &map, &write, |e| writes.push(e)).expect("valid chunk");
            let nonzero: Vec<bool> = zero.iter().map(|z| !z).collect();
            let zero_written = check_cover(
                l,
                b,
                c,
                write.max_io,
                write.max_gap_pages,
                write.write_zero_pages,
                &nonzero,
                &writes,
            );
            let zeros = zero.iter().filter(|z| **z).count() as u64;
            assert_eq!(stats.extents, writes.len() as u64);
            assert_eq!(stats.data_pages, c.pages() - zeros);
            assert_eq!(stats.zero_pages_written, zero_written);
            assert_eq!(stats.zero_pages_skipped, zeros - zero_written);
            for e in &writes {
                assert!(e.file_offset >= last_file_end, "writes ascend in the file");
                last_file_end = e.file_offset + e.len;
            }

            let bad = ReadPolicy {
                max_io: bad_max_io,
                ..read
            };
            assert_eq!(
                read_extents(l, b, c, &stored_map, &bad, |_| panic!()).err(),
                expect_bad.err()
            );
            let mut reads = Vec::new();
            let stats =
                read_extents(l, b, c, &stored_map, &read, |e| reads.push(e)).expect("valid chunk");
            let wanted = &stored[c.start as usize..c.end as usize];
            let gaps = check_cover(
                l,
                b,
                c,
                read.max_io,
                read.max_gap_pages,
                false,
                wanted,
                &reads,
            );
            assert_eq!(stats.extents, reads.len() as u64);
            assert_eq!(
                stats.pages_read,
                wanted.iter().filter(|s| **s).count() as u64
            );
            assert_eq!(stats.gap_pages_read, gaps);

            // A chunk of another block, or one reaching past the block, is refused.
            let wrong = Chunk { block: b + 1, ..*c };
            assert!(matches!(
                write_extents(l, b, &wrong, &map, &write, |_| panic!()),
                Err(ScheduleError::WrongBlock { .. })
            ));
            let past = Chunk {
                end: pages + 1,
                ..*c
            };
            assert!(matches!(
                read_extents(l, b, &past, &stored_map, &read, |_| panic!()),
                Err(ScheduleError::BadChunk { .. } | ScheduleError::BitmapTooShort { .. })
            ));
        }
    }
}
