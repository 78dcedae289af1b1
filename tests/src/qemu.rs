//! QEMU 10.x harness: start `qemu-system-x86_64` with a file-backed guest RAM, drive it over
//! QMP, save its RAM with `mapped-ram` to a file ([`qemu_save`]) and load such a file back
//! into a fresh QEMU ([`qemu_load`]), so tests can compare RAM byte for byte in both
//! directions (QEMU → our reader, our writer → QEMU).
//!
//! Use [`require_qemu`] as the first line of every QEMU test: the test fails when QEMU
//! 10.x is missing unless `MAPPED_RAM_ALLOW_SKIP` names `qemu` (then a `SKIPPED` line on stderr).
//!
//! # How a guest is started
//!
//! ```text
//! qemu-system-x86_64 -nodefaults -no-user-config -display none -S -accel tcg \
//!   -object memory-backend-file,id=mem,size=<bytes>,mem-path=/dev/shm/mapped-ram-test-<unique>,share=on \
//!   -machine none,memory-backend=mem            # MachineKind::None
//!   -machine microvm,acpi=off,memory-backend=mem  # MachineKind::Microvm
//!   -machine pc,memory-backend=mem              # MachineKind::Pc
//!   -machine q35,memory-backend=mem             # MachineKind::Q35
//!   -qmp unix:<tmpdir>/qmp.sock,server=on,wait=off  [-incoming defer]
//! ```
//!
//! * No `-m` is needed: the RAM size is taken from the backend.
//! * `share=on` makes the `/dev/shm` file *be* the guest RAM: the source's RAM is set by
//!   writing the file before QEMU starts; the destination starts from a fresh sparse (zero)
//!   file, and after the load the file holds the loaded RAM.
//! * The guest never runs (`-S`), so the accelerator does not matter; TCG is the default
//!   ([`Accel::Tcg`]); `Accel::Auto`/`Kvm` also work (verified with KVM on the dev machine).
//!   (`tests/tests/linux_guest.rs` does run a guest: it sends `cont` after the start, see
//!   [`crate::guest`].)
//! * stdout+stderr go to `<tmpdir>/qemu.log`; its tail is part of every [`HarnessError`].
//! * The child is SIGKILLed on drop of [`Qemu`] and gets `PR_SET_PDEATHSIG=SIGKILL`.
//!   (QEMU's own `-run-with exit-with-parent=on` is **not** available in Debian's 10.0.2
//!   build: "Invalid parameter 'exit-with-parent'".)
//! * Every wait is bounded by [`GuestConfig::timeout`] (default 120 s, env
//!   `MAPPED_RAM_QEMU_TIMEOUT_SECS`): QMP socket appearance, each QMP reply, the migration.
//!   On a timeout QEMU is killed and the error carries the last `query-migrate` output.
//!
//! # QMP sequences (verified with QEMU 10.0.2, Debian `1:10.0.2+ds-2+deb13u1~bpo12+1`)
//!
//! Save (source, run state `prelaunch` because of `-S`):
//!
//! ```text
//! qmp_capabilities
//! migrate-set-capabilities {"capabilities":[{"capability":"mapped-ram","state":true},
//!                                           {"capability":"multifd","state":true}]}   # multifd optional
//! migrate-set-parameters {"max-bandwidth":107374182400,"multifd-channels":2,"direct-io":true}
//! migrate {"uri":"file:/path/f.mig[,offset=4096]"}
//! query-migrate   (poll)  -> {"status":"completed", "ram":{...}}
//! query-status            -> "postmigrate"
//! quit
//! ```
//!
//! Load (destination started with `-incoming defer`; run state `inmigrate` before):
//!
//! ```text
//! qmp_capabilities
//! migrate-set-capabilities   (same caps; must precede migrate-incoming)
//! migrate-set-parameters {"multifd-channels":N,"direct-io":true}   # if wanted
//! migrate-incoming {"uri":"file:/path/f.mig[,offset=4096]","exit-on-error":false}
//! query-migrate   (poll)  -> {"status":"completed"}   (only "status" on the destination)
//! query-status            -> "prelaunch"   (not "paused"/"postmigrate": -S + source never ran)
//! ```
//!
//! * Destination completion: `query-migrate` `status == "completed"` is reliable for all three
//!   machine kinds; at that point the backing file already holds all RAM.
//! * `exit-on-error: false` (QEMU >= 9.1) keeps a failed destination alive so the failure can be
//!   read: `query-migrate` then says `{"status":"failed","error-desc":"load of migration
//!   failed: Invalid argument"}` — generic; the real reason is only on stderr, e.g.
//!   `Machine type received is 'none' and local is 'microvm'` or `error while loading state
//!   for instance 0x0 of device 'ram'` (truncated file). Both end up in [`HarnessError`].
//! * With `multifd` + `direct-io`, strace shows the source opening the file once
//!   `O_WRONLY|O_CREAT` (main) and N times `O_WRONLY|O_DIRECT` (channels), the destination
//!   `O_RDONLY` + N × `O_RDONLY|O_DIRECT` — as in spec §e. Files must then live on a file
//!   system with O_DIRECT: use [`disk_temp_dir`] (the dev machine's `/tmp` is ext4).
//! * A file saved without multifd loads with 4 multifd channels (and vice versa; spec §b.6).
//! * `pause-before-switchover` works with mapped-ram: the source then sits in status
//!   `pre-switchover` (used by the timeout test).
//! * Opening a `file:` URI that is a FIFO blocks QEMU's main loop inside the QMP command (no
//!   reply at all) — the QMP timeout path handles it.
//!
//! # RAM blocks observed (QEMU 10.0.2, x86-64, `-nodefaults`, memory-backend id `mem`)
//!
//! The block backed by `-object memory-backend-*,id=X` is named **`X`** (here `mem`) in
//! `x-query-ramblock` and in the migration file — not `pc.ram`/`microvm.ram`. Without a
//! memory-backend (plain `-m`), the main block is `ram` (`none`), `microvm.ram` (microvm) or
//! `pc.ram` (pc/q35); the spec's §a.6 example used `-m`, hence `microvm.ram` there.
//! The file lists blocks in `x-query-ramblock` order (largest `max_length` first); TCG and KVM
//! give the same list. Sizes below are `used_length` (what the file stores).
//!
//! | machine | block | used | max | ro | guest-physical / content |
//! |---|---|---|---|---|---|
//! | `none` (file name `none`) | `mem` | RAM size | = | rw | GPA 0 |
//! | `microvm,acpi=off` (file name `microvm`) | `mem` | RAM size | = | rw | GPA 0, but 0xf0000..0x100000 shows the pc.bios alias |
//! | | `pc.bios` | 0x10000 (64 KiB) | = | **rw** | at 4 GiB − 64 KiB and (ISA alias) at 0xf0000; = `/usr/share/qemu/qboot.rom` |
//! | `pc` (file name `pc-i440fx-10.0`) | `mem` | RAM size | = | rw | GPA 0 (0xa0000..0x100000 shadowed by VGA/ROM windows) |
//! | | `/rom@etc/acpi/tables` | 0x20000 | 0x200000 | ro | fw_cfg blob, not guest-mapped |
//! | | `pc.bios` | 0x40000 (256 KiB) | = | ro | at 4 GiB − 256 KiB (last 128 KiB aliased at 0xe0000); = `/usr/share/seabios/bios-256k.bin` |
//! | | `pc.rom` | 0x20000 | = | ro | at 0xc0000; all zero with `-nodefaults` (no option ROMs) |
//! | | `/rom@etc/table-loader` | 0x1000 | 0x10000 | ro | fw_cfg blob |
//! | | `/rom@etc/acpi/rsdp` | 0x1000 | = | ro | fw_cfg blob |
//!
//! (`q35` gives the same six blocks; `microvm` *with* ACPI has `mem`, `/rom@etc/acpi/tables`
//! 0x1000, `pc.bios` 0x20000 = seabios `bios-microvm.bin`, `/rom@etc/table-loader`,
//! `/rom@etc/acpi/rsdp`.)
//!
//! Expected content of every block, for comparisons: the main block is the backing file;
//! every other block is captured from the QEMU process itself by [`Qemu::read_ram_block`]
//! (`/proc/PID/mem` at the block's HVA from `x-query-ramblock`, `used` bytes — exactly the
//! bytes migration reads, including fw_cfg blobs that `pmemsave` cannot reach; needs ptrace
//! access to the child, which a parent has under Yama `ptrace_scope` ≤ 1). [`qemu_save`] and
//! [`qemu_load`] return these captures in `block_contents`. [`Qemu::pmemsave`] over QMP gives
//! the same bytes for guest-mapped blocks (verified for microvm's `pc.bios` at 0xffff0000 and
//! pc's `pc.bios` at 0xfffc0000).
//!
//! A QEMU destination does **not** copy ROM images into ROM blocks while `inmigrate`
//! (`rom_reset` skips them), so after a load every non-main block holds exactly what the file
//! provided, zero elsewhere; loading a QEMU-made file reproduces the source's blocks exactly.
//!
//! # File facts observed (differences from / additions to the spec)
//!
//! * `-machine none`: configuration name `none` (4 bytes), capabilities `["mapped-ram"]`,
//!   MEM_SIZE word at 0x51, block record `mem` at 0x59, header at 0x65, bitmap_offset 0x81,
//!   pages_offset 0x100000, device stream at 0x100000 + RAM size (≈1.3 KiB of device state +
//!   vmdesc follow; 64 MiB RAM gave a file of 0x4100504 bytes).
//! * microvm: `mem` header at 0x68 (bitmap_offset 0x84), `pc.bios` record at
//!   0x100000 + RAM size, its pages at 0x200000 + RAM size (the spec's layout with `mem` for
//!   `microvm.ram`). With `-S` (guest never ran) the `pc.bios` bitmap byte pair is `3f 80`
//!   (pages 0–5 and 15 = the non-zero pages of qboot.rom), not the spec example's `80 3f`
//!   (pages 7–13, after the guest had run for 2 s).
//! * pc: machine name `pc-i440fx-10.0` (14 bytes); MEM_SIZE at 0x5b (in general
//!   0x4d + name length with caps `[mapped-ram]`); MEM_SIZE total =
//!   RAM + 0x82000 (sum of the used lengths above).
//! * `file:PATH,offset=0x1000` (passed as `offset=4096`): prefix untouched (trailing bytes
//!   beyond the offset are truncated away), header/bitmap offsets shift by 0x1000
//!   (`none`: bitmap_offset 0x1081), first pages_offset stays the absolute 0x100000.
//! * Source run state after the save is `postmigrate`; `query-migrate` on the source has
//!   `ram.total` = sum of block lengths.
//! * Timing on the dev machine (2 shared cores, debug build, ext4): 64 MiB save 0.2 s without
//!   multifd, 0.8 s with 2 channels + direct-io; load 0.1 s / 0.3 s.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Environment variable that overrides the QEMU binary (default `qemu-system-x86_64`).
pub const QEMU_ENV: &str = "MAPPED_RAM_QEMU";
/// Environment variable that overrides the default wait timeout, in seconds (default 120).
pub const TIMEOUT_ENV: &str = "MAPPED_RAM_QEMU_TIMEOUT_SECS";
/// QEMU major version the harness is written against.
pub const REQUIRED_MAJOR: u32 = 10;
/// Id of the `memory-backend-file` object; QEMU names the guest-RAM block after it.
pub const MEMORY_BACKEND_ID: &str = "mem";
/// Name of the main guest-RAM block in the migration file (== [`MEMORY_BACKEND_ID`]).
pub const MAIN_RAM_BLOCK: &str = MEMORY_BACKEND_ID;
/// `max-bandwidth` set on the source: 100 GiB/s (effectively unlimited).
pub const MAX_BANDWIDTH: u64 = 100 << 30;
/// How many bytes of QEMU's log are quoted in errors.
const LOG_TAIL_BYTES: u64 = 4096;

