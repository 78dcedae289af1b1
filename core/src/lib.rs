//! # mapped-ram-core
//!
//! The operating-system-free heart of *mapped-ram*: everything needed to write and read
//! QEMU's `mapped-ram` migration file format except the I/O itself.
//!
//! * [`caps`] — QEMU 10.0's capability and parameter rules, plus a strict mode for our engine.
//! * [`layout`] — the 28-byte per-block header and the offset/alignment math of the file.
//! * [`stream`] — the QEMU migration stream framing around RAM (encoder and decoder).
//! * [`bitmap`] — the per-block page bitmap in the file's little-endian word layout.
//! * [`schedule`] — turning pages into large, aligned I/O extents and sharing them among channels.
//! * [`integrity`] — this project's checksum records (anchor, table, footer, metadata ranges),
//!   kept where QEMU's loader does not look.
//! * [`matching`] — which block of a snapshot a region of guest memory names.
//! * [`plan`] — the file-level steps of a save: what to allocate, what to punch, in what order.
//!
//! The crate is `#![no_std]`, needs no allocator, contains no `unsafe` code and is written so
//! that no input can make it panic, overflow or index out of bounds (checked by clippy's
//! `arithmetic_side_effects` and `indexing_slicing` lints and by the fuzzers in `fuzz/`).
//! The format reference is QEMU 10.0's `migration/ram.c`; see the project's spec notes.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::arithmetic_side_effects,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::cast_possible_truncation
    )
)]

pub mod bitmap;
pub mod caps;
pub mod integrity;
pub mod layout;
pub mod matching;
pub mod objects;
pub mod plan;
pub mod schedule;
pub mod stream;
