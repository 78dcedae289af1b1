#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mapped_ram_fuzz::integrity::run(data));
