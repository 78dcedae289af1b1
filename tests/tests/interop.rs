//! Interoperability with real QEMU 10.0, in both directions, plus the I/O shape of the CLI.
//!
//! * **QEMU → us** (`qemu_to_us_*`): QEMU saves a guest (`-machine none`, microvm, pc; with and
//!   without multifd, with direct-io, with `offset=`), and our [`restore`] must reproduce every
//!   RAM block byte for byte — into destinations pre-filled with garbage, so every page whose
//!   bit is clear must be zeroed by us.
//! * **us → QEMU** (`us_to_qemu_*`): we write a file with [`save`] for a RAM image different from
//!   the one QEMU saved, carrying the device state of a QEMU file of the same guest shape, and a
//!   fresh QEMU must load exactly our image.
//! * **decoder** (`decoder_*`, and a check inside every QEMU → us case): the core decoder and
//!   [`inspect`] must describe a QEMU-written file exactly as QEMU reports it (`x-query-ramblock`
//!   block list, the device-state offset found by reading the RAM END bytes, the number of
//!   stored pages counted from the raw bitmap bytes).
//! * **write sizes** (`cli_direct_io_write_sizes_under_strace`): the `mapped-ram` CLI, under
//!   `strace`, must issue large writes on its `O_DIRECT` channel descriptors; QEMU's own write
//!   sizes for the same image (multifd 2, direct-io) are measured and printed for comparison.
//!
//! Every test starts with [`require_qemu`]: skipped outside CI when QEMU 10.x is missing, a
//! failure under `CI`. Files live on a disk file system (ext4 here) from [`disk_temp_dir`], so
//! that direct-io is really exercised.

use mapped_ram_core::stream::{decode_file, ByteSource, QEMU_VM_SECTION_FULL};
use mapped_ram_linux::{
    inspect, read_device_state, restore, save, DirectIo, RestoreOptions, RestoreRegion,
    SaveOptions, SaveRegion, SnapshotInfo,
};
use mapped_ram_tests::image::{count_zero_pages, first_differing_page, pattern_image, PAGE_SIZE};
use mapped_ram_tests::qemu::*;
use mapped_ram_tests::support::cli_binary;
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;
const PS: u64 = PAGE_SIZE as u64;
/// `file:PATH,offset=0x1000`.
const PREFIX: u64 = 0x1000;

fn disk_dir() -> tempfile::TempDir {
    disk_temp_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR")))).unwrap_or_else(|e| panic!("{e}"))
}

fn ok<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Asserts `got == expected`, naming the first differing page and its first bytes.
fn assert_same(what: &str, expected: &[u8], got: &[u8]) {
    assert_eq!(
        expected.len(),
        got.len(),
        "{what}: length differs (expected {:#x}, got {:#x})",
        expected.len(),
        got.len()
    );
    if let Some(p) = first_differing_page(expected, got) {
        let at = p * PAGE_SIZE;
        let end = (at + 16).min(expected.len());
        let zero_exp = expected[at..(at + PAGE_SIZE).min(expected.len())]
            .iter()
            .all(|&b| b == 0);
        panic!(
            "{what}: first differing page {p} (offset {at:#x}; expected page is {}): expected {:02x?}, got {:02x?}",
            if zero_exp { "all zero" } else { "data" },
            &expected[at..end],
            &got[at..end]
        );
    }
}

/// A restore destination: page-aligned (O_DIRECT can read straight into it) or deliberately
/// misaligned by 8 bytes (our restore must bounce through an aligned buffer).
struct Dest {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Dest {
    fn new(len: usize, aligned: bool, fill: u8) -> Dest {
        let buf = vec![fill; len + 2 * PAGE_SIZE];
        let skew = buf.as_ptr().align_offset(PAGE_SIZE);
        let start = if aligned { skew } else { skew + 8 };
        Dest { buf, start, len }
    }

