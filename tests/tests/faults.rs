//! Never lose a snapshot: injected I/O faults, a file system that fills up, a read-only
//! directory, and `kill -9` of the CLI in the middle of saves.
//!
//! Every test holds [`fault::serial`] (faults are process-wide). For every injected failure of
//! a save: the error names the operation, the path and the offset; the previous snapshot at the
//! target is byte-identical afterwards; no temporary file is left; the caller's memory is
//! unchanged. Short transfers, `EINTR` and transient `EAGAIN` are retried transparently. A
//! failed restore says exactly which guest memory it wrote: destinations are pre-filled with a
//! pattern, and every block the error does not list must still hold it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mapped_ram_linux::fault::{self, Fault, FaultKind};
use mapped_ram_linux::{
    inspect, restore, save, verify, DirectIo, FormatError, GuestMemoryState, IoFailure, Op,
    RestoreError, RestoreErrorKind, RestoreOptions, RestoreRegion, SaveError, SaveOptions,
    SaveRegion, SnapshotInfo,
};
use mapped_ram_tests::image::pattern_image;
use mapped_ram_tests::support::{cli_binary, Rng};

const PS: u64 = 4096;
const EINTR: i32 = 4;
const EIO: i32 = 5;
const EAGAIN: i32 = 11;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EOPNOTSUPP: i32 = 95;

/// A scratch directory on the disk file system of the target directory (ext4 here).
fn disk_dir(name: &str) -> PathBuf {
    mapped_ram_tests::support::scratch_dir(env!("CARGO_TARGET_TMPDIR"), &format!("faults-{name}"))
}

/// The guest: two blocks of different sizes, scattered zero pages, and in the first block one
/// run of 256 zero pages (long enough to be punched out after preallocation).
struct Guest {
    ram: Vec<u8>,
    bios: Vec<u8>,
}

/// Pages of `pc.ram` that are zero in every guest.
const ZERO_RUN: std::ops::Range<usize> = 512..768;

impl Guest {
    fn new(seed: u64) -> Guest {
        let mut ram = pattern_image(6 << 20, seed, 0.25, false);
        ram[ZERO_RUN.start * PS as usize..ZERO_RUN.end * PS as usize].fill(0);
        Guest {
            ram,
            bios: pattern_image(256 << 10, seed + 1000, 0.1, false),
        }
    }

    /// The first page of the maximal run of zero pages of `pc.ram` around [`ZERO_RUN`].
    fn zero_run_start(&self) -> u64 {
        let page = |p: usize| &self.ram[p * PS as usize..(p + 1) * PS as usize];
        let mut first = ZERO_RUN.start;
        while first > 0 && page(first - 1).iter().all(|&b| b == 0) {
            first -= 1;
        }
        first as u64
    }

    fn regions(&self) -> [SaveRegion<'_>; 2] {
        [
            SaveRegion {
                name: "pc.ram",
                memory: &self.ram,
                page_size: PS,
            },
            SaveRegion {
                name: "pc.bios",
                memory: &self.bios,
                page_size: PS,
            },
        ]
    }
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".mapped-ram-tmp."))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn opts(direct: DirectIo, channels: usize) -> SaveOptions {
    SaveOptions {
        channels,
        direct_io: direct,
        ..SaveOptions::default()
    }
}

fn io_failure(e: &SaveError) -> &IoFailure {
    match e {
        SaveError::Io(f) => f,
        other => panic!("expected an I/O failure, got {other:?}"),
    }
}

/// A target directory holding a previous snapshot of guest A.
struct Scene {
    dir: PathBuf,
    target: PathBuf,
    previous: Vec<u8>,
    info: SnapshotInfo,
    a: Guest,
    b: Guest,
    b_copy: Guest,
}

impl Scene {
    fn new(name: &str) -> Scene {
        let dir = disk_dir(name);
        let target = dir.join("vm.mr");
        let a = Guest::new(1);
        save(&target, &a.regions(), &opts(DirectIo::Auto, 2), None).expect("previous save");
        let previous = std::fs::read(&target).unwrap();
        let info = inspect(&target, 0).unwrap();
        Scene {
            dir,
            target,
            previous,
            info,
            a,
            b: Guest::new(2),
            b_copy: Guest::new(2),
        }
    }

    /// After a failed save: previous snapshot byte-identical, no temporary, memory unchanged.
    fn assert_intact(&self, what: &str) {
        let now = std::fs::read(&self.target).unwrap();
        assert!(now == self.previous, "{what}: previous snapshot changed");
        assert_eq!(
            temporaries(&self.dir),
            Vec::<PathBuf>::new(),
            "{what}: temporary left"
        );
        assert!(
            self.b.ram == self.b_copy.ram && self.b.bios == self.b_copy.bios,
            "{what}: guest memory changed"
        );
    }

    /// Saves guest B with `fault` armed; returns the result.
    fn save_with(
        &self,
        fault: Fault,
        o: &SaveOptions,
    ) -> Result<mapped_ram_linux::SaveReport, SaveError> {
        fault::clear();
        fault::inject(fault);
        let r = save(&self.target, &self.b.regions(), o, None);
        let fired = fault::fired(fault.op);
        fault::clear();
        assert!(fired > 0, "fault {fault:?} never fired");
        r
    }

    /// Expects the save to fail with an I/O failure of `op`, with everything intact.
    fn expect_failure(&self, fault: Fault, o: &SaveOptions, errno: i32) -> IoFailure {
        let what = format!("{fault:?} direct {:?}", o.direct_io);
        let err = self
            .save_with(fault, o)
            .err()
            .unwrap_or_else(|| panic!("{what}: save succeeded"));
        let msg = err.to_string();
        let f = match err {
            SaveError::Io(f) => f,
            other => panic!("{what}: expected an I/O failure, got {other:?}"),
        };
        assert_eq!(f.errno(), Some(errno), "{what}: {msg}");
        assert!(
            msg.contains(&f.op.to_string()),
            "{what}: message {msg:?} lacks the operation"
        );
        assert!(
            msg.contains(&f.path.display().to_string()),
            "{what}: message {msg:?} lacks the path"
        );
        if let Some(off) = f.offset {
            assert!(
                msg.contains(&format!("{off:#x}")),
                "{what}: message {msg:?} lacks the offset"
            );
        }
        self.assert_intact(&what);
        f
    }

