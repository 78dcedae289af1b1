//! The command line: subcommands, flags and the parsers that bound every value.
//!
//! Every flag is checked here, before any file is touched: a value out of its range is a usage
//! error (exit status 2) that names the flag and the range.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use mapped_ram_linux::store::manifest::{MAX_OBJECT_BYTES, MIN_OBJECT_BYTES};
use mapped_ram_linux::store::StoreUrl;
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

/// The largest `--retries`: 100 (with backoff capped at 5 s, more only waits longer).
pub const MAX_RETRIES: usize = 100;

/// The largest `--request-timeout`: one hour (one object of at most 256 MiB per request).
pub const MAX_REQUEST_TIMEOUT_SECS: f64 = 3600.0;

/// The largest `--retry-timeout` and `--orphan-grace`: 30 days.
pub const MAX_WAIT_SECS: f64 = 30.0 * 86400.0;

/// Save and restore guest RAM in QEMU's mapped-ram file format, at disk speed.
///
/// A snapshot is a local file or, with `s3://BUCKET/KEY`, a snapshot in an S3-compatible
/// object store (endpoint and credentials from the AWS_* environment).
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
    /// Save RAM files to a mapped-ram snapshot (a file or s3://BUCKET/KEY).
    #[command(after_long_help = SAVE_EXAMPLES)]
    Save(SaveArgs),
    /// Restore RAM files from a snapshot (ours or QEMU's; a file or s3://BUCKET/KEY).
    #[command(after_long_help = RESTORE_EXAMPLES)]
    Restore(RestoreArgs),
    /// Show a snapshot's machine, capabilities, blocks and offsets (and a store snapshot's
    /// manifest).
    #[command(after_long_help = INSPECT_EXAMPLES)]
    Inspect(InspectArgs),
    /// Check a snapshot's structure and, with --ram, that it holds exactly that RAM.
    #[command(after_long_help = VERIFY_EXAMPLES)]
    Verify(VerifyArgs),
    /// Upload a local mapped-ram file (ours or QEMU's) as the snapshot at s3://BUCKET/KEY.
    ///
    /// Sparse: objects that hold only zeros are not uploaded. Atomic as a save: readers see
    /// the previous snapshot at the address until the upload is complete.
    #[command(after_long_help = PUT_EXAMPLES)]
    Put(PutArgs),
    /// Download the snapshot at s3://BUCKET/KEY into a local file, byte for byte the file
    /// that was saved or put (QEMU loads it).
    ///
    /// Written to a temporary file beside FILE, synced and renamed over it.
    #[command(after_long_help = GET_EXAMPLES)]
    Get(GetArgs),
    /// Build a synthetic guest image, save, restore and verify it, and print GiB/s.
    Demo(DemoArgs),
}

/// The environment a store address reads, for the long help of every command that takes one.
macro_rules! store_env {
    () => {
        "A store address s3://BUCKET/KEY reads its endpoint and credentials from the \
environment: AWS_ENDPOINT_URL (plain http also needs AWS_ALLOW_HTTP=true), AWS_ACCESS_KEY_ID, \
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION."
    };
}

const SAVE_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  mapped-ram save --ram pc.ram=/dev/shm/vm1.ram -o /var/lib/vm1/guest.mr\n",
    "  mapped-ram save --ram pc.ram=/dev/shm/vm1.ram -o s3://snapshots/vm1/guest.mr --object-size 8M\n\n",
    "A save to a store uploads only the objects that hold data, under a new generation, and \
then commits it (readers see the previous snapshot until then; a cancelled or failed save \
deletes what it uploaded). --update, --offset, --direct-io on, --chunk-bytes, \
--write-gap-pages, --no-fsync and --no-preallocate apply only to a file.\n\n",
    store_env!()
);

const RESTORE_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  mapped-ram restore /var/lib/vm1/guest.mr --ram pc.ram=/dev/shm/vm1.ram\n",
    "  mapped-ram restore s3://snapshots/vm1/guest.mr --ram pc.ram=/dev/shm/vm1.ram --channels 32\n\n",
    "From a store, pages are read with ranged GETs (--channels at once); --offset, \
--direct-io on and --chunk-bytes apply only to a file.\n\n",
    store_env!()
);

const INSPECT_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  mapped-ram inspect /var/lib/vm1/guest.mr --device-state-out /tmp/vm1.state\n",
    "  mapped-ram inspect --json s3://snapshots/vm1/guest.mr\n\n",
    "For a store snapshot only the manifest and the objects that hold metadata are fetched; \
--offset and --device-state-out apply only to a file (get the snapshot first).\n\n",
    store_env!()
);

