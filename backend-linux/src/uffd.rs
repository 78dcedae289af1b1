//! userfaultfd restore: fresh anonymous guest memory filled from the snapshot on demand and in
//! the background.
//!
//! [`restore_uffd()`] maps fresh anonymous memory for every block, registers it with a
//! userfaultfd (`UFFDIO_REGISTER_MODE_MISSING`) and returns at once. From then on:
//!
//! * a **handler thread** serves every fault: it reads the faulting page's aligned window of
//!   [`UffdOptions::fault_window_pages`] pages from the file and installs the stored ones with
//!   `UFFDIO_COPY` and the clear ones with `UFFDIO_ZEROPAGE` (a clear bit is zero, whatever
//!   the file holds there — stale bytes are never read, so QEMU's files are safe too);
//! * **background channels** — a `Job` on the executor (`executor.rs`), not a pool of
//!   their own — stream every stored page in with `UFFDIO_COPY` (`EEXIST`: the handler was
//!   first, fine), so the guest reaches full speed without waiting for faults.
//!
//! With [`UffdOptions::huge_pages`] the memory is 2 MiB huge pages (a `MFD_HUGETLB` memfd) and
//! every fault and prefetch step installs one whole huge page (its stored pages read, its
//! clear pages zero).
//!
//! # Working set
//!
//! With [`UffdOptions::record_working_set`] the handler records the order in which the guest
//! faulted its pages during the first seconds ([`UffdRestore::working_set`]); save it beside
//! the snapshot ([`WorkingSet::save`] at [`WorkingSet::side_path`]) and pass it to later
//! restores ([`UffdOptions::working_set`]): their prefetch installs those pages' fault windows
//! first, in that order, then everything else.
//!
//! The memory is anonymous: once [`UffdRestore::wait_prefetched`] returns `Ok`, every stored
//! page is in memory and the snapshot may be deleted (clear pages never need the file).
//!
//! # Errors reach the VMM
//!
//! When the handler cannot read a page (an I/O error, a truncated file), it records the typed
//! error ([`UffdRestore::error`], also returned by [`UffdRestore::wait_prefetched`]) and
//! **poisons** the faulting page (`UFFDIO_POISON`, Linux 6.6+): the faulting access gets
//! `SIGBUS` (a kernel access, e.g. a `write(2)` from guest memory, gets `EFAULT`) — it never
//! reads zeros. Where the kernel lacks `UFFDIO_POISON`, the faulting thread stays blocked
//! instead, and the VMM learns of the error from [`UffdRestore::error`].
//!
//! # Stopping
//!
//! Dropping the [`UffdRestore`] stops the prefetch (cancel), stops the handler (an eventfd),
//! joins both threads, unmaps the memory and closes the userfaultfd. A thread still touching
//! the memory after that is a use after free of the VMM's own making (it gets `SIGSEGV`, not
//! zeros).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use mapped_ram_core::bitmap::{words_for, AtomicBitmap, BitmapRef};
use mapped_ram_core::schedule::Chunk;

use crate::error::{IoFailure, Op, OptionError, RestoreError, RestoreErrorKind};
use crate::executor::{self, ChunkList, Control, Job, Pages, Stopped, Storage};
use crate::file;
use crate::inspect::{open_snapshot, BlockInfo, SnapshotInfo};
use crate::lazy::choose_blocks;
use crate::progress::Cancel;
use crate::save::default_channels;

// The userfaultfd ABI (linux/userfaultfd.h), defined here because the `libc` crate lacks it.
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_POISON: u64 = 1 << 14;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `pagefault.flags`, `pagefault.address`, `pagefault.feat`.
    arg: [u64; 3],
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_POISON: u64 = iowr(0x08, std::mem::size_of::<UffdioPoison>());

/// Default [`UffdOptions::fault_window_pages`].
pub const DEFAULT_FAULT_WINDOW_PAGES: u64 = 16;

/// How to restore through userfaultfd.
#[derive(Debug, Clone)]
pub struct UffdOptions {
    /// Bytes before the stream (`file:PATH,offset=N`).
    pub offset: u64,
    /// Pages each fault installs: the aligned window around the faulting page (at least 1).
    pub fault_window_pages: u64,
    /// Background channels that stream every stored page in (0: no prefetch, faults only).
    pub prefetch_channels: usize,
    /// Guest memory of 2 MiB huge pages (a `MFD_HUGETLB` memfd) instead of 4 KiB pages: each
    /// fault and each prefetch step installs a whole huge page. Every block's length must be
    /// a multiple of 2 MiB, and the kernel must have the huge pages (`vm.nr_hugepages`).
    pub huge_pages: bool,
    /// Record the order in which the guest faults its pages during this long after the
    /// restore ([`UffdRestore::working_set`]); `None`: record nothing.
    pub record_working_set: Option<std::time::Duration>,
    /// Pages to prefetch first, in this order (a [`WorkingSet`] recorded by an earlier
    /// restore): the prefetch installs each one's fault window before anything else.
    pub working_set: Option<WorkingSet>,
}

