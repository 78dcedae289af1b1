//! `mapped-ram restore`: snapshot (a file or a store address) → RAM files.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use mapped_ram_linux::{
    default_channels, inspect, restore, DirectIo, MappedFile, RestoreOptions, RestoreRegion,
    RestoreReport,
};

use mapped_ram_linux::store::Store;

use crate::args::{Location, RestoreArgs};
use crate::files::{identity, identity_of, open_or_create_private, require_regular, Identity};
use crate::output::{restore_json, with_progress, CliError};
use crate::save::check_block_names;
use crate::signals::Interrupts;
use crate::store;

/// Every RAM file must be its own file, and none the snapshot (when it is a file): two names
/// of one file (the same path twice, a symlink, a hard link) would get two blocks' pages
/// interleaved.
fn check_distinct<'a>(
    snapshot: Option<(&Path, &Identity)>,
    rams: impl Iterator<Item = (&'a str, &'a Path, Identity)>,
) -> Result<(), CliError> {
    let mut seen: HashMap<Identity, (&str, &Path)> = HashMap::new();
    for (name, path, id) in rams {
        if let Some((snapshot, _)) = snapshot.filter(|(_, s)| **s == id) {
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

/// Where the pages are read from.
enum Source<'a> {
    /// A snapshot file.
    File(&'a Path),
    /// A store snapshot.
    Store(Store),
}

/// Runs `restore`.
pub fn cmd_restore(a: RestoreArgs, json: bool, sig: &Interrupts) -> Result<Value, CliError> {
    match &a.file {
        Location::Store(url) => store::reject_file_flags(
            url,
            &[
                (
                    a.common.offset != 0,
                    "--offset",
                    "a store snapshot's manifest says where its stream starts",
                ),
                (
                    a.common.direct_io == DirectIo::On,
                    "--direct-io on",
                    "a restore from a store reads no local file",
                ),
                (
                    a.common.chunk_bytes.is_some(),
                    "--chunk-bytes",
                    "a restore from a store reads one object at a time",
                ),
            ],
        )?,
        Location::File(p) => {
            store::reject_store_flags(&p.display().to_string(), &a.store, None, None)?;
        }
    }
    check_block_names(&a.ram)?;
    let label = a.file.display();
    // The snapshot's structure, and (a file) which file it is.
    let (info, snapshot, source) = match &a.file {
        Location::File(path) => {
            require_regular(path, "snapshot")?;
            let info = inspect(path, a.common.offset)?;
            let id = identity(path, "snapshot")?;
            (info, Some((path.as_path(), id)), Source::File(path))
        }
        Location::Store(url) => {
            let s = store::connect(url, store::options(a.common.channels, &a.store, None))?;
            (s.inspect()?.info, None, Source::Store(s))
        }
    };
    let snapshot = snapshot.as_ref().map(|(p, id)| (*p, id));
    // Check every name before creating or sizing any RAM file.
    for ram in &a.ram {
        if info.block(&ram.name).is_none() {
            let names: Vec<&str> = info.blocks.iter().map(|b| b.name.as_str()).collect();
            return Err(CliError::new(format!(
                "block {:?} is not in the snapshot {label} (it holds: {})",
                ram.name,
                names.join(", ")
            )));
        }
    }
    for ram in &a.ram {
        if info.block(&ram.name).is_some_and(|b| b.layout.is_empty()) {
            return Err(CliError::new(format!(
                "block {:?} has no pages in the snapshot {label} (a shared block skipped by x-ignore-shared): nothing to restore",
                ram.name,
            )));
        }
    }
    // Then that every RAM file is its own file, by name before creating any ...
    let ids = a
        .ram
        .iter()
        .map(|r| identity(&r.path, "RAM file"))
        .collect::<Result<Vec<_>, _>>()?;
    check_distinct(
        snapshot,
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
        snapshot,
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
    let result = with_progress(json, "restore", sig, |cb| match &source {
        Source::File(path) => restore(path, &mut regions, &opts, Some(cb)).map_err(CliError::from),
        Source::Store(s) => s
            .restore(&mut regions, &opts, Some(cb))
            .map_err(CliError::from),
    });
    drop(armed);
    let report = match (result, sig.received()) {
        (Err(e), Some(signal)) => {
            return Err(sig.cancelled(
                signal,
                &format!("restore from {label}"),
                format!("{}; the RAM files are incomplete", e.message),
            ))
        }
        (r, _) => r?,
    };
    if !json {
        print_restore(&label, &report);
    }
    let mut v = restore_json(&report);
    if let (Location::Store(url), Some(o)) = (&a.file, v.as_object_mut()) {
        o.insert("url".into(), url.display().into());
    }
    Ok(v)
}

fn print_restore(label: &str, r: &RestoreReport) {
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
        label,
        r.ram_bytes as f64 / (1u64 << 20) as f64,
        r.pages_stored,
        r.zero_pages,
        r.seconds,
        r.gib_per_second(),
        r.channels,
        if r.direct_io { "on" } else { "off" }
    );
}
