//! `mapped-ram inspect`: a snapshot's structure (and a store snapshot's manifest), and its
//! device state copied out.

use serde_json::Value;

use mapped_ram_linux::store::{Manifest, StoreUrl};
use mapped_ram_linux::{inspect, DeviceStateReader, SnapshotInfo};

use std::io::{Read, Write};
use std::path::Path;

use crate::args::{InspectArgs, Location};
use crate::files::{create_private, identity, require_regular};
use crate::output::{info_json, manifest_json, object_size, CliError};
use crate::store;

/// Runs `inspect`.
pub fn cmd_inspect(a: InspectArgs, json: bool) -> Result<Value, CliError> {
    let path = match &a.file {
        Location::Store(url) => return inspect_store(&a, url, json),
        Location::File(path) => path,
    };
    store::reject_store_flags(&path.display().to_string(), &a.store, None, None)?;
    require_regular(path, "snapshot")?;
    let info = inspect(path, a.offset)?;
    if let Some(out) = &a.device_state_out {
        // Truncating the output must never truncate the snapshot itself.
        if identity(out, "device-state file")? == identity(path, "snapshot")? {
            return Err(CliError::new(format!(
                "device-state file {} is the snapshot {}: refusing to overwrite it",
                out.display(),
                path.display()
            )));
        }
        let mut file = create_private(out)
            .map_err(|e| CliError::new(format!("device-state file {}: {e}", out.display())))?;
        copy_device_state(path, a.offset, &mut file, out)?;
    }
    if !json {
        print_info(&info);
    }
    // The JSON form costs a few KiB per block: only built when asked for.
    Ok(if json { info_json(&info) } else { Value::Null })
}

/// `inspect` of a store snapshot: its structure as for a file, and its manifest.
fn inspect_store(a: &InspectArgs, url: &StoreUrl, json: bool) -> Result<Value, CliError> {
    store::reject_file_flags(
        url,
        &[
            (
                a.offset != 0,
                "--offset",
                "a store snapshot's manifest says where its stream starts",
            ),
            (
                a.device_state_out.is_some(),
                "--device-state-out",
                "it reads a local file (get the snapshot first)",
            ),
        ],
    )?;
    let s = store::connect(url, store::options(None, &a.store, None))?;
    let si = s.inspect()?;
    if !json {
        print_info(&si.info);
        print_manifest(&si.manifest);
        return Ok(Value::Null);
    }
    let mut v = info_json(&si.info);
    if let Some(o) = v.as_object_mut() {
        o.insert("url".into(), url.display().into());
        o.insert("manifest".into(), manifest_json(&si.manifest));
    }
    Ok(v)
}

fn print_manifest(m: &Manifest) {
    println!(
        "generation:   {} (previous: {}), committed at {} (Unix time)",
        m.generation,
        m.previous.as_deref().unwrap_or("none"),
        m.created_unix
    );
    println!(
        "objects:      {} of {} stored, {} each; {} bytes stored ({} object(s) hold metadata)",
        m.present_count(),
        m.object_count(),
        object_size(m.object_bytes),
        m.stored_bytes,
        m.metadata.len()
    );
    if m.stream_offset != 0 {
        println!(
            "stream:       at {:#x} (put with an offset)",
            m.stream_offset
        );
    }
}

/// The text form of a snapshot's structure.
fn print_info(info: &SnapshotInfo) {
    println!(
        "file:         {} ({} bytes)",
        info.path.display(),
        info.file_size
    );
    println!("machine:      {}", info.machine);
    println!("capabilities: {}", info.capabilities.join(", "));
    println!(
        "total RAM:    {} bytes in {} block(s)",
        info.total_ram,
        info.blocks.len()
    );
    println!(
        "{:<20} {:>14} {:>6} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "block", "length", "page", "pages", "stored", "zero", "bitmap_offset", "pages_offset"
    );
    for b in &info.blocks {
        println!(
            "{:<20} {:>#14x} {:>6} {:>10} {:>10} {:>10} {:>#14x} {:>#14x}",
            b.name,
            b.layout.length,
            b.layout.page_size,
            b.pages(),
            b.pages_stored(),
            b.pages() - b.pages_stored(),
            b.layout.bitmap_offset,
            b.layout.pages_offset
        );
    }
    println!("device state: at {:#x}", info.device_state_offset);
    match &info.integrity {
        Some(i) => println!(
            "checksums:    crc32c per page, table at {:#x} ({} bytes), metadata checksum ok",
            i.record.table_offset, i.record.table_len
        ),
        None => println!("checksums:    none"),
    }
}

/// Copies the device state of the snapshot `path` into `out` (the file `out_path`) through a
/// 1 MiB buffer, whatever its size; returns the bytes copied.
fn copy_device_state(
    path: &Path,
    offset: u64,
    out: &mut impl Write,
    out_path: &Path,
) -> Result<u64, CliError> {
    let mut state = DeviceStateReader::open(path, offset)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let at = state.file_offset();
        let n = match state.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(CliError::new(format!(
                    "read of the device state of {} at offset {at:#x}: {e}",
                    path.display()
                )))
            }
        };
        out.write_all(buf.get(..n).unwrap_or_default())
            .map_err(|e| {
                CliError::new(format!(
                    "write of device-state file {} at offset {copied:#x}: {e}",
                    out_path.display()
                ))
            })?;
        copied += n as u64;
    }
    out.flush()
        .map_err(|e| CliError::new(format!("device-state file {}: {e}", out_path.display())))?;
    Ok(copied)
}
