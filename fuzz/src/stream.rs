//! Fuzz body for `mapped_ram_core::stream`: arbitrary bytes decoded as a mapped-ram file must
//! never panic, and whatever decodes (configuration, RAM section start, block records and the
//! RAM tail) must re-encode with the encoder to exactly the bytes it was read from, at the same
//! offsets.
//!
//! [`sample_file`] builds well-formed files (QEMU's 1 MiB-aligned layout, or a compact layout
//! with page-aligned page regions that keeps files small); the seed corpus in
//! `fuzz/corpus/stream/` is written from it by the ignored test `write_seed_corpus`.

use std::convert::Infallible;

use mapped_ram_core::caps::Capabilities;
use mapped_ram_core::layout::{align_up, MappedRamHeader, Planner, HEADER_SIZE};
use mapped_ram_core::stream::{
    decode_file, encode_block_record, encode_command, encode_eof, encode_eos_footer,
    encode_preamble, encode_ram_end, encode_ram_part, encode_ram_start, encode_vmdesc,
    preamble_len, ByteSink, Config, Decoder, MIG_CMD_SWITCHOVER_START, RAM_START_LEN,
};

/// A sink writing into a growing vector at a movable position (unwritten gaps are zero, like
/// the holes of a sparse file).
#[derive(Debug, Default)]
pub struct VecSink {
    /// The file so far.
    pub data: Vec<u8>,
    /// Where the next write goes.
    pub pos: usize,
}

impl VecSink {
    /// Moves the write position (the file grows on the next write).
    pub fn seek(&mut self, pos: u64) {
        self.pos = usize::try_from(pos).expect("offset fits in memory");
    }
}

impl ByteSink for VecSink {
    type Error = Infallible;

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Infallible> {
        let end = self.pos + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
}

fn encoded(f: impl FnOnce(&mut VecSink) -> Result<(), Infallible>) -> Vec<u8> {
    let mut sink = VecSink::default();
    let Ok(()) = f(&mut sink);
    sink.data
}

fn slice(data: &[u8], start: u64, end: u64) -> &[u8] {
    &data[usize::try_from(start).unwrap()..usize::try_from(end).unwrap()]
}

/// Decodes `data` as a file (base 0, and from the first later `QEVM` in its first 4 KiB as an
/// `offset=` prefix); panics only if a decoded part does not re-encode to its own bytes.
pub fn run(data: &[u8]) {
    check(data, 0);
    if let Some(i) = data
        .windows(4)
        .take(4096)
        .skip(1)
        .position(|w| w == b"QEVM")
    {
        check(data, i as u64 + 1);
    }
}

fn check(data: &[u8], base: u64) {
    // The convenience function must agree with the step-by-step decoder.
    let mut names = Vec::new();
    let whole = decode_file(data, base, |b| {
        names.push(b.clone());
        Ok::<(), Infallible>(())
    });

    let mut dec = Decoder::new(data, base);
    let Ok(cfg) = dec.read_config() else {
        assert!(whole.is_err());
        return;
    };
    let end = dec.position();
    assert_eq!(preamble_len(&cfg), end - base);
    assert_eq!(
        encoded(|s| encode_preamble(&cfg, s)),
        slice(data, base, end),
        "configuration re-encodes"
    );

    let Ok(ram) = dec.read_ram_start() else {
        assert!(whole.is_err());
        return;
    };
    assert_eq!(ram.section_offset, end);
    assert_eq!(ram.first_record_offset, end + RAM_START_LEN);
    assert_eq!(
        encoded(|s| encode_ram_start(ram.section_id, ram.total_ram, s)),
        slice(data, ram.section_offset, ram.first_record_offset),
        "RAM section start re-encodes"
    );

    let mut next = ram.first_record_offset;
    let mut sum = 0u64;
    let mut blocks = Vec::new();
    loop {
        match dec.next_block() {
            Ok(Some(b)) => {
                assert_eq!(b.record_offset, next);
                assert_eq!(b.layout.record_offset, b.record_offset);
                assert_eq!(b.layout.length, b.length);
                assert_eq!(b.layout.bitmap_offset, b.header.bitmap_offset);
                assert_eq!(b.layout.pages_offset, b.header.pages_offset);
                assert_eq!(b.gpa.is_some(), cfg.with_gpa());
                assert!(b.length > 0 && b.length % dec.page_size() == 0);
                assert_eq!(b.header_end(), b.layout.header_offset + HEADER_SIZE as u64);
                assert!(b.next_offset() >= b.header_end());
                assert_eq!(
                    encoded(|s| encode_block_record(&b.name, b.length, b.gpa, &b.header, s)),
                    slice(data, b.record_offset, b.header_end()),
                    "block record re-encodes"
                );
                sum += b.length;
                next = b.next_offset();
                assert_eq!(dec.position(), next);
                blocks.push(b);
            }
            Ok(None) => break,
            Err(_) => {
                assert!(whole.is_err());
                return;
            }
        }
    }
    assert_eq!(sum, ram.total_ram);

    let Ok(tail) = dec.finish() else {
        assert!(whole.is_err());
        return;
    };
    assert_eq!(tail.device_stream_start, next);
    assert_eq!(
        tail.first_device_record,
        data.get(usize::try_from(tail.device_state_offset).unwrap())
            .copied()
    );
    if tail.commands_total as usize == tail.commands.len() {
        // Every command's place is known, so the whole tail can be rebuilt.
        let mut rebuilt = encoded(|s| encode_eos_footer(ram.section_id, s));
        let end_at = tail.device_state_offset - 18;
        let mut pos = tail.device_stream_start + rebuilt.len() as u64;
        let mut commands = tail.commands.iter().peekable();
        let mut parts = 0;
        while pos < end_at {
            let piece = match commands.peek() {
                Some(c) if c.offset == pos => {
                    let payload = slice(data, pos + 5, pos + 5 + u64::from(c.len));
                    let cmd = c.cmd;
                    commands.next();
                    encoded(|s| encode_command(cmd, payload, s))
                }
                _ => {
                    parts += 1;
                    encoded(|s| encode_ram_part(ram.section_id, s))
                }
            };
            pos += piece.len() as u64;
            rebuilt.extend_from_slice(&piece);
        }
        assert_eq!(pos, end_at);
        assert!(commands.next().is_none());
        assert_eq!(parts, tail.parts);
        rebuilt.extend_from_slice(&encoded(|s| encode_ram_end(ram.section_id, s)));
        assert_eq!(
            rebuilt,
            slice(data, tail.device_stream_start, tail.device_state_offset),
            "RAM tail re-encodes"
        );
    }

    let info = whole.expect("decode_file agrees with the decoder");
    assert_eq!(info.config, cfg);
    assert_eq!(info.ram, ram);
    assert_eq!(info.tail, tail);
    assert_eq!(info.blocks as usize, blocks.len());
    assert_eq!(names, blocks);
}

/// One RAM block of a [`sample_file`].
#[derive(Debug, Clone, Copy)]
pub struct SampleBlock<'a> {
    /// Block id.
    pub name: &'a str,
    /// Length in bytes (a page multiple).
    pub length: u64,
    /// No data in the file (0/0 header; needs `x-ignore-shared`).
    pub empty: bool,
}

