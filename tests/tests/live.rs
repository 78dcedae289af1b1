//! Live saves in passes, incremental updates and lazy (mmap) restores.
//!
//! * `live_passes_with_a_concurrent_writer_100_times`: a writer thread mutates guest memory
//!   (atomic stores, KVM-style dirty bits set after each write) while passes run; the finished
//!   file must restore to the memory exactly as it was at `finish`, 100 times in a row, across
//!   channel counts, direct-io, checksums, write gaps and hole punching.
//! * stale bytes under clear bits (QEMU semantics, spec §d.5) with and without hole punching,
//!   restored by both the copying and the lazy restore;
//! * incremental updates with dirty bitmaps and by comparison: only changed pages written
//!   (counted), checksums kept valid, layout mismatches refused;
//! * lazy restore equal to the copying restore for our files (default gaps, no gaps, offset
//!   prefix) and for QEMU's files, including a QEMU file with stale bytes under clear bits
//!   (which QEMU itself loads as zero).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mapped_ram_linux::integrity::FLAG_CLEAN_ZERO;
use mapped_ram_linux::{
    inspect, restore, restore_lazy, restore_uffd, save, update, verify, Changes, CopyMode,
    DirectIo, DirtyLog, GuestMemory, LazyOptions, LiveOptions, LiveRegion, LiveSave,
    RestoreOptions, RestoreRegion, SaveOptions, SaveRegion, UffdOptions, UpdateError,
    UpdateOptions,
};
use mapped_ram_tests::image::{first_differing_page, pattern_image, PAGE_SIZE};
use mapped_ram_tests::qemu::{
    disk_temp_dir, qemu_save, require_qemu, GuestConfig, MachineKind, SaveOpts, MAIN_RAM_BLOCK,
};

const PS: u64 = PAGE_SIZE as u64;

