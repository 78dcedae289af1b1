//! The per-block page bitmap.
//!
//! One bit per target page: set means "the file holds this page at `pages_offset + k *
//! page_size`", clear means "treat the page as zero". QEMU dumps its in-memory array of host
//! `unsigned long` words without converting it, so on the little-endian 64-bit hosts this crate
//! targets, page `k` is bit `k % 64` of little-endian `u64` word `k / 64` — equivalently bit
//! `k % 8` of byte `k / 8`. [`decode_le`] and [`encode_le`] convert between file bytes and the
//! `u64` words the types here work on, whatever the host's byte order.
//!
//! The words are always provided by the caller ([`Bitmap`] over `&mut [u64]`, [`BitmapRef`]
//! over `&[u64]`, [`AtomicBitmap`] over `&[AtomicU64]` for channel threads that set bits
//! concurrently), so nothing here allocates. Bits past the block's page count are ignored.
//!
//! ```
//! use mapped_ram_core::bitmap::{Bitmap, words_for};
//!
//! let mut words = [0u64; 2];
//! assert_eq!(words_for(100), 2);
//! let mut map = Bitmap::new(&mut words, 100).unwrap();
//! map.set_range(3..10).unwrap();
//! map.clear(5).unwrap();
//! assert_eq!(map.count_ones(), 6);
//! let runs: Vec<_> = map.as_ref().runs(true).collect();
//! assert_eq!(runs, [3..5, 6..10]);
//! ```

use core::fmt;
use core::ops::Range;
#[cfg(target_has_atomic = "64")]
use core::sync::atomic::{AtomicU64, Ordering};

/// Number of `u64` words needed for `bits` bits.
pub fn words_for(bits: u64) -> u64 {
    bits.div_ceil(64)
}

/// A bitmap operation was given something that does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BitmapError {
    /// The word slice is too short for the number of bits.
    TooFewWords {
        /// Words provided.
        words: usize,
        /// Bits asked for.
        bits: u64,
    },
    /// A bit index (or range end) past the number of bits.
    OutOfRange {
        /// The index.
        index: u64,
        /// The number of bits.
        bits: u64,
    },
    /// The byte slice is not exactly `8 * words` bytes long.
    ByteLength {
        /// Bytes provided.
        bytes: usize,
        /// Words to fill or read.
        words: usize,
    },
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapError::TooFewWords { words, bits } => {
                write!(f, "{words} bitmap words cannot hold {bits} bits")
            }
            BitmapError::OutOfRange { index, bits } => {
                write!(f, "bit {index} is outside a bitmap of {bits} bits")
            }
            BitmapError::ByteLength { bytes, words } => {
                write!(f, "{bytes} bitmap bytes do not match {words} words")
            }
        }
    }
}

impl core::error::Error for BitmapError {}

fn check_len(words: usize, bits: u64) -> Result<(), BitmapError> {
    let needed = words_for(bits);
    if u64::try_from(words).map_or(true, |w| w >= needed) {
        Ok(())
    } else {
        Err(BitmapError::TooFewWords { words, bits })
    }
}

/// Word index and mask of bit `index` (the caller has checked `index < bits`).
fn locate(index: u64) -> (usize, u64) {
    let word = usize::try_from(index / 64).unwrap_or(usize::MAX);
    (word, 1u64 << (index % 64))
}

/// Fills `words` from the file's bitmap bytes (little-endian `u64` words).
pub fn decode_le(bytes: &[u8], words: &mut [u64]) -> Result<(), BitmapError> {
    if bytes.len() != words.len().saturating_mul(8) {
        return Err(BitmapError::ByteLength {
            bytes: bytes.len(),
            words: words.len(),
        });
    }
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(chunk);
        *word = u64::from_le_bytes(raw);
    }
    Ok(())
}

/// Writes `words` as the file's bitmap bytes (little-endian `u64` words).
pub fn encode_le(words: &[u64], bytes: &mut [u8]) -> Result<(), BitmapError> {
    if bytes.len() != words.len().saturating_mul(8) {
        return Err(BitmapError::ByteLength {
            bytes: bytes.len(),
            words: words.len(),
        });
    }
    for (word, chunk) in words.iter().zip(bytes.chunks_exact_mut(8)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Ok(())
}

/// A read-only view of a page bitmap.
#[derive(Debug, Clone, Copy)]
pub struct BitmapRef<'a> {
    words: &'a [u64],
    bits: u64,
}

