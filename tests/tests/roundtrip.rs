//! Save → restore round trips through the library on real ext4 files, across the whole
//! option matrix: 1..8 channels × direct-io off/on/auto × zero-pages detect/write × single and
//! multi-block × with and without an `offset=` prefix.

use std::collections::HashMap;
use std::path::PathBuf;

use mapped_ram_linux::{
    restore, save, Cancel, DirectIo, RestoreOptions, RestoreRegion, SaveError, SaveOptions,
    SaveRegion, ZeroPages,
};
use mapped_ram_tests::image::{fill_pattern, first_differing_page};

/// A directory on the real disk (never tmpfs): the cargo target directory.
fn disk_dir(name: &str) -> PathBuf {
    mapped_ram_tests::support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), name)
}

/// Page-aligned guest memory, as a VMM would have (anonymous mmap via a large Vec is page
/// aligned in practice; we over-allocate and slice to be sure).
struct Ram {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Ram {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + 4096];
        let start = buf.as_ptr().align_offset(4096);
        Ram { buf, start, len }
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

fn blocks(multi: bool) -> Vec<(&'static str, Ram)> {
    let mut out = Vec::new();
    let mut main = Ram::new(3 << 20);
    fill_pattern(main.bytes_mut(), 11, 0.25, false);
    out.push(("pc.ram", main));
    if multi {
        // Not a multiple of the 1 MiB chunk; clustered zeros; and a block that is all zero.
        let mut bios = Ram::new(260 << 10);
        fill_pattern(bios.bytes_mut(), 12, 0.3, true);
        out.push(("pc.bios", bios));
        out.push(("vga.vram", Ram::new(64 << 10)));
    }
    out
}

#[test]
fn option_matrix_round_trips_byte_identical() {
    let dir = disk_dir("matrix");
    let mut files: HashMap<(bool, bool, bool), Vec<u8>> = HashMap::new();
    let mut cases = 0;
    for multi in [false, true] {
        let src = blocks(multi);
        let regions: Vec<SaveRegion<'_>> = src
            .iter()
            .map(|(n, r)| SaveRegion {
                name: n,
                memory: r.bytes(),
                page_size: 4096,
            })
            .collect();
        for offset in [0u64, 0x1000] {
            for zero_pages in [ZeroPages::Detect, ZeroPages::Write] {
                for direct_io in [DirectIo::Off, DirectIo::On, DirectIo::Auto] {
                    for channels in 1..=8usize {
                        cases += 1;
                        let path = dir.join(format!(
                            "m{multi}-o{offset}-{zero_pages:?}-{direct_io:?}-{channels}.mr"
                        ));
                        if offset > 0 {
                            std::fs::write(&path, vec![b'X'; offset as usize]).unwrap();
                        }
                        let opts = SaveOptions {
                            channels,
                            direct_io,
                            zero_pages,
                            offset,
                            ..SaveOptions::default()
                        };
                        let rep = save(&path, &regions, &opts, None)
                            .unwrap_or_else(|e| panic!("save {}: {e}", path.display()));
                        assert_eq!(
                            rep.direct_io,
                            direct_io != DirectIo::Off,
                            "ext4 takes O_DIRECT"
                        );
                        let zero_count: u64 = src
                            .iter()
                            .map(|(_, r)| {
                                r.bytes()
                                    .chunks(4096)
                                    .filter(|p| p.iter().all(|b| *b == 0))
                                    .count() as u64
                            })
                            .sum();
                        match zero_pages {
                            ZeroPages::Detect => assert_eq!(rep.zero_pages, zero_count),
                            ZeroPages::Write => assert_eq!(rep.zero_pages, 0),
                        }
                        let bytes = std::fs::read(&path).unwrap();
                        if offset > 0 {
                            assert!(
                                bytes[..offset as usize].iter().all(|b| *b == b'X'),
                                "prefix kept"
                            );
                            assert_eq!(&bytes[offset as usize..offset as usize + 4], b"QEVM");
                        }
                        // The file holds no trace of the channel count or direct-io.
                        let key = (multi, offset > 0, zero_pages == ZeroPages::Detect);
                        match files.get(&key) {
                            Some(first) => assert!(
                                first == &bytes,
                                "{} differs from the same save with other channels/direct-io",
                                path.display()
                            ),
                            None => {
                                files.insert(key, bytes);
                            }
                        }
                        // Restore with another channel count into garbage-filled memory.
                        let mut dst: Vec<Ram> = src
                            .iter()
                            .map(|(_, r)| {
                                let mut d = Ram::new(r.len);
                                d.bytes_mut().fill(0xAA);
                                d
                            })
                            .collect();
                        let mut rregions: Vec<RestoreRegion<'_>> = src
                            .iter()
                            .zip(dst.iter_mut())
                            .map(|((n, _), d)| RestoreRegion {
                                name: n,
                                memory: d.bytes_mut(),
                                page_size: 4096,
                            })
                            .collect();
                        let ropts = RestoreOptions {
                            channels: 9 - channels,
                            direct_io,
                            offset,
                            ..RestoreOptions::default()
                        };
                        restore(&path, &mut rregions, &ropts, None)
                            .unwrap_or_else(|e| panic!("restore {}: {e}", path.display()));
                        for ((name, s), d) in src.iter().zip(&dst) {
                            assert!(
                                s.bytes() == d.bytes(),
                                "{}: block {name} differs first at page {:?}",
                                path.display(),
                                first_differing_page(s.bytes(), d.bytes())
                            );
                        }
                        std::fs::remove_file(&path).unwrap();
                    }
                }
            }
        }
    }
    assert_eq!(cases, 192);
}

#[test]
fn unaligned_memory_goes_through_a_bounce_buffer() {
    let dir = disk_dir("unaligned");
    let mut backing = vec![0u8; (2 << 20) + 4096 + 1];
    let off = backing.as_ptr().align_offset(4096) + 1; // deliberately misaligned
    fill_pattern(&mut backing[off..off + (2 << 20)], 21, 0.25, false);
    let src = backing[off..off + (2 << 20)].to_vec();
    let path = dir.join("u.mr");
    for direct_io in [DirectIo::On, DirectIo::Off] {
        let regions = [SaveRegion {
            name: "ram",
            memory: &backing[off..off + (2 << 20)],
            page_size: 4096,
        }];
        save(
            &path,
            &regions,
            &SaveOptions {
                channels: 2,
                direct_io,
                ..SaveOptions::default()
            },
            None,
        )
        .unwrap();
        let mut dst = vec![0x55u8; (2 << 20) + 1];
        let mut r = [RestoreRegion {
            name: "ram",
            memory: &mut dst[1..],
            page_size: 4096,
        }];
        restore(
            &path,
            &mut r,
            &RestoreOptions {
                channels: 3,
                direct_io,
                ..RestoreOptions::default()
            },
            None,
        )
        .unwrap();
        assert!(dst[1..] == src[..], "{direct_io:?}");
    }
}

#[test]
fn cancelled_save_keeps_previous_snapshot() {
    let dir = disk_dir("cancel");
    let path = dir.join("s.mr");
    let mut a = vec![0u8; 8 << 20];
    fill_pattern(&mut a, 31, 0.25, false);
    let regions = [SaveRegion {
        name: "ram",
        memory: &a,
        page_size: 4096,
    }];
    save(&path, &regions, &SaveOptions::default(), None).unwrap();
    let before = std::fs::read(&path).unwrap();

    let mut b = vec![0u8; 8 << 20];
    fill_pattern(&mut b, 32, 0.25, false);
    let cancel = Cancel::default();
    cancel.cancel();
    let regions = [SaveRegion {
        name: "ram",
        memory: &b,
        page_size: 4096,
    }];
    let opts = SaveOptions {
        cancel: Some(cancel),
        ..SaveOptions::default()
    };
    assert!(matches!(
        save(&path, &regions, &opts, None),
        Err(SaveError::Cancelled)
    ));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "previous snapshot intact"
    );
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
}

