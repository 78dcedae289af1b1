//! Where everything lives in a mapped-ram file.
//!
//! Each RAM block has a fixed region in the file: a block record in the stream (id string,
//! length, optional guest physical address), a 28-byte big-endian [`MappedRamHeader`], the page
//! bitmap right after it, and — starting on the next 1 MiB boundary — one slot per target page.
//! Page `k` of a block always lives at `pages_offset + k * page_size`, so a page written twice
//! lands in the same place and the file never grows.
//!
//! All offsets are absolute file offsets: they already include any `offset=` prefix of a
//! `file:PATH,offset=N` URI. Every computation is checked; a size that would overflow `u64` is
//! a [`LayoutError`], never a wrap or a panic.
//!
//! # Example: the first block of the spec's worked example
//!
//! ```
//! use mapped_ram_core::layout::{Planner, MappedRamHeader};
//!
//! // `microvm` with only the `mapped-ram` capability: the first block record starts at 0x5c.
//! let mut planner = Planner::new(0x5c, 4096, false).unwrap();
//! let ram = planner.push("microvm.ram".len(), 0x200_0000).unwrap();
//! assert_eq!(ram.header_offset, 0x70);
//! assert_eq!(ram.bitmap_offset, 0x8c);
//! assert_eq!(ram.bitmap_size, 1024);
//! assert_eq!(ram.pages_offset, 0x10_0000);
//! let bios = planner.push("pc.bios".len(), 0x1_0000).unwrap();
//! assert_eq!(bios.record_offset, 0x210_0000);
//! assert_eq!(bios.pages_offset, 0x220_0000);
//! assert_eq!(planner.cursor(), 0x221_0000); // where the stream goes on
//! let bytes = ram.header().encode();
//! assert_eq!(MappedRamHeader::decode(&bytes).unwrap(), ram.header());
//! ```

use core::fmt;

/// Size in bytes of the packed [`MappedRamHeader`].
pub const HEADER_SIZE: usize = 28;
/// [`HEADER_SIZE`] as a file-offset quantity.
const HEADER_SIZE_U64: u64 = 28;
/// Highest mapped-ram header version a loader accepts (QEMU's `MAPPED_RAM_HDR_VERSION`).
pub const MAPPED_RAM_VERSION: u32 = 1;
/// Alignment of every block's page region (QEMU's `MAPPED_RAM_FILE_OFFSET_ALIGNMENT`).
pub const FILE_OFFSET_ALIGNMENT: u64 = 0x10_0000;
/// Largest single read QEMU's loader issues for page data (`MAPPED_RAM_LOAD_BUF_SIZE`).
pub const LOAD_BUF_SIZE: u64 = 0x10_0000;
/// Target page size of x86-64 and aarch64 `virt` guests.
pub const DEFAULT_PAGE_SIZE: u64 = 4096;
/// Bytes of bitmap per 64 pages: QEMU dumps host `unsigned long` words (8 bytes on 64-bit hosts).
const BITMAP_WORD_BYTES: u64 = 8;

/// The per-block header that QEMU writes after each block record (28 bytes, big-endian, packed).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | be32 | `version` (1) |
/// | 4 | be64 | `page_size` |
/// | 12 | be64 | `bitmap_offset` (absolute) |
/// | 20 | be64 | `pages_offset` (absolute, 1 MiB aligned when QEMU writes it) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MappedRamHeader {
    /// Format version; loaders accept `<= 1`.
    pub version: u32,
    /// Target page size of the source, in bytes.
    pub page_size: u64,
    /// Absolute file offset of the block's page bitmap.
    pub bitmap_offset: u64,
    /// Absolute file offset of the block's page 0.
    pub pages_offset: u64,
}

/// A [`MappedRamHeader`] could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HeaderError {
    /// The header's version is newer than this implementation understands (QEMU: "Migration
    /// mapped-ram capability version not supported (expected <= 1, got N)").
    UnsupportedVersion {
        /// The version found in the file.
        version: u32,
    },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::UnsupportedVersion { version } => write!(
                f,
                "mapped-ram header version not supported (expected <= {MAPPED_RAM_VERSION}, got {version})"
            ),
        }
    }
}

impl core::error::Error for HeaderError {}