/// The pages a restored guest faulted first, in order: what a later restore prefetches first.
///
/// Stored beside the snapshot ([`WorkingSet::side_path`]) as text: the line
/// `mapped-ram working set 1`, then one line per page, `<block name> <page index>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// (block name, page index) in fault order.
    pub pages: Vec<(String, u64)>,
}

const WS_MAGIC: &str = "mapped-ram working set 1";

impl WorkingSet {
    /// Where the working set of the snapshot at `snapshot` is kept: `<snapshot>.ws`.
    pub fn side_path(snapshot: &Path) -> PathBuf {
        let mut p = snapshot.as_os_str().to_owned();
        p.push(".ws");
        PathBuf::from(p)
    }

    /// Writes the working set to `path` (replacing it in one step: a temporary, then rename).
    pub fn save(&self, path: &Path) -> Result<(), RestoreError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, self.to_text()).map_err(io_err(Op::WriteStream, &tmp, None))?;
        std::fs::rename(&tmp, path).map_err(io_err(Op::Rename, path, None))?;
        Ok(())
    }

    /// The working set in its stored form (see the type's docs).
    pub fn to_text(&self) -> String {
        let mut text = String::with_capacity(self.pages.len() * 16 + 32);
        text.push_str(WS_MAGIC);
        text.push('\n');
        for (name, page) in &self.pages {
            text.push_str(name);
            text.push(' ');
            text.push_str(&page.to_string());
            text.push('\n');
        }
        text
    }

    /// Reads a working set written by [`WorkingSet::save`]; a malformed file is an error that
    /// names the file and the byte offset of the bad line.
    pub fn load(path: &Path) -> Result<Self, RestoreError> {
        let text = std::fs::read(path).map_err(io_err(Op::ReadStream, path, None))?;
        Self::parse(&text, path)
    }

    /// Parses the stored form (see the type's docs); `path` names it in errors.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, RestoreError> {
        let bad = |offset: usize, message: &str| -> RestoreError {
            RestoreErrorKind::from(crate::error::FormatError::Stream {
                path: path.to_path_buf(),
                message: format!("working set at byte {offset}: {message}"),
                offset: offset as u64,
            })
            .into()
        };
        let text = std::str::from_utf8(text).map_err(|e| bad(e.valid_up_to(), "not UTF-8"))?;
        let mut pages = Vec::new();
        let mut offset = 0usize;
        for (i, line) in text.split_terminator('\n').enumerate() {
            if i == 0 {
                if line != WS_MAGIC {
                    return Err(bad(0, "not a mapped-ram working set"));
                }
            } else {
                let (name, page) = line
                    .rsplit_once(' ')
                    .ok_or_else(|| bad(offset, "expected `<block> <page>`"))?;
                let page = page
                    .parse::<u64>()
                    .map_err(|_| bad(offset, "the page index is not a number"))?;
                pages.push((name.to_string(), page));
            }
            offset += line.len() + 1;
        }
        if text.is_empty() {
            return Err(bad(0, "empty file"));
        }
        Ok(Self { pages })
    }
}

impl Default for UffdOptions {
    fn default() -> Self {
        Self {
            offset: 0,
            fault_window_pages: DEFAULT_FAULT_WINDOW_PAGES,
            prefetch_channels: default_channels(),
            huge_pages: false,
            record_working_set: None,
            working_set: None,
        }
    }
}