#[test]
fn restore_errors_leave_memory_untouched() {
    let dir = disk_dir("restore-errors");
    let path = dir.join("s.mr");
    let mut a = vec![0u8; 1 << 20];
    fill_pattern(&mut a, 41, 0.25, false);
    save(
        &path,
        &[SaveRegion {
            name: "ram",
            memory: &a,
            page_size: 4096,
        }],
        &SaveOptions::default(),
        None,
    )
    .unwrap();

    let mut dst = vec![0x77u8; 1 << 20];
    let e = restore(
        &path,
        &mut [RestoreRegion {
            name: "other",
            memory: &mut dst,
            page_size: 4096,
        }],
        &RestoreOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            e.kind,
            mapped_ram_linux::RestoreErrorKind::Block(
                mapped_ram_linux::BlockMismatch::Unknown { .. }
            )
        ),
        "{e}"
    );
    assert_eq!(e.memory, mapped_ram_linux::GuestMemoryState::Untouched);
    let mut small = vec![0x77u8; 1 << 19];
    let e = restore(
        &path,
        &mut [RestoreRegion {
            name: "ram",
            memory: &mut small,
            page_size: 4096,
        }],
        &RestoreOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            e.kind,
            mapped_ram_linux::RestoreErrorKind::Block(mapped_ram_linux::BlockMismatch::Length {
                file_length: 1048576,
                region_length: 524288,
                ..
            })
        ),
        "{e}"
    );
    assert!(dst.iter().chain(&small).all(|b| *b == 0x77));

    // A truncated copy: validation fails before any byte lands.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.mr");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = restore(
        &cut,
        &mut [RestoreRegion {
            name: "ram",
            memory: &mut dst,
            page_size: 4096,
        }],
        &RestoreOptions::default(),
        None,
    )
    .unwrap_err();
    assert_eq!(
        e.memory,
        mapped_ram_linux::GuestMemoryState::Untouched,
        "{e}"
    );
    assert!(dst.iter().all(|b| *b == 0x77));
}

