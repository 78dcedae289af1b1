//! Reading a snapshot's structure: blocks, bitmaps, device-state offset — and checking it.
//!
//! [`open_snapshot`] decodes the stream with the core's decoder and validates every block
//! against the file's size and against the other blocks, reading only headers and bitmaps.
//! Restore, `inspect` and `verify` all start here, so a file is judged the same way by each.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use mapped_ram_core::bitmap::{self, BitmapRef};
use mapped_ram_core::caps::Capabilities;
use mapped_ram_core::layout::BlockLayout;
use mapped_ram_core::stream::{Decoder, Tail};
use rustix::fs::OFlags;

use crate::error::{FormatError, IoFailure, Op, RestoreErrorKind};
use crate::file::{self, FdSource};
use crate::integrity::{self, Integrity, StreamShape};

/// A block as the snapshot describes it.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    /// The block's id string.
    pub name: String,
    /// Where its record, header, bitmap and pages are.
    pub layout: BlockLayout,
    /// Guest physical address, present when the file lists `x-ignore-shared`.
    pub gpa: Option<u64>,
    /// The page bitmap as `u64` words (bit set = page stored in the file).
    pub bitmap: Vec<u64>,
    /// The guest physical address ranges the block backs, as the saving VMM recorded them
    /// ([`crate::SaveOptions::guest_ranges`]; empty when none were recorded — QEMU's files,
    /// ours without checksums).
    pub guest_ranges: Vec<std::ops::Range<u64>>,
}

impl BlockInfo {
    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.layout.num_pages()
    }

    /// Pages whose bitmap bit is set.
    pub fn pages_stored(&self) -> u64 {
        self.bitmap_ref().count_ones()
    }

    /// The bitmap as a [`BitmapRef`].
    /// Blocks without data in the file (0/0 header) have an empty bitmap.
    pub fn bitmap_ref(&self) -> BitmapRef<'_> {
        let bits = if self.layout.is_empty() {
            0
        } else {
            self.layout.num_pages()
        };
        match BitmapRef::new(&self.bitmap, bits) {
            Ok(map) => map,
            // `open_snapshot` sizes every bitmap for its block; an empty view is the safe
            // answer for a hand-built `BlockInfo` that is not.
            Err(_) => BitmapRef::new(&[], 0).unwrap_or_else(|_| unreachable!("0 bits fit")),
        }
    }
}

/// Everything `inspect` reports about a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The file.
    pub path: PathBuf,
    /// Bytes before the stream (`offset=`).
    pub offset: u64,
    /// File size in bytes.
    pub file_size: u64,
    /// Machine type from the configuration section.
    pub machine: String,
    /// Capabilities the configuration section lists.
    pub capabilities: Vec<String>,
    /// The RAM section's id.
    pub ram_section_id: u32,
    /// Sum of block lengths (`MEM_SIZE` record).
    pub total_ram: u64,
    /// Blocks, in file order.
    pub blocks: Vec<BlockInfo>,
    /// Where the stream goes on after the last block's pages (the RAM setup `EOS`).
    pub device_stream_start: u64,
    /// Offset of the first record after the RAM END section: the device state.
    pub device_state_offset: u64,
    /// Where the page checksums are, for a file that has them (checked: records and
    /// metadata checksum match; see [`crate::integrity`]).
    pub integrity: Option<Integrity>,
    /// Whether the saver gave a device state: `Some(false)` for a file saved without one (its
    /// stream then ends with a bare `QEMU_VM_EOF`, and [`read_device_state`] returns no
    /// bytes), `Some(true)` with one, `None` where the file does not say (QEMU's files, ours
    /// without checksums: the device state is then whatever follows RAM END).
    pub device_state_given: Option<bool>,
}

impl SnapshotInfo {
    /// The block named `name`.
    pub fn block(&self, name: &str) -> Option<&BlockInfo> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// The block named `name`, or the error that names it and lists the blocks the snapshot
    /// holds.
    pub fn block_for_restore(&self, name: &str) -> Result<&BlockInfo, RestoreErrorKind> {
        let index = crate::blocks::find(
            &self.blocks,
            crate::blocks::Wanted {
                name,
                length: None,
                page_size: None,
                needs_pages: false,
            },
        )?;
        Ok(&self.blocks[index])
    }

