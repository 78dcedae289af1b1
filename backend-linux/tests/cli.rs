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
        let allowed = std::env::var("MAPPED_RAM_ALLOW_SKIP").is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "ramfs" || t.trim() == "all")
        });
        assert!(
            allowed,
            "cannot mount ramfs (needs root); set MAPPED_RAM_ALLOW_SKIP=ramfs to skip"
        );
        eprintln!("SKIPPED (ramfs, allowed by MAPPED_RAM_ALLOW_SKIP): cannot mount ramfs here");
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
        &[
            "direct I/O is required",
            "ramfs",
            "refused O_DIRECT",
            "s.mr",
        ],
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

// ---------------------------------------------------------------------------------------------
// Issue 12, CLI classes: each test below is one class of RELIABILITY.md's "CLI" table.
// ---------------------------------------------------------------------------------------------

/// Runs the binary with `args` under `ulimit -v` (KiB of address space) and returns its exit
/// status, stdout, stderr and wall time. An allocation beyond the limit aborts the process
/// (exit by signal, status -1 here), so a test that asserts status 0 or 1 proves the bound.
fn run_limited(
    vm_kib: u64,
    args: &[&std::ffi::OsStr],
) -> (i32, String, String, std::time::Duration) {
    let t = std::time::Instant::now();
    let (code, out, err) = run(Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {vm_kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_mapped-ram"))
        .args(args));
    (code, out, err, t.elapsed())
}

/// A `Vec` as a core `ByteSink`.
struct VecSink(Vec<u8>);

impl mapped_ram_core::stream::ByteSink for VecSink {
    type Error = std::convert::Infallible;
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// A valid stream of `blocks` empty (0/0, `x-ignore-shared`) blocks of one page each: about
/// 55 bytes per block, as the 52 MB file of a million blocks. Returns the bytes and
/// the offset of each block record.
fn many_blocks_file(blocks: usize) -> (Vec<u8>, Vec<u64>) {
    use mapped_ram_core::caps::Capabilities;
    use mapped_ram_core::layout::MappedRamHeader;
    use mapped_ram_core::stream::{
        encode_block_record, encode_eof, encode_eos_footer, encode_preamble, encode_ram_end,
        encode_ram_start, Config,
    };
    let cfg = Config::new(
        "none",
        Capabilities::MAPPED_RAM | Capabilities::X_IGNORE_SHARED,
    )
    .unwrap();
    let mut sink = VecSink(Vec::with_capacity(blocks * 56 + 4096));
    let Ok(()) = encode_preamble(&cfg, &mut sink);
    let Ok(()) = encode_ram_start(1, blocks as u64 * 4096, &mut sink);
    let header = MappedRamHeader {
        version: 1,
        page_size: 4096,
        bitmap_offset: 0,
        pages_offset: 0,
    };
    let mut records = Vec::with_capacity(blocks);
    for i in 0..blocks {
        records.push(sink.0.len() as u64);
        let name = format!("b{i}");
        let Ok(()) = encode_block_record(&name, 4096, Some(i as u64 * 4096), &header, &mut sink);
    }
    let Ok(()) = encode_eos_footer(1, &mut sink);
    let Ok(()) = encode_ram_end(1, &mut sink);
    let Ok(()) = encode_eof(&mut sink);
    (sink.0, records)
}

/// Class 5: memory and time of `inspect` / `verify` are bounded by what the file may hold:
/// at most `MAX_BLOCKS` blocks; past it, one error naming the file and the offset of the
/// first record over the cap, at once and in little memory.
#[test]
fn block_count_is_capped_in_memory_and_time() {
    use mapped_ram_linux::MAX_BLOCKS;
    let dir = scratch("many-blocks");
    // At the cap: accepted, within 64 MiB of address space (1 million blocks took 4.96 GB).
    let (bytes, _) = many_blocks_file(MAX_BLOCKS);
    let at_cap = dir.join("at-cap.mr");
    std::fs::write(&at_cap, &bytes).unwrap();
    for cmd in ["inspect", "verify"] {
        let (code, out, err, took) = run_limited(
            64 << 10,
            &[cmd.as_ref(), "--json".as_ref(), at_cap.as_os_str()],
        );
        assert_eq!(code, 0, "{cmd} of {MAX_BLOCKS} blocks: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let blocks = if cmd == "inspect" {
            &v["blocks"]
        } else {
            &v["snapshot"]["blocks"]
        };
        assert_eq!(blocks.as_array().unwrap().len(), MAX_BLOCKS);
        assert!(took.as_secs() < 20, "{cmd} took {took:?}");
    }
    // One block more, and a million (52 MB): refused at the first record past the cap.
    for blocks in [MAX_BLOCKS + 1, 1_000_000] {
        let (bytes, records) = many_blocks_file(blocks);
        let path = dir.join(format!("{blocks}.mr"));
        std::fs::write(&path, &bytes).unwrap();
        drop(bytes);
        let offset = format!("{:#x}", records[MAX_BLOCKS]);
        let name = format!("{blocks}.mr");
        for cmd in ["inspect", "verify"] {
            let (code, _, err, took) = run_limited(64 << 10, &[cmd.as_ref(), path.as_os_str()]);
            assert_eq!(code, 1, "{cmd} of {blocks} blocks: {err}");
            assert_error_line(&err, &[&name, &offset, "more than 4096 RAM blocks"]);
            assert!(took.as_secs() < 20, "{cmd} took {took:?}");
        }
        let e = mapped_ram_linux::inspect(&path, 0).unwrap_err();
        assert!(
            matches!(e, mapped_ram_linux::FormatError::Stream { offset, .. } if offset == records[MAX_BLOCKS]),
            "{e}"
        );
    }
}

/// Saves a 1 MiB image without checksums, with `state` as device state; returns the snapshot.
fn save_with_device_state(dir: &Path, state: &[u8]) -> PathBuf {
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, image(1 << 20, 11)).unwrap();
    let ds = dir.join("state.in");
    std::fs::write(&ds, state).unwrap();
    let snap = dir.join("snap.mr");
    let (code, _, err) = run(bin()
        .args(["save", "--checksums", "off", "--ram"])
        .arg(format!("pc.ram={}", ram.display()))
        .arg("--device-state")
        .arg(&ds)
        .arg("-o")
        .arg(&snap));
    assert_eq!(code, 0, "{err}");
    snap
}

/// Class 6: `inspect --device-state-out` streams: a device state larger than the address space
/// the process may use is copied exactly; the output is never the snapshot itself.
#[test]
fn device_state_out_streams_in_bounded_memory() {
    let dir = scratch("devstate-stream");
    let state: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let snap = save_with_device_state(&dir, &state);
    let info = mapped_ram_linux::inspect(&snap, 0).unwrap();
    // The file (no checksums) grows by 192 MiB after the device state: the device state is
    // now 192 MiB, more than the 128 MiB address space the tool gets.
    let grow = 192u64 << 20;
    let f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
    f.set_len(info.file_size + grow).unwrap();
    drop(f);
    let out = dir.join("state.out");
    let (code, _, err, _) = run_limited(
        128 << 10,
        &[
            "inspect".as_ref(),
            snap.as_os_str(),
            "--device-state-out".as_ref(),
            out.as_os_str(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let got = std::fs::metadata(&out).unwrap().len();
    assert_eq!(got, state.len() as u64 + grow);
    let mut head = vec![0u8; state.len()];
    std::io::Read::read_exact(&mut std::fs::File::open(&out).unwrap(), &mut head).unwrap();
    assert_eq!(head, state, "device state copied byte for byte");

    // The output naming the snapshot (directly or through a symlink) is refused; the
    // snapshot keeps its size.
    let link = dir.join("link.mr");
    std::os::unix::fs::symlink(&snap, &link).unwrap();
    for target in [&snap, &link] {
        let (code, _, err) = run(bin()
            .arg("inspect")
            .arg(&snap)
            .arg("--device-state-out")
            .arg(target));
        assert_eq!(code, 1);
        assert_error_line(&err, &["is the snapshot", "refusing"]);
        assert_eq!(
            std::fs::metadata(&snap).unwrap().len(),
            info.file_size + grow
        );
    }

    // The library reader: the same bytes, in pieces.
    let mut r = mapped_ram_linux::DeviceStateReader::open(&snap, 0).unwrap();
    assert_eq!(r.start(), info.device_state_offset);
    assert_eq!(r.len(), state.len() as u64 + grow);
    let mut first = vec![0u8; state.len()];
    std::io::Read::read_exact(&mut r, &mut first).unwrap();
    assert_eq!(first, state);
    assert_eq!(
        r.file_offset(),
        info.device_state_offset + state.len() as u64
    );
}

/// The kind of file at `path` (through symlinks) as `ls` shows it.
fn file_kind(path: &Path) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).unwrap().file_type();
    if t.is_file() {
        "file"
    } else if t.is_char_device() {
        "char"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "other"
    }
}

/// Class 7: two names of one RAM file, a RAM file that is the snapshot, a target that is a RAM
/// file or a device node: all refused before anything is written.
#[test]
fn aliased_files_are_refused_before_writing() {
    let dir = scratch("aliases");
    let a = image(1 << 20, 12);
    let b = image(1 << 20, 13);
    let snap = save_file(&dir, &[("pc.ram", &a), ("pc.rom", &b)]);
    let snap_bytes = std::fs::read(&snap).unwrap();
    let dest = dir.join("dest.ram");
    let pattern = vec![0x5au8; 1 << 20];
    std::fs::write(&dest, &pattern).unwrap();
    let symlink = dir.join("dest-symlink.ram");
    std::os::unix::fs::symlink(&dest, &symlink).unwrap();
    let hardlink = dir.join("dest-hardlink.ram");
    std::fs::hard_link(&dest, &hardlink).unwrap();
    let dotted = dir.join(".").join("dest.ram");
    let mut cases = 0;
    for alias in [&dest, &symlink, &hardlink, &dotted] {
        let (code, _, err) = run(bin()
            .arg("restore")
            .arg(&snap)
            .arg("--ram")
            .arg(format!("pc.ram={}", dest.display()))
            .arg("--ram")
            .arg(format!("pc.rom={}", alias.display())));
        assert_eq!(code, 1, "{}: {err}", alias.display());
        assert_error_line(&err, &["same file", "pc.ram", "pc.rom"]);
        assert_eq!(std::fs::read(&dest).unwrap(), pattern, "RAM file untouched");
        cases += 1;
    }
    // Two new names of one file that does not exist yet: refused, nothing created.
    let fresh = dir.join("fresh.ram");
    let fresh_alias = dir.join("sub").join("..").join("fresh.ram");
    std::fs::create_dir(dir.join("sub")).unwrap();
    let (code, _, err) = run(bin()
        .arg("restore")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", fresh.display()))
        .arg("--ram")
        .arg(format!("pc.rom={}", fresh_alias.display())));
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, &["same file"]);
    assert!(!fresh.exists(), "nothing created");
    cases += 1;
    // A RAM file that is the snapshot.
    let (code, _, err) = run(bin()
        .arg("restore")
        .arg(&snap)
        .arg("--ram")
        .arg(format!("pc.ram={}", snap.display())));
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, &["is the snapshot"]);
    assert_eq!(std::fs::read(&snap).unwrap(), snap_bytes);
    cases += 1;

    // save -o naming a RAM file (path, symlink, hard link): the RAM stays.
    let ram = dir.join("pc.ram.ram");
    for target in [&ram, &dir.join("ram-link"), &dir.join("ram-hard")] {
        if target != &ram && !target.exists() {
            if target.ends_with("ram-link") {
                std::os::unix::fs::symlink(&ram, target).unwrap();
            } else {
                std::fs::hard_link(&ram, target).unwrap();
            }
        }
        let (code, _, err) = run(bin()
            .arg("save")
            .arg("--ram")
            .arg(format!("pc.ram={}", ram.display()))
            .arg("-o")
            .arg(target));
        assert_eq!(code, 1, "{err}");
        assert_error_line(&err, &["is the RAM file", "pc.ram", "refusing"]);
        assert_eq!(std::fs::read(&ram).unwrap(), a, "RAM file untouched");
        assert_eq!(file_kind(target), "file");
        cases += 1;
    }

    // save -o a device node (a copy of /dev/null made with mknod) and a FIFO: the node stays.
    let node = dir.join("null-copy");
    let made = rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    );
    match made {
        Ok(()) => {
            let (code, _, err) = run(bin()
                .arg("save")
                .arg("--ram")
                .arg(format!("pc.ram={}", ram.display()))
                .arg("-o")
                .arg(&node));
            assert_eq!(code, 1, "{err}");
            assert_error_line(&err, &["null-copy", "a character device", "refusing"]);
            assert_eq!(file_kind(&node), "char", "the device node is still one");
            cases += 1;
        }
        Err(e) => assert!(
            std::env::var_os("MAPPED_RAM_ALLOW_SKIP").is_some(),
            "mknod needs root ({e}); set MAPPED_RAM_ALLOW_SKIP=1 to skip this case"
        ),
    }
    let fifo = dir.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let (code, _, err) = run(bin()
        .arg("save")
        .arg("--ram")
        .arg(format!("pc.ram={}", ram.display()))
        .arg("-o")
        .arg(&fifo));
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, &["a FIFO", "refusing"]);
    assert_eq!(file_kind(&fifo), "fifo");
    cases += 1;
    eprintln!("aliased files: {cases} cases refused");
}