impl MappedRamHeader {
    /// Encodes the header as the 28 big-endian bytes QEMU writes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        let (version, rest) = out.split_at_mut(4);
        let (page_size, rest) = rest.split_at_mut(8);
        let (bitmap_offset, pages_offset) = rest.split_at_mut(8);
        version.copy_from_slice(&self.version.to_be_bytes());
        page_size.copy_from_slice(&self.page_size.to_be_bytes());
        bitmap_offset.copy_from_slice(&self.bitmap_offset.to_be_bytes());
        pages_offset.copy_from_slice(&self.pages_offset.to_be_bytes());
        out
    }

    /// Decodes 28 header bytes, refusing a version above [`MAPPED_RAM_VERSION`] as QEMU does.
    pub fn decode(bytes: &[u8; HEADER_SIZE]) -> Result<Self, HeaderError> {
        let header = Self::decode_any_version(bytes);
        if header.version > MAPPED_RAM_VERSION {
            return Err(HeaderError::UnsupportedVersion {
                version: header.version,
            });
        }
        Ok(header)
    }

    /// Decodes 28 header bytes without judging the version (for inspection tools).
    pub fn decode_any_version(bytes: &[u8; HEADER_SIZE]) -> Self {
        let (version, rest) = bytes.split_at(4);
        let (page_size, rest) = rest.split_at(8);
        let (bitmap_offset, pages_offset) = rest.split_at(8);
        Self {
            version: be32(version),
            page_size: be64(page_size),
            bitmap_offset: be64(bitmap_offset),
            pages_offset: be64(pages_offset),
        }
    }

    /// `true` for the header of a block that has no data in the file: QEMU 11.0 writes
    /// `bitmap_offset = pages_offset = 0` for blocks skipped by `x-ignore-shared`.
    pub fn is_empty(&self) -> bool {
        self.bitmap_offset == 0 && self.pages_offset == 0
    }
}

fn be32(bytes: &[u8]) -> u32 {
    let mut raw = [0u8; 4];
    for (dst, src) in raw.iter_mut().zip(bytes) {
        *dst = *src;
    }
    u32::from_be_bytes(raw)
}

fn be64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    for (dst, src) in raw.iter_mut().zip(bytes) {
        *dst = *src;
    }
    u64::from_be_bytes(raw)
}

/// What was wrong with a block's geometry or with a computation on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LayoutError {
    /// A page size that is zero or not a power of two.
    BadPageSize {
        /// The page size given.
        page_size: u64,
    },
    /// A block length that is not a whole number of pages.
    LengthNotPageMultiple {
        /// The block length.
        length: u64,
        /// The page size.
        page_size: u64,
    },
    /// A block id string must be 1..=255 bytes (it is written with a one-byte length).
    BadIdLength {
        /// The length given.
        len: usize,
    },
    /// The named quantity would not fit in 64 bits.
    Overflow {
        /// Which quantity overflowed (`"pages_offset"`, `"bitmap end"`, ...).
        what: &'static str,
    },
    /// A page index past the end of the block.
    PageOutOfRange {
        /// The page index asked for.
        page: u64,
        /// Pages in the block.
        pages: u64,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::BadPageSize { page_size } => {
                write!(f, "page size {page_size} is not a power of two")
            }
            LayoutError::LengthNotPageMultiple { length, page_size } => write!(
                f,
                "block length {length:#x} is not a multiple of the page size {page_size}"
            ),
            LayoutError::BadIdLength { len } => {
                write!(f, "block id string of {len} bytes (must be 1..=255)")
            }
            LayoutError::Overflow { what } => write!(f, "{what} does not fit in 64 bits"),
            LayoutError::PageOutOfRange { page, pages } => {
                write!(f, "page {page} is past the end of a block of {pages} pages")
            }
        }
    }
}

impl core::error::Error for LayoutError {}

