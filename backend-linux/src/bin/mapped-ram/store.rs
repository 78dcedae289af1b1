//! Store addresses (`s3://BUCKET/KEY`) on the command line: the flags that apply only to a
//! store or only to a file, checked before anything is read or sent, and the connection built
//! from the store flags (endpoint and credentials come from the `AWS_*` environment, which the
//! library reads).

use mapped_ram_linux::store::{Store, StoreOptions, StoreUrl};

use crate::args::{StoreArgs, StoreWriteArgs};
use crate::output::CliError;

/// Requests in flight at once when `--channels` is not given.
pub const DEFAULT_CHANNELS: usize = 16;

/// A flag given with a store address that applies only to a file: a usage error (exit
/// status 2) naming the flag, the address and why.
pub fn not_for_store(flag: &str, url: &StoreUrl, why: &str) -> CliError {
    CliError::usage(format!(
        "{flag} cannot be used with the store address {}: {why}",
        url.display()
    ))
}

/// Refuses the first `(given, flag, why)` that was given with a store address.
pub fn reject_file_flags(url: &StoreUrl, flags: &[(bool, &str, &str)]) -> Result<(), CliError> {
    match flags.iter().find(|(given, _, _)| *given) {
        Some((_, flag, why)) => Err(not_for_store(flag, url, why)),
        None => Ok(()),
    }
}

/// Refuses store flags given with a local file (usage error, exit status 2).
pub fn reject_store_flags(
    file: &str,
    store: &StoreArgs,
    write: Option<&StoreWriteArgs>,
    channels_only_for_store: Option<usize>,
) -> Result<(), CliError> {
    let flag = store
        .first_given()
        .or_else(|| write.and_then(StoreWriteArgs::first_given))
        .or(channels_only_for_store.map(|_| "--channels"));
    match flag {
        Some(flag) => Err(CliError::usage(format!(
            "{flag} applies only to a store address s3://BUCKET/KEY, not to the file {file}"
        ))),
        None => Ok(()),
    }
}

/// The library's options from the flags (`channels` given or [`DEFAULT_CHANNELS`]; the
/// library's defaults for the rest).
pub fn options(
    channels: Option<usize>,
    store: &StoreArgs,
    write: Option<&StoreWriteArgs>,
) -> StoreOptions {
    let d = StoreOptions::default();
    StoreOptions {
        channels: channels.unwrap_or(DEFAULT_CHANNELS),
        object_bytes: write.and_then(|w| w.object_size).unwrap_or(d.object_bytes),
        retries: store.retries.unwrap_or(d.retries),
        retry_timeout: store.retry_timeout.unwrap_or(d.retry_timeout),
        request_timeout: store.request_timeout.unwrap_or(d.request_timeout),
        orphan_grace: write.and_then(|w| w.orphan_grace).unwrap_or(d.orphan_grace),
        ..d
    }
}

/// Connects to `url` with `opts` (nothing is sent yet).
pub fn connect(url: &StoreUrl, opts: StoreOptions) -> Result<Store, CliError> {
    Ok(Store::connect(&url.display(), opts)?)
}
