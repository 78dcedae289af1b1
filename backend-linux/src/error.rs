//! Error types: one small enum per operation, each naming what failed and where.
//!
//! Every I/O failure carries the operation, the path and — where it has one — the absolute
//! file offset, so a message like `write of page data to /snap/vm.mr at offset 0x2300000: No
//! space left on device` tells an operator exactly what happened.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The system operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `open(2)` of a snapshot, RAM or temporary file.
    Open,
    /// `openat(2)` with `O_DIRECT`.
    OpenDirect,
    /// `pwritev(2)` of page data on a channel.
    WritePages,
    /// `pwrite(2)` of stream records, headers or the device state on the main descriptor.
    WriteStream,
    /// `pwrite(2)` of a page bitmap on the main descriptor.
    WriteBitmap,
    /// `preadv(2)` of page data on a channel.
    ReadPages,
    /// `pread(2)` of the stream, a header or a bitmap.
    ReadStream,
    /// `fdatasync(2)` / `fsync(2)` of the snapshot.
    Sync,
    /// `fsync(2)` of the directory after the rename.
    SyncDir,
    /// `renameat(2)` of the temporary file over the target.
    Rename,
    /// `ftruncate(2)` / `fallocate(2)`.
    Truncate,
    /// `fstat(2)` / `fstatfs(2)`.
    Stat,
    /// `mmap(2)` of a RAM file.
    Map,
    /// Reading a device-state file.
    ReadDeviceState,
    /// Removing a stale temporary file.
    Remove,
    /// `pwrite(2)` of the page checksum table or its records (see [`crate::integrity`]).
    WriteChecksums,
    /// `fallocate(2)` of a page region before `O_DIRECT` writes
    /// (see [`crate::SaveOptions::preallocate`]).
    Allocate,
    /// `fallocate(2)` with `FALLOC_FL_PUNCH_HOLE`: a run of zero pages made a hole again.
    Punch,
    /// `lseek(2)` with `SEEK_DATA` / `SEEK_HOLE`.
    Seek,
    /// `copy_file_range(2)` of an old snapshot's data into the new file.
    CopyRange,
    /// `ioctl(FICLONE)`: a reflink copy of an old snapshot.
    Clone,
    /// `flock(2)` of a temporary file.
    Lock,
    /// Reading guest memory from a RAM file (`pread(2)`).
    ReadMemory,
    /// Writing restored guest memory to a RAM file (`pwrite(2)`).
    WriteMemory,
    /// `posix_fadvise(2)` of a snapshot (dropping its pages from the page cache).
    Advise,
    /// An object-store `PUT` (an object of a snapshot, or its manifest).
    StorePut,
    /// An object-store `GET` (a ranged read of an object, or the manifest).
    StoreGet,
    /// An object-store `HEAD`.
    StoreHead,
    /// An object-store listing (`GET` of a bucket with a prefix).
    StoreList,
    /// An object-store `DELETE` (one object, or a bulk delete).
    StoreDelete,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::OpenDirect => "open with O_DIRECT",
            Op::WritePages => "write of page data",
            Op::WriteStream => "write of stream records",
            Op::WriteBitmap => "write of a page bitmap",
            Op::ReadPages => "read of page data",
            Op::ReadStream => "read of stream records",
            Op::Sync => "fdatasync",
            Op::SyncDir => "fsync of the directory",
            Op::Rename => "rename over the target",
            Op::Truncate => "truncate",
            Op::Stat => "stat",
            Op::Map => "mmap",
            Op::ReadDeviceState => "read of the device state",
            Op::Remove => "removal",
            Op::WriteChecksums => "write of page checksums",
            Op::Allocate => "fallocate of page space",
            Op::Punch => "hole punch",
            Op::Seek => "seek for data or holes",
            Op::CopyRange => "copy_file_range",
            Op::Clone => "reflink clone",
            Op::Lock => "flock",
            Op::ReadMemory => "read of guest memory",
            Op::WriteMemory => "write of guest memory",
            Op::Advise => "posix_fadvise",
            Op::StorePut => "object-store PUT",
            Op::StoreGet => "object-store GET",
            Op::StoreHead => "object-store HEAD",
            Op::StoreList => "object-store listing",
            Op::StoreDelete => "object-store DELETE",
        })
    }
}

