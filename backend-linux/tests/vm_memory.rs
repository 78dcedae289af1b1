//! The `vm-memory` integration: live saves of `GuestMemoryMmap` with `AtomicBitmap` dirty
//! tracking while another thread writes guest memory, KVM dirty logs ORed in, and restores
//! into fresh and lazily mapped guest memory.
#![cfg(feature = "vm-memory")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use mapped_ram_linux::vm_memory::{
    restore_guest_memory, restore_lazy_guest_memory, save_guest_memory, DirtyTracking, KvmLog,
    VmLiveSave,
};
use mapped_ram_linux::{LazyOptions, LiveOptions, RestoreOptions, SaveOptions};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const HIGH: GuestAddress = GuestAddress(1 << 32);

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn guest(low_mib: usize) -> GuestMemoryMmap<AtomicBitmap> {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), low_mib << 20), (HIGH, 1 << 20)]).unwrap();
    for page in 0..(low_mib as u64) << 8 {
        if page % 3 != 0 {
            mem.write_obj(page ^ 0xdead_beef, GuestAddress(page << 12))
                .unwrap();
        }
    }
    mem.write_slice(b"above 4 GiB", HIGH).unwrap();
    mem
}

/// All of a guest's memory, region by region.
fn contents<B: vm_memory::bitmap::Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<Vec<u8>> {
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).unwrap();
            v
        })
        .collect()
}

const NAMES: [&str; 2] = ["pc.ram", "high.ram"];
const LAYOUT: [(&str, GuestAddress); 2] = [("pc.ram", GuestAddress(0)), ("high.ram", HIGH)];

#[test]
fn live_save_with_a_writer_thread_restores_exactly() {
    let d = dir("vm-live");
    for iter in 0..10u64 {
        let mem = guest(8);
        let path = d.join(format!("vm-{iter}.mr"));
        let stop = AtomicBool::new(false);
        let opts = LiveOptions {
            save: SaveOptions {
                channels: 1 + (iter % 2) as usize,
                fsync: false,
                ..SaveOptions::default()
            },
            punch_holes: iter % 3 != 0,
        };
        let mut live =
            VmLiveSave::begin(&path, &mem, &NAMES, DirtyTracking::VmMemory, &opts).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = iter;
                while !stop.load(Ordering::Relaxed) {
                    i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let page = (i >> 33) % 2048;
                    if i % 5 == 0 {
                        // The page turns zero.
                        mem.write_slice(&[0u8; 4096], GuestAddress(page << 12))
                            .unwrap();
                    } else {
                        mem.write_obj(i, GuestAddress((page << 12) + (i >> 20) % 512 * 8))
                            .unwrap();
                    }
                    if i % 16 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(10));
                    }
                }
            });
            live.pass(&[]).unwrap();
            for _ in 0..3 {
                live.pass(&[]).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        let report = live.finish(&[], None).unwrap();
        assert_eq!(report.passes.len(), 5);
        let expected = contents(&mem);
        let (back, r) =
            restore_guest_memory::<()>(&path, &LAYOUT, &RestoreOptions::default()).unwrap();
        assert_eq!(r.blocks_restored.len(), 2);
        assert!(
            contents(&back) == expected,
            "iteration {iter}: copy restore"
        );
        let (lazy, lr) =
            restore_lazy_guest_memory::<AtomicBitmap>(&path, &LAYOUT, &LazyOptions::default())
                .unwrap();
        assert!(
            contents(&lazy) == expected,
            "iteration {iter}: lazy restore {lr:?}"
        );
        assert_eq!(lr.stale_pages_zeroed, 0);
        std::fs::remove_file(&path).unwrap();
    }
}

