//! The integrity records of a mapped-ram file written by this project: where they go, what
//! their 64 bytes mean, and which byte ranges the metadata checksum covers. QEMU's loader never
//! looks at any of it, so the file stays a valid QEMU 10.0 migration stream.
//!
//! ```text
//! [offset prefix][stream head][block record+header][bitmap][ANCHOR][zero padding][pages]...
//!     ...[RAM EOS, RAM END, device state or EOF][CHECKSUM TABLE][FOOTER]
//! ```
//!
//! * The **anchor** is a 64-byte [`Record`] at the end of the page bitmap of the first block
//!   whose padding before its 1 MiB-aligned `pages_offset` has room for it ([`anchor_offset`]).
//! * The **checksum table** follows the end of the QEMU stream: for every block with data, in
//!   file order, one little-endian `u32` per page ([`table_len`]) — the page's checksum where
//!   its bitmap bit is set, 0 elsewhere.
//! * The **footer** is a second copy of the anchor: the last 64 bytes of the file.
//!
//! The [`Record`] (little-endian): magic `MRAMSUMS` (8), version (u32), algorithm (u32, 1 =
//! CRC-32C), `table_offset` (u64), `table_len` (u64), `file_size` (u64), `page_size` (u32),
//! `blocks` (u32), `metadata_crc` (u32), `table_crc` (u32), `flags` (u32), CRC-32C of bytes
//! 0..60 (u32). Computing CRCs is the caller's business: [`Record::encode_without_crc`] and
//! [`Record::decode`] take the CRC of the first 60 bytes as an argument.
//!
//! The metadata ranges ([`MetadataRanges`]): the stream head (stream start to the first block
//! record); for every block in file order its record and 28-byte header, then — for a block
//! with data — its bitmap; the stream after the last block's pages up to the checksum table.

use core::ops::Range;

use crate::layout::{BlockLayout, HEADER_SIZE};

/// First 8 bytes of a [`Record`].
pub const MAGIC: [u8; 8] = *b"MRAMSUMS";
/// The record layout version.
pub const VERSION: u32 = 1;
/// Algorithm id of CRC-32C (Castagnoli).
pub const ALGORITHM_CRC32C: u32 = 1;
/// Size of a [`Record`] (anchor and footer) in bytes.
pub const RECORD_BYTES: usize = 64;
/// [`RECORD_BYTES`] as a file length.
pub const RECORD_LEN: u64 = RECORD_BYTES as u64;
/// Bytes per page checksum in the table.
pub const ENTRY_LEN: u64 = 4;

/// [`Record::flags`] bit: an extension ends right before the checksum table (see
/// [`ExtensionTrailer`]): what else this project records about the snapshot (whether a device
/// state was given, the blocks' guest physical address ranges). The metadata checksum covers
/// it (it lies inside the range "stream after the last block's pages up to the table").
pub const FLAG_EXTENSION: u32 = 2;

/// Magic at the very end of an extension.
pub const EXTENSION_MAGIC: [u8; 8] = *b"MRAMEXT1";
/// Size of an [`ExtensionTrailer`].
pub const EXTENSION_TRAILER_LEN: u64 = 16;

/// The last 16 bytes of an extension: body length (u32 LE), version (u32 LE, 1), magic.
/// The body comes right before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExtensionTrailer {
    /// Bytes of the body before the trailer.
    pub body_len: u32,
}

impl ExtensionTrailer {
    /// The trailer's bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        if let Some(d) = b.get_mut(0..4) {
            d.copy_from_slice(&self.body_len.to_le_bytes());
        }
        if let Some(d) = b.get_mut(4..8) {
            d.copy_from_slice(&1u32.to_le_bytes());
        }
        if let Some(d) = b.get_mut(8..16) {
            d.copy_from_slice(&EXTENSION_MAGIC);
        }
        b
    }

    /// Decodes a trailer; `None` without the magic or with another version.
    pub fn decode(b: &[u8; 16]) -> Option<Self> {
        if b.get(8..16) != Some(&EXTENSION_MAGIC[..]) {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(b.get(i..i.saturating_add(4))?);
            Some(u32::from_le_bytes(w))
        };
        (word(4)? == 1).then_some(Self { body_len: word(0)? })
    }
}

