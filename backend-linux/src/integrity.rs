//! Page checksums: an optional content check that QEMU's mapped-ram format lacks.
//!
//! A snapshot we write (by default, see [`crate::SaveOptions::checksums`]) carries one CRC-32C
//! per stored page and one CRC-32C over all of its metadata, kept where QEMU's loader never
//! looks, so the file stays a valid QEMU 10.0 migration stream. [`crate::verify()`] checks every
//! stored page against its checksum and names the first bad page (block, page index, file
//! offset); [`crate::inspect()`], [`crate::verify()`] and [`crate::restore()`] check the
//! metadata checksum before they trust anything, so a flipped bit in a header, a bitmap, a block
//! name or the device state is an error and not a silently different snapshot. Restore checks
//! page checksums only when asked ([`crate::RestoreOptions::verify_checksums`]).
//!
//! # On-disk layout (version 1)
//!
//! ```text
//! [offset prefix][stream head][block record+header][bitmap][ANCHOR][zero padding][pages]...
//!     ...[RAM EOS, RAM END, device state or EOF][EXTENSION][CHECKSUM TABLE][FOOTER]
//! ```
//!
//! The **extension** (record flag [`FLAG_EXTENSION`], files written since the one-engine
//! rework) holds what a VMM needs besides RAM: whether a device state was given at all (so
//! "none" and a one-byte state differ) and each block's guest physical address ranges. It ends
//! with a 16-byte trailer (body length, version 1, magic `MRAMEXT1`) right before the table; it
//! lies inside the last metadata range, so the metadata checksum covers it. QEMU stops reading
//! at `QEMU_VM_EOF` and never sees it.
//!
//! * The **anchor** is a 64-byte [`Record`] at the end of the page bitmap of the first block
//!   whose padding (between its bitmap's end and its 1 MiB-aligned `pages_offset`) has room for
//!   it — QEMU writes zeros there and never reads them.
//! * The **checksum table** follows the end of the QEMU stream (after `QEMU_VM_EOF`, or after
//!   the vmdesc of an appended device state). QEMU's loader stops reading at `QEMU_VM_EOF` (it
//!   then reads, and ignores, at most the vmdesc section). For every block in file order it
//!   holds one little-endian `u32` per page (`num_pages` entries; none for a block without data
//!   in the file): [`page_checksum`] of the page for pages whose bitmap bit is set, 0 for the
//!   others.
//! * The **footer** is a second copy of the anchor: the last 64 bytes of the file.
//!
//! Two copies make every single damage visible: a truncated or extended file loses or moves
//! the footer (the anchor records the file size); a damaged anchor is found through the
//! footer; a damaged footer through the anchor. A file with neither (QEMU's, or ours saved
//! with checksums off) simply has no checksums.
//!
//! The [`Record`] (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `MRAMSUMS` |
//! | 8 | u32 | version (1) |
//! | 12 | u32 | algorithm (1 = CRC-32C, Castagnoli) |
//! | 16 | u64 | `table_offset`: absolute offset of the checksum table |
//! | 24 | u64 | `table_len`: its length in bytes (4 × pages of the blocks with data) |
//! | 32 | u64 | `file_size`: size of the whole file (the footer ends it) |
//! | 40 | u32 | `page_size` |
//! | 44 | u32 | `blocks`: number of block records |
//! | 48 | u32 | `metadata_crc`: CRC-32C over the metadata ranges below, in this order |
//! | 52 | u32 | `table_crc`: CRC-32C of the checksum table |
//! | 56 | u32 | `flags`: bit 0 [`FLAG_CLEAN_ZERO`] — every byte under a clear bit is zero (0 in files of earlier writers) |
//! | 60 | u32 | CRC-32C of bytes 0..60 of the record |
//!
//! Metadata ranges covered by `metadata_crc` (absolute offsets; the `offset=` prefix before the
//! stream belongs to someone else and is not covered):
//!
//! 1. the stream head: from the stream start to the first block record (file magic,
//!    configuration section, RAM section start, `MEM_SIZE` word);
//! 2. for every block in file order: its record and 28-byte header (`record_offset ..
//!    header_offset + 28`), then — for a block with data — its bitmap;
//! 3. the stream after the last block: from `device_stream_start` to `table_offset` (RAM EOS,
//!    RAM END, the device state or `QEMU_VM_EOF`).
//!
//! The page checksum is `crc32c(page bytes ‖ page index as u64 LE)`: including the index makes
//! a page written to the wrong slot fail its check even when its bytes are intact.

