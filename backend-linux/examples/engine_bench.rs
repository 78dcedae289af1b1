//! Every kind of save on the one engine, on the same in-memory guest and the same disk:
//! `save()`, `save()` over an existing snapshot, a live save's first pass (`LiveSave::begin`,
//! `pass_all`, `finish`), a `vm-memory` save, and a copying `restore()`. Interleaved rounds,
//! page cache dropped and the disk synced before every timed step; prints medians.
//!
//! `cargo run --release -p mapped-ram-linux --features vm-memory --example engine_bench -- DIR 2G 3`

use std::path::Path;
use std::time::Instant;

use mapped_ram_linux::vm_memory::{save_guest_memory, vm_memory};
use mapped_ram_linux::{
    restore, save, synthetic_image, DirtyLog, GuestMemory, LiveOptions, LiveRegion, LiveSave,
    RestoreOptions, RestoreRegion, SaveOptions, SaveRegion,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn parse_size(s: &str) -> usize {
    let (n, m) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    n.parse::<usize>().expect("size") * m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).map(String::as_str).unwrap_or("target/bench"));
    let size = parse_size(args.get(2).map(String::as_str).unwrap_or("1G"));
    let rounds: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    std::fs::create_dir_all(dir)?;
    let mut ram = vec![0u8; size];
    synthetic_image(&mut ram, 4096, 42);
    let vm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])?;
    vm.write_slice(&ram, GuestAddress(0))?;
    let gib = size as f64 / f64::from(1u32 << 30);
    let opts = SaveOptions::default();
    let names = [
        "save() into an empty path",
        "save() over an existing snapshot",
        "live save, first pass + finish",
        "vm-memory save (save_guest_memory)",
        "restore() (copy, fresh memory)",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let fresh = dir.join("engine-fresh.mr");
    let over = dir.join("engine-over.mr");
    for round in 0..rounds {
        for (i, slot) in samples.iter_mut().enumerate() {
            let _ = std::fs::remove_file(&fresh);
            if i == 1 && !over.exists() {
                save(
                    &over,
                    &[SaveRegion {
                        name: "pc.ram",
                        memory: &ram,
                        page_size: 4096,
                    }],
                    &opts,
                    None,
                )?;
            }
            drop_caches();
            let t = Instant::now();
            match i {
                0 | 1 => {
                    let path = if i == 0 { &fresh } else { &over };
                    save(
                        path,
                        &[SaveRegion {
                            name: "pc.ram",
                            memory: &ram,
                            page_size: 4096,
                        }],
                        &opts,
                        None,
                    )?;
                }
                2 => {
                    let regions = [LiveRegion {
                        name: "pc.ram",
                        memory: GuestMemory::from_slice(&ram),
                        page_size: 4096,
                    }];
                    let mut live = LiveSave::begin(&fresh, &regions, &LiveOptions::default())?;
                    live.pass_all()?;
                    let empty = vec![0u64; size / 4096 / 64];
                    live.finish(&[DirtyLog::new("pc.ram", &empty)], None)?;
                }
                3 => {
                    save_guest_memory(&fresh, &vm, &["pc.ram"], &opts)?;
                }
                _ => {
                    if !fresh.exists() {
                        save(
                            &fresh,
                            &[SaveRegion {
                                name: "pc.ram",
                                memory: &ram,
                                page_size: 4096,
                            }],
                            &opts,
                            None,
                        )?;
                        drop_caches();
                    }
                    let mut back = vec![0u8; size];
                    let t = Instant::now();
                    restore(
                        &fresh,
                        &mut [RestoreRegion {
                            name: "pc.ram",
                            memory: &mut back,
                            page_size: 4096,
                        }],
                        &RestoreOptions {
                            memory_is_zeroed: true,
                            ..RestoreOptions::default()
                        },
                        None,
                    )?;
                    slot.push(gib / t.elapsed().as_secs_f64());
                    assert!(back == ram, "restore is byte-identical");
                    continue;
                }
            }
            slot.push(gib / t.elapsed().as_secs_f64());
        }
        eprintln!("round {} done", round + 1);
    }
    println!(
        "| operation ({:.1} GiB, 8 channels, O_DIRECT, {rounds} rounds) | GiB/s median | min–max |",
        gib
    );
    println!("|---|---|---|");
    for (name, s) in names.iter().zip(samples) {
        let (lo, hi) = (
            s.iter().copied().fold(f64::MAX, f64::min),
            s.iter().copied().fold(0.0, f64::max),
        );
        println!("| {name} | {:.2} | {lo:.2}–{hi:.2} |", median(s));
    }
    let _ = std::fs::remove_file(&fresh);
    let _ = std::fs::remove_file(&over);
    Ok(())
}