/// A directory on the real disk (never tmpfs), so direct-io and hole punching are exercised.
fn disk_dir(name: &str) -> PathBuf {
    mapped_ram_tests::support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), name)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn words(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// The bytes of atomic guest memory.
fn bytes_of(mem: &[AtomicU64]) -> Vec<u8> {
    let mut out = vec![0u8; mem.len() * 8];
    for (o, w) in out.chunks_exact_mut(8).zip(mem) {
        o.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
    }
    out
}

/// Fetches and clears a dirty log, as `KVM_GET_DIRTY_LOG` does.
fn take(dirty: &[AtomicU64]) -> Vec<u64> {
    dirty.iter().map(|w| w.swap(0, Ordering::Acquire)).collect()
}

fn assert_same(what: &str, expected: &[u8], got: &[u8]) {
    assert_eq!(expected.len(), got.len(), "{what}: length");
    if let Some(p) = first_differing_page(expected, got) {
        panic!("{what}: page {p} differs");
    }
}

/// Restores `names` (with their lengths) from `path` into fresh buffers filled with garbage.
fn restore_all(path: &Path, blocks: &[(&str, usize)], offset: u64) -> Vec<Vec<u8>> {
    let mut bufs: Vec<Vec<u8>> = blocks.iter().map(|(_, l)| vec![0xAA; *l]).collect();
    let mut regions: Vec<RestoreRegion<'_>> = blocks
        .iter()
        .zip(bufs.iter_mut())
        .map(|((n, _), b)| RestoreRegion {
            name: n,
            memory: b,
            page_size: PS,
        })
        .collect();
    let opts = RestoreOptions {
        channels: 2,
        // Buffered: an O_DIRECT read would first force the just-written file to disk.
        direct_io: DirectIo::Off,
        offset,
        ..RestoreOptions::default()
    };
    restore(path, &mut regions, &opts, None).unwrap_or_else(|e| panic!("restore: {e}"));
    drop(regions);
    bufs
}

/// Lazily restores `names` and returns copies of their memory.
fn restore_lazily(path: &Path, names: &[&str], opts: &LazyOptions) -> Vec<Vec<u8>> {
    let lazy = restore_lazy(path, names, opts).unwrap_or_else(|e| panic!("lazy restore: {e}"));
    names
        .iter()
        .map(|n| lazy.block(n).unwrap().mapping().as_slice().to_vec())
        .collect()
}

#[test]
fn live_passes_with_a_concurrent_writer_100_times() {
    let dir = disk_dir("live100");
    const PAGES: usize = 1024; // 4 MiB
    const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
    let mut writes_total = 0u64;
    let mut dirty_total = 0u64;
    for iter in 0..100u64 {
        let mem = words(PAGES * WORDS_PER_PAGE);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (iter + 1));
        for p in 0..PAGES {
            if rng.next() % 4 != 0 {
                for w in 0..WORDS_PER_PAGE {
                    mem[p * WORDS_PER_PAGE + w].store(rng.next(), Ordering::Relaxed);
                }
            }
        }
        let dirty = words(PAGES / 64);
        let stop = AtomicBool::new(false);
        let opts = LiveOptions {
            save: SaveOptions {
                channels: 1 + (iter % 3) as usize,
                direct_io: if iter % 4 == 0 {
                    DirectIo::On
                } else {
                    DirectIo::Off
                },
                fsync: false,
                checksums: iter % 4 != 3,
                max_gap_pages: if iter % 3 == 0 { 0 } else { 16 },
                ..SaveOptions::default()
            },
            punch_holes: iter % 5 != 4,
        };
        let path = dir.join(format!("live-{iter}.mr"));
        let regions = [LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_atomic(&mem),
            page_size: PS,
        }];
        let mut live = LiveSave::begin(&path, &regions, &opts)
            .unwrap_or_else(|e| panic!("iteration {iter}: begin: {e}"));
        let writes = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut rng = Rng(iter * 31 + 7);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let p = (rng.next() % PAGES as u64) as usize;
                    let page = &mem[p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE];
                    match rng.next() % 8 {
                        // A page turns zero.
                        0 | 1 => page.iter().for_each(|w| w.store(0, Ordering::Relaxed)),
                        // A page is rewritten whole.
                        2 => page
                            .iter()
                            .for_each(|w| w.store(rng.next() | 1, Ordering::Relaxed)),
                        // A few words change.
                        _ => {
                            for _ in 0..4 {
                                let w = (rng.next() % WORDS_PER_PAGE as u64) as usize;
                                page[w].store(rng.next(), Ordering::Relaxed);
                            }
                        }
                    }
                    // The dirty bit after the data, as KVM reports a write.
                    dirty[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
                    n += 1;
                    // A busy guest, but not one that rewrites all of its memory in every pass.
                    if n % 8 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    }
                }
                n
            });
            live.pass_all()
                .unwrap_or_else(|e| panic!("iteration {iter}: first pass: {e}"));
            for _ in 0..(1 + iter % 4) {
                let d = take(&dirty);
                let r = live
                    .pass(&[DirtyLog::new("pc.ram", &d)])
                    .unwrap_or_else(|e| panic!("iteration {iter}: pass: {e}"));
                dirty_total += r.pages_dirty;
            }
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap()
        });
        writes_total += writes;
        // The guest is paused: the final pass makes the file exact.
        let d = take(&dirty);
        let report = live
            .finish(&[DirtyLog::new("pc.ram", &d)], None)
            .unwrap_or_else(|e| panic!("iteration {iter}: finish: {e}"));
        assert_eq!(
            report.save.checksums, opts.save.checksums,
            "iteration {iter}"
        );
        let expected = bytes_of(&mem);
        let got = restore_all(&path, &[("pc.ram", expected.len())], 0);
        assert_same(&format!("iteration {iter}"), &expected, &got[0]);
        // The file's own checks (structure, page checksums) on every fifth file.
        if iter % 5 == 0 {
            let v = verify(
                &path,
                0,
                &[SaveRegion {
                    name: "pc.ram",
                    memory: &expected,
                    page_size: PS,
                }],
            )
            .unwrap_or_else(|e| panic!("iteration {iter}: verify: {e}"));
            assert!(
                v.ok(),
                "iteration {iter}: verify: {:?} {:?}",
                v.mismatches,
                v.corrupt
            );
        }
        if iter % 10 == 0 {
            let lazy = restore_lazily(&path, &["pc.ram"], &LazyOptions::default());
            assert_same(&format!("iteration {iter}: lazy"), &expected, &lazy[0]);
        }
        std::fs::remove_file(&path).unwrap();
    }
    eprintln!("100 live saves: {writes_total} concurrent writes, {dirty_total} dirty pages rewritten in passes");
    assert!(writes_total > 0 && dirty_total > 0);
}