    /// Is `path` this scene's temporary file name pattern?
    fn is_temp(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
            && path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".vm.mr.mapped-ram-tmp.")
    }

    /// Saves B successfully with `fault` armed and checks the file equals a clean save of B.
    fn expect_transparent(&self, fault: Fault, o: &SaveOptions) {
        let what = format!("{fault:?} direct {:?}", o.direct_io);
        let r = self.save_with(fault, o);
        let report = r.unwrap_or_else(|e| panic!("{what}: save failed: {e}"));
        assert!(report.checksums);
        let got = std::fs::read(&self.target).unwrap();
        let clean = self.dir.join("clean.mr");
        save(&clean, &self.b.regions(), o, None).unwrap();
        let want = std::fs::read(&clean).unwrap();
        std::fs::remove_file(&clean).unwrap();
        assert!(got == want, "{what}: file differs from a fault-free save");
        let v = verify(&self.target, 0, &self.b.regions()).unwrap();
        assert!(v.ok(), "{what}: verify {:?} {:?}", v.mismatches, v.corrupt);
        // Put the previous snapshot back for the next case.
        std::fs::write(&self.target, &self.previous).unwrap();
        assert_eq!(
            temporaries(&self.dir),
            Vec::<PathBuf>::new(),
            "{what}: temporary left"
        );
    }
}

fn fault(op: Op, skip: u64, count: u64, kind: FaultKind) -> Fault {
    Fault {
        op,
        skip,
        count,
        kind,
    }
}

/// Counts the calls of `op` in a clean save of guest B.
fn count_calls(scene: &Scene, op: Op, o: &SaveOptions) -> u64 {
    fault::clear();
    fault::inject(fault(op, 0, 0, FaultKind::Errno(EIO)));
    let tmp = scene.dir.join("count.mr");
    save(&tmp, &scene.b.regions(), o, None).unwrap();
    let n = fault::seen(op);
    fault::clear();
    std::fs::remove_file(&tmp).unwrap();
    n
}

