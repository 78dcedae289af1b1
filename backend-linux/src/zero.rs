//! Zero-page detection, run by the channel threads on the pages they are about to write.

/// `true` when every byte of `page` is zero.
///
/// Works on 64-byte blocks folded with OR, which the compiler turns into a few vector
/// instructions per block, and stops at the first non-zero block — guest pages that hold data
/// usually differ from zero in their first bytes.
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(word);
            acc |= u64::from_ne_bytes(raw);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn detects_any_nonzero_byte() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for i in [0, 7, 63, 64, 2048, 4095] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&page[..100]));
        let mut odd = vec![0u8; 100];
        odd[99] = 5;
        assert!(!is_zero(&odd));
    }
}