/// The temporary files of saves of `target` left in its directory.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("mapped-ram-tmp"))
        .collect()
}

/// Class 9: SIGINT and SIGTERM during a save (sent by the tool to itself at its first progress
/// report, through the real handler, while its channels run) cancel it: one error line naming
/// the signal, exit 130 / 143, the previous snapshot byte-identical, no temporary left. The
/// same for a restore.
#[test]
fn signals_cancel_save_and_restore() {
    let dir = scratch("signals");
    let old = image(1 << 20, 14);
    let snap = save_file(&dir, &[("pc.ram", &old)]);
    let before = std::fs::read(&snap).unwrap();
    let ram = dir.join("big.ram");
    std::fs::write(&ram, image(64 << 20, 15)).unwrap();
    for (sig, status) in [("INT", 130), ("TERM", 143)] {
        let (code, _, err) = run(bin()
            .env("MAPPED_RAM_TEST_SIGNAL_AT_PROGRESS", sig)
            .args(["save", "--channels", "2", "--ram"])
            .arg(format!("pc.ram={}", ram.display()))
            .arg("-o")
            .arg(&snap));
        assert_eq!(code, status, "SIG{sig}: {err}");
        assert_error_line(
            &err,
            &[
                &format!("cancelled by SIG{sig}"),
                "snap.mr",
                "temporary file was removed",
            ],
        );
        assert_eq!(
            std::fs::read(&snap).unwrap(),
            before,
            "previous snapshot kept"
        );
        assert_eq!(
            temporaries(&dir),
            Vec::<PathBuf>::new(),
            "no temporary left"
        );

        let dest = dir.join(format!("restored-{sig}.ram"));
        let (code, _, err) = run(bin()
            .env("MAPPED_RAM_TEST_SIGNAL_AT_PROGRESS", sig)
            .arg("restore")
            .arg(&snap)
            .args(["--channels", "1", "--chunk-bytes", "4096", "--ram"])
            .arg(format!("pc.ram={}", dest.display())));
        assert_eq!(code, status, "SIG{sig}: {err}");
        assert_error_line(&err, &["restore from", &format!("cancelled by SIG{sig}")]);
    }
    // Without the hook the same save succeeds (the hook, not chance, made the signal land).
    let (code, _, err) = run(bin()
        .args(["save", "--channels", "2", "--ram"])
        .arg(format!("pc.ram={}", ram.display()))
        .arg("-o")
        .arg(&snap));
    assert_eq!(code, 0, "{err}");
}

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Class 10: restored RAM files and device-state files are created 0600 under umask 022, like
/// snapshots: guest memory is never world-readable by default.
#[test]
fn created_files_are_private() {
    let dir = scratch("modes");
    let state = vec![0x42u8; 100];
    let snap = save_with_device_state(&dir, &state);
    let sh = |args: &str| {
        run(Command::new("sh")
            .arg("-c")
            .arg(format!("umask 022 && exec \"$0\" {args}"))
            .arg(env!("CARGO_BIN_EXE_mapped-ram")))
    };
    let dest = dir.join("restored.ram");
    let (code, _, err) = sh(&format!(
        "restore '{}' --ram 'pc.ram={}'",
        snap.display(),
        dest.display()
    ));
    assert_eq!(code, 0, "{err}");
    let out = dir.join("state.out");
    let (code, _, err) = sh(&format!(
        "inspect '{}' --device-state-out '{}'",
        snap.display(),
        out.display()
    ));
    assert_eq!(code, 0, "{err}");
    let snap2 = dir.join("snap2.mr");
    let (code, _, err) = sh(&format!(
        "save --ram 'pc.ram={}' -o '{}'",
        dest.display(),
        snap2.display()
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&dest), 0o600, "restored RAM file");
    assert_eq!(mode(&out), 0o600, "device-state file");
    assert_eq!(mode(&snap2), 0o600, "snapshot");
    assert_eq!(std::fs::read(&out).unwrap(), state);
}