#[test]
fn save_faults_keep_the_previous_snapshot_and_name_op_path_offset() {
    let _g = fault::serial();
    let s = Scene::new("save");
    let info = &s.info;
    let (b0, b1) = (&info.blocks[0].layout, &info.blocks[1].layout);
    let integ = info.integrity.expect("checksums by default");
    let mut cases = 0;
    for direct in [DirectIo::Off, DirectIo::On] {
        let o = opts(direct, 2);
        // Every call of every write-side operation, with EIO and ENOSPC.
        for op in [
            Op::WriteStream,
            Op::WriteBitmap,
            Op::WriteChecksums,
            Op::WritePages,
        ] {
            let calls = count_calls(&s, op, &o);
            assert!(calls > 0, "{op:?} never called");
            for skip in 0..calls {
                for errno in [EIO, ENOSPC] {
                    let f =
                        s.expect_failure(fault(op, skip, 1, FaultKind::Errno(errno)), &o, errno);
                    cases += 1;
                    assert_eq!(f.op, op);
                    assert!(s.is_temp(&f.path), "{op:?}: path {}", f.path.display());
                    let off = f.offset.expect("write failures have an offset");
                    match op {
                        Op::WriteStream => {
                            let expected = [
                                0,
                                b0.record_offset,
                                b1.record_offset,
                                info.device_stream_start,
                            ];
                            assert_eq!(off, expected[skip as usize], "{op:?} #{skip}");
                        }
                        Op::WriteBitmap => {
                            assert_eq!(off, [b0.bitmap_offset, b1.bitmap_offset][skip as usize]);
                        }
                        Op::WriteChecksums => {
                            let last = [integ.anchor_offset, integ.footer_offset];
                            let (ext, _) = integ.extension.expect("our files have an extension");
                            if skip == 0 {
                                // The extension first, where the device state ends.
                                assert_eq!(off, ext);
                            } else if skip + 2 >= calls {
                                assert_eq!(off, last[(skip + 2 - calls) as usize]);
                            } else {
                                assert!(
                                    off >= integ.record.table_offset && off < integ.footer_offset
                                );
                            }
                        }
                        _ => {
                            let inside = [b0, b1].iter().any(|l| {
                                off >= l.pages_offset
                                    && off < l.pages_end()
                                    && (off - l.pages_offset) % PS == 0
                            });
                            assert!(
                                inside,
                                "page write offset {off:#x} outside the page regions"
                            );
                        }
                    }
                }
            }
        }
        // Preallocation (O_DIRECT only): each block's fallocate, then the hole punched for the
        // long zero run, with EIO and ENOSPC at every call.
        let allocs = count_calls(&s, Op::Allocate, &o);
        let punches = count_calls(&s, Op::Punch, &o);
        if direct == DirectIo::On {
            assert_eq!(
                (allocs, punches),
                (2, 1),
                "two fallocates and one hole punch"
            );
            let expected = [
                (Op::Allocate, 0, b0.pages_offset),
                (Op::Allocate, 1, b1.pages_offset),
                (Op::Punch, 0, b0.pages_offset + s.b.zero_run_start() * PS),
            ];
            for (op, skip, offset) in expected {
                for errno in [EIO, ENOSPC] {
                    let f =
                        s.expect_failure(fault(op, skip, 1, FaultKind::Errno(errno)), &o, errno);
                    cases += 1;
                    assert_eq!(f.op, op);
                    assert!(s.is_temp(&f.path), "{}", f.path.display());
                    assert_eq!(f.offset, Some(offset), "{op:?} call {skip}");
                }
            }
            // A file system that cannot allocate: the save goes on without preallocation.
            s.expect_transparent(fault(Op::Allocate, 0, 1, FaultKind::Errno(EOPNOTSUPP)), &o);
            cases += 1;
        } else {
            assert_eq!(
                (allocs, punches),
                (0, 0),
                "no preallocation for buffered writes"
            );
        }
        // fdatasync, truncate, rename.
        let f = s.expect_failure(fault(Op::Sync, 0, 1, FaultKind::Errno(EIO)), &o, EIO);
        assert_eq!((f.op, f.offset), (Op::Sync, None));
        assert!(s.is_temp(&f.path));
        // The file is sized to the end of the page regions when it is created, and to its
        // full size when it is finished.
        for (skip, size) in [(0, info.device_stream_start), (1, info.file_size)] {
            let f = s.expect_failure(
                fault(Op::Truncate, skip, 1, FaultKind::Errno(ENOSPC)),
                &o,
                ENOSPC,
            );
            assert_eq!((f.op, f.offset), (Op::Truncate, Some(size)));
        }
        let f = s.expect_failure(fault(Op::Rename, 0, 1, FaultKind::Errno(EIO)), &o, EIO);
        assert_eq!(
            (f.op, f.path.as_path(), f.offset),
            (Op::Rename, s.target.as_path(), None)
        );
        // Opening the temporary file, and the channel descriptors.
        let f = s.expect_failure(fault(Op::Open, 0, 1, FaultKind::Errno(EIO)), &o, EIO);
        assert_eq!((f.op, f.offset), (Op::Open, None));
        assert!(s.is_temp(&f.path));
        let channel_op = if direct == DirectIo::On {
            Op::OpenDirect
        } else {
            Op::Open
        };
        let skip = if direct == DirectIo::On { 0 } else { 1 };
        let f = s.expect_failure(fault(channel_op, skip, 1, FaultKind::Errno(EIO)), &o, EIO);
        assert_eq!(f.op, channel_op);
        // EAGAIN that does not go away: bounded retries, then a clear failure.
        let t = Instant::now();
        let f = s.expect_failure(
            fault(Op::WritePages, 0, u64::MAX, FaultKind::Errno(EAGAIN)),
            &o,
            EAGAIN,
        );
        assert_eq!(f.op, Op::WritePages);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "EAGAIN retried too long"
        );
        let f = s.expect_failure(
            fault(Op::Sync, 0, u64::MAX, FaultKind::Errno(EAGAIN)),
            &o,
            EAGAIN,
        );
        assert_eq!(f.op, Op::Sync);
        cases += 9;
    }
    // O_DIRECT refused (EINVAL): `on` is a clear error, `auto` falls back to buffered I/O.
    for (op, skip) in [(Op::OpenDirect, 0), (Op::WritePages, 0)] {
        let err = s
            .save_with(
                fault(op, skip, 1, FaultKind::Errno(EINVAL)),
                &opts(DirectIo::On, 2),
            )
            .unwrap_err();
        assert!(
            matches!(err, SaveError::DirectIoRefused { .. }),
            "{op:?}: {err:?}"
        );
        assert!(err.to_string().contains("O_DIRECT"), "{err}");
        s.assert_intact("O_DIRECT refused");
        let report = s
            .save_with(
                fault(op, skip, 1, FaultKind::Errno(EINVAL)),
                &opts(DirectIo::Auto, 2),
            )
            .unwrap();
        assert!(!report.direct_io && report.direct_io_fallback.is_some());
        std::fs::write(&s.target, &s.previous).unwrap();
        cases += 2;
    }
    // EINVAL from O_DIRECT on a later page write (not the probe): an I/O failure naming it.
    let f = s.expect_failure(
        fault(Op::WritePages, 3, 1, FaultKind::Errno(EINVAL)),
        &opts(DirectIo::On, 2),
        EINVAL,
    );
    assert_eq!(f.op, Op::WritePages);
    cases += 1;
    eprintln!("save fault cases: {cases}");
}

#[test]
fn sync_dir_failure_after_rename_leaves_the_complete_new_snapshot() {
    let _g = fault::serial();
    let s = Scene::new("syncdir");
    let err = s
        .save_with(
            fault(Op::SyncDir, 0, 1, FaultKind::Errno(EIO)),
            &opts(DirectIo::Auto, 2),
        )
        .unwrap_err();
    let f = io_failure(&err);
    assert_eq!((f.op, f.path.as_path()), (Op::SyncDir, s.dir.as_path()));
    // The rename happened: the target is the new snapshot, complete and synced; only the
    // durability of the directory entry is in doubt.
    let v = verify(&s.target, 0, &s.b.regions()).unwrap();
    assert!(v.ok() && v.pages_checksummed.unwrap() > 0);
    assert_eq!(temporaries(&s.dir), Vec::<PathBuf>::new());
}

