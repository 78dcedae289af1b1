//! Guest memory that may change while it is read, and the private file mappings of lazy
//! restore: all the `unsafe` code of live save ([`crate::live`]), incremental update
//! ([`crate::update`](mod@crate::update)), lazy restore ([`crate::lazy`]) and the `vm-memory`
//! integration lives in this module, each block with its `SAFETY:` argument.
//!
//! # Reading memory that a running guest writes
//!
//! A `&[u8]` promises that nothing changes the bytes while the borrow lives; memory of a
//! running guest breaks that promise, and reading it through a `&[u8]` while another thread of
//! this process writes it is a data race, undefined behaviour in Rust. [`GuestMemory`] is the
//! sound alternative: it is built from
//!
//! * a `&[u8]` ([`GuestMemory::from_slice`]) — memory that does not change (a paused guest, a
//!   RAM file nobody writes), read with ordinary loads;
//! * a `&[AtomicU64]` ([`GuestMemory::from_atomic`]) — memory that other threads of this process
//!   write with atomic stores (tests, emulated devices written in Rust), read with relaxed
//!   atomic loads, which are allowed to race with them;
//! * a raw pointer ([`GuestMemory::from_raw_parts`], `unsafe`) — a guest RAM mapping written by
//!   vCPUs (hardware, outside Rust's abstract machine), by other processes, or by threads of
//!   this process through volatile accesses (as `vm-memory`'s `VolatileSlice` does); read with
//!   volatile loads.
//!
//! The engine never hands guest memory to the kernel for writing to the file directly: it
//! copies each run of dirty pages into its own buffer first ([`GuestMemory::copy_to`]) and then
//! detects zero pages, computes checksums and writes **from that copy**, so whatever the guest
//! does meanwhile, each page in the file is one consistent snapshot of the page, and its bitmap
//! bit and checksum describe exactly those bytes.

use std::io;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use rustix::mm::{self, MapFlags, ProtFlags};

/// How a [`GuestMemory`] is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Borrowed from a `&[u8]`: nothing writes it while the borrow lives.
    Plain,
    /// Borrowed from a `&[AtomicU64]`: 8-byte aligned, read with atomic loads.
    Atomic,
    /// A raw region written outside Rust's control: read with volatile loads.
    Volatile,
    /// A file (a RAM file another process may write or truncate): read with `pread(2)`, so a
    /// file that shrinks is an error, never `SIGBUS`. `ptr` is unused.
    File { fd: std::os::fd::RawFd, offset: u64 },
}

/// A guest RAM region to save while the guest may keep running (see the module docs).
///
/// It is a borrowed view, cheap to copy, like the `&[u8]` of [`crate::SaveRegion`].
#[derive(Debug, Clone, Copy)]
pub struct GuestMemory<'m> {
    ptr: NonNull<u8>,
    len: usize,
    access: Access,
    _borrow: PhantomData<&'m [AtomicU8]>,
}

// SAFETY: a `GuestMemory` is a shared view that is only ever read, with loads that may race
// with writers (atomic or volatile) or of memory nobody writes (`Plain`); it behaves like a
// `&[AtomicU8]`, which is `Send` and `Sync`.
unsafe impl Send for GuestMemory<'_> {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory<'_> {}

impl<'m> GuestMemory<'m> {
    /// Memory that does not change while it is borrowed (a paused guest, a RAM file).
    pub fn from_slice(bytes: &'m [u8]) -> Self {
        Self {
            ptr: NonNull::from(bytes).cast(),
            len: bytes.len(),
            access: Access::Plain,
            _borrow: PhantomData,
        }
    }

    /// Memory that other threads of this process may write with atomic operations while it is
    /// saved. Byte `i` is byte `i % 8` of word `i / 8` in the machine's byte order (little
    /// endian on the hosts this crate supports), i.e. the words' memory, as a guest sees it.
    pub fn from_atomic(words: &'m [AtomicU64]) -> Self {
        Self {
            ptr: NonNull::from(words).cast(),
            len: std::mem::size_of_val(words),
            access: Access::Atomic,
            _borrow: PhantomData,
        }
    }

