//! The `mapped-ram` binary end to end: exit codes, one-line errors, JSON output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mapped-ram"))
}

/// A scratch directory on the real disk (the cargo target directory, ext4 here), not tmpfs.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run mapped-ram");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mapped_ram_linux::synthetic_image(&mut v, 4096, seed);
    v
}

/// Exactly one line, starting with `error: `, that contains every needle.
fn assert_error_line(stderr: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from {stderr}");
    }
}

fn save_file(dir: &Path, blocks: &[(&str, &[u8])]) -> PathBuf {
    let out = dir.join("snap.mr");
    let mut cmd = bin();
    cmd.arg("save")
        .arg("-o")
        .arg(&out)
        .args(["--channels", "3"]);
    for (name, data) in blocks {
        let p = dir.join(format!("{name}.ram"));
        std::fs::write(&p, data).unwrap();
        cmd.arg("--ram").arg(format!("{name}={}", p.display()));
    }
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn save_restore_verify_inspect_json() {
    let dir = scratch("roundtrip");
    let a = image(3 << 20, 1);
    let b = image(1 << 20, 2);
    let snap = save_file(&dir, &[("pc.ram", &a), ("pc.bios", &b)]);

    let (code, out, err) = run(bin().args(["inspect", "--json"]).arg(&snap));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["machine"], "none");
    assert_eq!(v["capabilities"], serde_json::json!(["mapped-ram"]));
    let blocks = v["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0]["name"], "pc.ram");
    assert_eq!(blocks[0]["length"], 3 << 20);
    assert_eq!(blocks[0]["page_size"], 4096);
    let zero_a = a.chunks(4096).filter(|p| p.iter().all(|b| *b == 0)).count() as u64;
    assert_eq!(blocks[0]["pages_stored"], 768 - zero_a);
    assert_eq!(blocks[0]["pages_offset"].as_u64().unwrap() % (1 << 20), 0);
    assert!(
        v["device_state_offset"].as_u64().unwrap() > blocks[1]["pages_offset"].as_u64().unwrap()
    );

    // Restore only pc.ram into a new file; pc.bios is skipped and reported.
    let dest = dir.join("restored.ram");
    let (code, out, err) = run(bin()
        .args(["--json", "restore"])
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", dest.display()))
        .args(["--channels", "2", "--direct-io", "off"]));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["blocks_skipped"], serde_json::json!(["pc.bios"]));
    assert_eq!(v["bytes"], 3 << 20);
    assert_eq!(std::fs::read(&dest).unwrap(), a);

    let (code, out, err) = run(bin()
        .arg("verify")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", dest.display())));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("contents equal for pc.ram"), "{out}");

    // A changed byte makes verify fail, naming block, page and offset.
    let mut changed = a.clone();
    changed[5 * 4096 + 17] ^= 0xff;
    std::fs::write(&dest, &changed).unwrap();
    let (code, _, err) = run(bin()
        .arg("verify")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", dest.display())));
    assert_eq!(code, 1);
    assert_error_line(&err, &["pc.ram", "page 5", "file offset 0x"]);
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = run(bin().args(["save", "-o", "x"]));
    assert_eq!(code, 2);
    let (code, _, _) = run(bin().args(["restore", "f", "--ram", "nameonly"]));
    assert_eq!(code, 2);
    let (code, _, _) = run(bin().args(["save", "--ram", "a=b", "-o", "x", "--channels", "0"]));
    assert_eq!(code, 2);
    let (code, _, _) = run(bin().arg("frobnicate"));
    assert_eq!(code, 2);
}

#[test]
fn missing_and_short_ram_files() {
    let dir = scratch("missing");
    let out = dir.join("s.mr");
    let missing = dir.join("nope.ram");
    let (code, _, err) = run(bin()
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", missing.display()))
        .arg("-o")
        .arg(&out));
    assert_eq!(code, 1);
    assert_error_line(&err, &["nope.ram", "pc.ram", "No such file"]);
    assert!(!out.exists());

    let short = dir.join("short.ram");
    std::fs::write(&short, vec![1u8; 4096 * 3 + 100]).unwrap();
    let (code, _, err) = run(bin()
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", short.display()))
        .arg("-o")
        .arg(&out));
    assert_eq!(code, 1);
    assert_error_line(&err, &["short.ram", "not a multiple of the page size"]);
    assert!(!out.exists());
}

#[test]
fn unknown_block_and_size_mismatch() {
    let dir = scratch("names");
    let a = image(1 << 20, 3);
    let snap = save_file(&dir, &[("pc.ram", &a)]);
    let dest = dir.join("dest.ram");
    let (code, _, err) = run(bin()
        .arg("restore")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("vga.vram={}", dest.display())));
    assert_eq!(code, 1);
    assert_error_line(&err, &["vga.vram", "not in the snapshot", "pc.ram"]);
    assert!(
        !dest.exists(),
        "no RAM file may be created for a failed restore"
    );

    std::fs::write(&dest, vec![9u8; 8192]).unwrap();
    let (code, _, err) = run(bin()
        .arg("restore")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", dest.display())));
    assert_eq!(code, 1);
    assert_error_line(&err, &["pc.ram", "size mismatch", "8192"]);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        vec![9u8; 8192],
        "destination untouched"
    );
}

#[test]
fn unwritable_target_keeps_nothing() {
    let dir = scratch("unwritable");
    let ram = dir.join("r.ram");
    std::fs::write(&ram, image(1 << 20, 4)).unwrap();
    let target = dir.join("no-such-dir").join("s.mr");
    let (code, _, err) = run(bin()
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", ram.display()))
        .arg("-o")
        .arg(&target));
    assert_eq!(code, 1);
    assert_error_line(&err, &["open", "no-such-dir"]);

    // A target that is a directory: refused before anything is written, and left alone.
    let target = dir.join("a-directory");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let (code, _, err) = run(bin()
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", ram.display()))
        .arg("-o")
        .arg(&target));
    assert_eq!(code, 1);
    assert_error_line(&err, &["is a directory", "a-directory"]);
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"x");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("mapped-ram-tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary file left behind: {leftovers:?}"
    );
}