/// A decoded header does not describe a usable region for its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BlockError {
    /// The header's version is not supported.
    Header(HeaderError),
    /// The header's page size differs from the stream's target page size.
    PageSizeMismatch {
        /// Page size in the header.
        header: u64,
        /// Target page size of the stream.
        expected: u64,
    },
    /// The block length is not a multiple of the page size, or a size overflowed.
    Layout(LayoutError),
    /// `pages_offset` is not a multiple of the page size (QEMU: "region has bad alignment").
    BadAlignment {
        /// The offending `pages_offset`.
        pages_offset: u64,
    },
    /// The bitmap starts inside the block record or header, or runs into the page region.
    BitmapOutOfPlace {
        /// `bitmap_offset` from the header.
        bitmap_offset: u64,
        /// Bitmap size implied by the block length.
        bitmap_size: u64,
        /// `pages_offset` from the header.
        pages_offset: u64,
    },
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::Header(e) => e.fmt(f),
            BlockError::PageSizeMismatch { header, expected } => write!(
                f,
                "header page size {header} differs from the stream's target page size {expected}"
            ),
            BlockError::Layout(e) => e.fmt(f),
            BlockError::BadAlignment { pages_offset } => write!(
                f,
                "pages region at {pages_offset:#x} has bad alignment (not a multiple of the page size)"
            ),
            BlockError::BitmapOutOfPlace {
                bitmap_offset,
                bitmap_size,
                pages_offset,
            } => write!(
                f,
                "bitmap at {bitmap_offset:#x} ({bitmap_size} bytes) is not between the header and the pages region at {pages_offset:#x}"
            ),
        }
    }
}

impl core::error::Error for BlockError {}

impl From<LayoutError> for BlockError {
    fn from(e: LayoutError) -> Self {
        BlockError::Layout(e)
    }
}

/// Number of pages in a block of `length` bytes; `length` must be a page multiple.
pub fn num_pages(length: u64, page_size: u64) -> Result<u64, LayoutError> {
    check_page_size(page_size)?;
    // Page size is a non-zero power of two, so the division and remainder cannot fail.
    let pages = length.checked_div(page_size).unwrap_or(0);
    if length.checked_rem(page_size) != Some(0) {
        return Err(LayoutError::LengthNotPageMultiple { length, page_size });
    }
    Ok(pages)
}

/// Bytes of bitmap QEMU stores for `pages` pages: `ceil(pages / 64) * 8`.
pub fn bitmap_size(pages: u64) -> u64 {
    // pages / 64 <= 2^58, so neither the increment nor the multiplication can overflow.
    let words = pages.div_ceil(64);
    words.saturating_mul(BITMAP_WORD_BYTES)
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub fn align_up(value: u64, align: u64) -> Result<u64, LayoutError> {
    check_page_size(align)?;
    let mask = align.wrapping_sub(1);
    value
        .checked_add(mask)
        .map(|v| v & !mask)
        .ok_or(LayoutError::Overflow {
            what: "aligned offset",
        })
}

fn check_page_size(page_size: u64) -> Result<(), LayoutError> {
    if page_size.is_power_of_two() {
        Ok(())
    } else {
        Err(LayoutError::BadPageSize { page_size })
    }
}

/// Bytes a block record occupies in the stream before its header: id length byte, id string,
/// be64 length and (with `x-ignore-shared`) be64 guest physical address.
pub fn record_prefix_len(idstr_len: usize, with_gpa: bool) -> Result<u64, LayoutError> {
    if idstr_len == 0 || idstr_len > 255 {
        return Err(LayoutError::BadIdLength { len: idstr_len });
    }
    let id = u64::try_from(idstr_len).map_err(|_| LayoutError::BadIdLength { len: idstr_len })?;
    let gpa = if with_gpa { 8 } else { 0 };
    // idstr_len <= 255, so this is at most 1 + 255 + 16.
    Ok(id.saturating_add(9).saturating_add(gpa))
}

/// Everything about one block's place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockLayout {
    /// Absolute offset of the block record (its id length byte).
    pub record_offset: u64,
    /// Absolute offset of the 28-byte [`MappedRamHeader`].
    pub header_offset: u64,
    /// Block length (`used_length`) in bytes, a multiple of `page_size`.
    pub length: u64,
    /// Target page size in bytes.
    pub page_size: u64,
    /// Absolute offset of the page bitmap.
    pub bitmap_offset: u64,
    /// Size of the page bitmap in bytes (`ceil(pages / 64) * 8`).
    pub bitmap_size: u64,
    /// Absolute offset of page 0 (0 for a block without data in the file, see
    /// [`MappedRamHeader::is_empty`]).
    pub pages_offset: u64,
}