/// Runs `cmd`, killing it and failing the test if it has not ended within `secs` seconds.
fn run_within(cmd: &mut Command, secs: u64) -> (i32, String, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), out, err)
}

/// A command line, a flag, and (value, expected exit status) pairs.
type FlagCases<'a> = (&'a Vec<String>, &'a str, Vec<(&'a str, i32)>);

/// Class 11: every flag of every command with 0, 1, huge, overflowing, negative and empty
/// values: exit 0 (and then a correct result), 1 with one `error:` line, or 2 (usage) — never
/// a panic or a signal. The expected status of each case is listed.
#[test]
fn every_flag_keeps_the_exit_contract() {
    let dir = scratch("flags");
    let img = image(64 << 10, 16);
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, &img).unwrap();
    let snap = dir.join("snap.mr");
    let out = dir.join("out.mr");
    let dest = dir.join("dest.ram");
    let ram_arg = format!("pc.ram={}", ram.display());
    let dest_arg = format!("pc.ram={}", dest.display());
    let (code, _, err) = run(bin()
        .arg("save")
        .args(["--ram", &ram_arg])
        .arg("-o")
        .arg(&snap));
    assert_eq!(code, 0, "{err}");
    let s = |p: &Path| p.display().to_string();
    let save: Vec<String> = vec![
        "save".into(),
        "--ram".into(),
        ram_arg.clone(),
        "-o".into(),
        s(&out),
    ];
    let restore: Vec<String> = vec!["restore".into(), s(&snap), "--ram".into(), dest_arg.clone()];
    let inspect: Vec<String> = vec!["inspect".into(), s(&snap)];
    let verify: Vec<String> = vec!["verify".into(), s(&snap), "--ram".into(), ram_arg.clone()];
    let demo_sized: Vec<String> = vec!["demo".into(), "--dir".into(), s(&dir)];
    let mut demo = demo_sized.clone();
    demo.extend(["--size".into(), "64K".into()]);
    const MAX: &str = "18446744073709551615";
    const OVER: &str = "18446744073709551616";
    const BIG: &str = "1152921504606846976"; // 2^60: the largest offset accepted
    let m255 = "m".repeat(255);
    let m256 = "m".repeat(256);
    let long_name = format!("{}=x", "n".repeat(256));
    // (base, flag, [(value, expected status)])
    #[rustfmt::skip]
    let table: Vec<FlagCases<'_>> = vec![
        (&save, "--channels", vec![("0", 2), ("1", 0), ("255", 0), ("256", 2), (MAX, 2), (OVER, 2), ("-1", 2), ("", 2)]),
        (&save, "--offset", vec![("0", 0), ("1", 0), ("64K", 0), (BIG, 1), ("1T", 1), (MAX, 2), (OVER, 2), ("-1", 2), ("", 2)]),
        (&save, "--page-size", vec![("0", 2), ("1", 2), ("4K", 0), ("8K", 0), ("1G", 1), ("2G", 2), (MAX, 2), (OVER, 2), ("-1", 2), ("3000", 2)]),
        (&save, "--chunk-bytes", vec![("0", 2), ("1", 2), ("4K", 0), ("1G", 0), ("2G", 2), (MAX, 2), (OVER, 2), ("-1", 2)]),
        (&save, "--write-gap-pages", vec![("0", 0), ("1", 0), ("4294967296", 0), ("4294967297", 2), (MAX, 2), (OVER, 2), ("-1", 2)]),
        (&save, "--machine", vec![("0", 0), ("1", 0), (&m255, 0), (&m256, 2), ("", 2)]),
        (&save, "--zero-pages", vec![("0", 2), ("1", 2), ("write", 0), ("-1", 2)]),
        (&save, "--direct-io", vec![("0", 2), ("1", 2), ("off", 0), ("-1", 2)]),
        (&save, "--checksums", vec![("0", 2), ("1", 2), ("off", 0), ("-1", 2)]),
        (&save, "--ram", vec![("x", 2), ("=x", 2), ("a=", 2), (&long_name, 2), ("0=/nonexistent", 1)]),
        (&restore, "--channels", vec![("0", 2), ("1", 0), ("256", 2), (MAX, 2), ("-1", 2)]),
        (&restore, "--offset", vec![("0", 0), ("1", 1), (BIG, 1), ("1T", 1), (MAX, 2), (OVER, 2), ("-1", 2)]),
        (&restore, "--page-size", vec![("0", 2), ("1", 2), ("4K", 0), ("8K", 1), (MAX, 2), ("-1", 2)]),
        (&restore, "--chunk-bytes", vec![("0", 2), ("1", 2), ("4K", 0), ("1G", 0), ("2G", 2), (MAX, 2), ("-1", 2)]),
        (&restore, "--read-gap-pages", vec![("0", 0), ("1", 0), ("4294967297", 2), (MAX, 2), ("-1", 2)]),
        (&inspect, "--offset", vec![("0", 0), ("1", 1), (BIG, 1), ("1T", 1), (MAX, 2), (OVER, 2), ("-1", 2)]),
        (&verify, "--offset", vec![("0", 0), ("1", 1), (BIG, 1), (MAX, 2), ("-1", 2)]),
        (&demo_sized, "--size", vec![("0", 2), ("1", 0), ("2T", 2), (MAX, 2), (OVER, 2), ("-1", 2)]),
        (&demo, "--channels", vec![("0", 2), ("1", 0), ("256", 2), (MAX, 2), ("-1", 2)]),
    ];
    let mut cases = 0;
    for (base, flag, values) in &table {
        for &(value, expected) in values {
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(&dest);
            let what = format!("{} {flag} {value:?}", base[0]);
            let (code, _, err) = run_within(bin().args(base.iter()).arg(flag).arg(value), 60);
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert_eq!(code, expected, "{what}: {err}");
            match code {
                1 => assert_error_line(&err, &[]),
                2 => assert!(err.starts_with("error: "), "{what}: {err}"),
                _ => {}
            }
            if code == 0 && base[0] == "save" {
                // The snapshot is right: restore it and compare.
                let mut cmd = bin();
                cmd.arg("restore").arg(&out).args(["--ram", &dest_arg]);
                if *flag == "--offset" || *flag == "--page-size" {
                    cmd.arg(flag).arg(value);
                }
                let (code, _, err) = run(&mut cmd);
                assert_eq!(code, 0, "{what}: restore: {err}");
                assert_eq!(std::fs::read(&dest).unwrap(), img, "{what}");
            }
            if code == 0 && base[0] == "restore" {
                assert_eq!(std::fs::read(&dest).unwrap(), img, "{what}");
            }
            cases += 1;
        }
    }
    eprintln!("flags: {cases} cases");
}