    /// Where the device state is: its offset and length in bytes (0 for a file that says no
    /// device state was given, whose stream ends with a bare `QEMU_VM_EOF`).
    pub fn device_state_range(&self) -> (u64, u64) {
        let start = self.device_state_offset;
        let len = if self.device_state_given == Some(false) {
            0
        } else {
            self.device_state_end().saturating_sub(start)
        };
        (start, len)
    }

    /// End of the device state: the start of our extension or checksum table, or the end of
    /// the file.
    pub fn device_state_end(&self) -> u64 {
        match self.integrity {
            Some(Integrity {
                extension: Some((at, _)),
                ..
            }) => at,
            Some(i) => i.record.table_offset,
            None => self.file_size,
        }
    }
}

/// An open snapshot: its main descriptor and decoded structure.
pub struct Snapshot {
    /// The buffered main descriptor.
    pub fd: OwnedFd,
    /// The decoded, validated structure.
    pub info: SnapshotInfo,
}

/// A decoder error: a failed read becomes the I/O failure it is (operation, path, offset);
/// anything else is a malformed stream at an offset.
fn stream_error(
    path: &Path,
    e: mapped_ram_core::stream::DecodeError<std::io::Error>,
) -> FormatError {
    let message = e.to_string();
    match e.kind {
        mapped_ram_core::stream::DecodeErrorKind::Source(source) => {
            IoFailure::new(Op::ReadStream, path, Some(e.offset), source).into()
        }
        _ => FormatError::Stream {
            path: path.to_path_buf(),
            message,
            offset: e.offset,
        },
    }
}

/// Opens and validates the snapshot at `path` whose stream starts at `offset`.
pub fn open_snapshot(path: &Path, offset: u64) -> Result<Snapshot, FormatError> {
    let fd =
        file::open(path, OFlags::RDONLY, 0).map_err(|e| IoFailure::new(Op::Open, path, None, e))?;
    let info = read_structure(fd.as_fd(), path, offset)?;
    Ok(Snapshot { fd, info })
}

/// The most RAM blocks a snapshot may hold: 4096.
///
/// QEMU registers a few RAM blocks per guest (`pc.ram`, ROMs, option ROMs, flash, one per
/// memory backend or DIMM — a few dozen even for large guests; its memory hotplug allows 256
/// slots). A file claiming more is refused with [`FormatError::Stream`] at the offset of the
/// first block record past the cap, before anything is held for it: without a cap a small file
/// of a million tiny blocks made `inspect` hold gigabytes of metadata.
pub const MAX_BLOCKS: usize = 4096;

