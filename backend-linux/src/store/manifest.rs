//! The manifest: the one small object at a snapshot's key that says which generation of
//! objects is the snapshot, how long the file is and which objects exist. Writing it is the
//! commit of a save (see the [module docs](super)).

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// What the `format` field of every manifest says.
pub const FORMAT: &str = "mapped-ram-store";
/// The manifest version this crate writes and reads.
pub const VERSION: u32 = 1;
/// The smallest object size (64 KiB) a manifest may name.
pub const MIN_OBJECT_BYTES: u64 = 64 << 10;
/// The largest object size (256 MiB) a manifest may name.
pub const MAX_OBJECT_BYTES: u64 = 256 << 20;
/// The largest manifest read (16 MiB): a bigger object at a snapshot's key is not ours.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// A snapshot's manifest (JSON at the snapshot's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The generation whose objects hold this snapshot: `<key>.objects/<generation>/`.
    pub generation: String,
    /// The generation this one replaced, kept until the next save so that a reader that
    /// started on it (a lazy restore, say) can finish.
    #[serde(default)]
    pub previous: Option<String>,
    /// The mapped-ram file's length in bytes.
    pub file_size: u64,
    /// Where the migration stream starts in the file (a header before it, as libvirt writes).
    #[serde(default)]
    pub stream_offset: u64,
    /// Object size: object `i` holds file bytes `i * object_bytes ..`.
    pub object_bytes: u64,
    /// The objects that exist, as ascending, disjoint half-open index ranges; every other
    /// object reads as zeros.
    pub objects: Vec<[u64; 2]>,
    /// Objects that exist and hold metadata (not only one block's pages): a reader fetches
    /// them first, to parse the stream, the headers and the bitmaps.
    pub metadata: Vec<u64>,
    /// Objects stored without their leading and trailing zeros: `[object, start, end]`, the
    /// file bytes `start..end` the object holds (ascending by object; metadata objects are
    /// always whole). The rest of such an object's range reads as zeros, so a stretch of data
    /// smaller than an object costs its own size, not the object's.
    #[serde(default)]
    pub trimmed: Vec<[u64; 3]>,
    /// Bytes uploaded in all (the sum of the objects' lengths).
    pub stored_bytes: u64,
    /// When the save committed, seconds since the Unix epoch.
    #[serde(default)]
    pub created_unix: u64,
}

impl Manifest {
    /// Checks everything a reader relies on; the reason when it does not hold.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, not {FORMAT:?}", self.format));
        }
        if self.version != VERSION {
            return Err(format!(
                "manifest version {} (this build reads {VERSION})",
                self.version
            ));
        }
        if !self.object_bytes.is_power_of_two()
            || !(MIN_OBJECT_BYTES..=MAX_OBJECT_BYTES).contains(&self.object_bytes)
        {
            return Err(format!("object size {} is not allowed", self.object_bytes));
        }
        if !valid_generation(&self.generation) {
            return Err(format!("generation {:?} is not valid", self.generation));
        }
        if let Some(p) = &self.previous {
            if !valid_generation(p) {
                return Err(format!("previous generation {p:?} is not valid"));
            }
        }
        let count = self.object_count();
        let mut last = 0u64;
        for (i, r) in self.objects.iter().enumerate() {
            if r[0] >= r[1] || r[1] > count || (i > 0 && r[0] <= last) {
                return Err(format!(
                    "object range {}..{} is empty, out of order or past the {count} objects",
                    r[0], r[1]
                ));
            }
            last = r[1];
        }
        for &m in &self.metadata {
            if !self.has(m) {
                return Err(format!("metadata object {m} is not among the objects"));
            }
        }
        let mut previous: Option<u64> = None;
        for &[object, start, end] in &self.trimmed {
            let whole = self.object_range(object);
            if !self.has(object)
                || self.metadata.binary_search(&object).is_ok()
                || previous.is_some_and(|p| p >= object)
                || start >= end
                || start < whole.start
                || end > whole.end
            {
                return Err(format!(
                    "trimmed object {object} (bytes {start:#x}..{end:#x}) is not a stored data object, out of order or outside its range"
                ));
            }
            previous = Some(object);
        }
        if self.stream_offset >= self.file_size.max(1) {
            return Err(format!(
                "stream offset {} is past the file size {}",
                self.stream_offset, self.file_size
            ));
        }
        Ok(())
    }

    /// How many objects the file has (present or not).
    pub fn object_count(&self) -> u64 {
        mapped_ram_core::objects::object_count(self.file_size, self.object_bytes)
    }

    /// Whether object `index` exists.
    pub fn has(&self, index: u64) -> bool {
        let i = self.objects.partition_point(|r| r[1] <= index);
        self.objects.get(i).is_some_and(|r| r[0] <= index)
    }

    /// Every object that exists, in order.
    pub fn present(&self) -> impl Iterator<Item = u64> + '_ {
        self.objects.iter().flat_map(|r| r[0]..r[1])
    }

    /// How many objects exist.
    pub fn present_count(&self) -> u64 {
        self.objects.iter().map(|r| r[1] - r[0]).sum()
    }

    /// The file bytes of object `index` (the last one may be short).
    pub fn object_range(&self, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.object_bytes);
        start..start.saturating_add(self.object_bytes).min(self.file_size)
    }

    /// The file bytes object `index` holds: its whole range, or less if it was stored
    /// trimmed.
    pub fn stored_range(&self, index: u64) -> Range<u64> {
        match self.trimmed.binary_search_by_key(&index, |t| t[0]) {
            Ok(i) => self.trimmed[i][1]..self.trimmed[i][2],
            Err(_) => self.object_range(index),
        }
    }

    /// The ranges of `indices` (ascending), merged.
    pub fn ranges_of(indices: impl IntoIterator<Item = u64>) -> Vec<[u64; 2]> {
        let mut out: Vec<[u64; 2]> = Vec::new();
        for i in indices {
            match out.last_mut() {
                Some(r) if r[1] == i => r[1] += 1,
                _ => out.push([i, i + 1]),
            }
        }
        out
    }
}