/// Reads `len` raw bytes of the file at `offset`.
fn raw(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// A page written in the first pass and zero at the end: bit clear; without hole punching its
/// old bytes stay in the file (as QEMU leaves them), with it the file reads zero there. Both
/// restores must give zero.
#[test]
fn a_page_that_turns_zero_has_a_clear_bit_and_restores_as_zero() {
    let dir = disk_dir("stale");
    for punch in [false, true] {
        let mem = words(256 * 512); // 1 MiB
        for (i, w) in mem.iter().enumerate() {
            w.store(
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
                Ordering::Relaxed,
            );
        }
        let path = dir.join(format!("stale-{punch}.mr"));
        let regions = [LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_atomic(&mem),
            page_size: PS,
        }];
        let opts = LiveOptions {
            punch_holes: punch,
            ..LiveOptions::default()
        };
        let mut live = LiveSave::begin(&path, &regions, &opts).unwrap();
        let first = live.pass_all().unwrap();
        assert_eq!((first.pages_dirty, first.pages_written), (256, 256));
        // Pages 5 and 6..9 turn zero, page 200 changes.
        let mut dirty = vec![0u64; 4];
        for p in [5usize, 6, 7, 8, 200] {
            let fill = if p == 200 { 7 } else { 0 };
            mem[p * 512..(p + 1) * 512]
                .iter()
                .for_each(|w| w.store(fill, Ordering::Relaxed));
            dirty[p / 64] |= 1 << (p % 64);
        }
        let report = live
            .finish(&[DirtyLog::new("pc.ram", &dirty)], None)
            .unwrap();
        let last = report.passes.last().unwrap();
        assert_eq!(
            (last.pages_dirty, last.pages_written, last.zero_pages),
            (5, 1, 4)
        );
        assert_eq!(last.pages_punched, if punch { 4 } else { 0 });
        let info = inspect(&path, 0).unwrap();
        let flags = info.integrity.unwrap().record.flags;
        assert_eq!(
            flags & FLAG_CLEAN_ZERO != 0,
            punch,
            "clean-zero flag only when the stale page was punched (flags {flags:#x})"
        );
        let block = &info.blocks[0];
        assert_eq!(block.pages_stored(), 252);
        assert!(!block.bitmap_ref().test(5) && block.bitmap_ref().test(200));
        let at = block.layout.page_offset(5).unwrap();
        let stale = raw(&path, at, PAGE_SIZE);
        if punch {
            assert!(stale.iter().all(|&b| b == 0), "punched page reads zero");
        } else {
            assert!(
                stale.iter().any(|&b| b != 0),
                "without punching the old bytes stay in the file"
            );
        }
        let expected = bytes_of(&mem);
        assert_same(
            "copy restore",
            &expected,
            &restore_all(&path, &[("pc.ram", 1 << 20)], 0)[0],
        );
        // Lazy restore, both ways of clearing stale pages.
        for max_zero_maps in [0, 4096] {
            let opts = LazyOptions {
                max_zero_maps,
                ..LazyOptions::default()
            };
            let lazy = restore_lazy(&path, &["pc.ram"], &opts).unwrap();
            let r = &lazy.report;
            assert_same(
                &format!("lazy (punch {punch}, max_zero_maps {max_zero_maps})"),
                &expected,
                lazy.block("pc.ram").unwrap().mapping().as_slice(),
            );
            assert_eq!(r.zero_pages, 4);
            if punch {
                // Every clear page was punched: the writer says so and nothing is checked.
                assert_eq!((r.zero_pages_clean, r.zero_pages_in_holes), (4, 0), "{r:?}");
            } else if max_zero_maps == 0 {
                assert_eq!(
                    (r.zero_pages_checked, r.stale_pages_zeroed),
                    (4, 4),
                    "{r:?}"
                );
            } else {
                assert_eq!((r.zero_maps, r.zero_pages_mapped), (1, 4), "{r:?}");
            }
        }
        // An update keeps what the file was: stale bytes it did not rewrite stay stale.
        update(&path, &regions, Changes::Compare, &UpdateOptions::default()).unwrap();
        let flags = inspect(&path, 0).unwrap().integrity.unwrap().record.flags;
        assert_eq!(
            flags & FLAG_CLEAN_ZERO != 0,
            punch,
            "after update: {flags:#x}"
        );
        let lazy = restore_lazy(&path, &["pc.ram"], &LazyOptions::default()).unwrap();
        assert_same(
            &format!("lazy after update (punch {punch})"),
            &expected,
            lazy.block("pc.ram").unwrap().mapping().as_slice(),
        );
    }
}

fn two_blocks(seed: u64) -> (Vec<u8>, Vec<u8>) {
    (
        pattern_image(6 << 20, seed, 0.25, false),
        pattern_image(260 << 10, seed + 1, 0.3, true),
    )
}