#[test]
fn caller_provided_descriptors_like_qemu_fdsets() {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = disk_dir("fds");
    let path = dir.join("fd.mr");
    let mut a = Ram::new(5 << 20);
    fill_pattern(a.bytes_mut(), 51, 0.25, false);
    // Two separately opened descriptors, the data one with O_DIRECT; offset prefix kept.
    std::fs::write(&path, vec![b'X'; 0x1000]).unwrap();
    let main = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let data = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let regions = [SaveRegion {
        name: "ram",
        memory: a.bytes(),
        page_size: 4096,
    }];
    let opts = SaveOptions {
        channels: 3,
        offset: 0x1000,
        ..SaveOptions::default()
    };
    let rep =
        mapped_ram_linux::save_to_fds(main.as_fd(), data.as_fd(), &regions, &opts, None).unwrap();
    assert!(
        rep.direct_io,
        "O_DIRECT taken from the data descriptor's flags"
    );
    drop((main, data));
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes[..0x1000].iter().all(|b| *b == b'X'));

    let main = std::fs::File::open(&path).unwrap();
    let data = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let mut back = Ram::new(5 << 20);
    back.bytes_mut().fill(0xEE);
    let mut r = [RestoreRegion {
        name: "ram",
        memory: back.bytes_mut(),
        page_size: 4096,
    }];
    let ropts = RestoreOptions {
        channels: 2,
        offset: 0x1000,
        ..RestoreOptions::default()
    };
    let rep = mapped_ram_linux::restore_from_fds(main.as_fd(), data.as_fd(), &mut r, &ropts, None)
        .unwrap();
    assert!(rep.direct_io);
    assert!(back.bytes() == a.bytes());
    // The path-based restore reads the same file identically.
    let mut again = Ram::new(5 << 20);
    let mut r = [RestoreRegion {
        name: "ram",
        memory: again.bytes_mut(),
        page_size: 4096,
    }];
    restore(&path, &mut r, &ropts, None).unwrap();
    assert!(again.bytes() == a.bytes());
}