// ------------------------------------------------------------------------------------------------
// Availability
// ------------------------------------------------------------------------------------------------

/// A parsed `qemu-system-x86_64 --version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major version (10 for 10.0.2).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// The whole first line of `--version`.
    pub banner: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The QEMU binary used: `$MAPPED_RAM_QEMU` or `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os(QEMU_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

fn parse_version(out: &str) -> Option<QemuVersion> {
    let line = out.lines().next()?.trim().to_string();
    let rest = &line[line.find("version ")? + "version ".len()..];
    let ver = rest.split_whitespace().next()?;
    let mut it = ver.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    let major = it.next()?.ok()?;
    let minor = it.next().and_then(Result::ok).unwrap_or(0);
    let micro = it.next().and_then(Result::ok).unwrap_or(0);
    Some(QemuVersion {
        major,
        minor,
        micro,
        banner: line,
    })
}

/// The installed QEMU's version, or `None` if the binary cannot be run (cached).
pub fn qemu_version() -> Option<QemuVersion> {
    static V: OnceLock<Option<QemuVersion>> = OnceLock::new();
    V.get_or_init(|| {
        let out = Command::new(qemu_binary())
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        parse_version(&String::from_utf8_lossy(&out.stdout))
    })
    .clone()
}

/// Why QEMU-based tests cannot run here, or `None` if they can.
pub fn unavailable_reason() -> Option<String> {
    match qemu_version() {
        None => {
            return Some(format!(
                "{} not found or not runnable (install QEMU {REQUIRED_MAJOR}.x: .ci/install-deps)",
                qemu_binary().display()
            ))
        }
        Some(v) if v.major != REQUIRED_MAJOR => {
            return Some(format!(
                "{} is QEMU {v}, the harness needs QEMU {REQUIRED_MAJOR}.x (.ci/install-deps)",
                qemu_binary().display()
            ))
        }
        Some(_) => {}
    }
    if !Path::new("/dev/shm").is_dir() {
        return Some("/dev/shm does not exist (guest RAM is backed by files in it)".into());
    }
    None
}

/// True if QEMU 10.x is installed and `/dev/shm` exists.
pub fn qemu_available() -> bool {
    unavailable_reason().is_none()
}

/// True when running under CI (`CI` set to anything but empty, `0` or `false`).
pub fn running_in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

/// Gate for QEMU tests: returns the QEMU version if QEMU 10.x is usable.
///
/// Otherwise the test **fails** (panics), in CI and outside it alike, unless
/// `MAPPED_RAM_ALLOW_SKIP` names `qemu` (or `all`): then it prints a loud `SKIPPED` line and
/// returns `None`. A missing QEMU is never a silent pass.
///
/// ```ignore
/// let Some(_qemu) = require_qemu() else { return };
/// ```
pub fn require_qemu() -> Option<QemuVersion> {
    match unavailable_reason() {
        None => qemu_version(),
        Some(why) => {
            crate::support::cannot_run("qemu", &why);
            None
        }
    }
}

