//! Time to runnable memory of a lazy (mmap) restore from a cold page cache, for files with and
//! without the clean-zero flag.
//!
//! ```sh
//! cargo run --release -p mapped-ram-linux --example lazy_resume_bench -- [SIZE_MIB [DIR [sparse]]]
//! ```
//!
//! Saves a synthetic guest (`SIZE_MIB`, default 2048: a quarter of the pages zero, scattered;
//! with `sparse`, only the first MiB of every 64 MiB holds data, the rest is untouched zero
//! memory, so a 16 GiB guest needs no 16 GiB of RAM) with our write policies — default write
//! gaps (zeros written under clear bits), `max_gap_pages` 0 (holes), and checksums off (no
//! integrity records, so no clean-zero flag: the safe path that QEMU's files take) — then, 10
//! times each, drops the file from the page cache (`posix_fadvise(DONTNEED)`) and times
//! [`restore_lazy`] until the memory is handed back. Prints the median and the range, and
//! checks the restored memory against the image once.

use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mapped_ram_linux::synthetic_image;
use mapped_ram_linux::{restore_lazy, save, LazyOptions, SaveOptions, SaveRegion};

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

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(2048, |s| s.parse().expect("SIZE_MIB"));
    let dir: PathBuf = args.next().map_or_else(|| "/var/tmp".into(), Into::into);
    let sparse = args.next().is_some_and(|s| s == "sparse");
    let size = mib << 20;
    eprintln!("building a {mib} MiB synthetic image (sparse: {sparse})...");
    // Calloc'd: untouched pages cost no memory.
    let mut image = vec![0u8; size];
    if sparse {
        for piece in image.chunks_mut(64 << 20) {
            let n = piece.len().min(1 << 20);
            synthetic_image(&mut piece[..n], PS, 0x5eed);
        }
    } else {
        synthetic_image(&mut image, PS, 0x5eed);
    }
    let regions = [SaveRegion {
        name: "pc.ram",
        memory: &image,
        page_size: PS as u64,
    }];
    println!(
        "| guest | file | resume median (ms) | min – max (ms) | clear pages: trusted / holes / zero-mapped / checked |"
    );
    println!("|---|---|---:|---|---|");
    for (label, gap, checksums) in [
        ("default save (gaps 16)", 16u64, true),
        ("save --write-gap-pages 0", 0, true),
        ("default save, no checksums (no flag)", 16, false),
    ] {
        let path = dir.join(format!(
            "resume-bench-{gap}-{checksums}-{}.mr",
            std::process::id()
        ));
        let opts = SaveOptions {
            max_gap_pages: gap,
            checksums,
            ..SaveOptions::default()
        };
        let s = save(&path, &regions, &opts, None).expect("save");
        eprintln!("{label}: saved in {:.2} s", s.seconds);
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..10 {
            drop_cache(&path);
            let t = Instant::now();
            let lazy =
                restore_lazy(&path, &["pc.ram"], &LazyOptions::default()).expect("lazy restore");
            times.push(t.elapsed().as_secs_f64() * 1e3);
            last = Some(lazy);
        }
        let lazy = last.expect("ten restores");
        let r = lazy.report.clone();
        let mem = lazy.block("pc.ram").expect("block").mapping().as_slice();
        if sparse {
            // The first 2 MiB of every 64 MiB: the data and the zeros after it (reading all of
            // a mostly empty guest would only fill the page cache with zeros).
            for (m, i) in mem.chunks(64 << 20).zip(image.chunks(64 << 20)) {
                let n = m.len().min(2 << 20);
                assert!(m[..n] == i[..n], "lazy restore differs from the image");
            }
        } else {
            assert!(*mem == image[..], "lazy restore differs from the image");
        }
        drop(lazy);
        times.sort_by(f64::total_cmp);
        let median = (times[4] + times[5]) / 2.0;
        println!(
            "| {mib} MiB{} | {label} | {median:.2} | {:.2} – {:.2} | {} / {} / {} / {} |",
            if sparse { " sparse" } else { "" },
            times[0],
            times[9],
            r.zero_pages_clean,
            r.zero_pages_in_holes,
            r.zero_pages_mapped,
            r.zero_pages_checked,
        );
        let _ = std::fs::remove_file(&path);
    }
}