use std::os::fd::BorrowedFd;
use std::path::Path;

use mapped_ram_core::integrity::{Found, MetadataRanges, RECORD_BYTES};
use mapped_ram_core::layout::BlockLayout;

use crate::error::{FormatError, IoFailure, Op};
use crate::file;

pub use mapped_ram_core::integrity::{
    anchor_offset, table_len, ExtensionTrailer, Record, ALGORITHM_CRC32C, ENTRY_LEN,
    EXTENSION_TRAILER_LEN, FLAG_CLEAN_ZERO, FLAG_EXTENSION, MAGIC, RECORD_LEN, VERSION,
};

/// The checksum of one stored page: CRC-32C over its bytes followed by its index within the
/// block as a little-endian `u64`.
pub fn page_checksum(page: &[u8], index: u64) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(page), &index.to_le_bytes())
}

/// A record's 64 bytes, sealed with their CRC-32C.
pub fn encode(record: &Record) -> [u8; RECORD_BYTES] {
    let mut b = record.encode_without_crc();
    let crc = crc32c::crc32c(Record::crc_input(&b));
    Record::seal(&mut b, crc);
    b
}

fn decode(b: &[u8; RECORD_BYTES]) -> Found {
    Record::decode(b, crc32c::crc32c(Record::crc_input(b)))
}

/// Where a file's integrity records and table are, as found and checked by [`crate::inspect()`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Integrity {
    /// Absolute offset of the anchor record.
    pub anchor_offset: u64,
    /// Absolute offset of the footer record (the last [`RECORD_LEN`] bytes).
    pub footer_offset: u64,
    /// The record (anchor and footer are identical).
    pub record: Record,
    /// Where the extension's body is (offset, length), when the record's flags say there is
    /// one ([`FLAG_EXTENSION`]): it ends, with its 16-byte trailer, at the checksum table.
    pub extension: Option<(u64, u64)>,
}

/// The metadata ranges of a file, in checksum order (see the module docs).
pub(crate) fn metadata_ranges(
    stream_start: u64,
    first_record: u64,
    layouts: &[BlockLayout],
    device_stream_start: u64,
    table_offset: u64,
) -> Vec<(u64, u64)> {
    MetadataRanges::new(
        stream_start,
        first_record,
        layouts,
        device_stream_start,
        table_offset,
    )
    .map(|r| (r.start, r.end))
    .collect()
}

fn integrity_error(path: &Path, offset: u64, message: String) -> FormatError {
    FormatError::Integrity {
        path: path.to_path_buf(),
        offset,
        message,
    }
}

/// CRC-32C of the bytes of `ranges` read from the file, in 1 MiB pieces.
pub(crate) fn crc_of_ranges(
    fd: BorrowedFd<'_>,
    path: &Path,
    ranges: &[(u64, u64)],
) -> Result<u32, FormatError> {
    let mut crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            file::read_exact_at(fd, &mut buf[..n], at)
                .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(at), e))?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            at += n as u64;
        }
    }
    Ok(crc)
}

fn read_record(fd: BorrowedFd<'_>, path: &Path, at: u64) -> Result<Found, FormatError> {
    let mut b = [0u8; RECORD_BYTES];
    file::read_exact_at(fd, &mut b, at)
        .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(at), e))?;
    Ok(decode(&b))
}

/// What [`locate`] needs to know about a validated stream.
pub(crate) struct StreamShape<'a> {
    pub file_size: u64,
    pub stream_start: u64,
    pub first_record: u64,
    pub layouts: &'a [BlockLayout],
    pub page_size: u64,
    pub device_stream_start: u64,
    pub device_state_offset: u64,
}