    /// A raw guest RAM region, read with volatile loads.
    ///
    /// # Safety
    ///
    /// For all of `'m`:
    /// * `ptr .. ptr + len` must be readable memory of this process that stays mapped (not
    ///   unmapped, and not replaced by another mapping);
    /// * every write to it from Rust code of this process must be volatile or atomic (as
    ///   `vm-memory`'s accessors are); writes by vCPUs, devices, other processes and the kernel
    ///   may happen at any time.
    ///
    /// `ptr` must not be null (a dangling, well-aligned pointer is fine when `len` is 0).
    ///
    /// # Panics
    ///
    /// If `ptr` is null and `len` is not 0.
    pub unsafe fn from_raw_parts(ptr: *const u8, len: usize) -> Self {
        assert!(
            !ptr.is_null() || len == 0,
            "null guest memory pointer with length {len}"
        );
        Self {
            ptr: NonNull::new(ptr.cast_mut()).unwrap_or(NonNull::dangling()),
            len,
            access: Access::Volatile,
            _borrow: PhantomData,
        }
    }

    /// `len` bytes of the file `fd` from `offset`: guest memory kept in a file (a QEMU
    /// `memory-backend-file` on `/dev/shm`, say) that another process may write, or even
    /// truncate, while it is saved. It is read with `pread(2)` into the channels' buffers: each
    /// page in the snapshot is one consistent copy, and a file that shrinks fails the save with
    /// an error naming it and the offset (a mapping would raise `SIGBUS` instead).
    pub fn from_file(fd: std::os::fd::BorrowedFd<'m>, offset: u64, len: usize) -> Self {
        use std::os::fd::AsRawFd;
        Self {
            ptr: NonNull::dangling(),
            len,
            access: Access::File {
                fd: fd.as_raw_fd(),
                offset,
            },
            _borrow: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, for memory that cannot change while it is borrowed
    /// ([`from_slice`](Self::from_slice)): the engine writes such memory in place.
    pub(crate) fn as_stable_slice(&self) -> Option<&'m [u8]> {
        match self.access {
            Access::Plain => {
                // SAFETY: `Plain` memory was borrowed from a `&'m [u8]` of exactly `len` bytes.
                Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) })
            }
            _ => None,
        }
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`, as [`copy_to`](Self::copy_to) does, and
    /// from a file with `pread(2)`: a read past the file's end is `UnexpectedEof`.
    pub(crate) fn read_into(&self, offset: usize, dst: &mut [u8]) -> io::Result<()> {
        let Access::File { fd, offset: base } = self.access else {
            self.copy_to(offset, dst);
            return Ok(());
        };
        if offset
            .checked_add(dst.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the guest memory",
            ));
        }
        // SAFETY: `fd` was a `BorrowedFd<'m>` when this value was made, and the `'m` borrow
        // (held by `_borrow`) keeps it open for as long as `self` lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        crate::file::pread_exact(fd, dst, base + offset as u64, crate::error::Op::ReadMemory)
    }

    /// What to call this memory in an error message: the file's path for file-backed memory.
    pub(crate) fn describe(&self) -> std::path::PathBuf {
        match self.access {
            Access::File { fd, .. } => std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .unwrap_or_else(|_| format!("fd {fd}").into()),
            _ => "guest memory".into(),
        }
    }

    /// Address of the first byte (for identification only; never dereference it yourself
    /// without the guarantees of [`GuestMemory::from_raw_parts`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`, with loads suited to how the
    /// memory may be written (see the module docs).
    ///
    /// # Panics
    ///
    /// If `offset + dst.len()` is past the end of the region.
    /// File-backed memory ([`from_file`](Self::from_file)) is read with `pread(2)`; a read
    /// error there panics too — use a save, which reports it, rather than `copy_to`.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) {
        let end = offset.checked_add(dst.len());
        assert!(
            end.is_some_and(|e| e <= self.len),
            "copy of {} bytes at {offset} from a guest region of {} bytes",
            dst.len(),
            self.len
        );
        match self.access {
            Access::File { .. } => {
                if let Err(e) = self.read_into(offset, dst) {
                    panic!(
                        "read of {} bytes at {offset} of a guest memory file: {e}",
                        dst.len()
                    );
                }
            }
            Access::Plain => {
                // SAFETY: the range is inside the region (checked above), which was borrowed
                // from a `&'m [u8]` that lives at least as long as `self`.
                let src = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) };
                dst.copy_from_slice(&src[offset..offset + dst.len()]);
            }
            Access::Atomic => {
                // SAFETY: the region is a `&'m [AtomicU64]`, alive as long as `self`, of
                // exactly `len / 8` words.
                let words = unsafe {
                    std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8)
                };
                if offset % 8 == 0 && dst.len() % 8 == 0 {
                    // Whole words: the case of every page.
                    let from = &words[offset / 8..(offset + dst.len()) / 8];
                    for (d, w) in dst.chunks_exact_mut(8).zip(from) {
                        d.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
                    }
                    return;
                }
                let mut pos = offset;
                let mut out = 0usize;
                while out < dst.len() {
                    let word = words[pos / 8].load(Ordering::Relaxed).to_ne_bytes();
                    let skip = pos % 8;
                    let take = (8 - skip).min(dst.len() - out);
                    dst[out..out + take].copy_from_slice(&word[skip..skip + take]);
                    out += take;
                    pos += take;
                }
            }
            Access::Volatile => {
                let base = self.ptr.as_ptr();
                let mut out = 0usize;
                // Byte loads until the source is 8-byte aligned, then words, then bytes.
                while out < dst.len() && (base as usize + offset + out) % 8 != 0 {
                    // SAFETY: `offset + out < offset + dst.len() <= len`: the address is inside
                    // the region.
                    let at = unsafe { base.add(offset + out) };
                    // SAFETY: `at` is inside the region that the caller of `from_raw_parts`
                    // promised stays mapped and readable.
                    dst[out] = unsafe { at.read_volatile() };
                    out += 1;
                }
                while dst.len() - out >= 8 {
                    // SAFETY: as above, the 8 bytes from here are inside the region.
                    let at = unsafe { base.add(offset + out) }.cast::<u64>();
                    // SAFETY: 8 readable bytes inside the region, 8-byte aligned (the loop
                    // above ends on an aligned address).
                    let w = unsafe { at.read_volatile() };
                    dst[out..out + 8].copy_from_slice(&w.to_ne_bytes());
                    out += 8;
                }
                while out < dst.len() {
                    // SAFETY: as in the first loop, inside the region.
                    let at = unsafe { base.add(offset + out) };
                    // SAFETY: as in the first loop.
                    dst[out] = unsafe { at.read_volatile() };
                    out += 1;
                }
            }
        }
    }
}

