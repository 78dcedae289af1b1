//! End to end with a real vCPU: `kvm-vmm save` live-saves a running guest, `kvm-vmm resume`
//! restores it in a new process (copying and lazily), checks its memory against the dump
//! taken when its vCPU stopped and that it carries on; a lazily restored guest is re-snapshot
//! live onto the same path and restored again.
//!
//! Needs `/dev/kvm`. Without it the test **fails**, unless `MAPPED_RAM_ALLOW_SKIP` lists `kvm`
//! (comma-separated), in which case it prints a `SKIPPED` line and returns.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const MIB: &str = "128";
const PAGES: u64 = 128 << 8;

/// Whether the environment allows skipping `what` (`MAPPED_RAM_ALLOW_SKIP=kvm,...`).
fn skip_allowed(what: &str) -> bool {
    std::env::var("MAPPED_RAM_ALLOW_SKIP")
        .map(|v| v.split(',').any(|s| s.trim() == what))
        .unwrap_or(false)
}

/// `true` if KVM works; otherwise panics, or returns `false` when the skip is allowed.
fn require_kvm() -> bool {
    let Some(why) = mapped_ram_kvm_vmm::vm::kvm_unavailable() else {
        return true;
    };
    if skip_allowed("kvm") {
        eprintln!("SKIPPED (KVM test, MAPPED_RAM_ALLOW_SKIP allows it): {why}");
        return false;
    }
    panic!("the KVM test cannot run: {why}; set MAPPED_RAM_ALLOW_SKIP=kvm to skip it explicitly");
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvm-vmm"))
        .args(args)
        .output()
        .expect("run kvm-vmm")
}

/// Runs `kvm-vmm` and returns its JSON report; panics with its stderr if it failed.
fn vmm_ok(args: &[&str]) -> Value {
    let out = vmm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kvm-vmm {args:?} failed ({}): {stderr}",
        out.status
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("kvm-vmm prints JSON");
    eprintln!("kvm-vmm {}: {v}", args[0]);
    v
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// What a save (or re-snapshot) report must show: a first pass over every page, live passes,
/// a final pass, a running guest.
fn check_save(v: &Value) {
    let passes = v["passes"].as_array().expect("passes");
    assert!(passes.len() >= 2, "{v}");
    assert_eq!(
        u(&passes[0], "pages"),
        PAGES,
        "first pass covers all RAM: {v}"
    );
    assert!(u(v, "counter") > 0, "the guest ran: {v}");
    assert_eq!(u(v, "pages"), PAGES);
}

/// What a resume report must show: memory equal to the dump, and the guest carried on.
fn check_resume(v: &Value, mode: &str) {
    assert_eq!(v["mode"], mode);
    assert_eq!(v["memory_equals_dump"], true, "{v}");
    assert!(u(v, "stores_after_resume") > 0, "{v}");
    assert!(u(v, "counter_after") > u(v, "saved_counter"), "{v}");
    assert!(u(v, "pages_rewritten_after_resume") > 0, "{v}");
}

#[test]
fn live_save_then_copy_and_lazy_restore_in_new_processes() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("guest.mr");
    let p = path.to_str().expect("utf-8 path");
    let dump = format!("{p}.dump");

    let saved = vmm_ok(&["save", p, "--mib", MIB, "--passes", "3"]);
    check_save(&saved);
    assert_eq!(std::fs::metadata(&dump).expect("dump").len(), PAGES * 4096);

    // Copying restore; a short run, so that usually fewer pages than RAM holds are stored to
    // and the exact-continuation check sees both rewritten and untouched pages.
    let copy = vmm_ok(&["resume", p, "--mode", "copy", "--run-ms", "100"]);
    check_resume(&copy, "copy");
    assert_eq!(u(&copy, "saved_counter"), u(&saved, "counter"));

    let lazy = vmm_ok(&["resume", p, "--mode", "lazy", "--run-ms", "200"]);
    check_resume(&lazy, "lazy");
    assert_eq!(u(&lazy, "saved_counter"), u(&saved, "counter"));

    // A single flipped byte in the dump: the restorer's check fails, naming the byte.
    let flipped = dir.path().join("flipped.dump");
    let mut bytes = std::fs::read(&dump).expect("read dump");
    let at = 4096 * 1000 + 77;
    bytes[at] ^= 0x20;
    std::fs::write(&flipped, &bytes).expect("write flipped dump");
    drop(bytes);
    let out = vmm(&[
        "resume",
        p,
        "--mode",
        "copy",
        "--dump",
        flipped.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("differs from the dump at byte {at:#x}")),
        "{stderr}"
    );

    // Chain: lazy restore, live re-snapshot of the running restored guest onto the same path
    // (which the restore still maps), then a copying restore of the new snapshot.
    let chain = vmm_ok(&[
        "resume",
        p,
        "--mode",
        "lazy",
        "--run-ms",
        "100",
        "--resnapshot",
        "--passes",
        "3",
    ]);
    check_resume(&chain, "lazy");
    check_save(&chain["resnapshot"]);
    let resnap = u(&chain["resnapshot"], "counter");
    assert!(resnap > u(&saved, "counter"));
    let again = vmm_ok(&["resume", p, "--mode", "copy", "--run-ms", "100"]);
    check_resume(&again, "copy");
    assert_eq!(u(&again, "saved_counter"), resnap);
    assert!(Path::new(&dump).exists());
}
