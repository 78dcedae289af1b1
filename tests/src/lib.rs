//! Shared helpers for the integration tests (QEMU harness, sample images).
//!
//! * [`image`] — deterministic guest-RAM images (`fill_pattern`).
//! * [`qemu`] — a QEMU 10.x harness: QMP client, guest configs, `qemu_save` / `qemu_load`.

pub mod image;
pub mod qemu;