/// Anonymous memory, unmapped on drop.
struct Anon {
    addr: usize,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh anonymous mapping (null hint, no MAP_FIXED) replaces nothing; the
        // result is checked and unmapped once in `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// `len` bytes (a multiple of [`HUGE_PAGE`]) of 2 MiB huge pages: a `MFD_HUGETLB` memfd
    /// mapped shared (the memfd is closed; the mapping keeps it).
    fn new_huge(len: usize) -> io::Result<Self> {
        if len == 0 || len % HUGE_PAGE as usize != 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: the name is a NUL-terminated string; the flags are valid memfd flags.
        let fd = unsafe {
            libc::memfd_create(
                c"mapped-ram-guest".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        rustix::fs::ftruncate(&fd, len as u64)?;
        // SAFETY: a fresh shared mapping of our own memfd (null hint, no MAP_FIXED) replaces
        // nothing; the result is checked and unmapped once in `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }
}

/// Memory of 2 MiB huge pages (a `MFD_HUGETLB` memfd, mapped shared), to save from or restore
/// into (e.g. with [`crate::restore()`]); unmapped on drop.
pub struct HugePages(Anon);

impl std::fmt::Debug for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugePages")
            .field("len", &self.0.len)
            .finish()
    }
}

impl HugePages {
    /// `len` bytes (a multiple of [`HUGE_PAGE`]), zero. The shared mapping reserves its huge
    /// pages, so this fails (`ENOMEM`) when the kernel has too few (`vm.nr_hugepages`) rather
    /// than raising `SIGBUS` at a later touch.
    pub fn new(len: usize) -> io::Result<Self> {
        Anon::new_huge(len).map(Self)
    }

    /// The memory.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the live mapping of `len` bytes owned by `self`, shared-borrowed with it.
        unsafe { std::slice::from_raw_parts(self.0.addr as *const u8, self.0.len) }
    }

    /// The memory, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the live mapping of `len` bytes owned by `self`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.addr as *mut u8, self.0.len) }
    }
}

/// The huge page size of [`UffdOptions::huge_pages`].
pub const HUGE_PAGE: u64 = 2 << 20;

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: `addr .. addr + len` is the mapping this value made and owns; nothing
        // borrows it past the owner's drop.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` is a userfaultfd ioctl whose argument is exactly `T` (the sizes are
    // encoded in `req` from `T`), `arg` is a valid, exclusive reference for the call, and
    // `fd` is open for the call's duration (callers hold the `OwnedFd`).
    let r = unsafe { libc::ioctl(fd, req as libc::Ioctl, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A userfaultfd with the API handshake done; `poison` when `UFFDIO_POISON` is available.
fn open_uffd() -> io::Result<(OwnedFd, bool)> {
    let open = || -> io::Result<OwnedFd> {
        // SAFETY: the userfaultfd syscall takes one flags argument and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    let fd = open()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_POISON,
        ioctls: 0,
    };
    if ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api).is_ok() {
        return Ok((fd, true));
    }
    // The API handshake can be done once per fd: a kernel without the feature needs a new one.
    let fd = open()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..UffdioApi::default()
    };
    ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
    Ok((fd, false))
}

/// Installs `src` at `dst` (page aligned), skipping pages already there (`EEXIST`) and waking
/// any thread waiting on them.
fn copy_pages(uffd: RawFd, dst: u64, src: &[u8], page: u64) -> io::Result<()> {
    let mut done = 0u64;
    let len = src.len() as u64;
    while done < len {
        let mut c = UffdioCopy {
            dst: dst + done,
            src: src.as_ptr() as u64 + done,
            len: len - done,
            mode: 0,
            copy: 0,
        };
        match ioctl(uffd, UFFDIO_COPY, &mut c) {
            Ok(()) => done = len,
            Err(e) => {
                let copied = u64::try_from(c.copy).unwrap_or(0);
                match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        // Pages up to `copied` are in; the next one was there already.
                        wake(uffd, dst + done + copied, page);
                        done += copied + page;
                    }
                    Some(libc::EAGAIN) => done += copied,
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn zero_pages(uffd: RawFd, dst: u64, len: u64, page: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst + done,
                len: len - done,
            },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(uffd, UFFDIO_ZEROPAGE, &mut z) {
            Ok(()) => done = len,
            Err(e) => {
                let n = u64::try_from(z.zeropage).unwrap_or(0);
                match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        wake(uffd, dst + done + n, page);
                        done += n + page;
                    }
                    Some(libc::EAGAIN) => done += n,
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn wake(uffd: RawFd, start: u64, len: u64) {
    let mut r = UffdioRange { start, len };
    let _ = ioctl(uffd, UFFDIO_WAKE, &mut r);
}

/// One restored block's memory.
pub struct UffdBlock {
    name: String,
    page_size: u64,
    memory: Anon,
}

impl std::fmt::Debug for UffdBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdBlock")
            .field("name", &self.name)
            .field("len", &self.memory.len)
            .finish()
    }
}

impl UffdBlock {
    /// The block's id string.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The target page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The guest memory's address (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.addr as *mut u8
    }

    /// The guest memory as bytes: a read of a page not yet installed waits for the handler
    /// (and gets `SIGBUS` when its read failed, see the module docs).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `addr .. addr + len` is a live mapping owned by this block for as long as
        // the borrow; only the handler and prefetch write it, through the kernel
        // (UFFDIO_COPY/ZEROPAGE into pages not yet present), so a byte once read never changes
        // behind the shared borrow.
        unsafe { std::slice::from_raw_parts(self.memory.addr as *const u8, self.memory.len) }
    }

    /// The guest memory's length in bytes.
    pub fn len(&self) -> usize {
        self.memory.len
    }

    /// Whether the block is empty (never: empty blocks are not restored).
    pub fn is_empty(&self) -> bool {
        self.memory.len == 0
    }
}

