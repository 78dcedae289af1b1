//! Hostile and damaged snapshot files: `inspect`, `verify` and `restore` (library and CLI) must
//! fail with a clear error — never panic, never write outside the destination regions, never
//! write guest memory at all before every piece of metadata is validated, never allocate in
//! proportion to a number read from the file without checking it against the file first.
//!
//! Cases: truncation at every byte of the metadata and at every structural boundary (and at
//! random points); single bit flips in headers, bitmaps, stream bytes and checksum records;
//! targeted absurd values (offsets that overflow, overlap or point past the end, huge block
//! counts and lengths, wrong page sizes, unknown and duplicate block names).
//!
//! Restore destinations are pre-filled with a pattern inside a larger buffer whose guard bytes
//! before and after must never change; for every rejected file the error must say
//! `GuestMemoryState::Untouched` and the destinations must still hold the pattern.

use std::path::{Path, PathBuf};
use std::process::Command;

use mapped_ram_linux::integrity::{self, Record};
use mapped_ram_linux::{
    inspect, restore, save, verify, GuestMemoryState, RestoreOptions, RestoreRegion, SaveOptions,
    SaveRegion, SnapshotInfo,
};
use mapped_ram_tests::image::pattern_image;
use mapped_ram_tests::qemu::running_in_ci;
use mapped_ram_tests::support::{cli_binary, Rng};

const PS: u64 = 4096;
const FILL: u8 = 0xa5;
const GUARD: u8 = 0x3c;
const GUARD_LEN: usize = 64 << 10;
const RAM: usize = 2 << 20;
const BIOS: usize = 128 << 10;

fn scratch(name: &str) -> PathBuf {
    mapped_ram_tests::support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), &format!("hostile-{name}"))
}

struct Original {
    bytes: Vec<u8>,
    info: SnapshotInfo,
}

/// Saves the two-block guest; `device_state` appends bytes after the RAM END section.
fn original(dir: &Path, checksums: bool, device_state: bool) -> Original {
    let ram = pattern_image(RAM, 21, 0.25, false);
    let bios = pattern_image(BIOS, 22, 0.25, false);
    let path = dir.join(format!("orig-{checksums}-{device_state}.mr"));
    let opts = SaveOptions {
        checksums,
        device_state: device_state.then(|| {
            // A FULL section's worth of opaque bytes, then QEMU_VM_EOF.
            let mut d = vec![0x04u8];
            d.extend((0..3000u32).map(|i| (i * 7 % 251) as u8));
            d.push(0);
            d
        }),
        ..SaveOptions::default()
    };
    let regions = [
        SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: PS,
        },
        SaveRegion {
            name: "pc.rom",
            memory: &bios,
            page_size: PS,
        },
    ];
    let report = save(&path, &regions, &opts, None).unwrap();
    assert_eq!(report.checksums, checksums);
    let info = inspect(&path, 0).unwrap();
    assert_eq!(info.integrity.is_some(), checksums);
    Original {
        bytes: std::fs::read(&path).unwrap(),
        info,
    }
}

/// A destination inside guard bytes.
struct Guarded {
    buf: Vec<u8>,
    len: usize,
}

impl Guarded {
    fn new(len: usize) -> Guarded {
        let mut buf = vec![GUARD; len + 2 * GUARD_LEN];
        buf[GUARD_LEN..GUARD_LEN + len].fill(FILL);
        Guarded { buf, len }
    }

    fn mem(&mut self) -> &mut [u8] {
        &mut self.buf[GUARD_LEN..GUARD_LEN + self.len]
    }

    fn guards_intact(&self) -> bool {
        self.buf[..GUARD_LEN].iter().all(|&b| b == GUARD)
            && self.buf[GUARD_LEN + self.len..].iter().all(|&b| b == GUARD)
    }

    fn pristine(&self) -> bool {
        self.buf[GUARD_LEN..GUARD_LEN + self.len]
            .iter()
            .all(|&b| b == FILL)
    }
}

/// What the library made of one damaged file.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    inspect_ok: bool,
    verify_ok: bool,
    restore_ok: bool,
}

