//! QEMU 10.0 migrating a **running Linux guest** to mapped-ram files, our tool reading every
//! block of them, and QEMU resuming the guest from files that our tool wrote.
//!
//! One test per machine type (`pc` with an e1000 on a user-mode network, `q35` without a
//! network card), 512 MiB, TCG, a VGA card, the guest of
//! [`mapped_ram_tests::guest`] (Debian's cloud kernel booted through PVH, a busybox initramfs
//! printing `MRTICK <counter> <md5 of an 8 MiB random tmpfs file>` every second). The guest is
//! booted once per test; then, from the same running guest, three times:
//!
//! 1. QEMU migrates it (live: the guest runs during the passes) to a file, variant
//!    **plain** (mapped-ram), **multifd** (4 channels + direct-io) or **offset**
//!    (`file:PATH,offset=64 KiB` behind a prefix QEMU must leave alone). The source ends in
//!    `postmigrate` (paused): its memory is now frozen and is the ground truth:
//!    * the main block `mem` (QEMU's `pc.ram` when the RAM is a `memory-backend-file`; QEMU
//!      names the block after the backend's id): the `/dev/shm` backing file, which *is* the
//!      guest's RAM (`share=on`);
//!    * every other block (`vga.vram`, `vga.rom`, pc's `e1000.rom`, `pc.bios`, `pc.rom`, the
//!      fw_cfg blobs `/rom@etc/acpi/tables`, `table-loader`, `rsdp`): read from the paused
//!      source process itself (`/proc/PID/mem` at the block's host address from
//!      `x-query-ramblock`), the bytes migration read. A second, independent reader checks
//!      both: the destination QEMU that loads our files (step 3) must end up with exactly
//!      these bytes in every block.
//! 2. `mapped-ram inspect --json` must describe the file as QEMU reports the guest (machine,
//!    capabilities, RAM section id — 2 for pc, 1 for q35, see `Shape` —, blocks in
//!    `x-query-ramblock` order and sizes); `verify` (structure, and with `--ram` the blocks
//!    against the ground truth: every block of the multifd file, all but `mem` of the others)
//!    must pass; `restore` of **every** block must give the ground truth byte for byte.
//! 3. `mapped-ram save` re-writes all blocks from the restored RAM files with QEMU's device
//!    state (`inspect --device-state-out`) and the same machine type, with the variant's
//!    options (`--channels 4 --direct-io on`, `--offset`); a fresh QEMU (`-incoming defer`,
//!    same command line) loads it with the matching options, must hold the ground truth in
//!    every block, and after `cont` the guest goes on printing: the next counters follow the
//!    last one printed before the migration and the checksum of the tmpfs file is the one
//!    printed after boot.
//! 4. After the multifd migration also `mapped-ram save --update`: a copy of QEMU's **plain**
//!    file (the older snapshot) is brought up to the newer state with the RAM files and the
//!    device state of the multifd migration; QEMU must load it and resume the *newer* guest.
//!
//! The source then `cont`s and ticks again before the next variant. Timings (boot, each
//! migration with QEMU's `downtime`, each step) are printed on stderr (`--nocapture`).
//!
//! Prerequisites: QEMU 10.x, `/var/cache/mapped-ram-tests/{vmlinux,busybox}` (put there by
//! `.ci/install-deps`). If one is missing the test **fails**, unless
//! `MAPPED_RAM_ALLOW_SKIP=linux_guest` allows it to skip (it then prints `SKIPPED`). The test
//! builds the `mapped-ram` binary first (`cargo build -p mapped-ram-linux`), so it never runs
//! a stale one. The two tests take a lock and run one after the other: each runs a TCG guest
//! that needs a core of its own to tick steadily on a 2-core machine.

