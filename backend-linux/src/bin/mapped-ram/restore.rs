//! `mapped-ram restore`: snapshot → RAM files.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use mapped_ram_linux::{
    default_channels, inspect, restore, MappedFile, Progress, RestoreOptions, RestoreRegion,
    RestoreReport,
};

use crate::args::RestoreArgs;
use crate::files::{identity, identity_of, open_or_create_private, require_regular, Identity};
use crate::output::{progress_bar, restore_json, CliError};
use crate::save::check_block_names;
use crate::signals::Interrupts;

/// Every RAM file must be its own file, and none the snapshot: two names of one file (the
/// same path twice, a symlink, a hard link) would get two blocks' pages interleaved.
fn check_distinct<'a>(
    snapshot: &Path,
    snapshot_id: &Identity,
    rams: impl Iterator<Item = (&'a str, &'a Path, Identity)>,
) -> Result<(), CliError> {
    let mut seen: HashMap<Identity, (&str, &Path)> = HashMap::new();
    for (name, path, id) in rams {
        if id == *snapshot_id {
            return Err(CliError::new(format!(
                "RAM file {} of block {name:?} is the snapshot {}: refusing to restore into the file being read",
                path.display(),
                snapshot.display()
            )));
        }
        if let Some((other, other_path)) = seen.insert(id, (name, path)) {
            return Err(CliError::new(format!(
                "RAM files {} (block {other:?}) and {} (block {name:?}) are the same file: each block needs its own RAM file",
                other_path.display(),
                path.display()
            )));
        }
    }
    Ok(())
}

