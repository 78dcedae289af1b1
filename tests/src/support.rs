//! Small helpers shared by the integration tests.

use std::path::PathBuf;

/// The `mapped-ram` binary built beside the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/mapped-ram`), if it was built.
pub fn cli_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("mapped-ram");
    bin.is_file().then_some(bin)
}

/// xorshift64*: reproducible pseudo-random numbers (cut points, bit positions, delays).
pub struct Rng(pub u64);

impl Rng {
    /// The next number of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