    fn mem(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

// ------------------------------------------------------------------------------------------------
// Decoder / inspect checks on a QEMU-written file
// ------------------------------------------------------------------------------------------------

/// A [`ByteSource`] over a file, written here so the decoder runs on the raw file.
struct FileSrc(std::fs::File);

impl ByteSource for FileSrc {
    type Error = std::io::Error;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, std::io::Error> {
        FileExt::read_at(&self.0, buf, offset)
    }
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks the core decoder and `inspect` against a QEMU-written file and what QEMU reported
/// about its guest; returns `inspect`'s result.
fn check_decoder_on_qemu_file(
    what: &str,
    saved: &SaveReport,
    image: &[u8],
    machine: MachineKind,
    version: &QemuVersion,
) -> SnapshotInfo {
    let path = &saved.path;
    let offset = saved.offset;
    let file = ok("reading the QEMU file", std::fs::read(path));

    // Block list from the core decoder: names, used lengths, in x-query-ramblock order.
    let mut records = Vec::new();
    let fi = decode_file(
        FileSrc(ok("open", std::fs::File::open(path))),
        offset,
        |rec| {
            records.push((rec.name.as_str().to_string(), rec.length, rec.layout));
            Ok::<(), std::convert::Infallible>(())
        },
    )
    .unwrap_or_else(|e| panic!("{what}: decode_file rejected QEMU's file: {e}"));
    let reported: Vec<(&str, u64)> = saved
        .ram_blocks
        .iter()
        .map(|b| (b.name.as_str(), b.used))
        .collect();
    let decoded: Vec<(&str, u64)> = records.iter().map(|(n, l, _)| (n.as_str(), *l)).collect();
    assert_eq!(decoded, reported, "{what}: decode_file block list");
    assert_eq!(fi.blocks as usize, reported.len(), "{what}: block count");
    assert_eq!(
        fi.config.machine.as_str(),
        machine.file_machine_name(version),
        "{what}: machine"
    );
    assert_eq!(
        fi.ram.total_ram,
        reported.iter().map(|b| b.1).sum::<u64>(),
        "{what}: MEM_SIZE total"
    );

    // inspect() agrees with the decoder.
    let info = inspect(path, offset).unwrap_or_else(|e| panic!("{what}: inspect: {e}"));
    let inspected: Vec<(&str, u64)> = info
        .blocks
        .iter()
        .map(|b| (b.name.as_str(), b.layout.length))
        .collect();
    assert_eq!(inspected, reported, "{what}: inspect block list");
    assert_eq!(info.machine, machine.file_machine_name(version));
    assert_eq!(info.capabilities, ["mapped-ram"], "{what}: capabilities");
    assert_eq!(info.file_size, file.len() as u64);
    assert_eq!(
        info.device_state_offset, fi.tail.device_state_offset,
        "{what}: device_state_offset of inspect vs decode_file"
    );
    assert_eq!(info.device_stream_start, fi.tail.device_stream_start);

    // The RAM setup EOS follows the last block's pages.
    let (_, last_len, last) = records.last().unwrap();
    assert_eq!(
        fi.tail.device_stream_start,
        last.pages_offset + last_len,
        "{what}: device_stream_start"
    );
    assert_eq!(
        be64(&file, fi.tail.device_stream_start),
        0x10,
        "{what}: EOS word at device_stream_start"
    );

    // Device state offset, verified on the raw bytes: a FULL section starts there, and the
    // bytes before it are the RAM END section `03 <id> <EOS> 7e <id>`.
    let dso = fi.tail.device_state_offset as usize;
    assert!(dso > 18 && dso < file.len(), "{what}: dso {dso:#x}");
    assert_eq!(fi.ram.section_id, 1, "{what}: QEMU's RAM section id");
    assert_eq!(
        file[dso], QEMU_VM_SECTION_FULL,
        "{what}: byte at device_state_offset {dso:#x}"
    );
    assert_eq!(fi.tail.first_device_record, Some(QEMU_VM_SECTION_FULL));
    let ram_end: [u8; 18] = [
        0x03, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 1,
    ];
    assert_eq!(
        file[dso - 18..dso],
        ram_end,
        "{what}: RAM END section before device_state_offset {dso:#x}"
    );
    // read_device_state returns exactly the rest of the file.
    let tail = ok("read_device_state", read_device_state(path, offset));
    assert!(tail == file[dso..], "{what}: read_device_state");

    // Stored pages: count the set bits of the raw bitmap bytes, independently of the core.
    let expected = saved.blocks_with(image);
    for ((name, len, layout), block) in records.iter().zip(&info.blocks) {
        let pages = len / PS;
        assert_eq!(len % PS, 0);
        // The header's be64 bitmap_offset (header: be32 version, be64 page size, be64 bitmap
        // offset, be64 pages offset).
        assert_eq!(be64(&file, layout.header_offset + 4), PS, "{what}: {name}");
        assert_eq!(
            be64(&file, layout.header_offset + 12),
            layout.bitmap_offset,
            "{what}: {name} bitmap_offset"
        );
        assert_eq!(
            be64(&file, layout.header_offset + 20),
            layout.pages_offset,
            "{what}: {name} pages_offset"
        );
        let nbytes = pages.div_ceil(64) * 8;
        assert_eq!(layout.bitmap_size, nbytes, "{what}: {name} bitmap size");
        let raw = &file[layout.bitmap_offset as usize..(layout.bitmap_offset + nbytes) as usize];
        let mut set = 0u64;
        for (w, word) in raw.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(word.try_into().unwrap());
            for bit in 0..64u64 {
                if word >> bit & 1 == 1 {
                    let page = w as u64 * 64 + bit;
                    assert!(
                        page < pages,
                        "{what}: {name}: bit {page} beyond {pages} pages"
                    );
                    set += 1;
                }
            }
        }
        assert_eq!(
            block.pages_stored(),
            set,
            "{what}: {name}: inspect's stored pages vs raw bitmap"
        );
        // QEMU leaves exactly the zero pages out.
        let data = expected.iter().find(|(n, _)| n == name).unwrap().1;
        let nonzero = pages - count_zero_pages(data) as u64;
        assert_eq!(
            set, nonzero,
            "{what}: {name}: stored pages vs non-zero pages"
        );
    }
    info
}

// ------------------------------------------------------------------------------------------------
// (a) QEMU → us
// ------------------------------------------------------------------------------------------------

struct QemuToUs {
    name: &'static str,
    machine: MachineKind,
    ram_mib: u64,
    seed: u64,
    qemu_multifd: Option<u8>,
    qemu_direct_io: bool,
    offset: Option<u64>,
    channels: usize,
    direct_io: DirectIo,
    aligned: bool,
    memory_is_zeroed: bool,
    /// Pass the regions in reverse file order.
    reverse_regions: bool,
}

impl QemuToUs {
    fn new(name: &'static str, machine: MachineKind, ram_mib: u64, seed: u64) -> Self {
        QemuToUs {
            name,
            machine,
            ram_mib,
            seed,
            qemu_multifd: None,
            qemu_direct_io: false,
            offset: None,
            channels: 1,
            direct_io: DirectIo::Off,
            aligned: true,
            memory_is_zeroed: false,
            reverse_regions: false,
        }
    }
}

fn qemu_to_us(c: QemuToUs) {
    let Some(version) = require_qemu() else {
        return;
    };
    let t0 = Instant::now();
    let size = c.ram_mib * MIB;
    let image = pattern_image(size as usize, c.seed, 0.25, false);
    let cfg = GuestConfig::new(c.machine, size);
    let dir = disk_dir();
    let out = dir.path().join(format!("{}.mig", c.name));
    if let Some(off) = c.offset {
        std::fs::write(&out, vec![b'Q'; off as usize]).unwrap();
    }
    let mut so = SaveOpts::new(&out);
    so.multifd_channels = c.qemu_multifd;
    so.direct_io = c.qemu_direct_io;
    so.offset = c.offset;
    let saved = qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    check_decoder_on_qemu_file(c.name, &saved, &image, c.machine, &version);

    let expected = saved.blocks_with(&image);
    let fill = if c.memory_is_zeroed { 0 } else { 0xAA };
    let mut dests: Vec<Dest> = expected
        .iter()
        .map(|(_, d)| Dest::new(d.len(), c.aligned, fill))
        .collect();
    let mut regions: Vec<RestoreRegion<'_>> = expected
        .iter()
        .zip(dests.iter_mut())
        .map(|((name, _), d)| RestoreRegion {
            name: name.as_str(),
            memory: d.mem(),
            page_size: PS,
        })
        .collect();
    if c.reverse_regions {
        regions.reverse();
    }
    let opts = RestoreOptions {
        channels: c.channels,
        direct_io: c.direct_io,
        offset: c.offset.unwrap_or(0),
        memory_is_zeroed: c.memory_is_zeroed,
        ..RestoreOptions::default()
    };
    let report = restore(&out, &mut regions, &opts, None)
        .unwrap_or_else(|e| panic!("{}: restore of QEMU's file failed: {e}", c.name));
    drop(regions);
    let mut restored = report.blocks_restored.clone();
    restored.sort();
    let mut names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(restored, names, "{}: blocks restored", c.name);
    assert!(report.blocks_skipped.is_empty(), "{}", c.name);
    assert_eq!(report.channels, c.channels, "{}", c.name);
    if c.direct_io == DirectIo::On {
        assert!(report.direct_io, "{}: direct-io on but not used", c.name);
    }
    for ((name, exp), d) in expected.iter().zip(&dests) {
        assert_same(&format!("{}: block {name}", c.name), exp, d.data());
    }
    if let Some(off) = c.offset {
        let f = std::fs::read(&out).unwrap();
        assert!(
            f[..off as usize].iter().all(|&b| b == b'Q'),
            "prefix changed"
        );
    }
    eprintln!(
        "{}: {} block(s) restored with {} channel(s), direct-io {} (requested {:?}), {:.3} s restore, {:?} total",
        c.name,
        expected.len(),
        report.channels,
        report.direct_io,
        c.direct_io,
        report.seconds,
        t0.elapsed()
    );
}

#[test]
fn qemu_to_us_none_no_multifd() {
    qemu_to_us(QemuToUs {
        channels: 1,
        direct_io: DirectIo::Off,
        aligned: false,
        ..QemuToUs::new("none-plain", MachineKind::None, 64, 11)
    });
}

#[test]
fn qemu_to_us_none_multifd2_direct_io() {
    qemu_to_us(QemuToUs {
        qemu_multifd: Some(2),
        qemu_direct_io: true,
        channels: 3,
        direct_io: DirectIo::On,
        aligned: true,
        ..QemuToUs::new("none-multifd2-dio", MachineKind::None, 64, 12)
    });
}

#[test]
fn qemu_to_us_none_multifd4_offset() {
    qemu_to_us(QemuToUs {
        qemu_multifd: Some(4),
        qemu_direct_io: true,
        offset: Some(PREFIX),
        channels: 8,
        direct_io: DirectIo::Auto,
        aligned: true,
        ..QemuToUs::new("none-multifd4-offset", MachineKind::None, 32, 13)
    });
}

#[test]
fn qemu_to_us_none_no_multifd_offset() {
    qemu_to_us(QemuToUs {
        offset: Some(PREFIX),
        channels: 3,
        direct_io: DirectIo::On,
        aligned: false,
        ..QemuToUs::new("none-plain-offset", MachineKind::None, 16, 14)
    });
}

#[test]
fn qemu_to_us_microvm_no_multifd() {
    qemu_to_us(QemuToUs {
        channels: 8,
        direct_io: DirectIo::Auto,
        aligned: false,
        ..QemuToUs::new("microvm-plain", MachineKind::Microvm, 32, 15)
    });
}

#[test]
fn qemu_to_us_microvm_multifd3_direct_io() {
    qemu_to_us(QemuToUs {
        qemu_multifd: Some(3),
        qemu_direct_io: true,
        channels: 1,
        direct_io: DirectIo::On,
        aligned: true,
        ..QemuToUs::new("microvm-multifd3-dio", MachineKind::Microvm, 32, 16)
    });
}

#[test]
fn qemu_to_us_pc_no_multifd() {
    qemu_to_us(QemuToUs {
        channels: 3,
        direct_io: DirectIo::Off,
        aligned: true,
        memory_is_zeroed: true,
        reverse_regions: true,
        ..QemuToUs::new("pc-plain", MachineKind::Pc, 32, 17)
    });
}

#[test]
fn qemu_to_us_pc_multifd2_direct_io() {
    qemu_to_us(QemuToUs {
        qemu_multifd: Some(2),
        qemu_direct_io: true,
        channels: 8,
        direct_io: DirectIo::On,
        aligned: false,
        ..QemuToUs::new("pc-multifd2-dio", MachineKind::Pc, 32, 18)
    });
}

// ------------------------------------------------------------------------------------------------
// (c) The decoder on real QEMU files
// ------------------------------------------------------------------------------------------------

fn decoder_case(machine: MachineKind, multifd: Option<u8>, seed: u64) {
    let Some(version) = require_qemu() else {
        return;
    };
    let size = 32 * MIB;
    let image = pattern_image(size as usize, seed, 0.25, false);
    let cfg = GuestConfig::new(machine, size);
    let dir = disk_dir();
    let out = dir.path().join("dec.mig");
    let mut so = SaveOpts::new(&out);
    so.multifd_channels = multifd;
    so.direct_io = multifd.is_some();
    let saved = qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{e}"));
    let what = format!("{machine:?} multifd {multifd:?}");
    let info = check_decoder_on_qemu_file(&what, &saved, &image, machine, &version);
    eprintln!(
        "{what}: blocks {:?}, device_state_offset {:#x}, file size {:#x}",
        info.blocks
            .iter()
            .map(|b| (b.name.as_str(), b.pages(), b.pages_stored()))
            .collect::<Vec<_>>(),
        info.device_state_offset,
        info.file_size
    );
}

#[test]
fn decoder_matches_qemu_microvm_file() {
    decoder_case(MachineKind::Microvm, Some(2), 21);
}

#[test]
fn decoder_matches_qemu_pc_file() {
    decoder_case(MachineKind::Pc, None, 22);
}

// ------------------------------------------------------------------------------------------------
// (b) us → QEMU
// ------------------------------------------------------------------------------------------------

struct UsToQemu {
    name: &'static str,
    machine: MachineKind,
    ram_mib: u64,
    offset: Option<u64>,
    channels: usize,
    load_multifd: Option<u8>,
}

fn us_to_qemu(c: UsToQemu) {
    let Some(_version) = require_qemu() else {
        return;
    };
    let t0 = Instant::now();
    let size = c.ram_mib * MIB;
    let cfg = GuestConfig::new(c.machine, size);
    let dir = disk_dir();

    // QEMU saves image A; its device state (and non-main blocks) are what we reuse.
    let theirs = dir.path().join("qemu.mig");
    if let Some(off) = c.offset {
        std::fs::write(&theirs, vec![b'Q'; off as usize]).unwrap();
    }
    let image_a = pattern_image(size as usize, 31, 0.25, false);
    let mut so = SaveOpts::new(&theirs);
    so.offset = c.offset;
    let saved = qemu_save(&cfg, &image_a, &so).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let offset = c.offset.unwrap_or(0);
    let their_info = ok("inspect QEMU's file", inspect(&theirs, offset));
    let device_state = ok("read_device_state", read_device_state(&theirs, offset));
    assert_eq!(device_state[0], QEMU_VM_SECTION_FULL);

    // Our file: image B (a different image: other seed, clustered zeros), same block list.
    let image_b = pattern_image(size as usize, 32, 0.25, true);
    assert_ne!(first_differing_page(&image_a, &image_b), None);
    let ours = dir.path().join("ours.mig");
    let prefix: Vec<u8> = (0..offset).map(|i| (i % 251) as u8).collect();
    if c.offset.is_some() {
        std::fs::write(&ours, &prefix).unwrap();
    }
    let blocks = saved.blocks_with(&image_b);
    let regions: Vec<SaveRegion<'_>> = blocks
        .iter()
        .map(|(name, data)| SaveRegion {
            name: name.as_str(),
            memory: data,
            page_size: PS,
        })
        .collect();
    let opts = SaveOptions {
        channels: c.channels,
        direct_io: DirectIo::On,
        machine: their_info.machine.clone(),
        device_state: Some(device_state),
        offset,
        ..SaveOptions::default()
    };
    let report = save(&ours, &regions, &opts, None)
        .unwrap_or_else(|e| panic!("{}: our save failed: {e}", c.name));
    assert!(report.direct_io, "{}: direct-io not used", c.name);
    assert_eq!(report.channels, c.channels);
    // The file QEMU loads below carries the clean-zero flag (in the records QEMU ignores).
    let flags = ok("inspect our file", inspect(&ours, offset))
        .integrity
        .expect("our file has integrity records")
        .record
        .flags;
    assert_eq!(
        flags & mapped_ram_linux::integrity::FLAG_CLEAN_ZERO,
        mapped_ram_linux::integrity::FLAG_CLEAN_ZERO,
        "{}: flags {flags:#x}",
        c.name
    );
    // Page checksums are on by default: the anchor record sits in the first block's bitmap
    // padding and the table and footer after QEMU's vmdesc, where QEMU's loader never reads —
    // the load below proves QEMU 10.0 accepts such a file.
    assert!(report.checksums, "{}: checksums not stored", c.name);
    let checked = ok(
        "verify our file",
        mapped_ram_linux::verify(&ours, offset, &[]),
    );
    assert!(checked.ok(), "{}: {:?}", c.name, checked.corrupt);
    assert!(
        checked.info.integrity.is_some(),
        "{}: no integrity records",
        c.name
    );
    assert!(
        checked.pages_checksummed.unwrap_or(0) > 0,
        "{}: no pages checked",
        c.name
    );

    let mut lo = LoadOpts::new(&ours);
    lo.offset = c.offset;
    lo.multifd_channels = c.load_multifd;
    lo.direct_io = c.load_multifd.is_some();
    let loaded = qemu_load(&cfg, &lo)
        .unwrap_or_else(|e| panic!("{}: QEMU failed to load our file: {e}", c.name));
    assert_eq!(loaded.query_migrate["status"], "completed");
    let ram = ok("reading the destination RAM", loaded.ram.read());
    assert_same(
        &format!("{}: guest RAM loaded by QEMU", c.name),
        &image_b,
        &ram,
    );
    for (name, data) in blocks.iter().filter(|(n, _)| n != MAIN_RAM_BLOCK) {
        let got = loaded
            .block_contents
            .get(name)
            .unwrap_or_else(|| panic!("{}: destination has no block {name}", c.name));
        assert_same(
            &format!("{}: block {name} loaded by QEMU", c.name),
            data,
            got,
        );
    }
    if c.offset.is_some() {
        let f = std::fs::read(&ours).unwrap();
        assert!(
            f[..offset as usize] == prefix[..],
            "{}: prefix changed",
            c.name
        );
    }
    eprintln!(
        "{}: our save {:.3} s ({} channels, direct-io), QEMU load {:?} (multifd {:?}), {:?} total",
        c.name,
        report.seconds,
        report.channels,
        loaded.elapsed,
        c.load_multifd,
        t0.elapsed()
    );
}

#[test]
fn us_to_qemu_none() {
    us_to_qemu(UsToQemu {
        name: "us-none",
        machine: MachineKind::None,
        ram_mib: 64,
        offset: None,
        channels: 4,
        load_multifd: None,
    });
}

#[test]
fn us_to_qemu_none_offset() {
    us_to_qemu(UsToQemu {
        name: "us-none-offset",
        machine: MachineKind::None,
        ram_mib: 32,
        offset: Some(PREFIX),
        channels: 3,
        load_multifd: Some(2),
    });
}

#[test]
fn us_to_qemu_microvm() {
    us_to_qemu(UsToQemu {
        name: "us-microvm",
        machine: MachineKind::Microvm,
        ram_mib: 32,
        offset: None,
        channels: 2,
        load_multifd: Some(2),
    });
}

#[test]
fn us_to_qemu_pc() {
    us_to_qemu(UsToQemu {
        name: "us-pc",
        machine: MachineKind::Pc,
        ram_mib: 32,
        offset: None,
        channels: 4,
        load_multifd: None,
    });
}

// ------------------------------------------------------------------------------------------------
// (d) Write sizes on the O_DIRECT descriptors, measured with strace
// ------------------------------------------------------------------------------------------------

/// Environment of the helper process that runs QEMU under strace.
const CHILD_DIR_ENV: &str = "MAPPED_RAM_INTEROP_STRACE_DIR";
const CHILD_REAL_QEMU_ENV: &str = "MAPPED_RAM_INTEROP_REAL_QEMU";
const CHILD_LOG_ENV: &str = "MAPPED_RAM_INTEROP_STRACE_LOG";
const STRACE_SEED: u64 = 41;
const STRACE_RAM: u64 = 64 * MIB;
/// The syscalls traced (a regex, so names missing on an architecture are no error).
const STRACE_FILTER: &str = "trace=/^(open|openat|openat2|creat|close|pwritev|pwritev2|pwrite64)$";

/// One write on an `O_DIRECT` descriptor.
#[derive(Debug, Clone, Copy)]
struct DirectWrite {
    bytes: u64,
    offset: u64,
}

/// Parses an `strace -f -s 0` log: follows which descriptors were opened with `O_DIRECT`
/// (until closed) and returns the writes on them, with their return values as sizes.
fn direct_writes(log: &str) -> (usize, Vec<DirectWrite>) {
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut direct: BTreeSet<i64> = BTreeSet::new();
    let mut opened = 0usize;
    let mut writes = Vec::new();
    for raw in log.lines() {
        let Some((pid, rest)) = raw.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let line = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), head.to_string());
            continue;
        } else if rest.starts_with("<... ") {
            let Some((_, tail)) = rest.split_once("resumed>") else {
                continue;
            };
            let Some(head) = pending.remove(pid) else {
                continue;
            };
            format!("{head}{tail}")
        } else {
            rest.to_string()
        };
        let Some((call, ret)) = line.rsplit_once(" = ") else {
            continue;
        };
        let Ok(ret) = ret.split_whitespace().next().unwrap_or("").parse::<i64>() else {
            continue;
        };
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let args = args.trim_end().trim_end_matches(')');
        let first_arg = args.split(',').next().unwrap_or("").trim();
        match name {
            "open" | "openat" | "openat2" | "creat" if ret >= 0 => {
                // Exact flag match: O_DIRECTORY contains "O_DIRECT".
                let o_direct = args
                    .split(|c: char| c == '|' || c == ',' || c.is_whitespace())
                    .any(|flag| flag == "O_DIRECT");
                if o_direct {
                    direct.insert(ret);
                    opened += 1;
                } else {
                    direct.remove(&ret);
                }
            }
            "close" => {
                if let Ok(fd) = first_arg.parse::<i64>() {
                    direct.remove(&fd);
                }
            }
            "pwritev" | "pwritev2" | "pwrite64" => {
                let Ok(fd) = first_arg.parse::<i64>() else {
                    continue;
                };
                if !direct.contains(&fd) || ret <= 0 {
                    continue;
                }
                // pwrite64(fd, buf, count, offset) / pwritev(fd, iov, cnt, offset[, flags]).
                let fields: Vec<&str> = args.rsplit(", ").collect();
                let off_field = if name == "pwritev2" {
                    fields.get(1)
                } else {
                    fields.first()
                };
                let offset = off_field
                    .and_then(|f| f.trim().parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                writes.push(DirectWrite {
                    bytes: ret as u64,
                    offset,
                });
            }
            _ => {}
        }
    }
    (opened, writes)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Summary line of the writes of one program.
fn describe(who: &str, opened: usize, w: &[DirectWrite]) -> String {
    let sizes: Vec<u64> = w.iter().map(|w| w.bytes).collect();
    let total: u64 = sizes.iter().sum();
    format!(
        "{who}: {opened} O_DIRECT descriptor(s), {} write(s) on them, median {} KiB, min {} KiB, max {} KiB, {:.1} MiB in all",
        sizes.len(),
        median(sizes.clone()) / 1024,
        sizes.iter().min().copied().unwrap_or(0) / 1024,
        sizes.iter().max().copied().unwrap_or(0) / 1024,
        total as f64 / MIB as f64
    )
}

fn skip_or_fail(why: &str) {
    mapped_ram_tests::support::cannot_run("strace", why);
}

fn strace_usable() -> Result<(), String> {
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("strace not runnable ({e}); .ci/install-deps installs it"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "strace cannot trace here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn cli_direct_io_write_sizes_under_strace() {
    let Some(_version) = require_qemu() else {
        return;
    };
    let Some(cli) = cli_binary() else {
        skip_or_fail(
            "the mapped-ram binary is not next to the test executable (run `cargo build -p mapped-ram-linux` or `cargo test --workspace`)",
        );
        return;
    };
    if let Err(why) = strace_usable() {
        skip_or_fail(&why);
        return;
    }
    let dir = disk_dir();
    let image = pattern_image(STRACE_RAM as usize, STRACE_SEED, 0.25, false);
    let zeros = count_zero_pages(&image);
    let ram_file = dir.path().join("ram.bin");
    std::fs::write(&ram_file, &image).unwrap();

    // Ours: mapped-ram save --direct-io on --channels 2.
    let ours = dir.path().join("ours.mig");
    let our_log = dir.path().join("ours.strace");
    let t = Instant::now();
    let out = Command::new("strace")
        .args(["-f", "-qq", "-s", "0", "-e", STRACE_FILTER, "-o"])
        .arg(&our_log)
        .arg("--")
        .arg(&cli)
        .arg("save")
        .arg("--ram")
        .arg(format!("{MAIN_RAM_BLOCK}={}", ram_file.display()))
        .arg("-o")
        .arg(&ours)
        .args(["--direct-io", "on", "--channels", "2", "--machine", "none"])
        .stdin(Stdio::null())
        .output()
        .expect("running strace mapped-ram save");
    assert!(
        out.status.success(),
        "mapped-ram save under strace failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_time = t.elapsed();
    // The file is right (restored through the library).
    let mut back = vec![0xAAu8; image.len()];
    restore(
        &ours,
        &mut [RestoreRegion {
            name: MAIN_RAM_BLOCK,
            memory: &mut back,
            page_size: PS,
        }],
        &RestoreOptions::default(),
        None,
    )
    .unwrap_or_else(|e| panic!("restoring the CLI's file: {e}"));
    assert_same("CLI save", &image, &back);
    drop(back);

    let log = std::fs::read_to_string(&our_log).unwrap();
    let (opened, ours_w) = direct_writes(&log);
    let ours_line = describe(
        "mapped-ram save (2 channels, direct-io on)",
        opened,
        &ours_w,
    );
    eprintln!(
        "{ours_line}; {zeros} of {} pages zero; {cli_time:?} under strace",
        STRACE_RAM / PS
    );
    assert_eq!(opened, 2, "expected 2 O_DIRECT channel descriptors\n{log}");
    assert!(
        !ours_w.is_empty(),
        "no writes on O_DIRECT descriptors\n{log}"
    );
    for w in &ours_w {
        assert!(
            w.bytes % PS == 0 && w.offset % PS == 0 && w.offset >= MIB,
            "unaligned O_DIRECT write {w:?}"
        );
    }
    let data = (STRACE_RAM / PS - zeros as u64) * PS;
    let total: u64 = ours_w.iter().map(|w| w.bytes).sum();
    assert!(
        total >= data,
        "O_DIRECT writes carry {total} bytes, less than the {data} bytes of data pages"
    );
    let med = median(ours_w.iter().map(|w| w.bytes).collect());
    assert!(
        med >= 256 * 1024,
        "median O_DIRECT write is {} KiB, want >= 256 KiB ({ours_line})",
        med / 1024
    );

    // QEMU (multifd 2, direct-io on) under strace, for comparison: a helper process runs
    // `qemu_save` with MAPPED_RAM_QEMU pointing at a wrapper that execs QEMU under strace.
    let wrapper = dir.path().join("qemu-under-strace.sh");
    let qemu_log = dir.path().join("qemu.strace");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in --version) exec \"${CHILD_REAL_QEMU_ENV}\" \"$@\";; esac\n\
             if command -v setpriv >/dev/null 2>&1; then\n\
             \x20 exec strace -f -qq -s 0 -e '{STRACE_FILTER}' -o \"${CHILD_LOG_ENV}\" -- setpriv --pdeathsig KILL -- \"${CHILD_REAL_QEMU_ENV}\" \"$@\"\n\
             fi\n\
             exec strace -f -qq -s 0 -e '{STRACE_FILTER}' -o \"${CHILD_LOG_ENV}\" -- \"${CHILD_REAL_QEMU_ENV}\" \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let child = Command::new(&exe)
        .args([
            "qemu_save_under_strace_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(QEMU_ENV, &wrapper)
        .env(CHILD_REAL_QEMU_ENV, qemu_binary())
        .env(CHILD_LOG_ENV, &qemu_log)
        .env(CHILD_DIR_ENV, dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("running the helper test process");
    let child_out = format!(
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(
        child.status.success() && child_out.contains("HELPER DONE"),
        "QEMU save under strace failed ({}):\n{child_out}",
        child.status
    );
    let log = std::fs::read_to_string(&qemu_log).unwrap();
    let (q_opened, qemu_w) = direct_writes(&log);
    let qemu_line = describe(
        "QEMU 10.0 save (multifd 2, direct-io on)",
        q_opened,
        &qemu_w,
    );
    eprintln!("{qemu_line}; {:?} under strace", t.elapsed());
    assert!(q_opened >= 2, "QEMU opened {q_opened} O_DIRECT descriptors");
    assert!(!qemu_w.is_empty(), "no QEMU writes on O_DIRECT descriptors");
    let qemu_total: u64 = qemu_w.iter().map(|w| w.bytes).sum();
    assert!(
        qemu_total >= data,
        "QEMU's O_DIRECT writes carry {qemu_total} bytes, less than {data}"
    );
    eprintln!(
        "median O_DIRECT write: mapped-ram {} KiB vs QEMU {} KiB; writes: {} vs {}",
        med / 1024,
        median(qemu_w.iter().map(|w| w.bytes).collect()) / 1024,
        ours_w.len(),
        qemu_w.len()
    );
}

/// Helper process of [`cli_direct_io_write_sizes_under_strace`]: QEMU saves the strace image
/// with multifd 2 and direct-io, while `MAPPED_RAM_QEMU` points at a wrapper running it under
/// strace. Does nothing unless started by that test.
#[test]
#[ignore = "helper process of cli_direct_io_write_sizes_under_strace"]
fn qemu_save_under_strace_helper() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let Some(_version) = require_qemu() else {
        panic!("QEMU not usable through the strace wrapper");
    };
    let dir = PathBuf::from(dir);
    let image = pattern_image(STRACE_RAM as usize, STRACE_SEED, 0.25, false);
    let cfg = GuestConfig::new(MachineKind::None, STRACE_RAM);
    let mut so = SaveOpts::new(dir.join("qemu.mig"));
    so.multifd_channels = Some(2);
    so.direct_io = true;
    // The child of the harness is strace, not QEMU: /proc/PID/mem would be strace's.
    so.capture_blocks = false;
    let saved = qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(saved.query_migrate["status"], "completed");
    println!("HELPER DONE in {:?}", saved.elapsed);
}
