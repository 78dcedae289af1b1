//! Copy, MAP_PRIVATE (lazy) and userfaultfd restore of one image, cold cache.
//!
//! ```sh
//! cargo run --release -p mapped-ram-linux --example restore_modes_bench -- [SIZE_MIB [DIR]]
//! ```
//!
//! Saves a synthetic guest (default 2048 MiB, a quarter of the pages zero) once with the
//! default policy, then for each restore mode, after `fdatasync` + `posix_fadvise(DONTNEED)`
//! of the snapshot, measures: time to runnable memory; then the time to read one word of 10 %
//! of the pages in random order; the time from the start until every stored page is resident
//! (copy: at resume; lazy: after the guest reads one word of every page; userfaultfd: the
//! prefetch's end, or — without prefetch — after the guest reads every page); and the page
//! cache the snapshot then holds (`fincore`). The userfaultfd restore without prefetch records
//! the working set of the random reads; a third userfaultfd run prefetches it first. Then, in
//! 2 MiB huge pages (raising `vm.nr_hugepages` for the run): the copying restore and the
//! userfaultfd restore with prefetch. Every restore is checked byte for byte.

use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mapped_ram_linux::synthetic_image;
use mapped_ram_linux::{
    restore, restore_lazy, restore_uffd, save, HugePages, LazyOptions, RestoreOptions,
    RestoreRegion, SaveOptions, SaveRegion, UffdOptions, WorkingSet, HUGE_PAGE,
};

const PS: usize = 4096;

fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).expect("open snapshot");
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = rustix::fs::fdatasync(f.as_fd());
    let _ = rustix::fs::fadvise(
        f.as_fd(),
        0,
        NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
}

/// MiB of the file in the page cache.
fn cached_mib(path: &Path) -> f64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore");
    let s = String::from_utf8_lossy(&out.stdout);
    s.trim().parse::<f64>().unwrap_or(f64::NAN) / f64::from(1u32 << 20)
}

fn touch_random(mem: &[u8]) -> (f64, u64) {
    let pages = mem.len() / PS;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut sum = 0u64;
    let t = Instant::now();
    for _ in 0..pages / 10 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let p = (s % pages as u64) as usize;
        sum = sum.wrapping_add(u64::from(mem[p * PS + 8]));
    }
    (t.elapsed().as_secs_f64(), sum)
}