#[test]
fn short_transfers_eintr_and_transient_eagain_are_retried() {
    let _g = fault::serial();
    let s = Scene::new("retry");
    let mut cases = 0;
    for direct in [DirectIo::Off, DirectIo::On] {
        let o = opts(direct, 3);
        // O_DIRECT transfers stay block-aligned when they come up short.
        let short = if direct == DirectIo::On {
            3 * PS as usize
        } else {
            1001
        };
        for op in [
            Op::WritePages,
            Op::WriteStream,
            Op::WriteBitmap,
            Op::WriteChecksums,
        ] {
            let small = if op == Op::WritePages { short } else { 7 };
            for kind in [
                FaultKind::Short(small),
                FaultKind::Interrupt,
                FaultKind::Errno(EINTR),
            ] {
                s.expect_transparent(fault(op, 0, 1000, kind), &o);
                cases += 1;
            }
            s.expect_transparent(fault(op, 0, 3, FaultKind::Errno(EAGAIN)), &o);
            cases += 1;
        }
        for op in [Op::Sync, Op::Truncate, Op::Rename, Op::Open, Op::SyncDir] {
            s.expect_transparent(fault(op, 0, 2, FaultKind::Interrupt), &o);
            s.expect_transparent(fault(op, 0, 2, FaultKind::Errno(EAGAIN)), &o);
            cases += 2;
        }
    }
    // Restore: short reads, EINTR and transient EAGAIN on page data and the stream.
    for direct in [DirectIo::Off, DirectIo::On] {
        for (op, kind) in [
            (
                Op::ReadPages,
                FaultKind::Short(if direct == DirectIo::On {
                    2 * PS as usize
                } else {
                    999
                }),
            ),
            (Op::ReadPages, FaultKind::Interrupt),
            (Op::ReadPages, FaultKind::Errno(EAGAIN)),
            (Op::ReadStream, FaultKind::Short(3)),
            (Op::ReadStream, FaultKind::Interrupt),
            (Op::ReadStream, FaultKind::Errno(EAGAIN)),
            (Op::Open, FaultKind::Interrupt),
            (Op::Stat, FaultKind::Errno(EAGAIN)),
        ] {
            let count = if matches!(kind, FaultKind::Errno(EAGAIN)) {
                4
            } else {
                1000
            };
            let mut ram = vec![0x55u8; s.a.ram.len()];
            let mut bios = vec![0x55u8; s.a.bios.len()];
            fault::clear();
            fault::inject(fault(op, 0, count, kind));
            let r = restore(
                &s.target,
                &mut regions(&mut ram, &mut bios),
                &RestoreOptions {
                    channels: 2,
                    direct_io: direct,
                    verify_checksums: true,
                    ..RestoreOptions::default()
                },
                None,
            );
            assert!(fault::fired(op) > 0, "{op:?} {kind:?} never fired");
            fault::clear();
            let report = r.unwrap_or_else(|e| panic!("restore with {op:?} {kind:?}: {e}"));
            assert!(report.checksums_verified);
            assert!(
                ram == s.a.ram && bios == s.a.bios,
                "{op:?} {kind:?}: restored memory differs"
            );
            cases += 1;
        }
    }
    eprintln!("transparent retry cases: {cases}");
}

fn regions<'a>(ram: &'a mut [u8], bios: &'a mut [u8]) -> [RestoreRegion<'a>; 2] {
    [
        RestoreRegion {
            name: "pc.ram",
            memory: ram,
            page_size: PS,
        },
        RestoreRegion {
            name: "pc.bios",
            memory: bios,
            page_size: PS,
        },
    ]
}

fn restore_io(e: &RestoreError) -> &IoFailure {
    match &e.kind {
        RestoreErrorKind::Io(f) | RestoreErrorKind::Format(FormatError::Io(f)) => f,
        other => panic!("expected an I/O failure, got {other:?}"),
    }
}

const FILL: u8 = 0xa5;

/// Restores with `fault` armed into destinations filled with [`FILL`]; checks the error and
/// that every block the error does not list as modified still holds the fill pattern.
fn failed_restore(target: &Path, f: Fault, o: &RestoreOptions) -> (RestoreError, [bool; 2]) {
    let mut ram = vec![FILL; 6 << 20];
    let mut bios = vec![FILL; 256 << 10];
    fault::clear();
    fault::inject(f);
    let r = restore(target, &mut regions(&mut ram, &mut bios), o, None);
    assert!(fault::fired(f.op) > 0, "{f:?} never fired");
    fault::clear();
    let err = r
        .err()
        .unwrap_or_else(|| panic!("{f:?}: restore succeeded"));
    let pristine = [
        ram.iter().all(|&b| b == FILL),
        bios.iter().all(|&b| b == FILL),
    ];
    match &err.memory {
        GuestMemoryState::Untouched => {
            assert_eq!(
                pristine,
                [true, true],
                "{f:?}: Untouched but memory was written"
            );
        }
        GuestMemoryState::Modified { blocks } => {
            assert!(!blocks.is_empty());
            for (i, name) in ["pc.ram", "pc.bios"].iter().enumerate() {
                if !blocks.iter().any(|b| b == name) {
                    assert!(pristine[i], "{f:?}: {name} written but not reported");
                }
            }
        }
    }
    (err, pristine)
}

