//! Time-to-resume and first-touch costs of the lazy (mmap) restore against the copying restore.
//!
//! ```sh
//! cargo run --release -p mapped-ram-linux --example lazy_restore_bench -- [SIZE_MIB [DIR]]
//! ```
//!
//! Builds a synthetic guest image (about a quarter of the pages zero, scattered, the rest
//! random), saves it twice — with the default write policy (short zero runs written inside
//! large writes, bit clear) and with `max_gap_pages = 0` (zero pages are holes) — and for each
//! file, with the page cache warm and cold (`posix_fadvise(DONTNEED)`), measures:
//!
//! * **resume**: until the guest could run (copying restore: all pages read — buffered from the
//!   page cache when warm, `O_DIRECT` when cold; lazy: mapped);
//! * **touch 10 %**: the guest then reads one word of 10 % of its pages, in random order;
//! * **read all**: then one word of every page, in order;
//! * **write all**: then writes one word of every page (copy-on-write faults for the lazy
//!   mapping; already-populated memory for the copying restore).

use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mapped_ram_linux::synthetic_image;
use mapped_ram_linux::{
    restore, restore_lazy, save, DirectIo, LazyOptions, RestoreOptions, RestoreRegion, SaveOptions,
    SaveRegion,
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

fn warm_cache(path: &Path) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open snapshot");
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).is_ok_and(|n| n > 0) {}
}

/// Touches memory as a resumed guest would; returns (touch 10 %, read all, write all) seconds.
fn touch(mem: &mut [u8]) -> (f64, f64, f64, u64) {
    let pages = mem.len() / PS;
    let mut sum = 0u64;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let t = Instant::now();
    for _ in 0..pages / 10 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let p = (s % pages as u64) as usize;
        sum = sum.wrapping_add(u64::from(mem[p * PS + 8]));
    }
    let random = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in 0..pages {
        sum = sum.wrapping_add(u64::from(mem[p * PS + 16]));
    }
    let read = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in 0..pages {
        mem[p * PS + 24] = mem[p * PS + 24].wrapping_add(1);
    }
    let write = t.elapsed().as_secs_f64();
    for p in 0..pages {
        mem[p * PS + 24] = mem[p * PS + 24].wrapping_sub(1);
    }
    (random, read, write, sum)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(2048, |s| s.parse().expect("SIZE_MIB"));
    let dir: PathBuf = args.next().map_or_else(|| "/var/tmp".into(), Into::into);
    let size = mib << 20;
    eprintln!("building a {mib} MiB synthetic image...");
    let mut image = vec![0u8; size];
    synthetic_image(&mut image, PS, 0x5eed);
    let regions = [SaveRegion {
        name: "pc.ram",
        memory: &image,
        page_size: PS as u64,
    }];
    println!(
        "| file | cache | restore | resume (s) | touch 10 % (s) | read all (s) | write all (s) | clear pages: holes / zero-mapped / checked |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---|");
    for (label, gap) in [
        ("default save (gaps 16)", 16u64),
        ("save --write-gap-pages 0", 0),
    ] {
        let path = dir.join(format!("lazy-bench-{gap}-{}.mr", std::process::id()));
        let opts = SaveOptions {
            max_gap_pages: gap,
            ..SaveOptions::default()
        };
        let s = save(&path, &regions, &opts, None).expect("save");
        eprintln!(
            "{label}: saved in {:.2} s ({:.2} GiB/s)",
            s.seconds,
            s.gib_per_second()
        );
        for cold in [false, true] {
            let cache = if cold { "cold" } else { "warm" };
            // Copying restore into fresh (untouched) memory.
            if cold {
                drop_cache(&path);
            } else {
                warm_cache(&path);
            }
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
                    // Warm: read from the page cache; cold: O_DIRECT (the default, auto).
                    direct_io: if cold { DirectIo::Auto } else { DirectIo::Off },
                    ..RestoreOptions::default()
                },
                None,
            )
            .expect("restore");
            let resume = t.elapsed().as_secs_f64();
            let (random, read, write, sum) = touch(&mut mem);
            std::hint::black_box(sum);
            assert!(mem == image, "copying restore differs");
            println!(
                "| {label} | {cache} | copy | {resume:.3} | {random:.3} | {read:.3} | {write:.3} | — |"
            );
            drop(mem);

            // Lazy restore.
            if cold {
                drop_cache(&path);
            } else {
                warm_cache(&path);
            }
            let t = Instant::now();
            let mut lazy =
                restore_lazy(&path, &["pc.ram"], &LazyOptions::default()).expect("lazy restore");
            let resume = t.elapsed().as_secs_f64();
            let r = lazy.report.clone();
            let block = lazy.block_mut("pc.ram").expect("block");
            let mem = block.mapping_mut().as_mut_slice();
            let (random, read, write, sum) = touch(mem);
            std::hint::black_box(sum);
            assert!(*mem == image[..], "lazy restore differs");
            println!(
                "| {label} | {cache} | lazy | {resume:.3} | {random:.3} | {read:.3} | {write:.3} | {} / {} / {} ({} maps, {:.0} MiB read) |",
                r.zero_pages_in_holes,
                r.zero_pages_mapped,
                r.zero_pages_checked,
                r.zero_maps,
                r.check_bytes as f64 / f64::from(1u32 << 20)
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
