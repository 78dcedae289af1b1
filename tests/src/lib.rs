//! Shared helpers for the integration tests (QEMU harness, sample images).
//!
//! * [`image`] — deterministic guest-RAM images (`fill_pattern`).
//! * [`qemu`] — a QEMU 10.x harness: QMP client, guest configs, `qemu_save` / `qemu_load`.
//! * [`support`] — the `mapped-ram` binary's path, a reproducible random number generator.

pub mod image;
pub mod qemu;
pub mod support;
