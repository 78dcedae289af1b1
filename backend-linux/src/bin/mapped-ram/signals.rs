//! SIGINT and SIGTERM: they cancel a running save, restore, `put` or `get` through the
//! library's [`Cancel`] handle, so that a save removes its temporary file (a store save or
//! `put` its uploaded objects) and keeps the previous snapshot.
//!
//! The handler itself only writes to a pipe (`signal-hook`'s iterator); a thread reads it and
//! acts:
//!
//! * while a cancellable operation runs ([`Interrupts::arm`]): the first signal cancels it;
//!   the command then fails with `error: … cancelled by SIGINT …` and exit status 128 + the
//!   signal number (130 for SIGINT, 143 for SIGTERM). A second signal ends the process at once
//!   with that status (a save's temporary file may then be left; the next save of the same
//!   target removes it).
//! * otherwise (parsing, inspecting, verifying, between steps): the process ends at once with
//!   a one-line `error: interrupted by …` and the same status. Nothing is being written then
//!   that a signal could leave half done.
//!
//! A test hook makes the race deterministic: with `MAPPED_RAM_TEST_SIGNAL_AT_PROGRESS=INT` (or
//! `TERM`) the tool sends itself that signal at the first progress report of a save or restore
//! — while its channels run — and waits until the signal has cancelled the operation.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mapped_ram_linux::Cancel;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::output::CliError;

/// The environment variable of the test hook (see the module documentation).
const TEST_HOOK: &str = "MAPPED_RAM_TEST_SIGNAL_AT_PROGRESS";

/// The name of a signal we handle.
fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The signal state shared with the signal thread.
#[derive(Clone)]
pub struct Interrupts {
    cancel: Cancel,
    armed: Arc<AtomicBool>,
    received: Arc<AtomicI32>,
}

impl Interrupts {
    /// Installs the SIGINT and SIGTERM handlers and starts the thread that acts on them.
    pub fn install() -> Result<Self, CliError> {
        let mut signals = Signals::new([SIGINT, SIGTERM])
            .map_err(|e| CliError::new(format!("cannot install signal handlers: {e}")))?;
        let me = Interrupts {
            cancel: Cancel::default(),
            armed: Arc::new(AtomicBool::new(false)),
            received: Arc::new(AtomicI32::new(0)),
        };
        let state = me.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let first = state.received.swap(signal, Ordering::SeqCst) == 0;
                    if first && state.armed.load(Ordering::SeqCst) {
                        state.cancel.cancel();
                        continue;
                    }
                    let note = if first {
                        ""
                    } else {
                        " again before the cancelled operation ended (a temporary file left by a save is removed by the next save of the same target)"
                    };
                    eprintln!("error: interrupted by {}{note}", name(signal));
                    std::process::exit(128 + signal);
                }
            })
            .map_err(|e| CliError::new(format!("cannot start the signal thread: {e}")))?;
        Ok(me)
    }

    /// Marks a cancellable operation as running and returns its cancel handle; signals cancel
    /// it until the guard is dropped.
    pub fn arm(&self) -> Armed<'_> {
        self.armed.store(true, Ordering::SeqCst);
        if self.received.load(Ordering::SeqCst) != 0 {
            // A signal came before arming: the thread has already ended the process or is
            // about to; make sure the operation does not start anyway.
            self.cancel.cancel();
        }
        Armed { interrupts: self }
    }

    /// The signal received so far, if any.
    pub fn received(&self) -> Option<i32> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// The error of an operation `what` that failed after `signal` cancelled it: the library's
    /// message, which signal, and exit status 128 + its number.
    pub fn cancelled(&self, signal: i32, what: &str, detail: impl std::fmt::Display) -> CliError {
        CliError {
            message: format!("{what} cancelled by {}: {detail}", name(signal)),
            status: 128 + signal,
            cancelled: true,
        }
    }

    /// The result of a cancellable operation `what` (e.g. `save of FILE`): when a signal
    /// arrived during it and the library reported the cancellation, the error with exit
    /// status 128 + signal, saying what the cancellation `left`; when it failed for another
    /// reason meanwhile, that reason with the signal's status; when it completed anyway, the
    /// result and a note.
    pub fn outcome<T>(
        &self,
        result: Result<T, CliError>,
        what: &str,
        left: &str,
    ) -> Result<T, CliError> {
        match (result, self.received()) {
            (Err(e), Some(signal)) if e.cancelled => {
                Err(self.cancelled(signal, what, format!("{}; {left}", e.message)))
            }
            (Err(e), Some(signal)) => Err(CliError {
                status: 128 + signal,
                ..e
            }),
            (Ok(v), Some(_)) => {
                eprintln!("note: the signal arrived after the {what} was complete");
                Ok(v)
            }
            (r, None) => r,
        }
    }

    /// A progress callback for the test hook (a no-op unless the hook's variable is set).
    pub fn test_hook(&self) -> impl FnMut() + '_ {
        let signal = match std::env::var(TEST_HOOK).as_deref() {
            Ok("INT") => Some(SIGINT),
            Ok("TERM") => Some(SIGTERM),
            _ => None,
        };
        let mut fired = false;
        move || {
            let Some(signal) = signal else { return };
            if fired {
                return;
            }
            fired = true;
            if signal_hook::low_level::raise(signal).is_err() {
                return;
            }
            // Wait (bounded) until the signal thread has seen it, so the operation is
            // cancelled while its channels still run.
            let until = Instant::now() + Duration::from_secs(10);
            while !self.cancel.is_cancelled() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A running cancellable operation (see [`Interrupts::arm`]).
pub struct Armed<'a> {
    interrupts: &'a Interrupts,
}

impl Armed<'_> {
    /// The handle to pass in the operation's options.
    pub fn cancel(&self) -> Cancel {
        self.interrupts.cancel.clone()
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.interrupts.armed.store(false, Ordering::SeqCst);
    }
}
