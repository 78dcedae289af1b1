//! # mapped-ram-linux
//!
//! Save and restore a virtual machine's guest RAM at disk speed, in QEMU's *mapped-ram* file
//! layout, on Linux.
//!
//! * [`save()`] writes guest memory regions to a snapshot file with N channel threads, each with
//!   its own descriptor (optionally `O_DIRECT`), issuing large `pwritev(2)` calls straight from
//!   guest memory. The file is a valid QEMU 10.0 migration stream that `qemu-system-*
//!   -incoming` loads with the `mapped-ram` capability.
//! * [`restore()`] reads a snapshot — ours or one QEMU wrote — back into guest memory with
//!   `preadv(2)`, after validating every header and bitmap.
//! * [`inspect()`] and [`verify()`] report and check a snapshot's structure and contents.
//!
//! The format logic (offsets, stream framing, bitmaps, scheduling) lives in the `no_std`
//! crate [`mapped_ram_core`]; this crate only does I/O, through one executor that every
//! operation drives (see `ARCHITECTURE.md`). Its `unsafe` code is confined, by
//! `#![deny(unsafe_code)]` at the crate root, to two modules: `sys` (file mappings and aligned
//! buffers) and [`mem`] (guest memory read while a guest runs, private mappings of lazy
//! restore).
//!
//! Beyond one-shot saves: [`LiveSave`] saves a running guest in passes of dirty pages
//! ([`live`]), [`update()`] brings an existing snapshot up to date with only the changed pages
//! ([`update`](mod@update)), [`restore_lazy()`] maps a snapshot instead of reading it ([`lazy`]),
//! and the `vm-memory` feature does all of it for rust-vmm's `GuestMemoryMmap`.
//!
//! ```no_run
//! use mapped_ram_linux::{restore, save, RestoreOptions, RestoreRegion, SaveOptions, SaveRegion};
//!
//! let ram = vec![7u8; 16 << 20];
//! let path = std::path::Path::new("/var/tmp/guest.mr");
//! save(path, &[SaveRegion { name: "pc.ram", memory: &ram, page_size: 4096 }],
//!      &SaveOptions::default(), None)?;
//! let mut back = vec![0u8; 16 << 20];
//! restore(path, &mut [RestoreRegion { name: "pc.ram", memory: &mut back, page_size: 4096 }],
//!         &RestoreOptions::default(), None)?;
//! assert_eq!(ram, back);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(
    clippy::undocumented_unsafe_blocks,
    clippy::multiple_unsafe_ops_per_block
)]

mod blocks;
mod commit;
mod error;
mod executor;
pub mod fault;
mod file;
mod inspect;
pub mod integrity;
pub mod lazy;
pub mod live;
#[allow(unsafe_code)]
pub mod mem;
mod plan;
mod progress;
mod restore;
mod save;
mod snapshot;
#[cfg(feature = "s3")]
pub mod store;
pub mod synthetic;
#[allow(unsafe_code)]
mod sys;
#[allow(unsafe_code)]
pub mod uffd;
pub mod update;
mod verify;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;
mod writer;
mod zero;

pub use error::{
    BlockMismatch, FormatError, GuestMemoryState, IoFailure, Op, OptionError, RegionError,
    RestoreError, RestoreErrorKind, SaveError,
};
pub use file::DirectIo;
pub use inspect::{
    inspect, read_device_state, BlockInfo, DeviceStateReader, Snapshot, SnapshotInfo, MAX_BLOCKS,
};
pub use lazy::{restore_lazy, LazyBlock, LazyOptions, LazyReport, LazyRestore};
pub use live::{DirtyLog, FinishedSave, LiveOptions, LiveRegion, LiveReport, LiveSave, PassReport};
pub use mem::{GuestMemory, PrivateMapping};
pub use progress::{Cancel, Progress, ProgressFn};
pub use restore::{
    restore, restore_from_fds, RestoreOptions, RestoreRegion, RestoreReport, DEFAULT_READ_GAP_PAGES,
};
pub use save::{
    default_channels, save, save_memory, save_to_fds, GuestRanges, SaveOptions, SaveRegion,
    SaveReport, ZeroPages, PUNCH_MIN_PAGES, RAM_SECTION_ID,
};
pub use snapshot::{
    create_snapshot, restore_snapshot, Region, RestoreMode, Restored, SnapshotType,
};
pub use synthetic::synthetic_image;
pub use sys::{populate_read, populate_write, AlignedBuf, MappedFile, DIRECT_IO_ALIGN};
pub use uffd::{
    restore_uffd, HugePages, UffdBlock, UffdOptions, UffdRestore, UffdStats, WorkingSet, HUGE_PAGE,
};
pub use update::{update, Changes, CopyMode, UpdateError, UpdateOptions, UpdateReport};
pub use verify::{verify, CorruptPage, Mismatch, VerifyError, VerifyReport};
pub use zero::is_zero;
