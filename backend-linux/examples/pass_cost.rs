//! The fixed cost of a live pass: passes with no dirty page and with one, at 1 and 8 channels,
//! on a 256 MiB guest (medians of 200 passes).
//!
//! `cargo run --release -p mapped-ram-linux --example pass_cost -- [DIR]`

use std::time::Instant;

use mapped_ram_linux::{DirtyLog, GuestMemory, LiveOptions, LiveRegion, LiveSave, SaveOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| std::path::PathBuf::from("target/bench"), Into::into);
    std::fs::create_dir_all(&dir)?;
    let size = 256usize << 20;
    let ram = vec![1u8; size];
    let pages = size / 4096;
    println!("| channels | empty pass (ms) | one dirty page (ms) |");
    println!("|---|---|---|");
    for channels in [1, 8] {
        let regions = [LiveRegion {
            name: "pc.ram",
            memory: GuestMemory::from_slice(&ram),
            page_size: 4096,
        }];
        let opts = LiveOptions {
            save: SaveOptions {
                channels,
                fsync: false,
                ..SaveOptions::default()
            },
            ..LiveOptions::default()
        };
        let path = dir.join(format!("pass-cost-{channels}.mr"));
        let mut live = LiveSave::begin(&path, &regions, &opts)?;
        live.pass_all()?;
        let empty = vec![0u64; pages / 64];
        let mut one = empty.clone();
        one[pages / 128] = 1;
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..200 {
            for (i, log) in [&empty, &one].into_iter().enumerate() {
                let t = Instant::now();
                live.pass(&[DirtyLog::new("pc.ram", log)])?;
                times[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        drop(live);
        let [e, o] = times;
        println!("| {channels} | {:.3} | {:.3} |", median(e), median(o));
    }
    Ok(())
}
