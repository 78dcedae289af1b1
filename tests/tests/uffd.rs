//! userfaultfd restore: memory served on fault and by the background prefetch is byte-identical
//! to the saved guest (stale bytes under clear bits read as zero), the snapshot can be deleted
//! after the prefetch, a failed page read reaches the VMM as an error (and the faulting access
//! gets `EFAULT`, not zeros), and dropping the memory stops the handler.
//!
//! Every test holds [`fault::serial`] (faults are process-wide).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mapped_ram_linux::fault::{self, Fault, FaultKind};
use mapped_ram_linux::{
    inspect, restore_uffd, save, Op, RestoreErrorKind, SaveOptions, SaveRegion, UffdOptions,
    UffdRestore,
};
use mapped_ram_tests::image::pattern_image;
use mapped_ram_tests::support::cannot_run;

const PS: u64 = 4096;

fn disk_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves `ram` (one block `pc.ram`) and writes junk under some clear bits (as QEMU can leave
/// stale bytes there); returns the pages forged.
fn save_with_stale(path: &Path, ram: &[u8]) -> usize {
    save(
        path,
        &[SaveRegion {
            name: "pc.ram",
            memory: ram,
            page_size: PS,
        }],
        &SaveOptions::default(),
        None,
    )
    .unwrap();
    let info = inspect(path, 0).unwrap();
    let b = &info.blocks[0];
    let bits = b.bitmap_ref();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut forged = 0;
    for p in (0..b.pages()).filter(|&p| !bits.test(p)).step_by(3) {
        f.write_all_at(&[0xA5; PS as usize], b.layout.page_offset(p).unwrap())
            .unwrap();
        forged += 1;
    }
    forged
}

fn slice(r: &UffdRestore) -> &[u8] {
    r.block("pc.ram").unwrap().as_slice()
}

fn uffd_available(test: &str) -> bool {
    let dir = disk_dir("uffd-probe");
    let path = dir.join("probe.mr");
    let ram = vec![1u8; 1 << 20];
    save(
        &path,
        &[SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: PS,
        }],
        &SaveOptions::default(),
        None,
    )
    .unwrap();
    match restore_uffd(&path, &[], &UffdOptions::default()) {
        Ok(_) => true,
        Err(e) => {
            cannot_run(test, &format!("userfaultfd unavailable: {e}"));
            false
        }
    }
}

#[test]
fn uffd_restore_is_byte_identical_on_faults_and_after_prefetch() {
    let _serial = fault::serial();
    if !uffd_available("uffd") {
        return;
    }
    let dir = disk_dir("uffd-ident");
    let ram = pattern_image(24 << 20, 71, 0.3, false);
    for prefetch_channels in [0usize, 2] {
        let path = dir.join(format!("g-{prefetch_channels}.mr"));
        let forged = save_with_stale(&path, &ram);
        assert!(forged > 100, "the image has clear pages: {forged}");
        let opts = UffdOptions {
            prefetch_channels,
            ..UffdOptions::default()
        };
        let mut r = restore_uffd(&path, &["pc.ram"], &opts).unwrap();
        if prefetch_channels > 0 {
            r.wait_prefetched().unwrap();
            assert!(r.stats().prefetch_done);
            // Memory is no longer tied to the file.
            std::fs::remove_file(&path).unwrap();
        } else {
            // Touch pages in a scattered order first (faults), then compare everything.
            let mem = slice(&r);
            let pages = mem.len() / PS as usize;
            for k in 0..pages {
                let p = (k * 7919) % pages;
                let at = p * PS as usize;
                assert_eq!(mem[at], ram[at], "page {p}");
            }
        }
        let mem = slice(&r);
        if let Some(p) = (0..mem.len() / PS as usize).find(|&p| {
            let s = p * PS as usize..(p + 1) * PS as usize;
            mem[s.clone()] != ram[s]
        }) {
            panic!("prefetch {prefetch_channels}: page {p} differs");
        }
        let s = r.stats();
        assert!(r.error().is_none());
        if prefetch_channels == 0 {
            assert!(s.faults > 0 && s.fault_pages > 0, "{s:?}");
            assert_eq!(s.prefetched_pages, 0, "{s:?}");
        } else {
            assert!(s.prefetched_pages > 0, "{s:?}");
        }
        let t = Instant::now();
        drop(r);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "drop stops the handler"
        );
    }
}

#[test]
fn uffd_read_fault_reaches_the_vmm_and_the_access_never_reads_zeros() {
    let _serial = fault::serial();
    if !uffd_available("uffd") {
        return;
    }
    let dir = disk_dir("uffd-fault");
    let path = dir.join("g.mr");
    let ram = vec![0x5Au8; 4 << 20];
    save(
        &path,
        &[SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: PS,
        }],
        &SaveOptions::default(),
        None,
    )
    .unwrap();
    let opts = UffdOptions {
        prefetch_channels: 0,
        ..UffdOptions::default()
    };
    let r = restore_uffd(&path, &[], &opts).unwrap();
    fault::inject(Fault {
        op: Op::ReadPages,
        skip: 0,
        count: u64::MAX,
        kind: FaultKind::Errno(5),
    });
    let b = r.block("pc.ram").unwrap();
    let (ptr, poison) = (b.as_ptr() as usize + 8 * PS as usize, r.poisons_on_error());
    if poison {
        // The kernel reads the page for write(2): a poisoned page is EFAULT there (SIGBUS for
        // a load by the guest), never zeros.
        let out = std::fs::File::create(dir.join("sink")).unwrap();
        use std::os::fd::AsRawFd;
        #[allow(unsafe_code)]
        // SAFETY: a valid mapping of the restore, alive for the call; the kernel reads it (and
        // gets EFAULT on a poisoned page).
        let n = unsafe { libc::write(out.as_raw_fd(), ptr as *const libc::c_void, PS as usize) };
        let e = std::io::Error::last_os_error();
        assert_eq!((n, e.raw_os_error()), (-1, Some(libc::EFAULT)), "{e}");
    } else {
        // Without UFFDIO_POISON the faulting thread stays blocked; only the error is checked.
        std::thread::spawn(move || {
            #[allow(unsafe_code)]
            // SAFETY: reads a live mapping of the restore (which is leaked below, never
            // unmapped); the thread blocks in the fault.
            unsafe {
                std::ptr::read_volatile(ptr as *const u8)
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        if let Some(e) = r.error() {
            break e;
        }
        assert!(Instant::now() < deadline, "no error reported");
        std::thread::sleep(Duration::from_millis(5));
    };
    fault::clear();
    match &err.kind {
        RestoreErrorKind::Io(f) => {
            assert_eq!((f.op, f.errno()), (Op::ReadPages, Some(5)), "{err}");
            assert!(f.offset.is_some(), "{err}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    if poison {
        let t = Instant::now();
        drop(r);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "drop stops the handler"
        );
    } else {
        cannot_run(
            "uffd_poison",
            "the kernel lacks UFFDIO_POISON: the faulting thread stays blocked",
        );
        std::mem::forget(r);
    }
}