#[test]
fn restore_faults_say_exactly_what_was_written() {
    let _g = fault::serial();
    let s = Scene::new("restore");
    let mut cases = 0;
    let mut page_cases = 0;
    for direct in [DirectIo::Off, DirectIo::On] {
        for verify_checksums in [false, true] {
            let o = RestoreOptions {
                channels: 1,
                direct_io: direct,
                verify_checksums,
                ..RestoreOptions::default()
            };
            // Count the stream reads of a clean restore; a failure at any of them comes before
            // the first page read: memory untouched.
            fault::clear();
            fault::inject(fault(Op::ReadStream, 0, 0, FaultKind::Errno(EIO)));
            let mut ram = vec![0u8; 6 << 20];
            let mut bios = vec![0u8; 256 << 10];
            restore(&s.target, &mut regions(&mut ram, &mut bios), &o, None).unwrap();
            let stream_reads = fault::seen(Op::ReadStream);
            fault::clear();
            assert!(stream_reads > 5);
            for skip in 0..stream_reads {
                let (err, _) = failed_restore(
                    &s.target,
                    fault(Op::ReadStream, skip, 1, FaultKind::Errno(EIO)),
                    &o,
                );
                assert_eq!(
                    err.memory,
                    GuestMemoryState::Untouched,
                    "ReadStream #{skip}"
                );
                let f = restore_io(&err);
                assert_eq!(
                    (f.op, f.path.as_path()),
                    (Op::ReadStream, s.target.as_path())
                );
                assert!(f.offset.is_some() || err.to_string().contains("read failed"));
                cases += 1;
            }
            for (op, errno) in [(Op::Open, EIO), (Op::Stat, EIO), (Op::Open, EAGAIN)] {
                let count = if errno == EAGAIN { u64::MAX } else { 1 };
                let (err, _) =
                    failed_restore(&s.target, fault(op, 0, count, FaultKind::Errno(errno)), &o);
                assert_eq!(err.memory, GuestMemoryState::Untouched);
                let f = restore_io(&err);
                assert_eq!((f.op, f.errno()), (op, Some(errno)));
                cases += 1;
            }
            if direct == DirectIo::On {
                let (err, _) = failed_restore(
                    &s.target,
                    fault(Op::OpenDirect, 0, 1, FaultKind::Errno(EIO)),
                    &o,
                );
                assert_eq!(err.memory, GuestMemoryState::Untouched);
                assert_eq!(restore_io(&err).op, Op::OpenDirect);
                let (err, _) = failed_restore(
                    &s.target,
                    fault(Op::OpenDirect, 0, 1, FaultKind::Errno(EINVAL)),
                    &o,
                );
                assert!(matches!(err.kind, RestoreErrorKind::DirectIoRefused { .. }));
                assert_eq!(err.memory, GuestMemoryState::Untouched);
                cases += 2;
            }
            // Page reads: one channel reads block 0 first; a failure at the first read touches
            // pc.ram only, a failure at the last read has touched both blocks.
            fault::clear();
            fault::inject(fault(Op::ReadPages, 0, 0, FaultKind::Errno(EIO)));
            let mut ram = vec![0u8; 6 << 20];
            let mut bios = vec![0u8; 256 << 10];
            restore(&s.target, &mut regions(&mut ram, &mut bios), &o, None).unwrap();
            let page_reads = fault::seen(Op::ReadPages);
            fault::clear();
            let probe = u64::from(direct == DirectIo::On);
            for skip in 0..page_reads {
                for errno in [EIO, EINVAL] {
                    let (err, pristine) = failed_restore(
                        &s.target,
                        fault(Op::ReadPages, skip, 1, FaultKind::Errno(errno)),
                        &o,
                    );
                    if skip < probe && errno == EINVAL {
                        // EINVAL on the O_DIRECT probe read: direct I/O refused.
                        assert!(matches!(err.kind, RestoreErrorKind::DirectIoRefused { .. }));
                        assert_eq!(err.memory, GuestMemoryState::Untouched);
                        page_cases += 1;
                        continue;
                    }
                    let f = restore_io(&err);
                    assert_eq!((f.op, f.errno()), (Op::ReadPages, Some(errno)));
                    let off = f.offset.expect("page reads have an offset");
                    let l0 = s.info.blocks[0].layout;
                    if skip < probe {
                        // The O_DIRECT probe read, before any page is read into memory.
                        assert_eq!(err.memory, GuestMemoryState::Untouched);
                    } else if skip == probe {
                        assert_eq!(
                            err.memory,
                            GuestMemoryState::Modified {
                                blocks: vec!["pc.ram".into()]
                            }
                        );
                        assert!(pristine[1]);
                        assert!(
                            off >= l0.pages_offset && off < l0.pages_offset + (1 << 20),
                            "{off:#x}"
                        );
                    } else if skip + 1 == page_reads {
                        assert_eq!(
                            err.memory,
                            GuestMemoryState::Modified {
                                blocks: vec!["pc.ram".into(), "pc.bios".into()]
                            }
                        );
                    }
                    page_cases += 1;
                }
            }
        }
    }
    // A page that fails its checksum on restore: Modified, named with block, page and offset.
    let mut bad = s.previous.clone();
    let l = s.info.blocks[1].layout;
    let page = s.info.blocks[1].bitmap_ref().find_next(3, true).unwrap();
    bad[(l.pages_offset + page * PS + 100) as usize] ^= 0x10;
    let damaged = s.dir.join("damaged.mr");
    std::fs::write(&damaged, &bad).unwrap();
    let mut ram = vec![FILL; 6 << 20];
    let mut bios = vec![FILL; 256 << 10];
    let err = restore(
        &damaged,
        &mut regions(&mut ram, &mut bios),
        &RestoreOptions {
            channels: 1,
            verify_checksums: true,
            ..RestoreOptions::default()
        },
        None,
    )
    .unwrap_err();
    match &err.kind {
        RestoreErrorKind::Checksum {
            block,
            page: p,
            file_offset,
            ..
        } => {
            assert_eq!((block.as_str(), *p), ("pc.bios", page));
            assert_eq!(*file_offset, l.pages_offset + page * PS);
        }
        other => panic!("expected a checksum failure, got {other:?}"),
    }
    assert!(
        matches!(&err.memory, GuestMemoryState::Modified { blocks } if blocks.iter().any(|b| b == "pc.bios"))
    );
    cases += 1;
    eprintln!(
        "restore fault cases: {} ({page_cases} at page reads)",
        cases + page_cases
    );
}