/// Writes that bypass `vm-memory` (a vCPU's) are only seen through the KVM log passed in.
#[test]
fn kvm_dirty_logs_are_ored_with_the_vm_memory_bitmaps() {
    let d = dir("vm-kvm");
    let mem = guest(4);
    let path = d.join("vm.mr");
    let opts = LiveOptions::default();
    let mut live =
        VmLiveSave::begin(&path, &mem, &NAMES, DirtyTracking::VmMemoryAndKvm, &opts).unwrap();
    let low0 = vec![0u64; 16];
    let high0 = vec![0u64; 4];
    let none = [
        KvmLog {
            address: GuestAddress(0),
            bitmap: &low0,
        },
        KvmLog {
            address: HIGH,
            bitmap: &high0,
        },
    ];
    live.pass(&none).unwrap();
    // A "vCPU" writes page 10 straight through the host mapping (vm-memory does not see it)
    // and KVM's log for the memory slot marks it.
    let host = mem.get_host_address(GuestAddress(10 << 12)).unwrap();
    // SAFETY: `host` points into the 4 MiB region mapped by `mem`, which lives for the whole
    // test; the live save reads guest memory with volatile loads only.
    unsafe { host.cast::<u64>().write_volatile(0x1234_5678) };
    let kvm_low = vec![1u64 << 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // The trap of the positional API: forgetting the KVM logs is an error, not a snapshot
    // with stale pages (the bitmaps fetched for the failed pass are lost, so the test marks
    // nothing else meanwhile).
    let err = live.pass(&[]).unwrap_err();
    assert!(
        err.to_string()
            .contains("no dirty log is given for block \"pc.ram\""),
        "{err}"
    );
    let err = live
        .pass(&[KvmLog {
            address: GuestAddress(0),
            bitmap: &kvm_low,
        }])
        .unwrap_err();
    assert!(err.to_string().contains("\"high.ram\""), "{err}");
    let logs = [
        KvmLog {
            address: HIGH,
            bitmap: &high0,
        },
        KvmLog {
            address: GuestAddress(0),
            bitmap: &kvm_low,
        },
    ];
    let p = live.pass(&logs).unwrap(); // in any order: keyed by guest address
    assert_eq!(p.pages_dirty, 1);
    let report = live.finish(&none, None).unwrap();
    assert_eq!(report.passes.last().unwrap().pages_dirty, 0);
    let (back, _) = restore_guest_memory::<()>(&path, &LAYOUT, &RestoreOptions::default()).unwrap();
    assert_eq!(
        back.read_obj::<u64>(GuestAddress(10 << 12)).unwrap(),
        0x1234_5678
    );
    assert!(contents(&back) == contents(&mem));
}

/// Logs are keyed by block: the logs of two blocks of the same size given the other way
/// round still mark the right pages (the positional API silently lost those writes).
#[test]
fn dirty_logs_are_keyed_by_block_not_position() {
    use mapped_ram_linux::{DirtyLog, GuestMemory, LiveRegion, LiveSave};
    let d = dir("vm-keyed");
    let path = d.join("two.mr");
    let a: Vec<std::sync::atomic::AtomicU64> = (0..512 * 64).map(|_| Default::default()).collect();
    let b: Vec<std::sync::atomic::AtomicU64> = (0..512 * 64).map(|_| Default::default()).collect();
    let regions = [
        LiveRegion {
            name: "a",
            memory: GuestMemory::from_atomic(&a),
            page_size: 4096,
        },
        LiveRegion {
            name: "b",
            memory: GuestMemory::from_atomic(&b),
            page_size: 4096,
        },
    ];
    let mut live = LiveSave::begin(&path, &regions, &LiveOptions::default()).unwrap();
    live.pass_all().unwrap();
    a[3 * 512].store(0xaaaa, Ordering::Relaxed); // page 3 of a
    b[7 * 512].store(0xbbbb, Ordering::Relaxed); // page 7 of b
    let (log_a, log_b) = ([1u64 << 3], [1u64 << 7]);
    let err = live.pass(&[DirtyLog::new("a", &log_a)]).unwrap_err();
    assert!(err.to_string().contains("\"b\""), "{err}");
    let err = live
        .pass(&[DirtyLog::new("a", &log_a), DirtyLog::new("a", &log_b)])
        .unwrap_err();
    assert!(err.to_string().contains("two dirty logs"), "{err}");
    let logs = [DirtyLog::new("b", &log_b), DirtyLog::new("a", &log_a)];
    let p = live.pass(&logs).unwrap();
    assert_eq!(p.pages_dirty, 2);
    let zero = [0u64];
    live.finish(
        &[DirtyLog::new("a", &zero), DirtyLog::new("b", &zero)],
        None,
    )
    .unwrap();
    let info = mapped_ram_linux::inspect(&path, 0).unwrap();
    let page = |block: usize, p: u64| {
        let bytes = std::fs::read(&path).unwrap();
        let at = (info.blocks[block].layout.pages_offset + p * 4096) as usize;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    };
    assert_eq!((page(0, 3), page(1, 7)), (0xaaaa, 0xbbbb));
}

#[test]
fn save_and_restore_a_paused_guest() {
    let d = dir("vm-save");
    let mem = guest(3);
    let path = d.join("vm.mr");
    let r = save_guest_memory(&path, &mem, &NAMES, &SaveOptions::default()).unwrap();
    assert_eq!(r.ram_bytes, (4 << 20) as u64);
    // The regions' guest addresses are recorded: an empty layout restores them there.
    let (same, _) = restore_guest_memory::<()>(&path, &[], &RestoreOptions::default()).unwrap();
    let addrs: Vec<u64> = same.iter().map(|r| r.start_addr().0).collect();
    assert_eq!(addrs, [0, HIGH.0]);
    assert!(contents(&same) == contents(&mem));
    let (back, _) = restore_guest_memory::<()>(&path, &LAYOUT, &RestoreOptions::default()).unwrap();
    assert!(contents(&back) == contents(&mem));
    // Only the block asked for.
    let (low, report) =
        restore_guest_memory::<()>(&path, &LAYOUT[..1], &RestoreOptions::default()).unwrap();
    assert_eq!(low.num_regions(), 1);
    assert_eq!(report.blocks_skipped, ["high.ram"]);
    // Names must match the regions.
    let err = save_guest_memory(&path, &mem, &["pc.ram"], &SaveOptions::default()).unwrap_err();
    assert!(err.to_string().contains("1 block names for 2"), "{err}");
    let err = restore_guest_memory::<()>(
        &path,
        &[("nope", GuestAddress(0))],
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("\"nope\" is not in the snapshot"),
        "{err}"
    );
}

/// Guest memory without `vm-memory` dirty bitmaps (`()`, as many VMMs use; Firecracker's
/// `Option<AtomicBitmap>` as `None` behaves the same): only KVM's logs can say what changed, so a save that
/// would rely on the bitmaps is refused, and one with KVM's logs works.
#[test]
fn guest_memory_without_bitmaps_saves_live_with_kvm_logs() {
    let d = dir("vm-nobitmap");
    let path = d.join("vm.mr");
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20), (HIGH, 1 << 20)]).unwrap();
    mem.write_obj(7u64, GuestAddress(0x3000)).unwrap();
    let opts = LiveOptions::default();
    let err = VmLiveSave::begin(&path, &mem, &NAMES, DirtyTracking::VmMemory, &opts).unwrap_err();
    assert!(
        err.to_string().contains("cannot tell what changed"),
        "{err}"
    );
    let mut live =
        VmLiveSave::begin(&path, &mem, &NAMES, DirtyTracking::VmMemoryAndKvm, &opts).unwrap();
    let logs = |low: &'static [u64]| {
        [
            KvmLog {
                address: GuestAddress(0),
                bitmap: low,
            },
            KvmLog {
                address: HIGH,
                bitmap: &[0; 4],
            },
        ]
    };
    live.pass(&logs(&[0; 4])).unwrap();
    mem.write_obj(9u64, GuestAddress(0x5000)).unwrap(); // the "vCPU" writes page 5
    static PAGE5: [u64; 4] = [1 << 5, 0, 0, 0];
    let p = live.pass(&logs(&PAGE5)).unwrap();
    assert_eq!(p.pages_dirty, 1);
    live.finish(&logs(&[0; 4]), None).unwrap();
    let (back, _) = restore_guest_memory::<()>(&path, &[], &RestoreOptions::default()).unwrap();
    assert!(contents(&back) == contents(&mem));
}