#[test]
fn update_with_dirty_bitmaps_writes_only_the_dirty_pages() {
    let dir = disk_dir("update-dirty");
    let (mut ram, bios) = two_blocks(3);
    let path = dir.join("snap.mr");
    let device_state = b"\x04device state bytes\x00".to_vec();
    let prefix = 0x1000u64;
    std::fs::write(&path, vec![b'P'; prefix as usize]).unwrap();
    let full = save(
        &path,
        &[
            SaveRegion {
                name: "pc.ram",
                memory: &ram,
                page_size: PS,
            },
            SaveRegion {
                name: "pc.bios",
                memory: &bios,
                page_size: PS,
            },
        ],
        &SaveOptions {
            offset: prefix,
            device_state: Some(device_state.clone()),
            ..SaveOptions::default()
        },
        None,
    )
    .unwrap();
    // The guest runs on: some pages change, one stored page turns zero, one zero page gets data.
    let pages = ram.len() / PAGE_SIZE;
    let mut dirty = vec![0u64; pages.div_ceil(64)];
    let mut mark = |p: usize| dirty[p / 64] |= 1 << (p % 64);
    let mut rng = Rng(99);
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < 40 {
        changed.insert((rng.next() % pages as u64) as usize);
    }
    for &p in &changed {
        ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(p as u8 | 1);
        mark(p);
    }
    let stored_zeroed = (0..pages)
        .find(|p| !changed.contains(p) && ram[p * PAGE_SIZE] != 0)
        .unwrap();
    ram[stored_zeroed * PAGE_SIZE..(stored_zeroed + 1) * PAGE_SIZE].fill(0);
    mark(stored_zeroed);
    let bios_dirty = vec![0u64; 2];
    let regions = [
        LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: PS,
        },
        LiveRegion {
            name: "pc.bios",
            memory: GuestMemory::from_slice(&bios),
            page_size: PS,
        },
    ];
    let opts = UpdateOptions {
        save: SaveOptions {
            offset: prefix,
            ..SaveOptions::default()
        },
        ..UpdateOptions::default()
    };
    let r = update(
        &path,
        &regions,
        Changes::Dirty(&[&dirty, &bios_dirty]),
        &opts,
    )
    .unwrap();
    eprintln!(
        "update: {} pages changed, {} written, {} zero, {} bytes of page data + {} bytes copied ({:?}); a full save wrote {} bytes of page data",
        r.pages_changed, r.pages_written, r.zero_pages, r.data_bytes, r.copy_bytes, r.copy, full.data_bytes
    );
    assert_eq!(r.pages_changed, 41);
    assert_eq!((r.pages_written, r.zero_pages), (40, 1));
    assert!(r.data_bytes <= 40 * PS + 16 * PS * 40, "{}", r.data_bytes);
    assert!(r.data_bytes < full.data_bytes / 20);
    assert!(r.checksums, "the file had checksums and keeps them");
    let got = restore_all(
        &path,
        &[("pc.ram", ram.len()), ("pc.bios", bios.len())],
        prefix,
    );
    assert_same("pc.ram after update", &ram, &got[0]);
    assert_same("pc.bios after update", &bios, &got[1]);
    let v = verify(
        &path,
        prefix,
        &[
            SaveRegion {
                name: "pc.ram",
                memory: &ram,
                page_size: PS,
            },
            SaveRegion {
                name: "pc.bios",
                memory: &bios,
                page_size: PS,
            },
        ],
    )
    .unwrap();
    assert!(v.ok() && v.pages_checksummed.is_some(), "{v:?}");
    assert!(raw(&path, 0, prefix as usize).iter().all(|&b| b == b'P'));
    assert_eq!(
        mapped_ram_linux::read_device_state(&path, prefix).unwrap(),
        device_state
    );
    // A new device state replaces the old one.
    let nothing = vec![0u64; pages.div_ceil(64)];
    let opts2 = UpdateOptions {
        save: SaveOptions {
            offset: prefix,
            device_state: Some(b"\x04new state\x00".to_vec()),
            ..SaveOptions::default()
        },
        copy: CopyMode::Full,
        ..UpdateOptions::default()
    };
    let r2 = update(
        &path,
        &regions,
        Changes::Dirty(&[&nothing, &bios_dirty]),
        &opts2,
    )
    .unwrap();
    assert_eq!((r2.pages_changed, r2.data_bytes), (0, 0));
    assert_eq!(
        mapped_ram_linux::read_device_state(&path, prefix).unwrap(),
        b"\x04new state\x00"
    );
    assert!(verify(&path, prefix, &[]).unwrap().ok());
}

#[test]
fn update_by_comparison_counts_the_differing_pages() {
    let dir = disk_dir("update-compare");
    let (mut ram, bios) = two_blocks(5);
    let path = dir.join("snap.mr");
    let save_regions = |ram: &[u8]| {
        save(
            &path,
            &[
                SaveRegion {
                    name: "pc.ram",
                    memory: ram,
                    page_size: PS,
                },
                SaveRegion {
                    name: "pc.bios",
                    memory: &bios,
                    page_size: PS,
                },
            ],
            &SaveOptions::default(),
            None,
        )
        .unwrap()
    };
    save_regions(&ram);
    let regions_of = |ram: &[u8]| -> Vec<u8> { ram.to_vec() };
    let before = std::fs::metadata(&path).unwrap();
    // Nothing differs: the snapshot is left alone.
    {
        let snapshot = regions_of(&ram);
        let regions = [
            LiveRegion {
                name: "pc.bios",
                memory: GuestMemory::from_slice(&bios),
                page_size: PS,
            },
            LiveRegion {
                name: "pc.ram",
                memory: GuestMemory::from_slice(&snapshot),
                page_size: PS,
            },
        ];
        let r = update(&path, &regions, Changes::Compare, &UpdateOptions::default()).unwrap();
        assert!(r.unchanged());
        assert_eq!(r.pages_compared, (ram.len() + bios.len()) as u64 / PS);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), before.ino());
    }
    // 25 pages differ: 20 rewritten, 3 zero pages get data, 2 stored pages turn zero.
    let pages = ram.len() / PAGE_SIZE;
    let zero: Vec<usize> = (0..pages)
        .filter(|p| ram[p * PAGE_SIZE] == 0)
        .take(3)
        .collect();
    let data: Vec<usize> = (0..pages).filter(|p| ram[p * PAGE_SIZE] != 0).collect();
    for &p in &data[..20] {
        ram[p * PAGE_SIZE + 100] ^= 0xff;
    }
    for &p in &zero {
        ram[p * PAGE_SIZE + 7] = 1;
    }
    for &p in &data[100..102] {
        ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(0);
    }
    let regions = [
        LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: PS,
        },
        LiveRegion {
            name: "pc.bios",
            memory: GuestMemory::from_slice(&bios),
            page_size: PS,
        },
    ];
    let r = update(&path, &regions, Changes::Compare, &UpdateOptions::default()).unwrap();
    assert_eq!(
        (r.pages_changed, r.pages_written, r.zero_pages),
        (25, 23, 2)
    );
    let got = restore_all(&path, &[("pc.ram", ram.len()), ("pc.bios", bios.len())], 0);
    assert_same("pc.ram", &ram, &got[0]);
    assert_same("pc.bios", &bios, &got[1]);
    let lazy = restore_lazily(&path, &["pc.ram"], &LazyOptions::default());
    assert_same("lazy pc.ram", &ram, &lazy[0]);
}