/// Finds and checks the integrity records of a file whose stream structure is already
/// validated: anchor and footer must both be present and identical, or both absent; the
/// record must describe this file exactly; the metadata checksum must match.
pub(crate) fn locate(
    fd: BorrowedFd<'_>,
    path: &Path,
    s: &StreamShape<'_>,
) -> Result<Option<Integrity>, FormatError> {
    let anchor_at = anchor_offset(s.layouts);
    let anchor = match anchor_at {
        Some(at) => read_record(fd, path, at)?,
        None => Found::Absent,
    };
    let footer_at = s.file_size.checked_sub(RECORD_LEN);
    let footer = match footer_at {
        Some(at) if at >= s.device_state_offset => read_record(fd, path, at)?,
        _ => Found::Absent,
    };
    let anchor_at = anchor_at.unwrap_or(0);
    let footer_at = footer_at.unwrap_or(0);
    let record = match (anchor, footer) {
        (Found::Absent, Found::Absent) => return Ok(None),
        (Found::Damaged(why), _) => {
            return Err(integrity_error(
                path,
                anchor_at,
                format!("the checksum anchor record is damaged ({why})"),
            ))
        }
        (_, Found::Damaged(why)) => {
            return Err(integrity_error(
                path,
                footer_at,
                format!("the checksum footer record is damaged ({why})"),
            ))
        }
        (Found::Valid(a), Found::Absent) => {
            let message = if a.file_size != s.file_size {
                format!(
                    "the file is {:#x} bytes but was saved with {:#x}: it was truncated or extended (checksum footer missing)",
                    s.file_size, a.file_size
                )
            } else {
                "the checksum footer record at the end of the file is missing".to_string()
            };
            return Err(integrity_error(path, footer_at, message));
        }
        (Found::Absent, Found::Valid(_)) => {
            return Err(integrity_error(
                path,
                anchor_at,
                "the checksum anchor record after the first bitmap is missing".into(),
            ))
        }
        (Found::Valid(a), Found::Valid(f)) if a != f => {
            return Err(integrity_error(
                path,
                footer_at,
                "the checksum anchor and footer records differ".into(),
            ))
        }
        (Found::Valid(a), Found::Valid(_)) => a,
    };
    let bad = |offset: u64, message: String| Err(integrity_error(path, offset, message));
    if record.file_size != s.file_size {
        return bad(
            footer_at,
            format!(
                "the file is {:#x} bytes but the checksum record says {:#x}",
                s.file_size, record.file_size
            ),
        );
    }
    if u64::from(record.page_size) != s.page_size {
        return bad(
            anchor_at,
            format!(
                "the checksum record's page size {} differs from the stream's {}",
                record.page_size, s.page_size
            ),
        );
    }
    if u64::from(record.blocks) != s.layouts.len() as u64 {
        return bad(
            anchor_at,
            format!(
                "the checksum record counts {} blocks, the stream has {}",
                record.blocks,
                s.layouts.len()
            ),
        );
    }
    let expected_len = table_len(s.layouts);
    let table_end = record.table_offset.checked_add(record.table_len);
    if Some(record.table_len) != expected_len
        || record.table_offset < s.device_state_offset
        || table_end != Some(footer_at)
    {
        return bad(
            anchor_at,
            format!(
                "the checksum table at {:#x} ({:#x} bytes) does not fit the file (expected {:#x} bytes ending at {footer_at:#x})",
                record.table_offset,
                record.table_len,
                expected_len.unwrap_or(0)
            ),
        );
    }
    let ranges = metadata_ranges(
        s.stream_start,
        s.first_record,
        s.layouts,
        s.device_stream_start,
        record.table_offset,
    );
    let crc = crc_of_ranges(fd, path, &ranges)?;
    if crc != record.metadata_crc {
        return bad(
            s.stream_start,
            format!(
                "metadata checksum mismatch (stored {:#010x}, computed {crc:#010x}): a header, bitmap, block record or the device state was changed after the save",
                record.metadata_crc
            ),
        );
    }
    let extension = if record.flags & FLAG_EXTENSION != 0 {
        let trailer_at = record
            .table_offset
            .checked_sub(EXTENSION_TRAILER_LEN)
            .filter(|at| *at >= s.device_state_offset);
        let Some(trailer_at) = trailer_at else {
            return bad(
                record.table_offset,
                "the extension's trailer does not fit before the checksum table".into(),
            );
        };
        let mut b = [0u8; 16];
        file::read_exact_at(fd, &mut b, trailer_at)
            .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(trailer_at), e))?;
        let Some(t) = ExtensionTrailer::decode(&b) else {
            return bad(trailer_at, "the extension's trailer is damaged".into());
        };
        let body_len = u64::from(t.body_len);
        match trailer_at
            .checked_sub(body_len)
            .filter(|at| *at >= s.device_state_offset)
        {
            Some(at) => Some((at, body_len)),
            None => {
                return bad(
                    trailer_at,
                    format!("the extension ({body_len} bytes) reaches before the device state"),
                )
            }
        }
    } else {
        None
    };
    Ok(Some(Integrity {
        anchor_offset: anchor_at,
        footer_offset: footer_at,
        record,
        extension,
    }))
}