const VERIFY_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  mapped-ram verify /var/lib/vm1/guest.mr --ram pc.ram=/dev/shm/vm1.ram\n",
    "  mapped-ram verify s3://snapshots/vm1/guest.mr --ram pc.ram=/dev/shm/vm1.ram\n\n",
    "A store snapshot is read with ranged GETs, --channels at once; --offset applies only to \
a file.\n\n",
    store_env!()
);

const PUT_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  mapped-ram put /var/lib/vm1/guest.mr s3://snapshots/vm1/guest.mr\n",
    "  mapped-ram put qemu-saved.img s3://snapshots/vm2/guest.mr --offset 4096 --json\n\n",
    "SIGINT or SIGTERM end a put at once (exit status 130 or 143); nothing is committed, the \
snapshot at the address stays as it was, and the objects uploaded so far are deleted by the \
next save or put of that address.\n\n",
    store_env!()
);

const GET_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  mapped-ram get s3://snapshots/vm1/guest.mr -o /var/lib/vm1/guest.mr\n",
    "  mapped-ram get --json s3://snapshots/vm1/guest.mr -o /var/lib/vm1/guest.mr --channels 32\n\n",
    "SIGINT or SIGTERM end a get at once (exit status 130 or 143); FILE is left as it was and \
the temporary file beside it is removed by the next get or save of FILE.\n\n",
    store_env!()
);

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

/// Parses a byte count: decimal, `0x` hex, or with a K/M/G/T suffix (powers of 1024, also
/// written KiB/MiB/GiB/TiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .filter(|d| d.ends_with(['K', 'M', 'G', 'T']))
        .unwrap_or(t);
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

/// `s3://BUCKET/KEY`, checked (see [`StoreUrl::parse`]).
fn parse_store_url(s: &str) -> Result<StoreUrl, String> {
    StoreUrl::parse(s).map_err(|e| e.to_string())
}

/// Where a snapshot is: a local file, or a snapshot in an object store.
#[derive(Debug, Clone)]
pub enum Location {
    /// A local file.
    File(PathBuf),
    /// `s3://BUCKET/KEY`.
    Store(StoreUrl),
}

impl Location {
    /// The path or the address, for messages.
    pub fn display(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Store(u) => u.display(),
        }
    }
}

/// Parses a [`Location`]: anything that starts with `s3://` is a store address (and must be a
/// valid one), anything else a path (which need not be UTF-8; `./s3:/...` names a local file).
#[derive(Debug, Clone, Copy)]
struct LocationParser;

impl TypedValueParser for LocationParser {
    type Value = Location;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Location, clap::Error> {
        match value.to_str() {
            Some(s) if StoreUrl::is_store(s) => parse_store_url
                .parse_ref(cmd, arg, value)
                .map(Location::Store),
            _ => Ok(Location::File(PathBuf::from(value))),
        }
    }
}

/// Seconds (decimals allowed, an `s` suffix too) from `min` to `max`.
fn parse_secs(s: &str, min: f64, max: f64, what: &str) -> Result<Duration, String> {
    let t = s.trim();
    let t = t.strip_suffix('s').unwrap_or(t);
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() && (min..=max).contains(&v) => Ok(Duration::from_secs_f64(v)),
        Ok(_) => Err(format!(
            "{what} must be from {min} to {max} seconds, not {s:?}"
        )),
        Err(_) => Err(format!("{s:?} is not a number of seconds")),
    }
}

fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    parse_secs(s, 0.001, MAX_REQUEST_TIMEOUT_SECS, "request timeout")
}

fn parse_retry_timeout(s: &str) -> Result<Duration, String> {
    parse_secs(s, 0.0, MAX_WAIT_SECS, "retry timeout")
}

fn parse_orphan_grace(s: &str) -> Result<Duration, String> {
    parse_secs(s, 0.0, MAX_WAIT_SECS, "orphan grace")
}

fn parse_retries(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_RETRIES => Ok(n),
        _ => Err(format!("retries must be 0..={MAX_RETRIES}, not {s:?}")),
    }
}

fn parse_object_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if !v.is_power_of_two() || !(MIN_OBJECT_BYTES..=MAX_OBJECT_BYTES).contains(&v) {
        return Err(format!(
            "object size {v} must be a power of two from 64K ({MIN_OBJECT_BYTES}) to 256M ({MAX_OBJECT_BYTES})"
        ));
    }
    Ok(v)
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
    /// of the RAM files), or a store address s3://BUCKET/KEY.
    #[arg(short = 'o', long = "output", value_name = "FILE|s3://BUCKET/KEY", value_parser = LocationParser)]
    pub output: Location,
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
    /// Requests to a store.
    #[command(flatten)]
    pub store: StoreArgs,
    /// How a store snapshot is written.
    #[command(flatten)]
    pub store_write: StoreWriteArgs,
}

/// Options shared by save and restore.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Channel threads, each with its own descriptor (1 to 255); for a store, requests in
    /// flight at once (default 16).
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