/// Default timeout of every wait (`$MAPPED_RAM_QEMU_TIMEOUT_SECS`, default 120 s).
pub fn default_timeout() -> Duration {
    let secs = std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// True if `/dev/kvm` can be opened read-write.
pub fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

/// Errors of the QMP client.
#[derive(Debug)]
pub enum QmpError {
    /// Socket error.
    Io(io::Error),
    /// No (complete) reply within the timeout; the connection is unusable afterwards.
    Timeout {
        /// The command that was waiting.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// QEMU closed the connection (usually: it exited).
    Closed,
    /// Something that is not valid QMP was received.
    Protocol(String),
    /// QEMU answered with `{"error": {"class": .., "desc": ..}}`.
    Command {
        /// Error class, e.g. `GenericError`.
        class: String,
        /// Human-readable error text from QEMU.
        desc: String,
    },
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Io(e) => write!(f, "QMP I/O error: {e}"),
            QmpError::Timeout { command, after } => {
                write!(f, "QMP command {command:?} got no reply within {after:?}")
            }
            QmpError::Closed => write!(f, "QMP connection closed by QEMU"),
            QmpError::Protocol(m) => write!(f, "QMP protocol error: {m}"),
            QmpError::Command { class, desc } => write!(f, "QMP error {class}: {desc}"),
        }
    }
}

impl std::error::Error for QmpError {}

impl From<io::Error> for QmpError {
    fn from(e: io::Error) -> Self {
        QmpError::Io(e)
    }
}

/// A harness failure with everything needed to diagnose it.
#[derive(Debug)]
pub struct HarnessError {
    /// What the harness was doing.
    pub context: String,
    /// The underlying error text.
    pub cause: String,
    /// The last `query-migrate` result seen, if any.
    pub last_query_migrate: Option<Value>,
    /// The tail of QEMU's stdout/stderr log (empty if no QEMU was running).
    pub log_tail: String,
}

