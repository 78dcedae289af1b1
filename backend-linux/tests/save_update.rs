//! `mapped-ram save --update`: the page counts it reports, and crash safety — a `kill -9` at
//! any moment leaves the old or the new snapshot at the path, never a mix.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use mapped_ram_linux::{inspect, restore, DirectIo, RestoreOptions, RestoreRegion};
use serde_json::Value;

const PS: usize = 4096;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mapped-ram"))
}

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Pseudo-random pages, about a quarter of them zero.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut v = vec![0u8; len];
    for page in v.chunks_mut(PS) {
        if next() % 4 == 0 {
            continue;
        }
        for w in page.chunks_mut(8) {
            w.copy_from_slice(&next().to_le_bytes());
        }
    }
    v
}

fn run_json(args: &[&str]) -> (i32, Value, String) {
    let out = bin().args(args).arg("--json").output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn restored(snap: &Path, len: usize) -> Vec<u8> {
    let mut back = vec![0xAAu8; len];
    let opts = RestoreOptions {
        channels: 2,
        direct_io: DirectIo::Off,
        ..RestoreOptions::default()
    };
    restore(
        snap,
        &mut [RestoreRegion {
            name: "pc.ram",
            memory: &mut back,
            page_size: PS as u64,
        }],
        &opts,
        None,
    )
    .unwrap_or_else(|e| panic!("restore of {}: {e}", snap.display()));
    back
}

#[test]
fn save_update_reports_compared_and_written_pages() {
    let d = dir("update-json");
    let ram = d.join("ram.bin");
    let snap = d.join("snap.mr");
    let mut a = image(8 << 20, 1);
    std::fs::write(&ram, &a).unwrap();
    let ram_arg = format!("pc.ram={}", ram.display());
    let snap_arg = snap.to_str().unwrap();
    let (code, v, err) = run_json(&["save", "--ram", &ram_arg, "-o", snap_arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["ok"], true);

    // Unchanged RAM: nothing to write, the file is left alone.
    let (code, v, err) = run_json(&["save", "--update", "--ram", &ram_arg, "-o", snap_arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["update"], true);
    assert_eq!(v["unchanged"], true);
    assert_eq!(v["pages_compared"], 2048);
    assert_eq!(v["pages_written"], 0);

    // 10 pages change, one stored page turns zero.
    for p in [3usize, 50, 51, 52, 700, 1000, 1500, 2000, 2046, 2047] {
        a[p * PS + 9] ^= 0x3c;
        if a[p * PS..(p + 1) * PS].iter().all(|&b| b == 0) {
            a[p * PS] = 1;
        }
    }
    let zeroed = (0..2048).find(|p| a[p * PS] != 0 && *p > 100).unwrap();
    a[zeroed * PS..(zeroed + 1) * PS].fill(0);
    std::fs::write(&ram, &a).unwrap();
    let (code, v, err) = run_json(&["save", "--update", "--ram", &ram_arg, "-o", snap_arg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["unchanged"], false);
    assert_eq!(v["pages_compared"], 2048);
    assert_eq!(v["pages_changed"], 11);
    assert_eq!(v["pages_written"], 10);
    assert_eq!(v["zero_pages"], 1);
    let copy = v["copy"].as_str().unwrap();
    assert!(copy == "full" || copy == "reflink", "{v}");
    assert!(v["data_bytes"].as_u64().unwrap() <= 10 * PS as u64, "{v}");
    assert_eq!(restored(&snap, a.len()), a);
    let (code, v, err) = run_json(&["verify", snap_arg, "--ram", &ram_arg]);
    assert_eq!(code, 0, "{err} {v}");

    // A RAM file of another size does not match the snapshot's layout.
    let other = d.join("other.bin");
    std::fs::write(&other, &a[..4 << 20]).unwrap();
    let before = std::fs::read(&snap).unwrap();
    let (code, v, err) = run_json(&[
        "save",
        "--update",
        "--ram",
        &format!("pc.ram={}", other.display()),
        "-o",
        snap_arg,
    ]);
    assert_eq!(code, 1, "{v}");
    assert!(
        err.contains("cannot update") && err.contains("pc.ram"),
        "{err}"
    );
    assert_eq!(std::fs::read(&snap).unwrap(), before);
    // Nothing to update.
    let missing = d.join("missing.mr");
    let (code, _, err) = run_json(&[
        "save",
        "--update",
        "--ram",
        &ram_arg,
        "-o",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no snapshot to update"), "{err}");
}

fn temporaries(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".mapped-ram-tmp."))
        .collect()
}

#[test]
fn save_update_survives_kill_9_at_any_moment() {
    let d = dir("update-kill");
    let len = 48 << 20;
    let old = image(len, 7);
    // The new RAM differs in about half of the pages.
    let mut new = old.clone();
    let mut s = 12345u64;
    for page in new.chunks_mut(PS) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        if s % 2 == 0 {
            page[(s % PS as u64) as usize] ^= 0xa5;
        }
    }
    let old_ram = d.join("old.bin");
    let new_ram = d.join("new.bin");
    std::fs::write(&old_ram, &old).unwrap();
    std::fs::write(&new_ram, &new).unwrap();
    let pristine = d.join("pristine.mr");
    let (code, _, err) = run_json(&[
        "save",
        "--ram",
        &format!("pc.ram={}", old_ram.display()),
        "-o",
        pristine.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let snap = d.join("snap.mr");
    let update = |snap: &Path| {
        let mut c = bin();
        c.args([
            "save",
            "--update",
            "--json",
            "--channels",
            "2",
            "--ram",
            &format!("pc.ram={}", new_ram.display()),
            "-o",
            snap.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    };
    // How long an undisturbed update takes.
    std::fs::copy(&pristine, &snap).unwrap();
    let t = Instant::now();
    assert!(update(&snap).status().unwrap().success());
    let full = t.elapsed();
    assert_eq!(restored(&snap, len), new);
    eprintln!("an undisturbed update takes {full:?}");

    let (mut saw_old, mut saw_new, mut killed_running) = (0, 0, 0);
    for k in 0..=16u32 {
        std::fs::copy(&pristine, &snap).unwrap();
        let delay = full.mul_f64(f64::from(k) / 14.0);
        let mut child = update(&snap).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed_running += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        inspect(&snap, 0).unwrap_or_else(|e| panic!("kill after {delay:?}: {e}"));
        let got = restored(&snap, len);
        if got == old {
            saw_old += 1;
        } else if got == new {
            saw_new += 1;
        } else {
            panic!("kill after {delay:?}: the snapshot is neither the old nor the new one");
        }
    }
    eprintln!(
        "17 kills ({killed_running} while the update ran): {saw_old} left the old snapshot, {saw_new} the new one"
    );
    assert!(killed_running >= 8, "too few kills landed mid-update");
    assert!(saw_old >= 1, "no kill landed before the rename");
    // A complete update afterwards cleans up what the killed ones left behind.
    std::fs::copy(&pristine, &snap).unwrap();
    assert!(update(&snap).status().unwrap().success());
    assert_eq!(restored(&snap, len), new);
    assert_eq!(temporaries(&d), Vec::<String>::new());
}

/// `create_snapshot` with each `SnapshotType`: a full snapshot, a diff from a dirty log, a
/// comparison; each restores byte-identical, and the diff writes only the dirty pages.
#[test]
fn create_snapshot_full_diff_and_compare() {
    use mapped_ram_linux::{create_snapshot, GuestMemory, Region, SaveOptions, SnapshotType};
    let d = dir("create-snapshot");
    let path = d.join("snap.mr");
    let mut ram = image(8 << 20, 11);
    let opts = SaveOptions {
        channels: 2,
        fsync: false,
        direct_io: DirectIo::Auto,
        ..SaveOptions::default()
    };
    let check = |ram: &[u8]| {
        let mut back = vec![0u8; ram.len()];
        restore(
            &path,
            &mut [RestoreRegion {
                name: "pc.ram",
                memory: &mut back,
                page_size: PS as u64,
            }],
            &RestoreOptions::default(),
            None,
        )
        .unwrap();
        assert!(back == ram, "restores byte-identical");
    };
    let full = {
        let regions = [Region {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: PS as u64,
        }];
        create_snapshot(&path, &regions, SnapshotType::Full, &opts).unwrap()
    };
    assert_eq!(full.pages, (8 << 20) / PS as u64);
    check(&ram);
    // Three pages change; the dirty log marks them (and one that did not change).
    let mut log = vec![0u64; (8 << 20) / PS / 64];
    for page in [3usize, 700, 2047] {
        ram[page * PS] ^= 0x5a;
        log[page / 64] |= 1 << (page % 64);
    }
    log[0] |= 1 << 9;
    let diff = {
        let regions = [Region {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: PS as u64,
        }];
        create_snapshot(&path, &regions, SnapshotType::Diff(&[&log]), &opts).unwrap()
    };
    assert_eq!(diff.writes, 4, "one write per dirty page");
    check(&ram);
    ram[100 * PS + 5] ^= 1;
    let compared = {
        let regions = [Region {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: PS as u64,
        }];
        create_snapshot(&path, &regions, SnapshotType::Compare, &opts).unwrap()
    };
    assert_eq!(compared.writes, 1, "only the page that differs");
    check(&ram);
    // Both restore modes through the one entry point.
    use mapped_ram_linux::{restore_snapshot, RestoreMode, Restored};
    let mut back = vec![0u8; ram.len()];
    let mut regions = [RestoreRegion {
        name: "pc.ram",
        memory: &mut back,
        page_size: PS as u64,
    }];
    let r = restore_snapshot(
        &path,
        RestoreMode::Copy(&mut regions),
        &RestoreOptions::default(),
    );
    assert!(matches!(r, Ok(Restored::Copied(_))));
    assert!(back == ram);
    let Ok(Restored::Mapped(lazy)) = restore_snapshot(
        &path,
        RestoreMode::Lazy(&["pc.ram"]),
        &RestoreOptions::default(),
    ) else {
        panic!("lazy restore")
    };
    assert!(lazy.block("pc.ram").unwrap().mapping().as_slice() == ram.as_slice());
    assert_eq!(inspect(&path, 0).unwrap().blocks.len(), 1);
}

/// An empty device state is "no device state" (a bare `QEMU_VM_EOF`), with or without page
/// checksums: before, it wrote a file that ended right after RAM END, which `inspect` and
/// `restore` rejected.
#[test]
fn an_empty_device_state_writes_a_loadable_file() {
    use mapped_ram_linux::{read_device_state, save, SaveOptions, SaveRegion};
    let d = dir("empty-device-state");
    let ram = image(1 << 20, 5);
    for checksums in [false, true] {
        let path = d.join(format!("s-{checksums}.mr"));
        let opts = SaveOptions {
            checksums,
            device_state: Some(Vec::new()),
            fsync: false,
            ..SaveOptions::default()
        };
        save(
            &path,
            &[SaveRegion {
                name: "pc.ram",
                memory: &ram,
                page_size: PS as u64,
            }],
            &opts,
            None,
        )
        .unwrap();
        let info = inspect(&path, 0).unwrap_or_else(|e| panic!("checksums {checksums}: {e}"));
        // With the records (checksums on) the file says no device state was given; without
        // them the device state is what follows RAM END: the bare QEMU_VM_EOF.
        let expected: &[u8] = if checksums { &[] } else { &[0] };
        assert_eq!(read_device_state(&path, 0).unwrap(), expected);
        assert_eq!(info.device_state_given, checksums.then_some(false));
        let mut back = vec![0u8; ram.len()];
        restore(
            &path,
            &mut [RestoreRegion {
                name: "pc.ram",
                memory: &mut back,
                page_size: PS as u64,
            }],
            &RestoreOptions::default(),
            None,
        )
        .unwrap();
        assert!(back == ram);
    }
}

/// "No device state" and a one-byte device state are told apart (in files with the records),
/// and the blocks' guest address ranges are recorded, returned by `inspect`, and kept by an
/// update that gives none.
#[test]
fn device_state_presence_and_guest_ranges_are_recorded() {
    use mapped_ram_linux::{
        read_device_state, save, update, Changes, GuestMemory, GuestRanges, LiveRegion,
        SaveOptions, SaveRegion, UpdateOptions,
    };
    let d = dir("extension");
    let ram = image(2 << 20, 8);
    let bios = image(64 << 10, 9);
    let regions = [
        SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: PS as u64,
        },
        SaveRegion {
            name: "pc.bios",
            memory: &bios,
            page_size: PS as u64,
        },
    ];
    // pc.ram below and above a hole, as QEMU's does around the 32-bit PCI window.
    let ranges = vec![0..(1u64 << 20), (4u64 << 30)..(4u64 << 30) + (1 << 20)];
    let opts = |state: Option<Vec<u8>>| SaveOptions {
        device_state: state,
        fsync: false,
        guest_ranges: vec![GuestRanges {
            block: "pc.ram".into(),
            ranges: ranges.clone(),
        }],
        ..SaveOptions::default()
    };
    let none = d.join("none.mr");
    let one = d.join("one.mr");
    save(&none, &regions, &opts(None), None).unwrap();
    save(&one, &regions, &opts(Some(vec![0x00])), None).unwrap();
    assert_eq!(read_device_state(&none, 0).unwrap(), Vec::<u8>::new());
    assert_eq!(read_device_state(&one, 0).unwrap(), [0x00]);
    let info = inspect(&one, 0).unwrap();
    assert_eq!(info.device_state_given, Some(true));
    assert_eq!(info.blocks[0].guest_ranges, ranges);
    assert!(info.blocks[1].guest_ranges.is_empty());
    // An update keeps the recorded ranges and the device state.
    let mut changed = ram.clone();
    changed[4096] ^= 1;
    let live = [
        LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&changed),
            page_size: PS as u64,
        },
        LiveRegion {
            name: "pc.bios",
            memory: GuestMemory::from_slice(&bios),
            page_size: PS as u64,
        },
    ];
    let u = update(&one, &live, Changes::Compare, &UpdateOptions::default()).unwrap();
    assert_eq!(u.pages_changed, 1);
    let info = inspect(&one, 0).unwrap();
    assert_eq!(info.blocks[0].guest_ranges, ranges);
    assert_eq!(info.device_state_given, Some(true));
    assert_eq!(read_device_state(&one, 0).unwrap(), [0x00]);
    // A damaged extension byte is caught by the metadata checksum.
    let ext = info.integrity.unwrap().extension.unwrap();
    let mut bytes = std::fs::read(&one).unwrap();
    bytes[ext.0 as usize + 6] ^= 0x40;
    let bad = d.join("bad.mr");
    std::fs::write(&bad, &bytes).unwrap();
    let err = inspect(&bad, 0).unwrap_err();
    assert!(
        err.to_string().contains("metadata checksum mismatch"),
        "{err}"
    );
}