/// Options of every command that talks to a store (`s3://BUCKET/KEY` only).
#[derive(Debug, Args)]
#[command(next_help_heading = "Store options (s3:// addresses only)")]
pub struct StoreArgs {
    /// Retries of one request after a 5xx, 429, timeout or connection error, with exponential
    /// backoff from 100 ms to 5 s (0 to 100; default 10).
    #[arg(long, value_name = "N", value_parser = parse_retries)]
    pub retries: Option<usize>,
    /// One attempt's limit in seconds, from connecting to the end of the body (default 30).
    #[arg(long, value_name = "SECS", value_parser = parse_request_timeout)]
    pub request_timeout: Option<Duration>,
    /// No retry of a request starts after this many seconds since its first attempt
    /// (default 60).
    #[arg(long, value_name = "SECS", value_parser = parse_retry_timeout)]
    pub retry_timeout: Option<Duration>,
}

impl StoreArgs {
    /// The first of these flags given, if any (they apply only to a store address).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            (self.retries.is_some(), "--retries"),
            (self.request_timeout.is_some(), "--request-timeout"),
            (self.retry_timeout.is_some(), "--retry-timeout"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// Options of the commands that write a store snapshot (`save`, `put`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Store options (s3:// addresses only)")]
pub struct StoreWriteArgs {
    /// Object size: the file is stored in objects of this many bytes, and an object that
    /// would hold only zeros is not uploaded (a power of two from 64K to 256M, e.g. 4M or
    /// 4MiB; default 4M).
    #[arg(long, value_name = "SIZE", value_parser = parse_object_size)]
    pub object_size: Option<u64>,
    /// After its commit, a save deletes the generations of objects that no manifest names
    /// (left by killed or failed saves) that started at least this many seconds before it
    /// (default 0, right for one host; give writers to one address from several hosts a
    /// grace above their clocks' skew).
    #[arg(long, value_name = "SECS", value_parser = parse_orphan_grace)]
    pub orphan_grace: Option<Duration>,
}

impl StoreWriteArgs {
    /// The first of these flags given, if any (they apply only to a store address).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            (self.object_size.is_some(), "--object-size"),
            (self.orphan_grace.is_some(), "--orphan-grace"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// Arguments of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot: a file or a store address s3://BUCKET/KEY.
    #[arg(value_name = "FILE|s3://BUCKET/KEY", value_parser = LocationParser)]
    pub file: Location,
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
    /// Requests to a store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The snapshot: a file or a store address s3://BUCKET/KEY.
    #[arg(value_name = "FILE|s3://BUCKET/KEY", value_parser = LocationParser)]
    pub file: Location,
    /// Bytes before the stream.
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
    /// Write the device state (bytes after the RAM END section) to this file (created 0600).
    #[arg(long, value_name = "FILE")]
    pub device_state_out: Option<PathBuf>,
    /// Requests to a store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The snapshot: a file or a store address s3://BUCKET/KEY.
    #[arg(value_name = "FILE|s3://BUCKET/KEY", value_parser = LocationParser)]
    pub file: Location,
    /// Compare this block with this RAM file (repeatable).
    #[arg(long = "ram", value_name = "NAME=PATH", value_parser = parse_ram)]
    pub ram: Vec<RamArg>,
    /// Bytes before the stream.
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
    /// Requests in flight at once to a store (1 to 255; default 16; s3:// only).
    #[arg(long, value_parser = parse_channels)]
    pub channels: Option<usize>,
    /// Requests to a store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Arguments of `put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The local mapped-ram file to upload (ours or QEMU's).
    pub file: PathBuf,
    /// The store address to upload it to.
    #[arg(value_name = "s3://BUCKET/KEY", value_parser = parse_store_url)]
    pub url: StoreUrl,
    /// Bytes before the stream in FILE, as in QEMU's `file:PATH,offset=N` (kept in the
    /// upload; `get` gives the same file back).
    #[arg(long, default_value = "0", value_parser = parse_offset)]
    pub offset: u64,
    /// Requests in flight at once (1 to 255).
    #[arg(long, default_value = "16", value_parser = parse_channels)]
    pub channels: usize,
    /// Requests to the store.
    #[command(flatten)]
    pub store: StoreArgs,
    /// How the snapshot is written.
    #[command(flatten)]
    pub store_write: StoreWriteArgs,
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The store address to download.
    #[arg(value_name = "s3://BUCKET/KEY", value_parser = parse_store_url)]
    pub url: StoreUrl,
    /// The local file to write (replaced atomically; created 0600).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Requests in flight at once (1 to 255).
    #[arg(long, default_value = "16", value_parser = parse_channels)]
    pub channels: usize,
    /// Requests to the store.
    #[command(flatten)]
    pub store: StoreArgs,
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
