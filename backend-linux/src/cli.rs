//! The `mapped-ram` command-line tool: a thin layer over [`crate::save()`], [`crate::restore()`],
//! [`crate::inspect()`] and [`crate::verify()`].
//!
//! Exit status: 0 on success, 1 with a one-line `error: …` on failure, 2 on usage errors.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::file::DirectIo;
use crate::inspect::SnapshotInfo;
use crate::progress::Progress;
use crate::save::{default_channels, ZeroPages};
use crate::sys::MappedFile;
use crate::{
    inspect, read_device_state, restore, save, verify, RestoreOptions, RestoreRegion,
    RestoreReport, SaveOptions, SaveRegion, SaveReport,
};

/// Save and restore guest RAM in QEMU's mapped-ram file format, at disk speed.
#[derive(Debug, Parser)]
#[command(name = "mapped-ram", version, about)]
pub struct Cli {
    /// Print one machine-readable JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save RAM files to a mapped-ram snapshot.
    Save(SaveArgs),
    /// Restore RAM files from a snapshot (ours or QEMU's).
    Restore(RestoreArgs),
    /// Show a snapshot's machine, capabilities, blocks and offsets.
    Inspect(InspectArgs),
    /// Check a snapshot's structure and, with --ram, that it holds exactly that RAM.
    Verify(VerifyArgs),
    /// Build a synthetic guest image, save, restore and verify it, and print GiB/s.
    Demo(DemoArgs),
}

/// `NAME=PATH`: a RAM block and the file holding its contents.
#[derive(Debug, Clone)]
pub struct RamArg {
    /// Block id string.
    pub name: String,
    /// RAM file.
    pub path: PathBuf,
}

fn parse_ram(s: &str) -> Result<RamArg, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
    if name.is_empty() || name.len() > 255 {
        return Err(format!("block name {name:?} must be 1 to 255 bytes"));
    }
    if path.is_empty() {
        return Err(format!("no path for block {name:?}"));
    }
    Ok(RamArg {
        name: name.into(),
        path: path.into(),
    })
}

/// Parses a byte count: decimal, `0x` hex, or with a K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if "kKmMgGtT".contains(c) => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => 1 << 40,
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let value = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|_| format!("{s:?} is not a byte count"))?;
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_channels(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=255).contains(&n) => Ok(n),
        _ => Err(format!("channels must be 1..=255, not {s:?}")),
    }
}

/// Arguments of `save`.
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// A RAM block and the file holding its contents (repeatable, in block order).
    #[arg(long = "ram", value_name = "NAME=PATH", required = true, value_parser = parse_ram)]
    pub ram: Vec<RamArg>,
    /// The snapshot to write (replaced atomically).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    #[command(flatten)]
    common: IoArgs,
    /// detect: leave zero pages out (bit clear); write: store every page.
    #[arg(long, default_value = "detect", value_name = "detect|write")]
    pub zero_pages: ZeroPages,
    /// Machine type recorded in the file (QEMU loads only into the same machine type).
    #[arg(long, default_value = "none")]
    pub machine: String,
    /// Device state to append after RAM (e.g. from `inspect --device-state-out`).
    #[arg(long, value_name = "FILE")]
    pub device_state: Option<PathBuf>,
    /// Skip fdatasync of the snapshot and fsync of its directory.
    #[arg(long)]
    pub no_fsync: bool,
    /// Tuning: longest run of zero pages written inside one write instead of splitting it.
    #[arg(long, value_name = "PAGES")]
    pub write_gap_pages: Option<u64>,
    /// Tuning: do not allocate the page regions before O_DIRECT writes (`fallocate`; long
    /// zero runs are punched out again afterwards).
    #[arg(long)]
    pub no_preallocate: bool,
    /// Update the existing snapshot FILE instead: compare every page of the RAM files with it
    /// and write only the pages that differ, into a copy that replaces FILE atomically.
    #[arg(long)]
    pub update: bool,
    /// Store a CRC-32C of every page (checked by `verify`), where QEMU does not look.
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub checksums: bool,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

/// Options shared by save and restore.
#[derive(Debug, Args)]
struct IoArgs {
    /// Channel threads, each with its own descriptor.
    #[arg(long, value_parser = parse_channels)]
    channels: Option<usize>,
    /// O_DIRECT for page data: auto (probe, fall back), on (fail if refused), off.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    direct_io: DirectIo,
    /// Bytes before the stream, as in QEMU's `file:PATH,offset=N`.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Target page size of the guest.
    #[arg(long, default_value = "4096", value_parser = parse_size)]
    page_size: u64,
    /// Tuning: bytes of RAM per unit of channel work, and the largest single I/O.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    chunk_bytes: Option<u64>,
}

