//! Races an operator (or an attacker with write access to the directory) can provoke, made
//! deterministic with the fault seam's hook (`FaultKind::Hook`: a function run right before a
//! chosen system call), not with sleeps.
//!
//! * A save renamed over the path while a restore opens its channels: the restore reads one
//!   snapshot, never a mix (issue 12, class 1).
//! * The temporary file replaced by a symbolic link before the channels open: no byte reaches
//!   the link's target, and the save fails instead of leaving the link as the snapshot (class 2).
//! * A RAM file written by another party during a save: the snapshot verifies (its checksums are
//!   of exactly the bytes written), and a RAM file truncated during a save is an error naming
//!   the file, not `SIGBUS` (classes 3 and 4).
//! * A live save's temporary is locked: another save of the same target does not remove it,
//!   whatever `/proc` says (class 8).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Mutex;

use mapped_ram_linux::fault::{self, Fault, FaultKind};
use mapped_ram_linux::{
    restore, save, save_memory, verify, DirectIo, GuestMemory, LiveOptions, LiveRegion, LiveSave,
    Op, RestoreOptions, RestoreRegion, SaveError, SaveOptions, SaveRegion,
};
use mapped_ram_tests::image::fill_pattern;

const MIB: usize = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    mapped_ram_tests::support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), &format!("race-{name}"))
}

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed, 0.25, false);
    v
}

fn opts(channels: usize) -> SaveOptions {
    SaveOptions {
        channels,
        direct_io: DirectIo::Auto,
        fsync: false,
        ..SaveOptions::default()
    }
}

/// What a hook does; hooks are plain `fn()`s, so their arguments live here.
static SCENE: Mutex<Option<(PathBuf, PathBuf)>> = Mutex::new(None);

fn scene() -> (PathBuf, PathBuf) {
    SCENE.lock().unwrap().clone().expect("scene set")
}

/// Renames the prepared second snapshot over the path being restored.
fn rename_other_over_target() {
    let (other, target) = scene();
    if other.exists() {
        std::fs::rename(&other, &target).unwrap();
    }
}

#[test]
fn restore_reads_one_snapshot_when_another_is_renamed_over_it() {
    let _g = fault::serial();
    let dir = scratch("restore-rename");
    let (a, b) = (image(8 * MIB, 1), image(8 * MIB, 2));
    let target = dir.join("snap.mr");
    let other = dir.join("other.mr");
    let region = |m| {
        [SaveRegion {
            name: "pc.ram",
            memory: m,
            page_size: 4096,
        }]
    };
    // Each snapshot carries its own device state (a VMM's blob): RAM and device state must
    // come from the same one.
    let with_state = |state: &[u8]| SaveOptions {
        device_state: Some(state.to_vec()),
        ..opts(4)
    };
    for channels in [1, 4, 8] {
        save(&target, &region(&a), &with_state(b"registers of A"), None).unwrap();
        save(&other, &region(&b), &with_state(b"registers of B"), None).unwrap();
        *SCENE.lock().unwrap() = Some((other.clone(), target.clone()));
        // The first open is the snapshot's main descriptor; the channels' come next (with
        // O_DIRECT, or without where it is refused). Right before the first channel opens,
        // the other snapshot is renamed over the path.
        let hook = FaultKind::Hook(rename_other_over_target);
        fault::inject(Fault {
            op: Op::Open,
            skip: 1,
            count: 1,
            kind: hook,
        });
        fault::inject(Fault {
            op: Op::OpenDirect,
            skip: 0,
            count: 1,
            kind: hook,
        });
        let mut back = vec![0x55u8; 8 * MIB];
        let report = restore(
            &target,
            &mut [RestoreRegion {
                name: "pc.ram",
                memory: &mut back,
                page_size: 4096,
            }],
            &RestoreOptions {
                channels,
                read_device_state: true,
                ..RestoreOptions::default()
            },
            None,
        );
        fault::clear();
        report.unwrap();
        assert!(
            !other.exists(),
            "the hook ran: the other snapshot was renamed over the path"
        );
        if back != a {
            let of_a = back
                .chunks(4096)
                .zip(a.chunks(4096))
                .filter(|(x, y)| x == y)
                .count();
            let of_b = back
                .chunks(4096)
                .zip(b.chunks(4096))
                .filter(|(x, y)| x == y)
                .count();
            panic!("{channels} channels: not the snapshot it opened ({of_a} pages of it, {of_b} of the other)");
        }
    }
}

