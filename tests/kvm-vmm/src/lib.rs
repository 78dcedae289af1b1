//! A minimal KVM VMM that snapshots its guest with mapped-ram: an example for VMM authors and
//! the end-to-end test of live save, copying restore and lazy restore with a real vCPU.
//!
//! * [`vm`] — guest RAM, one VM, one real-mode vCPU running [`vm::GUEST_CODE`] (a counter
//!   stored into every page, over and over), stopped with `immediate_exit` and a signal.
//! * [`snapshot`] — every call into `mapped_ram_linux`: live save fed by `KVM_GET_DIRTY_LOG`,
//!   the vCPU registers as device state, copying and lazy restore.
//! * [`check`] — memory against a dump, and the counter carrying on after a resume.
//!
//! The `kvm-vmm` binary runs [`save`] and [`resume`] in separate processes:
//!
//! ```text
//! kvm-vmm save PATH [--mib 128] [--passes 8] [--target-dirty-pages 1024] [--warmup-ms 200] [--dump FILE] [--no-prefill]
//! kvm-vmm resume PATH --mode copy|lazy [--run-ms 300] [--resnapshot] [--dump FILE]
//! ```
//!
//! Both print one JSON object with what they measured; a failed check exits with status 1.

pub mod check;
pub mod snapshot;
pub mod vm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vm::{Error, GuestRam, Machine, VcpuState, GUEST_CODE};

/// The dump written beside a snapshot unless told otherwise: `PATH.dump`.
pub fn default_dump(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".dump");
    s.into()
}

fn count_ones(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pass_json(i: usize, p: &snapshot::Pass) -> Value {
    json!({ "pass": i, "pages": p.pages, "written": p.written, "ms": p.seconds * 1e3 })
}

/// When a live save stops the guest.
#[derive(Debug, Clone, Copy)]
pub struct Converge {
    /// Most live passes after the first (full) one.
    pub max_passes: usize,
    /// Stop the guest once the dirty log holds at most this many pages.
    pub target_pages: u64,
}

/// Live-saves the running guest of `m` to `path`: a full pass, then passes of the pages in
/// the dirty log until the log is small enough or the passes run out; then stops the vCPU,
/// finishes with the final dirty log and the registers, and writes the stopped guest's memory
/// to `dump`. Returns the registers and the measurements.
fn live_save(
    m: &Machine,
    path: &Path,
    converge: Converge,
    dump: &Path,
    running_since: Instant,
) -> Result<(VcpuState, Value), Error> {
    let mut live = snapshot::Live::begin(path, m.ram())?;
    // Fetching the log clears it: fetch before the first pass too (its bitmap is ignored, but
    // what the guest dirties during that pass must show up in the next log).
    let mut done = vec![live.pass(&m.dirty_log()?)?];
    let mut pending = m.dirty_log()?;
    while done.len() <= converge.max_passes && count_ones(&pending) > converge.target_pages {
        done.push(live.pass(&pending)?);
        pending = m.dirty_log()?;
    }
    let kick = Instant::now();
    m.stop()?;
    let stopped = Instant::now();
    let state = m.state()?;
    // The last log fetched while running was not passed yet: the final pass takes it too.
    let mut log = m.dirty_log()?;
    for (w, p) in log.iter_mut().zip(&pending) {
        *w |= p;
    }
    let device_state = state.to_bytes()?;
    let finished = live.finish_pass(&log, &device_state)?;
    // The guest could resume here; the commit below only makes the snapshot durable.
    let may_resume = Instant::now();
    let last = finished.commit()?;
    let durable = Instant::now();
    done.push(last);
    let mem = m.ram_stopped()?;
    std::fs::write(dump, mem).map_err(|e| format!("write {}: {e}", dump.display()))?;
    // The saved registers must predict the saved memory (the guest is what we think it is).
    check::check_consistent(mem, &check::page_counters(mem), &state)?;
    let pages = m.ram().len() as u64 / vm::PAGE;
    let resume_ok = may_resume - stopped;
    Ok((
        state,
        json!({
            "pages": pages,
            "passes": done.iter().enumerate().map(|(i, p)| pass_json(i, p)).collect::<Vec<_>>(),
            "stop_kick_ms": ms(stopped - kick),
            "downtime_resume_ms": ms(resume_ok),
            "downtime_durable_ms": ms(durable - stopped),
            "device_state_bytes": device_state.len(),
            "counter": state.counter(),
            "guest_ran_ms": ms(stopped - running_since),
        }),
    ))
}

/// Options of [`save`].
#[derive(Debug, Clone)]
pub struct SaveArgs {
    /// Guest RAM in MiB.
    pub mib: u64,
    /// Milliseconds the guest runs before the save starts.
    pub warmup_ms: u64,
    /// When to stop the guest.
    pub converge: Converge,
    /// Where the stopped guest's memory goes.
    pub dump: PathBuf,
    /// Fill bytes 8.. of every data page with 0xA5 before boot, so that all of RAM holds data
    /// (as in a guest that has used all its memory) even where the counter was not stored yet.
    pub prefill: bool,
}

/// Boots the guest, lets it run, live-saves it to `path` and writes the dump.
pub fn save(path: &Path, a: &SaveArgs) -> Result<Value, Error> {
    let len = usize::try_from(a.mib << 20)?;
    let mut ram = GuestRam::anonymous(len)?;
    ram.bytes_mut()[..GUEST_CODE.len()].copy_from_slice(&GUEST_CODE);
    if a.prefill {
        for page in ram.bytes_mut().chunks_mut(vm::PAGE as usize).skip(1) {
            page[8..].fill(0xA5);
        }
    }
    let mut m = Machine::new(ram)?;
    m.set_state(&m.initial_state()?)?;
    let first = m.start()?;
    std::thread::sleep(Duration::from_millis(a.warmup_ms));
    let since = first
        .get()
        .copied()
        .ok_or("the vCPU never entered KVM_RUN")?;
    let (_, mut out) = live_save(&m, path, a.converge, &a.dump, since)?;
    out["mode"] = "save".into();
    out["mib"] = a.mib.into();
    Ok(out)
}

/// How [`resume`] restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `restore`: read every page into anonymous memory.
    Copy,
    /// `restore_lazy`: map the snapshot privately.
    Lazy,
}

