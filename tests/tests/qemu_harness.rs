//! Proves the QEMU harness (`mapped_ram_tests::qemu`) against QEMU 10.x itself:
//! QEMU saves a known RAM image with mapped-ram, a fresh QEMU loads it back, and the guest RAM
//! must come back byte for byte. Skipped (with a message) without QEMU 10.x unless `CI` is set.

use mapped_ram_tests::image::{count_zero_pages, first_differing_page, pattern_image, PAGE_SIZE};
use mapped_ram_tests::qemu::*;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn disk_dir() -> tempfile::TempDir {
    disk_temp_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR")))).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_same_ram(what: &str, expected: &[u8], got: &[u8]) {
    assert_eq!(expected.len(), got.len(), "{what}: length differs");
    if let Some(p) = first_differing_page(expected, got) {
        panic!(
            "{what}: first differing page {p} (offset {:#x})",
            p * PAGE_SIZE
        );
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One block record of a mapped-ram file, parsed independently of the core crate.
#[derive(Debug)]
struct BlockRec {
    name: String,
    used: u64,
    bitmap_offset: u64,
    pages_offset: u64,
}

/// Minimal parser of the file head (spec §a.4/§b.1), for the harness self-test only.
fn parse_head(file: &[u8], offset: usize) -> (String, Vec<String>, Vec<BlockRec>) {
    let mut p = offset;
    assert_eq!(be32(file, p), 0x5145_564d, "magic at {offset:#x}");
    assert_eq!(be32(file, p + 4), 3, "version");
    assert_eq!(file[p + 8], 0x07, "configuration section");
    let l = be32(file, p + 9) as usize;
    p += 13;
    let machine = String::from_utf8(file[p..p + l].to_vec()).unwrap();
    p += l;
    let mut caps = Vec::new();
    while file[p] == 0x05 {
        let nlen = file[p + 1] as usize;
        let name = std::str::from_utf8(&file[p + 2..p + 2 + nlen])
            .unwrap()
            .to_string();
        p += 2 + nlen + 4;
        match name.as_str() {
            "configuration/capabilities" => {
                let n = be32(file, p);
                p += 4;
                for _ in 0..n {
                    let cl = file[p] as usize;
                    caps.push(String::from_utf8(file[p + 1..p + 1 + cl].to_vec()).unwrap());
                    p += 1 + cl;
                }
            }
            "configuration/target-page-bits" => p += 4,
            other => panic!("unexpected subsection {other}"),
        }
    }
    assert_eq!(file[p], 0x01, "SECTION_START");
    assert_eq!(&file[p + 5..p + 9], b"\x03ram");
    assert_eq!(be32(file, p + 13), 4, "ram version_id");
    p += 17;
    let w = be64(file, p);
    assert_eq!(w & 0xfff, 0x4, "MEM_SIZE flag");
    let mut remaining = w & !0xfff;
    p += 8;
    let mut blocks = Vec::new();
    while remaining > 0 {
        let il = file[p] as usize;
        let name = String::from_utf8(file[p + 1..p + 1 + il].to_vec()).unwrap();
        p += 1 + il;
        let used = be64(file, p);
        p += 8;
        let hdr = p;
        assert_eq!(be32(file, hdr), 1, "header version");
        assert_eq!(be64(file, hdr + 4), 4096, "page size");
        let bitmap_offset = be64(file, hdr + 12);
        let pages_offset = be64(file, hdr + 20);
        assert_eq!(bitmap_offset, hdr as u64 + 28, "bitmap follows header");
        assert_eq!(pages_offset % MIB, 0, "pages region 1 MiB aligned");
        let bitmap_size = (used / 4096).div_ceil(64) * 8;
        assert!(bitmap_offset + bitmap_size <= pages_offset);
        blocks.push(BlockRec {
            name,
            used,
            bitmap_offset,
            pages_offset,
        });
        remaining -= used;
        p = (pages_offset + used) as usize;
    }
    assert_eq!(be64(file, p), 0x10, "EOS after the block list");
    (machine, caps, blocks)
}

/// Checks that the file's pages of `block` reproduce `expected` via the bitmap (spec §a.3).
fn check_block_pages(file: &[u8], block: &BlockRec, expected: &[u8]) {
    assert_eq!(block.used as usize, expected.len(), "{} length", block.name);
    let bm = &file[block.bitmap_offset as usize..];
    for (k, exp) in expected.chunks(PAGE_SIZE).enumerate() {
        let set = bm[k / 8] >> (k % 8) & 1 == 1;
        if set {
            let at = block.pages_offset as usize + k * PAGE_SIZE;
            assert!(
                file[at..at + PAGE_SIZE] == *exp,
                "{} page {k} data",
                block.name
            );
        } else {
            assert!(
                exp.iter().all(|&b| b == 0),
                "{} page {k}: bit clear but page non-zero",
                block.name
            );
        }
    }
}

fn roundtrip_none(multifd_channels: Option<u8>, direct_io: bool, seed: u64) {
    let Some(_v) = require_qemu() else { return };
    let size = 64 * MIB;
    let image = pattern_image(size as usize, seed, 0.25, false);
    let zeros = count_zero_pages(&image);
    assert!(zeros > 3000 && zeros < 5200, "{zeros} zero pages");
    let cfg = GuestConfig::new(MachineKind::None, size);
    let dir = disk_dir();
    let out = dir.path().join("none.mig");

    let mut so = SaveOpts::new(&out);
    so.multifd_channels = multifd_channels;
    so.direct_io = direct_io;
    let saved = qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(saved.query_migrate["status"], "completed");
    assert_eq!(saved.run_state, "postmigrate");
    let names: Vec<&str> = saved.ram_blocks.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, [MAIN_RAM_BLOCK]);
    assert_eq!(saved.ram_blocks[0].used, size);
    assert!(saved.block_contents.is_empty());

    let file = std::fs::read(&out).unwrap();
    let (machine, caps, blocks) = parse_head(&file, 0);
    assert_eq!(machine, "none");
    assert_eq!(caps, ["mapped-ram"]);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].name, "mem");
    assert_eq!(blocks[0].pages_offset, MIB);
    check_block_pages(&file, &blocks[0], &image);
    drop(file);

    let mut lo = LoadOpts::new(&out);
    lo.multifd_channels = multifd_channels;
    lo.direct_io = direct_io;
    let loaded = qemu_load(&cfg, &lo).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.query_migrate["status"], "completed");
    let ram = loaded.ram.read().unwrap();
    assert_same_ram("loaded RAM", &image, &ram);
    eprintln!(
        "none {multifd_channels:?} dio={direct_io}: save {:?}, load {:?}, run state after load {:?}",
        saved.elapsed, loaded.elapsed, loaded.run_state
    );
}