/// Replaces the temporary file with a symbolic link to the victim file.
fn swap_temp_for_symlink() {
    let (victim, dir) = scene();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".mapped-ram-tmp.") {
            let path = entry.path();
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(&victim, &path).unwrap();
        }
    }
}

#[test]
fn a_temporary_swapped_for_a_symlink_never_writes_the_link_target() {
    let _g = fault::serial();
    let dir = scratch("symlink");
    let victim_dir = scratch("symlink-victim");
    let victim = victim_dir.join("precious");
    let precious = vec![0xEEu8; 4 * MIB];
    std::fs::write(&victim, &precious).unwrap();
    let target = dir.join("snap.mr");
    let ram = image(8 * MIB, 3);
    let old = image(8 * MIB, 4);
    let region = |m| {
        [SaveRegion {
            name: "pc.ram",
            memory: m,
            page_size: 4096,
        }]
    };
    save(&target, &region(&old), &opts(2), None).unwrap();
    let old_bytes = std::fs::read(&target).unwrap();
    *SCENE.lock().unwrap() = Some((victim.clone(), dir.clone()));
    // Between the temporary's creation and the channels' opens (the channels open with
    // O_DIRECT on this file system, so that is the first OpenDirect).
    let hook = FaultKind::Hook(swap_temp_for_symlink);
    fault::inject(Fault {
        op: Op::OpenDirect,
        skip: 0,
        count: 1,
        kind: hook,
    });
    let o = SaveOptions {
        direct_io: DirectIo::On,
        ..opts(2)
    };
    let err = save(&target, &region(&ram), &o, None).unwrap_err();
    fault::clear();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        precious,
        "the link's target is untouched"
    );
    let msg = err.to_string();
    assert!(msg.contains("replaced"), "{msg}");
    let meta = std::fs::symlink_metadata(&target).unwrap();
    assert!(meta.file_type().is_file(), "the target is not a symlink");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        old_bytes,
        "previous snapshot intact"
    );
}

#[test]
fn a_ram_file_written_during_the_save_gives_a_snapshot_that_verifies() {
    // Faults are process-wide: no save of this test may meet another test's armed hook.
    let _g = fault::serial();
    let dir = scratch("changing");
    let ram_path = dir.join("guest.ram");
    let len = 32 * MIB;
    std::fs::write(&ram_path, image(len, 5)).unwrap();
    let target = dir.join("snap.mr");
    for round in 0..3u64 {
        let file = std::fs::File::open(&ram_path).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let report = std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::unix::fs::FileExt;
                let w = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&ram_path)
                    .unwrap();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let page = (i * 7919) % (len as u64 / 4096);
                    w.write_at(&(i + round).to_le_bytes().repeat(512), page * 4096)
                        .unwrap();
                    i += 1;
                }
            });
            let regions = [LiveRegion {
                name: "pc.ram",
                memory: GuestMemory::from_file(file.as_fd(), 0, len),
                page_size: 4096,
            }];
            let r = save_memory(&target, &regions, &opts(4), None);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        });
        let report = report.unwrap();
        assert!(report.checksums);
        let v = verify(&target, 0, &[]).unwrap();
        assert!(v.ok(), "round {round}: {:?}", v.corrupt);
        assert!(v.pages_checksummed.unwrap() > 0);
    }
}

fn truncate_ram() {
    let (ram, _) = scene();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ram)
        .unwrap()
        .set_len(4 * MIB as u64)
        .unwrap();
}

#[test]
fn a_ram_file_truncated_during_the_save_is_an_error_not_sigbus() {
    let _g = fault::serial();
    let dir = scratch("truncated");
    let ram_path = dir.join("guest.ram");
    let len = 16 * MIB;
    std::fs::write(&ram_path, image(len, 6)).unwrap();
    let target = dir.join("snap.mr");
    let old = image(len, 7);
    save(
        &target,
        &[SaveRegion {
            name: "pc.ram",
            memory: &old,
            page_size: 4096,
        }],
        &opts(2),
        None,
    )
    .unwrap();
    let old_bytes = std::fs::read(&target).unwrap();
    *SCENE.lock().unwrap() = Some((ram_path.clone(), dir.clone()));
    let file = std::fs::File::open(&ram_path).unwrap();
    let regions = [LiveRegion {
        name: "pc.ram",
        memory: GuestMemory::from_file(file.as_fd(), 0, len),
        page_size: 4096,
    }];
    // Truncate the RAM file right before the 3rd read of guest memory.
    fault::inject(Fault {
        op: Op::ReadMemory,
        skip: 2,
        count: 1,
        kind: FaultKind::Hook(truncate_ram),
    });
    let err = save_memory(&target, &regions, &opts(1), None).unwrap_err();
    fault::clear();
    let SaveError::Io(f) = &err else {
        panic!("{err}")
    };
    assert_eq!(f.op, Op::ReadMemory, "{err}");
    assert_eq!(f.path, ram_path, "{err}");
    assert!(f.offset.is_some_and(|o| o >= 4 * MIB as u64), "{err}");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        old_bytes,
        "previous snapshot intact"
    );
    let temps: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".mapped-ram-tmp."))
        .collect();
    assert!(temps.is_empty(), "temporary removed");
}