pub(crate) fn read_structure(
    fd: BorrowedFd<'_>,
    path: &Path,
    offset: u64,
) -> Result<SnapshotInfo, FormatError> {
    let file_size = file::file_size(fd).map_err(|e| IoFailure::new(Op::Stat, path, None, e))?;
    let mut dec = Decoder::new(FdSource { fd }, offset);
    let config = dec.read_config().map_err(|e| stream_error(path, e))?;
    let ram = dec.read_ram_start().map_err(|e| stream_error(path, e))?;
    let mut blocks: Vec<BlockInfo> = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut last_data: Option<usize> = None;
    while let Some(rec) = dec.next_block().map_err(|e| stream_error(path, e))? {
        if blocks.len() >= MAX_BLOCKS {
            return Err(FormatError::Stream {
                path: path.into(),
                message: format!(
                    "at file offset {:#x}: more than {MAX_BLOCKS} RAM blocks (the most a snapshot may hold)",
                    rec.record_offset
                ),
                offset: rec.record_offset,
            });
        }
        let name = rec.name.as_str().to_string();
        if !names.insert(name.clone()) {
            return Err(FormatError::DuplicateBlock {
                path: path.into(),
                block: name,
                offset: rec.record_offset,
            });
        }
        let layout = rec.layout;
        if !layout.is_empty() {
            let bitmap_end = layout.bitmap_offset.saturating_add(layout.bitmap_size);
            if bitmap_end > file_size {
                return Err(FormatError::Truncated {
                    path: path.into(),
                    block: name,
                    what: "the page bitmap",
                    end: bitmap_end,
                    file_size,
                });
            }
            if layout.pages_end() > file_size {
                return Err(FormatError::Truncated {
                    path: path.into(),
                    block: name,
                    what: "the page region",
                    end: layout.pages_end(),
                    file_size,
                });
            }
            // The decoder hands out records in ascending file order, each after the previous
            // one's pages, so checking against the previous block with data is enough (and
            // keeps a file of a million tiny blocks linear, not quadratic).
            if let Some(other) = last_data.and_then(|i| blocks.get(i)) {
                let o = &other.layout;
                if layout.record_offset < o.pages_end() && o.record_offset < layout.pages_end() {
                    return Err(FormatError::Overlap {
                        path: path.into(),
                        block: name,
                        offset: layout.record_offset,
                        other: other.name.clone(),
                    });
                }
            }
        }
        if !layout.is_empty() {
            last_data = Some(blocks.len());
        }
        blocks.push(BlockInfo {
            name,
            layout,
            gpa: rec.gpa,
            bitmap: Vec::new(),
            guest_ranges: Vec::new(),
        });
    }
    let tail: Tail = dec.finish().map_err(|e| stream_error(path, e))?;
    if tail.first_device_record.is_none() {
        // QEMU always writes device state or at least QEMU_VM_EOF after the RAM END section.
        return Err(FormatError::Stream {
            path: path.into(),
            message: format!(
                "at file offset {:#x}: the file ends right after the RAM END section (no device state, no EOF marker); it is truncated",
                tail.device_state_offset
            ),
            offset: tail.device_state_offset,
        });
    }
    let dec_page_size = dec.page_size();
    // Bitmaps: bounded by the file size checked above, never by a bare number from the file.
    for block in &mut blocks {
        let layout = block.layout;
        if layout.is_empty() {
            continue;
        }
        let words = layout.bitmap_words() as usize;
        block.bitmap = vec![0u64; words];
        let mut bytes = vec![0u8; words * 8];
        file::read_exact_at(fd, &mut bytes, layout.bitmap_offset)
            .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(layout.bitmap_offset), e))?;
        bitmap::decode_le(&bytes, &mut block.bitmap).map_err(|e| FormatError::Stream {
            path: path.into(),
            message: e.to_string(),
            offset: layout.bitmap_offset,
        })?;
        let pages = layout.num_pages();
        let all = BitmapRef::new(&block.bitmap, words as u64 * 64)
            .map(|m| m.count_ones_in(pages..words as u64 * 64))
            .unwrap_or(0);
        if all != 0 {
            return Err(FormatError::StrayBits {
                path: path.into(),
                block: block.name.clone(),
                offset: layout.bitmap_offset,
            });
        }
    }
    let layouts: Vec<BlockLayout> = blocks.iter().map(|b| b.layout).collect();
    let integrity = integrity::locate(
        fd,
        path,
        &StreamShape {
            file_size,
            stream_start: offset,
            first_record: ram.first_record_offset,
            layouts: &layouts,
            page_size: dec_page_size,
            device_stream_start: tail.device_stream_start,
            device_state_offset: tail.device_state_offset,
        },
    )?;
    let capabilities = Capabilities::FILE_LISTED
        .iter_qapi_order()
        .filter(|c| config.capabilities.contains(*c))
        .filter_map(|c| c.qemu_name())
        .map(str::to_string)
        .collect();
    let mut device_state_given = None;
    if let Some((at, len)) = integrity.and_then(|i| i.extension) {
        // Bounded: the extension lies inside the file (checked by `locate`).
        let mut body = vec![0u8; len as usize];
        file::read_exact_at(fd, &mut body, at)
            .map_err(|e| IoFailure::new(Op::ReadStream, path, Some(at), e))?;
        let ext = integrity::Extension::decode(&body, blocks.len()).ok_or_else(|| {
            FormatError::Integrity {
                path: path.to_path_buf(),
                offset: at,
                message: "the extension record is malformed".into(),
            }
        })?;
        device_state_given = Some(ext.device_state_given);
        for (block, ranges) in blocks.iter_mut().zip(ext.guest_ranges) {
            block.guest_ranges = ranges;
        }
    }
    Ok(SnapshotInfo {
        path: path.to_path_buf(),
        offset,
        file_size,
        machine: config.machine.as_str().to_string(),
        capabilities,
        ram_section_id: ram.section_id,
        total_ram: ram.total_ram,
        blocks,
        device_stream_start: tail.device_stream_start,
        device_state_offset: tail.device_state_offset,
        integrity,
        device_state_given,
    })
}