/// Builds a complete file after `prefix` bytes of `'X'` (an `offset=` prefix): preamble, RAM
/// section 1 with `blocks` (GPA `0x1000_0000 * i` when `cfg` lists x-ignore-shared; first page
/// bit set and the first page filled with `0xa5`), setup EOS, `parts` PART sections,
/// `SWITCHOVER_START`, END, EOF and a tiny vmdesc.
///
/// `compact = false` lays the blocks out as QEMU does (pages 1 MiB aligned, via
/// [`Planner`]); `compact = true` puts each page region on the next page boundary after the
/// bitmap, which QEMU's loader (and ours) also accepts, to keep files small.
pub fn sample_file(
    cfg: &Config,
    prefix: usize,
    blocks: &[SampleBlock<'_>],
    parts: u32,
    compact: bool,
) -> Vec<u8> {
    let page_size = cfg.target_page_size().expect("valid page bits");
    let mut f = VecSink::default();
    f.write_all(&vec![b'X'; prefix]).unwrap();
    encode_preamble(cfg, &mut f).unwrap();
    let first = f.pos as u64 + RAM_START_LEN;
    let mut placed = Vec::new();
    let mut cursor = first;
    for b in blocks {
        let mut planner = Planner::new(cursor, page_size, cfg.with_gpa()).unwrap();
        let mut layout = if b.empty {
            planner.push_empty(b.name.len(), b.length).unwrap()
        } else {
            planner.push(b.name.len(), b.length).unwrap()
        };
        if compact && !b.empty {
            // Same record and header place, but the pages right after the bitmap.
            layout.pages_offset =
                align_up(layout.bitmap_offset + layout.bitmap_size, page_size).unwrap();
        }
        cursor = if b.empty {
            layout.header_offset + HEADER_SIZE as u64
        } else {
            layout.pages_end()
        };
        placed.push((b.name, layout));
    }
    let total: u64 = blocks.iter().map(|b| b.length).sum();
    encode_ram_start(1, total, &mut f).unwrap();
    for (i, (name, layout)) in placed.iter().enumerate() {
        f.seek(layout.record_offset);
        let gpa = cfg.with_gpa().then_some(0x1000_0000 * i as u64);
        let header: MappedRamHeader = if layout.is_empty() {
            MappedRamHeader {
                version: 1,
                page_size,
                bitmap_offset: 0,
                pages_offset: 0,
            }
        } else {
            layout.header()
        };
        encode_block_record(name, layout.length, gpa, &header, &mut f).unwrap();
        if !layout.is_empty() {
            f.write_all(&[1]).unwrap();
            f.seek(layout.pages_offset);
            f.write_all(&vec![0xa5; page_size as usize]).unwrap();
        }
    }
    f.seek(cursor);
    encode_eos_footer(1, &mut f).unwrap();
    for _ in 0..parts {
        encode_ram_part(1, &mut f).unwrap();
    }
    encode_command(MIG_CMD_SWITCHOVER_START, &[], &mut f).unwrap();
    encode_ram_end(1, &mut f).unwrap();
    encode_eof(&mut f).unwrap();
    encode_vmdesc(br#"{"page_size": 4096, "devices": []}"#, &mut f).unwrap();
    f.data
}

/// The seed corpus: `(file name, bytes)`, every file under 100 KiB.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let block = |name, length| SampleBlock {
        name,
        length,
        empty: false,
    };
    let microvm = Config::new("microvm", Capabilities::MAPPED_RAM).unwrap();
    let q35 = Config::new("pc-q35-10.0", Capabilities::MAPPED_RAM).unwrap();
    let mut shared = Config::new(
        "pc-q35-11.0",
        Capabilities::X_IGNORE_SHARED | Capabilities::MAPPED_RAM,
    )
    .unwrap();
    shared.uuid = Some(*b"\x12\x34\x56\x78\x9a\xbc\xde\xf0\x01\x23\x45\x67\x89\xab\xcd\xef");
    let mut virt = Config::new("virt-10.0", Capabilities::MAPPED_RAM).unwrap();
    virt.target_page_bits = Some(12);

    // QEMU's own layout, cut after the first block's header and bitmap (the page regions
    // start at 1 MiB, too far for a seed).
    let worked = sample_file(
        &microvm,
        0,
        &[block("microvm.ram", 0x200_0000), block("pc.bios", 0x1_0000)],
        1,
        false,
    );
    let q35_file = sample_file(
        &q35,
        0,
        &[block("pc.ram", 0x800_0000), block("vga.vram", 0x100_0000)],
        1,
        false,
    );
    vec![
        ("qemu-microvm-prefix", worked[..0x48c].to_vec()),
        ("qemu-q35-prefix", q35_file[..0x108b].to_vec()),
        (
            "compact-microvm",
            sample_file(
                &microvm,
                0,
                &[block("microvm.ram", 0x4000), block("pc.bios", 0x2000)],
                1,
                true,
            ),
        ),
        (
            "compact-ignore-shared",
            sample_file(
                &shared,
                0,
                &[
                    SampleBlock {
                        name: "pc.ram",
                        length: 0x4000_0000,
                        empty: true,
                    },
                    block("pc.bios", 0x4000),
                ],
                2,
                true,
            ),
        ),
        (
            "compact-virt-offset",
            sample_file(&virt, 0x100, &[block("mach-virt.ram", 0x2000)], 0, true),
        ),
        ("no-blocks", sample_file(&q35, 0, &[], 3, true)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mapped_ram_core::stream::decode_file;

    #[test]
    fn seeds_decode_completely() {
        for (name, data) in seeds() {
            assert!(data.len() < 100 * 1024, "{name}: {} bytes", data.len());
            run(&data);
            let base = if name.ends_with("-offset") { 0x100 } else { 0 };
            let r = decode_file(&data[..], base, |_| Ok::<(), ()>(()));
            if name.ends_with("-prefix") {
                assert!(r.is_err(), "{name}");
            } else {
                let info = r.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                assert_eq!(info.tail.first_device_record, Some(0), "{name}");
            }
        }
    }

    #[test]
    fn qemu_layout_sample_matches_worked_example() {
        let cfg = Config::new("microvm", Capabilities::MAPPED_RAM).unwrap();
        let blocks = [
            SampleBlock {
                name: "microvm.ram",
                length: 0x200_0000,
                empty: false,
            },
            SampleBlock {
                name: "pc.bios",
                length: 0x1_0000,
                empty: false,
            },
        ];
        let d = sample_file(&cfg, 0, &blocks, 1, false);
        run(&d);
        let info = decode_file(&d[..], 0, |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(info.tail.device_stream_start, 0x221_0000);
        assert_eq!(info.tail.device_state_offset, 0x221_0036);
    }

    #[test]
    fn mutated_seeds_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for (_, seed) in seeds() {
            for _ in 0..500 {
                let mut d = seed.clone();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pos = (x % d.len() as u64) as usize;
                d[pos] = (x >> 32) as u8;
                run(&d);
            }
        }
    }

    /// Writes `fuzz/corpus/stream/`: `cargo test -p mapped-ram-fuzz -- --ignored write_seed_corpus`.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/stream");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds() {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
