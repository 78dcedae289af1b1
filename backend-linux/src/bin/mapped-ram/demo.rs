//! `mapped-ram demo`: a synthetic guest image saved, restored and verified, with GiB/s.

use std::time::Instant;

use serde_json::{json, Value};

use mapped_ram_linux::{
    default_channels, restore, save, synthetic_image, verify, RestoreOptions, RestoreRegion,
    SaveOptions, SaveRegion,
};

use crate::args::DemoArgs;
use crate::output::{restore_json, save_json, CliError};
use crate::signals::Interrupts;

/// Runs `demo`.
pub fn cmd_demo(a: DemoArgs, json: bool, sig: &Interrupts) -> Result<Value, CliError> {
    let ps = 4096u64;
    let size = a.size.div_ceil(ps) * ps;
    if size == 0 {
        return Err(CliError::new("demo size must be at least one page"));
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
    check_memory(size)?;
    let mut ram = zeroed(size)?;
    synthetic_image(&mut ram, ps as usize, 0x5eed);
    say(format!("  built in {:.2} s", t.elapsed().as_secs_f64()));
    let channels = a.channels.unwrap_or_else(default_channels);
    // Signals cancel the save and the restore; the snapshot is removed either way.
    let armed = sig.arm();
    let sopts = SaveOptions {
        channels,
        direct_io: a.direct_io,
        cancel: Some(armed.cancel()),
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
        let mut back = zeroed(size)?;
        let ropts = RestoreOptions {
            channels,
            direct_io: a.direct_io,
            memory_is_zeroed: true,
            cancel: Some(armed.cancel()),
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
            return Err(CliError::new(format!(
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
    drop(armed);
    if !a.keep {
        let _ = std::fs::remove_file(&path);
    }
    match (result, sig.received()) {
        (Err(e), Some(signal)) => Err(sig.cancelled(signal, "demo", e.message)),
        (r, _) => r,
    }
}

/// The demo holds the image and the restored copy in memory: refuse a size whose two copies
/// do not fit in the memory available now, instead of being killed by the OOM killer.
fn check_memory(size: u64) -> Result<(), CliError> {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib.saturating_mul(1024));
    match available {
        Some(avail) if size.saturating_mul(2) > avail => Err(CliError::new(format!(
            "demo size {size} needs {} bytes of memory (image and restored copy), only {avail} available",
            size.saturating_mul(2)
        ))),
        _ => Ok(()),
    }
}

/// `size` zero bytes, or an error when they cannot be allocated.
fn zeroed(size: u64) -> Result<Vec<u8>, CliError> {
    let n = usize::try_from(size)
        .map_err(|_| CliError::new(format!("demo size {size} does not fit in memory")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| CliError::new(format!("demo size {size}: {e}")))?;
    v.resize(n, 0);
    Ok(v)
}
