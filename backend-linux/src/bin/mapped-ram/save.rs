//! `mapped-ram save` (and `save --update`): RAM files → snapshot, a file or a store address.

use std::path::Path;

use serde_json::{json, Value};

use std::os::fd::AsFd;

use mapped_ram_linux::store::{StoreError, StoreSaveReport, StoreUrl};
use mapped_ram_linux::{
    default_channels, save_memory, update, Changes, DirectIo, GuestMemory, LiveRegion, MappedFile,
    SaveError, SaveOptions, SaveReport, UpdateError, UpdateOptions, MAX_BLOCKS,
};

use crate::args::{Location, RamArg, SaveArgs, MAX_DEVICE_STATE, MAX_NEW_OFFSET};
use crate::files::{identity, kind, read_regular_bounded, require_regular};
use crate::output::{object_size, save_json, store_save_json, with_progress, CliError};
use crate::signals::Interrupts;
use crate::store;

/// Opens a RAM file for a save: it is read with `pread(2)` (see
/// [`GuestMemory::from_file`]), so another process may keep writing it, and a file that
/// shrinks during the save is an error naming it, never `SIGBUS`. An empty file is an error.
pub fn open_ram(ram: &RamArg) -> Result<(std::fs::File, usize), CliError> {
    require_regular(&ram.path, "RAM file")
        .map_err(|e| CliError::new(format!("{} (block {:?})", e.message, ram.name)))?;
    let fail = |e: std::io::Error| {
        CliError::new(format!(
            "RAM file {} for block {:?}: {e}",
            ram.path.display(),
            ram.name
        ))
    };
    let file = std::fs::File::open(&ram.path).map_err(fail)?;
    let len = file.metadata().map_err(fail)?.len();
    let len = usize::try_from(len).map_err(|_| fail(std::io::Error::other("file too large")))?;
    if len == 0 {
        return Err(CliError::new(format!(
            "RAM file {} for block {:?} is empty",
            ram.path.display(),
            ram.name
        )));
    }
    Ok((file, len))
}

/// Maps a RAM file read-only (for verify, which compares it with the snapshot, and for
/// `save --map-ram`); an empty file is an error.
pub fn map_ram(ram: &RamArg) -> Result<MappedFile, CliError> {
    require_regular(&ram.path, "RAM file")
        .map_err(|e| CliError::new(format!("{} (block {:?})", e.message, ram.name)))?;
    // SAFETY: the RAM files given to `verify` and `save --map-ram` are those of a stopped
    // guest, which the user promises no one changes or truncates meanwhile (README, the
    // flags' help); a file truncated anyway ends the process with SIGBUS, as documented.
    let map = unsafe { MappedFile::open_readonly(&ram.path) }.map_err(|e| {
        CliError::new(format!(
            "RAM file {} for block {:?}: {e}",
            ram.path.display(),
            ram.name
        ))
    })?;
    if map.is_empty() {
        return Err(CliError::new(format!(
            "RAM file {} for block {:?} is empty",
            ram.path.display(),
            ram.name
        )));
    }
    Ok(map)
}