#[test]
fn update_refuses_a_layout_that_does_not_match() {
    let dir = disk_dir("update-mismatch");
    let (ram, bios) = two_blocks(7);
    let path = dir.join("snap.mr");
    save(
        &path,
        &[
            SaveRegion {
                name: "pc.ram",
                memory: &ram,
                page_size: PS,
            },
            SaveRegion {
                name: "pc.bios",
                memory: &bios,
                page_size: PS,
            },
        ],
        &SaveOptions::default(),
        None,
    )
    .unwrap();
    let original = std::fs::read(&path).unwrap();
    let short = ram[..ram.len() - PAGE_SIZE].to_vec();
    let region = |name: &'static str, mem: &'static [u8], ps: u64| LiveRegion {
        name,
        memory: GuestMemory::from_slice(mem),
        page_size: ps,
    };
    let ram: &'static [u8] = Box::leak(ram.into_boxed_slice());
    let bios: &'static [u8] = Box::leak(bios.into_boxed_slice());
    let short: &'static [u8] = Box::leak(short.into_boxed_slice());
    let cases: Vec<(&str, Vec<LiveRegion<'static>>, &str)> = vec![
        (
            "unknown name",
            vec![region("pc.ram", ram, PS), region("vga.ram", bios, PS)],
            "\"vga.ram\" is not in the snapshot",
        ),
        (
            "length",
            vec![region("pc.ram", short, PS), region("pc.bios", bios, PS)],
            "the snapshot holds 6291456 bytes but the memory given has 6287360",
        ),
        (
            "missing block",
            vec![region("pc.ram", ram, PS)],
            "also holds block(s) pc.bios",
        ),
        (
            "page size",
            vec![region("pc.ram", ram, 8192)],
            "the snapshot's page size is 4096 but the memory given has 8192",
        ),
    ];
    for (what, regions, expect) in cases {
        let err =
            update(&path, &regions, Changes::Compare, &UpdateOptions::default()).expect_err(what);
        assert!(matches!(err, UpdateError::Mismatch { .. }), "{what}: {err}");
        assert!(err.to_string().contains(expect), "{what}: {err}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        original,
        "snapshot untouched"
    );
    let err = update(
        &dir.join("missing.mr"),
        &[region("pc.ram", ram, PS)],
        Changes::Compare,
        &UpdateOptions::default(),
    )
    .expect_err("no file");
    assert!(err.to_string().contains("missing.mr"), "{err}");
}

/// A loop-mounted XFS with reflinks (`mkfs.xfs -m reflink=1`, xfsprogs from
/// `.ci/install-deps`), unmounted when dropped.
struct LoopXfs {
    mnt: PathBuf,
}

impl LoopXfs {
    fn mount(name: &str) -> Result<LoopXfs, String> {
        let base = disk_dir(name);
        let image = base.join("xfs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(512 << 20))
            .map_err(|e| e.to_string())?;
        let mnt = base.join("mnt");
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        let run = |cmd: &mut std::process::Command| match cmd.output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Err(e.to_string()),
        };
        run(std::process::Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image))?;
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt))?;
        Ok(LoopXfs { mnt })
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