/// What the handler and the prefetch have done so far.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct UffdStats {
    /// Faults served by the handler.
    pub faults: u64,
    /// Pages installed by the handler (stored and zero).
    pub fault_pages: u64,
    /// Pages installed by the prefetch (pages the handler had installed are skipped, and not
    /// counted).
    pub prefetched_pages: u64,
    /// Whether the prefetch has finished (successfully or not).
    pub prefetch_done: bool,
}

struct Shared {
    faults: AtomicU64,
    fault_pages: AtomicU64,
    prefetched: AtomicU64,
    prefetch_done: AtomicBool,
    error: Mutex<Option<RestoreError>>,
    /// Until when faults are recorded, and the (block, page) of each, in order.
    record_until: Option<Instant>,
    recorded: Mutex<Vec<(usize, u64)>>,
}

impl Shared {
    fn fail(&self, e: RestoreError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }
}

/// Where a block lives, as the threads see it.
struct Region {
    addr: u64,
    info: BlockInfo,
    /// Pages known to be installed (set after a successful copy or zero-fill), so that the
    /// prefetch does not read them again.
    installed: Vec<AtomicU64>,
}

impl Region {
    fn mark(&self, pages: std::ops::Range<u64>) {
        if let Ok(map) = AtomicBitmap::new(&self.installed, self.info.layout.num_pages()) {
            let _ = map.update_range(pages, true);
        }
    }

    fn is_installed(&self, page: u64) -> bool {
        AtomicBitmap::new(&self.installed, self.info.layout.num_pages()).is_ok_and(|m| m.test(page))
    }
}

/// A guest restored through userfaultfd (see the module docs). Dropping it stops the threads
/// and frees the memory.
pub struct UffdRestore {
    /// The blocks, in the order asked for.
    pub blocks: Vec<UffdBlock>,
    /// Seconds until the memory was handed back.
    pub seconds: f64,
    shared: Arc<Shared>,
    cancel: Cancel,
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
    prefetch: Option<JoinHandle<()>>,
    uffd: Arc<OwnedFd>,
    poison: bool,
}

impl std::fmt::Debug for UffdRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdRestore")
            .field("blocks", &self.blocks)
            .field("stats", &self.stats())
            .finish()
    }
}

impl UffdRestore {
    /// The block named `name`.
    pub fn block(&self, name: &str) -> Option<&UffdBlock> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// What has been done so far.
    pub fn stats(&self) -> UffdStats {
        let s = &self.shared;
        UffdStats {
            faults: s.faults.load(Ordering::Relaxed),
            fault_pages: s.fault_pages.load(Ordering::Relaxed),
            prefetched_pages: s.prefetched.load(Ordering::Relaxed),
            prefetch_done: s.prefetch_done.load(Ordering::Acquire),
        }
    }

    /// Whether a failed page read poisons the faulting page (`SIGBUS`/`EFAULT` for the
    /// faulting access); `false`: the faulting thread stays blocked (see the module docs).
    pub fn poisons_on_error(&self) -> bool {
        self.poison
    }

    /// The pages the guest faulted while [`UffdOptions::record_working_set`] was recording, in
    /// fault order (each fault's page; the window around it came with it).
    pub fn working_set(&self) -> WorkingSet {
        let recorded = self
            .shared
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        WorkingSet {
            pages: recorded
                .into_iter()
                .filter_map(|(b, p)| Some((self.blocks.get(b)?.name.clone(), p)))
                .collect(),
        }
    }

    /// Takes the first error of the handler or the prefetch, if any.
    pub fn error(&self) -> Option<RestoreError> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Waits until the prefetch has installed every stored page; after `Ok` the snapshot is no
    /// longer needed. Returns the first error of the handler or the prefetch.
    pub fn wait_prefetched(&mut self) -> Result<(), RestoreError> {
        if let Some(t) = self.prefetch.take() {
            let _ = t.join();
        }
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for UffdRestore {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.prefetch.take() {
            let _ = t.join();
        }
        let one = 1u64.to_ne_bytes();
        let _ = rustix::io::write(&self.stop, &one);
        if let Some(t) = self.handler.take() {
            let _ = t.join();
        }
        // The memory (`blocks`) is unmapped next, then the userfaultfd is closed.
        self.blocks.clear();
        let _ = &self.uffd;
    }
}

fn io_err(op: Op, path: &Path, at: Option<u64>) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |e| RestoreErrorKind::Io(IoFailure::new(op, path, at, e)).into()
}

