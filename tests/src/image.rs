//! Deterministic guest-RAM images for tests.
//!
//! [`fill_pattern`] fills a buffer page by page (4 KiB pages) with pseudo-random, incompressible
//! bytes, leaving about `zero_fraction` of the pages all-zero. The content of a page depends only
//! on `(seed, page index)`, so two buffers filled with the same seed agree page for page, and any
//! page can be recomputed on its own with [`expected_page`].
//!
//! * `clustered == false`: every page is independently zero with probability `zero_fraction`
//!   (scattered zero pages — the worst case for run-based I/O).
//! * `clustered == true`: the decision is made per aligned 2 MiB run ([`ZERO_RUN`]): whole runs
//!   of 512 pages are zero or data (long extents, like a mostly idle guest).
//!
//! Non-zero pages are guaranteed not to be all-zero (their first 8 bytes are never all zero),
//! so "page is zero" in the image is exactly "page was chosen to be zero".

/// Page size used by the generator (x86-64 target page size).
pub const PAGE_SIZE: usize = 4096;

/// Size of one zero/data decision unit when `clustered` is true (2 MiB).
pub const ZERO_RUN: usize = 2 << 20;

/// SplitMix64 finaliser: a good 64-bit mixing function.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform value in [0, 1) for a (seed, domain, index) triple.
fn unit(seed: u64, domain: u64, index: u64) -> f64 {
    let h = mix64(mix64(seed ^ domain.wrapping_mul(0xa076_1d64_78bd_642f)) ^ index);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether page `page_index` is a zero page in the image described by the parameters.
pub fn page_is_zero_in_pattern(
    seed: u64,
    zero_fraction: f64,
    clustered: bool,
    page_index: u64,
) -> bool {
    if zero_fraction <= 0.0 {
        return false;
    }
    if zero_fraction >= 1.0 {
        return true;
    }
    if clustered {
        let run = page_index / (ZERO_RUN / PAGE_SIZE) as u64;
        unit(seed, 2, run) < zero_fraction
    } else {
        unit(seed, 1, page_index) < zero_fraction
    }
}

/// Fills `page` (at most [`PAGE_SIZE`] bytes) with the data bytes of page `page_index`
/// (ignoring the zero decision).
fn fill_data_page(page: &mut [u8], seed: u64, page_index: u64) {
    // xorshift64* stream seeded per page.
    let mut s = mix64(mix64(seed ^ 0x5eed_da7a) ^ page_index) | 1;
    let mut chunks = page.chunks_exact_mut(8);
    for c in &mut chunks {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        c.copy_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let b = s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&b[..n]);
    }
    // Guarantee a data page is never all-zero.
    if !page.is_empty() && page.iter().take(8).all(|&b| b == 0) {
        page[0] = 0x5a;
    }
}

/// Fills `buf` with a deterministic test image (see the module docs).
///
/// `zero_fraction` is clamped to [0, 1]. A trailing partial page is treated like a page.
pub fn fill_pattern(buf: &mut [u8], seed: u64, zero_fraction: f64, clustered: bool) {
    for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
        let idx = i as u64;
        if page_is_zero_in_pattern(seed, zero_fraction, clustered, idx) {
            page.fill(0);
        } else {
            fill_data_page(page, seed, idx);
        }
    }
}

/// Allocates and returns a `len`-byte image filled by [`fill_pattern`].
pub fn pattern_image(len: usize, seed: u64, zero_fraction: f64, clustered: bool) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed, zero_fraction, clustered);
    v
}

/// The expected content of page `page_index` of a pattern image (a full [`PAGE_SIZE`] page).
pub fn expected_page(seed: u64, zero_fraction: f64, clustered: bool, page_index: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if !page_is_zero_in_pattern(seed, zero_fraction, clustered, page_index) {
        fill_data_page(&mut p, seed, page_index);
    }
    p
}

/// Number of all-zero [`PAGE_SIZE`] pages in `buf` (a trailing partial page counts as a page).
pub fn count_zero_pages(buf: &[u8]) -> usize {
    buf.chunks(PAGE_SIZE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count()
}

/// Index of the first [`PAGE_SIZE`] page where `a` and `b` differ (or where one of them ends
/// early), or `None` if they are identical. Useful for readable assertion messages.
pub fn first_differing_page(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a
        .chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE))
        .position(|(x, y)| x != y)
    {
        return Some(i);
    }
    if a.len() != b.len() {
        return Some(a.len().min(b.len()) / PAGE_SIZE);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_fractions() {
        let a = pattern_image(8 << 20, 7, 0.25, false);
        let b = pattern_image(8 << 20, 7, 0.25, false);
        assert_eq!(a, b);
        let pages = a.len() / PAGE_SIZE;
        let z = count_zero_pages(&a);
        assert!(z > pages / 5 && z < pages * 3 / 10, "{z} of {pages}");
        let c = pattern_image(8 << 20, 8, 0.25, false);
        assert_ne!(a, c);
        for i in [0u64, 5, 2047] {
            let p = expected_page(7, 0.25, false, i);
            let off = i as usize * PAGE_SIZE;
            assert_eq!(&a[off..off + PAGE_SIZE], &p[..]);
        }
    }

    #[test]
    fn clustered_runs_are_uniform() {
        let a = pattern_image(64 << 20, 3, 0.5, true);
        for run in a.chunks(ZERO_RUN) {
            let z = count_zero_pages(run);
            assert!(z == 0 || z == ZERO_RUN / PAGE_SIZE);
        }
        let z = count_zero_pages(&a);
        assert!(z > 0 && z < a.len() / PAGE_SIZE);
    }

    #[test]
    fn extremes() {
        let a = pattern_image(1 << 20, 1, 0.0, false);
        assert_eq!(count_zero_pages(&a), 0);
        let b = pattern_image(1 << 20, 1, 1.0, true);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(first_differing_page(&a, &a), None);
        assert_eq!(first_differing_page(&a, &b), Some(0));
    }
}