/// The reflink path: on an XFS with reflinks (`MAPPED_RAM_REFLINK_DIR`, or a loop-mounted one
/// the test makes itself).
#[test]
fn update_with_a_reflink_copy_writes_only_the_changed_pages() {
    let mut _xfs = None;
    let dir = match std::env::var_os("MAPPED_RAM_REFLINK_DIR").map(PathBuf::from) {
        Some(dir) => dir,
        None => match LoopXfs::mount("reflink") {
            Ok(xfs) => _xfs.insert(xfs).mnt.clone(),
            Err(why) => {
                mapped_ram_tests::support::cannot_run(
                    "reflink",
                    &format!("cannot make a loop-mounted XFS with reflinks ({why}); set MAPPED_RAM_REFLINK_DIR"),
                );
                return;
            }
        },
    };
    let (mut ram, bios) = two_blocks(9);
    let path = dir.join(format!("reflink-{}.mr", std::process::id()));
    let regions_save = |ram: &[u8]| {
        save(
            &path,
            &[
                SaveRegion {
                    name: "pc.ram",
                    memory: ram,
                    page_size: PS,
                },
                SaveRegion {
                    name: "pc.bios",
                    memory: &bios,
                    page_size: PS,
                },
            ],
            &SaveOptions::default(),
            None,
        )
        .unwrap()
    };
    regions_save(&ram);
    for p in [1usize, 100, 1000] {
        ram[p * PAGE_SIZE] ^= 0x55;
    }
    let regions = [
        LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: PS,
        },
        LiveRegion {
            name: "pc.bios",
            memory: GuestMemory::from_slice(&bios),
            page_size: PS,
        },
    ];
    let opts = UpdateOptions {
        copy: CopyMode::Reflink,
        ..UpdateOptions::default()
    };
    let r = update(&path, &regions, Changes::Compare, &opts).unwrap();
    assert_eq!(r.copy, mapped_ram_linux::update::CopyKind::Reflink);
    assert_eq!((r.copy_bytes, r.pages_changed), (0, 3));
    let got = restore_all(&path, &[("pc.ram", ram.len()), ("pc.bios", bios.len())], 0);
    assert_same("pc.ram", &ram, &got[0]);
    std::fs::remove_file(&path).unwrap();
}

/// Lazy restore gives exactly what the copying restore gives, for our files with the default
/// write gaps (zeros under clear bits), without gaps (holes), with an offset prefix.
#[test]
fn lazy_restore_matches_copying_restore_for_our_files() {
    let dir = disk_dir("lazy-ours");
    let (ram, bios) = two_blocks(11);
    for (gap, offset) in [(16u64, 0u64), (0, 0), (16, 0x2000)] {
        let path = dir.join(format!("ours-{gap}-{offset}.mr"));
        if offset > 0 {
            std::fs::write(&path, vec![b'X'; offset as usize]).unwrap();
        }
        save(
            &path,
            &[
                SaveRegion {
                    name: "pc.ram",
                    memory: &ram,
                    page_size: PS,
                },
                SaveRegion {
                    name: "pc.bios",
                    memory: &bios,
                    page_size: PS,
                },
            ],
            &SaveOptions {
                max_gap_pages: gap,
                offset,
                ..SaveOptions::default()
            },
            None,
        )
        .unwrap();
        let copied = restore_all(
            &path,
            &[("pc.ram", ram.len()), ("pc.bios", bios.len())],
            offset,
        );
        for max_zero_maps in [0usize, 8, 4096] {
            let opts = LazyOptions {
                offset,
                max_zero_maps,
                ..LazyOptions::default()
            };
            let lazy = restore_lazy(&path, &[], &opts).unwrap();
            let what = format!("gap {gap}, offset {offset}, max_zero_maps {max_zero_maps}");
            assert_eq!(lazy.report.blocks_restored, ["pc.ram", "pc.bios"], "{what}");
            assert_same(
                &what,
                &ram,
                lazy.block("pc.ram").unwrap().mapping().as_slice(),
            );
            assert_same(
                &what,
                &bios,
                lazy.block("pc.bios").unwrap().mapping().as_slice(),
            );
            assert_same(&what, &copied[0], &ram);
            let r = &lazy.report;
            assert_eq!(r.stale_pages_zeroed, 0, "{what}: {r:?}");
            // Our writer marks the file clean: no clear page is looked at, whatever the gaps.
            assert!(r.zero_pages > 0, "{what}: {r:?}");
            assert_eq!(r.zero_pages_clean, r.zero_pages, "{what}: {r:?}");
            assert_eq!(
                (r.zero_pages_in_holes, r.zero_pages_checked, r.check_bytes),
                (0, 0, 0),
                "{what}: {r:?}"
            );
            // Writes go to private copies: the file is unchanged.
            let mut lazy = lazy;
            let m = lazy
                .block_mut("pc.ram")
                .unwrap()
                .mapping_mut()
                .as_mut_slice();
            m[0] ^= 0xff;
        }
        let again = restore_all(&path, &[("pc.ram", ram.len())], offset);
        assert_same("file unchanged by writes to the mapping", &ram, &again[0]);
    }
}