/// Class 12: a save offset larger than 1 GiB is refused unless the target already holds that
/// prefix (no terabyte of zeros); a smaller prefix of an existing target is kept. The device
/// state is read only from a regular file of at most 1 GiB: `/dev/zero`, a FIFO (which would
/// block forever), a directory and a larger file are refused at once.
#[test]
fn offsets_and_device_state_are_bounded() {
    let dir = scratch("bounds");
    let img = image(64 << 10, 17);
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, &img).unwrap();
    let ram_arg = format!("pc.ram={}", ram.display());
    let target = dir.join("t.mr");
    let mut cases = 0;

    // 1 TiB: refused, nothing created; over an existing short file, the file is kept.
    for existing in [None, Some(vec![7u8; 4096])] {
        let _ = std::fs::remove_file(&target);
        if let Some(b) = &existing {
            std::fs::write(&target, b).unwrap();
        }
        let t = std::time::Instant::now();
        let (code, _, err) = run_within(
            bin()
                .arg("save")
                .args(["--ram", &ram_arg, "--offset", "1T", "-o"])
                .arg(&target),
            60,
        );
        assert_eq!(code, 1, "{err}");
        assert_error_line(&err, &["t.mr", "offset 1099511627776", "1073741824"]);
        assert!(t.elapsed().as_secs() < 10);
        match &existing {
            None => assert!(!target.exists()),
            Some(b) => assert_eq!(&std::fs::read(&target).unwrap(), b),
        }
        cases += 1;
    }
    // A 64 KiB prefix of an existing file is kept byte for byte.
    let prefix: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&target, &prefix).unwrap();
    let (code, _, err) = run(bin()
        .arg("save")
        .args(["--ram", &ram_arg, "--offset", "64K", "-o"])
        .arg(&target));
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&target).unwrap()[..65536], prefix[..]);
    let (code, _, err) = run(bin()
        .arg("verify")
        .arg(&target)
        .args(["--offset", "64K", "--ram", &ram_arg]));
    assert_eq!(code, 0, "{err}");
    cases += 1;

    // Device state: only a regular file of at most 1 GiB.
    let fifo = dir.join("state.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let big = dir.join("state.big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((1 << 30) + 1)
        .unwrap();
    let out = dir.join("new.mr");
    for (source, needle) in [
        (Path::new("/dev/zero"), "a character device"),
        (fifo.as_path(), "a FIFO"),
        (dir.as_path(), "a directory"),
        (big.as_path(), "more than the maximum 1073741824"),
        (dir.join("missing").as_path(), "No such file"),
    ] {
        let t = std::time::Instant::now();
        let (code, _, err) = run_within(
            bin()
                .arg("save")
                .args(["--ram", &ram_arg, "--device-state"])
                .arg(source)
                .arg("-o")
                .arg(&out),
            60,
        );
        assert_eq!(code, 1, "{}: {err}", source.display());
        assert_error_line(&err, &["device-state file", needle]);
        assert!(t.elapsed().as_secs() < 10, "{}", source.display());
        assert!(!out.exists());
        cases += 1;
    }
    eprintln!("offsets and device state: {cases} cases");
}