/// Restores the blocks `names` of the snapshot at `path` (every block with data when empty)
/// into fresh anonymous memory served by userfaultfd; returns as soon as the memory can be
/// handed to the guest (see the module docs).
pub fn restore_uffd(
    path: &Path,
    names: &[&str],
    opts: &UffdOptions,
) -> Result<UffdRestore, RestoreError> {
    let started = Instant::now();
    let snap = open_snapshot(path, opts.offset)?;
    let file = Arc::new(snap.fd);
    let source: Source = Arc::new(FileSource(Arc::clone(&file)));
    restore_uffd_from(&snap.info, path, source, Some(file), names, opts, started)
}

/// Where the pages of a userfaultfd restore come from: the snapshot file, or an object store.
pub(crate) type Source = Arc<dyn Storage + Send + Sync>;

/// The snapshot file as a [`Source`]: `pread(2)` on its descriptor.
struct FileSource(Arc<OwnedFd>);

impl Storage for FileSource {
    fn write_pages(&self, _: usize, _: Pages, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn read_pages(&self, _: usize, _: Pages, buf: &mut [u8], offset: u64) -> io::Result<()> {
        file::preadv_exact(self.0.as_fd(), buf, offset)
    }
}

/// [`restore_uffd`] of the snapshot `info` (named `path` in errors) whose pages `source`
/// reads; `file`, when the source is a local file, has its cached pages dropped after the
/// prefetch.
pub(crate) fn restore_uffd_from(
    info: &SnapshotInfo,
    path: &Path,
    source: Source,
    file: Option<Arc<OwnedFd>>,
    names: &[&str],
    opts: &UffdOptions,
    started: Instant,
) -> Result<UffdRestore, RestoreError> {
    let chosen = choose_blocks(info, names)?;
    let (uffd, poison) = open_uffd().map_err(io_err(Op::Map, path, None))?;
    let uffd = Arc::new(uffd);
    let mut blocks = Vec::with_capacity(chosen.len());
    let mut regions = Vec::with_capacity(chosen.len());
    for b in chosen {
        let len = usize::try_from(b.layout.length).map_err(|_| {
            RestoreError::from(RestoreErrorKind::Options(OptionError::TooLargeToMap {
                block: b.name.clone(),
            }))
        })?;
        if opts.huge_pages
            && (b.layout.length % HUGE_PAGE != 0 || HUGE_PAGE % b.layout.page_size != 0)
        {
            return Err(RestoreErrorKind::Options(OptionError::NotMappable {
                block: b.name.clone(),
                reason: format!(
                    "its length {:#x} and page size {} must divide into 2 MiB huge pages",
                    b.layout.length, b.layout.page_size
                ),
            })
            .into());
        }
        let memory = if opts.huge_pages {
            Anon::new_huge(len)
        } else {
            Anon::new(len)
        }
        .map_err(io_err(Op::Map, path, Some(b.layout.pages_offset)))?;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: memory.addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg).map_err(io_err(
            Op::Map,
            path,
            Some(b.layout.pages_offset),
        ))?;
        regions.push(Region {
            addr: memory.addr as u64,
            info: b.clone(),
            installed: (0..words_for(b.layout.num_pages()))
                .map(|_| AtomicU64::new(0))
                .collect(),
        });
        blocks.push(UffdBlock {
            name: b.name.clone(),
            page_size: b.layout.page_size,
            memory,
        });
    }
    let shared = Arc::new(Shared {
        faults: AtomicU64::new(0),
        fault_pages: AtomicU64::new(0),
        prefetched: AtomicU64::new(0),
        prefetch_done: AtomicBool::new(false),
        error: Mutex::new(None),
        record_until: opts.record_working_set.map(|d| started + d),
        recorded: Mutex::new(Vec::new()),
    });
    let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
        .map_err(|e| io_err(Op::Map, path, None)(e.into()))?;
    let stop_reader = stop.try_clone().map_err(io_err(Op::Map, path, None))?;
    let regions = Arc::new(regions);
    let handler = {
        let (uffd, source, regions, shared) = (
            Arc::clone(&uffd),
            Arc::clone(&source),
            Arc::clone(&regions),
            Arc::clone(&shared),
        );
        let owned = path.to_path_buf();
        let window = opts.fault_window_pages.max(1);
        let huge = opts.huge_pages;
        std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || {
                Handler {
                    uffd: uffd.as_raw_fd(),
                    source: &*source,
                    path: owned,
                    regions: &regions,
                    shared: &shared,
                    window,
                    poison,
                    huge,
                }
                .run(stop_reader.as_raw_fd())
            })
            .map_err(io_err(Op::Map, path, None))?
    };
    let cancel = Cancel::default();
    let prefetch = if opts.prefetch_channels > 0 {
        let (uffd, source, regions, shared, cancel) = (
            Arc::clone(&uffd),
            Arc::clone(&source),
            Arc::clone(&regions),
            Arc::clone(&shared),
            cancel.clone(),
        );
        let owned = path.to_path_buf();
        let channels = opts.prefetch_channels;
        let huge = opts.huge_pages;
        let first = opts.working_set.clone();
        let window = opts.fault_window_pages.max(1);
        Some(
            std::thread::Builder::new()
                .name("uffd-prefetch".into())
                .spawn(move || {
                    let job = PrefetchJob {
                        huge,
                        uffd: uffd.as_raw_fd(),
                        source: &*source,
                        path: &owned,
                        regions: &regions,
                        shared: &shared,
                    };
                    prefetch(&job, channels, &cancel, first.as_ref(), window);
                    // Every stored page is in guest memory now: the page cache's copy of the
                    // snapshot is no longer needed (best effort; the restore is done either way).
                    if let Some(file) = &file {
                        let _ = file::drop_cached(file.as_fd());
                    }
                    shared.prefetch_done.store(true, Ordering::Release);
                })
                .map_err(io_err(Op::Map, path, None))?,
        )
    } else {
        shared.prefetch_done.store(true, Ordering::Release);
        None
    };
    Ok(UffdRestore {
        blocks,
        seconds: started.elapsed().as_secs_f64(),
        shared,
        cancel,
        stop,
        handler: Some(handler),
        prefetch,
        uffd,
        poison,
    })
}