/// A restore into the VMM's own, existing guest memory (any bitmap type), with no `unsafe` in
/// the VMM: stale contents are overwritten, clear pages become zero, and the addresses the
/// snapshot recorded are used when no layout is given.
#[test]
fn restore_into_existing_guest_memory() {
    use mapped_ram_linux::vm_memory::restore_into_guest_memory;
    let d = dir("vm-into");
    let path = d.join("vm.mr");
    let mem = guest(4);
    save_guest_memory(&path, &mem, &NAMES, &SaveOptions::default()).unwrap();
    let target =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20), (HIGH, 1 << 20)]).unwrap();
    // Old contents everywhere, zero pages of the snapshot included.
    for page in 0..(4u64 << 8) {
        target
            .write_obj(0x5555_5555u64, GuestAddress(page << 12))
            .unwrap();
    }
    let r = restore_into_guest_memory(&path, &target, &[], &RestoreOptions::default()).unwrap();
    assert_eq!(r.blocks_restored.len(), 2);
    assert!(
        contents(&target) == contents(&mem),
        "identical, clear pages zeroed"
    );
    // An unknown block in the layout: an error, memory untouched by it.
    let err = restore_into_guest_memory(
        &path,
        &target,
        &[("nope", GuestAddress(0))],
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("\"nope\" is not in the snapshot"),
        "{err}"
    );
}
