//! `mapped-ram put` and `mapped-ram get`: a local mapped-ram file to a store address and back,
//! byte for byte (see [`Store::put`] and [`Store::get`]).

use serde_json::Value;

use mapped_ram_linux::store::{Store, StoreError, TransferReport};
use mapped_ram_linux::{Cancel, Progress};

use crate::args::{GetArgs, PutArgs};
use crate::files::{kind, require_regular};
use crate::output::{transfer_json, with_progress, CliError};
use crate::signals::Interrupts;
use crate::store;

/// Runs `put`.
pub fn cmd_put(a: PutArgs, json: bool, sig: &Interrupts) -> Result<Value, CliError> {
    require_regular(&a.file, "file")?;
    std::fs::metadata(&a.file)
        .map_err(|e| CliError::new(format!("file {}: {e}", a.file.display())))?;
    let url = a.url.display();
    let s = store::connect(
        &a.url,
        store::options(Some(a.channels), &a.store, Some(&a.store_write)),
    )?;
    let r = run(
        json,
        sig,
        "put",
        |cb, cancel| s.put(&a.file, a.offset, Some(cb), Some(cancel)),
        &format!("put of {} to {url}", a.file.display()),
        &format!("nothing was committed, the objects it had uploaded were deleted and {url} was left as it was"),
    )?;
    if !json {
        println!(
            "put {} to {url}: {} of {} objects ({:.1} MiB of the {:.1} MiB file) uploaded as generation {} in {:.3} s: {:.2} GiB/s, {} channel(s)",
            a.file.display(),
            r.objects_transferred,
            r.objects_total,
            mib(r.bytes_transferred),
            mib(r.file_size),
            r.generation,
            r.seconds,
            r.gib_per_second(),
            a.channels,
        );
        if r.objects_deleted > 0 {
            println!(
                "deleted {} object(s) of older generations",
                r.objects_deleted
            );
        }
    }
    Ok(transfer_json("put", &r, a.channels))
}

/// Runs `get`.
pub fn cmd_get(a: GetArgs, json: bool, sig: &Interrupts) -> Result<Value, CliError> {
    // Replacing FILE must not replace a directory, a device or a FIFO with a regular file.
    match std::fs::metadata(&a.output) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(CliError::new(format!(
                "{} is {}: refusing to replace it with a regular file",
                a.output.display(),
                kind(&m)
            )))
        }
        _ => {}
    }
    let url = a.url.display();
    let s: Store = store::connect(&a.url, store::options(Some(a.channels), &a.store, None))?;
    let r = run(
        json,
        sig,
        "get",
        |cb, cancel| s.get(&a.output, Some(cb), Some(cancel)),
        &format!("get of {url}"),
        &format!(
            "the temporary file was removed and {} was left as it was",
            a.output.display()
        ),
    )?;
    if !json {
        println!(
            "got {url} into {}: {} of {} objects ({:.1} MiB of the {:.1} MiB file) downloaded, generation {}, in {:.3} s: {:.2} GiB/s, {} channel(s)",
            a.output.display(),
            r.objects_transferred,
            r.objects_total,
            mib(r.bytes_transferred),
            mib(r.file_size),
            r.generation,
            r.seconds,
            r.gib_per_second(),
            a.channels,
        );
    }
    Ok(transfer_json("get", &r, a.channels))
}

/// Runs the transfer `op` (`what`: `put` or `get`) with a progress bar and the signal
/// handling of a cancellable operation: a signal cancels it, and the error then says what
/// the cancellation `left` of the `described` transfer.
fn run(
    json: bool,
    sig: &Interrupts,
    what: &str,
    op: impl FnOnce(&mut dyn FnMut(Progress), &Cancel) -> Result<TransferReport, StoreError>,
    described: &str,
    left: &str,
) -> Result<TransferReport, CliError> {
    let armed = sig.arm();
    let cancel = armed.cancel();
    let result = with_progress(json, what, sig, |cb| op(cb, &cancel)).map_err(|e| CliError {
        cancelled: matches!(e, StoreError::Cancelled { .. }),
        ..CliError::from(e)
    });
    drop(armed);
    sig.outcome(result, described, left)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