/// The fault handler's state.
struct Handler<'a> {
    uffd: RawFd,
    source: &'a dyn Storage,
    path: PathBuf,
    regions: &'a [Region],
    shared: &'a Shared,
    window: u64,
    poison: bool,
    huge: bool,
}

impl Handler<'_> {
    fn run(&self, stop: RawFd) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of 2 pollfd for the call; both fds are open
            // (owned by the caller for the thread's life).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.shared.fail(io_err(Op::ReadPages, &self.path, None)(e));
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, a plain-old-data
            // struct of exactly the kernel's `uffd_msg` layout.
            let n = unsafe {
                libc::read(
                    self.uffd,
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    continue;
                }
                self.shared.fail(io_err(Op::ReadPages, &self.path, None)(e));
                return;
            }
            if n as usize != std::mem::size_of::<UffdMsg>() || msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            self.serve(msg.arg[1], &mut buf);
        }
    }

    /// Installs the window around the faulting address `addr`.
    fn serve(&self, addr: u64, buf: &mut Vec<u8>) {
        let Some(region) = self
            .regions
            .iter()
            .find(|r| addr >= r.addr && addr - r.addr < r.info.layout.length)
        else {
            return;
        };
        self.shared.faults.fetch_add(1, Ordering::Relaxed);
        let l = &region.info.layout;
        let ps = l.page_size;
        let page = (addr - region.addr) / ps;
        if self.shared.record_until.is_some_and(|t| Instant::now() < t) {
            let index = self
                .regions
                .iter()
                .position(|r| std::ptr::eq(r, region))
                .unwrap_or(0);
            self.shared
                .recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, page));
        }
        if self.huge {
            let per = HUGE_PAGE / ps;
            let first = page / per * per;
            match install_huge(self.uffd, self.source, region, first, buf) {
                Ok(()) => {
                    region.mark(first..(first + per).min(l.num_pages()));
                    self.shared.fault_pages.fetch_add(per, Ordering::Relaxed);
                }
                Err((op, at, e)) => {
                    self.shared.fail(io_err(op, &self.path, Some(at))(e));
                    if self.poison && op == Op::ReadPages {
                        let mut p = UffdioPoison {
                            range: UffdioRange {
                                start: region.addr + first * ps,
                                len: HUGE_PAGE,
                            },
                            ..UffdioPoison::default()
                        };
                        let _ = ioctl(self.uffd, UFFDIO_POISON, &mut p);
                    }
                }
            }
            return;
        }
        let first = page / self.window * self.window;
        let end = (first + self.window).min(l.num_pages());
        let Ok(bits) = BitmapRef::new(&region.info.bitmap, l.num_pages()) else {
            return;
        };
        // The window's stored pages in one read over their span (one request to an object
        // store), gaps read through.
        let missing = |r: std::ops::Range<u64>| r.clone().any(|p| !region.is_installed(p));
        let span = match (
            bits.runs_in(first..end, true).find(|r| missing(r.clone())),
            bits.runs_in(first..end, true)
                .filter(|r| missing(r.clone()))
                .last(),
        ) {
            (Some(a), Some(b)) => Some(a.start..b.end),
            _ => None,
        };
        let mut read_ok = true;
        if let Some(span) = &span {
            let at = l.pages_offset + span.start * ps;
            buf.resize(((span.end - span.start) * ps) as usize, 0);
            let pages = Pages {
                block: 0,
                first: span.start,
                page_size: ps,
            };
            if let Err(e) = self.source.read_pages(0, pages, buf, at) {
                read_ok = false;
                self.shared
                    .fail(io_err(Op::ReadPages, &self.path, Some(at))(e));
                if span.contains(&page) && bits.test(page) && self.poison {
                    let mut p = UffdioPoison {
                        range: UffdioRange {
                            start: region.addr + page * ps,
                            len: ps,
                        },
                        ..UffdioPoison::default()
                    };
                    let _ = ioctl(self.uffd, UFFDIO_POISON, &mut p);
                }
            }
        }
        for (set, run) in [true, false]
            .into_iter()
            .flat_map(|set| bits.runs_in(first..end, set).map(move |r| (set, r)))
        {
            let dst = region.addr + run.start * ps;
            let len = (run.end - run.start) * ps;
            let result = if set {
                let (Some(span), true) = (&span, read_ok) else {
                    continue;
                };
                if run.start < span.start || run.end > span.end {
                    continue; // installed already
                }
                let from = ((run.start - span.start) * ps) as usize;
                copy_pages(self.uffd, dst, &buf[from..from + len as usize], ps)
            } else {
                zero_pages(self.uffd, dst, len, ps)
            };
            match result {
                Ok(()) => {
                    region.mark(run.clone());
                    self.shared
                        .fault_pages
                        .fetch_add(run.end - run.start, Ordering::Relaxed);
                }
                Err(e) => self.shared.fail(io_err(
                    Op::Map,
                    &self.path,
                    Some(l.pages_offset + run.start * ps),
                )(e)),
            }
        }
    }
}