/// Reads and validates the snapshot's structure (headers and bitmaps, no page data).
pub fn inspect(path: &Path, offset: u64) -> Result<SnapshotInfo, FormatError> {
    open_snapshot(path, offset).map(|s| s.info)
}

/// Returns the device state of a snapshot: the bytes from the first record after the RAM END
/// section to the end of the file, or to the checksum table of a file that has one (QEMU's
/// non-iterative device sections, `QEMU_VM_EOF` and the vmdesc JSON). Pass them as [`crate::SaveOptions::device_state`] to write a file that QEMU
/// loads into a guest of the same shape.
pub fn read_device_state(path: &Path, offset: u64) -> Result<Vec<u8>, FormatError> {
    let snap = open_snapshot(path, offset)?;
    device_state_of(snap.fd.as_fd(), path, &snap.info)
}

/// The device state of the validated snapshot open on `fd` (see [`read_device_state`]).
pub(crate) fn device_state_of(
    fd: BorrowedFd<'_>,
    path: &Path,
    info: &SnapshotInfo,
) -> Result<Vec<u8>, FormatError> {
    let (start, len) = info.device_state_range();
    let fail = |e| IoFailure::new(Op::ReadDeviceState, path, Some(start), e);
    let mut buf = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| buf.try_reserve_exact(n).ok().map(|()| n))
        .map(|n| buf.resize(n, 0))
        .ok_or_else(|| {
            fail(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("{len} bytes of device state do not fit in memory (stream them with DeviceStateReader)"),
            ))
        })?;
    file::read_exact_at(fd, &mut buf, start).map_err(fail)?;
    Ok(buf)
}

/// The device state of a snapshot (the bytes [`read_device_state`] returns) as a [`Read`]er,
/// for copying it anywhere with a buffer of any size: memory does not grow with the device
/// state.
///
/// ```no_run
/// let mut state = mapped_ram_linux::DeviceStateReader::open("vm.mr".as_ref(), 0)?;
/// let mut out = std::fs::File::create("vm.devstate")?;
/// std::io::copy(&mut state, &mut out)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`Read`]: std::io::Read
#[derive(Debug)]
pub struct DeviceStateReader {
    fd: OwnedFd,
    start: u64,
    len: u64,
    pos: u64,
}

impl DeviceStateReader {
    /// Opens and validates the snapshot at `path` (stream at `offset`), positioned at the
    /// start of its device state.
    pub fn open(path: &Path, offset: u64) -> Result<Self, FormatError> {
        let snap = open_snapshot(path, offset)?;
        let (start, len) = snap.info.device_state_range();
        Ok(DeviceStateReader {
            fd: snap.fd,
            start,
            len,
            pos: 0,
        })
    }

    /// File offset of the first byte of the device state.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Bytes of device state.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the device state is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// File offset of the next byte [`read`](std::io::Read::read) returns.
    pub fn file_offset(&self) -> u64 {
        self.start + self.pos
    }
}

impl std::io::Read for DeviceStateReader {
    /// Reads the next bytes; a file that became shorter than the device state it had when it
    /// was opened is an [`UnexpectedEof`](std::io::ErrorKind::UnexpectedEof) error.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.len - self.pos).min(buf.len() as u64) as usize;
        let Some(buf) = buf.get_mut(..want).filter(|b| !b.is_empty()) else {
            return Ok(0);
        };
        let n = file::pread_some(self.fd.as_fd(), buf, self.file_offset())?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends at {:#x}, before the end of its device state at {:#x} (truncated while it was read)",
                    self.file_offset(),
                    self.start + self.len
                ),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}
