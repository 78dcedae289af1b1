//! Progress reporting and cancellation shared by save and restore.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How far an operation has got, in bytes of guest RAM processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of guest RAM done so far.
    pub done: u64,
    /// Bytes of guest RAM in all.
    pub total: u64,
}

/// A handle that cancels a running save or restore from another thread.
///
/// Channels check it before each chunk of work; a cancelled save removes its temporary file
/// and leaves the previous snapshot in place, a cancelled restore reports which guest memory
/// it had already written.
///
/// ```
/// let cancel = mapped_ram_linux::Cancel::default();
/// let for_other_thread = cancel.clone();
/// for_other_thread.cancel();
/// assert!(cancel.is_cancelled());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A progress callback, called on the caller's thread about every 50 ms and once at the end.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress);