/// Runs inspect, verify (structure and checksums) and restore (with page checksum checks) on
/// `path`; checks the invariants that hold for every file, damaged or not.
fn judge(path: &Path, what: &str) -> Outcome {
    let mut out = Outcome::default();
    match inspect(path, 0) {
        Ok(_) => out.inspect_ok = true,
        Err(e) => assert!(
            e.to_string().contains(&path.display().to_string()),
            "{what}: inspect error does not name the file: {e}"
        ),
    }
    match verify(path, 0, &[]) {
        Ok(r) => out.verify_ok = r.ok(),
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
    let mut ram = Guarded::new(RAM);
    let mut bios = Guarded::new(BIOS);
    let r = {
        let mut regions = [
            RestoreRegion {
                name: "pc.ram",
                memory: ram.mem(),
                page_size: PS,
            },
            RestoreRegion {
                name: "pc.rom",
                memory: bios.mem(),
                page_size: PS,
            },
        ];
        restore(
            path,
            &mut regions,
            &RestoreOptions {
                channels: 2,
                verify_checksums: true,
                ..RestoreOptions::default()
            },
            None,
        )
    };
    assert!(
        ram.guards_intact() && bios.guards_intact(),
        "{what}: restore wrote outside the destination"
    );
    match r {
        Ok(_) => out.restore_ok = true,
        Err(e) => {
            if out.inspect_ok && !out.verify_ok && e.memory != GuestMemoryState::Untouched {
                // Only a page that fails its checksum may be found after reads started.
                assert!(
                    matches!(e.kind, mapped_ram_linux::RestoreErrorKind::Checksum { .. }),
                    "{what}: {e}"
                );
            } else {
                assert_eq!(e.memory, GuestMemoryState::Untouched, "{what}: {e}");
                assert!(
                    ram.pristine() && bios.pristine(),
                    "{what}: memory written although the error says untouched"
                );
            }
        }
    }
    out
}

/// Runs the CLI's inspect, verify and restore on `path`: exit 0 or 1 with one `error:` line,
/// never a panic; a failed restore leaves the pre-filled RAM files unchanged.
fn judge_cli(bin: &Path, dir: &Path, path: &Path, what: &str) -> [i32; 3] {
    let ram = dir.join("cli-pc.ram");
    let bios = dir.join("cli-pc.rom");
    std::fs::write(&ram, vec![FILL; RAM]).unwrap();
    std::fs::write(&bios, vec![FILL; BIOS]).unwrap();
    let mut codes = [0; 3];
    for (i, args) in [
        vec!["inspect".to_string(), path.display().to_string()],
        vec!["verify".to_string(), path.display().to_string()],
        vec![
            "restore".to_string(),
            path.display().to_string(),
            "--ram".into(),
            format!("pc.ram={}", ram.display()),
            "--ram".into(),
            format!("pc.rom={}", bios.display()),
        ],
    ]
    .iter()
    .enumerate()
    {
        let out = Command::new(bin).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code().unwrap_or(-1);
        assert!(
            !stderr.contains("panicked"),
            "{what}: {} panicked: {stderr}",
            args[0]
        );
        assert!(
            code == 0 || code == 1,
            "{what}: {} exit {code}: {stderr}",
            args[0]
        );
        if code == 1 {
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
            assert!(
                lines.len() == 1 && lines[0].starts_with("error: "),
                "{what}: {} stderr: {stderr}",
                args[0]
            );
        }
        codes[i] = code;
    }
    if codes[2] == 1 && codes[0] == 1 {
        let r = std::fs::read(&ram).unwrap();
        let b = std::fs::read(&bios).unwrap();
        assert!(
            r.iter().all(|&x| x == FILL) && b.iter().all(|&x| x == FILL),
            "{what}: CLI restore of a rejected file changed the RAM files"
        );
    }
    codes
}

/// Structural boundaries of a file: every field start of the metadata we know of.
fn boundaries(o: &Original) -> Vec<u64> {
    let info = &o.info;
    let size = o.bytes.len() as u64;
    let first_record = info.blocks[0].layout.record_offset;
    let mut v: Vec<u64> = (0..=first_record).collect(); // every byte of the stream head
    for b in &info.blocks {
        let l = &b.layout;
        v.extend(l.record_offset..=l.header_offset + 28); // record and header, every byte
        v.extend([
            l.bitmap_offset + 1,
            l.bitmap_offset + 8,
            l.bitmap_offset + l.bitmap_size / 2,
            l.bitmap_offset + l.bitmap_size - 1,
            l.bitmap_offset + l.bitmap_size,
            l.pages_offset - 1,
            l.pages_offset,
            l.pages_offset + 1,
            l.pages_offset + PS,
            l.pages_offset + l.length / 2,
            l.pages_end() - PS,
            l.pages_end() - 1,
            l.pages_end(),
        ]);
    }
    // The stream after the blocks: EOS, footer, RAM END, device state / EOF — every byte.
    v.extend(info.device_stream_start..info.device_state_end().min(info.device_state_offset + 64));
    if let Some(i) = info.integrity {
        v.extend((i.anchor_offset..i.anchor_offset + 64).step_by(4));
        v.extend([
            i.record.table_offset,
            i.record.table_offset + 1,
            i.record.table_offset + i.record.table_len / 2,
        ]);
        v.extend(i.footer_offset..size); // every byte of the footer
    }
    v.extend([info.device_state_end(), size - 1]);
    v.retain(|&c| c < size);
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn truncated_files_are_rejected_before_memory_is_touched() {
    let dir = scratch("truncate");
    let bin = cli_binary();
    let mut total = 0;
    for (checksums, device_state) in [(true, false), (true, true), (false, false), (false, true)] {
        let o = original(&dir, checksums, device_state);
        let size = o.bytes.len() as u64;
        let mut cuts = boundaries(&o);
        let mut rng = Rng(0x1234_5678 + u64::from(checksums) * 2 + u64::from(device_state));
        cuts.extend((0..120).map(|_| rng.next_u64() % size));
        cuts.sort_unstable();
        cuts.dedup();
        let path = dir.join("cut.mr");
        let mut accepted = 0;
        for (n, &cut) in cuts.iter().enumerate() {
            std::fs::write(&path, &o.bytes[..cut as usize]).unwrap();
            let what =
                format!("checksums {checksums} device state {device_state}: cut at {cut:#x}");
            let out = judge(&path, &what);
            // Without checksums, a cut inside the opaque device state cannot be seen (QEMU
            // would fail to load such a file); everything else must be rejected.
            let in_device_state = !checksums && device_state && cut > o.info.device_state_offset;
            if in_device_state {
                accepted += usize::from(out.inspect_ok);
            } else {
                assert!(
                    !out.inspect_ok && !out.restore_ok,
                    "{what}: accepted ({out:?})"
                );
            }
            if let Some(bin) = &bin {
                if n % 7 == 0 {
                    let codes = judge_cli(bin, &dir, &path, &what);
                    if !in_device_state {
                        assert_eq!(codes, [1, 1, 1], "{what}");
                    }
                }
            }
            total += 1;
        }
        eprintln!(
            "checksums {checksums}, device state {device_state}: {} cuts rejected, {accepted} inside the opaque device state accepted",
            cuts.len() - accepted
        );
    }
    eprintln!("truncation cases: {total}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bit_flips_in_metadata_are_errors_with_checksums() {
    let dir = scratch("flips");
    let bin = cli_binary();
    let o = original(&dir, true, true);
    let info = &o.info;
    let integ = info.integrity.unwrap();
    let mut bits: Vec<u64> = Vec::new();
    let byte_range = |bits: &mut Vec<u64>, from: u64, to: u64, step: u64| {
        for byte in (from..to).step_by(step as usize) {
            for bit in 0..8 {
                bits.push(byte * 8 + bit);
            }
        }
    };
    byte_range(&mut bits, 0, info.blocks[0].layout.record_offset, 1); // stream head
    for b in &info.blocks {
        let l = b.layout;
        byte_range(&mut bits, l.record_offset, l.header_offset + 28, 1); // record and header
        byte_range(
            &mut bits,
            l.bitmap_offset,
            l.bitmap_offset + l.bitmap_size,
            5,
        ); // bitmap
    }
    byte_range(
        &mut bits,
        info.device_stream_start,
        integ.record.table_offset,
        23,
    ); // RAM END, device state
    byte_range(&mut bits, integ.anchor_offset, integ.anchor_offset + 64, 1); // anchor
    byte_range(&mut bits, integ.footer_offset, integ.footer_offset + 64, 1); // footer
    let metadata_bits = bits.len();
    byte_range(
        &mut bits,
        integ.record.table_offset,
        integ.footer_offset,
        37,
    ); // checksum table
    let path = dir.join("flip.mr");
    let mut table_flips = 0;
    for (n, &bit) in bits.iter().enumerate() {
        let mut bytes = o.bytes.clone();
        bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
        std::fs::write(&path, &bytes).unwrap();
        let what = format!("bit {bit} (byte {:#x}.{})", bit / 8, bit % 8);
        let out = judge(&path, &what);
        assert!(
            !out.verify_ok && !out.restore_ok,
            "{what}: accepted ({out:?})"
        );
        if n < metadata_bits {
            assert!(!out.inspect_ok, "{what}: inspect accepted a metadata flip");
        } else {
            table_flips += 1;
        }
        if let Some(bin) = &bin {
            if n % 97 == 0 {
                let codes = judge_cli(bin, &dir, &path, &what);
                assert_eq!(codes[1], 1, "{what}: CLI verify accepted");
            }
        }
    }
    eprintln!(
        "bit flips with checksums: {metadata_bits} in metadata and records (all rejected by inspect, verify and restore), {table_flips} in the checksum table (rejected by verify and checked restore)"
    );
}

#[test]
fn page_flips_are_found_by_verify_with_block_page_and_offset() {
    let dir = scratch("pages");
    let o = original(&dir, true, false);
    let path = dir.join("page.mr");
    let mut rng = Rng(77);
    let mut cases = 0;
    for block in &o.info.blocks {
        let l = block.layout;
        let map = block.bitmap_ref();
        for _ in 0..25 {
            let page = rng.next_u64() % l.num_pages();
            if !map.test(page) {
                continue;
            }
            let mut bytes = o.bytes.clone();
            let at = l.pages_offset + page * PS + rng.next_u64() % PS;
            bytes[at as usize] ^= 1 << (rng.next_u64() % 8);
            std::fs::write(&path, &bytes).unwrap();
            let r = verify(&path, 0, &[]).unwrap();
            assert_eq!(r.corrupt.len(), 1);
            let c = &r.corrupt[0];
            assert_eq!((c.block.as_str(), c.page), (block.name.as_str(), page));
            assert_eq!(c.file_offset, l.pages_offset + page * PS);
            assert_eq!(c.pages_bad, 1);
            cases += 1;
        }
    }
    assert!(cases > 10);
    eprintln!("page flips found by verify: {cases}");
}

/// Writes `bytes` with a big-endian u64 at `at`.
fn put_be64(bytes: &mut [u8], at: u64, v: u64) {
    bytes[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_be32(bytes: &mut [u8], at: u64, v: u32) {
    bytes[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn absurd_values_are_rejected_without_checksums_to_hide_them() {
    let dir = scratch("absurd");
    let bin = cli_binary();
    // Without checksums, so that every structural check is exercised on its own.
    let o = original(&dir, false, false);
    let info = &o.info;
    let size = o.bytes.len() as u64;
    let (l0, l1) = (info.blocks[0].layout, info.blocks[1].layout);
    let mem_size_at = l0.record_offset - 8;
    let len_at = |l: &mapped_ram_core::layout::BlockLayout| l.header_offset - 8;
    let hdr = |l: &mapped_ram_core::layout::BlockLayout, field: u64| l.header_offset + field;
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let mut cases: Vec<(String, Edit)> = Vec::new();
    let mut add = |name: &str, e: Edit| cases.push((name.to_string(), e));
    let total = (RAM + BIOS) as u64;
    for v in [
        1u64 << 63,
        (1u64 << 63) | 4,
        u64::MAX,
        0,
        4,
        total - PS + 4,
        total + PS + 4,
        (1 << 62) | 4,
    ] {
        add(
            &format!("MEM_SIZE word {v:#x}"),
            Box::new(move |b| put_be64(b, mem_size_at, v)),
        );
    }
    for v in [
        1u64 << 62,
        !4095u64,
        (!4095u64) - (1 << 20),
        0,
        4095,
        4097,
        RAM as u64 + PS,
        1 << 40,
    ] {
        add(
            &format!("block 0 length {v:#x}"),
            Box::new(move |b| put_be64(b, len_at(&l0), v)),
        );
        add(
            &format!("block 0 length and MEM_SIZE {v:#x}"),
            Box::new(move |b| {
                put_be64(b, len_at(&l0), v);
                put_be64(b, mem_size_at, v.wrapping_add(BIOS as u64) | 4);
            }),
        );
    }
    for v in [2u32, 3, u32::MAX] {
        add(
            &format!("header version {v}"),
            Box::new(move |b| put_be32(b, hdr(&l0, 0), v)),
        );
    }
    for v in [0u64, 1, 512, 8192, 1 << 21, 1 << 63, u64::MAX] {
        add(
            &format!("header page size {v:#x}"),
            Box::new(move |b| put_be64(b, hdr(&l1, 4), v)),
        );
    }
    for v in [
        0u64,
        1,
        l0.header_offset,
        l0.header_offset + 27,
        l0.pages_offset,
        l0.pages_offset - 8,
        size,
        size + (1 << 30),
        u64::MAX,
        u64::MAX - 7,
    ] {
        add(
            &format!("block 0 bitmap offset {v:#x}"),
            Box::new(move |b| put_be64(b, hdr(&l0, 12), v)),
        );
    }
    for v in [
        0u64,
        4096,
        4097,
        l0.bitmap_offset,
        l0.pages_offset + (1 << 20),
        l1.pages_offset,
        size,
        !4095u64,
        1 << 62,
    ] {
        add(
            &format!("block 0 pages offset {v:#x}"),
            Box::new(move |b| put_be64(b, hdr(&l0, 20), v)),
        );
    }
    for v in [
        0u64,
        l0.pages_offset,
        l0.record_offset,
        l1.pages_offset + (1 << 20),
        size - PS,
    ] {
        add(
            &format!("block 1 pages offset {v:#x} (overlap / past end)"),
            Box::new(move |b| put_be64(b, hdr(&l1, 20), v)),
        );
    }
    add(
        "block 0 bitmap and pages offsets 0 (empty header without x-ignore-shared)",
        Box::new(move |b| {
            put_be64(b, hdr(&l0, 12), 0);
            put_be64(b, hdr(&l0, 20), 0);
        }),
    );
    add(
        "block id length 0",
        Box::new(move |b| b[l0.record_offset as usize] = 0),
    );
    add(
        "block id length 255",
        Box::new(move |b| b[l0.record_offset as usize] = 255),
    );
    add(
        "block id not UTF-8",
        Box::new(move |b| b[l0.record_offset as usize + 1] = 0xff),
    );
    add(
        "duplicate block name",
        Box::new(move |b| {
            let r1 = l1.record_offset as usize;
            b[r1 + 1..r1 + 7].copy_from_slice(b"pc.ram");
        }),
    );
    add(
        "bits past the last page of the bitmap",
        Box::new(move |b| {
            let at = (l1.bitmap_offset + l1.bitmap_size - 1) as usize;
            b[at] |= 0x80;
        }),
    );
    add("bad magic", Box::new(|b| b[0] ^= 0x01));
    add("stream version 4", Box::new(|b| put_be32(b, 4, 4)));
    add(
        "machine name length 2^32-1",
        Box::new(|b| put_be32(b, 9, u32::MAX)),
    );
    let dss = info.device_stream_start;
    add("RAM EOS word", Box::new(move |b| put_be64(b, dss, 0x11)));
    add(
        "RAM setup footer section id",
        Box::new(move |b| put_be32(b, dss + 9, 7)),
    );
    add(
        "RAM END replaced by a PART",
        Box::new(move |b| b[(dss + 13) as usize] = 0x02),
    );
    add(
        "RAM END replaced by a FULL section",
        Box::new(move |b| b[(dss + 13) as usize] = 0x04),
    );
    add(
        "device state cut to nothing after RAM END",
        Box::new(move |b| {
            let n = b.len();
            b.truncate(n - 1);
        }),
    );
    let mut rejected = 0;
    let path = dir.join("absurd.mr");
    let mut cli_runs = 0;
    for (name, edit) in &cases {
        let mut bytes = o.bytes.clone();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let out = judge(&path, name);
        assert!(
            !out.inspect_ok && !out.restore_ok && !out.verify_ok,
            "{name}: accepted ({out:?})"
        );
        rejected += 1;
        if let Some(bin) = &bin {
            assert_eq!(judge_cli(bin, &dir, &path, name), [1, 1, 1], "{name}");
            cli_runs += 1;
        }
    }
    // A block name the target does not have, and a destination page size that differs.
    std::fs::write(&path, &o.bytes).unwrap();
    for (name, page_size, what) in [
        ("pc.xxx", PS, "unknown block"),
        ("pc.ram", 8192, "wrong page size"),
    ] {
        let mut ram = Guarded::new(RAM);
        let e = restore(
            &path,
            &mut [RestoreRegion {
                name,
                memory: ram.mem(),
                page_size,
            }],
            &RestoreOptions::default(),
            None,
        )
        .unwrap_err();
        assert_eq!(e.memory, GuestMemoryState::Untouched, "{what}: {e}");
        assert!(ram.pristine() && ram.guards_intact());
        rejected += 1;
    }
    eprintln!("absurd-value cases rejected: {rejected} (CLI runs: {cli_runs})");
}

#[test]
fn forged_checksum_records_are_rejected() {
    let dir = scratch("records");
    let o = original(&dir, true, false);
    let integ = o.info.integrity.unwrap();
    let rec = integ.record;
    let size = o.bytes.len() as u64;
    let path = dir.join("forged.mr");
    // Records re-signed with a valid CRC but describing something else.
    let forged = [
        (
            "table offset past the end",
            Record {
                table_offset: size + 4096,
                ..rec
            },
        ),
        (
            "table offset 2^63",
            Record {
                table_offset: 1 << 63,
                ..rec
            },
        ),
        (
            "table length 2^62",
            Record {
                table_len: 1 << 62,
                ..rec
            },
        ),
        (
            "table length u64::MAX",
            Record {
                table_len: u64::MAX,
                ..rec
            },
        ),
        (
            "table inside the pages",
            Record {
                table_offset: o.info.blocks[0].layout.pages_offset,
                ..rec
            },
        ),
        (
            "file size larger",
            Record {
                file_size: size + 1,
                ..rec
            },
        ),
        (
            "file size 2^63",
            Record {
                file_size: 1 << 63,
                ..rec
            },
        ),
        (
            "page size 8192",
            Record {
                page_size: 8192,
                ..rec
            },
        ),
        (
            "block count 2^32-1",
            Record {
                blocks: u32::MAX,
                ..rec
            },
        ),
        (
            "metadata crc",
            Record {
                metadata_crc: rec.metadata_crc ^ 1,
                ..rec
            },
        ),
        (
            "table crc",
            Record {
                table_crc: rec.table_crc ^ 1,
                ..rec
            },
        ),
    ];
    let mut cases = 0;
    for (what, r) in forged {
        for (anchor, footer) in [(true, true), (true, false), (false, true)] {
            let mut bytes = o.bytes.clone();
            let enc = mapped_ram_linux::integrity::encode(&r);
            if anchor {
                bytes[integ.anchor_offset as usize..][..64].copy_from_slice(&enc);
            }
            if footer {
                bytes[integ.footer_offset as usize..][..64].copy_from_slice(&enc);
            }
            std::fs::write(&path, &bytes).unwrap();
            let out = judge(&path, what);
            assert!(
                !out.verify_ok && !out.restore_ok,
                "{what} ({anchor}, {footer}): accepted"
            );
            if what != "table crc" || !(anchor && footer) {
                assert!(
                    !out.inspect_ok,
                    "{what} ({anchor}, {footer}): inspect accepted"
                );
            }
            cases += 1;
        }
    }
    // Anchor or footer wiped, or both gone with the file cut back to the stream.
    for (what, wipe_anchor, wipe_footer) in
        [("anchor wiped", true, false), ("footer wiped", false, true)]
    {
        let mut bytes = o.bytes.clone();
        if wipe_anchor {
            bytes[integ.anchor_offset as usize..][..64].fill(0);
        }
        if wipe_footer {
            bytes[integ.footer_offset as usize..][..64].fill(0);
        }
        std::fs::write(&path, &bytes).unwrap();
        let out = judge(&path, what);
        assert!(!out.inspect_ok && !out.restore_ok, "{what}: accepted");
        cases += 1;
    }
    assert_eq!(integrity::RECORD_LEN, 64);
    eprintln!("forged checksum record cases: {cases}");
    if running_in_ci() {
        assert!(cases >= 35);
    }
}
