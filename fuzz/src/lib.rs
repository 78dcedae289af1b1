//! Fuzz harness bodies for `mapped-ram-core`, shared by the cargo-fuzz targets in
//! `fuzz_targets/` and by the corpus replay test below, so `cargo test` re-runs every input in
//! `corpus/` (seeds and anything a fuzzing run found) on the stable toolchain.
//!
//! Run a target with `cargo +nightly fuzz run layout` (or `stream`, `schedule`, `caps`, `integrity`).

pub mod caps;
pub mod integrity;
pub mod layout;
pub mod schedule;
pub mod stream;

/// A harness body: runs one input, panicking on a violated invariant.
pub type Harness = fn(&[u8]);

/// The targets and their harness functions.
pub const TARGETS: &[(&str, Harness)] = &[
    ("caps", caps::run),
    ("integrity", integrity::run),
    ("layout", layout::run),
    ("schedule", schedule::run),
    ("stream", stream::run),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays every corpus and regression input of every target.
    #[test]
    fn replay_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, run) in super::TARGETS {
            let mut count = 0;
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let data = std::fs::read(entry.path()).expect("corpus file readable");
                    run(&data);
                    count += 1;
                }
            }
            assert!(count > 0, "no corpus inputs for fuzz target {name}");
            eprintln!("replayed {count} inputs for {name}");
        }
    }
}