/// The system's page size (`sysconf(_SC_PAGESIZE)`).
pub fn host_page_size() -> usize {
    rustix::param::page_size()
}

/// A private, writable mapping of part of a file (`mmap(2)` with `MAP_PRIVATE`): reads see the
/// file until a page is written, writes go to private copies and never reach the file.
///
/// This is the guest memory of a lazy restore ([`crate::lazy`]).
#[derive(Debug)]
pub struct PrivateMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is memory owned by this value; access goes through `&self` (shared,
// read-only) or `&mut self` (exclusive), like a `Box<[u8]>`.
unsafe impl Send for PrivateMapping {}
// SAFETY: as above; `as_slice` hands out `&[u8]` only from `&self`.
unsafe impl Sync for PrivateMapping {}

impl PrivateMapping {
    /// Maps `len` bytes of `fd` from `offset` (a multiple of the host page size) privately,
    /// readable and writable, without reserving swap (`MAP_NORESERVE`). `len` 0 gives an empty
    /// mapping.
    pub(crate) fn map_file(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: a fresh mapping (null hint, no MAP_FIXED) replaces no existing memory; the
        // descriptor is valid for the call; the result is checked and unmapped once in `Drop`.
        let raw = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
                fd,
                offset,
            )
        }?;
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(Self { ptr, len })
    }

    /// Replaces `offset .. offset + len` (host-page aligned, inside the mapping) with fresh
    /// anonymous zero pages (`MAP_FIXED | MAP_ANONYMOUS | MAP_PRIVATE`): they read as zero
    /// whatever the file holds there, without reading the file or touching memory.
    pub(crate) fn map_zero(&mut self, offset: usize, len: usize) -> io::Result<()> {
        let page = host_page_size();
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len && offset % page == 0 && len % page == 0);
        if !inside {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "zero mapping of {len} bytes at {offset} does not fit a mapping of {} bytes",
                    self.len
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: MAP_FIXED replaces exactly `offset .. offset + len` of our own live mapping
        // (checked above to lie inside it and be page aligned); `&mut self` guarantees that no
        // borrow of those bytes exists, and the new pages stay part of this mapping, unmapped
        // with it in `Drop` (munmap of the whole range covers both kinds of pages).
        let at = self.ptr.as_ptr().wrapping_add(offset);
        // SAFETY: see above.
        let raw = unsafe {
            mm::mmap_anonymous(
                at.cast(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }?;
        if raw.cast::<u8>() != self.ptr.as_ptr().wrapping_add(offset) {
            return Err(io::Error::other("MAP_FIXED mapped at another address"));
        }
        Ok(())
    }

    /// Asks the kernel to start reading the whole mapping in the background
    /// (`madvise(MADV_WILLNEED)`); failure is harmless and reported as `false`.
    pub(crate) fn advise_willneed(&self) -> bool {
        if self.len == 0 {
            return false;
        }
        // SAFETY: the range is exactly our own live mapping; MADV_WILLNEED only schedules
        // read-ahead and never changes contents or the mapping.
        unsafe { mm::madvise(self.ptr.as_ptr().cast(), self.len, mm::Advice::WillNeed) }.is_ok()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte, for handing the memory to a hypervisor
    /// (`KVM_SET_USER_MEMORY_REGION`); it stays valid until `self` is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` mapped, readable bytes (or is dangling with len 0) that
        // stay mapped until `self` is dropped; a private mapping is changed only through this
        // value (`&mut self`), so the borrow tied to `&self` sees no writes — provided the file
        // is not changed in place while it is mapped, the rule of lazy restore (see
        // `crate::lazy`), which our own saves and updates keep by renaming new files over it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable (copy-on-write: the file is never changed).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, the mapping is writable (PROT_WRITE), and `&mut self`
        // guarantees that no other borrow of the bytes exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes as a [`GuestMemory`] (for saving them again, e.g. with a live save).
    pub fn guest_memory(&self) -> GuestMemory<'_> {
        GuestMemory::from_slice(self.as_slice())
    }
}

impl Drop for PrivateMapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `ptr`/`len` describe the mapping created in `map_file` (possibly with parts
        // replaced in place by `map_zero`) and not unmapped before; no borrow outlives `self`.
        let _ = unsafe { mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(feature = "vm-memory")]
pub(crate) mod vm {
    //! The `unsafe` parts of the `vm-memory` integration ([`crate::vm_memory`]).

    use super::GuestMemory;
    use std::sync::Arc;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestRegionMmap;

    /// A `vm-memory` region as a [`GuestMemory`] read with volatile loads.
    pub(crate) fn region_memory<B: Bitmap>(region: &GuestRegionMmap<B>) -> GuestMemory<'_> {
        // SAFETY: `as_ptr()`/`size()` describe the region's mapping, which its `MmapRegion`
        // keeps mapped until it is dropped; the `&'_ GuestRegionMmap` borrow keeps the region
        // (and its `Arc<MmapRegion>`) alive for the lifetime of the result. vm-memory accesses
        // guest memory only through volatile reads and writes (`VolatileSlice`), and vCPUs
        // write it from outside the process's Rust code, which is what `from_raw_parts` allows.
        unsafe { GuestMemory::from_raw_parts(region.as_ptr(), region.size()) }
    }

    /// The bytes of a region that this crate has just created and not shared: `None` unless
    /// the region's mapping is owned by it, writable, and referenced by no other
    /// `GuestRegionMmap` (the `Arc` around its `MmapRegion` has no other owner and no weak
    /// reference).
    pub(crate) fn exclusive_bytes<B: Bitmap>(region: &mut GuestRegionMmap<B>) -> Option<&mut [u8]> {
        let mapping = region.get_mmap();
        // `mapping` is our clone: two strong references means the region's own and ours.
        let alone = Arc::strong_count(&mapping) == 2 && Arc::weak_count(&mapping) == 0;
        drop(mapping);
        let writable = region.prot() & rustix::mm::ProtFlags::WRITE.bits() as i32 != 0;
        if !alone || !region.owned() || !writable || region.size() == 0 {
            return None;
        }
        // SAFETY: the mapping is owned by this region's `MmapRegion` (so it stays mapped while
        // the region lives, and the returned borrow is tied to `&mut region`), it is writable,
        // and no other `GuestRegionMmap` or `Weak` can reach it; `&mut region` excludes every
        // other use of the region for the life of the borrow. vCPUs are not attached to memory
        // that has not been handed out yet.
        Some(unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.size()) })
    }

    /// Maps anonymous zero pages over `offset .. offset + len` of an exclusively held region
    /// (see [`exclusive_bytes`]); the caller has checked alignment and bounds.
    pub(crate) fn map_zero<B: Bitmap>(
        region: &mut GuestRegionMmap<B>,
        offset: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let page = super::host_page_size();
        let fits = offset
            .checked_add(len)
            .is_some_and(|end| end <= region.size() && offset % page == 0 && len % page == 0);
        if exclusive_bytes(region).is_none() || !fits {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "zero mapping outside an exclusively owned region",
            ));
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: as in `PrivateMapping::map_zero`: the range lies inside the region's own
        // mapping (checked), which nothing else references (`exclusive_bytes`), and stays part
        // of it — `MmapRegion`'s `munmap` of the whole range on drop covers the new pages.
        let at = region.as_ptr().wrapping_add(offset);
        // SAFETY: see above.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                at.cast(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE
                    | rustix::mm::MapFlags::FIXED
                    | rustix::mm::MapFlags::NORESERVE,
            )
        }?;
        if raw.cast::<u8>() != region.as_ptr().wrapping_add(offset) {
            return Err(std::io::Error::other("MAP_FIXED mapped at another address"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_from_every_kind_of_memory() {
        let bytes: Vec<u8> = (0..64u8).collect();
        let words: Vec<AtomicU64> = bytes
            .chunks(8)
            .map(|c| AtomicU64::new(u64::from_ne_bytes(c.try_into().unwrap())))
            .collect();
        let plain = GuestMemory::from_slice(&bytes);
        let atomic = GuestMemory::from_atomic(&words);
        // SAFETY: `bytes` lives for the whole test and nothing writes it.
        let raw = unsafe { GuestMemory::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        for mem in [plain, atomic, raw] {
            assert_eq!(mem.len(), 64);
            for (off, len) in [(0, 64), (3, 20), (7, 1), (8, 16), (13, 51), (64, 0)] {
                let mut out = vec![0u8; len];
                mem.copy_to(off, &mut out);
                assert_eq!(out, &bytes[off..off + len], "{:?} {off} {len}", mem.access);
            }
        }
    }

    #[test]
    #[should_panic(expected = "copy of")]
    fn refuses_to_read_past_the_end() {
        let bytes = [0u8; 16];
        GuestMemory::from_slice(&bytes).copy_to(10, &mut [0u8; 8]);
    }
}