/// [`Record::flags`] bit: every byte under a clear bitmap bit is zero in the file (our writer
/// wrote zeros there or punched a hole), so a reader may map those pages without checking them.
pub const FLAG_CLEAN_ZERO: u32 = 1;

/// The anchor and footer record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Record {
    /// Absolute offset of the checksum table.
    pub table_offset: u64,
    /// Length of the checksum table in bytes.
    pub table_len: u64,
    /// Size of the whole file.
    pub file_size: u64,
    /// Page size of the blocks.
    pub page_size: u32,
    /// Number of block records.
    pub blocks: u32,
    /// CRC-32C of the metadata ranges.
    pub metadata_crc: u32,
    /// CRC-32C of the checksum table.
    pub table_crc: u32,
    /// Flags ([`FLAG_CLEAN_ZERO`]); 0 in files of earlier writers.
    pub flags: u32,
}

/// What 64 bytes at a record's place hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Found {
    /// No magic: no record here.
    Absent,
    /// The magic, but a bad CRC, version or algorithm (the reason).
    Damaged(&'static str),
    /// A good record.
    Valid(Record),
}

fn u32_at(b: &[u8; RECORD_BYTES], i: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(src) = b.get(i..i.saturating_add(4)) {
        w.copy_from_slice(src);
    }
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8; RECORD_BYTES], i: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(src) = b.get(i..i.saturating_add(8)) {
        w.copy_from_slice(src);
    }
    u64::from_le_bytes(w)
}