#[test]
fn truncated_and_corrupt_snapshots() {
    let dir = scratch("corrupt");
    let a = image(2 << 20, 5);
    let snap = save_file(&dir, &[("pc.ram", &a)]);
    let bytes = std::fs::read(&snap).unwrap();
    let dest = dir.join("dest.ram");
    let restore = |file: &Path| {
        let _ = std::fs::remove_file(&dest);
        run(bin()
            .arg("restore")
            .arg(file)
            .arg("--ram")
            .arg(format!("pc.ram={}", dest.display())))
    };

    // Cut inside the page region: the block's pages run past the end.
    let cut = dir.join("cut.mr");
    std::fs::write(&cut, &bytes[..(1 << 20) + 4096]).unwrap();
    let (code, _, err) = restore(&cut);
    assert_eq!(code, 1);
    assert_error_line(&err, &["cut.mr", "pc.ram", "truncated"]);
    assert!(!dest.exists());

    // Cut inside the stream head.
    std::fs::write(&cut, &bytes[..30]).unwrap();
    let (code, _, err) = restore(&cut);
    assert_eq!(code, 1);
    assert_error_line(&err, &["cut.mr", "offset"]);

    // Bad magic.
    let mut bad = bytes.clone();
    bad[0] ^= 0xff;
    let badp = dir.join("bad.mr");
    std::fs::write(&badp, &bad).unwrap();
    let (code, _, err) = run(bin().arg("inspect").arg(&badp));
    assert_eq!(code, 1);
    assert_error_line(&err, &["bad.mr", "0x0"]);

    // A header page size that differs from the stream's.
    let info = mapped_ram_linux::inspect(&snap, 0).unwrap();
    let h = info.blocks[0].layout.header_offset as usize;
    let mut bad = bytes.clone();
    bad[h + 4..h + 12].copy_from_slice(&8192u64.to_be_bytes());
    std::fs::write(&badp, &bad).unwrap();
    let (code, _, err) = restore(&badp);
    assert_eq!(code, 1);
    assert_error_line(&err, &["bad.mr", "page size"]);
    assert!(!dest.exists());
}

