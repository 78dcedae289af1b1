//! Memory mappings of RAM files and page-aligned buffers: with [`crate::mem`], the only module
//! allowed `unsafe` code (`#![deny(unsafe_code)]` at the crate root).
//!
//! Everything else in this crate reaches the kernel through rustix's safe wrappers, passing
//! guest memory as ordinary `&[u8]` / `&mut [u8]` slices.

use std::alloc::{self, Layout};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;

use rustix::mm::{self, MapFlags, ProtFlags};

/// Alignment of every buffer handed to `O_DIRECT` I/O: the largest logical block size in
/// common use and the x86-64 page size.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A shared, writable or read-only mapping of a whole file (`mmap(2)` with `MAP_SHARED`).
///
/// Use it to treat a RAM file — for example a QEMU `memory-backend-file` on `/dev/shm` — as
/// a guest memory region.
#[derive(Debug)]
pub struct MappedFile {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&self`
// (shared, read-only) or `&mut self` (exclusive), so the usual borrow rules make it as
// thread-safe as a `Box<[u8]>`.
unsafe impl Send for MappedFile {}
// SAFETY: as above; `as_slice` hands out `&[u8]` only from `&self`.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `len` bytes of `file` from offset 0. `len` 0 gives an empty mapping.
    ///
    /// `mmap(2)`: <https://man7.org/linux/man-pages/man2/mmap.2.html>.
    ///
    /// # Safety
    ///
    /// For as long as the mapping lives, nobody — no other process, no other descriptor of
    /// this one — may truncate the file below `len` (touching a page past its end raises
    /// `SIGBUS`) or change its bytes (the slices this hands out promise they do not change).
    /// For memory another party may write or truncate, read the file with
    /// [`crate::GuestMemory::from_file`] instead. Where the file system must find space for a
    /// writable mapping's pages (tmpfs, sparse files), allocate them first (`fallocate(2)`), or
    /// a full file system raises `SIGBUS` on the first write.
    pub unsafe fn map(file: &File, len: usize, writable: bool) -> std::io::Result<Self> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
                writable,
            });
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: we ask the kernel for a fresh mapping (null hint, no MAP_FIXED), so no
        // existing memory is replaced; the file descriptor is valid for the call; the result
        // is checked before use and unmapped exactly once in `Drop`.
        let raw = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                file.as_fd(),
                0,
            )
        }?;
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(Self { ptr, len, writable })
    }

    /// Opens and maps the file at `path` read-only.
    ///
    /// # Safety
    ///
    /// As for [`MappedFile::map`].
    pub unsafe fn open_readonly(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "file too large"))?;
        // SAFETY: the caller keeps `map`'s contract for this file.
        unsafe { Self::map(&file, len, false) }
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` mapped, readable bytes (or is dangling with len 0) that
        // stay mapped until `self` is dropped; the returned borrow is tied to `&self`. Another
        // process may change a shared mapping's bytes, which is no different from memory
        // shared with a running guest and cannot break Rust's aliasing rules for `u8`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, writable. Returns `None` for a read-only mapping.
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        if !self.writable {
            return None;
        }
        // SAFETY: as in `as_slice`, and the mapping was created with PROT_WRITE; `&mut self`
        // guarantees no other borrow of the bytes exists in this process.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) })
    }

    /// Asks the kernel to fault in every page of the mapping for writing in one call
    /// (`madvise(2)` `MADV_POPULATE_WRITE`, Linux 5.14+), so a restore does not take one page
    /// fault per page. Failure is harmless and reported as `false`.
    pub fn populate_write(&mut self) -> bool {
        match self.as_mut_slice() {
            Some(bytes) => populate_write(bytes),
            None => false,
        }
    }
}

/// Faults in, for writing, every whole host page of `memory` with one `madvise(2)`
/// `MADV_POPULATE_WRITE` call (Linux 5.14+): the kernel allocates (or, for a file mapping,
/// prepares) them in one pass instead of taking a page fault per page on first write.
/// Contents do not change. Returns `false` when the kernel refused (older kernel, a mapping
/// that cannot be populated); that is harmless, pages are then faulted in as they are written.
///
/// See [madvise(2)](https://man7.org/linux/man-pages/man2/madvise.2.html).
pub fn populate_write(memory: &mut [u8]) -> bool {
    populate(memory, mm::Advice::LinuxPopulateWrite)
}

/// Faults in, for reading, every whole host page of `memory` with one `madvise(2)`
/// `MADV_POPULATE_READ` call (Linux 5.14+), instead of a page fault per few pages as they are
/// first read (a RAM file just mapped by the CLI, guest memory the guest never touched).
/// Returns `false` when the kernel refused, which is harmless.
///
/// See [madvise(2)](https://man7.org/linux/man-pages/man2/madvise.2.html).
pub fn populate_read(memory: &[u8]) -> bool {
    populate(memory, mm::Advice::LinuxPopulateRead)
}

fn populate(memory: &[u8], advice: mm::Advice) -> bool {
    let host = rustix::param::page_size();
    let addr = memory.as_ptr() as usize;
    let start = addr.next_multiple_of(host);
    let end = (addr + memory.len()) / host * host;
    if end <= start {
        return false;
    }
    // SAFETY: `start..end` lies inside `memory`, a live borrow, so it is mapped; the two
    // advices used here (from `populate_read`, and from `populate_write`, whose caller holds
    // the memory mutably borrowed) only fault pages in, as a read or a write of their current
    // contents would, and change neither the contents nor the mapping.
    unsafe { mm::madvise(start as *mut std::ffi::c_void, end - start, advice) }.is_ok()
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `ptr`/`len` describe a mapping created by `map` and not unmapped before;
        // no borrow of it can outlive `self`.
        let _ = unsafe { mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A zero-initialised heap buffer aligned to [`DIRECT_IO_ALIGN`], for `O_DIRECT` I/O of data
/// whose own memory is not aligned (a bounce buffer).
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (rounded up to a multiple of [`DIRECT_IO_ALIGN`]).
    ///
    /// # Panics
    ///
    /// Like `Vec::with_capacity`, if the size overflows `isize`.
    pub fn new(len: usize) -> Self {
        let layout = len
            .max(1)
            .checked_next_multiple_of(DIRECT_IO_ALIGN)
            .and_then(|len| Layout::from_size_align(len, DIRECT_IO_ALIGN).ok())
            .expect("aligned buffer size overflows");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, layout }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// `true` when `bytes` starts on a [`DIRECT_IO_ALIGN`] boundary.
pub fn is_aligned(bytes: &[u8]) -> bool {
    (bytes.as_ptr() as usize) % DIRECT_IO_ALIGN == 0
}