#[test]
fn none_mapped_ram_without_multifd_roundtrip() {
    roundtrip_none(None, false, 1);
}

#[test]
fn none_multifd2_direct_io_roundtrip_on_disk() {
    roundtrip_none(Some(2), true, 2);
}

#[test]
fn offset_prefix_is_untouched_and_roundtrips() {
    let Some(_v) = require_qemu() else { return };
    let size = 32 * MIB;
    let image = pattern_image(size as usize, 3, 0.5, true);
    let cfg = GuestConfig::new(MachineKind::None, size);
    let dir = disk_dir();
    let out = dir.path().join("offset.mig");
    let off = 0x1000u64;
    // Prefix of 'X' plus trailing garbage (QEMU truncates the file to the offset).
    let mut pre = vec![b'X'; off as usize];
    pre.extend_from_slice(&[0xEE; 8192]);
    std::fs::write(&out, &pre).unwrap();

    let mut so = SaveOpts::new(&out);
    so.offset = Some(off);
    so.multifd_channels = Some(2);
    qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{e}"));
    let file = std::fs::read(&out).unwrap();
    assert!(
        file[..off as usize].iter().all(|&b| b == b'X'),
        "prefix modified"
    );
    let (_, _, blocks) = parse_head(&file, off as usize);
    assert_eq!(
        blocks[0].bitmap_offset,
        off + 0x81,
        "header shifted by the offset"
    );
    assert_eq!(
        blocks[0].pages_offset, MIB,
        "pages_offset is absolute and still 1 MiB"
    );
    check_block_pages(&file, &blocks[0], &image);
    drop(file);

    let mut lo = LoadOpts::new(&out);
    lo.offset = Some(off);
    let loaded = qemu_load(&cfg, &lo).unwrap_or_else(|e| panic!("{e}"));
    assert_same_ram("loaded RAM (offset)", &image, &loaded.ram.read().unwrap());
    let after = std::fs::read(&out).unwrap();
    assert!(
        after[..off as usize].iter().all(|&b| b == b'X'),
        "prefix modified by load"
    );
}

