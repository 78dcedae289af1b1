//! Shared helpers for the integration tests (QEMU harness, sample images).