/// Installs the huge page whose first page is `first` of `region`: its stored pages read from
/// the file, its clear pages zero (hugetlb has no `UFFDIO_ZEROPAGE`), one `UFFDIO_COPY`.
fn install_huge(
    uffd: RawFd,
    source: &dyn Storage,
    region: &Region,
    first: u64,
    buf: &mut Vec<u8>,
) -> Result<(), (Op, u64, io::Error)> {
    let l = &region.info.layout;
    let ps = l.page_size;
    let per = HUGE_PAGE / ps;
    let end = (first + per).min(l.num_pages());
    buf.clear();
    buf.resize(HUGE_PAGE as usize, 0);
    let bits = BitmapRef::new(&region.info.bitmap, l.num_pages())
        .map_err(|e| (Op::Map, l.bitmap_offset, io::Error::other(format!("{e:?}"))))?;
    for run in bits.runs_in(first..end, true) {
        let at = l.pages_offset + run.start * ps;
        let from = ((run.start - first) * ps) as usize;
        let to = ((run.end - first) * ps) as usize;
        let pages = Pages {
            block: 0,
            first: run.start,
            page_size: ps,
        };
        source
            .read_pages(0, pages, &mut buf[from..to], at)
            .map_err(|e| (Op::ReadPages, at, e))?;
    }
    let dst = region.addr + first * ps;
    copy_pages(uffd, dst, buf, HUGE_PAGE).map_err(|e| (Op::Map, l.pages_offset + first * ps, e))
}

/// The prefetch's channel work: a chunk's stored pages, read and installed.
struct PrefetchJob<'a> {
    huge: bool,
    uffd: RawFd,
    source: &'a dyn Storage,
    path: &'a Path,
    regions: &'a [Region],
    shared: &'a Shared,
}