/// Arguments of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot.
    pub file: PathBuf,
    /// A block to restore and the RAM file to write it to (created or sized if empty).
    #[arg(long = "ram", value_name = "NAME=PATH", required = true, value_parser = parse_ram)]
    pub ram: Vec<RamArg>,
    #[command(flatten)]
    common: IoArgs,
    /// Tuning: longest run of clear-bit pages read inside one read (then zeroed).
    #[arg(long, value_name = "PAGES")]
    pub read_gap_pages: Option<u64>,
    /// Tuning: do not fault in destination memory per chunk before reading into it
    /// (`MADV_POPULATE_WRITE`); pages are then faulted in one by one as they are written.
    #[arg(long)]
    pub no_populate: bool,
    /// Check every page read against its stored checksum (files saved with checksums).
    #[arg(long)]
    pub verify_checksums: bool,
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The snapshot.
    pub file: PathBuf,
    /// Bytes before the stream.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Write the device state (bytes after the RAM END section) to this file.
    #[arg(long, value_name = "FILE")]
    pub device_state_out: Option<PathBuf>,
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The snapshot.
    pub file: PathBuf,
    /// Compare this block with this RAM file (repeatable).
    #[arg(long = "ram", value_name = "NAME=PATH", value_parser = parse_ram)]
    pub ram: Vec<RamArg>,
    /// Bytes before the stream.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
}

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest RAM size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Directory for the snapshot (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Channel threads.
    #[arg(long, value_parser = parse_channels)]
    pub channels: Option<usize>,
    /// O_DIRECT mode.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub direct_io: DirectIo,
    /// Keep the snapshot file afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// A command failure: the message printed after `error: `.
#[derive(Debug)]
pub struct CliError(pub String);

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

/// Runs the tool with the process's arguments and returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let json = cli.json;
    match run(cli) {
        Ok(out) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
            0
        }
        Err(CliError(msg)) => {
            let one_line = msg.replace('\n', " ");
            if json {
                println!("{}", json!({ "ok": false, "error": one_line }));
            }
            eprintln!("error: {one_line}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<Value, CliError> {
    match cli.command {
        Command::Save(a) => cmd_save(a, cli.json),
        Command::Restore(a) => cmd_restore(a, cli.json),
        Command::Inspect(a) => cmd_inspect(a, cli.json),
        Command::Verify(a) => cmd_verify(a, cli.json),
        Command::Demo(a) => cmd_demo(a, cli.json),
    }
}

fn progress_bar(json: bool, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    Some(bar)
}

fn map_ram_for_save(ram: &RamArg) -> Result<MappedFile, CliError> {
    let map = MappedFile::open_readonly(&ram.path).map_err(|e| {
        CliError(format!(
            "RAM file {} for block {:?}: {e}",
            ram.path.display(),
            ram.name
        ))
    })?;
    if map.is_empty() {
        return Err(CliError(format!(
            "RAM file {} for block {:?} is empty",
            ram.path.display(),
            ram.name
        )));
    }
    Ok(map)
}

fn cmd_save(a: SaveArgs, json: bool) -> Result<Value, CliError> {
    let maps = a
        .ram
        .iter()
        .map(map_ram_for_save)
        .collect::<Result<Vec<_>, _>>()?;
    for (ram, map) in a.ram.iter().zip(&maps) {
        if map.len() as u64 % a.common.page_size != 0 {
            return Err(CliError(format!(
                "RAM file {} for block {:?} is {} bytes, not a multiple of the page size {} (short or wrong file?)",
                ram.path.display(),
                ram.name,
                map.len(),
                a.common.page_size
            )));
        }
    }
    let regions: Vec<SaveRegion<'_>> = a
        .ram
        .iter()
        .zip(&maps)
        .map(|(r, m)| SaveRegion {
            name: &r.name,
            memory: m.as_slice(),
            page_size: a.common.page_size,
        })
        .collect();
    let device_state = match &a.device_state {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| CliError(format!("device-state file {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let opts = SaveOptions {
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
    if a.update {
        return crate::update::cli_save_update(&a.output, &regions, opts, json);
    }
    let bar = progress_bar(json, "save");
    let mut cb = |p: Progress| {
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    };
    let report = save(&a.output, &regions, &opts, Some(&mut cb))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !json {
        print_save(&report);
    }
    Ok(save_json(&report))
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

fn save_json(r: &SaveReport) -> Value {
    json!({
        "ok": true,
        "command": "save",
        "path": r.path,
        "bytes": r.ram_bytes,
        "data_bytes": r.data_bytes,
        "pages": r.pages,
        "pages_written": r.pages_stored,
        "zero_pages": r.zero_pages,
        "writes": r.writes,
        "seconds": r.seconds,
        "gib_per_s": r.gib_per_second(),
        "channels": r.channels,
        "direct_io": r.direct_io,
        "direct_io_fallback": r.direct_io_fallback,
        "file_size": r.file_size,
        "checksums": r.checksums,
        "stale_temporaries_removed": r.stale_temporaries_removed,
    })
}

fn cmd_restore(a: RestoreArgs, json: bool) -> Result<Value, CliError> {
    let info = inspect(&a.file, a.common.offset)?;
    // Check every name before creating or sizing any RAM file.
    for ram in &a.ram {
        if info.block(&ram.name).is_none() {
            let names: Vec<&str> = info.blocks.iter().map(|b| b.name.as_str()).collect();
            return Err(CliError(format!(
                "block {:?} is not in the snapshot {} (it holds: {})",
                ram.name,
                a.file.display(),
                names.join(", ")
            )));
        }
    }
    for ram in &a.ram {
        if info.block(&ram.name).is_some_and(|b| b.layout.is_empty()) {
            return Err(CliError(format!(
                "block {:?} has no pages in the snapshot {} (a shared block skipped by x-ignore-shared): nothing to restore",
                ram.name,
                a.file.display()
            )));
        }
    }
    let mut maps = Vec::with_capacity(a.ram.len());
    let mut all_fresh = true;
    for ram in &a.ram {
        let length = info.block(&ram.name).map(|b| b.layout.length).unwrap_or(0);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&ram.path)
            .map_err(|e| CliError(format!("RAM file {}: {e}", ram.path.display())))?;
        let size = f
            .metadata()
            .map_err(|e| CliError(format!("RAM file {}: {e}", ram.path.display())))?
            .len();
        if size == 0 {
            f.set_len(length)
                .map_err(|e| CliError(format!("RAM file {}: {e}", ram.path.display())))?;
        } else if size != length {
            return Err(CliError(format!(
                "block {:?}: the snapshot holds {length} bytes but RAM file {} has {size} (size mismatch; give an empty or new file)",
                ram.name,
                ram.path.display()
            )));
        } else {
            all_fresh = false;
        }
        let map = MappedFile::map(&f, length as usize, true)
            .map_err(|e| CliError(format!("mmap of RAM file {}: {e}", ram.path.display())))?;
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
    let opts = RestoreOptions {
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
    let bar = progress_bar(json, "restore");
    let mut cb = |p: Progress| {
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    };
    let report = restore(&a.file, &mut regions, &opts, Some(&mut cb))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
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

fn restore_json(r: &RestoreReport) -> Value {
    json!({
        "ok": true,
        "command": "restore",
        "blocks": r.blocks_restored,
        "blocks_skipped": r.blocks_skipped,
        "bytes": r.ram_bytes,
        "data_bytes": r.data_bytes,
        "pages_written": r.pages_stored,
        "zero_pages": r.zero_pages,
        "reads": r.reads,
        "seconds": r.seconds,
        "gib_per_s": r.gib_per_second(),
        "channels": r.channels,
        "direct_io": r.direct_io,
        "direct_io_fallback": r.direct_io_fallback,
        "machine": r.machine,
        "checksums_verified": r.checksums_verified,
    })
}

/// The JSON form of a snapshot's structure (documented in the README).
pub fn info_json(info: &SnapshotInfo) -> Value {
    let blocks: Vec<Value> = info
        .blocks
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "length": b.layout.length,
                "page_size": b.layout.page_size,
                "pages": b.pages(),
                "pages_stored": b.pages_stored(),
                "pages_zero": b.pages() - b.pages_stored(),
                "record_offset": b.layout.record_offset,
                "header_offset": b.layout.header_offset,
                "bitmap_offset": b.layout.bitmap_offset,
                "bitmap_size": b.layout.bitmap_size,
                "pages_offset": b.layout.pages_offset,
                "gpa": b.gpa,
            })
        })
        .collect();
    json!({
        "path": info.path,
        "offset": info.offset,
        "file_size": info.file_size,
        "machine": info.machine,
        "capabilities": info.capabilities,
        "ram_section_id": info.ram_section_id,
        "total_ram": info.total_ram,
        "device_stream_start": info.device_stream_start,
        "device_state_offset": info.device_state_offset,
        "checksums": info.integrity.map(|i| json!({
            "algorithm": "crc32c",
            "anchor_offset": i.anchor_offset,
            "table_offset": i.record.table_offset,
            "table_len": i.record.table_len,
            "footer_offset": i.footer_offset,
        })),
        "blocks": blocks,
    })
}

fn cmd_inspect(a: InspectArgs, json: bool) -> Result<Value, CliError> {
    let info = inspect(&a.file, a.offset)?;
    if let Some(out) = &a.device_state_out {
        let bytes = read_device_state(&a.file, a.offset)?;
        std::fs::write(out, bytes)
            .map_err(|e| CliError(format!("device-state file {}: {e}", out.display())))?;
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
    Ok(info_json(&info))
}

fn cmd_verify(a: VerifyArgs, json: bool) -> Result<Value, CliError> {
    let maps = a
        .ram
        .iter()
        .map(map_ram_for_save)
        .collect::<Result<Vec<_>, _>>()?;
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
    let report = verify(&a.file, a.offset, &regions)?;
    if let Some(m) = report.mismatches.first() {
        return Err(CliError(format!(
            "{}: block {:?} differs from the RAM given: first at page {} (file offset {:#x}, {}), {} page(s) differ",
            a.file.display(),
            m.block,
            m.page,
            m.file_offset,
            if m.stored { "stored" } else { "not stored, should be zero" },
            m.pages_differing
        )));
    }
    if let Some(c) = report.corrupt.first() {
        return Err(CliError(format!(
            "{}: block {:?} page {} (file offset {:#x}) fails its checksum (stored {:#010x}, computed {:#010x}); {} page(s) of the block are bad",
            a.file.display(),
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
                "{}: structure ok ({} block(s)){sums}",
                a.file.display(),
                report.info.blocks.len()
            );
        } else {
            println!(
                "{}: structure ok; contents equal for {}{sums}",
                a.file.display(),
                report.blocks_compared.join(", ")
            );
        }
    }
    Ok(json!({
        "ok": true,
        "command": "verify",
        "blocks_compared": report.blocks_compared,
        "pages_checksummed": report.pages_checksummed,
        "snapshot": info_json(&report.info),
    }))
}

/// Fills `buf` with a synthetic guest image: about a quarter of the pages zero, scattered page
/// by page, the rest pseudo-random (incompressible) bytes. Deterministic for a given seed.
pub fn synthetic_image(buf: &mut [u8], page_size: usize, seed: u64) {
    let mut state = seed | 1;
    let mut next = || {
        // xorshift64*: fast, good enough to defeat compression and dedup.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for page in buf.chunks_mut(page_size) {
        if next() % 4 == 0 {
            page.fill(0);
            continue;
        }
        for word in page.chunks_mut(8) {
            let v = next().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

fn cmd_demo(a: DemoArgs, json: bool) -> Result<Value, CliError> {
    let ps = 4096u64;
    let size = a.size.div_ceil(ps) * ps;
    if size == 0 {
        return Err(CliError("demo size must be at least one page".into()));
    }
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("mapped-ram-demo-{}.mr", std::process::id()));
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    say(format!(
        "building a {} MiB synthetic guest image (~25% zero pages scattered, rest random)...",
        size >> 20
    ));
    let t = Instant::now();
    let mut ram = vec![0u8; size as usize];
    synthetic_image(&mut ram, ps as usize, 0x5eed);
    say(format!("  built in {:.2} s", t.elapsed().as_secs_f64()));
    let channels = a.channels.unwrap_or_else(default_channels);
    let sopts = SaveOptions {
        channels,
        direct_io: a.direct_io,
        ..SaveOptions::default()
    };
    let result = (|| -> Result<Value, CliError> {
        let regions = [SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: ps,
        }];
        let s = save(&path, &regions, &sopts, None)?;
        if let Some(why) = &s.direct_io_fallback {
            say(format!("note: {why}"));
        }
        say(format!(
            "save:    {:>6.2} GiB/s  ({:.3} s, {} channels, direct-io {}, fsync on, {} of {} pages stored)",
            s.gib_per_second(),
            s.seconds,
            s.channels,
            if s.direct_io { "on" } else { "off" },
            s.pages_stored,
            s.pages
        ));
        let mut back = vec![0u8; size as usize];
        let ropts = RestoreOptions {
            channels,
            direct_io: a.direct_io,
            memory_is_zeroed: true,
            ..RestoreOptions::default()
        };
        let r = restore(
            &path,
            &mut [RestoreRegion {
                name: "pc.ram",
                memory: &mut back,
                page_size: ps,
            }],
            &ropts,
            None,
        )?;
        say(format!(
            "restore: {:>6.2} GiB/s  ({:.3} s, {} channels, direct-io {})",
            r.gib_per_second(),
            r.seconds,
            r.channels,
            if r.direct_io { "on" } else { "off" }
        ));
        let identical = back == ram;
        let v = verify(&path, 0, &regions)?;
        if !identical || !v.ok() {
            return Err(CliError(format!(
                "demo verification failed: restored memory identical = {identical}, file matches = {}",
                v.ok()
            )));
        }
        say(
            "verify:  restored RAM is byte-identical; the file matches the image page by page"
                .into(),
        );
        if a.keep {
            say(format!("snapshot kept at {}", path.display()));
        }
        Ok(json!({
            "ok": true,
            "command": "demo",
            "bytes": size,
            "save": save_json(&s),
            "restore": restore_json(&r),
            "verified": true,
        }))
    })();
    if !a.keep {
        let _ = std::fs::remove_file(&path);
    }
    result
}