fn put(b: &mut [u8; RECORD_BYTES], i: usize, bytes: &[u8]) {
    if let Some(dst) = b.get_mut(i..i.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

impl Record {
    /// The record's 64 bytes with the last 4 (the CRC of bytes 0..60) zero; the caller
    /// computes that CRC and stores it with [`Record::seal`].
    pub fn encode_without_crc(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        put(&mut b, 0, &MAGIC);
        put(&mut b, 8, &VERSION.to_le_bytes());
        put(&mut b, 12, &ALGORITHM_CRC32C.to_le_bytes());
        put(&mut b, 16, &self.table_offset.to_le_bytes());
        put(&mut b, 24, &self.table_len.to_le_bytes());
        put(&mut b, 32, &self.file_size.to_le_bytes());
        put(&mut b, 40, &self.page_size.to_le_bytes());
        put(&mut b, 44, &self.blocks.to_le_bytes());
        put(&mut b, 48, &self.metadata_crc.to_le_bytes());
        put(&mut b, 52, &self.table_crc.to_le_bytes());
        put(&mut b, 56, &self.flags.to_le_bytes());
        b
    }

    /// Stores `crc` (the CRC-32C of bytes 0..60) in the last 4 bytes of an encoded record.
    pub fn seal(bytes: &mut [u8; RECORD_BYTES], crc: u32) {
        put(bytes, 60, &crc.to_le_bytes());
    }

    /// The bytes a record's CRC covers.
    pub fn crc_input(bytes: &[u8; RECORD_BYTES]) -> &[u8] {
        bytes.get(..60).unwrap_or(&[])
    }

    /// Decodes 64 bytes, given `crc`, the CRC-32C of their first 60 bytes.
    pub fn decode(b: &[u8; RECORD_BYTES], crc: u32) -> Found {
        if b.get(0..8) != Some(&MAGIC[..]) {
            return Found::Absent;
        }
        if crc != u32_at(b, 60) {
            return Found::Damaged("its CRC does not match");
        }
        if u32_at(b, 8) != VERSION {
            return Found::Damaged("unknown version");
        }
        if u32_at(b, 12) != ALGORITHM_CRC32C {
            return Found::Damaged("unknown checksum algorithm");
        }
        Found::Valid(Record {
            table_offset: u64_at(b, 16),
            table_len: u64_at(b, 24),
            file_size: u64_at(b, 32),
            page_size: u32_at(b, 40),
            blocks: u32_at(b, 44),
            metadata_crc: u32_at(b, 48),
            table_crc: u32_at(b, 52),
            flags: u32_at(b, 56),
        })
    }
}

/// Where the anchor of a file with these blocks goes: the end of the bitmap of the first block
/// with data whose padding before `pages_offset` holds [`RECORD_LEN`] bytes.
pub fn anchor_offset(layouts: &[BlockLayout]) -> Option<u64> {
    layouts.iter().filter(|l| !l.is_empty()).find_map(|l| {
        let end = l.bitmap_offset.checked_add(l.bitmap_size)?;
        (l.pages_offset.checked_sub(end)? >= RECORD_LEN).then_some(end)
    })
}

/// Length of the checksum table for these blocks: [`ENTRY_LEN`] per page of every block with
/// data in the file; `None` on overflow.
pub fn table_len(layouts: &[BlockLayout]) -> Option<u64> {
    layouts
        .iter()
        .filter(|l| !l.is_empty())
        .try_fold(0u64, |acc, l| {
            acc.checked_add(l.num_pages().checked_mul(ENTRY_LEN)?)
        })
}

/// The metadata ranges of a file, in checksum order (see the module docs), as absolute byte
/// ranges. Ranges that would overflow are cut at `u64::MAX`.
#[derive(Debug, Clone)]
pub struct MetadataRanges<'a> {
    head: Option<Range<u64>>,
    layouts: core::slice::Iter<'a, BlockLayout>,
    bitmap: Option<Range<u64>>,
    tail: Option<Range<u64>>,
}

impl<'a> MetadataRanges<'a> {
    /// The ranges of a file whose stream starts at `stream_start`, whose first block record is
    /// at `first_record`, with `layouts` in file order, the stream after the last block's
    /// pages at `device_stream_start` and the checksum table at `table_offset`.
    pub fn new(
        stream_start: u64,
        first_record: u64,
        layouts: &'a [BlockLayout],
        device_stream_start: u64,
        table_offset: u64,
    ) -> Self {
        Self {
            head: Some(stream_start..first_record),
            layouts: layouts.iter(),
            bitmap: None,
            tail: Some(device_stream_start..table_offset),
        }
    }
}

impl Iterator for MetadataRanges<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if let Some(bitmap) = self.bitmap.take() {
            return Some(bitmap);
        }
        if let Some(l) = self.layouts.next() {
            if !l.is_empty() {
                self.bitmap = Some(l.bitmap_offset..l.bitmap_offset.saturating_add(l.bitmap_size));
            }
            return Some(l.record_offset..l.header_offset.saturating_add(HEADER_SIZE as u64));
        }
        self.tail.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Planner;

    fn crc_stub(b: &[u8]) -> u32 {
        b.iter().fold(7u32, |a, x| a.rotate_left(5) ^ u32::from(*x))
    }

    #[test]
    fn record_round_trip_and_damage() {
        let r = Record {
            table_offset: 0x1234_5678,
            table_len: 4096,
            file_size: 0x1234_5678 + 4096 + 64,
            page_size: 4096,
            blocks: 3,
            metadata_crc: 0xdead_beef,
            table_crc: 0x0bad_f00d,
            flags: FLAG_CLEAN_ZERO,
        };
        let mut b = r.encode_without_crc();
        let crc = crc_stub(Record::crc_input(&b));
        Record::seal(&mut b, crc);
        assert_eq!(Record::decode(&b, crc), Found::Valid(r));
        b[20] ^= 1;
        let crc2 = crc_stub(Record::crc_input(&b));
        assert_eq!(
            Record::decode(&b, crc2),
            Found::Damaged("its CRC does not match")
        );
        assert_eq!(Record::decode(&[0u8; 64], 0), Found::Absent);
    }

    #[test]
    fn ranges_cover_head_records_bitmaps_and_tail() {
        let mut p = Planner::new(0x40, 4096, false).unwrap();
        let layouts = [p.push(6, 4 << 20).unwrap(), p.push(7, 64 << 10).unwrap()];
        let v: std::vec::Vec<_> =
            MetadataRanges::new(0, 0x40, &layouts, 0x90_0000, 0x90_0040).collect();
        assert_eq!(v.len(), 6);
        assert_eq!(v[0], 0..0x40);
        assert_eq!(v[1].start, layouts[0].record_offset);
        assert_eq!(v[2].start, layouts[0].bitmap_offset);
        assert_eq!(v[5], 0x90_0000..0x90_0040);
        assert!(anchor_offset(&layouts).is_some());
        assert_eq!(table_len(&layouts), Some(4 * (1024 + 16)));
    }
}