impl<'a> BitmapRef<'a> {
    /// Views `words` as a bitmap of `bits` bits.
    pub fn new(words: &'a [u64], bits: u64) -> Result<Self, BitmapError> {
        check_len(words.len(), bits)?;
        Ok(Self { words, bits })
    }

    /// Number of bits (pages).
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// `true` when the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// The underlying words.
    pub fn words(&self) -> &'a [u64] {
        self.words
    }

    /// Whether bit `index` is set; `false` past the end.
    pub fn test(&self, index: u64) -> bool {
        if index >= self.bits {
            return false;
        }
        let (w, mask) = locate(index);
        self.words.get(w).is_some_and(|word| word & mask != 0)
    }

    /// Number of set bits among the first [`len`](Self::len) bits.
    pub fn count_ones(&self) -> u64 {
        self.count_ones_in(0..self.bits)
    }

    /// Number of set bits in `range` (clamped to the bitmap).
    pub fn count_ones_in(&self, range: Range<u64>) -> u64 {
        word_masks(range.start..range.end.min(self.bits))
            .map(|(w, mask)| self.words.get(w).copied().unwrap_or(0) & mask)
            .map(|bits| u64::from(bits.count_ones()))
            .fold(0u64, u64::saturating_add)
    }

    /// Index of the first bit at or after `from` whose value is `value`, if any.
    pub fn find_next(&self, from: u64, value: bool) -> Option<u64> {
        let mut pos = from;
        while pos < self.bits {
            let (w, _) = locate(pos);
            let raw = self.words.get(w).copied().unwrap_or(0);
            let word = if value { raw } else { !raw };
            let shift = pos % 64;
            let rest = word >> shift;
            if rest != 0 {
                let found = pos.saturating_add(u64::from(rest.trailing_zeros()));
                return (found < self.bits).then_some(found);
            }
            pos = pos.saturating_add(64u64.saturating_sub(shift));
        }
        None
    }

    /// Iterates over the maximal runs of bits equal to `value`, in ascending order.
    pub fn runs(&self, value: bool) -> Runs<'a> {
        self.runs_in(0..self.bits, value)
    }

    /// Like [`runs`](Self::runs), restricted to `range` (clamped to the bitmap); runs are cut at
    /// the range's ends.
    pub fn runs_in(&self, range: Range<u64>, value: bool) -> Runs<'a> {
        Runs {
            map: *self,
            pos: range.start,
            end: range.end.min(self.bits),
            value,
        }
    }
}

/// The words a bit range touches, each with the mask of the range's bits in it.
fn word_masks(range: Range<u64>) -> impl Iterator<Item = (usize, u64)> {
    let mut pos = range.start;
    core::iter::from_fn(move || {
        if pos >= range.end {
            return None;
        }
        let shift = pos % 64;
        let take = 64u64
            .saturating_sub(shift)
            .min(range.end.saturating_sub(pos));
        let (word, _) = locate(pos);
        pos = pos.saturating_add(take);
        Some((word, low_mask(take) << shift))
    })
}

fn low_mask(bits: u64) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits).wrapping_sub(1)
    }
}

/// Iterator over maximal runs of equal bits; see [`BitmapRef::runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    map: BitmapRef<'a>,
    pos: u64,
    end: u64,
    value: bool,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.map.find_next(self.pos, self.value)?;
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = self
            .map
            .find_next(start, !self.value)
            .unwrap_or(self.map.bits)
            .min(self.end);
        self.pos = stop;
        Some(start..stop)
    }
}

/// A mutable page bitmap over caller-provided words.
#[derive(Debug)]
pub struct Bitmap<'a> {
    words: &'a mut [u64],
    bits: u64,
}

impl<'a> Bitmap<'a> {
    /// Uses `words` as a bitmap of `bits` bits (their current contents are kept).
    pub fn new(words: &'a mut [u64], bits: u64) -> Result<Self, BitmapError> {
        check_len(words.len(), bits)?;
        Ok(Self { words, bits })
    }