/// Class 12, inputs that never end: a FIFO (no writer) or a device as a RAM file to save or
/// verify, or as the snapshot to inspect, verify or restore, is refused at once instead of
/// blocking in `open` or reading forever.
#[test]
fn fifos_and_devices_are_refused_as_inputs() {
    let dir = scratch("fifo-inputs");
    let img = image(64 << 10, 18);
    let snap = save_file(&dir, &[("pc.ram", &img)]);
    let fifo = dir.join("in.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let dest = dir.join("dest.ram");
    let mut cases = 0;
    for (node, needle) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
    ] {
        let ram = format!("pc.ram={}", node.display());
        let dest_arg = format!("pc.ram={}", dest.display());
        let s = snap.display().to_string();
        let n = node.display().to_string();
        for args in [
            vec!["save", "--ram", &ram, "-o", "/nonexistent-dir/x.mr"],
            vec!["verify", &s, "--ram", &ram],
            vec!["inspect", &n],
            vec!["verify", &n],
            vec!["restore", &n, "--ram", &dest_arg],
        ] {
            let t = std::time::Instant::now();
            let (code, _, err) = run_within(bin().args(&args), 60);
            assert_eq!(code, 1, "{args:?}: {err}");
            assert_error_line(&err, &[&n, needle, "not a regular file"]);
            assert!(t.elapsed().as_secs() < 10, "{args:?}");
            assert!(!dest.exists());
            cases += 1;
        }
    }
    eprintln!("FIFO and device inputs: {cases} cases");
}

