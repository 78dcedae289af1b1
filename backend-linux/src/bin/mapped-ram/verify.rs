//! `mapped-ram verify`: a snapshot's structure and page checksums, and its contents against
//! RAM files; a file or a store snapshot.

use serde_json::{json, Value};

use mapped_ram_linux::{verify, SaveRegion};

use crate::args::{Location, VerifyArgs};
use crate::files::require_regular;
use crate::output::{info_json, CliError};
use crate::save::map_ram;
use crate::store;

/// Runs `verify`.
pub fn cmd_verify(a: VerifyArgs, json: bool) -> Result<Value, CliError> {
    match &a.file {
        Location::Store(url) => store::reject_file_flags(
            url,
            &[(
                a.offset != 0,
                "--offset",
                "a store snapshot's manifest says where its stream starts",
            )],
        )?,
        Location::File(path) => {
            store::reject_store_flags(&path.display().to_string(), &a.store, None, a.channels)?;
            require_regular(path, "snapshot")?;
        }
    }
    let label = a.file.display();
    let maps = a.ram.iter().map(map_ram).collect::<Result<Vec<_>, _>>()?;
    let regions: Vec<SaveRegion<'_>> = a
        .ram
        .iter()
        .zip(&maps)
        .map(|(r, m)| SaveRegion {
            name: &r.name,
            memory: m.as_slice(),
            page_size: 4096,
        })
        .collect();
    let report = match &a.file {
        Location::File(path) => verify(path, a.offset, &regions)?,
        Location::Store(url) => {
            store::connect(url, store::options(a.channels, &a.store, None))?.verify(&regions)?
        }
    };
    if let Some(m) = report.mismatches.first() {
        return Err(CliError::new(format!(
            "{label}: block {:?} differs from the RAM given: first at page {} (file offset {:#x}, {}), {} page(s) differ",
            m.block,
            m.page,
            m.file_offset,
            if m.stored { "stored" } else { "not stored, should be zero" },
            m.pages_differing
        )));
    }
    if let Some(c) = report.corrupt.first() {
        return Err(CliError::new(format!(
            "{label}: block {:?} page {} (file offset {:#x}) fails its checksum (stored {:#010x}, computed {:#010x}); {} page(s) of the block are bad",
            c.block,
            c.page,
            c.file_offset,
            c.expected,
            c.actual,
            c.pages_bad
        )));
    }
    let sums = match report.pages_checksummed {
        Some(n) => format!("; {n} page checksum(s) ok"),
        None => "; no page checksums in the file".into(),
    };
    if !json {
        if report.blocks_compared.is_empty() {
            println!(
                "{label}: structure ok ({} block(s)){sums}",
                report.info.blocks.len()
            );
        } else {
            println!(
                "{label}: structure ok; contents equal for {}{sums}",
                report.blocks_compared.join(", ")
            );
        }
    }
    if !json {
        // The JSON form costs a few KiB per block: only built when asked for.
        return Ok(Value::Null);
    }
    Ok(json!({
        "ok": true,
        "command": "verify",
        "blocks_compared": report.blocks_compared,
        "pages_checksummed": report.pages_checksummed,
        "snapshot": info_json(&report.info),
    }))
}