/// A failed system call, with what it was doing and where.
#[derive(Debug)]
pub struct IoFailure {
    /// What was being done.
    pub op: Op,
    /// The file it was done to.
    pub path: PathBuf,
    /// Absolute file offset, where the operation has one.
    pub offset: Option<u64>,
    /// The error the kernel returned.
    pub source: io::Error,
}

impl IoFailure {
    /// Builds a failure record.
    pub fn new(op: Op, path: impl Into<PathBuf>, offset: Option<u64>, source: io::Error) -> Self {
        Self {
            op,
            path: path.into(),
            offset,
            source,
        }
    }

    /// The `errno` of the failure, if it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.op, self.path.display())?;
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset:#x}")?;
        }
        write!(f, ": {}", self.source)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A guest RAM region that cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// More regions than a snapshot may hold ([`crate::MAX_BLOCKS`]).
    #[error("more than {max} regions given (a snapshot holds at most {max} blocks)")]
    TooMany {
        /// Regions given.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// The block name is empty or longer than 255 bytes.
    #[error("block name {name:?} must be 1 to 255 bytes long")]
    BadName {
        /// The name.
        name: String,
    },
    /// Two regions have the same name.
    #[error("block {name:?} is given twice")]
    Duplicate {
        /// The name.
        name: String,
    },
    /// The page size is not a power of two of at least 4096.
    #[error("block {name:?}: page size {page_size} is not a power of two >= 4096")]
    BadPageSize {
        /// The block.
        name: String,
        /// The page size.
        page_size: u64,
    },
    /// The region length is not a multiple of the page size.
    #[error("block {name:?}: length {length} is not a multiple of the page size {page_size}")]
    NotPageMultiple {
        /// The block.
        name: String,
        /// The length.
        length: u64,
        /// The page size.
        page_size: u64,
    },
    /// Regions of different page sizes in one snapshot.
    #[error("block {name:?}: page size {page_size} differs from the first block's {expected}")]
    MixedPageSizes {
        /// The block.
        name: String,
        /// Its page size.
        page_size: u64,
        /// The page size of the first block.
        expected: u64,
    },
}

/// A region that does not fit the snapshot's block of the same name (restore, lazy restore,
/// update and verify match blocks the same way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockMismatch {
    /// The snapshot holds no block of that name.
    #[error("block {name:?} is not in the snapshot (it holds: {available})")]
    Unknown {
        /// The region's name.
        name: String,
        /// The snapshot's block names.
        available: String,
    },
    /// The block's length differs from the region's.
    #[error("block {name:?}: the snapshot holds {file_length} bytes but the memory given has {region_length}")]
    Length {
        /// The block.
        name: String,
        /// Length in the snapshot.
        file_length: u64,
        /// Length of the region.
        region_length: u64,
    },
    /// The block's page size differs from the region's.
    #[error(
        "block {name:?}: the snapshot's page size is {file} but the memory given has {region}"
    )]
    PageSize {
        /// The block.
        name: String,
        /// Page size in the file.
        file: u64,
        /// Page size of the region.
        region: u64,
    },
    /// The block has no page region in the file (`x-ignore-shared`).
    #[error("block {name:?} has no pages in the snapshot (x-ignore-shared)")]
    NoPages {
        /// The block.
        name: String,
    },
    /// The operation needs every block and these were not given.
    #[error("the snapshot also holds block(s) {names} that no region names (give every block)")]
    Missing {
        /// The blocks' names.
        names: String,
    },
}