/// Our files without integrity records (saved with checksums off) carry no clean-zero flag:
/// the lazy restore looks at their clear pages as it does for QEMU's files.
#[test]
fn lazy_restore_of_our_file_without_records_checks_clear_pages() {
    let dir = disk_dir("lazy-norecords");
    let (ram, _) = two_blocks(12);
    let path = dir.join("norecords.mr");
    save(
        &path,
        &[SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: PS,
        }],
        &SaveOptions {
            checksums: false,
            ..SaveOptions::default()
        },
        None,
    )
    .unwrap();
    assert!(inspect(&path, 0).unwrap().integrity.is_none());
    let lazy = restore_lazy(&path, &[], &LazyOptions::default()).unwrap();
    let r = &lazy.report;
    assert_same(
        "lazy, no records",
        &ram,
        lazy.block("pc.ram").unwrap().mapping().as_slice(),
    );
    assert!(r.zero_pages > 0, "{r:?}");
    assert_eq!(r.zero_pages_clean, 0, "{r:?}");
    assert_eq!(
        r.zero_pages_in_holes + r.zero_pages_mapped + r.zero_pages_checked,
        r.zero_pages,
        "{r:?}"
    );
    std::fs::remove_file(&path).unwrap();
}

/// QEMU's files: lazy restore of every block equals the image QEMU saved.
#[test]
fn lazy_restore_of_qemu_files() {
    if require_qemu().is_none() {
        return;
    }
    let dir = disk_temp_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR")))).unwrap();
    for (machine, multifd) in [(MachineKind::Microvm, None), (MachineKind::None, Some(2))] {
        let size = 32u64 << 20;
        let image = pattern_image(size as usize, 41, 0.25, false);
        let cfg = GuestConfig::new(machine, size);
        let out = dir.path().join(format!("qemu-{machine:?}.mig"));
        let mut so = SaveOpts::new(&out);
        so.multifd_channels = multifd;
        let saved = qemu_save(&cfg, &image, &so).unwrap_or_else(|e| panic!("{e}"));
        let lazy = restore_lazy(&out, &[], &LazyOptions::default()).unwrap();
        for b in &saved.ram_blocks {
            let expected: &[u8] = if b.name == MAIN_RAM_BLOCK {
                &image
            } else {
                &saved.block_contents[&b.name]
            };
            let got = lazy.block(&b.name).unwrap().mapping().as_slice();
            assert_same(&format!("{machine:?}: block {}", b.name), expected, got);
        }
        let r = &lazy.report;
        assert_eq!(
            r.zero_pages_in_holes, r.zero_pages,
            "QEMU leaves zero pages as holes: {r:?}"
        );
        eprintln!("{machine:?}: {r:?}");
    }
}