/// At most [`MAX_BLOCKS`] blocks, each name once.
pub fn check_block_names(ram: &[RamArg]) -> Result<(), CliError> {
    if ram.len() > MAX_BLOCKS {
        return Err(CliError::new(format!(
            "{} --ram blocks given; a snapshot holds at most {MAX_BLOCKS}",
            ram.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for r in ram {
        if !seen.insert(r.name.as_str()) {
            return Err(CliError::new(format!(
                "block {:?} is given twice with --ram",
                r.name
            )));
        }
    }
    Ok(())
}

/// The target must be new, or a regular file that is none of the RAM files (under any of its
/// names: symlinks and hard links are compared by device and inode); a prefix larger than
/// [`MAX_NEW_OFFSET`] must already be in it. Checked before anything is written.
fn check_target(a: &SaveArgs, out: &Path) -> Result<(), CliError> {
    let existing = match std::fs::metadata(out) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(CliError::new(format!("snapshot {}: {e}", out.display()))),
    };
    if let Some(m) = &existing {
        if !m.file_type().is_file() {
            return Err(CliError::new(format!(
                "snapshot {} is {}: refusing to replace it with a regular file",
                out.display(),
                kind(m)
            )));
        }
        let target = identity(out, "snapshot")?;
        for ram in &a.ram {
            if identity(&ram.path, "RAM file")? == target {
                return Err(CliError::new(format!(
                    "snapshot {} is the RAM file {} of block {:?}: refusing to replace the RAM with the snapshot",
                    out.display(),
                    ram.path.display(),
                    ram.name
                )));
            }
        }
    }
    let offset = a.common.offset;
    if offset > MAX_NEW_OFFSET {
        let have = existing.as_ref().map_or(0, |m| m.len());
        if have < offset {
            return Err(CliError::new(format!(
                "snapshot {}: offset {offset} is larger than {MAX_NEW_OFFSET} bytes and the target holds only {have} bytes of prefix (a larger prefix is kept from an existing target, never written as zeros)",
                out.display()
            )));
        }
    }
    Ok(())
}

/// The flags of a save to a store that apply only to a file: usage errors before anything is
/// read or sent.
fn check_store_flags(a: &SaveArgs, url: &StoreUrl) -> Result<(), CliError> {
    store::reject_file_flags(
        url,
        &[
            (a.update, "--update", "a store save always uploads a whole new generation (its unchanged objects are not compared)"),
            (a.common.offset != 0, "--offset", "a store snapshot has no prefix before its stream (put a file that has one)"),
            (a.common.direct_io == DirectIo::On, "--direct-io on", "a store save writes no local file"),
            (a.common.chunk_bytes.is_some(), "--chunk-bytes", "a store save works one object at a time (see --object-size)"),
            (a.write_gap_pages.is_some(), "--write-gap-pages", "a store save uploads whole objects"),
            (a.no_fsync, "--no-fsync", "a store save writes no local file"),
            (a.no_preallocate, "--no-preallocate", "a store save writes no local file"),
        ],
    )
}

/// Runs `save`.
pub fn cmd_save(a: SaveArgs, json: bool, sig: &Interrupts) -> Result<Value, CliError> {
    match &a.output {
        Location::Store(url) => check_store_flags(&a, url)?,
        Location::File(out) => {
            store::reject_store_flags(
                &out.display().to_string(),
                &a.store,
                Some(&a.store_write),
                None,
            )?;
        }
    }
    check_block_names(&a.ram)?;
    if let Location::File(out) = &a.output {
        check_target(&a, out)?;
    }
    let files = a.ram.iter().map(open_ram).collect::<Result<Vec<_>, _>>()?;
    for (ram, (_, len)) in a.ram.iter().zip(&files) {
        if *len as u64 % a.common.page_size != 0 {
            return Err(CliError::new(format!(
                "RAM file {} for block {:?} is {} bytes, not a multiple of the page size {} (short or wrong file?)",
                ram.path.display(),
                ram.name,
                len,
                a.common.page_size
            )));
        }
    }
    // `--map-ram`: the operator promises the files do not change (see the flag's help).
    let maps = if a.map_ram && !a.update {
        a.ram.iter().map(map_ram).collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let regions: Vec<LiveRegion<'_>> = a
        .ram
        .iter()
        .zip(&files)
        .enumerate()
        .map(|(i, (r, (f, len)))| LiveRegion {
            name: &r.name,
            memory: match maps.get(i) {
                Some(m) => GuestMemory::from_slice(m.as_slice()),
                None => GuestMemory::from_file(f.as_fd(), 0, *len),
            },
            page_size: a.common.page_size,
        })
        .collect();
    let device_state = match &a.device_state {
        Some(p) => Some(read_regular_bounded(
            p,
            MAX_DEVICE_STATE,
            "device-state file",
        )?),
        None => None,
    };
    let mut opts = SaveOptions {
        channels: a.common.channels.unwrap_or_else(default_channels),
        direct_io: a.common.direct_io,
        zero_pages: a.zero_pages,
        machine: a.machine.clone(),
        device_state,
        offset: a.common.offset,
        fsync: !a.no_fsync,
        chunk_bytes: a
            .common
            .chunk_bytes
            .unwrap_or(SaveOptions::default().chunk_bytes),
        max_gap_pages: a
            .write_gap_pages
            .unwrap_or(SaveOptions::default().max_gap_pages),
        checksums: a.checksums,
        preallocate: !a.no_preallocate,
        ..SaveOptions::default()
    };
    let output = match &a.output {
        Location::Store(url) => return save_to_store(&a, url, &regions, opts, json, sig),
        Location::File(out) => out,
    };
    let armed = sig.arm();
    opts.cancel = Some(armed.cancel());
    if a.update {
        let result = save_update(output, &regions, opts, json);
        drop(armed);
        return sig.outcome(
            result,
            &format!("update of {}", output.display()),
            &kept(output),
        );
    }
    let result = with_progress(json, "save", sig, |cb| {
        save_memory(output, &regions, &opts, Some(cb))
    });
    drop(armed);
    let result = result.map_err(|e| CliError {
        cancelled: matches!(e, SaveError::Cancelled),
        ..CliError::from(e)
    });
    let report = sig.outcome(
        result,
        &format!("save of {}", output.display()),
        &kept(output),
    )?;
    if !json {
        print_save(&report);
    }
    Ok(save_json(&report))
}

/// What a cancelled local save or update of `output` left.
fn kept(output: &Path) -> String {
    format!(
        "the temporary file was removed and {} was left as it was",
        output.display()
    )
}

/// A save to a store ([`Store::save_memory`](mapped_ram_linux::store::Store::save_memory)):
/// the same regions and options as a local save; the store's channels and object size.
fn save_to_store(
    a: &SaveArgs,
    url: &StoreUrl,
    regions: &[LiveRegion<'_>],
    mut opts: SaveOptions,
    json: bool,
    sig: &Interrupts,
) -> Result<Value, CliError> {
    let store_opts = store::options(a.common.channels, &a.store, Some(&a.store_write));
    let object_bytes = store_opts.object_bytes;
    let store = store::connect(url, store_opts)?;
    let armed = sig.arm();
    opts.cancel = Some(armed.cancel());
    let result = with_progress(json, "save", sig, |cb| {
        store.save_memory(regions, &opts, Some(cb))
    });
    drop(armed);
    let result = result.map_err(|e| CliError {
        cancelled: matches!(e, StoreError::Save(SaveError::Cancelled)),
        ..CliError::from(e)
    });
    let url = url.display();
    let report = sig.outcome(
        result,
        &format!("save of {url}"),
        &format!("the objects it had uploaded were deleted and {url} was left as it was"),
    )?;
    if !json {
        print_save(&report.save);
        print_store_save(&report, object_bytes);
    }
    Ok(store_save_json(&report, object_bytes))
}

fn print_store_save(r: &StoreSaveReport, object_bytes: u64) {
    let mut deleted = String::new();
    if r.objects_deleted > 0 {
        deleted = format!(
            "; {} object(s) of older generations deleted",
            r.objects_deleted
        );
    }
    println!(
        "uploaded {} of {} objects of {} ({:.1} MiB) as generation {}{deleted}",
        r.objects_uploaded,
        r.objects_total,
        object_size(object_bytes),
        r.bytes_uploaded as f64 / (1u64 << 20) as f64,
        r.generation,
    );
}

fn print_save(r: &SaveReport) {
    if let Some(why) = &r.direct_io_fallback {
        eprintln!("note: {why}");
    }
    for p in &r.stale_temporaries_removed {
        eprintln!("note: removed stale temporary file {}", p.display());
    }
    println!(
        "saved {} ({:.1} MiB of RAM, {} of {} pages stored, {} zero) in {:.3} s: {:.2} GiB/s, {} channel(s), direct-io {}",
        r.path.display(),
        r.ram_bytes as f64 / (1u64 << 20) as f64,
        r.pages_stored,
        r.pages,
        r.zero_pages,
        r.seconds,
        r.gib_per_second(),
        r.channels,
        if r.direct_io { "on" } else { "off" }
    );
}

/// `save --update`: compares the RAM files with the snapshot and writes only the pages that
/// differ (see [`mapped_ram_linux::update()`]); returns the JSON report.
fn save_update(
    output: &Path,
    regions: &[LiveRegion<'_>],
    save: SaveOptions,
    json: bool,
) -> Result<Value, CliError> {
    if !output.exists() {
        return Err(CliError::new(format!(
            "{}: no snapshot to update (save without --update first)",
            output.display()
        )));
    }
    let live = regions;
    let opts = UpdateOptions {
        save,
        ..UpdateOptions::default()
    };
    let r = update(output, live, Changes::Compare, &opts).map_err(|e| CliError {
        cancelled: matches!(e, UpdateError::Save(SaveError::Cancelled)),
        ..CliError::from(e)
    })?;
    if !json {
        for p in &r.stale_temporaries_removed {
            eprintln!("note: removed stale temporary file {}", p.display());
        }
        if r.unchanged() {
            println!(
                "{}: up to date ({} pages compared, none differ)",
                output.display(),
                r.pages_compared
            );
        } else {
            println!(
                "updated {}: {} of {} pages differed ({} written, {} now zero), {:.1} MiB of page data written, {} copy of {:.1} MiB, in {:.3} s",
                output.display(),
                r.pages_changed,
                r.pages_compared,
                r.pages_written,
                r.zero_pages,
                r.data_bytes as f64 / f64::from(1u32 << 20),
                r.copy.as_str(),
                r.copy_bytes as f64 / f64::from(1u32 << 20),
                r.seconds
            );
        }
    }
    Ok(json!({
        "ok": true,
        "command": "save",
        "update": true,
        "path": r.path,
        "unchanged": r.unchanged(),
        "copy": r.copy.as_str(),
        "copy_bytes": r.copy_bytes,
        "pages": r.pages,
        "pages_compared": r.pages_compared,
        "pages_changed": r.pages_changed,
        "pages_written": r.pages_written,
        "zero_pages": r.zero_pages,
        "pages_punched": r.pages_punched,
        "data_bytes": r.data_bytes,
        "writes": r.writes,
        "pages_stored": r.pages_stored,
        "full_save_bytes": r.full_save_bytes,
        "checksums": r.checksums,
        "direct_io": r.direct_io,
        "channels": r.channels,
        "seconds": r.seconds,
    }))
}
