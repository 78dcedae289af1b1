//! `mapped-ram inspect`: a snapshot's structure, and its device state copied out.

use serde_json::Value;

use mapped_ram_linux::{inspect, DeviceStateReader};

use std::io::{Read, Write};
use std::path::Path;

use crate::args::InspectArgs;
use crate::files::{create_private, identity, require_regular};
use crate::output::{info_json, CliError};

/// Runs `inspect`.
pub fn cmd_inspect(a: InspectArgs, json: bool) -> Result<Value, CliError> {
    require_regular(&a.file, "snapshot")?;
    let info = inspect(&a.file, a.offset)?;
    if let Some(out) = &a.device_state_out {
        // Truncating the output must never truncate the snapshot itself.
        if identity(out, "device-state file")? == identity(&a.file, "snapshot")? {
            return Err(CliError::new(format!(
                "device-state file {} is the snapshot {}: refusing to overwrite it",
                out.display(),
                a.file.display()
            )));
        }
        let mut file = create_private(out)
            .map_err(|e| CliError::new(format!("device-state file {}: {e}", out.display())))?;
        copy_device_state(&a.file, a.offset, &mut file, out)?;
    }
    if !json {
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
    // The JSON form costs a few KiB per block: only built when asked for.
    Ok(if json { info_json(&info) } else { Value::Null })
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