#[test]
fn a_live_saves_temporary_survives_another_save_of_the_same_target() {
    // Faults are process-wide: no save of this test may meet another test's armed hook.
    let _g = fault::serial();
    let dir = scratch("locked-temp");
    let target = dir.join("snap.mr");
    let ram = image(4 * MIB, 8);
    let regions = [LiveRegion {
        name: "pc.ram",
        memory: GuestMemory::from_slice(&ram),
        page_size: 4096,
    }];
    let mut live = LiveSave::begin(
        &target,
        &regions,
        &LiveOptions {
            save: opts(2),
            ..LiveOptions::default()
        },
    )
    .unwrap();
    live.pass_all().unwrap();
    let temp = live.temp_path().to_path_buf();
    // Another save of the same target meanwhile: it sweeps stale temporaries, not this one.
    let report = save(
        &target,
        &[SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: 4096,
        }],
        &opts(2),
        None,
    )
    .unwrap();
    assert!(
        report.stale_temporaries_removed.is_empty(),
        "{:?}",
        report.stale_temporaries_removed
    );
    assert!(temp.exists(), "the live save's temporary is still there");
    let done = live
        .finish(
            &[mapped_ram_linux::DirtyLog::new("pc.ram", &[0u64; 16])],
            None,
        )
        .unwrap();
    assert_eq!(done.save.path, target);
    // A temporary whose save is gone (no lock) is removed by the next save.
    let stale = dir.join(format!(
        ".snap.mr.mapped-ram-tmp.{}.0000dead0",
        std::process::id()
    ));
    std::fs::write(&stale, b"left by a killed save").unwrap();
    let report = save(
        &target,
        &[SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: 4096,
        }],
        &opts(2),
        None,
    )
    .unwrap();
    assert_eq!(report.stale_temporaries_removed, vec![stale.clone()]);
    assert!(!stale.exists());
}

/// `finish_pass` ends the guest's downtime before durability: when it returns the file is
/// complete but the previous snapshot is still at the path (nothing synced or renamed yet);
/// `commit` then puts the new one there. Dropping a finished save keeps the previous one.
#[test]
fn finish_pass_returns_before_the_commit() {
    // Faults are process-wide: no save of this test may meet another test's armed hook.
    let _g = fault::serial();
    let dir = scratch("finish-pass");
    let target = dir.join("snap.mr");
    let old = image(4 * MIB, 10);
    let new = image(4 * MIB, 11);
    save(
        &target,
        &[SaveRegion {
            name: "pc.ram",
            memory: &old,
            page_size: 4096,
        }],
        &opts(2),
        None,
    )
    .unwrap();
    let before = std::fs::read(&target).unwrap();
    let regions = [LiveRegion {
        name: "pc.ram",
        memory: GuestMemory::from_slice(&new),
        page_size: 4096,
    }];
    let zero = [0u64; 16];
    let log = [mapped_ram_linux::DirtyLog::new("pc.ram", &zero)];
    for commit in [false, true] {
        let mut live = LiveSave::begin(
            &target,
            &regions,
            &LiveOptions {
                save: opts(2),
                ..LiveOptions::default()
            },
        )
        .unwrap();
        live.pass_all().unwrap();
        let done = live.finish_pass(&log, None).unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            before,
            "still the previous snapshot"
        );
        if commit {
            done.commit().unwrap();
            let mut back = vec![0u8; 4 * MIB];
            restore(
                &target,
                &mut [RestoreRegion {
                    name: "pc.ram",
                    memory: &mut back,
                    page_size: 4096,
                }],
                &RestoreOptions::default(),
                None,
            )
            .unwrap();
            assert!(back == new);
        } else {
            drop(done);
            assert_eq!(
                std::fs::read(&target).unwrap(),
                before,
                "dropped: previous snapshot kept"
            );
            let temps = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".mapped-ram-tmp."))
                .count();
            assert_eq!(temps, 0, "temporary removed");
        }
    }
}