#[test]
fn save_reads_ram_files_or_maps_them_with_the_same_result() {
    let dir = scratch("map-ram");
    let a = image(4 << 20, 21);
    let ram = dir.join("a.ram");
    std::fs::write(&ram, &a).unwrap();
    let mut files = Vec::new();
    for (name, extra) in [("read.mr", None), ("mapped.mr", Some("--map-ram"))] {
        let out = dir.join(name);
        let mut cmd = bin();
        cmd.arg("save")
            .arg("--ram")
            .arg(format!("pc.ram={}", ram.display()))
            .arg("-o")
            .arg(&out);
        if let Some(flag) = extra {
            cmd.arg(flag);
        }
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 0, "{name}: {err}");
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(
        files[0] == files[1],
        "pread and mapping write the same snapshot"
    );
}

/// Issue 12, class 3: restoring into RAM files on a file system without room for them is a
/// clear `No space left on device` naming the RAM file (exit 1) — not SIGBUS on the first write
/// into the mapping, nor "Bad address" — for a new file and for a pre-sized sparse one.
#[test]
fn restore_into_a_full_tmpfs_is_enospc_not_sigbus() {
    let dir = scratch("full-tmpfs");
    let a = image(8 << 20, 33);
    let snap = save_file(&dir, &[("pc.ram", &a)]);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let allowed = std::env::var("MAPPED_RAM_ALLOW_SKIP").is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "tmpfs" || t.trim() == "all")
        });
        assert!(
            allowed,
            "cannot mount a tmpfs (needs root); set MAPPED_RAM_ALLOW_SKIP=tmpfs to skip"
        );
        eprintln!("SKIPPED (tmpfs, allowed by MAPPED_RAM_ALLOW_SKIP): cannot mount a tmpfs");
        return;
    }
    let sparse = mnt.join("sparse.ram");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut results = Vec::new();
    for dest in [mnt.join("new.ram"), sparse] {
        let (code, _, err) = run(bin()
            .arg("restore")
            .arg(&snap)
            .arg("--ram")
            .arg(format!("pc.ram={}", dest.display())));
        results.push((dest, code, err));
    }
    let _ = Command::new("umount").arg(&mnt).status();
    for (dest, code, err) in results {
        assert_eq!(code, 1, "{}: {err}", dest.display());
        let name = dest.file_name().unwrap().to_string_lossy().into_owned();
        assert_error_line(&err, &["No space left on device", &name]);
    }
}

/// `mapped-ram` with the environment of an unreachable store: `AWS_*` of the caller removed,
/// the endpoint a closed port (connection refused at once), dummy credentials.
fn bin_unreachable_store() -> Command {
    let mut cmd = bin();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_REGION", "us-east-1");
    cmd
}