/// Where a file's checksum records and table go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    pub anchor_offset: u64,
    pub table_offset: u64,
    pub table_len: u64,
    pub file_size: u64,
    /// The record's flags ([`FLAG_EXTENSION`]; [`FLAG_CLEAN_ZERO`] only when the writer
    /// knows it holds).
    pub flags: u32,
}

/// The stream's shape, for the metadata ranges.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub stream_start: u64,
    pub first_record: u64,
    pub device_stream_start: u64,
    pub page_size: u64,
}

/// The one checksum writer: the table (for every block in file order, the page's checksum
/// where its bit is set in `bitmaps`, else 0), then the anchor and footer records with the
/// CRC of the metadata ranges, read back from the file as a reader will read them.
pub(crate) fn write(
    fd: BorrowedFd<'_>,
    path: &Path,
    place: &Place,
    layouts: &[BlockLayout],
    bitmaps: &[Vec<u64>],
    sums: &[Vec<std::sync::atomic::AtomicU32>],
    geometry: Geometry,
) -> Result<(), crate::error::SaveError> {
    use std::sync::atomic::Ordering;
    let io = |offset: u64| {
        move |e: std::io::Error| {
            crate::error::SaveError::Io(IoFailure::new(Op::WriteChecksums, path, Some(offset), e))
        }
    };
    let mut table_crc = 0u32;
    let mut at = place.table_offset;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for ((layout, words), entries) in layouts.iter().zip(bitmaps).zip(sums) {
        if layout.is_empty() {
            continue;
        }
        let stored = mapped_ram_core::bitmap::BitmapRef::new(words, layout.num_pages())?;
        for (piece_index, piece) in entries.chunks(1 << 18).enumerate() {
            buf.clear();
            let first = (piece_index as u64) << 18;
            for (i, e) in piece.iter().enumerate() {
                let sum = if stored.test(first + i as u64) {
                    e.load(Ordering::Relaxed)
                } else {
                    0
                };
                buf.extend_from_slice(&sum.to_le_bytes());
            }
            table_crc = crc32c::crc32c_append(table_crc, &buf);
            file::write_all_at(fd, &buf, at, Op::WriteChecksums).map_err(io(at))?;
            at += buf.len() as u64;
        }
    }
    let ranges = metadata_ranges(
        geometry.stream_start,
        geometry.first_record,
        layouts,
        geometry.device_stream_start,
        place.table_offset,
    );
    let metadata_crc = crc_of_ranges(fd, path, &ranges).map_err(|e| match e {
        FormatError::Io(f) => crate::error::SaveError::Io(f),
        other => crate::error::SaveError::Io(IoFailure::new(
            Op::ReadStream,
            path,
            None,
            std::io::Error::other(other.to_string()),
        )),
    })?;
    let record = Record {
        table_offset: place.table_offset,
        table_len: place.table_len,
        file_size: place.file_size,
        page_size: u32::try_from(geometry.page_size).unwrap_or(u32::MAX),
        blocks: u32::try_from(layouts.len()).unwrap_or(u32::MAX),
        metadata_crc,
        table_crc,
        flags: place.flags,
    };
    let record = encode(&record);
    let footer = place.file_size - RECORD_LEN;
    for offset in [place.anchor_offset, footer] {
        file::write_all_at(fd, &record, offset, Op::WriteChecksums).map_err(io(offset))?;
    }
    Ok(())
}