/// Options of [`resume`].
#[derive(Debug, Clone)]
pub struct ResumeArgs {
    /// Copy or lazy.
    pub mode: Mode,
    /// The dump the restored memory must equal.
    pub dump: PathBuf,
    /// Milliseconds the guest runs after the resume.
    pub run_ms: u64,
    /// Live-save the running restored guest to the same path (and its dump) afterwards.
    pub resnapshot: bool,
    /// When the re-snapshot stops the guest.
    pub converge: Converge,
}

/// Restores the guest saved at `path`, checks its memory against the dump, runs it, stops it
/// and checks that it carried on; optionally re-snapshots it while it runs.
pub fn resume(path: &Path, a: &ResumeArgs) -> Result<Value, Error> {
    let t0 = Instant::now();
    let restored = match a.mode {
        Mode::Copy => snapshot::restore_copy(path)?,
        Mode::Lazy => snapshot::restore_lazy(path)?,
    };
    let saved = VcpuState::from_bytes(&restored.device_state)?;
    let t_setup = Instant::now();
    let mut m = Machine::new(restored.ram)?;
    m.set_state(&saved)?;
    let setup = t_setup.elapsed();
    let restore_total = t_setup - t0;

    // (a) memory right after the restore equals the dump taken when the vCPU stopped.
    let t_cmp = Instant::now();
    let mut dump = std::io::BufReader::new(
        std::fs::File::open(&a.dump).map_err(|e| format!("open {}: {e}", a.dump.display()))?,
    );
    let before = check::compare_with_dump(m.ram_stopped()?, &mut dump)?;
    check::check_consistent(m.ram_stopped()?, &before, &saved)?;
    let compare = t_cmp.elapsed();

    let t_start = Instant::now();
    let first = m.start()?;
    let started = loop {
        if let Some(t) = first.get() {
            break *t;
        }
        std::thread::sleep(Duration::from_micros(20));
    };
    let start_latency = started - t_start;
    std::thread::sleep(Duration::from_millis(a.run_ms));

    let mut out = json!({
        "mode": match a.mode { Mode::Copy => "copy", Mode::Lazy => "lazy" },
        "mib": m.ram().len() >> 20,
        "restore_ms": restored.seconds * 1e3,
        "restore_with_device_state_ms": ms(restore_total),
        "vm_setup_ms": ms(setup),
        "vcpu_start_ms": ms(start_latency),
        "first_instruction_ms": ms(restore_total + setup + start_latency),
        "compare_ms": ms(compare),
        "memory_equals_dump": true,
        "saved_counter": saved.counter(),
    });
    let now = if a.resnapshot {
        // The dump is rewritten by the re-snapshot: `before` holds what (b) needs of the old one.
        let (now, snap) = live_save(&m, path, a.converge, &a.dump, started)?;
        out["resnapshot"] = snap;
        now
    } else {
        m.stop()?;
        out["guest_ran_ms"] = ms(started.elapsed()).into();
        m.state()?
    };
    // (b) the guest carried on from where it stopped.
    let cont = check::check_continued(&before, &saved, m.ram_stopped()?, &now)?;
    out["counter_after"] = now.counter().into();
    out["stores_after_resume"] = cont.stores.into();
    out["pages_rewritten_after_resume"] = cont.pages_rewritten.into();
    Ok(out)
}