/// A usage error (exit status 2) on stderr: starts with `error: ` and names every needle.
fn assert_usage_error(what: &str, code: i32, err: &str, needles: &[&str]) {
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(code, 2, "{what}: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
    let first = err.lines().next().unwrap_or_default();
    for n in needles {
        assert!(first.contains(n), "{what}: {n:?} missing from {err}");
    }
}

/// Flags that apply only to a file, given with a store address, and store flags given with a
/// file: a one-line usage error naming the flag (exit status 2), before any RAM file is read
/// or created and before any request (the endpoint is unreachable: a request would fail with
/// exit status 1).
#[test]
fn store_and_file_flags_do_not_mix() {
    let dir = scratch("store-misuse");
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, image(64 << 10, 40)).unwrap();
    let snap = save_file(&dir, &[("pc.ram", &image(64 << 10, 41))]);
    let missing_ram = format!("pc.ram={}", dir.join("missing.ram").display());
    let new_ram = dir.join("new.ram");
    let new_ram_arg = format!("pc.ram={}", new_ram.display());
    let local = dir.join("local.mr");
    let s = |p: &Path| p.display().to_string();
    let url = "s3://bucket/vm/guest.mr";
    let save = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["save".into(), "--ram".into(), missing_ram.clone()];
        v.extend(["-o".into(), url.into()]);
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let restore = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["restore".into(), url.into(), "--ram".into()];
        v.push(new_ram_arg.clone());
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let with = |base: &[&str], extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    // (command line, the flag the error names)
    let cases: Vec<(Vec<String>, &str)> = vec![
        (save(&["--update"]), "--update"),
        (save(&["--offset", "4K"]), "--offset"),
        (save(&["--direct-io", "on"]), "--direct-io on"),
        (save(&["--chunk-bytes", "1M"]), "--chunk-bytes"),
        (save(&["--write-gap-pages", "8"]), "--write-gap-pages"),
        (save(&["--no-fsync"]), "--no-fsync"),
        (save(&["--no-preallocate"]), "--no-preallocate"),
        (restore(&["--offset", "4096"]), "--offset"),
        (restore(&["--direct-io", "on"]), "--direct-io on"),
        (restore(&["--chunk-bytes", "1M"]), "--chunk-bytes"),
        (with(&["inspect", url], &["--offset", "4096"]), "--offset"),
        (
            with(&["inspect", url], &["--device-state-out", &s(&local)]),
            "--device-state-out",
        ),
        (with(&["verify", url], &["--offset", "4096"]), "--offset"),
        // Store flags with a local file.
        (
            with(
                &["save", "--ram", &missing_ram, "-o", &s(&local)],
                &["--object-size", "8M"],
            ),
            "--object-size",
        ),
        (
            with(
                &["save", "--ram", &missing_ram, "-o", &s(&local)],
                &["--orphan-grace", "60"],
            ),
            "--orphan-grace",
        ),
        (
            with(
                &["save", "--ram", &missing_ram, "-o", &s(&local)],
                &["--retries", "3"],
            ),
            "--retries",
        ),
        (
            with(
                &["restore", &s(&snap), "--ram", &new_ram_arg],
                &["--request-timeout", "5"],
            ),
            "--request-timeout",
        ),
        (
            with(&["inspect", &s(&snap)], &["--retry-timeout", "1"]),
            "--retry-timeout",
        ),
        (
            with(&["verify", &s(&snap)], &["--channels", "4"]),
            "--channels",
        ),
    ];
    for (args, flag) in &cases {
        let what = args.join(" ");
        let (code, out, err) = run_within(bin_unreachable_store().args(args), 60);
        assert_usage_error(&what, code, &err, &[flag]);
        assert_error_line(&err, &[flag]);
        assert!(out.is_empty(), "{what}: {out}");
        assert!(!new_ram.exists(), "{what}: a RAM file was created");
        assert!(!local.exists(), "{what}: a local snapshot was written");
    }
    // The JSON form says the same, with status 2.
    let mut args = save(&["--update"]);
    args.insert(0, "--json".into());
    let (code, out, _) = run_within(bin_unreachable_store().args(&args), 60);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["status"], 2);
    assert!(v["error"].as_str().unwrap().contains("--update"), "{v}");
}

/// A malformed store address is a usage error naming it, for every command that takes one;
/// `put` and `get` take only a store address.
#[test]
fn malformed_store_addresses_are_usage_errors() {
    let dir = scratch("store-urls");
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, image(64 << 10, 42)).unwrap();
    let ram_arg = format!("pc.ram={}", ram.display());
    let file = ram.display().to_string();
    for bad in [
        "s3://",
        "s3://bucket",
        "s3://bucket/",
        "s3://b/k/",
        "s3://b/a//k",
        "s3://b/../k",
    ] {
        let lines: Vec<Vec<&str>> = vec![
            vec!["save", "--ram", &ram_arg, "-o", bad],
            vec!["restore", bad, "--ram", &ram_arg],
            vec!["inspect", bad],
            vec!["verify", bad],
            vec!["put", &file, bad],
            vec!["get", bad, "-o", &file],
        ];
        for args in lines {
            let what = args.join(" ");
            let (code, _, err) = run_within(bin_unreachable_store().args(&args), 60);
            assert_usage_error(&what, code, &err, &[bad, "not a store address"]);
        }
    }
    for args in [
        vec!["put", &file, "bucket/key"],
        vec!["put", &file, &file],
        vec!["get", "bucket/key", "-o", &file],
    ] {
        let what = args.join(" ");
        let (code, _, err) = run_within(bin_unreachable_store().args(&args), 60);
        assert_usage_error(&what, code, &err, &["does not start with s3://"]);
    }
    assert_eq!(std::fs::read(&ram).unwrap(), image(64 << 10, 42));
}

/// The store flags' values are bounded like every other flag's: `--object-size` a power of
/// two from 64K to 256M (3M refused, 4MiB accepted), and so on. An accepted value gets as far
/// as the (unreachable) store: exit status 1, not 2.
#[test]
fn store_flag_values_are_bounded() {
    let dir = scratch("store-flags");
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, image(64 << 10, 43)).unwrap();
    let ram_arg = format!("pc.ram={}", ram.display());
    let save = ["save", "--ram", &ram_arg, "-o", "s3://bucket/vm/guest.mr"];
    // Fail fast: no retries (or only for a second), 2 s per request; the flag under test
    // replaces its own default here.
    let fast = [
        ("--retries", "0"),
        ("--request-timeout", "2"),
        ("--retry-timeout", "1"),
    ];
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<(&str, i32)>)> = vec![
        ("--object-size", vec![("3M", 2), ("0", 2), ("32K", 2), ("512M", 2), ("-1", 2), ("", 2), ("64K", 1), ("4M", 1), ("4MiB", 1), ("256MiB", 1)]),
        ("--retries", vec![("-1", 2), ("101", 2), ("x", 2), ("100", 1)]),
        ("--request-timeout", vec![("0", 2), ("-1", 2), ("nan", 2), ("inf", 2), ("3601", 2), ("0.5", 1), ("2s", 1)]),
        ("--retry-timeout", vec![("-1", 2), ("1e12", 2), ("x", 2), ("0", 1), ("1.5", 1)]),
        ("--orphan-grace", vec![("-1", 2), ("1e12", 2), ("0", 1), ("3600", 1)]),
        ("--channels", vec![("0", 2), ("256", 2), ("1", 1), ("255", 1)]),
    ];
    for (flag, values) in &cases {
        for &(value, expected) in values {
            let what = format!("save {flag} {value:?}");
            let mut cmd = bin_unreachable_store();
            cmd.args(save);
            for (f, v) in fast.iter().filter(|(f, _)| f != flag) {
                cmd.args([f, v]);
            }
            cmd.arg(flag).arg(value);
            let (code, _, err) = run_within(&mut cmd, 60);
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert_eq!(code, expected, "{what}: {err}");
            if code == 2 {
                assert!(err.starts_with("error: "), "{what}: {err}");
                // (clap reads "-1" as an unknown flag, not as the value.)
                if !value.starts_with('-') {
                    assert!(err.lines().next().unwrap().contains(flag), "{what}: {err}");
                }
            } else {
                assert_error_line(&err, &["s3://bucket/vm/guest.mr"]);
            }
        }
    }
    // `put` and `get` bound --channels too.
    let file = ram.display().to_string();
    for args in [
        vec!["put", &file, "s3://b/k", "--channels", "0"],
        vec!["get", "s3://b/k", "-o", &file, "--channels", "256"],
        vec!["put", &file, "s3://b/k", "--object-size", "3M"],
        vec!["put", &file, "s3://b/k", "--offset", "18446744073709551615"],
    ] {
        let what = args.join(" ");
        let (code, _, err) = run_within(bin_unreachable_store().args(&args), 60);
        assert_usage_error(&what, code, &err, &[args[args.len() - 2]]);
    }
}

