//! Shared helpers for the integration tests (QEMU harness, sample images).
//!
//! * [`guest`] — a real Linux guest: kernel and busybox files, initramfs, serial ticks.
//! * [`image`] — deterministic guest-RAM images (`fill_pattern`).
//! * [`qemu`] — a QEMU 10.x harness: QMP client, guest configs, `qemu_save` / `qemu_load`.
//! * [`rgw`] — a real S3 endpoint: Ceph's radosgw on 127.0.0.1 (`scripts/ceph-rgw/`), shared
//!   or private, with bucket, object and usage helpers.
//! * [`support`] — the `mapped-ram` binary's path, a reproducible random number generator,
//!   the `MAPPED_RAM_ALLOW_SKIP` gate.

pub mod guest;
pub mod image;
pub mod qemu;
pub mod rgw;
pub mod support;