impl BlockLayout {
    /// Builds the layout of a block from a header read from a file, checking everything a
    /// loader must check before it trusts the offsets: version, page size equal to the stream's
    /// target page size, page-aligned `pages_offset`, a bitmap lying between the header and the
    /// page region, and no overflow of `pages_offset + length`.
    pub fn from_header(
        record_offset: u64,
        header_offset: u64,
        length: u64,
        header: &MappedRamHeader,
        target_page_size: u64,
    ) -> Result<Self, BlockError> {
        if header.version > MAPPED_RAM_VERSION {
            return Err(BlockError::Header(HeaderError::UnsupportedVersion {
                version: header.version,
            }));
        }
        if header.page_size != target_page_size {
            return Err(BlockError::PageSizeMismatch {
                header: header.page_size,
                expected: target_page_size,
            });
        }
        let pages = num_pages(length, header.page_size)?;
        let bitmap_size = bitmap_size(pages);
        let layout = Self {
            record_offset,
            header_offset,
            length,
            page_size: header.page_size,
            bitmap_offset: header.bitmap_offset,
            bitmap_size,
            pages_offset: header.pages_offset,
        };
        if header.is_empty() {
            return Ok(layout);
        }
        if header.pages_offset.checked_rem(header.page_size) != Some(0) {
            return Err(BlockError::BadAlignment {
                pages_offset: header.pages_offset,
            });
        }
        let header_end = header_offset
            .checked_add(HEADER_SIZE_U64)
            .ok_or(LayoutError::Overflow { what: "header end" })?;
        let bitmap_end = header
            .bitmap_offset
            .checked_add(bitmap_size)
            .ok_or(LayoutError::Overflow { what: "bitmap end" })?;
        if header.bitmap_offset < header_end || bitmap_end > header.pages_offset {
            return Err(BlockError::BitmapOutOfPlace {
                bitmap_offset: header.bitmap_offset,
                bitmap_size,
                pages_offset: header.pages_offset,
            });
        }
        header
            .pages_offset
            .checked_add(length)
            .ok_or(LayoutError::Overflow { what: "pages end" })?;
        Ok(layout)
    }

    /// The header QEMU would write for this block.
    pub fn header(&self) -> MappedRamHeader {
        MappedRamHeader {
            version: MAPPED_RAM_VERSION,
            page_size: self.page_size,
            bitmap_offset: self.bitmap_offset,
            pages_offset: self.pages_offset,
        }
    }

    /// `true` when the block has no page region in the file (0/0 header of QEMU 11.0).
    pub fn is_empty(&self) -> bool {
        self.bitmap_offset == 0 && self.pages_offset == 0
    }

    /// Number of pages in the block.
    pub fn num_pages(&self) -> u64 {
        self.length.checked_div(self.page_size).unwrap_or(0)
    }

    /// Number of `u64` words of the page bitmap.
    pub fn bitmap_words(&self) -> u64 {
        self.bitmap_size / BITMAP_WORD_BYTES
    }

    /// Absolute file offset of page `page`.
    pub fn page_offset(&self, page: u64) -> Result<u64, LayoutError> {
        let pages = self.num_pages();
        if page >= pages {
            return Err(LayoutError::PageOutOfRange { page, pages });
        }
        page.checked_mul(self.page_size)
            .and_then(|o| o.checked_add(self.pages_offset))
            .ok_or(LayoutError::Overflow {
                what: "page offset",
            })
    }

    /// Absolute offset one past the block's page region, where the next record begins
    /// (`pages_offset + length`; saturates only for layouts not built by this module).
    pub fn pages_end(&self) -> u64 {
        self.pages_offset.saturating_add(self.length)
    }
}

/// Lays out block after block the way QEMU's writer does.
///
/// Start it at the offset of the first block record (right after the RAM section's `MEM_SIZE`
/// word), [`push`](Planner::push) every block in order, and [`cursor`](Planner::cursor) is where
/// the stream continues (the RAM setup `EOS` and everything after it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Planner {
    cursor: u64,
    page_size: u64,
    with_gpa: bool,
    total: u64,
}