#[test]
fn inspect_and_verify_report_read_faults() {
    let _g = fault::serial();
    let s = Scene::new("inspect");
    for op in [Op::Open, Op::Stat, Op::ReadStream] {
        for errno in [EIO, EINVAL] {
            fault::clear();
            fault::inject(fault(op, 0, 1, FaultKind::Errno(errno)));
            let e = inspect(&s.target, 0).unwrap_err();
            fault::clear();
            let msg = e.to_string();
            assert!(msg.contains(&s.target.display().to_string()), "{msg}");
            match e {
                FormatError::Io(f) => {
                    assert_eq!((f.op, f.errno()), (op, Some(errno)));
                    if op == Op::ReadStream {
                        assert_eq!(f.offset, Some(0), "{msg}");
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let mut cases = 6;
    // Every stream read of verify (structure, metadata checksum, checksum table), and its
    // page reads.
    for op in [Op::ReadStream, Op::ReadPages] {
        fault::inject(fault(op, 0, 0, FaultKind::Errno(EIO)));
        assert!(verify(&s.target, 0, &s.a.regions()).unwrap().ok());
        let calls = fault::seen(op);
        fault::clear();
        for skip in 0..calls {
            fault::inject(fault(op, skip, 1, FaultKind::Errno(EIO)));
            let e = verify(&s.target, 0, &s.a.regions()).unwrap_err();
            fault::clear();
            let msg = e.to_string();
            assert!(
                msg.contains("Input/output error") && msg.contains(" at offset 0x"),
                "{msg}"
            );
            assert!(msg.contains(&s.target.display().to_string()), "{msg}");
            cases += 1;
        }
    }
    eprintln!("inspect/verify read fault cases: {cases}");
}

// ------------------------------------------------------------------------------------------
// Real faults: a file system that fills up, a read-only directory
// ------------------------------------------------------------------------------------------

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn tmpfs(name: &str, size: &str) -> Option<Mount> {
        let dir = disk_dir(name);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Mount { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                mapped_ram_tests::support::cannot_run(
                    "tmpfs",
                    &format!("cannot mount a tmpfs ({}); run as root", why.trim()),
                );
                None
            }
        }
    }

    fn remount(&self, how: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{how}")])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "remount {how}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn real_enospc_on_a_full_file_system_keeps_the_previous_snapshot() {
    let _g = fault::serial();
    let Some(m) = Mount::tmpfs("enospc", "6m") else {
        return;
    };
    let target = m.dir.join("vm.mr");
    let small = pattern_image(2 << 20, 7, 0.0, false);
    let r = [SaveRegion {
        name: "pc.ram",
        memory: &small,
        page_size: PS,
    }];
    save(&target, &r, &SaveOptions::default(), None).unwrap();
    let previous = std::fs::read(&target).unwrap();
    let mut cases = 0;
    for (size, channels) in [(4u64 << 20, 1usize), (5 << 20, 4), (8 << 20, 2)] {
        let big = pattern_image(size as usize, 8, 0.0, false);
        let copy = big.clone();
        let r = [SaveRegion {
            name: "pc.ram",
            memory: &big,
            page_size: PS,
        }];
        let err = save(&target, &r, &opts(DirectIo::Auto, channels), None).unwrap_err();
        let f = io_failure(&err);
        assert_eq!(f.errno(), Some(ENOSPC), "{err}");
        assert!(
            matches!(
                f.op,
                Op::WritePages
                    | Op::WriteStream
                    | Op::WriteBitmap
                    | Op::WriteChecksums
                    | Op::Truncate
            ),
            "{err}"
        );
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert!(
            std::fs::read(&target).unwrap() == previous,
            "previous snapshot changed"
        );
        assert_eq!(temporaries(&m.dir), Vec::<PathBuf>::new());
        assert!(big == copy);
        eprintln!("ENOSPC case {size:#x}: {err}");
        cases += 1;
    }
    // The previous snapshot still restores byte-identical, and a save that fits succeeds.
    let mut back = vec![0u8; 2 << 20];
    restore(
        &target,
        &mut [RestoreRegion {
            name: "pc.ram",
            memory: &mut back,
            page_size: PS,
        }],
        &RestoreOptions::default(),
        None,
    )
    .unwrap();
    assert!(back == small);
    // The CLI says the same in one line and exits 1.
    if let Some(bin) = cli_binary() {
        let ram = disk_dir("enospc-ram").join("big.ram");
        std::fs::write(&ram, pattern_image(5 << 20, 9, 0.0, false)).unwrap();
        let out = Command::new(bin)
            .args(["save", "--ram"])
            .arg(format!("pc.ram={}", ram.display()))
            .arg("-o")
            .arg(&target)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with("error: ") && err.contains("No space left on device"),
            "{err}"
        );
        assert!(std::fs::read(&target).unwrap() == previous);
        assert_eq!(temporaries(&m.dir), Vec::<PathBuf>::new());
        cases += 1;
    }
    eprintln!("real ENOSPC cases: {cases}");
}

#[test]
fn read_only_directory_is_a_clear_error() {
    let _g = fault::serial();
    let Some(m) = Mount::tmpfs("rofs", "16m") else {
        return;
    };
    let target = m.dir.join("vm.mr");
    let g = Guest::new(3);
    save(&target, &g.regions(), &SaveOptions::default(), None).unwrap();
    let previous = std::fs::read(&target).unwrap();
    m.remount("ro");
    let g2 = Guest::new(4);
    let err = save(&target, &g2.regions(), &SaveOptions::default(), None).unwrap_err();
    let f = io_failure(&err);
    assert_eq!((f.op, f.errno()), (Op::Open, Some(EROFS)), "{err}");
    assert!(err.to_string().contains("Read-only file system"), "{err}");
    assert!(std::fs::read(&target).unwrap() == previous);
    // Restore and verify from a read-only directory work.
    let v = verify(&target, 0, &g.regions()).unwrap();
    assert!(v.ok());
    if let Some(bin) = cli_binary() {
        let ram = disk_dir("rofs-ram").join("pc.ram");
        std::fs::write(&ram, &g2.ram).unwrap();
        let out = Command::new(bin)
            .args(["save", "--ram"])
            .arg(format!("pc.ram={}", ram.display()))
            .arg("-o")
            .arg(&target)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("Read-only file system") && err.contains("open"),
            "{err}"
        );
    }
    m.remount("rw");
    assert_eq!(temporaries(&m.dir), Vec::<PathBuf>::new());
}

// ------------------------------------------------------------------------------------------
// kill -9 of `mapped-ram save` at random moments
// ------------------------------------------------------------------------------------------

/// The `mapped-ram` binary next to the test executable (`target/<profile>/mapped-ram`).

#[test]
fn kill_9_during_cli_saves_never_loses_the_snapshot() {
    let _g = fault::serial();
    let Some(bin) = cli_binary() else {
        mapped_ram_tests::support::cannot_run(
            "kill_9",
            "the mapped-ram binary is missing next to the test executable (cargo build -p mapped-ram-linux)",
        );
        return;
    };
    let iterations: usize = std::env::var("KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let size = 64usize << 20;
    let dir = disk_dir("kill9");
    let images = [
        pattern_image(size, 11, 0.2, false),
        pattern_image(size, 12, 0.2, true),
    ];
    let ram_files: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.join(format!("ram{i}"));
            std::fs::write(&p, &images[i]).unwrap();
            p
        })
        .collect();
    let work = dir.join("snap");
    std::fs::create_dir_all(&work).unwrap();
    let target = work.join("vm.mr");
    let cli_save = |i: usize, fsync: bool| {
        let mut c = Command::new(&bin);
        c.args(["save", "--channels", "2", "--ram"])
            .arg(format!("pc.ram={}", ram_files[i].display()))
            .arg("-o")
            .arg(&target)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !fsync {
            c.arg("--no-fsync");
        }
        c
    };
    let region = |i: usize| {
        [SaveRegion {
            name: "pc.ram",
            memory: &images[i],
            page_size: PS,
        }]
    };
    // The first snapshot, and the time a full save takes (median of 3, without and with
    // fsync), from spawn to exit.
    let mut full = [Duration::ZERO; 2];
    for (k, fsync) in [(0usize, false), (1, true)] {
        let mut t3: Vec<Duration> = (0..3)
            .map(|_| {
                let t = Instant::now();
                assert!(cli_save(0, fsync).status().unwrap().success());
                t.elapsed()
            })
            .collect();
        t3.sort();
        full[k] = t3[1];
    }
    let mut current = 0usize;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut old_kept, mut new_landed, mut completed, mut stale_seen) = (0, 0, 0, 0);
    for it in 0..iterations {
        let fsync = it % 2 == 1;
        let other = 1 - current;
        // From 0 to a little past a full save, so that some saves finish or get killed
        // between their rename and their exit.
        let span = full[usize::from(fsync)].as_micros() as u64 * 5 / 4;
        let delay = Duration::from_micros(rng.next_u64() % (span + 1));
        let mut child = cli_save(other, fsync).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        // Whatever is at the target is a complete snapshot of one of the two images.
        let report = verify(&target, 0, &region(other)).unwrap_or_else(|e| {
            panic!("iteration {it} (delay {delay:?}, fsync {fsync}): target unreadable: {e}")
        });
        assert!(
            report.corrupt.is_empty(),
            "iteration {it}: checksum failure {:?}",
            report.corrupt
        );
        if report.ok() {
            current = other;
            if status.success() {
                completed += 1;
            } else {
                new_landed += 1;
            }
        } else {
            let r = verify(&target, 0, &region(current)).unwrap();
            assert!(
                r.ok(),
                "iteration {it} (delay {delay:?}): the target is neither the old nor the new image"
            );
            old_kept += 1;
        }
        // Stray temporaries of the killed process: the next save removes and reports them.
        let stale: BTreeSet<PathBuf> = temporaries(&work).into_iter().collect();
        if !stale.is_empty() {
            stale_seen += stale.len();
            let again = save(&target, &region(current), &SaveOptions::default(), None).unwrap();
            let removed: BTreeSet<PathBuf> = again.stale_temporaries_removed.into_iter().collect();
            assert_eq!(
                removed, stale,
                "iteration {it}: stale temporaries not reported"
            );
            assert_eq!(temporaries(&work), Vec::<PathBuf>::new());
        }
    }
    // The last snapshot restores byte-identical through the library.
    let mut back = vec![0u8; size];
    restore(
        &target,
        &mut [RestoreRegion {
            name: "pc.ram",
            memory: &mut back,
            page_size: PS,
        }],
        &RestoreOptions {
            verify_checksums: true,
            ..RestoreOptions::default()
        },
        None,
    )
    .unwrap();
    assert!(back == images[current]);
    eprintln!(
        "kill -9: {iterations} saves killed at random moments (full save {:?} / {:?} with fsync): previous kept {old_kept}, new landed before the kill {new_landed}, finished {completed}; {stale_seen} stale temporaries removed and reported by the next save",
        full[0], full[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Preallocation (`SaveOptions::preallocate`, on by default with `O_DIRECT`) leaves the long
/// zero run a hole, takes no more disk space than a save without it beyond the short zero
/// runs it keeps allocated, and gives byte-identical files.
#[test]
fn preallocation_keeps_long_zero_runs_as_holes() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let _g = fault::serial();
    let dir = disk_dir("prealloc");
    let guest = Guest::new(7);
    let mut files = Vec::new();
    for preallocate in [true, false] {
        let path = dir.join(format!("prealloc-{preallocate}.mr"));
        let o = SaveOptions {
            preallocate,
            ..opts(DirectIo::On, 2)
        };
        fault::clear();
        fault::inject(fault(Op::Allocate, 0, 0, FaultKind::Errno(EIO)));
        fault::inject(fault(Op::Punch, 0, 0, FaultKind::Errno(EIO)));
        let report = save(&path, &guest.regions(), &o, None).unwrap();
        let calls = (fault::seen(Op::Allocate), fault::seen(Op::Punch));
        fault::clear();
        assert!(report.direct_io);
        assert_eq!(
            calls,
            if preallocate { (2, 1) } else { (0, 0) },
            "fallocate calls"
        );
        let info = inspect(&path, 0).unwrap();
        let ram = &info.blocks[0].layout;
        let hole_start = ram.pages_offset + ZERO_RUN.start as u64 * PS;
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: plain lseek(2) on a descriptor we own.
        let next_data = unsafe { libc::lseek(f.as_raw_fd(), hole_start as i64, libc::SEEK_DATA) };
        assert!(
            next_data as u64 >= ram.pages_offset + ZERO_RUN.end as u64 * PS,
            "preallocate {preallocate}: data at {next_data:#x} inside the zero run"
        );
        let v = verify(&path, 0, &guest.regions()).unwrap();
        assert!(v.ok(), "{:?} {:?}", v.mismatches, v.corrupt);
        let bytes = std::fs::metadata(&path).unwrap().blocks() * 512;
        files.push((std::fs::read(&path).unwrap(), bytes));
        std::fs::remove_file(&path).unwrap();
    }
    assert!(files[0].0 == files[1].0, "same bytes with and without");
    let (with, without) = (files[0].1, files[1].1);
    // Short zero runs at chunk edges may stay allocated: at most 15 pages on each side of each
    // 1 MiB chunk.
    let chunks = (guest.ram.len() + guest.bios.len()).div_ceil(1 << 20) as u64;
    assert!(
        with >= without && with - without <= chunks * 2 * 15 * PS,
        "allocated {with} bytes with preallocation, {without} without"
    );
    eprintln!("allocated: {with} bytes with preallocation, {without} without");
}

/// The calls of an update's copy (reflink clone, `SEEK_DATA`/`SEEK_HOLE`, `copy_file_range`)
/// and of a lazy restore's hole scan go through the fault seam: a failure at every one of them
/// is an error naming the operation, the file and the offset, and the snapshot is untouched;
/// `copy_file_range` refused by the file system falls back to reads and writes.
#[test]
fn update_copy_and_lazy_scan_faults_name_the_call() {
    use mapped_ram_linux::{
        restore_lazy, update, Changes, CopyMode, GuestMemory, LazyOptions, LiveRegion, UpdateError,
        UpdateOptions,
    };
    const EXDEV: i32 = 18;
    let _g = fault::serial();
    let dir = disk_dir("copy-ops");
    let target = dir.join("snap.mr");
    let guest = Guest::new(41);
    let o = opts(DirectIo::Auto, 2);
    save(&target, &guest.regions(), &o, None).unwrap();
    let before = std::fs::read(&target).unwrap();
    let mut changed = guest.ram.clone();
    changed[0] ^= 0xff;
    let regions = [
        LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&changed),
            page_size: PS,
        },
        LiveRegion {
            name: "pc.bios",
            memory: GuestMemory::from_slice(&guest.bios),
            page_size: PS,
        },
    ];
    let run = |copy: CopyMode| {
        let opts = UpdateOptions {
            save: o.clone(),
            copy,
            ..UpdateOptions::default()
        };
        update(&target, &regions, Changes::Compare, &opts)
    };
    let mut cases = 0;
    for (op, skip, errno, copy) in [
        (Op::Clone, 0, EIO, CopyMode::Reflink),
        (Op::Seek, 0, EIO, CopyMode::Full),
        (Op::Seek, 1, EIO, CopyMode::Full),
        (Op::CopyRange, 0, EIO, CopyMode::Full),
        (Op::CopyRange, 0, ENOSPC, CopyMode::Full),
    ] {
        fault::clear();
        fault::inject(fault(op, skip, 1, FaultKind::Errno(errno)));
        let err = run(copy).expect_err("an injected fault fails the update");
        let fired = fault::fired(op);
        fault::clear();
        assert_eq!(fired, 1, "{op:?} #{skip} was reached");
        match (&err, op) {
            (UpdateError::NoReflink { source, .. }, Op::Clone) => {
                assert_eq!(source.raw_os_error(), Some(errno))
            }
            (UpdateError::Save(SaveError::Io(f)), _) => {
                assert_eq!(f.op, op, "{err}");
                assert_eq!(f.errno(), Some(errno), "{err}");
                assert!(f.offset.is_some(), "{err}");
            }
            _ => panic!("{op:?}: unexpected error {err}"),
        }
        assert_eq!(
            std::fs::read(&target).unwrap(),
            before,
            "{op:?}: snapshot untouched"
        );
        assert!(temporaries(&dir).is_empty(), "{op:?}: temporary removed");
        cases += 1;
    }
    // copy_file_range refused (another file system): the copy falls back, and succeeds.
    fault::inject(fault(Op::CopyRange, 0, 1, FaultKind::Errno(EXDEV)));
    let report = run(CopyMode::Full).unwrap();
    assert_eq!(fault::fired(Op::CopyRange), 1);
    fault::clear();
    assert!(report.copy_bytes > 0);
    let v = verify(&target, 0, &[]).unwrap();
    assert!(v.ok());
    cases += 1;
    // Our file carries the clean-zero flag: the lazy restore does not scan it at all.
    fault::inject(fault(Op::Seek, 0, 1, FaultKind::Errno(EIO)));
    let lazy = restore_lazy(&target, &["pc.ram"], &LazyOptions::default()).unwrap();
    assert_eq!(
        fault::fired(Op::Seek),
        0,
        "no SEEK_DATA scan of a clean file"
    );
    assert_eq!(lazy.report.zero_pages_clean, lazy.report.zero_pages);
    drop(lazy);
    fault::clear();
    // The lazy restore's SEEK_DATA scan, on a file without the flag (no integrity records).
    let plain = dir.join("plain.mr");
    save(
        &plain,
        &[SaveRegion {
            name: "pc.ram",
            memory: &guest.ram,
            page_size: PS,
        }],
        &SaveOptions {
            checksums: false,
            ..o.clone()
        },
        None,
    )
    .unwrap();
    let snap = std::fs::read(&plain).unwrap();
    fault::inject(fault(Op::Seek, 0, 1, FaultKind::Errno(EIO)));
    let err = restore_lazy(&plain, &["pc.ram"], &LazyOptions::default()).unwrap_err();
    fault::clear();
    let RestoreErrorKind::Io(f) = &err.kind else {
        panic!("{err}")
    };
    assert_eq!((f.op, f.errno()), (Op::Seek, Some(EIO)), "{err}");
    assert_eq!(std::fs::read(&plain).unwrap(), snap);
    std::fs::remove_file(&plain).unwrap();
    cases += 1;
    eprintln!("update copy and lazy scan faults: {cases} cases");
}