use mapped_ram_tests::guest::{boot_args, wait_for_tick, write_initramfs, GuestAssets, Tick};
use mapped_ram_tests::image::{first_differing_page, PAGE_SIZE};
use mapped_ram_tests::qemu::{
    disk_temp_dir, file_uri, qemu_version, unavailable_reason, GuestConfig, MachineKind, Qemu,
    QemuVersion, RamBlockInfo, ShmFile, MAIN_RAM_BLOCK, MAX_BANDWIDTH,
};
use mapped_ram_tests::support::{cannot_run, cli_binary};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The name `MAPPED_RAM_ALLOW_SKIP` must list to let this test skip.
const TEST: &str = "linux_guest";
/// Guest RAM.
const RAM: u64 = 512 << 20;
/// `file:PATH,offset=N` of the offset variant.
const OFFSET: u64 = 0x10000;
/// Boot to the second tick.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// From `cont` to a tick.
const TICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Each `mapped-ram` command.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// One guest at a time (see the module docs).
static ONE_GUEST: Mutex<()> = Mutex::new(());

struct Env {
    assets: GuestAssets,
    cli: PathBuf,
    version: QemuVersion,
}

/// QEMU, kernel, busybox and a freshly built CLI, or `None` when skipping is allowed.
fn prerequisites() -> Option<Env> {
    let mut why = Vec::new();
    if let Some(r) = unavailable_reason() {
        why.push(r);
    }
    let assets = GuestAssets::find().map_err(|e| why.push(e)).ok();
    let (Some(assets), Some(version), true) = (assets, qemu_version(), why.is_empty()) else {
        cannot_run(TEST, &why.join("; "));
        return None;
    };
    Some(Env {
        assets,
        cli: build_cli(),
        version,
    })
}

/// Builds the `mapped-ram` binary of this tree (with the features `cargo test` gives the
/// library here, so nothing is rebuilt twice) and returns its path.
fn build_cli() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let release = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "mapped-ram-linux",
        "--bin",
        "mapped-ram",
    ])
    .args(["--features", "fault-injection"])
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .expect("running cargo build for the mapped-ram binary");
    assert!(
        st.success(),
        "cargo build of the mapped-ram binary failed: {st}"
    );
    cli_binary().expect("mapped-ram binary not found next to the test executable after building it")
}

