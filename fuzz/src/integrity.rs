//! Fuzz body for `mapped_ram_core::integrity` and `mapped_ram_core::matching`: arbitrary record
//! bytes through `Record::decode` (a valid record must re-encode to the same bytes), and
//! arbitrary block lists through `anchor_offset`, `table_len`, `MetadataRanges` and
//! `matching::find`, `plan::allocations` and `plan::punches` — none may panic, every range
//! must be ordered and punches stay inside their block's page region.
//!
//! Input: 64 record bytes, 4 bytes of "computed CRC", then per block (up to 8): id length
//! (u8), length in pages (u16), empty flag (u8); then a wanted name length, length and page size.

use mapped_ram_core::integrity::{self, Found, MetadataRanges, Record, RECORD_BYTES};
use mapped_ram_core::layout::Planner;
use mapped_ram_core::matching::{self, Wanted};

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

/// Runs one input.
pub fn run(mut data: &[u8]) {
    let bytes: [u8; RECORD_BYTES] = take(&mut data);
    let crc = u32::from_le_bytes(take(&mut data));
    if let Found::Valid(r) = Record::decode(&bytes, crc) {
        let mut again = r.encode_without_crc();
        Record::seal(&mut again, crc);
        assert_eq!(again, bytes, "a valid record re-encodes to its bytes");
    }
    let mut planner = match Planner::new(0x40, 4096, false) {
        Ok(p) => p,
        Err(_) => return,
    };
    let names = ["a", "bb", "ccc", "pc.ram", "pc.bios", "x", "yy", "zzz"];
    let mut layouts = Vec::new();
    let count = take::<1>(&mut data)[0] % 9;
    for i in 0..count as usize {
        let [len_pages_lo, len_pages_hi, empty] = take::<3>(&mut data);
        let pages = u64::from(u16::from_le_bytes([len_pages_lo, len_pages_hi]));
        let name = names[i % names.len()];
        let layout = if empty & 1 == 1 {
            planner.push_empty(name.len(), pages * 4096)
        } else {
            planner.push(name.len(), pages * 4096)
        };
        match layout {
            Ok(l) => layouts.push(l),
            Err(_) => return,
        }
    }
    for r in mapped_ram_core::plan::allocations(&layouts) {
        assert!(r.start <= r.end);
    }
    let bitmap_words: Vec<u64> = (0..64)
        .map(|i| u64::from(take::<1>(&mut data)[0]) * i)
        .collect();
    for l in &layouts {
        let pages = l.num_pages().min(64 * 64);
        if let Ok(map) = mapped_ram_core::bitmap::BitmapRef::new(&bitmap_words, pages) {
            for hole in mapped_ram_core::plan::punches(l, map, 2) {
                assert!(
                    hole.start >= l.pages_offset && hole.end <= l.pages_end(),
                    "{hole:?}"
                );
            }
        }
    }
    let _ = integrity::anchor_offset(&layouts);
    let _ = integrity::table_len(&layouts);
    let end = planner.cursor();
    for r in MetadataRanges::new(0, 0x40, &layouts, end, end.saturating_add(64)) {
        assert!(r.start <= r.end, "range {r:?} is ordered");
    }
    let [wi, wl_lo, wl_hi, wp] = take::<4>(&mut data);
    let want = Wanted {
        name: names[usize::from(wi) % names.len()],
        length: (wl_lo & 1 == 1).then(|| u64::from(u16::from_le_bytes([wl_lo, wl_hi])) * 4096),
        page_size: (wp & 1 == 1).then(|| 1u64 << (wp % 64)),
        needs_pages: wp & 2 == 2,
    };
    let blocks = names.iter().copied().zip(layouts.iter());
    if let Ok(i) = matching::find(blocks, &want) {
        assert!(i < layouts.len());
        assert_eq!(names[i % names.len()], want.name);
    }
}