fn read_all(mem: &[u8]) -> u64 {
    (0..mem.len() / PS).fold(0u64, |a, p| a.wrapping_add(u64::from(mem[p * PS + 16])))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(2048, |s| s.parse().expect("SIZE_MIB"));
    let dir: PathBuf = args.next().map_or_else(|| "/var/tmp".into(), Into::into);
    let size = mib << 20;
    let mut image = vec![0u8; size];
    synthetic_image(&mut image, PS, 0x5eed);
    let path = dir.join(format!("modes-bench-{}.mr", std::process::id()));
    let s = save(
        &path,
        &[SaveRegion {
            name: "pc.ram",
            memory: &image,
            page_size: PS as u64,
        }],
        &SaveOptions::default(),
        None,
    )
    .expect("save");
    eprintln!("saved {mib} MiB in {:.2} s", s.seconds);
    println!("| restore | runnable (ms) | 10 % random reads (s) | all stored pages resident (s) | page cache after (MiB) |");
    println!("|---|---:|---:|---:|---:|");

    // Copy.
    drop_cache(&path);
    let mut mem = vec![0u8; size];
    let t = Instant::now();
    restore(
        &path,
        &mut [RestoreRegion {
            name: "pc.ram",
            memory: &mut mem,
            page_size: PS as u64,
        }],
        &RestoreOptions {
            memory_is_zeroed: true,
            ..RestoreOptions::default()
        },
        None,
    )
    .expect("restore");
    let runnable = t.elapsed().as_secs_f64();
    let (random, sum) = touch_random(&mem);
    std::hint::black_box(sum);
    assert!(mem == image, "copy differs");
    println!(
        "| copy (O_DIRECT) | {:.1} | {random:.3} | {runnable:.3} | {:.0} |",
        runnable * 1e3,
        cached_mib(&path)
    );
    drop(mem);

    // Lazy (MAP_PRIVATE).
    drop_cache(&path);
    let t = Instant::now();
    let lazy = restore_lazy(&path, &["pc.ram"], &LazyOptions::default()).expect("lazy");
    let runnable = t.elapsed().as_secs_f64();
    let mem = lazy.block("pc.ram").expect("block").mapping().as_slice();
    let (random, sum) = touch_random(mem);
    let sum2 = read_all(mem);
    let resident = t.elapsed().as_secs_f64();
    std::hint::black_box((sum, sum2));
    let cache = cached_mib(&path);
    assert!(*mem == image[..], "lazy differs");
    println!(
        "| MAP_PRIVATE (lazy) | {:.1} | {random:.3} | {resident:.3} (guest reads every page) | {cache:.0} |",
        runnable * 1e3
    );
    drop(lazy);

    // userfaultfd: without prefetch (recording the working set of the random reads), with
    // prefetch, and with prefetch of the recorded working set first.
    let mut ws: Option<WorkingSet> = None;
    for (label, prefetch_channels, first) in [
        ("no prefetch (records the working set)", 0, false),
        ("prefetch", mapped_ram_linux::default_channels(), false),
        (
            "prefetch, working set first",
            mapped_ram_linux::default_channels(),
            true,
        ),
    ] {
        drop_cache(&path);
        let t = Instant::now();
        let mut u = restore_uffd(
            &path,
            &["pc.ram"],
            &UffdOptions {
                prefetch_channels,
                record_working_set: (prefetch_channels == 0).then(|| Duration::from_secs(600)),
                working_set: if first { ws.clone() } else { None },
                ..UffdOptions::default()
            },
        )
        .expect("uffd");
        let runnable = t.elapsed().as_secs_f64();
        let (random, sum) = touch_random(u.block("pc.ram").expect("block").as_slice());
        std::hint::black_box(sum);
        if prefetch_channels == 0 {
            ws = Some(u.working_set());
        }
        let how = if prefetch_channels > 0 {
            u.wait_prefetched().expect("prefetch");
            "prefetch done"
        } else {
            std::hint::black_box(read_all(u.block("pc.ram").expect("block").as_slice()));
            "guest reads every page"
        };
        let resident = t.elapsed().as_secs_f64();
        let cache = cached_mib(&path);
        let st = u.stats();
        assert!(
            u.block("pc.ram").expect("block").as_slice() == &image[..],
            "uffd differs"
        );
        println!(
            "| userfaultfd, {label} | {:.1} | {random:.3} | {resident:.3} ({how}) | {cache:.0} |",
            runnable * 1e3
        );
        eprintln!("  {st:?}");
    }

    // Huge pages: copying restore into 2 MiB pages, and userfaultfd (a huge page per fault).
    let need = (size as u64 / HUGE_PAGE) + 8;
    let meminfo = |k: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let before = meminfo("HugePages_Total:");
    if meminfo("HugePages_Free:") < need {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (before + need).to_string());
    }
    if meminfo("HugePages_Free:") < need {
        eprintln!("HUGE PAGES SKIPPED: the kernel refused {need} 2 MiB huge pages");
    } else {
        println!();
        println!("| huge pages | runnable (ms) | all stored pages resident (s) | GiB/s |");
        println!("|---|---:|---:|---:|");
        drop_cache(&path);
        let mut mem = HugePages::new(size).expect("huge pages");
        let t = Instant::now();
        restore(
            &path,
            &mut [RestoreRegion {
                name: "pc.ram",
                memory: mem.as_mut_slice(),
                page_size: PS as u64,
            }],
            &RestoreOptions {
                memory_is_zeroed: true,
                ..RestoreOptions::default()
            },
            None,
        )
        .expect("restore into huge pages");
        let secs = t.elapsed().as_secs_f64();
        assert!(mem.as_slice() == &image[..], "huge copy differs");
        println!(
            "| copy (O_DIRECT) into 2 MiB pages | {:.1} | {secs:.3} | {:.2} |",
            secs * 1e3,
            size as f64 / secs / f64::from(1u32 << 30)
        );
        drop(mem);
        drop_cache(&path);
        let t = Instant::now();
        let mut u = restore_uffd(
            &path,
            &["pc.ram"],
            &UffdOptions {
                huge_pages: true,
                ..UffdOptions::default()
            },
        )
        .expect("uffd huge");
        let runnable = t.elapsed().as_secs_f64();
        u.wait_prefetched().expect("prefetch");
        let secs = t.elapsed().as_secs_f64();
        assert!(
            u.block("pc.ram").expect("block").as_slice() == &image[..],
            "uffd huge differs"
        );
        println!(
            "| userfaultfd into 2 MiB pages, prefetch | {:.1} | {secs:.3} | {:.2} |",
            runnable * 1e3,
            size as f64 / secs / f64::from(1u32 << 30)
        );
        drop(u);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before.to_string());
    }
    let _ = std::fs::remove_file(&path);
}
