//! Fault injection: makes chosen I/O operations fail, come up short or be interrupted, so
//! tests can prove that every failure is reported with its operation, path and offset, that
//! short transfers and `EINTR` are retried, and that no snapshot is lost.
//!
//! Compiled in with the `fault-injection` Cargo feature; without it, the hooks are empty
//! inline functions. Faults are process-wide: a test binary that arms them must run its tests
//! one at a time (hold `fault::serial()` for the whole test).
//!
//! ```
//! # #[cfg(feature = "fault-injection")] {
//! use mapped_ram_linux::fault::{self, Fault, FaultKind};
//! use mapped_ram_linux::Op;
//!
//! let _guard = fault::serial();
//! // The third page-data write fails with ENOSPC.
//! fault::inject(Fault { op: Op::WritePages, skip: 2, count: 1, kind: FaultKind::Errno(28) });
//! // ... run a save and check its error ...
//! fault::clear();
//! # }
//! ```

use crate::error::Op;

/// What an injected fault does.
#[derive(Debug, Clone, Copy)]
pub enum FaultKind {
    /// The operation fails with this `errno` (e.g. 5 `EIO`, 28 `ENOSPC`, 22 `EINVAL`). The
    /// wrapper treats it like the kernel's answer: `EINTR` (4) is retried, `EAGAIN` (11) is
    /// retried a bounded number of times (the retry policy in RELIABILITY.md), anything else
    /// fails the operation.
    Errno(i32),
    /// A read or write transfers at most this many bytes (a short transfer, not an error).
    Short(usize),
    /// The system call is interrupted (`EINTR`) before it transfers anything.
    Interrupt,
    /// This function runs just before the system call, which then goes ahead: a deterministic
    /// point at which a test makes a race happen (rename another snapshot over the path,
    /// replace a file with a symbolic link, truncate a RAM file).
    Hook(fn()),
    /// An object-store request is answered with this HTTP status (e.g. 503) without reaching
    /// the gateway; the client's retry policy judges it as it would the gateway's answer.
    Status(u16),
    /// The request waits this long first, then goes ahead: a slow gateway (the request's
    /// timeout counts the wait).
    Delay(std::time::Duration),
    /// The connection is reset before the request is answered.
    Reset,
}

/// One armed fault.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// The operation it applies to.
    pub op: Op,
    /// Matching operations to let through first.
    pub skip: u64,
    /// How many matching operations it then affects.
    pub count: u64,
    /// What it does.
    pub kind: FaultKind,
}

/// What the hook tells an I/O wrapper to do.
#[derive(Debug)]
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
pub(crate) enum Injected {
    Fail(std::io::Error),
    Short(usize),
    Interrupt,
    Status(u16),
    Delay(std::time::Duration),
    Reset,
}

#[cfg(feature = "fault-injection")]
mod imp {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, MutexGuard};

    struct Armed {
        fault: Fault,
        seen: u64,
        fired: u64,
    }

    static ARMED: AtomicBool = AtomicBool::new(false);
    static TABLE: Mutex<Vec<Armed>> = Mutex::new(Vec::new());
    static SERIAL: Mutex<()> = Mutex::new(());

    fn table() -> MutexGuard<'static, Vec<Armed>> {
        TABLE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialises tests that arm faults; hold the guard for the whole test.
    pub fn serial() -> MutexGuard<'static, ()> {
        let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        clear();
        guard
    }

    /// Arms a fault.
    pub fn inject(fault: Fault) {
        table().push(Armed {
            fault,
            seen: 0,
            fired: 0,
        });
        ARMED.store(true, Ordering::SeqCst);
    }

    /// Disarms every fault.
    pub fn clear() {
        table().clear();
        ARMED.store(false, Ordering::SeqCst);
    }

    /// How many times faults on `op` have fired since they were armed.
    pub fn fired(op: Op) -> u64 {
        table()
            .iter()
            .filter(|a| a.fault.op == op)
            .map(|a| a.fired)
            .sum()
    }

    /// How many `op` operations (attempts, retries included) the first fault armed for `op`
    /// has seen: arm one with `count: 0` to count the calls of a clean run, then inject at
    /// every `skip` below that number.
    pub fn seen(op: Op) -> u64 {
        table()
            .iter()
            .find(|a| a.fault.op == op)
            .map(|a| a.seen)
            .unwrap_or(0)
    }

    pub(crate) fn check(op: Op) -> Option<Injected> {
        if !ARMED.load(Ordering::Relaxed) {
            return None;
        }
        let mut table = table();
        for armed in table.iter_mut().filter(|a| a.fault.op == op) {
            armed.seen += 1;
            if armed.seen > armed.fault.skip && armed.fired < armed.fault.count {
                armed.fired += 1;
                return match armed.fault.kind {
                    FaultKind::Errno(e) => {
                        Some(Injected::Fail(std::io::Error::from_raw_os_error(e)))
                    }
                    FaultKind::Short(n) => Some(Injected::Short(n)),
                    FaultKind::Interrupt => Some(Injected::Interrupt),
                    FaultKind::Status(code) => Some(Injected::Status(code)),
                    FaultKind::Delay(d) => Some(Injected::Delay(d)),
                    FaultKind::Reset => Some(Injected::Reset),
                    FaultKind::Hook(f) => {
                        // Run it without the table locked: it may do I/O of its own.
                        drop(table);
                        f();
                        None
                    }
                };
            }
        }
        None
    }
}

#[cfg(feature = "fault-injection")]
pub use imp::{clear, fired, inject, seen, serial};

#[cfg(feature = "fault-injection")]
pub(crate) use imp::check;

/// Without the `fault-injection` feature nothing is ever injected.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn check(_op: Op) -> Option<Injected> {
    None
}