impl HarnessError {
    /// An error without a QEMU attached.
    pub fn new(context: impl Into<String>, cause: impl fmt::Display) -> Self {
        HarnessError {
            context: context.into(),
            cause: cause.to_string(),
            last_query_migrate: None,
            log_tail: String::new(),
        }
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.cause)?;
        if let Some(q) = &self.last_query_migrate {
            write!(f, "\n--- last query-migrate: {q}")?;
        }
        if !self.log_tail.is_empty() {
            write!(f, "\n--- QEMU log tail:\n{}", self.log_tail.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for HarnessError {}

/// Result type of the harness.
pub type HarnessResult<T> = Result<T, HarnessError>;

// ------------------------------------------------------------------------------------------------
// QMP client
// ------------------------------------------------------------------------------------------------

/// A minimal synchronous QMP client over a unix socket.
///
/// Every read is bounded by the client's timeout; after a timeout or I/O error the client is
/// poisoned (further commands fail immediately), because a half-read reply cannot be resynced.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
    events: Vec<Value>,
    timeout: Duration,
    next_id: u64,
    poisoned: bool,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("greeting", &self.greeting)
            .field("timeout", &self.timeout)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to a QMP unix socket, reads the greeting and negotiates capabilities
    /// (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Qmp::from_stream(UnixStream::connect(path)?, timeout)
    }

    /// Like [`Qmp::connect`] on an already connected stream.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let writer = stream.try_clone()?;
        writer.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
            timeout,
            next_id: 1,
            poisoned: false,
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message("<greeting>", deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (`{"QMP": {"version": ..}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets the timeout of each command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Asynchronous events received so far (skipped while waiting for replies).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Removes and returns the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self, command: &str, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.poisoned = true;
                return Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: self.timeout,
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))?;
            match self.reader.read_line(&mut line) {
                Ok(0) => {
                    self.poisoned = true;
                    return Err(QmpError::Closed);
                }
                Ok(_) => {
                    if !line.ends_with('\n') {
                        continue; // partial line (EOF follows or more data comes)
                    }
                    let trimmed = line.trim();
                    if trimmed.is_empty() {
                        line.clear();
                        continue;
                    }
                    return serde_json::from_str(trimmed).map_err(|e| {
                        self.poisoned = true;
                        QmpError::Protocol(format!("bad JSON {trimmed:?}: {e}"))
                    });
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    continue; // the deadline check above decides
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.poisoned = true;
                    return Err(QmpError::Io(e));
                }
            }
        }
    }

    /// Executes `cmd` with `args` (`Value::Null` for none) and returns its `return` value.
    /// Asynchronous events that arrive meanwhile are stored (see [`Qmp::events`]).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        if self.poisoned {
            return Err(QmpError::Protocol(
                "connection unusable after an earlier error".into(),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        if let Err(e) = self.writer.write_all(text.as_bytes()) {
            self.poisoned = true;
            return Err(if e.kind() == io::ErrorKind::BrokenPipe {
                QmpError::Closed
            } else {
                QmpError::Io(e)
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let m = self.read_message(cmd, deadline)?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a reply to something else (cannot happen in this client)
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            self.poisoned = true;
            return Err(QmpError::Protocol(format!("unexpected message {m}")));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Guest configuration and RAM backing files
// ------------------------------------------------------------------------------------------------

/// The machine to emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineKind {
    /// `-machine none,memory-backend=mem`: one RAM block (`mem`), no firmware.
    None,
    /// `-machine microvm,acpi=off,memory-backend=mem`: RAM block `mem` plus `pc.bios`
    /// (64 KiB qboot ROM).
    Microvm,
    /// `-machine pc,memory-backend=mem` (i440fx): `mem`, `pc.bios` (256 KiB), `pc.rom` and
    /// the fw_cfg ROM blobs (ACPI tables, table-loader, rsdp).
    Pc,
    /// `-machine q35,memory-backend=mem`: the same six blocks as [`MachineKind::Pc`].
    Q35,
}

impl MachineKind {
    /// The value of `-machine`.
    pub fn machine_arg(self) -> String {
        match self {
            MachineKind::None => format!("none,memory-backend={MEMORY_BACKEND_ID}"),
            MachineKind::Microvm => format!("microvm,acpi=off,memory-backend={MEMORY_BACKEND_ID}"),
            MachineKind::Pc => format!("pc,memory-backend={MEMORY_BACKEND_ID}"),
            MachineKind::Q35 => format!("q35,memory-backend={MEMORY_BACKEND_ID}"),
        }
    }

    /// The machine type name QEMU writes into the file's configuration section
    /// (`pc` resolves to `pc-i440fx-<major>.<minor>` of the running QEMU, `q35` to
    /// `pc-q35-<major>.<minor>`).
    pub fn file_machine_name(self, version: &QemuVersion) -> String {
        match self {
            MachineKind::None => "none".into(),
            MachineKind::Microvm => "microvm".into(),
            MachineKind::Pc => format!("pc-i440fx-{}.{}", version.major, version.minor),
            MachineKind::Q35 => format!("pc-q35-{}.{}", version.major, version.minor),
        }
    }
}

/// The accelerator. The guest never runs (`-S`), so TCG is the reliable default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// `-accel tcg`.
    Tcg,
    /// `-accel kvm`.
    Kvm,
    /// KVM if `/dev/kvm` is usable, else TCG.
    Auto,
}

impl Accel {
    fn arg(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto => {
                if kvm_usable() {
                    "kvm"
                } else {
                    "tcg"
                }
            }
        }
    }
}

/// How to run the guest.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// The machine.
    pub machine: MachineKind,
    /// Guest RAM size in bytes (size of the backing file; a multiple of 4 KiB).
    pub ram_size: u64,
    /// The accelerator (default [`Accel::Tcg`]).
    pub accel: Accel,
    /// Bound of every wait: QEMU start, each QMP command, the migration (default
    /// [`default_timeout`]).
    pub timeout: Duration,
    /// Extra arguments appended to the QEMU command line.
    pub extra_args: Vec<String>,
}

impl GuestConfig {
    /// A config with TCG, the default timeout and no extra arguments.
    pub fn new(machine: MachineKind, ram_size: u64) -> Self {
        GuestConfig {
            machine,
            ram_size,
            accel: Accel::Tcg,
            timeout: default_timeout(),
            extra_args: Vec::new(),
        }
    }

    /// The full QEMU argument list (without the binary).
    pub fn qemu_args(&self, ram_path: &Path, qmp_socket: &Path, incoming: bool) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-S".into(),
            "-accel".into(),
            self.accel.arg().into(),
            "-object".into(),
            format!(
                "memory-backend-file,id={MEMORY_BACKEND_ID},size={},mem-path={},share=on",
                self.ram_size,
                ram_path.display()
            ),
            "-machine".into(),
            self.machine.machine_arg(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_socket.display()),
        ];
        if incoming {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_name(tag: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("mapped-ram-test-{}-{n}-{t:08x}-{tag}", std::process::id())
}

/// A guest-RAM backing file in `/dev/shm`, deleted on drop.
#[derive(Debug)]
pub struct ShmFile {
    path: PathBuf,
    size: u64,
}

impl ShmFile {
    /// Creates `/dev/shm/mapped-ram-test-<unique>-<tag>` holding `contents`.
    pub fn with_contents(tag: &str, contents: &[u8]) -> io::Result<ShmFile> {
        let path = Path::new("/dev/shm").join(unique_name(tag));
        let f = ShmFile {
            path,
            size: contents.len() as u64,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f.path)?;
        file.write_all(contents)?;
        Ok(f)
    }

    /// Creates a zero-filled (sparse) backing file of `size` bytes.
    pub fn zeroed(tag: &str, size: u64) -> io::Result<ShmFile> {
        let path = Path::new("/dev/shm").join(unique_name(tag));
        let f = ShmFile { path, size };
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f.path)?
            .set_len(size)?;
        Ok(f)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size it was created with.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads the whole file (the guest RAM as QEMU left it).
    pub fn read(&self) -> io::Result<Vec<u8>> {
        fs::read(&self.path)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A temporary directory for QMP sockets and logs (unix socket paths must stay < 108 bytes).
fn socket_dir() -> io::Result<tempfile::TempDir> {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 60 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    tempfile::Builder::new()
        .prefix("mapped-ram-qemu-")
        .tempdir_in(base)
}

// ------------------------------------------------------------------------------------------------
// A running QEMU
// ------------------------------------------------------------------------------------------------

/// One RAM block as reported by `x-query-ramblock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// Block id string (the name in the migration file).
    pub name: String,
    /// Host page size of the block's memory.
    pub page_size: u64,
    /// Offset in QEMU's ram_addr_t space.
    pub offset: u64,
    /// `used_length`: the length migrated.
    pub used: u64,
    /// `max_length` (resizable blocks can grow up to this).
    pub max: u64,
    /// Host virtual address in the QEMU process.
    pub hva: u64,
    /// Whether the block is read-only (`ro`) for the guest.
    pub read_only: bool,
}

fn parse_size_unit(num: &str, unit: &str) -> Option<u64> {
    let n: u64 = num.parse().ok()?;
    let m = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    Some(n * m)
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// Parses the human-readable text of `x-query-ramblock` (QEMU 10.0):
/// `Block Name  PSize  Offset  Used  Total  HVA  RO` with `PSize` like `4 KiB`.
pub fn parse_ramblock_table(text: &str) -> Result<Vec<RamBlockInfo>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.is_empty() || (t.len() >= 2 && t[0] == "Block" && t[1] == "Name") {
            continue;
        }
        let n = t.len();
        if n < 8 {
            return Err(format!("cannot parse x-query-ramblock line {line:?}"));
        }
        let bad = || format!("cannot parse x-query-ramblock line {line:?}");
        out.push(RamBlockInfo {
            name: t[..n - 7].join(" "),
            page_size: parse_size_unit(t[n - 7], t[n - 6]).ok_or_else(bad)?,
            offset: parse_hex(t[n - 5]).ok_or_else(bad)?,
            used: parse_hex(t[n - 4]).ok_or_else(bad)?,
            max: parse_hex(t[n - 3]).ok_or_else(bad)?,
            hva: parse_hex(t[n - 2]).ok_or_else(bad)?,
            read_only: match t[n - 1] {
                "ro" => true,
                "rw" => false,
                _ => return Err(bad()),
            },
        });
    }
    Ok(out)
}

/// Reads the tail of a log file (at most `max` bytes, lossily decoded).
fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The migration URI for a file and optional offset: `file:PATH[,offset=N]`.
pub fn file_uri(path: &Path, offset: Option<u64>) -> String {
    match offset {
        Some(o) => format!("file:{},offset={o}", path.display()),
        None => format!("file:{}", path.display()),
    }
}

/// A running QEMU process with a QMP connection. Killed (SIGKILL) on drop.
///
/// The process also gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies if the *thread* that
/// spawned it exits (e.g. the test harness is killed): keep a `Qemu` on the thread that
/// created it.
pub struct Qemu {
    child: Child,
    qmp: Qmp,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    last_query_migrate: Option<Value>,
    timeout: Duration,
    pmem_counter: u64,
    args: Vec<String>,
}

impl fmt::Debug for Qemu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qemu")
            .field("pid", &self.child.id())
            .field("args", &self.args)
            .field("log", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl Qemu {
    /// Starts QEMU for `cfg` with guest RAM backed by `ram_path` (which must exist and have
    /// `cfg.ram_size` bytes), paused (`-S`), with `-incoming defer` if `incoming`, and
    /// connects QMP. Fails with the log tail if QEMU exits or QMP does not come up within
    /// `cfg.timeout`.
    pub fn spawn(cfg: &GuestConfig, ram_path: &Path, incoming: bool) -> HarnessResult<Qemu> {
        let dir = socket_dir().map_err(|e| HarnessError::new("creating QEMU temp dir", e))?;
        let sock = dir.path().join("qmp.sock");
        let log_path = dir.path().join("qemu.log");
        let log = File::create(&log_path).map_err(|e| HarnessError::new("creating QEMU log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| HarnessError::new("creating QEMU log", e))?;
        let args = cfg.qemu_args(ram_path, &sock, incoming);
        let mut cmd = Command::new(qemu_binary());
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let die_with_parent = || {
            // SAFETY: PR_SET_PDEATHSIG with a valid signal number has no memory effects.
            unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            Ok(())
        };
        // SAFETY: the closure only calls prctl, which is async-signal-safe, and touches no
        // memory of the parent.
        unsafe {
            cmd.pre_exec(die_with_parent);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError::new(format!("spawning {}", qemu_binary().display()), e))?;
        let deadline = Instant::now() + cfg.timeout;
        let fail = |child: &mut Child, cause: String| {
            let _ = child.kill();
            let _ = child.wait();
            HarnessError {
                context: format!("starting QEMU {}", args.join(" ")),
                cause,
                last_query_migrate: None,
                log_tail: file_tail(&log_path, LOG_TAIL_BYTES),
            }
        };
        let stream = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(fail(&mut child, format!("QEMU exited early ({st})")));
            }
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() >= deadline {
                        let cause = format!("QMP socket not ready within {:?}: {e}", cfg.timeout);
                        return Err(fail(&mut child, cause));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let qmp = match Qmp::from_stream(stream, cfg.timeout) {
            Ok(q) => q,
            Err(e) => return Err(fail(&mut child, format!("QMP handshake: {e}"))),
        };
        Ok(Qemu {
            child,
            qmp,
            dir,
            log_path,
            last_query_migrate: None,
            timeout: cfg.timeout,
            pmem_counter: 0,
            args,
        })
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line arguments QEMU was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The QMP client.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Path of the log file that receives QEMU's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `max` bytes of QEMU's log.
    pub fn log_tail(&self, max: u64) -> String {
        file_tail(&self.log_path, max)
    }

    /// Builds a [`HarnessError`] carrying the last query-migrate output and the log tail.
    pub fn error(&self, context: impl Into<String>, cause: impl fmt::Display) -> HarnessError {
        HarnessError {
            context: context.into(),
            cause: cause.to_string(),
            last_query_migrate: self.last_query_migrate.clone(),
            log_tail: self.log_tail(LOG_TAIL_BYTES),
        }
    }

    /// Executes a QMP command; errors carry the log tail. If QMP timed out, QEMU is killed.
    pub fn execute(&mut self, cmd: &str, args: Value) -> HarnessResult<Value> {
        match self.qmp.execute(cmd, args.clone()) {
            Ok(v) => Ok(v),
            Err(e) => {
                if matches!(e, QmpError::Timeout { .. }) {
                    self.kill();
                }
                let e2 = self.error(format!("QMP {cmd} {args}"), &e);
                Err(e2)
            }
        }
    }

    /// `query-status`'s `status` (e.g. `prelaunch`, `postmigrate`, `inmigrate`).
    pub fn run_state(&mut self) -> HarnessResult<String> {
        let v = self.execute("query-status", Value::Null)?;
        Ok(v["status"].as_str().unwrap_or("?").to_string())
    }

    /// The RAM blocks, from `x-query-ramblock`.
    pub fn ram_blocks(&mut self) -> HarnessResult<Vec<RamBlockInfo>> {
        let v = self.execute("x-query-ramblock", Value::Null)?;
        let text = v["human-readable-text"].as_str().unwrap_or("");
        parse_ramblock_table(text).map_err(|e| self.error("x-query-ramblock", e))
    }

    /// Reads a RAM block's `used` bytes from the QEMU process (`/proc/PID/mem` at its HVA).
    /// This sees exactly what migration sees, including blocks not mapped into the guest's
    /// physical address space (fw_cfg ROM blobs).
    pub fn read_ram_block(&self, block: &RamBlockInfo) -> HarnessResult<Vec<u8>> {
        let path = format!("/proc/{}/mem", self.pid());
        let used = usize::try_from(block.used).map_err(|e| self.error("block size", e))?;
        let mut buf = vec![0u8; used];
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, block.hva))
            .map_err(|e| self.error(format!("reading {} from {path}", block.name), e))?;
        Ok(buf)
    }

    /// Reads guest-physical memory with QMP `pmemsave` (through a file in the temp dir).
    pub fn pmemsave(&mut self, gpa: u64, size: u64) -> HarnessResult<Vec<u8>> {
        self.pmem_counter += 1;
        let file = self
            .dir
            .path()
            .join(format!("pmem-{}.bin", self.pmem_counter));
        self.execute(
            "pmemsave",
            json!({ "val": gpa, "size": size, "filename": file.display().to_string() }),
        )?;
        let data = fs::read(&file).map_err(|e| self.error("reading pmemsave output", e))?;
        let _ = fs::remove_file(&file);
        Ok(data)
    }

    /// Enables the migration capabilities in `caps` (`(name, state)`).
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> HarnessResult<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }

    /// `migrate-set-parameters` with the given object.
    pub fn set_parameters(&mut self, params: Value) -> HarnessResult<()> {
        self.execute("migrate-set-parameters", params)?;
        Ok(())
    }

    /// Sets `mapped-ram` (+ `multifd` with `multifd-channels` if `multifd_channels` is Some)
    /// and `direct-io` if requested; on the source also `max-bandwidth` = [`MAX_BANDWIDTH`].
    pub fn setup_mapped_ram(
        &mut self,
        multifd_channels: Option<u8>,
        direct_io: bool,
        source: bool,
    ) -> HarnessResult<()> {
        let mut caps = vec![("mapped-ram", true)];
        if multifd_channels.is_some() {
            caps.push(("multifd", true));
        }
        self.set_capabilities(&caps)?;
        let mut params = serde_json::Map::new();
        if source {
            params.insert("max-bandwidth".into(), json!(MAX_BANDWIDTH));
        }
        if let Some(n) = multifd_channels {
            params.insert("multifd-channels".into(), json!(n));
        }
        if direct_io {
            params.insert("direct-io".into(), json!(true));
        }
        if !params.is_empty() {
            self.set_parameters(Value::Object(params))?;
        }
        Ok(())
    }

    /// `query-migrate` (remembered for error reports).
    pub fn query_migrate(&mut self) -> HarnessResult<Value> {
        let v = self.execute("query-migrate", Value::Null)?;
        self.last_query_migrate = Some(v.clone());
        Ok(v)
    }

    /// Polls `query-migrate` until `status` is `completed`, bounded by the config timeout.
    /// `failed`/`cancelled`, a QEMU exit or the timeout give an error with `error-desc`, the
    /// last query-migrate output and the log tail; on timeout QEMU is killed first.
    pub fn wait_migration(&mut self, what: &str) -> HarnessResult<Value> {
        let deadline = Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(2);
        loop {
            let v = match self.query_migrate() {
                Ok(v) => v,
                Err(mut e) => {
                    e.context = format!("{what}: {}", e.context);
                    return Err(e);
                }
            };
            match v["status"].as_str().unwrap_or("") {
                "completed" => return Ok(v),
                s @ ("failed" | "cancelled") => {
                    let desc = v["error-desc"].as_str().unwrap_or("(no error-desc)");
                    // Give QEMU a moment to flush its stderr with the detailed reason.
                    std::thread::sleep(Duration::from_millis(50));
                    return Err(self.error(what, format!("migration {s}: {desc}")));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(self.error(
                    what,
                    format!(
                        "migration not completed within {:?}; QEMU killed",
                        self.timeout
                    ),
                ));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends `quit` and waits (bounded) for the process to exit; kills it if it does not.
    pub fn quit(mut self) -> HarnessResult<ExitStatus> {
        match self.qmp.execute("quit", Value::Null) {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(e) => {
                self.kill();
                return Err(self.error("QMP quit", e));
            }
        }
        let deadline = Instant::now() + self.timeout.min(Duration::from_secs(30));
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    self.kill();
                    return Err(self.error("QEMU did not exit after quit", "killed"));
                }
                Err(e) => return Err(self.error("waiting for QEMU", e)),
            }
        }
    }

    /// `Some(status)` once the QEMU process has exited (reaped), `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills QEMU (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Captures the content of every RAM block except the main one (`mem`, whose content is
    /// the backing file), keyed by block name.
    pub fn capture_blocks(
        &mut self,
        blocks: &[RamBlockInfo],
    ) -> HarnessResult<BTreeMap<String, Vec<u8>>> {
        let mut m = BTreeMap::new();
        for b in blocks.iter().filter(|b| b.name != MAIN_RAM_BLOCK) {
            m.insert(b.name.clone(), self.read_ram_block(b)?);
        }
        Ok(m)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------------------------------------
// Save and load
// ------------------------------------------------------------------------------------------------

/// Options of [`qemu_save`].
#[derive(Clone, Debug)]
pub struct SaveOpts {
    /// `Some(n)`: enable `multifd` with `multifd-channels = n`; `None`: mapped-ram alone.
    pub multifd_channels: Option<u8>,
    /// Set the `direct-io` parameter (effective only with multifd).
    pub direct_io: bool,
    /// `file:PATH,offset=N`: QEMU truncates the file to N and writes after it.
    pub offset: Option<u64>,
    /// The migration file to write.
    pub out_path: PathBuf,
    /// Capture the content of every non-main RAM block from the source (default true).
    pub capture_blocks: bool,
}

impl SaveOpts {
    /// Mapped-ram without multifd, no direct-io, no offset, capturing blocks.
    pub fn new(out_path: impl Into<PathBuf>) -> Self {
        SaveOpts {
            multifd_channels: None,
            direct_io: false,
            offset: None,
            out_path: out_path.into(),
            capture_blocks: true,
        }
    }
}

/// Result of [`qemu_save`].
#[derive(Clone, Debug)]
pub struct SaveReport {
    /// The file written.
    pub path: PathBuf,
    /// The offset used (0 if none).
    pub offset: u64,
    /// The source's RAM blocks (`x-query-ramblock`), in QEMU's order.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// Content of each non-main block on the source (if `capture_blocks`); the main block's
    /// content is the image passed to `qemu_save`.
    pub block_contents: BTreeMap<String, Vec<u8>>,
    /// The final `query-migrate` output (status `completed`).
    pub query_migrate: Value,
    /// `query-status` after the migration (`postmigrate`).
    pub run_state: String,
    /// Wall time of the whole save (QEMU start to exit).
    pub elapsed: Duration,
}

impl SaveReport {
    /// Content of each block of the saved guest, in QEMU's order: the main block is `image`
    /// (what was passed to [`qemu_save`]), every other block what the harness captured from
    /// the source QEMU (panics if it captured none, or a length other than the block's).
    pub fn blocks_with<'a>(&'a self, image: &'a [u8]) -> Vec<(String, &'a [u8])> {
        self.ram_blocks
            .iter()
            .map(|b| {
                let data: &[u8] = if b.name == MAIN_RAM_BLOCK {
                    image
                } else {
                    self.block_contents
                        .get(&b.name)
                        .unwrap_or_else(|| panic!("no captured contents for block {}", b.name))
                };
                assert_eq!(data.len() as u64, b.used, "captured length of {}", b.name);
                (b.name.clone(), data)
            })
            .collect()
    }
}

/// Options of [`qemu_load`].
#[derive(Clone, Debug)]
pub struct LoadOpts {
    /// `Some(n)`: enable `multifd` with `multifd-channels = n`.
    pub multifd_channels: Option<u8>,
    /// Set `direct-io` (effective only with multifd).
    pub direct_io: bool,
    /// `file:PATH,offset=N`.
    pub offset: Option<u64>,
    /// The migration file to read.
    pub in_path: PathBuf,
    /// Capture the content of every non-main RAM block after loading (default true).
    pub capture_blocks: bool,
}

impl LoadOpts {
    /// Mapped-ram without multifd, no direct-io, no offset, capturing blocks.
    pub fn new(in_path: impl Into<PathBuf>) -> Self {
        LoadOpts {
            multifd_channels: None,
            direct_io: false,
            offset: None,
            in_path: in_path.into(),
            capture_blocks: true,
        }
    }
}

/// Result of [`qemu_load`]. Owns the destination's RAM backing file (deleted on drop).
#[derive(Debug)]
pub struct LoadReport {
    /// The destination's guest RAM (started zeroed, filled by the load).
    pub ram: ShmFile,
    /// The destination's RAM blocks.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// Content of each non-main block after the load (if `capture_blocks`).
    pub block_contents: BTreeMap<String, Vec<u8>>,
    /// The final `query-migrate` output (status `completed`).
    pub query_migrate: Value,
    /// `query-status` after the load (`prelaunch` with `-S` in 10.0.2).
    pub run_state: String,
    /// Wall time of the whole load.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Path of the destination's RAM backing file.
    pub fn ram_path(&self) -> &Path {
        self.ram.path()
    }
}

/// Saves a guest whose RAM is `image` (`image.len() == cfg.ram_size`) with QEMU: writes the
/// image to a `/dev/shm` backing file, starts QEMU paused, sets mapped-ram (+ multifd,
/// direct-io, max-bandwidth), runs `migrate file:PATH[,offset=N]` and waits for `completed`.
pub fn qemu_save(cfg: &GuestConfig, image: &[u8], opts: &SaveOpts) -> HarnessResult<SaveReport> {
    let start = Instant::now();
    if image.len() as u64 != cfg.ram_size {
        return Err(HarnessError::new(
            "qemu_save",
            format!(
                "image is {} bytes, cfg.ram_size is {}",
                image.len(),
                cfg.ram_size
            ),
        ));
    }
    let ram = ShmFile::with_contents("src", image)
        .map_err(|e| HarnessError::new("writing the source RAM backing file", e))?;
    let mut q = Qemu::spawn(cfg, ram.path(), false)?;
    let ram_blocks = q.ram_blocks()?;
    q.setup_mapped_ram(opts.multifd_channels, opts.direct_io, true)?;
    let uri = file_uri(&opts.out_path, opts.offset);
    q.execute("migrate", json!({ "uri": uri }))?;
    let query_migrate = q.wait_migration(&format!("saving to {uri}"))?;
    let run_state = q.run_state()?;
    let block_contents = if opts.capture_blocks {
        q.capture_blocks(&ram_blocks)?
    } else {
        BTreeMap::new()
    };
    q.quit()?;
    Ok(SaveReport {
        path: opts.out_path.clone(),
        offset: opts.offset.unwrap_or(0),
        ram_blocks,
        block_contents,
        query_migrate,
        run_state,
        elapsed: start.elapsed(),
    })
}

/// Loads a mapped-ram file into a fresh QEMU (`-incoming defer`, zeroed `/dev/shm` backing
/// file), with `migrate-incoming` (`exit-on-error: false`, so a failure is reported through
/// `query-migrate` instead of QEMU exiting) and waits for `completed`.
pub fn qemu_load(cfg: &GuestConfig, opts: &LoadOpts) -> HarnessResult<LoadReport> {
    let start = Instant::now();
    let ram = ShmFile::zeroed("dst", cfg.ram_size)
        .map_err(|e| HarnessError::new("creating the destination RAM backing file", e))?;
    let mut q = Qemu::spawn(cfg, ram.path(), true)?;
    q.setup_mapped_ram(opts.multifd_channels, opts.direct_io, false)?;
    let uri = file_uri(&opts.in_path, opts.offset);
    q.execute(
        "migrate-incoming",
        json!({ "uri": uri, "exit-on-error": false }),
    )?;
    let query_migrate = q.wait_migration(&format!("loading from {uri}"))?;
    let run_state = q.run_state()?;
    let ram_blocks = q.ram_blocks()?;
    let block_contents = if opts.capture_blocks {
        q.capture_blocks(&ram_blocks)?
    } else {
        BTreeMap::new()
    };
    q.quit()?;
    Ok(LoadReport {
        ram,
        ram_blocks,
        block_contents,
        query_migrate,
        run_state,
        elapsed: start.elapsed(),
    })
}

// ------------------------------------------------------------------------------------------------
// Disk directories for direct-io
// ------------------------------------------------------------------------------------------------

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The `statfs` f_type of the file system holding `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs only writes into the struct we pass; `c` is a valid C string.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// True if `dir` is on a memory file system (tmpfs/ramfs).
pub fn is_memory_fs(dir: &Path) -> io::Result<bool> {
    let t = fs_type(dir)?;
    Ok(t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// QEMU's own probe: can a file in `dir` take an O_DIRECT write of 1 MiB at offset 1 MiB?
pub fn supports_o_direct(dir: &Path) -> bool {
    let path = dir.join(format!(".odirect-probe-{}", unique_name("p")));
    let ok = (|| -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let mut raw = vec![0x55u8; (2 << 20) + 4096];
        let skew = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[skew..skew + (1 << 20)];
        buf[0] = 1;
        f.write_all_at(buf, 1 << 20)
    })()
    .is_ok();
    let _ = fs::remove_file(&path);
    ok
}

/// A temporary directory on a real disk file system (not tmpfs/ramfs) that supports O_DIRECT:
/// under `std::env::temp_dir()` if that qualifies, else under `fallback` (e.g. the test's
/// `CARGO_TARGET_TMPDIR`).
pub fn disk_temp_dir(fallback: Option<&Path>) -> HarnessResult<tempfile::TempDir> {
    let mut tried = Vec::new();
    let candidates = std::iter::once(std::env::temp_dir()).chain(fallback.map(Path::to_path_buf));
    for base in candidates {
        let _ = fs::create_dir_all(&base);
        match is_memory_fs(&base) {
            Ok(false) if supports_o_direct(&base) => {
                return tempfile::Builder::new()
                    .prefix("mapped-ram-disk-")
                    .tempdir_in(&base)
                    .map_err(|e| HarnessError::new(format!("tempdir in {}", base.display()), e));
            }
            Ok(false) => tried.push(format!("{}: no O_DIRECT", base.display())),
            Ok(true) => tried.push(format!("{}: tmpfs/ramfs", base.display())),
            Err(e) => tried.push(format!("{}: {e}", base.display())),
        }
    }
    Err(HarnessError::new(
        "no disk directory with O_DIRECT",
        tried.join("; "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ramblock_table() {
        let text = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n                     mem    4 KiB  0x0000000000000000 0x0000000002000000 0x0000000002000000 0x00007f6e39fff000  rw\n    /rom@etc/acpi/tables    4 KiB  0x0000000002080000 0x0000000000020000 0x0000000000200000 0x00007fa1c2a00000  ro\n";
        let b = parse_ramblock_table(text).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].name, "mem");
        assert_eq!(b[0].used, 32 << 20);
        assert!(!b[0].read_only);
        assert_eq!(b[1].name, "/rom@etc/acpi/tables");
        assert_eq!(
            (b[1].page_size, b[1].used, b[1].max),
            (4096, 0x20000, 0x200000)
        );
        assert_eq!(b[1].hva, 0x7fa1_c2a0_0000);
        assert!(b[1].read_only);
        assert!(parse_ramblock_table("garbage line\n").is_err());
    }

    #[test]
    fn parses_version_and_uri() {
        let v = parse_version(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright",
        )
        .unwrap();
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
        assert_eq!(MachineKind::Pc.file_machine_name(&v), "pc-i440fx-10.0");
        assert_eq!(MachineKind::Q35.file_machine_name(&v), "pc-q35-10.0");
        assert_eq!(
            file_uri(Path::new("/a/b"), Some(4096)),
            "file:/a/b,offset=4096"
        );
        assert_eq!(file_uri(Path::new("/a/b"), None), "file:/a/b");
    }
}
