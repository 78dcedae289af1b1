//! One entry point for every kind of snapshot, the way Firecracker's `create_snapshot` takes a
//! `SnapshotType`: a full snapshot and a diff are one parameter, not two engines; and one for
//! every kind of restore ([`restore_snapshot`] with a [`RestoreMode`]: copy or map).
//!
//! ```no_run
//! use mapped_ram_linux::{create_snapshot, GuestMemory, Region, SaveOptions, SnapshotType};
//!
//! let ram = vec![0u8; 16 << 20];
//! let regions = [Region { name: "pc.ram", memory: GuestMemory::from_slice(&ram), page_size: 4096 }];
//! let path = std::path::Path::new("/var/tmp/guest.mr");
//! create_snapshot(path, &regions, SnapshotType::Full, &SaveOptions::default())?;
//! let dirty = vec![0u64; 64]; // KVM's dirty log since the snapshot
//! create_snapshot(path, &regions, SnapshotType::Diff(&[&dirty]), &SaveOptions::default())?;
//! # Ok::<(), mapped_ram_linux::UpdateError>(())
//! ```

use std::path::Path;

use crate::error::{RestoreError, SaveError};
use crate::lazy::{restore_lazy, LazyOptions, LazyRestore};
use crate::live::LiveRegion;
use crate::restore::{restore, RestoreOptions, RestoreRegion, RestoreReport};
use crate::save::{SaveOptions, SaveReport};
use crate::update::{update, Changes, UpdateError, UpdateOptions};

/// One guest RAM block: its id string, its memory (which may keep changing, see
/// [`crate::GuestMemory`]) and its target page size. The region type of [`create_snapshot`],
/// [`crate::LiveSave`] and [`crate::update()`].
pub type Region<'m> = LiveRegion<'m>;

/// What [`create_snapshot`] writes.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum SnapshotType<'d> {
    /// Every page of every region, into a new file that replaces whatever is at the path.
    Full,
    /// Only the pages marked in these dirty logs (one per region, in region order, KVM's
    /// dirty-log layout), into the snapshot already at the path (see [`crate::update()`]).
    Diff(&'d [&'d [u64]]),
    /// Only the pages that differ from the snapshot already at the path, found by comparing
    /// every page.
    Compare,
}

/// Writes a snapshot of `regions` to `path`: a full one, or the changes since the snapshot at
/// `path` (written into a copy that replaces it atomically). The previous snapshot is kept
/// whole until the new one is durable.
pub fn create_snapshot(
    path: &Path,
    regions: &[Region<'_>],
    kind: SnapshotType<'_>,
    opts: &SaveOptions,
) -> Result<SaveReport, UpdateError> {
    let changes = match kind {
        SnapshotType::Full => return Ok(crate::save::save_memory(path, regions, opts, None)?),
        SnapshotType::Diff(logs) => Changes::Dirty(logs),
        SnapshotType::Compare => Changes::Compare,
    };
    let u = update(
        path,
        regions,
        changes,
        &UpdateOptions {
            save: opts.clone(),
            ..UpdateOptions::default()
        },
    )?;
    let file_size = std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| SaveError::Io(crate::IoFailure::new(crate::Op::Stat, path, None, e)))?;
    Ok(SaveReport {
        path: u.path,
        ram_bytes: regions.iter().map(|r| r.memory.len() as u64).sum(),
        data_bytes: u.data_bytes,
        pages: u.pages,
        pages_stored: u.pages_stored,
        zero_pages: u.pages - u.pages_stored,
        writes: u.writes,
        seconds: u.seconds,
        direct_io: u.direct_io,
        direct_io_fallback: None,
        channels: u.channels,
        file_size,
        stale_temporaries_removed: u.stale_temporaries_removed,
        checksums: u.checksums,
    })
}

/// How [`restore_snapshot`] brings a snapshot back.
#[derive(Debug)]
#[non_exhaustive]
pub enum RestoreMode<'r, 'm> {
    /// Read every stored page into the caller's memory ([`crate::restore()`]).
    Copy(&'r mut [RestoreRegion<'m>]),
    /// Map the named blocks (all blocks with pages when empty) from the file, read on first
    /// touch ([`crate::restore_lazy()`]); `RestoreOptions::channels` threads check clear pages.
    Lazy(&'r [&'r str]),
}

/// What [`restore_snapshot`] gives back.
#[derive(Debug)]
#[non_exhaustive]
pub enum Restored {
    /// The copy's report; the memory is the caller's.
    Copied(RestoreReport),
    /// The mapped blocks and the report.
    Mapped(LazyRestore),
}

/// Restores the snapshot at `path` as `mode` says (see [`RestoreMode`]).
///
/// ```no_run
/// use mapped_ram_linux::{restore_snapshot, RestoreMode, RestoreOptions, RestoreRegion};
///
/// let path = std::path::Path::new("/var/tmp/guest.mr");
/// let mut ram = vec![0u8; 16 << 20];
/// let mut regions = [RestoreRegion { name: "pc.ram", memory: &mut ram, page_size: 4096 }];
/// restore_snapshot(path, RestoreMode::Copy(&mut regions), &RestoreOptions::default())?;
/// let mapped = restore_snapshot(path, RestoreMode::Lazy(&["pc.ram"]), &RestoreOptions::default())?;
/// # let _ = mapped;
/// # Ok::<(), mapped_ram_linux::RestoreError>(())
/// ```
pub fn restore_snapshot(
    path: &Path,
    mode: RestoreMode<'_, '_>,
    opts: &RestoreOptions,
) -> Result<Restored, RestoreError> {
    match mode {
        RestoreMode::Copy(regions) => restore(path, regions, opts, None).map(Restored::Copied),
        RestoreMode::Lazy(names) => {
            let lazy = LazyOptions {
                offset: opts.offset,
                threads: opts.channels,
                ..LazyOptions::default()
            };
            restore_lazy(path, names, &lazy).map(Restored::Mapped)
        }
    }
}
