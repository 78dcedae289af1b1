//! Synthetic guest images for demos, benchmarks and tests.

/// Fills `buf` with a synthetic guest image: about a quarter of the pages zero, scattered page
/// by page, the rest pseudo-random (incompressible) bytes. Deterministic for a given seed.
pub fn synthetic_image(buf: &mut [u8], page_size: usize, seed: u64) {
    let mut state = seed | 1;
    let mut next = || {
        // xorshift64*: fast, good enough to defeat compression and dedup.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for page in buf.chunks_mut(page_size.max(1)) {
        if next() % 4 == 0 {
            page.fill(0);
            continue;
        }
        for word in page.chunks_mut(8) {
            let v = next().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}