#[test]
fn microvm_multi_block_save_and_load() {
    let Some(_v) = require_qemu() else { return };
    let size = 32 * MIB;
    let image = pattern_image(size as usize, 4, 0.25, true);
    let cfg = GuestConfig::new(MachineKind::Microvm, size);
    let dir = disk_dir();
    let out = dir.path().join("microvm.mig");

    let mut so = SaveOpts::new(&out);
    so.multifd_channels = Some(2);
    so.direct_io = true;
    let saved = qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<(&str, u64)> = saved
        .ram_blocks
        .iter()
        .map(|b| (b.name.as_str(), b.used))
        .collect();
    assert_eq!(names, [("mem", size), ("pc.bios", 0x10000)]);
    let bios = &saved.block_contents["pc.bios"];
    assert_eq!(bios.len(), 0x10000);
    assert!(bios.iter().any(|&b| b != 0));
    // With -S, pc.bios holds the qboot ROM file unchanged.
    if let Ok(rom) = std::fs::read("/usr/share/qemu/qboot.rom") {
        assert!(
            rom == *bios,
            "pc.bios differs from /usr/share/qemu/qboot.rom"
        );
    }

    let file = std::fs::read(&out).unwrap();
    assert_eq!(&file[..4], &0x5145_564du32.to_be_bytes());
    let (machine, caps, blocks) = parse_head(&file, 0);
    assert_eq!(machine, "microvm");
    assert_eq!(caps, ["mapped-ram"]);
    assert_eq!(blocks.len(), 2);
    assert_eq!((blocks[0].name.as_str(), blocks[0].used), ("mem", size));
    assert_eq!(
        (blocks[1].name.as_str(), blocks[1].used),
        ("pc.bios", 0x10000)
    );
    assert_eq!(blocks[1].pages_offset, blocks[0].pages_offset + size + MIB);
    assert!(
        file.len() as u64 > blocks[1].pages_offset + 0x10000,
        "device state follows"
    );
    check_block_pages(&file, &blocks[0], &image);
    check_block_pages(&file, &blocks[1], bios);
    drop(file);

    let mut lo = LoadOpts::new(&out);
    lo.multifd_channels = Some(3);
    let loaded = qemu_load(&cfg, &lo).unwrap_or_else(|e| panic!("{e}"));
    assert_same_ram("microvm mem", &image, &loaded.ram.read().unwrap());
    assert_eq!(
        loaded.block_contents, saved.block_contents,
        "non-main blocks after load"
    );
}