/// `put` of a file that does not exist (or is not a regular file) names it, before any
/// request.
#[test]
fn put_of_a_missing_file_names_it() {
    let dir = scratch("put-missing");
    let missing = dir.join("no-such-snapshot.mr");
    let (code, out, err) = run_within(
        bin_unreachable_store()
            .arg("put")
            .arg(&missing)
            .arg("s3://bucket/vm/guest.mr"),
        60,
    );
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_error_line(&err, &["no-such-snapshot.mr", "No such file or directory"]);
    let (code, _, err) = run_within(
        bin_unreachable_store()
            .arg("put")
            .arg(&dir)
            .arg("s3://bucket/vm/guest.mr"),
        60,
    );
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, &[&dir.display().to_string(), "a directory"]);
    // `get` refuses to replace a directory.
    let (code, _, err) = run_within(
        bin_unreachable_store()
            .args(["get", "s3://bucket/vm/guest.mr", "-o"])
            .arg(&dir),
        60,
    );
    assert_eq!(code, 1, "{err}");
    assert_error_line(&err, &[&dir.display().to_string(), "a directory"]);
}

/// Every store command against an unreachable endpoint (no retries, 2 s per request) fails
/// at once with one error line naming the address (exit status 1, `--json` too): no panic, no
/// hang, no RAM file created by a restore that could not read the snapshot.
#[test]
fn unreachable_store_fails_in_bounded_time_naming_the_address() {
    let dir = scratch("store-unreachable");
    let ram = dir.join("pc.ram");
    std::fs::write(&ram, image(256 << 10, 44)).unwrap();
    let snap = save_file(&dir, &[("pc.ram", &image(256 << 10, 44))]);
    let ram_arg = format!("pc.ram={}", ram.display());
    let new_ram = dir.join("new.ram");
    let new_ram_arg = format!("pc.ram={}", new_ram.display());
    let got = dir.join("got.mr");
    let url = "s3://bucket/vm/guest.mr";
    let s = |p: &Path| p.display().to_string();
    let fast = ["--retries", "0", "--request-timeout", "2"];
    let lines: Vec<Vec<String>> = vec![
        vec![
            "save".into(),
            "--ram".into(),
            ram_arg.clone(),
            "-o".into(),
            url.into(),
        ],
        vec!["restore".into(), url.into(), "--ram".into(), new_ram_arg],
        vec!["inspect".into(), url.into()],
        vec!["verify".into(), url.into(), "--ram".into(), ram_arg],
        vec!["put".into(), s(&snap), url.into()],
        vec!["get".into(), url.into(), "-o".into(), s(&got)],
    ];
    for args in &lines {
        let what = args.join(" ");
        let started = std::time::Instant::now();
        let (code, out, err) = run_within(bin_unreachable_store().args(args).args(fast), 60);
        let took = started.elapsed();
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(code, 1, "{what}: {err}");
        assert!(out.is_empty(), "{what}: {out}");
        assert_error_line(&err, &[url]);
        assert!(took.as_secs() < 30, "{what}: took {took:?}");
        let (code, out, _) = run_within(
            bin_unreachable_store().arg("--json").args(args).args(fast),
            60,
        );
        assert_eq!(code, 1, "{what}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ok"], false, "{what}");
        assert!(v["error"].as_str().unwrap().contains(url), "{what}: {v}");
    }
    assert!(!new_ram.exists(), "restore created its RAM file");
    assert!(!got.exists(), "get created its file");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Every command that takes a store address documents it, with an example, in `--help`.
#[test]
fn store_commands_have_help() {
    for cmd in ["save", "restore", "inspect", "verify", "put", "get"] {
        let (code, out, err) = run(bin().args([cmd, "--help"]));
        assert_eq!(code, 0, "{cmd}: {err}");
        assert!(out.contains("s3://"), "{cmd}: {out}");
        assert!(out.contains("Examples:"), "{cmd}: {out}");
        assert!(out.contains("AWS_ENDPOINT_URL"), "{cmd}: {out}");
    }
    let (_, out, _) = run(bin().arg("--help"));
    assert!(out.contains("put") && out.contains("get"), "{out}");
}