/// Options or arguments that cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// The channel count is outside 1..=255.
    #[error("channels must be between 1 and 255, not {0}")]
    Channels(usize),
    /// The chunk size is not a positive multiple of the page size.
    #[error("chunk size {chunk_bytes} is not a multiple of the page size {page_size}")]
    ChunkSize {
        /// The chunk size asked for.
        chunk_bytes: u64,
        /// The regions' page size.
        page_size: u64,
    },
    /// The machine name cannot be written in the configuration section.
    #[error("machine name {machine:?}: {reason}")]
    Machine {
        /// The name.
        machine: String,
        /// Why not.
        reason: String,
    },
    /// The number of dirty logs differs from the number of blocks.
    #[error("{logs} dirty logs for {blocks} blocks (give one per block, in block order)")]
    DirtyLogCount {
        /// Logs given.
        logs: usize,
        /// Blocks of the save.
        blocks: usize,
    },
    /// A block has no dirty log: every pass needs one per block, so that a forgotten log
    /// cannot silently leave stale pages in the snapshot.
    #[error("no dirty log is given for block {block:?} (give one per block; an empty bitmap if nothing changed)")]
    MissingDirtyLog {
        /// The block.
        block: String,
    },
    /// KVM dirty logs were given to a save that tracks only `vm-memory`'s bitmaps, or the
    /// other way round.
    #[error("{0}")]
    DirtyTracking(String),
    /// A dirty log names a block that is not being saved.
    #[error("a dirty log is given for block {block:?}, which this save does not hold")]
    UnknownDirtyBlock {
        /// The block named.
        block: String,
    },
    /// A dirty log is given twice for one block.
    #[error("two dirty logs are given for block {block:?}")]
    DuplicateDirtyBlock {
        /// The block.
        block: String,
    },
    /// A dirty log is too short for its block.
    #[error("the dirty log of block {block:?} has {words} words; its {pages} pages need {needed}")]
    DirtyLogTooShort {
        /// The block.
        block: String,
        /// Words given.
        words: usize,
        /// Pages of the block.
        pages: u64,
        /// Words needed.
        needed: u64,
    },
    /// The number of guest memory regions differs from the number of names given for them.
    #[error("{names} block names for {regions} guest memory regions")]
    RegionNames {
        /// Names given.
        names: usize,
        /// Regions of the guest memory.
        regions: usize,
    },
    /// A guest memory region's dirty bitmap does not cover its pages.
    #[error("the guest region at {address:#x} has no dirty bitmap of one bit for each of its {pages} pages ({bits} bits): it cannot tell what changed (use DirtyTracking::VmMemoryAndKvm with KVM's logs)")]
    RegionBitmap {
        /// The region's guest address.
        address: u64,
        /// Bits of its bitmap.
        bits: usize,
        /// Its pages.
        pages: u64,
    },
    /// Guest memory for a restore could not be set up (`vm-memory`).
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// A block is too large to map into this process.
    #[error("block {block:?} is too large to map")]
    TooLargeToMap {
        /// The block.
        block: String,
    },
    /// A block cannot be mapped (page size or offset not a multiple of the host's page size,
    /// or no pages in the file).
    #[error("block {block:?} cannot be mapped: {reason}")]
    NotMappable {
        /// The block.
        block: String,
        /// Why not.
        reason: String,
    },
}

