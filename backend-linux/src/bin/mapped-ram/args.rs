//! The command line: subcommands, flags and the parsers that bound every value.
//!
//! Every flag is checked here, before any file is touched: a value out of its range is a usage
//! error (exit status 2) that names the flag and the range.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mapped_ram_linux::{DirectIo, ZeroPages};

/// The largest `--offset` that `save` writes into a new file, or into a target shorter than
/// the offset: 1 GiB. QEMU's `file:PATH,offset=N` reserves a small header for another program
/// (a few KiB to MiB); a larger prefix is kept only when the target already holds it.
pub const MAX_NEW_OFFSET: u64 = 1 << 30;

/// The largest `--offset` any command accepts: 2^60 bytes (an offset into a file, which Linux
/// limits to 2^63 - 1 bytes; this leaves room for the stream after it without overflow).
pub const MAX_OFFSET: u64 = 1 << 60;

/// The largest target page size: 1 GiB (QEMU's largest huge page); the smallest is 4 KiB.
pub const MAX_PAGE_SIZE: u64 = 1 << 30;

/// The largest `--chunk-bytes`: 1 GiB (the largest single I/O, and the unit of channel work).
pub const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// The largest `--write-gap-pages` / `--read-gap-pages`: 2^32 pages (16 TiB of 4 KiB pages:
/// more than any block, so larger values mean nothing more).
pub const MAX_GAP_PAGES: u64 = 1 << 32;

/// The largest `demo --size`: 1 TiB (the demo holds two copies of the image in memory).
pub const MAX_DEMO_SIZE: u64 = 1 << 40;

/// The largest `--device-state` file: 1 GiB. QEMU's device state (non-iterative device
/// sections and the vmdesc JSON) is a few MiB even for large guests; the whole of it is held
/// in memory while saving.
pub const MAX_DEVICE_STATE: u64 = 1 << 30;

/// Save and restore guest RAM in QEMU's mapped-ram file format, at disk speed.
///
/// Exit status: 0 on success; 1 on failure, with one line `error: …` on stderr; 2 on a usage
/// error; 130 after SIGINT and 143 after SIGTERM (the operation was cancelled, a save's
/// temporary file removed and the previous snapshot kept).
#[derive(Debug, Parser)]
#[command(name = "mapped-ram", version)]
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

/// A byte count no larger than `max`.
fn size_at_most(s: &str, max: u64, what: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v > max {
        return Err(format!("{what} {v} is larger than the maximum {max}"));
    }
    Ok(v)
}

fn parse_offset(s: &str) -> Result<u64, String> {
    size_at_most(s, MAX_OFFSET, "offset")
}

fn parse_page_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if !v.is_power_of_two() || !(4096..=MAX_PAGE_SIZE).contains(&v) {
        return Err(format!(
            "page size {v} must be a power of two from 4096 to {MAX_PAGE_SIZE}"
        ));
    }
    Ok(v)
}

fn parse_chunk_bytes(s: &str) -> Result<u64, String> {
    let v = size_at_most(s, MAX_CHUNK_BYTES, "chunk size")?;
    if v < 4096 || v % 4096 != 0 {
        return Err(format!(
            "chunk size {v} must be a multiple of 4096 (and of the page size), at least one page"
        ));
    }
    Ok(v)
}

fn parse_gap_pages(s: &str) -> Result<u64, String> {
    let v = s
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a page count"))?;
    if v > MAX_GAP_PAGES {
        return Err(format!(
            "gap of {v} pages is larger than the maximum {MAX_GAP_PAGES}"
        ));
    }
    Ok(v)
}

fn parse_demo_size(s: &str) -> Result<u64, String> {
    let v = size_at_most(s, MAX_DEMO_SIZE, "demo size")?;
    if v == 0 {
        return Err("demo size must be at least one page".into());
    }
    Ok(v)
}