#[test]
fn microvm_bios_via_pmemsave_matches_ram_block() {
    let Some(_v) = require_qemu() else { return };
    let size = 16 * MIB;
    let cfg = GuestConfig::new(MachineKind::Microvm, size);
    let image = pattern_image(size as usize, 9, 0.25, false);
    let ram = ShmFile::with_contents("pmem", &image).unwrap();
    let mut q = Qemu::spawn(&cfg, ram.path(), false).unwrap_or_else(|e| panic!("{e}"));
    let blocks = q.ram_blocks().unwrap_or_else(|e| panic!("{e}"));
    let bios = blocks
        .iter()
        .find(|b| b.name == "pc.bios")
        .expect("pc.bios");
    let via_proc = q.read_ram_block(bios).unwrap_or_else(|e| panic!("{e}"));
    // microvm maps pc.bios just below 4 GiB.
    let via_pmem = q
        .pmemsave((4 << 30) - bios.used, bios.used)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        via_proc == via_pmem,
        "pc.bios: /proc/PID/mem and pmemsave differ"
    );
    // The main block read through /proc equals the backing file.
    let main = blocks.iter().find(|b| b.name == MAIN_RAM_BLOCK).unwrap();
    assert!(q.read_ram_block(main).unwrap() == ram.read().unwrap());
    // microvm maps the main block at guest-physical 0, except that the ISA BIOS alias of
    // pc.bios (its last 64 KiB here) covers 0xf0000..0x100000.
    let low = q.pmemsave(0, 2 * MIB).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        low[..0xf0000] == image[..0xf0000],
        "pmemsave(0) differs from RAM"
    );
    assert!(
        low[0xf0000..0x100000] == via_proc[..],
        "isa-bios alias differs"
    );
    assert!(
        low[0x100000..] == image[0x100000..2 << 20],
        "pmemsave(1M) differs from RAM"
    );
    q.quit().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn pc_all_blocks_roundtrip() {
    let Some(v) = require_qemu() else { return };
    let size = 32 * MIB;
    let image = pattern_image(size as usize, 5, 0.25, false);
    let cfg = GuestConfig::new(MachineKind::Pc, size);
    let dir = disk_dir();
    let out = dir.path().join("pc.mig");
    let saved = qemu_save(&cfg, &image, &SaveOpts::new(&out)).unwrap_or_else(|e| panic!("{e}"));
    let file = std::fs::read(&out).unwrap();
    let (machine, _, blocks) = parse_head(&file, 0);
    assert_eq!(machine, MachineKind::Pc.file_machine_name(&v));
    // The file lists exactly the blocks x-query-ramblock reports, same order and lengths.
    let in_file: Vec<(&str, u64)> = blocks.iter().map(|b| (b.name.as_str(), b.used)).collect();
    let reported: Vec<(&str, u64)> = saved
        .ram_blocks
        .iter()
        .map(|b| (b.name.as_str(), b.used))
        .collect();
    assert_eq!(in_file, reported);
    for b in &blocks {
        let exp = if b.name == MAIN_RAM_BLOCK {
            &image
        } else {
            &saved.block_contents[&b.name]
        };
        check_block_pages(&file, b, exp);
    }
    drop(file);
    let loaded = qemu_load(&cfg, &LoadOpts::new(&out)).unwrap_or_else(|e| panic!("{e}"));
    assert_same_ram("pc mem", &image, &loaded.ram.read().unwrap());
    assert_eq!(
        loaded.block_contents.keys().collect::<Vec<_>>(),
        saved.block_contents.keys().collect::<Vec<_>>()
    );
    for (name, data) in &saved.block_contents {
        assert!(
            loaded.block_contents[name] == *data,
            "block {name} differs after load"
        );
    }
}