/// What the extension records (see [`FLAG_EXTENSION`]). Body, little-endian: `u8` device
/// state given (0 or 1); `u32` block count; per block in file order `u32` range count, then
/// `u64` start and `u64` length of each guest physical address range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extension {
    pub device_state_given: bool,
    pub guest_ranges: Vec<Vec<std::ops::Range<u64>>>,
}

impl Extension {
    /// The body and its trailer.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![u8::from(self.device_state_given)];
        b.extend_from_slice(&(self.guest_ranges.len() as u32).to_le_bytes());
        for ranges in &self.guest_ranges {
            b.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
            for r in ranges {
                b.extend_from_slice(&r.start.to_le_bytes());
                b.extend_from_slice(&(r.end - r.start).to_le_bytes());
            }
        }
        let trailer = ExtensionTrailer {
            body_len: b.len() as u32,
        };
        b.extend_from_slice(&trailer.encode());
        b
    }

    /// Parses a body for `blocks` blocks; `None` if it is malformed.
    pub fn decode(body: &[u8], blocks: usize) -> Option<Self> {
        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = body.get(at..at.checked_add(n)?)?;
            at += n;
            Some(s)
        };
        let given = match take(1)?[0] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let u32_of = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let u64_of = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(s);
            u64::from_le_bytes(w)
        };
        let count = u32_of(take(4)?) as usize;
        if count != blocks {
            return None;
        }
        let mut guest_ranges = Vec::with_capacity(count.min(crate::MAX_BLOCKS));
        for _ in 0..count {
            let n = u32_of(take(4)?) as usize;
            // Every range takes 16 bytes of the body: a count beyond it is malformed.
            if n > body.len() / 16 {
                return None;
            }
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                let start = u64_of(take(8)?);
                let len = u64_of(take(8)?);
                ranges.push(start..start.checked_add(len)?);
            }
            guest_ranges.push(ranges);
        }
        (at == body.len()).then_some(Self {
            device_state_given: given,
            guest_ranges,
        })
    }
}

/// Reads and checks the checksum table: one `Vec<u32>` per block in file order (empty for a
/// block without data). Its size was bounded by [`locate`] (it lies inside the file).
pub(crate) fn read_table(
    fd: BorrowedFd<'_>,
    path: &Path,
    integrity: &Integrity,
    layouts: &[BlockLayout],
) -> Result<Vec<Vec<u32>>, FormatError> {
    let rec = &integrity.record;
    let mut tables = Vec::with_capacity(layouts.len());
    let mut crc = 0u32;
    let mut at = rec.table_offset;
    let mut buf = vec![0u8; 1 << 20];
    for l in layouts {
        let entries = if l.is_empty() { 0 } else { l.num_pages() };
        let mut table = Vec::with_capacity(entries as usize);
        let mut left = entries * ENTRY_LEN;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file::read_exact_at(fd, &mut buf[..n], at)
                .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(at), e))?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            table.extend(
                buf[..n]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            at += n as u64;
            left -= n as u64;
        }
        tables.push(table);
    }
    if crc != rec.table_crc {
        return Err(integrity_error(
            path,
            rec.table_offset,
            format!(
                "the page checksum table is damaged (stored CRC {:#010x}, computed {crc:#010x})",
                rec.table_crc
            ),
        ));
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_damage() {
        let r = Record {
            table_offset: 0x1234_5678,
            table_len: 4096,
            file_size: 0x1234_5678 + 4096 + 64,
            page_size: 4096,
            blocks: 2,
            metadata_crc: 1,
            table_crc: 2,
            flags: 0,
        };
        let mut b = encode(&r);
        assert_eq!(decode(&b), Found::Valid(r));
        b[17] ^= 0x40;
        assert!(matches!(decode(&b), Found::Damaged(_)));
        b[0] = 0;
        assert_eq!(decode(&b), Found::Absent);
    }

    #[test]
    fn page_checksum_depends_on_index() {
        let page = [7u8; 4096];
        assert_ne!(page_checksum(&page, 0), page_checksum(&page, 1));
    }
}