/// Runs `mapped-ram --json ARGS`, bounded by [`CLI_TIMEOUT`]; panics unless it exits 0.
fn cli(env: &Env, args: &[String]) -> Value {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let err = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = Command::new(&env.cli)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.reopen().expect("reopen")))
        .stderr(Stdio::from(err.reopen().expect("reopen")))
        .spawn()
        .expect("spawning mapped-ram");
    let started = Instant::now();
    let deadline = started + CLI_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for mapped-ram") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mapped-ram {args:?} still running after {CLI_TIMEOUT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "  mapped-ram {}: {:.2} s",
        args.iter()
            .take_while(|a| !a.starts_with("--ram"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    let stdout = fs::read_to_string(out.path()).unwrap_or_default();
    let stderr = fs::read_to_string(err.path()).unwrap_or_default();
    assert!(
        status.success(),
        "mapped-ram {args:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("mapped-ram {args:?}: bad JSON ({e}):\n{stdout}"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn ram_arg(name: &str, path: &Path) -> [String; 2] {
    ["--ram".into(), format!("{name}={}", path.display())]
}

/// Asserts `got == expected`, naming the first differing page.
fn assert_same(what: &str, expected: &[u8], got: &[u8]) {
    assert_eq!(expected.len(), got.len(), "{what}: length differs");
    if let Some(p) = first_differing_page(expected, got) {
        let at = p * PAGE_SIZE;
        let end = (at + 16).min(expected.len());
        panic!(
            "{what}: first differing page {p} (offset {at:#x}): expected {:02x?}, got {:02x?}",
            &expected[at..end],
            &got[at..end]
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Plain,
    Multifd,
    Offset,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Multifd => "multifd4-direct-io",
            Variant::Offset => "offset",
        }
    }
    fn multifd(self) -> Option<u8> {
        (self == Variant::Multifd).then_some(4)
    }
    fn direct_io(self) -> bool {
        self == Variant::Multifd
    }
    fn offset(self) -> Option<u64> {
        (self == Variant::Offset).then_some(OFFSET)
    }
    /// The CLI's options matching the variant (`--offset`, channels and direct-io).
    fn cli_io_args(self) -> Vec<String> {
        match self {
            Variant::Plain => vec![],
            Variant::Multifd => ["--channels", "4", "--direct-io", "on"]
                .map(String::from)
                .to_vec(),
            Variant::Offset => vec!["--offset".into(), OFFSET.to_string()],
        }
    }
}

/// The guest's machine type and whether it has a user-mode (slirp) network card.
///
/// QEMU numbers its migration sections in the order their handlers registered: slirp
/// (`-netdev user`) registers before RAM, so RAM is section 2 with it (and with QEMU's
/// default devices, which include a user-mode network, whatever the machine type, `none`
/// too) and section 1 without it (`-nodefaults`, no `-netdev user`). Our writer always uses 1;
/// the pc guest checks that QEMU loads such a file whose device state has a section 1 of its
/// own (slirp's).
#[derive(Clone, Copy, Debug)]
struct Shape {
    machine: MachineKind,
    user_net: bool,
}

impl Shape {
    fn extra_args(self) -> Vec<String> {
        if self.user_net {
            ["-netdev", "user,id=n0", "-device", "e1000,netdev=n0"]
                .map(String::from)
                .to_vec()
        } else {
            Vec::new()
        }
    }
    fn ram_section_id(self) -> u64 {
        if self.user_net {
            2
        } else {
            1
        }
    }
}

/// The source's memory while it is paused after a migration (see the module docs).
struct Truth {
    /// Every block in QEMU's order with its content.
    blocks: Vec<(RamBlockInfo, Vec<u8>)>,
    /// Files holding each block: the backing file for `mem`, copies of the others.
    files: Vec<(String, PathBuf)>,
}

/// Starts a QEMU for the guest: fresh zeroed RAM, serial console to `serial`, `-S`;
/// `incoming` adds `-incoming defer`.
fn spawn_guest(
    env: &Env,
    shape: Shape,
    initrd: &Path,
    serial: &Path,
    incoming: bool,
) -> (Qemu, ShmFile) {
    let mut cfg = GuestConfig::new(shape.machine, RAM);
    cfg.extra_args = boot_args(&env.assets, initrd, serial);
    cfg.extra_args.extend(shape.extra_args());
    let ram = ShmFile::zeroed(if incoming { "guest-dst" } else { "guest-src" }, RAM)
        .expect("guest RAM file in /dev/shm");
    let q = Qemu::spawn(&cfg, ram.path(), incoming).unwrap_or_else(|e| panic!("{e}"));
    (q, ram)
}

/// Waits for a tick `>= min_n` on a running QEMU.
fn ticks_from(q: &mut Qemu, serial: &Path, min_n: u64, timeout: Duration) -> Vec<Tick> {
    wait_for_tick(serial, min_n, timeout, || match q.exit_status() {
        Some(st) => Err(format!("QEMU exited ({st}): {}", q.log_tail(2048))),
        None => Ok(()),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Sets the migration capabilities and parameters of `v` on the source (explicitly off what
/// an earlier variant turned on).
fn configure_source(q: &mut Qemu, v: Variant) {
    let caps = [("mapped-ram", true), ("multifd", v.multifd().is_some())];
    q.set_capabilities(&caps).unwrap_or_else(|e| panic!("{e}"));
    let mut p = json!({ "max-bandwidth": MAX_BANDWIDTH, "direct-io": v.direct_io() });
    if let Some(n) = v.multifd() {
        p["multifd-channels"] = json!(n);
    }
    q.set_parameters(p).unwrap_or_else(|e| panic!("{e}"));
}

/// Reads the paused source's memory (see the module docs) and writes the non-main blocks
/// to files in `dir`.
fn capture_truth(src: &mut Qemu, src_ram: &ShmFile, dir: &Path) -> Truth {
    let infos = src.ram_blocks().unwrap_or_else(|e| panic!("{e}"));
    let mut blocks = Vec::new();
    let mut files = Vec::new();
    for (i, b) in infos.into_iter().enumerate() {
        if b.name == MAIN_RAM_BLOCK {
            let data = src_ram.read().expect("reading the source's RAM file");
            files.push((b.name.clone(), src_ram.path().to_path_buf()));
            blocks.push((b, data));
        } else {
            let data = src.read_ram_block(&b).unwrap_or_else(|e| panic!("{e}"));
            let f = dir.join(format!("truth-{i}.bin"));
            fs::write(&f, &data).expect("writing a block copy");
            files.push((b.name.clone(), f));
            blocks.push((b, data));
        }
    }
    Truth { blocks, files }
}

/// Checks QEMU's file with `inspect`, `verify` and `restore` of every block; returns the
/// restored files, the device state file and the number of RAM PART sections.
#[allow(clippy::too_many_arguments)]
fn check_qemu_file(
    env: &Env,
    shape: Shape,
    what: &str,
    machine_name: &str,
    file: &Path,
    v: Variant,
    truth: &Truth,
    dir: &Path,
) -> (Vec<(String, PathBuf)>, PathBuf, usize) {
    let off = v.offset().unwrap_or(0).to_string();
    let ds = dir.join("device-state.bin");
    let info = cli(
        env,
        &[
            "inspect".into(),
            s(file),
            "--offset".into(),
            off.clone(),
            "--device-state-out".into(),
            s(&ds),
        ],
    );
    assert_eq!(info["machine"], machine_name, "{what}: machine");
    assert_eq!(info["capabilities"], json!(["mapped-ram"]), "{what}");
    assert_eq!(
        info["ram_section_id"],
        shape.ram_section_id(),
        "{what}: RAM section id (see Shape)"
    );
    assert_eq!(
        info["checksums"],
        Value::Null,
        "{what}: QEMU writes no checksums"
    );
    let listed: Vec<(String, u64)> = info["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["length"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = truth
        .blocks
        .iter()
        .map(|(b, _)| (b.name.clone(), b.used))
        .collect();
    assert_eq!(
        listed, expected,
        "{what}: blocks of inspect vs x-query-ramblock"
    );
    let total: u64 = expected.iter().map(|b| b.1).sum();
    assert_eq!(info["total_ram"], total, "{what}: total_ram");
    // The RAM must be more than boot firmware: the stored pages of `mem` hold the kernel,
    // the initramfs and the 8 MiB random tmpfs file.
    let mem_stored = info["blocks"][0]["pages_stored"].as_u64().unwrap();
    assert!(
        mem_stored > 3000,
        "{what}: only {mem_stored} pages of mem stored"
    );
    let ds_bytes = fs::read(&ds).expect("device state file");
    assert_eq!(
        ds_bytes.first(),
        Some(&0x04),
        "{what}: device state starts with SECTION_FULL"
    );
    // Between the last block's pages and the device state: the setup EOS, one RAM PART section
    // (`02 id, be64 0x10, 7e id`) per iteration of the live migration, SWITCHOVER_START, RAM
    // END. Our reader must have walked over all of them to find the device state.
    let start = info["device_stream_start"].as_u64().unwrap() as usize;
    let end = info["device_state_offset"].as_u64().unwrap() as usize;
    let mut stream = vec![0u8; end - start];
    fs::File::open(file)
        .and_then(|f| f.read_exact_at(&mut stream, start as u64))
        .expect("reading QEMU's file");
    let sid = (shape.ram_section_id() as u32).to_be_bytes();
    let mut part = vec![0x02];
    part.extend(sid);
    part.extend(0x10u64.to_be_bytes());
    part.push(0x7e);
    part.extend(sid);
    let parts = stream
        .windows(part.len())
        .filter(|w| *w == part.as_slice())
        .count();
    assert!(parts >= 1, "{what}: no RAM PART section");

    // Structure, then the blocks against the ground truth: all of them for the multifd file,
    // all but `mem` for the others (the debug build compares 512 MiB in about 4 s of CPU; the
    // restore below checks `mem` of every file).
    cli(
        env,
        &["verify".into(), s(file), "--offset".into(), off.clone()],
    );
    let mut args = vec!["verify".into(), s(file), "--offset".into(), off.clone()];
    let compared: Vec<&(String, PathBuf)> = truth
        .files
        .iter()
        .filter(|(name, _)| v == Variant::Multifd || name != MAIN_RAM_BLOCK)
        .collect();
    for (name, path) in &compared {
        args.extend(ram_arg(name, path));
    }
    let r = cli(env, &args);
    let names: Vec<&str> = compared.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        r["blocks_compared"],
        json!(names),
        "{what}: verify --ram compared {r}"
    );

    // Restore every block and compare.
    let mut restored = Vec::new();
    let mut args = vec!["restore".into(), s(file)];
    args.extend(v.cli_io_args());
    for (i, (b, _)) in truth.blocks.iter().enumerate() {
        let p = dir.join(format!("restored-{i}.bin"));
        args.extend(ram_arg(&b.name, &p));
        restored.push((b.name.clone(), p));
    }
    let r = cli(env, &args);
    assert_eq!(
        r["blocks_skipped"],
        json!([]),
        "{what}: restore skipped blocks"
    );
    for ((b, data), (_, p)) in truth.blocks.iter().zip(&restored) {
        let got = fs::read(p).expect("restored file");
        assert_same(&format!("{what}: restored {}", b.name), data, &got);
    }
    (restored, ds, parts)
}

/// Loads `file` into a fresh QEMU with the options of `v`, checks that every block holds the
/// ground truth, `cont`s it and checks that the guest goes on from `last` with the boot
/// checksum. Returns (load seconds, first tick).
#[allow(clippy::too_many_arguments)]
fn resume(
    env: &Env,
    what: &str,
    shape: Shape,
    initrd: &Path,
    file: &Path,
    v: Variant,
    truth: &Truth,
    last: &Tick,
    boot_sum: &str,
    dir: &Path,
) -> (f64, Tick) {
    let serial = dir.join(format!("serial-{}.log", what.replace(' ', "-")));
    let (mut q, ram) = spawn_guest(env, shape, initrd, &serial, true);
    let t = Instant::now();
    q.setup_mapped_ram(v.multifd(), v.direct_io(), false)
        .unwrap_or_else(|e| panic!("{e}"));
    q.execute(
        "migrate-incoming",
        json!({ "uri": file_uri(file, v.offset()), "exit-on-error": false }),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    q.wait_migration(what)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let load_s = t.elapsed().as_secs_f64();
    // QEMU's reader, independent of ours, must find the source's memory in our file.
    let infos = q.ram_blocks().unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = infos.iter().map(|b| b.name.as_str()).collect();
    let want: Vec<&str> = truth.blocks.iter().map(|(b, _)| b.name.as_str()).collect();
    assert_eq!(names, want, "{what}: destination blocks");
    for (b, data) in &truth.blocks {
        let got = if b.name == MAIN_RAM_BLOCK {
            ram.read().expect("destination RAM file")
        } else {
            let info = infos.iter().find(|i| i.name == b.name).unwrap();
            q.read_ram_block(info).unwrap_or_else(|e| panic!("{e}"))
        };
        assert_same(&format!("{what}: QEMU loaded {}", b.name), data, &got);
    }
    q.execute("cont", Value::Null)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ticks = ticks_from(&mut q, &serial, last.n + 1, TICK_TIMEOUT);
    let first = ticks[0].clone();
    // And it keeps printing: one more line.
    if ticks.len() < 2 {
        ticks = ticks_from(&mut q, &serial, first.n + 1, TICK_TIMEOUT);
    }
    // The first complete line is the next counter, or the one after it when the migration cut
    // the next line in two (its start then went to the source's console).
    assert!(
        first.n > last.n && first.n <= last.n + 2,
        "{what}: the guest printed {} first after resuming, {} last before the migration: {ticks:?}",
        first.n,
        last.n
    );
    for t in &ticks {
        assert_eq!(t.sum, boot_sum, "{what}: tmpfs checksum changed: {ticks:?}");
    }
    // Increasing (not necessarily consecutive: a kernel message printed into the middle of a
    // tick line makes that line unreadable).
    assert!(
        ticks.windows(2).all(|w| w[1].n > w[0].n),
        "{what}: counters not increasing: {ticks:?}"
    );
    q.quit().unwrap_or_else(|e| panic!("{e}"));
    (load_s, first)
}

fn guest_round_trips(shape: Shape) {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let Some(env) = prerequisites() else { return };
    let t0 = Instant::now();
    let mut report = String::new();
    let machine_name = shape.machine.file_machine_name(&env.version);
    let disk = disk_temp_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR"))))
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = disk.path();
    let initrd = dir.join("initramfs.cpio");
    write_initramfs(&env.assets.busybox, &initrd).expect("writing the initramfs");

    // Boot.
    let src_serial = dir.join("serial-source.log");
    let (mut src, src_ram) = spawn_guest(&env, shape, &initrd, &src_serial, false);
    src.execute("cont", Value::Null)
        .unwrap_or_else(|e| panic!("{e}"));
    let ticks = ticks_from(&mut src, &src_serial, 2, BOOT_TIMEOUT);
    let boot_s = t0.elapsed().as_secs_f64();
    let boot_sum = ticks[0].sum.clone();
    assert!(ticks.iter().all(|t| t.sum == boot_sum), "{ticks:?}");
    let _ = writeln!(report, "{machine_name}: booted to tick 2 in {boot_s:.1} s");

    let mut plain_file: Option<PathBuf> = None;
    for v in [Variant::Plain, Variant::Multifd, Variant::Offset] {
        let what = format!("{machine_name} {}", v.name());
        let vdir = tempfile::Builder::new()
            .prefix("mapped-ram-guest-")
            .tempdir_in("/dev/shm")
            .expect("temp dir in /dev/shm");

        // 1. QEMU migrates the running guest.
        let qfile = dir.join(format!("qemu-{}.mig", v.name()));
        let prefix: Vec<u8> = (0..v.offset().unwrap_or(0))
            .map(|i| (i % 253) as u8)
            .collect();
        if v.offset().is_some() {
            fs::write(&qfile, &prefix).unwrap();
        }
        configure_source(&mut src, v);
        let t = Instant::now();
        src.execute("migrate", json!({ "uri": file_uri(&qfile, v.offset()) }))
            .unwrap_or_else(|e| panic!("{e}"));
        let qm = src.wait_migration(&what).unwrap_or_else(|e| panic!("{e}"));
        let mig_s = t.elapsed().as_secs_f64();
        assert_eq!(src.run_state().unwrap(), "postmigrate", "{what}");
        let last = src_serial_last(&src_serial);
        let truth = capture_truth(&mut src, &src_ram, vdir.path());
        if v.offset().is_some() {
            let head = fs::read(&qfile).unwrap();
            assert!(head.starts_with(&prefix), "{what}: QEMU changed the prefix");
        }

        // 2. Our tool reads QEMU's file.
        let t = Instant::now();
        let (restored, ds, parts) = check_qemu_file(
            &env,
            shape,
            &what,
            &machine_name,
            &qfile,
            v,
            &truth,
            vdir.path(),
        );
        let check_s = t.elapsed().as_secs_f64();

        // 3. Our save, loaded and resumed by QEMU.
        let ours = dir.join(format!("ours-{}.mr", v.name()));
        if v.offset().is_some() {
            fs::write(&ours, &prefix).unwrap();
        }
        let t = Instant::now();
        let mut args = vec!["save".into(), "-o".into(), s(&ours)];
        args.extend(v.cli_io_args());
        args.extend(["--machine".into(), machine_name.clone()]);
        args.extend(["--device-state".into(), s(&ds)]);
        for (name, p) in &restored {
            args.extend(ram_arg(name, p));
        }
        cli(&env, &args);
        let save_s = t.elapsed().as_secs_f64();
        if v.offset().is_some() {
            let head = fs::read(&ours).unwrap();
            assert!(
                head.starts_with(&prefix),
                "{what}: our save changed the prefix"
            );
        }
        let (load_s, first) = resume(
            &env,
            &format!("{what} ours"),
            shape,
            &initrd,
            &ours,
            v,
            &truth,
            &last,
            &boot_sum,
            dir,
        );
        let _ = writeln!(
            report,
            "{what}: QEMU migration {mig_s:.2} s (downtime {} ms, total-time {} ms, setup {} ms, {} MiB transferred, {parts} RAM PART sections); \
             inspect+verify+restore {check_s:.2} s; our save {save_s:.2} s; QEMU load of ours {load_s:.2} s; \
             tick {} before, {} after",
            qm["downtime"],
            qm["total-time"],
            qm["setup-time"],
            qm["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
            last.n,
            first.n
        );

        // 4. `save --update` of QEMU's older (plain) file up to this newer state.
        if v == Variant::Multifd {
            let older = plain_file.as_ref().expect("plain file");
            let upd = dir.join("updated.mig");
            // A sparse copy: QEMU's file is 0.5 GiB long but holds about 70 MiB of data.
            let st = Command::new("cp")
                .arg("--sparse=always")
                .args([older, &upd])
                .status()
                .expect("running cp");
            assert!(st.success(), "cp {} failed", older.display());
            let t = Instant::now();
            let mut args = vec!["save".into(), "--update".into(), "-o".into(), s(&upd)];
            args.extend(["--device-state".into(), s(&ds)]);
            for (name, p) in &restored {
                args.extend(ram_arg(name, p));
            }
            let r = cli(&env, &args);
            let upd_s = t.elapsed().as_secs_f64();
            assert_eq!(
                r["unchanged"], false,
                "{what}: update found nothing to do: {r}"
            );
            let (load_s, first) = resume(
                &env,
                &format!("{what} update"),
                shape,
                &initrd,
                &upd,
                Variant::Plain,
                &truth,
                &last,
                &boot_sum,
                dir,
            );
            let _ = writeln!(
                report,
                "{what}: save --update of the plain file {upd_s:.2} s ({} of {} pages changed); QEMU load {load_s:.2} s; tick {} after",
                r["pages_changed"], r["pages_compared"], first.n
            );
        }
        if v == Variant::Plain {
            plain_file = Some(qfile);
        }

        // The source runs on and ticks again before the next migration.
        drop(truth);
        src.execute("cont", Value::Null)
            .unwrap_or_else(|e| panic!("{e}"));
        ticks_from(&mut src, &src_serial, last.n + 1, TICK_TIMEOUT);
    }
    src.quit().unwrap_or_else(|e| panic!("{e}"));
    let _ = writeln!(
        report,
        "{machine_name}: whole test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    eprint!("{report}");
}

/// The last complete tick of the (paused) source.
fn src_serial_last(serial: &Path) -> Tick {
    mapped_ram_tests::guest::read_ticks(serial)
        .pop()
        .expect("the source printed ticks")
}

#[test]
fn linux_guest_pc() {
    guest_round_trips(Shape {
        machine: MachineKind::Pc,
        user_net: true,
    });
}

#[test]
fn linux_guest_q35() {
    guest_round_trips(Shape {
        machine: MachineKind::Q35,
        user_net: false,
    });
}