impl Planner {
    /// Starts a plan whose first block record is at `first_record_offset`.
    ///
    /// `with_gpa` is `true` when the configuration lists `x-ignore-shared`, which adds a be64
    /// guest physical address to every block record.
    pub fn new(
        first_record_offset: u64,
        page_size: u64,
        with_gpa: bool,
    ) -> Result<Self, LayoutError> {
        check_page_size(page_size)?;
        Ok(Self {
            cursor: first_record_offset,
            page_size,
            with_gpa,
            total: 0,
        })
    }

    /// Places the next block (id string of `idstr_len` bytes, `length` bytes of RAM).
    pub fn push(&mut self, idstr_len: usize, length: u64) -> Result<BlockLayout, LayoutError> {
        let (mut layout, header_end) = self.record(idstr_len, length)?;
        let bitmap_end = header_end
            .checked_add(layout.bitmap_size)
            .ok_or(LayoutError::Overflow { what: "bitmap end" })?;
        let pages_offset =
            align_up(bitmap_end, FILE_OFFSET_ALIGNMENT).map_err(|_| LayoutError::Overflow {
                what: "pages offset",
            })?;
        let end = pages_offset
            .checked_add(length)
            .ok_or(LayoutError::Overflow { what: "pages end" })?;
        layout.bitmap_offset = header_end;
        layout.pages_offset = pages_offset;
        self.advance(end, length)?;
        Ok(layout)
    }

    /// Places a block that has no data in the file (QEMU 11.0's layout for blocks skipped by
    /// `x-ignore-shared`): record and a 0/0 header, no bitmap, no page region.
    pub fn push_empty(
        &mut self,
        idstr_len: usize,
        length: u64,
    ) -> Result<BlockLayout, LayoutError> {
        let (layout, header_end) = self.record(idstr_len, length)?;
        self.advance(header_end, length)?;
        Ok(layout)
    }

    /// The record and header of the next block, with 0/0 offsets, and where its header ends.
    fn record(&self, idstr_len: usize, length: u64) -> Result<(BlockLayout, u64), LayoutError> {
        let pages = num_pages(length, self.page_size)?;
        let record_offset = self.cursor;
        let header_offset = record_offset
            .checked_add(record_prefix_len(idstr_len, self.with_gpa)?)
            .ok_or(LayoutError::Overflow {
                what: "header offset",
            })?;
        let header_end = header_offset
            .checked_add(HEADER_SIZE_U64)
            .ok_or(LayoutError::Overflow { what: "header end" })?;
        let layout = BlockLayout {
            record_offset,
            header_offset,
            length,
            page_size: self.page_size,
            bitmap_offset: 0,
            bitmap_size: bitmap_size(pages),
            pages_offset: 0,
        };
        Ok((layout, header_end))
    }

    /// Moves past a placed block: the next record goes at `end`.
    fn advance(&mut self, end: u64, length: u64) -> Result<(), LayoutError> {
        self.total = self
            .total
            .checked_add(length)
            .ok_or(LayoutError::Overflow {
                what: "total RAM size",
            })?;
        self.cursor = end;
        Ok(())
    }

    /// Offset where the next block record — or, after the last block, the stream — goes.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Sum of the lengths of all blocks pushed so far (the value of the `MEM_SIZE` record).
    pub fn total_ram(&self) -> u64 {
        self.total
    }