    /// A read-only view.
    pub fn as_ref(&self) -> BitmapRef<'_> {
        BitmapRef {
            words: self.words,
            bits: self.bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// `true` when the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Whether bit `index` is set; `false` past the end.
    pub fn test(&self, index: u64) -> bool {
        self.as_ref().test(index)
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.as_ref().count_ones()
    }

    fn word_mut(&mut self, index: u64) -> Result<(&mut u64, u64), BitmapError> {
        let bits = self.bits;
        if index >= bits {
            return Err(BitmapError::OutOfRange { index, bits });
        }
        let (w, mask) = locate(index);
        self.words
            .get_mut(w)
            .map(|word| (word, mask))
            .ok_or(BitmapError::OutOfRange { index, bits })
    }

    /// Sets bit `index`.
    pub fn set(&mut self, index: u64) -> Result<(), BitmapError> {
        let (word, mask) = self.word_mut(index)?;
        *word |= mask;
        Ok(())
    }

    /// Clears bit `index`.
    pub fn clear(&mut self, index: u64) -> Result<(), BitmapError> {
        let (word, mask) = self.word_mut(index)?;
        *word &= !mask;
        Ok(())
    }

    /// Sets every bit in `range`.
    pub fn set_range(&mut self, range: Range<u64>) -> Result<(), BitmapError> {
        self.update_range(range, true)
    }

    /// Clears every bit in `range`.
    pub fn clear_range(&mut self, range: Range<u64>) -> Result<(), BitmapError> {
        self.update_range(range, false)
    }

    fn update_range(&mut self, range: Range<u64>, value: bool) -> Result<(), BitmapError> {
        if range.end > self.bits {
            return Err(BitmapError::OutOfRange {
                index: range.end,
                bits: self.bits,
            });
        }
        let bits = self.bits;
        for (w, mask) in word_masks(range) {
            let word = self
                .words
                .get_mut(w)
                .ok_or(BitmapError::OutOfRange { index: bits, bits })?;
            if value {
                *word |= mask;
            } else {
                *word &= !mask;
            }
        }
        Ok(())
    }

    /// Clears all bits, including any stray bits past [`len`](Self::len) in the last word.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
}

/// A bitmap shared by channel threads: bits are set and cleared with atomic read-modify-write
/// operations, so threads working on different pages of the same word do not race.
#[cfg(target_has_atomic = "64")]
#[derive(Debug, Clone, Copy)]
pub struct AtomicBitmap<'a> {
    words: &'a [AtomicU64],
    bits: u64,
}

