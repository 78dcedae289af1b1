//! A `#![no_std]` static library that exercises the core's main APIs without an allocator.
#![no_std]

use core::panic::PanicInfo;

use mapped_ram_core::bitmap::{Bitmap, BitmapRef};
use mapped_ram_core::caps::{check_capabilities, Capabilities, Parameters};
use mapped_ram_core::layout::{MappedRamHeader, Planner};
use mapped_ram_core::schedule::{write_extents, WorkQueue, WritePolicy};
use mapped_ram_core::stream::{encode_preamble, encode_ram_start, Config, Decoder, SliceSink};

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {}
}

/// Plans a two-block file, encodes its head, decodes it back, schedules the first block's
/// writes and returns the number of extents (or 0 on any error).
#[no_mangle]
pub extern "C" fn mapped_ram_no_std_smoke() -> u32 {
    if check_capabilities(Capabilities::MAPPED_RAM | Capabilities::MULTIFD, &Parameters::default()).is_err() {
        return 0;
    }
    let Ok(cfg) = Config::new("none", Capabilities::MAPPED_RAM) else { return 0 };
    let mut buf = [0u8; 256];
    let mut sink = SliceSink::new(&mut buf);
    if encode_preamble(&cfg, &mut sink).is_err() || encode_ram_start(1, 8 << 20, &mut sink).is_err() {
        return 0;
    }
    let head = sink.written() as u64;
    let Ok(mut planner) = Planner::new(head, 4096, false) else { return 0 };
    let Ok(layout) = planner.push(6, 8 << 20) else { return 0 };
    let header: MappedRamHeader = layout.header();
    let bytes = header.encode();
    if MappedRamHeader::decode(&bytes).is_err() {
        return 0;
    }
    let mut dec = Decoder::new(&buf[..], 0);
    if dec.read_config().is_err() {
        return 0;
    }
    let layouts = [layout];
    let Ok(queue) = WorkQueue::new(&layouts, 1 << 20) else { return 0 };
    let mut zero_words = [0u64; 4];
    let Ok(mut zero) = Bitmap::new(&mut zero_words, 256) else { return 0 };
    let _ = zero.set_range(10..20);
    let zref: BitmapRef<'_> = zero.as_ref();
    let mut extents = 0u32;
    if let Some(chunk) = queue.claim() {
        let _ = write_extents(&layouts[0], 0, &chunk, &zref, &WritePolicy::default(), |_| {
            extents = extents.wrapping_add(1)
        });
    }
    extents
}