    /// The page size of the plan.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_bytes() {
        let h = MappedRamHeader {
            version: 1,
            page_size: 4096,
            bitmap_offset: 0x8c,
            pages_offset: 0x10_0000,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[..4], &[0, 0, 0, 1]);
        assert_eq!(&bytes[4..12], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&bytes[12..20], &[0, 0, 0, 0, 0, 0, 0, 0x8c]);
        assert_eq!(&bytes[20..28], &[0, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(MappedRamHeader::decode(&bytes), Ok(h));
        let mut v2 = bytes;
        v2[3] = 2;
        assert_eq!(
            MappedRamHeader::decode(&v2),
            Err(HeaderError::UnsupportedVersion { version: 2 })
        );
        let mut v0 = bytes;
        v0[3] = 0;
        assert_eq!(MappedRamHeader::decode(&v0).unwrap().version, 0);
    }

    /// Spec §a.6, offset by offset (microvm, mapped-ram only, machine name "microvm").
    #[test]
    fn worked_example() {
        // magic 4 + version 4 + config (1 + 4 + 7) + caps subsection (1+1+26+4+4+1+10) = 0x43,
        // RAM SECTION_START 17 bytes = 0x54, MEM_SIZE word 8 = 0x5c.
        let mut p = Planner::new(0x5c, 4096, false).unwrap();
        let ram = p.push(11, 0x200_0000).unwrap();
        assert_eq!(ram.record_offset, 0x5c);
        assert_eq!(ram.header_offset, 0x70);
        assert_eq!(ram.bitmap_offset, 0x8c);
        assert_eq!(ram.bitmap_size, 1024);
        assert_eq!(ram.bitmap_offset + ram.bitmap_size, 0x48c);
        assert_eq!(ram.pages_offset, 0x10_0000);
        assert_eq!(ram.page_offset(0), Ok(0x10_0000));
        assert_eq!(ram.page_offset(7), Ok(0x10_7000));
        assert_eq!(ram.page_offset(8191), Ok(0x20f_f000));
        assert_eq!(
            ram.page_offset(8192),
            Err(LayoutError::PageOutOfRange {
                page: 8192,
                pages: 8192
            })
        );
        assert_eq!(ram.pages_end(), 0x210_0000);
        let bios = p.push(7, 0x1_0000).unwrap();
        assert_eq!(bios.record_offset, 0x210_0000);
        assert_eq!(bios.header_offset, 0x210_0010);
        assert_eq!(bios.bitmap_offset, 0x210_002c);
        assert_eq!(bios.bitmap_size, 8);
        assert_eq!(bios.pages_offset, 0x220_0000);
        assert_eq!(p.cursor(), 0x221_0000);
        assert_eq!(p.total_ram(), 0x201_0000);
        // The header bytes at 0x70 and 0x2100010 in the real file.
        assert_eq!(
            ram.header().encode(),
            [
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0x8c, 0, 0, 0, 0, 0,
                0x10, 0, 0
            ]
        );
        assert_eq!(
            bios.header().encode()[12..],
            [0, 0, 0, 0, 2, 0x10, 0, 0x2c, 0, 0, 0, 0, 2, 0x20, 0, 0]
        );
        // A loader rebuilding the layouts from the headers gets the same result.
        assert_eq!(
            BlockLayout::from_header(0x5c, 0x70, 0x200_0000, &ram.header(), 4096),
            Ok(ram)
        );
        assert_eq!(
            BlockLayout::from_header(0x210_0000, 0x210_0010, 0x1_0000, &bios.header(), 4096),
            Ok(bios)
        );
    }

    /// Spec §a.6 scaling rows: pc-q35-10.0 with 4 GiB and 64 GiB of pc.ram.
    #[test]
    fn scaling_rows() {
        let mut p = Planner::new(0x60, 4096, false).unwrap();
        let pc = p.push(6, 0x1_0000_0000).unwrap();
        assert_eq!(pc.header_offset, 0x6f);
        assert_eq!(pc.bitmap_offset, 0x8b);
        assert_eq!(pc.bitmap_size, 0x2_0000);
        assert_eq!(pc.pages_offset, 0x10_0000);
        assert_eq!(pc.pages_end(), 0x1_0010_0000);
        let vga = p.push(8, 0x100_0000).unwrap();
        assert_eq!(vga.record_offset, 0x1_0010_0000);
        assert_eq!(vga.header_offset, 0x1_0010_0011);
        assert_eq!(vga.bitmap_offset, 0x1_0010_002d);
        assert_eq!(vga.bitmap_size, 0x200);
        assert_eq!(vga.pages_offset, 0x1_0020_0000);
        assert_eq!(p.cursor(), 0x1_0120_0000);
        assert_eq!(p.total_ram() | 4, 0x0000_0001_0100_0004);

        let mut p = Planner::new(0x60, 4096, false).unwrap();
        let big = p.push(6, 64 << 30).unwrap();
        assert_eq!(big.bitmap_size, 0x20_0000);
        assert_eq!(big.bitmap_offset + big.bitmap_size, 0x20_008b);
        assert_eq!(big.pages_offset, 0x30_0000);
    }

    #[test]
    fn file_offset_prefix_keeps_absolute_alignment() {
        // offset=0x1000 on a pc machine ("pc-i440fx-10.0", 14 bytes: MEM_SIZE word at 0x5b):
        // first bitmap at 0x108e, pages still at 0x100000.
        let mut p = Planner::new(0x1000 + 0x5b + 8, 4096, false).unwrap();
        let b = p.push(6, 128 << 20).unwrap();
        assert_eq!(b.bitmap_offset, 0x108e);
        assert_eq!(b.pages_offset, 0x10_0000);
    }

    #[test]
    fn gpa_and_empty_blocks() {
        let mut p = Planner::new(0x100, 4096, true).unwrap();
        let e = p.push_empty(3, 0x10_0000).unwrap();
        assert_eq!(e.header_offset, 0x100 + 1 + 3 + 16);
        assert!(e.is_empty());
        assert_eq!(p.cursor(), e.header_offset + 28);
        let b = p.push(3, 0x1000).unwrap();
        assert_eq!(b.record_offset, e.header_offset + 28);
        assert_eq!(b.pages_offset, 0x10_0000);
    }

    #[test]
    fn errors_not_panics() {
        assert_eq!(
            Planner::new(0, 3000, false),
            Err(LayoutError::BadPageSize { page_size: 3000 })
        );
        assert_eq!(
            Planner::new(0, 0, false),
            Err(LayoutError::BadPageSize { page_size: 0 })
        );
        let mut p = Planner::new(0, 4096, false).unwrap();
        assert_eq!(p.push(0, 4096), Err(LayoutError::BadIdLength { len: 0 }));
        assert_eq!(
            p.push(256, 4096),
            Err(LayoutError::BadIdLength { len: 256 })
        );
        assert_eq!(
            p.push(1, 4097),
            Err(LayoutError::LengthNotPageMultiple {
                length: 4097,
                page_size: 4096
            })
        );
        let mut p = Planner::new(u64::MAX - 100, 4096, false).unwrap();
        assert!(matches!(p.push(1, 4096), Err(LayoutError::Overflow { .. })));
        let mut p = Planner::new(0, 4096, false).unwrap();
        assert!(matches!(
            p.push(1, !4095u64),
            Err(LayoutError::Overflow { .. })
        ));
        assert!(matches!(
            align_up(u64::MAX, 4096),
            Err(LayoutError::Overflow { .. })
        ));
    }

    #[test]
    fn loader_checks() {
        let good = MappedRamHeader {
            version: 1,
            page_size: 4096,
            bitmap_offset: 0x8c,
            pages_offset: 0x10_0000,
        };
        let chk = |h: MappedRamHeader| BlockLayout::from_header(0x5c, 0x70, 0x200_0000, &h, 4096);
        assert!(chk(good).is_ok());
        assert_eq!(
            chk(MappedRamHeader { version: 2, ..good }),
            Err(BlockError::Header(HeaderError::UnsupportedVersion {
                version: 2
            }))
        );
        assert_eq!(
            chk(MappedRamHeader {
                page_size: 8192,
                ..good
            }),
            Err(BlockError::PageSizeMismatch {
                header: 8192,
                expected: 4096
            })
        );
        assert_eq!(
            chk(MappedRamHeader {
                pages_offset: 0x10_0800,
                ..good
            }),
            Err(BlockError::BadAlignment {
                pages_offset: 0x10_0800
            })
        );
        assert!(matches!(
            chk(MappedRamHeader {
                bitmap_offset: 0xd00,
                pages_offset: 0x1000,
                ..good
            }),
            Err(BlockError::BitmapOutOfPlace { .. })
        ));
        assert!(matches!(
            chk(MappedRamHeader {
                bitmap_offset: 0x60,
                ..good
            }),
            Err(BlockError::BitmapOutOfPlace { .. })
        ));
        assert!(matches!(
            chk(MappedRamHeader {
                bitmap_offset: u64::MAX - 4,
                ..good
            }),
            Err(BlockError::Layout(LayoutError::Overflow { .. }))
        ));
        assert!(matches!(
            chk(MappedRamHeader {
                pages_offset: !4095u64,
                ..good
            }),
            Err(BlockError::Layout(LayoutError::Overflow { .. }))
        ));
        let empty = MappedRamHeader {
            bitmap_offset: 0,
            pages_offset: 0,
            ..good
        };
        assert!(chk(empty).unwrap().is_empty());
    }
}