#[test]
fn direct_io_on_refused_is_a_clear_error() {
    // ramfs has no O_DIRECT support; mounting it needs root (CI runs as root).
    let dir = scratch("ramfs");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount ramfs"
        );
        eprintln!("skipping: cannot mount ramfs here");
        return;
    }
    let ram = dir.join("r.ram");
    std::fs::write(&ram, image(1 << 20, 6)).unwrap();
    let target = mnt.join("s.mr");
    let out = run(bin()
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", ram.display()))
        .arg("-o")
        .arg(&target)
        .args(["--direct-io", "on"]));
    let auto = run(bin()
        .args(["--json", "save"])
        .arg("--ram")
        .arg(format!("pc.ram={}", ram.display()))
        .arg("-o")
        .arg(&target)
        .args(["--direct-io", "auto"]));
    let _ = Command::new("umount").arg(&mnt).status();
    let (code, _, err) = out;
    assert_eq!(code, 1);
    assert_error_line(
        &err,
        &["direct-io is on", "ramfs", "refused O_DIRECT", "s.mr"],
    );
    let (code, json, err) = auto;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["direct_io"], false);
    assert!(v["direct_io_fallback"].as_str().unwrap().contains("ramfs"));
}

#[test]
fn demo_runs() {
    let dir = scratch("demo");
    let (code, out, err) = run(bin()
        .args(["--json", "demo", "--size", "16M", "--dir"])
        .arg(&dir));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["bytes"], 16 << 20);
    assert!(v["save"]["zero_pages"].as_u64().unwrap() > 0);
}

#[test]
fn checksums_flag_verify_and_restore_name_the_bad_page() {
    let dir = scratch("checksums");
    let a = image(2 << 20, 9);
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, &a).unwrap();
    let snap = dir.join("snap.mr");
    let save = |flag: Option<&str>| {
        let mut cmd = bin();
        cmd.args(["save", "--json", "--ram"])
            .arg(format!("pc.ram={}", ram.display()))
            .arg("-o")
            .arg(&snap);
        if let Some(f) = flag {
            cmd.args(["--checksums", f]);
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    assert_eq!(save(Some("off"))["checksums"], false);
    let (code, out, _) = run(bin().args(["inspect", "--json"]).arg(&snap));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["checksums"].is_null());
    assert_eq!(save(Some("on"))["checksums"], true);
    assert_eq!(save(None)["checksums"], true);
    let (code, out, _) = run(bin().args(["inspect", "--json"]).arg(&snap));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checksums"]["algorithm"], "crc32c");
    let (code, out, err) = run(bin().arg("verify").arg(&snap));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("page checksum(s) ok"), "{out}");
    let (code, _, err) =
        run(bin().args(["save", "--checksums", "maybe", "-o", "x", "--ram", "a=b"]));
    assert_eq!(code, 2, "{err}");

    // One flipped bit in a stored page: verify names block, page and offset; a checked
    // restore fails; an unchecked one succeeds.
    let info = mapped_ram_linux::inspect(&snap, 0).unwrap();
    let b = &info.blocks[0];
    let page = b.bitmap_ref().find_next(100, true).unwrap();
    let at = b.layout.pages_offset + page * 4096 + 17;
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[at as usize] ^= 4;
    std::fs::write(&snap, &bytes).unwrap();
    let (code, _, err) = run(bin().arg("verify").arg(&snap));
    assert_eq!(code, 1);
    let offset = format!("{:#x}", b.layout.pages_offset + page * 4096);
    assert_error_line(
        &err,
        &["pc.ram", &format!("page {page}"), &offset, "checksum"],
    );
    let dest = dir.join("dest.ram");
    let (code, _, err) = run(bin()
        .arg("restore")
        .arg(&snap)
        .arg("--verify-checksums")
        .arg("--ram")
        .arg(format!("pc.ram={}", dest.display())));
    assert_eq!(code, 1);
    assert_error_line(&err, &["pc.ram", &format!("page {page}"), "checksum"]);
    let _ = std::fs::remove_file(&dest);
    let (code, _, err) = run(bin()
        .arg("restore")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", dest.display())));
    assert_eq!(code, 0, "{err}");
}
