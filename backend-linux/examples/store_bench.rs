//! Save, restore, get and lazy restore against an S3 store, for BENCHMARKS.md.
//!
//! ```sh
//! . /var/tmp/mapped-ram-rgw/s3.env   # endpoint and credentials (scripts/ceph-rgw/start.sh)
//! cargo run --release -p mapped-ram-linux --example store_bench -- \
//!     --bucket bench --size-mib 2048 --data 1.0 --channels 16 --object-mib 4 --runs 3
//! ```
//!
//! The guest image: `--data` of each 16 MiB stretch holds random pages (from its start), the
//! rest is zero; 1.0 is all data. Each run saves it to `s3://BUCKET/bench/guest.mr`, restores
//! it into fresh memory (checked byte for byte), gets it into a local file under `--dir`, and
//! lazily restores it (userfaultfd): time to runnable memory, and to the first 10 % of pages
//! touched in random order while the prefetch runs. Prints one JSON line per run and the
//! medians. `--save-only`: only the save (bytes uploaded for a mostly-zero guest).

use std::time::Instant;

use mapped_ram_linux::store::{Store, StoreOptions};
use mapped_ram_linux::{
    synthetic_image, RestoreOptions, RestoreRegion, SaveOptions, SaveRegion, UffdOptions,
};

const PS: usize = 4096;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bucket: String = arg(&args, "--bucket", "bench".to_string());
    let size = arg(&args, "--size-mib", 2048usize) << 20;
    let data: f64 = arg(&args, "--data", 1.0);
    let channels = arg(&args, "--channels", 16usize);
    let object = arg(&args, "--object-mib", 4u64) << 20;
    let runs = arg(&args, "--runs", 3usize);
    let dir: String = arg(&args, "--dir", "/var/tmp".to_string());
    // Only the save (the upload of a large, mostly-zero guest: what it costs in bytes).
    let save_only = args.iter().any(|a| a == "--save-only");
    let gib = |b: f64| b / f64::from(1u32 << 30);

    let mut ram = vec![0u8; size];
    synthetic_image(&mut ram, PS, 7);
    // Every page of the synthetic image but a quarter holds data; keep only the leading
    // `data` of each 16 MiB stretch (clustered, as a guest's used memory is).
    let stretch = 16 << 20;
    let keep = ((stretch as f64 * data) as usize) / PS * PS;
    for s in ram.chunks_mut(stretch) {
        let k = keep.min(s.len());
        s[k..].fill(0);
    }
    let url = format!("s3://{bucket}/bench/guest.mr");
    let opts = StoreOptions {
        channels,
        object_bytes: object,
        ..StoreOptions::default()
    };
    let store = Store::connect(&url, opts).expect("connect");
    let (mut save_s, mut restore_s, mut get_s, mut runnable_ms, mut touch_ms) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut uploaded = 0u64;
    for run in 0..runs {
        let regions = [SaveRegion {
            name: "pc.ram",
            memory: &ram,
            page_size: PS as u64,
        }];
        let r = store
            .save(&regions, &SaveOptions::default(), None)
            .expect("save");
        uploaded = r.bytes_uploaded;
        save_s.push(r.save.seconds);
        if save_only {
            println!(
                "{{\"run\":{run},\"size_mib\":{},\"save_s\":{:.3},\"uploaded\":{uploaded},\"objects\":{},\"objects_total\":{}}}",
                size >> 20,
                r.save.seconds,
                r.objects_uploaded,
                r.objects_total
            );
            continue;
        }

        let mut back = vec![0u8; size];
        let t = Instant::now();
        let ro = RestoreOptions {
            memory_is_zeroed: true,
            ..RestoreOptions::default()
        };
        store
            .restore(
                &mut [RestoreRegion {
                    name: "pc.ram",
                    memory: &mut back,
                    page_size: PS as u64,
                }],
                &ro,
                None,
            )
            .expect("restore");
        restore_s.push(t.elapsed().as_secs_f64());
        assert!(back == ram, "restored memory differs");
        drop(back);

        let file = std::path::PathBuf::from(format!("{dir}/store-bench-get.mr"));
        let g = store.get(&file, None, None).expect("get");
        get_s.push(g.seconds);
        let _ = std::fs::remove_file(&file);

        let t = Instant::now();
        let lazy = store
            .restore_uffd(&[], &UffdOptions::default())
            .expect("lazy restore");
        runnable_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let mem = lazy.block("pc.ram").expect("block").as_slice();
        let pages = size / PS;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut sum = 0u64;
        let touches = if std::env::var_os("STORE_BENCH_NO_TOUCH").is_some() {
            0
        } else {
            pages / 10
        };
        for _ in 0..touches {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let p = (state % pages as u64) as usize;
            if std::env::var_os("STORE_BENCH_TRACE").is_some() && state % 1024 == 0 {
                let st = lazy.stats();
                eprintln!(
                    "{:8.1} ms faults {} prefetched {} done {}",
                    t.elapsed().as_secs_f64() * 1e3,
                    st.faults,
                    st.prefetched_pages,
                    st.prefetch_done
                );
            }
            sum = sum.wrapping_add(u64::from(mem[p * PS]));
            assert_eq!(mem[p * PS..p * PS + 64], ram[p * PS..p * PS + 64]);
        }
        touch_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let mut lazy = lazy;
        let stats = lazy.stats();
        lazy.wait_prefetched().expect("prefetch");
        eprintln!(
            "lazy: {stats:?}; prefetch done after {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        std::hint::black_box(sum);
        drop(lazy);
        println!(
            "{{\"run\":{run},\"save_s\":{:.3},\"restore_s\":{:.3},\"get_s\":{:.3},\"runnable_ms\":{:.2},\"touch10_ms\":{:.1},\"uploaded\":{uploaded}}}",
            save_s[run], restore_s[run], get_s[run], runnable_ms[run], touch_ms[run]
        );
    }
    if save_only {
        return;
    }
    let ram_gib = gib(size as f64);
    let data_gib = gib(uploaded as f64);
    println!(
        "{{\"summary\":true,\"size_mib\":{},\"data\":{data},\"channels\":{channels},\"object_mib\":{},\"uploaded_mib\":{:.1},\"save_ram_gib_s\":{:.3},\"save_data_gib_s\":{:.3},\"restore_data_gib_s\":{:.3},\"get_data_gib_s\":{:.3},\"runnable_ms\":{:.2},\"touch10_ms\":{:.1}}}",
        size >> 20,
        object >> 20,
        uploaded as f64 / f64::from(1u32 << 20),
        ram_gib / median(save_s.clone()),
        data_gib / median(save_s),
        data_gib / median(restore_s),
        data_gib / median(get_s),
        median(runnable_ms),
        median(touch_ms),
    );
}