#[test]
fn load_errors_carry_qemu_text() {
    let Some(_v) = require_qemu() else { return };
    let size = 16 * MIB;
    let image = pattern_image(size as usize, 6, 0.5, false);
    let dir = disk_dir();
    let out = dir.path().join("none-for-microvm.mig");
    qemu_save(
        &GuestConfig::new(MachineKind::None, size),
        &image,
        &SaveOpts::new(&out),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = qemu_load(
        &GuestConfig::new(MachineKind::Microvm, size),
        &LoadOpts::new(&out),
    )
    .expect_err("loading a 'none' file into microvm must fail");
    let text = err.to_string();
    eprintln!("expected error:\n{text}");
    assert!(text.contains("failed"), "{text}");
    assert!(text.contains("Machine type received is 'none'"), "{text}");
    assert!(err.last_query_migrate.is_some());
}

#[test]
fn qmp_errors_and_events() {
    let Some(_v) = require_qemu() else { return };
    let cfg = GuestConfig::new(MachineKind::None, 4 * MIB);
    let ram = ShmFile::zeroed("qmp", 4 * MIB).unwrap();
    let mut q = Qemu::spawn(&cfg, ram.path(), false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(q.qmp().greeting()["QMP"]["version"]["qemu"]["major"], 10);
    match q.qmp().execute("no-such-command", serde_json::Value::Null) {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("{other:?}"),
    }
    // Rule 17: multifd to file: without mapped-ram is refused at migrate time.
    q.set_capabilities(&[("multifd", true)]).unwrap();
    let e = q
        .execute("migrate", serde_json::json!({"uri": "file:/nonexistent/x"}))
        .expect_err("must fail");
    assert!(e.to_string().contains("multi-channel"), "{e}");
    assert_eq!(q.run_state().unwrap(), "prelaunch");
    q.execute("cont", serde_json::Value::Null).unwrap();
    q.execute("stop", serde_json::Value::Null).unwrap();
    // Events (RESUME, STOP) were skipped by execute and kept.
    let _ = q.execute("query-status", serde_json::Value::Null).unwrap();
    let evs: Vec<String> = q
        .qmp()
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(evs.iter().any(|e| e == "STOP"), "{evs:?}");
    q.quit().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn stuck_migration_times_out_and_kills_qemu() {
    let Some(_v) = require_qemu() else { return };
    let mut cfg = GuestConfig::new(MachineKind::None, 16 * MIB);
    cfg.timeout = std::time::Duration::from_secs(3);
    let ram = ShmFile::zeroed("stuck", 16 * MIB).unwrap();
    std::fs::write(ram.path(), pattern_image(16 << 20, 7, 0.0, false)).unwrap();
    let dir = disk_dir();
    let out = dir.path().join("stuck.mig");
    let mut q = Qemu::spawn(&cfg, ram.path(), false).unwrap_or_else(|e| panic!("{e}"));
    let pid = q.pid();
    // pause-before-switchover: the migration stops in state pre-switchover until
    // migrate-continue, which never comes.
    q.set_capabilities(&[("pause-before-switchover", true)])
        .unwrap();
    q.setup_mapped_ram(None, false, true).unwrap();
    q.execute(
        "migrate",
        serde_json::json!({ "uri": file_uri(&out, None) }),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let err = q.wait_migration("stuck save").expect_err("must time out");
    eprintln!("expected error:\n{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    assert!(err.cause.contains("not completed within"), "{err}");
    let last = err.last_query_migrate.as_ref().expect("last query-migrate");
    assert_eq!(last["status"], "pre-switchover", "{err}");
    assert!(err.to_string().contains("last query-migrate"));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU still alive"
    );
}

#[test]
fn hung_qmp_command_times_out_and_kills_qemu() {
    let Some(_v) = require_qemu() else { return };
    let mut cfg = GuestConfig::new(MachineKind::None, 4 * MIB);
    cfg.timeout = std::time::Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let ram = ShmFile::zeroed("hung", 4 * MIB).unwrap();
    let mut q = Qemu::spawn(&cfg, ram.path(), true).unwrap_or_else(|e| panic!("{e}"));
    let pid = q.pid();
    q.setup_mapped_ram(None, false, false).unwrap();
    // Opening a FIFO without a writer blocks QEMU's main loop inside the QMP command.
    let err = q
        .execute(
            "migrate-incoming",
            serde_json::json!({ "uri": file_uri(&fifo, None) }),
        )
        .expect_err("must time out");
    assert!(err.cause.contains("no reply within"), "{err}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU still alive"
    );
}

#[test]
fn none_roundtrip_with_auto_accel() {
    let Some(_v) = require_qemu() else { return };
    let size = 16 * MIB;
    let image = pattern_image(size as usize, 8, 0.25, false);
    let mut cfg = GuestConfig::new(MachineKind::None, size);
    cfg.accel = Accel::Auto; // KVM when /dev/kvm is usable
    let dir = disk_dir();
    let out = dir.path().join("auto.mig");
    qemu_save(&cfg, &image, &SaveOpts::new(&out)).unwrap_or_else(|e| panic!("{e}"));
    // A file saved without multifd loads with multifd (channel count leaves no trace).
    let mut lo = LoadOpts::new(&out);
    lo.multifd_channels = Some(4);
    let loaded = qemu_load(&cfg, &lo).unwrap_or_else(|e| panic!("{e}"));
    assert_same_ram("auto-accel RAM", &image, &loaded.ram.read().unwrap());
}