impl Job for PrefetchJob<'_> {
    type Scratch = Vec<u8>;
    type Error = RestoreError;

    fn scratch(&self) -> Vec<u8> {
        Vec::new()
    }

    fn chunk(&self, ch: usize, buf: &mut Vec<u8>, item: &Chunk) -> Result<u64, RestoreError> {
        let region = &self.regions[item.block];
        let l = &region.info.layout;
        let ps = l.page_size;
        if self.huge {
            let per = HUGE_PAGE / ps;
            let mut first = item.start;
            while first < item.end {
                if !region.is_installed(first) {
                    install_huge(self.uffd, self.source, region, first, buf)
                        .map_err(|(op, at, e)| io_err(op, self.path, Some(at))(e))?;
                    region.mark(first..(first + per).min(l.num_pages()));
                    self.shared.prefetched.fetch_add(per, Ordering::Relaxed);
                }
                first += per;
            }
            return Ok(item.pages() * ps);
        }
        let bits = BitmapRef::new(&region.info.bitmap, l.num_pages()).map_err(|e| {
            io_err(Op::Map, self.path, Some(l.bitmap_offset))(io::Error::other(format!("{e:?}")))
        })?;
        // The clear pages of the chunk read as zero: installed as such (the shared zero page),
        // so that once the prefetch is done the guest takes no more faults.
        for run in bits.runs_in(item.range(), false) {
            let mut p = run.start;
            while p < run.end {
                if region.is_installed(p) {
                    p += 1;
                    continue;
                }
                let mut e = p + 1;
                while e < run.end && !region.is_installed(e) {
                    e += 1;
                }
                let at = l.pages_offset + p * ps;
                zero_pages(self.uffd, region.addr + p * ps, (e - p) * ps, ps).map_err(io_err(
                    Op::Map,
                    self.path,
                    Some(at),
                ))?;
                region.mark(p..e);
                p = e;
            }
        }
        // The stored pages of the chunk that are not installed yet, as runs.
        let mut todo: Vec<std::ops::Range<u64>> = Vec::new();
        for run in bits.runs_in(item.range(), true) {
            for p in run {
                if region.is_installed(p) {
                    continue;
                }
                match todo.last_mut() {
                    Some(last) if last.end == p => last.end += 1,
                    _ => todo.push(p..p + 1),
                }
            }
        }
        // One read over the span of the runs (gaps read through: one request to an object
        // store, one system call for a file), then each run installed from it.
        let (Some(first), Some(last)) = (todo.first(), todo.last()) else {
            return Ok(item.pages() * ps);
        };
        let span = first.start..last.end;
        let at = l.pages_offset + span.start * ps;
        buf.resize(((span.end - span.start) * ps) as usize, 0);
        let pages = Pages {
            block: item.block,
            first: span.start,
            page_size: ps,
        };
        self.source.read_pages(ch, pages, buf, at).map_err(io_err(
            Op::ReadPages,
            self.path,
            Some(at),
        ))?;
        for run in todo {
            let from = ((run.start - span.start) * ps) as usize;
            let to = ((run.end - span.start) * ps) as usize;
            let at = l.pages_offset + run.start * ps;
            copy_pages(self.uffd, region.addr + run.start * ps, &buf[from..to], ps)
                .map_err(io_err(Op::Map, self.path, Some(at)))?;
            region.mark(run.clone());
            self.shared
                .prefetched
                .fetch_add(run.end - run.start, Ordering::Relaxed);
        }
        Ok(item.pages() * ps)
    }
}

fn prefetch(
    job: &PrefetchJob<'_>,
    channels: usize,
    cancel: &Cancel,
    first: Option<&WorkingSet>,
    window: u64,
) {
    let mut items = Vec::new();
    // The working set first: each page's fault window (huge page), once, in recorded order.
    if let Some(ws) = first {
        let mut seen = std::collections::HashSet::new();
        for (name, page) in &ws.pages {
            let Some(block) = job.regions.iter().position(|r| &r.info.name == name) else {
                continue;
            };
            let l = &job.regions[block].info.layout;
            let per = if job.huge {
                (HUGE_PAGE / l.page_size).max(1)
            } else {
                window
            };
            let start = page / per * per;
            if start >= l.num_pages() || !seen.insert((block, start)) {
                continue;
            }
            items.push(Chunk {
                block,
                start,
                end: (start + per).min(l.num_pages()),
            });
        }
    }
    for (block, r) in job.regions.iter().enumerate() {
        let l = &r.info.layout;
        let unit = if job.huge { HUGE_PAGE } else { 1 << 20 };
        let per = (unit / l.page_size).max(1);
        let mut s = 0;
        while s < l.num_pages() {
            let e = (s + per).min(l.num_pages());
            items.push(Chunk {
                block,
                start: s,
                end: e,
            });
            s = e;
        }
    }
    let ctl = Control {
        cancel: Some(cancel),
        ..Control::default()
    };
    match executor::execute(channels, &ChunkList::new(items), job, ctl) {
        Ok(()) | Err(Stopped::Cancelled) => {}
        Err(Stopped::Failed(e)) => job.shared.fail(e),
    }
}