/// QEMU leaves a page's old bytes in the file when the page turned zero in a later pass of a
/// live migration: its bit is cleared, the bytes are not rewritten (spec §d.5). That state is
/// forged here in a file QEMU wrote, by writing bytes under clear bits. QEMU itself loads
/// those pages as zero, and so must the copying restore (into memory that is not zero) and the
/// lazy restore (which maps the file, so it must not show what lies under a clear bit).
#[test]
fn stale_bytes_under_clear_bits_of_a_qemu_file_read_as_zero() {
    use std::os::unix::fs::FileExt;
    if require_qemu().is_none() {
        return;
    }
    let dir = disk_temp_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR")))).unwrap();
    let size = 32u64 << 20;
    let image = pattern_image(size as usize, 61, 0.25, false);
    let cfg = GuestConfig::new(MachineKind::None, size);
    let path = dir.path().join("qemu-stale.mig");
    qemu_save(&cfg, &image, &SaveOpts::new(&path)).unwrap_or_else(|e| panic!("{e}"));

    let info = inspect(&path, 0).unwrap();
    let block = info
        .blocks
        .iter()
        .find(|b| b.name == MAIN_RAM_BLOCK)
        .expect("the main block");
    let bits = block.bitmap_ref();
    let clear: Vec<u64> = (0..block.pages()).filter(|&p| !bits.test(p)).collect();
    assert!(
        clear.len() > 1000,
        "the image has zero pages: {}",
        clear.len()
    );
    // Every clear page of the first 4 MiB, plus every 7th clear page after it.
    let stale: Vec<u64> = clear
        .iter()
        .copied()
        .enumerate()
        .filter(|&(i, p)| p < 1024 || i % 7 == 0)
        .map(|(_, p)| p)
        .collect();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for &p in &stale {
        let junk = vec![(p as u8) | 0x80; PAGE_SIZE];
        file.write_all_at(&junk, block.layout.page_offset(p).unwrap())
            .unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(
        raw(&path, block.layout.page_offset(stale[0]).unwrap(), 1)[0],
        (stale[0] as u8) | 0x80,
        "the stale bytes are in the file"
    );

    let loaded =
        mapped_ram_tests::qemu::qemu_load(&cfg, &mapped_ram_tests::qemu::LoadOpts::new(&path))
            .unwrap_or_else(|e| panic!("QEMU could not load the file with stale bytes: {e}"));
    assert_same(
        "QEMU's own load of stale bytes under clear bits",
        &image,
        &loaded.ram.read().unwrap(),
    );
    let copied = restore_all(&path, &[(MAIN_RAM_BLOCK, size as usize)], 0);
    assert_same("copying restore", &image, &copied[0]);
    for max_zero_maps in [0usize, 4096] {
        let opts = LazyOptions {
            max_zero_maps,
            ..LazyOptions::default()
        };
        let lazy = restore_lazy(&path, &[MAIN_RAM_BLOCK], &opts).unwrap();
        assert_same(
            &format!("lazy restore, max_zero_maps {max_zero_maps}"),
            &image,
            lazy.block(MAIN_RAM_BLOCK).unwrap().mapping().as_slice(),
        );
        let r = &lazy.report;
        assert_eq!(r.zero_pages, clear.len() as u64, "{r:?}");
        assert_eq!(
            r.zero_pages_in_holes,
            (clear.len() - stale.len()) as u64,
            "only the forged pages are not holes: {r:?}"
        );
        assert_eq!(
            r.zero_pages_mapped + r.zero_pages_checked,
            stale.len() as u64,
            "every forged page is zero-mapped or checked: {r:?}"
        );
        assert_eq!(
            r.stale_pages_zeroed, r.zero_pages_checked,
            "every checked forged page held bytes and was zeroed: {r:?}"
        );
        if max_zero_maps == 0 {
            assert_eq!(r.zero_pages_mapped, 0, "{r:?}");
        }
    }
    // The userfaultfd restore never reads under a clear bit: faults only, then with prefetch.
    for prefetch_channels in [0usize, 2] {
        let opts = UffdOptions {
            prefetch_channels,
            ..UffdOptions::default()
        };
        let mut r = restore_uffd(&path, &[MAIN_RAM_BLOCK], &opts).unwrap();
        if prefetch_channels > 0 {
            r.wait_prefetched().unwrap();
        }
        assert_same(
            &format!("userfaultfd restore, prefetch channels {prefetch_channels}"),
            &image,
            r.block(MAIN_RAM_BLOCK).unwrap().as_slice(),
        );
        assert!(r.error().is_none());
    }
    // And into 2 MiB huge pages, a whole huge page per fault.
    let Some(_reserved) =
        mapped_ram_tests::support::reserve_huge_pages("huge_pages", size / (2 << 20) + 2)
    else {
        return;
    };
    let r = restore_uffd(
        &path,
        &[MAIN_RAM_BLOCK],
        &UffdOptions {
            prefetch_channels: 0,
            huge_pages: true,
            ..UffdOptions::default()
        },
    )
    .unwrap();
    assert_same(
        "userfaultfd restore into huge pages",
        &image,
        r.block(MAIN_RAM_BLOCK).unwrap().as_slice(),
    );
    assert_eq!(r.stats().faults, size / (2 << 20));
    assert!(r.error().is_none());
}

/// An updated QEMU file is still a QEMU file: QEMU loads the new memory from it.
#[test]
fn qemu_loads_a_qemu_file_that_we_updated() {
    if require_qemu().is_none() {
        return;
    }
    let dir = disk_temp_dir(Some(Path::new(env!("CARGO_TARGET_TMPDIR")))).unwrap();
    let size = 32u64 << 20;
    let image_a = pattern_image(size as usize, 51, 0.25, false);
    let cfg = GuestConfig::new(MachineKind::Microvm, size);
    let path = dir.path().join("qemu.mig");
    let saved = qemu_save(&cfg, &image_a, &SaveOpts::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    // The guest ran on: a tenth of the main block's pages changed, some stored pages are zero now.
    let mut image_b = image_a.clone();
    let pages = image_b.len() / PAGE_SIZE;
    for p in (0..pages).step_by(10) {
        let page = &mut image_b[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        if p % 30 == 0 {
            page.fill(0);
        } else {
            page[1] ^= 0x81;
            page[0] |= 1;
        }
    }
    let regions: Vec<LiveRegion<'_>> = saved
        .ram_blocks
        .iter()
        .map(|b| LiveRegion {
            name: &b.name,
            memory: GuestMemory::from_slice(if b.name == MAIN_RAM_BLOCK {
                &image_b
            } else {
                &saved.block_contents[&b.name]
            }),
            page_size: PS,
        })
        .collect();
    let r = update(&path, &regions, Changes::Compare, &UpdateOptions::default()).unwrap();
    assert!(!r.checksums, "QEMU's file has no checksums and gets none");
    assert!(
        r.pages_changed > 0 && r.pages_changed <= pages as u64 / 10 + 1,
        "{r:?}"
    );
    let loaded =
        mapped_ram_tests::qemu::qemu_load(&cfg, &mapped_ram_tests::qemu::LoadOpts::new(&path))
            .unwrap_or_else(|e| panic!("QEMU could not load the updated file: {e}"));
    assert_same(
        "QEMU's main block after loading the update",
        &image_b,
        &loaded.ram.read().unwrap(),
    );
}
