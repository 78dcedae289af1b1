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
    UffdRestore, WorkingSet,
};
use mapped_ram_tests::image::pattern_image;
use mapped_ram_tests::support::{self, cannot_run, reserve_huge_pages};

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
    support::uffd_available(test, &disk_dir("uffd-probe"))
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

/// 2 MiB huge-page memory (a `MFD_HUGETLB` memfd, mapped shared), unmapped on drop.
struct Huge {
    ptr: *mut u8,
    len: usize,
}

impl Huge {
    fn new(len: usize) -> Self {
        #[allow(unsafe_code)]
        // SAFETY: a NUL-terminated name and valid memfd flags.
        let fd = unsafe {
            libc::memfd_create(
                c"test-huge".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            )
        };
        assert!(
            fd >= 0,
            "memfd_create(MFD_HUGETLB): {}",
            std::io::Error::last_os_error()
        );
        #[allow(unsafe_code)]
        // SAFETY: `fd` is open; ftruncate sets the memfd's size.
        let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        #[allow(unsafe_code)]
        // SAFETY: a fresh shared mapping of our memfd (no MAP_FIXED), unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        #[allow(unsafe_code)]
        // SAFETY: the mapping keeps the memfd; the fd is ours to close.
        unsafe {
            libc::close(fd)
        };
        Self { ptr: p.cast(), len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        #[allow(unsafe_code)]
        // SAFETY: the live mapping of `len` bytes, exclusively borrowed through `self`.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr, self.len)
        }
    }
}

impl Drop for Huge {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: the mapping this value made and owns.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len)
        };
    }
}

/// Save from and restore into 2 MiB huge-page memory: the copying restore and the
/// userfaultfd restore (a whole huge page per fault), byte-identical, stale bytes under clear
/// bits read as zero.
#[test]
fn huge_pages_save_copy_restore_and_uffd_restore() {
    let _serial = fault::serial();
    let size = 24usize << 20;
    if !uffd_available("uffd") {
        return;
    }
    let Some(_reserved) = reserve_huge_pages("huge_pages", 2 * 12 + 2) else {
        return;
    };
    let dir = disk_dir("uffd-huge");
    let image = pattern_image(size, 73, 0.3, false);
    let mut src = Huge::new(size);
    src.as_mut_slice().copy_from_slice(&image);
    // Save from huge-page memory, then forge stale bytes under clear bits.
    let path = dir.join("huge.mr");
    let forged = save_with_stale(&path, src.as_mut_slice());
    assert!(forged > 100);
    drop(src);
    // Copying restore into huge-page memory (which is not zero to start with).
    let mut dst = Huge::new(size);
    dst.as_mut_slice().fill(0xEE);
    mapped_ram_linux::restore(
        &path,
        &mut [mapped_ram_linux::RestoreRegion {
            name: "pc.ram",
            memory: dst.as_mut_slice(),
            page_size: PS,
        }],
        &mapped_ram_linux::RestoreOptions::default(),
        None,
    )
    .unwrap();
    assert!(
        dst.as_mut_slice() == &image[..],
        "copying restore into huge pages differs"
    );
    drop(dst);
    for prefetch_channels in [0usize, 2] {
        let opts = UffdOptions {
            prefetch_channels,
            huge_pages: true,
            ..UffdOptions::default()
        };
        let mut r = restore_uffd(&path, &[], &opts).unwrap();
        if prefetch_channels > 0 {
            r.wait_prefetched().unwrap();
        }
        let mem = slice(&r);
        assert!(
            mem == &image[..],
            "uffd huge restore (prefetch {prefetch_channels}) differs"
        );
        let s = r.stats();
        assert!(r.error().is_none());
        if prefetch_channels == 0 {
            assert_eq!(s.faults, 12, "one fault per huge page: {s:?}");
        }
        drop(r);
    }
}

/// The handler records the order of the guest's first faults; saved beside the snapshot and
/// loaded back, it makes a later restore's prefetch install those windows before anything
/// else (shown by failing every page read after the first three: exactly the three windows of
/// the working set are in).
#[test]
fn working_set_is_recorded_saved_and_prefetched_first() {
    let _serial = fault::serial();
    if !uffd_available("uffd") {
        return;
    }
    let dir = disk_dir("uffd-ws");
    let path = dir.join("g.mr");
    let ram: Vec<u8> = (0..8usize << 20).map(|i| (i / 4096) as u8 | 1).collect();
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
    let order = [300u64, 10, 1900];
    let r = restore_uffd(
        &path,
        &[],
        &UffdOptions {
            prefetch_channels: 0,
            record_working_set: Some(Duration::from_secs(600)),
            ..UffdOptions::default()
        },
    )
    .unwrap();
    let mem = slice(&r);
    for &p in &order {
        assert_eq!(mem[(p * PS) as usize], ram[(p * PS) as usize]);
    }
    let ws = r.working_set();
    assert_eq!(
        ws.pages,
        order
            .iter()
            .map(|&p| ("pc.ram".to_string(), p))
            .collect::<Vec<_>>()
    );
    drop(r);
    let side = WorkingSet::side_path(&path);
    ws.save(&side).unwrap();
    let loaded = WorkingSet::load(&side).unwrap();
    assert_eq!(loaded, ws);
    // A damaged side file is a typed error naming it.
    let bad = dir.join("bad.ws");
    std::fs::write(&bad, "mapped-ram working set 1\npc.ram x\n").unwrap();
    let e = WorkingSet::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.ws") && e.contains("byte 25"), "{e}");

    fault::inject(Fault {
        op: Op::ReadPages,
        skip: order.len() as u64,
        count: u64::MAX,
        kind: FaultKind::Errno(5),
    });
    let mut r = restore_uffd(
        &path,
        &[],
        &UffdOptions {
            prefetch_channels: 1,
            working_set: Some(loaded),
            ..UffdOptions::default()
        },
    )
    .unwrap();
    let err = r.wait_prefetched().unwrap_err();
    fault::clear();
    assert!(
        err.to_string().contains("Input/output error")
            || matches!(&err.kind, RestoreErrorKind::Io(f) if f.op == Op::ReadPages),
        "{err}"
    );
    let s = r.stats();
    assert_eq!(
        s.prefetched_pages,
        order.len() as u64 * mapped_ram_linux::uffd::DEFAULT_FAULT_WINDOW_PAGES,
        "only the working set's windows came in before the failure: {s:?}"
    );
    // Those pages are there without a fault.
    let faults = s.faults;
    let mem = slice(&r);
    for &p in &order {
        assert_eq!(mem[(p * PS) as usize], ram[(p * PS) as usize]);
    }
    assert_eq!(
        r.stats().faults,
        faults,
        "working-set pages needed no fault"
    );
}