/// Runs `restore`.
pub fn cmd_restore(a: RestoreArgs, json: bool, sig: &Interrupts) -> Result<Value, CliError> {
    check_block_names(&a.ram)?;
    require_regular(&a.file, "snapshot")?;
    let info = inspect(&a.file, a.common.offset)?;
    // Check every name before creating or sizing any RAM file.
    for ram in &a.ram {
        if info.block(&ram.name).is_none() {
            let names: Vec<&str> = info.blocks.iter().map(|b| b.name.as_str()).collect();
            return Err(CliError::new(format!(
                "block {:?} is not in the snapshot {} (it holds: {})",
                ram.name,
                a.file.display(),
                names.join(", ")
            )));
        }
    }
    for ram in &a.ram {
        if info.block(&ram.name).is_some_and(|b| b.layout.is_empty()) {
            return Err(CliError::new(format!(
                "block {:?} has no pages in the snapshot {} (a shared block skipped by x-ignore-shared): nothing to restore",
                ram.name,
                a.file.display()
            )));
        }
    }
    // Then that every RAM file is its own file, by name before creating any ...
    let snapshot_id = identity(&a.file, "snapshot")?;
    let ids = a
        .ram
        .iter()
        .map(|r| identity(&r.path, "RAM file"))
        .collect::<Result<Vec<_>, _>>()?;
    check_distinct(
        &a.file,
        &snapshot_id,
        a.ram
            .iter()
            .zip(ids)
            .map(|(r, id)| (r.name.as_str(), r.path.as_path(), id)),
    )?;
    // ... and again by the files opened (new files are created 0600, nothing is written yet).
    let files = a
        .ram
        .iter()
        .map(|ram| {
            open_or_create_private(&ram.path)
                .map_err(|e| CliError::new(format!("RAM file {}: {e}", ram.path.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ids = a
        .ram
        .iter()
        .zip(&files)
        .map(|(r, f)| identity_of(f, &r.path, "RAM file"))
        .collect::<Result<Vec<_>, _>>()?;
    check_distinct(
        &a.file,
        &snapshot_id,
        a.ram
            .iter()
            .zip(ids)
            .map(|(r, id)| (r.name.as_str(), r.path.as_path(), id)),
    )?;
    // Sizes: all checked before any file is sized.
    let mut sizes = Vec::with_capacity(a.ram.len());
    for (ram, f) in a.ram.iter().zip(&files) {
        let length = info.block(&ram.name).map(|b| b.layout.length).unwrap_or(0);
        let size = f
            .metadata()
            .map_err(|e| CliError::new(format!("RAM file {}: {e}", ram.path.display())))?
            .len();
        if size != 0 && size != length {
            return Err(CliError::new(format!(
                "block {:?}: the snapshot holds {length} bytes but RAM file {} has {size} (size mismatch; give an empty or new file)",
                ram.name,
                ram.path.display()
            )));
        }
        sizes.push((length, size));
    }
    let all_fresh = sizes.iter().all(|&(_, size)| size == 0);
    let mut maps = Vec::with_capacity(a.ram.len());
    for ((ram, f), &(length, size)) in a.ram.iter().zip(&files).zip(&sizes) {
        if size == 0 {
            f.set_len(length)
                .map_err(|e| CliError::new(format!("RAM file {}: {e}", ram.path.display())))?;
        }
        // Space for every page up front: a full file system is ENOSPC here, naming the file,
        // instead of SIGBUS on the first write into the mapping. (EOPNOTSUPP: the file system
        // cannot reserve space; then writes find it or fail as they would anyway.)
        match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, 0, length) {
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => {
                return Err(CliError::new(format!(
                    "RAM file {} for block {:?}: reserving {length} bytes: {}",
                    ram.path.display(),
                    ram.name,
                    std::io::Error::from_raw_os_error(e.raw_os_error())
                )))
            }
        }
        // SAFETY: the file was just sized and its space reserved; the restore is its only
        // writer, and the CLI contract (README, `restore`) is that nobody else changes or
        // truncates the RAM files while a restore writes them.
        let map = unsafe { MappedFile::map(f, length as usize, true) }
            .map_err(|e| CliError::new(format!("mmap of RAM file {}: {e}", ram.path.display())))?;
        maps.push(map);
    }
    let mut regions: Vec<RestoreRegion<'_>> = a
        .ram
        .iter()
        .zip(maps.iter_mut())
        .map(|(r, m)| RestoreRegion {
            name: &r.name,
            memory: m.as_mut_slice().unwrap_or_default(),
            page_size: a.common.page_size,
        })
        .collect();
    let mut opts = RestoreOptions {
        channels: a.common.channels.unwrap_or_else(default_channels),
        direct_io: a.common.direct_io,
        offset: a.common.offset,
        memory_is_zeroed: all_fresh,
        chunk_bytes: a
            .common
            .chunk_bytes
            .unwrap_or(RestoreOptions::default().chunk_bytes),
        max_gap_pages: a
            .read_gap_pages
            .unwrap_or(RestoreOptions::default().max_gap_pages),
        verify_checksums: a.verify_checksums,
        populate: !a.no_populate,
        ..RestoreOptions::default()
    };
    let armed = sig.arm();
    opts.cancel = Some(armed.cancel());
    let bar = progress_bar(json, "restore");
    let mut hook = sig.test_hook();
    let mut cb = |p: Progress| {
        hook();
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    };
    let result = restore(&a.file, &mut regions, &opts, Some(&mut cb));
    drop(armed);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = match (result, sig.received()) {
        (Err(e), Some(signal)) => {
            return Err(sig.cancelled(
                signal,
                &format!("restore from {}", a.file.display()),
                format!("{e}; the RAM files are incomplete"),
            ))
        }
        (r, _) => r?,
    };
    if !json {
        print_restore(&a.file, &report);
    }
    Ok(restore_json(&report))
}

fn print_restore(path: &Path, r: &RestoreReport) {
    if let Some(why) = &r.direct_io_fallback {
        eprintln!("note: {why}");
    }
    if !r.blocks_skipped.is_empty() {
        eprintln!(
            "note: skipped block(s) not asked for: {}",
            r.blocks_skipped.join(", ")
        );
    }
    println!(
        "restored {} from {} ({:.1} MiB of RAM, {} pages stored, {} zero) in {:.3} s: {:.2} GiB/s, {} channel(s), direct-io {}",
        r.blocks_restored.join(", "),
        path.display(),
        r.ram_bytes as f64 / (1u64 << 20) as f64,
        r.pages_stored,
        r.zero_pages,
        r.seconds,
        r.gib_per_second(),
        r.channels,
        if r.direct_io { "on" } else { "off" }
    );
}