#[cfg(target_has_atomic = "64")]
impl<'a> AtomicBitmap<'a> {
    /// Views `words` as a bitmap of `bits` bits.
    pub fn new(words: &'a [AtomicU64], bits: u64) -> Result<Self, BitmapError> {
        check_len(words.len(), bits)?;
        Ok(Self { words, bits })
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// `true` when the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Sets (`value = true`) or clears every bit in `range`.
    pub fn update_range(&self, range: Range<u64>, value: bool) -> Result<(), BitmapError> {
        if range.end > self.bits {
            return Err(BitmapError::OutOfRange {
                index: range.end,
                bits: self.bits,
            });
        }
        for (w, mask) in word_masks(range) {
            let word = self.words.get(w).ok_or(BitmapError::OutOfRange {
                index: self.bits,
                bits: self.bits,
            })?;
            if value {
                word.fetch_or(mask, Ordering::Relaxed);
            } else {
                word.fetch_and(!mask, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Whether bit `index` is set; `false` past the end.
    pub fn test(&self, index: u64) -> bool {
        if index >= self.bits {
            return false;
        }
        let (w, mask) = locate(index);
        self.words
            .get(w)
            .is_some_and(|word| word.load(Ordering::Relaxed) & mask != 0)
    }

    /// Copies the current bits into `out` (same number of words), masking bits past the end.
    pub fn snapshot(&self, out: &mut [u64]) -> Result<(), BitmapError> {
        if out.len() != self.words.len() {
            return Err(BitmapError::TooFewWords {
                words: out.len(),
                bits: self.bits,
            });
        }
        for (i, (dst, src)) in out.iter_mut().zip(self.words).enumerate() {
            let first = u64::try_from(i).unwrap_or(u64::MAX).saturating_mul(64);
            let valid = self.bits.saturating_sub(first);
            *dst = src.load(Ordering::Relaxed) & low_mask(valid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn file_byte_order() {
        // Spec §a.3: pc.bios bitmap word `80 3f 00 ..` marks pages 7..13.
        let bytes = [0x80, 0x3f, 0, 0, 0, 0, 0, 0];
        let mut words = [0u64; 1];
        decode_le(&bytes, &mut words).unwrap();
        let map = BitmapRef::new(&words, 16).unwrap();
        assert_eq!(map.runs(true).collect::<Vec<_>>(), vec![7..14]);
        assert_eq!(map.count_ones(), 7);
        let mut out = [0u8; 8];
        encode_le(&words, &mut out).unwrap();
        assert_eq!(out, bytes);
        assert_eq!(
            decode_le(&bytes[..7], &mut words),
            Err(BitmapError::ByteLength { bytes: 7, words: 1 })
        );
    }

    #[test]
    fn bounds_are_errors() {
        let mut words = [0u64; 1];
        assert_eq!(
            Bitmap::new(&mut words, 65).err(),
            Some(BitmapError::TooFewWords { words: 1, bits: 65 })
        );
        let mut map = Bitmap::new(&mut words, 10).unwrap();
        assert_eq!(
            map.set(10),
            Err(BitmapError::OutOfRange {
                index: 10,
                bits: 10
            })
        );
        assert_eq!(
            map.set_range(5..11),
            Err(BitmapError::OutOfRange {
                index: 11,
                bits: 10
            })
        );
        assert!(!map.test(1000));
        // Stray bits past the end are not counted or iterated.
        words[0] = u64::MAX;
        let map = BitmapRef::new(&words, 10).unwrap();
        assert_eq!(map.count_ones(), 10);
        assert_eq!(map.runs(true).collect::<Vec<_>>(), vec![0..10]);
        assert_eq!(map.runs(false).count(), 0);
    }

    #[test]
    fn atomic_bitmap_matches() {
        let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let map = AtomicBitmap::new(&words, 130).unwrap();
        map.update_range(60..70, true).unwrap();
        map.update_range(62..64, false).unwrap();
        map.update_range(129..130, true).unwrap();
        assert!(map.update_range(129..131, true).is_err());
        let mut snap = [0u64; 3];
        map.snapshot(&mut snap).unwrap();
        let r = BitmapRef::new(&snap, 130).unwrap();
        assert_eq!(r.runs(true).collect::<Vec<_>>(), [60..62, 64..70, 129..130]);
    }

    proptest! {
        #[test]
        fn runs_match_naive(bits in proptest::collection::vec(any::<bool>(), 0..300),
                            lo in 0u64..320, len in 0u64..320) {
            let n = bits.len() as u64;
            let mut words = vec![0u64; words_for(n) as usize];
            let mut map = Bitmap::new(&mut words, n).unwrap();
            for (i, b) in bits.iter().enumerate() {
                if *b { map.set(i as u64).unwrap(); }
            }
            let r = map.as_ref();
            for value in [true, false] {
                let hi = lo.saturating_add(len);
                let mut naive = Vec::new();
                let mut i = lo;
                while i < hi.min(n) {
                    if bits[i as usize] == value {
                        let s = i;
                        while i < hi.min(n) && bits[i as usize] == value { i += 1; }
                        naive.push(s..i);
                    } else { i += 1; }
                }
                prop_assert_eq!(r.runs_in(lo..hi, value).collect::<Vec<_>>(), naive);
            }
            let ones = bits.iter().filter(|b| **b).count() as u64;
            prop_assert_eq!(r.count_ones(), ones);
            let in_range = bits.iter().enumerate()
                .filter(|(i, b)| **b && (*i as u64) >= lo && (*i as u64) < lo + len).count() as u64;
            prop_assert_eq!(r.count_ones_in(lo..lo + len), in_range);
        }

        #[test]
        fn set_clear_range(n in 1u64..300, a in 0u64..300, b in 0u64..300, value: bool) {
            let (s, e) = (a.min(b).min(n), a.max(b).min(n));
            let mut words = vec![if value { 0 } else { u64::MAX }; words_for(n) as usize];
            let mut map = Bitmap::new(&mut words, n).unwrap();
            if value { map.set_range(s..e).unwrap() } else { map.clear_range(s..e).unwrap() }
            for i in 0..n {
                prop_assert_eq!(map.test(i), if (s..e).contains(&i) { value } else { !value });
            }
        }
    }
}