/// Why a save failed. The previous snapshot at the target path is always left as it was, and
/// the caller's guest memory is only ever read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaveError {
    /// An operating-system call failed.
    #[error("{0}")]
    Io(#[from] IoFailure),
    /// Direct I/O was required ([`crate::DirectIo::On`]) and the file system refused `O_DIRECT`.
    #[error("direct I/O is required but {filesystem} refused O_DIRECT for {path}: {source}")]
    DirectIoRefused {
        /// The snapshot file.
        path: PathBuf,
        /// The file system type, as far as it could be named.
        filesystem: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// A RAM region cannot be saved as given.
    #[error("{0}")]
    Region(#[from] RegionError),
    /// The options are invalid (channel count, chunk size, machine name, dirty logs, ...).
    #[error("invalid save options: {0}")]
    Options(#[from] OptionError),
    /// The layout of the file would not fit in 64-bit offsets.
    #[error("layout: {0}")]
    Layout(#[from] mapped_ram_core::layout::LayoutError),
    /// The channel schedule could not be built (an internal inconsistency).
    #[error("schedule: {0}")]
    Schedule(#[from] mapped_ram_core::schedule::ScheduleError),
    /// A page bitmap could not be built (an internal inconsistency).
    #[error("bitmap: {0}")]
    Bitmap(#[from] mapped_ram_core::bitmap::BitmapError),
    /// The caller cancelled the save.
    #[error("save cancelled")]
    Cancelled,
}

/// What a failed restore did to guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemoryState {
    /// No byte of guest memory was written.
    Untouched,
    /// These blocks may have been partly written; the others were not touched.
    Modified {
        /// Names of the blocks whose memory was written to.
        blocks: Vec<String>,
    },
}

impl fmt::Display for GuestMemoryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestMemoryState::Untouched => f.write_str("guest memory untouched"),
            GuestMemoryState::Modified { blocks } => {
                write!(
                    f,
                    "guest memory partly written in block(s) {}",
                    blocks.join(", ")
                )
            }
        }
    }
}

/// Why a snapshot file cannot be read (restore, inspect, verify).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// An operating-system call failed.
    #[error("{0}")]
    Io(#[from] IoFailure),
    /// The stream is malformed; the message names the file offset.
    #[error("{path}: {message}")]
    Stream {
        /// The snapshot.
        path: PathBuf,
        /// The decoder's description, with the file offset.
        message: String,
        /// The absolute file offset of what was rejected.
        offset: u64,
    },
    /// A block's page region or bitmap lies past the end of the file.
    #[error("{path}: block {block:?}: {what} ends at {end:#x}, past the end of the file ({file_size:#x} bytes); the file is truncated")]
    Truncated {
        /// The snapshot.
        path: PathBuf,
        /// The block.
        block: String,
        /// What lies past the end.
        what: &'static str,
        /// Where it ends.
        end: u64,
        /// The file size.
        file_size: u64,
    },
    /// Two blocks' regions overlap.
    #[error("{path}: block {block:?} at {offset:#x} overlaps block {other:?}")]
    Overlap {
        /// The snapshot.
        path: PathBuf,
        /// The later block.
        block: String,
        /// Its record offset.
        offset: u64,
        /// The block it overlaps.
        other: String,
    },
    /// The same block name appears twice.
    #[error("{path}: block {block:?} appears twice (second at {offset:#x})")]
    DuplicateBlock {
        /// The snapshot.
        path: PathBuf,
        /// The block.
        block: String,
        /// Offset of the second record.
        offset: u64,
    },
    /// The page checksums' records or the metadata checksum do not match the file (see
    /// [`crate::integrity`]): the file was damaged, truncated or changed after the save.
    #[error("{path}: at offset {offset:#x}: {message}")]
    Integrity {
        /// The snapshot.
        path: PathBuf,
        /// Absolute offset of the record or range that failed.
        offset: u64,
        /// What failed.
        message: String,
    },
    /// Bits set past the block's last page.
    #[error(
        "{path}: block {block:?}: bitmap at {offset:#x} marks pages past the end of the block"
    )]
    StrayBits {
        /// The snapshot.
        path: PathBuf,
        /// The block.
        block: String,
        /// The bitmap offset.
        offset: u64,
    },
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreErrorKind {
    /// The snapshot is unreadable or malformed.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// An operating-system call failed.
    #[error("{0}")]
    Io(#[from] IoFailure),
    /// A region does not fit the snapshot's block.
    #[error("{0}")]
    Block(#[from] BlockMismatch),
    /// A region is invalid.
    #[error("{0}")]
    Region(#[from] RegionError),
    /// Direct I/O was required ([`crate::DirectIo::On`]) and the file system refused `O_DIRECT`.
    #[error("direct I/O is required but {filesystem} refused O_DIRECT for {path}: {source}")]
    DirectIoRefused {
        /// The snapshot.
        path: PathBuf,
        /// The file system type.
        filesystem: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The options are invalid.
    #[error("invalid restore options: {0}")]
    Options(#[from] OptionError),
    /// The schedule or a bitmap could not be built (an internal inconsistency).
    #[error("{0}")]
    Internal(String),
    /// A page read from the snapshot does not match its stored checksum
    /// ([`crate::RestoreOptions::verify_checksums`]).
    #[error("{path}: block {block:?} page {page} (file offset {file_offset:#x}) fails its checksum (stored {expected:#010x}, computed {actual:#010x}): the snapshot is damaged")]
    Checksum {
        /// The snapshot.
        path: PathBuf,
        /// The block.
        block: String,
        /// Page index within the block.
        page: u64,
        /// Absolute file offset of the page.
        file_offset: u64,
        /// The checksum stored in the file.
        expected: u32,
        /// The checksum of the bytes read.
        actual: u32,
    },
    /// The caller cancelled the restore.
    #[error("restore cancelled")]
    Cancelled,
}

/// A failed restore: what went wrong and exactly what it did to guest memory.
#[derive(Debug)]
pub struct RestoreError {
    /// What went wrong.
    pub kind: RestoreErrorKind,
    /// Which guest memory was written before the failure.
    pub memory: GuestMemoryState,
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.memory)
    }
}

impl std::error::Error for RestoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

impl<E: Into<RestoreErrorKind>> From<E> for RestoreError {
    fn from(e: E) -> Self {
        RestoreError {
            kind: e.into(),
            memory: GuestMemoryState::Untouched,
        }
    }
}
