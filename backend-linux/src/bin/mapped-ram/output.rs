//! What the tool prints: the error type and its exit status, the progress bar, and the JSON
//! forms of the library's reports (documented in the README).

use serde_json::{json, Value};

use mapped_ram_linux::store::{Manifest, StoreSaveReport, TransferReport};
use mapped_ram_linux::{Progress, RestoreReport, SaveReport, SnapshotInfo};

use crate::signals::Interrupts;

/// A command failure: the message printed after `error: `, and the exit status.
#[derive(Debug)]
pub struct CliError {
    /// One line (newlines are replaced when printed).
    pub message: String,
    /// 1; 2 for a usage error found after parsing (flags that do not go together); or
    /// 128 + the signal number for an operation a signal cancelled.
    pub status: i32,
    /// The library reported the operation as cancelled (through `Cancel`), nothing else.
    pub cancelled: bool,
}

impl CliError {
    /// A failure with exit status 1.
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            status: 1,
            cancelled: false,
        }
    }

    /// A usage error (exit status 2), found before anything was read, written or sent.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            status: 2,
            ..CliError::new(message)
        }
    }
}

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::new(e.to_string())
    }
}

/// Prints the outcome of a command and returns the exit status.
pub fn finish(result: Result<Value, CliError>, json: bool) -> i32 {
    match result {
        Ok(out) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
            0
        }
        Err(CliError {
            message, status, ..
        }) => {
            let one_line = message.replace('\n', " ");
            if json {
                println!(
                    "{}",
                    json!({ "ok": false, "error": one_line, "status": status })
                );
            }
            eprintln!("error: {one_line}");
            status
        }
    }
}

/// Runs `op` with a progress callback that drives a progress bar named `what` (none with
/// `--json` or when stderr is not a terminal) and the signal test hook
/// ([`Interrupts::test_hook`]); the bar is cleared when `op` returns.
pub fn with_progress<T>(
    json: bool,
    what: &str,
    sig: &Interrupts,
    op: impl FnOnce(&mut dyn FnMut(Progress)) -> T,
) -> T {
    let bar = progress_bar(json, what);
    let mut hook = sig.test_hook();
    let mut cb = |p: Progress| {
        hook();
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    };
    let result = op(&mut cb);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// A progress bar on stderr when it is a terminal and the output is not JSON.
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

/// The JSON form of a save report.
pub fn save_json(r: &SaveReport) -> Value {
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

/// The JSON form of a restore report.
pub fn restore_json(r: &RestoreReport) -> Value {
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

/// The JSON form of a snapshot's structure.
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

/// An object size in words: `4 MiB`, `64 KiB` (object sizes are powers of two from 64 KiB).
pub fn object_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The JSON form of a save to a store: a save's, with the store's part.
pub fn store_save_json(r: &StoreSaveReport, object_bytes: u64) -> Value {
    let mut v = save_json(&r.save);
    if let Some(o) = v.as_object_mut() {
        o.insert("url".into(), json!(r.save.path));
        o.insert("generation".into(), json!(r.generation));
        o.insert("object_bytes".into(), json!(object_bytes));
        o.insert("objects_uploaded".into(), json!(r.objects_uploaded));
        o.insert("objects_total".into(), json!(r.objects_total));
        o.insert("bytes_uploaded".into(), json!(r.bytes_uploaded));
        o.insert("objects_deleted".into(), json!(r.objects_deleted));
    }
    v
}

/// The JSON form of a store snapshot's manifest.
pub fn manifest_json(m: &Manifest) -> Value {
    json!({
        "generation": m.generation,
        "previous": m.previous,
        "file_size": m.file_size,
        "stream_offset": m.stream_offset,
        "object_bytes": m.object_bytes,
        "objects_total": m.object_count(),
        "objects_stored": m.present_count(),
        "metadata_objects": m.metadata.len(),
        "stored_bytes": m.stored_bytes,
        "created_unix": m.created_unix,
    })
}

/// The JSON form of a `put` or `get`.
pub fn transfer_json(command: &str, r: &TransferReport, channels: usize) -> Value {
    json!({
        "ok": true,
        "command": command,
        "url": r.url,
        "path": r.path,
        "file_size": r.file_size,
        "objects_total": r.objects_total,
        "objects_transferred": r.objects_transferred,
        "bytes_transferred": r.bytes_transferred,
        "generation": r.generation,
        "objects_deleted": r.objects_deleted,
        "seconds": r.seconds,
        "gib_per_s": r.gib_per_second(),
        "channels": channels,
    })
}
