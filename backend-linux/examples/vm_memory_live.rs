//! A live snapshot of `vm-memory` guest memory while a "guest" thread keeps writing to it,
//! restored into fresh guest memory and compared byte for byte.
//!
//! ```sh
//! cargo run -p mapped-ram-linux --features vm-memory --example vm_memory_live [-- RAM_MIB [DIR]]
//! ```
//!
//! The glue a VMM needs is the block between the two `glue` comments.

use std::sync::atomic::{AtomicBool, Ordering};

use mapped_ram_linux::vm_memory::{restore_guest_memory, DirtyTracking, VmLiveSave};
use mapped_ram_linux::{LiveOptions, RestoreOptions};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(32), |s| s.parse())?;
    let dir = args.next().map_or_else(std::env::temp_dir, Into::into);
    let path = dir.join(format!("vm_memory_live-{}.mr", std::process::id()));
    let (ram, high) = (mib << 20, GuestAddress(1 << 32));
    // Guest memory with dirty tracking: RAM at 0 and 1 MiB above 4 GiB.
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), ram as usize),
        (high, 1 << 20),
    ])?;
    for page in 0..ram / 4096 {
        if page % 5 != 0 {
            mem.write_obj(
                page.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                GuestAddress(page * 4096),
            )?;
        }
    }
    mem.write_slice(b"high memory", high)?;
    let stop = AtomicBool::new(false);

    // --- glue: live snapshot while the guest runs, then restore ---
    let names = ["pc.ram", "high.ram"];
    // Every write goes through vm-memory here; a KVM guest would use VmMemoryAndKvm and hand
    // each pass its slots' KVM_GET_DIRTY_LOG.
    let opts = LiveOptions::default();
    let mut live = VmLiveSave::begin(&path, &mem, &names, DirtyTracking::VmMemory, &opts)?;
    let passes = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let page = i.wrapping_mul(7919) % (ram / 4096 / 16); // a working set
                let _ = mem.write_obj(i, GuestAddress(page * 4096 + (i % 512) * 8));
                i += 1;
            }
            i
        });
        let mut passes = vec![live.pass(&[])?]; // everything
        for _ in 0..3 {
            passes.push(live.pass(&[])?); // what the guest dirtied meanwhile
        }
        stop.store(true, Ordering::Relaxed); // "pause the vCPUs"
        println!(
            "guest wrote {} times during the passes",
            guest.join().unwrap_or(0)
        );
        Ok::<_, mapped_ram_linux::SaveError>(passes)
    })?;
    let report = live.finish(&[], None)?; // last pass with the guest paused
    let layout = [(names[0], GuestAddress(0)), (names[1], high)];
    let (back, _) = restore_guest_memory::<()>(&path, &layout, &RestoreOptions::default())?;
    // --- end of glue ---

    for p in passes.iter().chain(report.passes.last()) {
        println!(
            "pass {}: {} dirty pages, {} written, {} zero",
            p.pass, p.pages_dirty, p.pages_written, p.zero_pages
        );
    }
    let (mut a, mut b) = (vec![0u8; ram as usize], vec![0u8; ram as usize]);
    mem.read_slice(&mut a, GuestAddress(0))?;
    back.read_slice(&mut b, GuestAddress(0))?;
    let mut hi = [0u8; 11];
    back.read_slice(&mut hi, high)?;
    std::fs::remove_file(&path)?;
    if a != b || &hi != b"high memory" {
        return Err("restored guest memory differs".into());
    }
    println!(
        "saved {} MiB live in {} passes ({:.1} MiB of page data, {:.3} s); restored memory is identical",
        mib + 1,
        report.passes.len(),
        report.save.data_bytes as f64 / f64::from(1u32 << 20),
        report.save.seconds
    );
    Ok(())
}