/// The part of an object's bytes `buf` worth storing: from its first to its last 4 KiB
/// block that is not all zeros; `None` if it is all zeros.
pub(crate) fn stored_extent(buf: &[u8]) -> Option<Range<usize>> {
    const BLOCK: usize = 4096;
    let nonzero =
        |i: &usize| !crate::zero::is_zero(&buf[i * BLOCK..((i + 1) * BLOCK).min(buf.len())]);
    let blocks = buf.len().div_ceil(BLOCK);
    let first = (0..blocks).find(nonzero)?;
    let last = (first..blocks).rev().find(nonzero)?;
    Some(first * BLOCK..((last + 1) * BLOCK).min(buf.len()))
}

/// A generation name: 1 to 64 of `[0-9a-z-]`.
pub(crate) fn valid_generation(g: &str) -> bool {
    (1..=64).contains(&g.len())
        && g.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

/// A new generation name: the time in milliseconds (hex, so names sort by age) and 32 random
/// bits.
pub(crate) fn new_generation() -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    format!("{:012x}-{:08x}", now.as_millis(), h.finish() as u32)
}

/// When a generation started (milliseconds since the epoch), from its name, if it is one of
/// ours.
pub(crate) fn generation_start(g: &str) -> Option<u64> {
    let (millis, _) = g.split_once('-')?;
    if millis.len() != 12 {
        return None;
    }
    u64::from_str_radix(millis, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            generation: new_generation(),
            previous: None,
            file_size: 10 << 20,
            stream_offset: 0,
            object_bytes: 4 << 20,
            objects: Manifest::ranges_of([0, 2]),
            metadata: vec![0],
            trimmed: vec![[2, (8 << 20) + 4096, 9 << 20]],
            stored_bytes: (5 << 20) - 4096,
            created_unix: 0,
        }
    }

    #[test]
    fn checks_and_answers() {
        let m = sample();
        m.check().unwrap();
        assert!(m.has(0) && !m.has(1) && m.has(2) && !m.has(3));
        assert_eq!(m.object_range(2), (8 << 20)..(10 << 20));
        assert_eq!(m.present().collect::<Vec<_>>(), [0, 2]);
        let mut bad = m.clone();
        bad.objects = vec![[2, 3], [0, 1]];
        assert!(bad.check().is_err());
        let mut bad = m.clone();
        bad.metadata = vec![1];
        assert!(bad.check().is_err());
        let mut bad = m.clone();
        bad.generation = "../x".into();
        assert!(bad.check().is_err());
        assert_eq!(m.stored_range(2), (8 << 20) + 4096..9 << 20);
        assert_eq!(m.stored_range(0), 0..4 << 20);
        for t in [
            [0, 0, 4096],                 // a metadata object
            [1, 4 << 20, 5 << 20],        // absent
            [2, 7 << 20, 9 << 20],        // outside its range
            [2, 9 << 20, 9 << 20],        // empty
            [2, 8 << 20, (10 << 20) + 1], // past the file
        ] {
            let mut bad = m.clone();
            bad.trimmed = vec![t];
            assert!(bad.check().is_err(), "{t:?}");
        }
    }

    #[test]
    fn stored_extent_trims_zero_blocks() {
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(stored_extent(&buf), None);
        buf[5000] = 1;
        assert_eq!(stored_extent(&buf), Some(4096..8192));
        buf[40000] = 1;
        assert_eq!(stored_extent(&buf), Some(4096..40960));
        let short = vec![1u8; 5000];
        assert_eq!(stored_extent(&short), Some(0..5000));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let started = generation_start(&new_generation()).unwrap();
        assert!(started <= now + 1 && now - started < 5000);
        assert_eq!(generation_start("bad"), None);
    }
}