fn parse_channels(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=255).contains(&n) => Ok(n),
        _ => Err(format!("channels must be 1..=255, not {s:?}")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

fn parse_machine(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 255 {
        return Err(format!("machine type {s:?} must be 1 to 255 bytes"));
    }
    Ok(s.into())
}

/// Arguments of `save`.
#[derive(Debug, Args)]
pub struct SaveArgs {
    /// A RAM block and the file holding its contents (repeatable, in block order).
    #[arg(long = "ram", value_name = "NAME=PATH", required = true, value_parser = parse_ram)]
    pub ram: Vec<RamArg>,
    /// The snapshot to write (replaced atomically; a new file, or a regular file that is none
    /// of the RAM files).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Channels, O_DIRECT, offset, page size, chunk size.
    #[command(flatten)]
    pub common: IoArgs,
    /// detect: leave zero pages out (bit clear); write: store every page.
    #[arg(long, default_value = "detect", value_name = "detect|write")]
    pub zero_pages: ZeroPages,
    /// Machine type recorded in the file (QEMU loads only into the same machine type).
    #[arg(long, default_value = "none", value_parser = parse_machine)]
    pub machine: String,
    /// Device state to append after RAM (e.g. from `inspect --device-state-out`): a regular
    /// file of at most 1 GiB.
    #[arg(long, value_name = "FILE")]
    pub device_state: Option<PathBuf>,
    /// Skip fdatasync of the snapshot and fsync of its directory.
    #[arg(long)]
    pub no_fsync: bool,
    /// Tuning: longest run of zero pages written inside one write instead of splitting it.
    #[arg(long, value_name = "PAGES", value_parser = parse_gap_pages)]
    pub write_gap_pages: Option<u64>,
    /// Tuning: do not allocate the page regions before O_DIRECT writes (`fallocate`; long
    /// zero runs are punched out again afterwards).
    #[arg(long)]
    pub no_preallocate: bool,
    /// Map the RAM files and write their pages in place (zero-copy, faster when the CPU is the
    /// bottleneck) instead of reading them with pread. Only for RAM files nothing writes or
    /// truncates during the save (a paused guest): a file truncated meanwhile ends the process
    /// with SIGBUS, and bytes changed meanwhile may not match their checksums.
    #[arg(long)]
    pub map_ram: bool,
    /// Update the existing snapshot FILE instead: compare every page of the RAM files with it
    /// and write only the pages that differ, into a copy that replaces FILE atomically.
    #[arg(long)]
    pub update: bool,
    /// Store a CRC-32C of every page (checked by `verify`), where QEMU does not look.
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub checksums: bool,
}

/// Options shared by save and restore.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Channel threads, each with its own descriptor (1 to 255).
    #[arg(long, value_parser = parse_channels)]
    pub channels: Option<usize>,
    /// O_DIRECT for page data: auto (probe, fall back), on (fail if refused), off.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub direct_io: DirectIo,
    /// Bytes before the stream, as in QEMU's `file:PATH,offset=N` (save: at most 1 GiB unless
    /// the target already holds that many bytes, which are kept).
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
    /// Target page size of the guest (a power of two from 4 KiB to 1 GiB).
    #[arg(long, default_value = "4096", value_parser = parse_page_size)]
    pub page_size: u64,
    /// Tuning: bytes of RAM per unit of channel work, and the largest single I/O (a multiple
    /// of the page size, at most 1 GiB).
    #[arg(long, value_name = "BYTES", value_parser = parse_chunk_bytes)]
    pub chunk_bytes: Option<u64>,
}

/// Arguments of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot.
    pub file: PathBuf,
    /// A block to restore and the RAM file to write it to (created 0600, or sized if empty;
    /// each block its own file).
    #[arg(long = "ram", value_name = "NAME=PATH", required = true, value_parser = parse_ram)]
    pub ram: Vec<RamArg>,
    /// Channels, O_DIRECT, offset, page size, chunk size.
    #[command(flatten)]
    pub common: IoArgs,
    /// Tuning: longest run of clear-bit pages read inside one read (then zeroed).
    #[arg(long, value_name = "PAGES", value_parser = parse_gap_pages)]
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
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
    /// Write the device state (bytes after the RAM END section) to this file (created 0600).
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
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
}

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest RAM size (at most 1 TiB; the demo holds two copies in memory).
    #[arg(long, default_value = "1G", value_parser = parse_demo_size)]
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
