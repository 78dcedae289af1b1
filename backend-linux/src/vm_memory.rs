//! rust-vmm [`vm-memory`](https://docs.rs/vm-memory) integration (Cargo feature `vm-memory`).
//!
//! Saves, live-saves and restores the guest memory of a VMM built on `vm-memory` 0.18
//! ([`GuestMemoryMmap`]): one mapped-ram block per region, named by the caller (QEMU names the
//! main block after its memory backend, `pc.ram` without one).
//!
//! * [`VmLiveSave`] saves a running guest in passes, taking each pass's dirty pages from the
//!   regions' [`AtomicBitmap`]s — the pages the VMM's own devices wrote through `vm-memory` —
//!   ORed with the KVM dirty logs a VMM passes in for its vCPUs' writes.
//! * [`save_guest_memory`] saves a paused guest in one pass.
//! * [`restore_guest_memory`] restores a snapshot into freshly allocated guest memory;
//!   [`restore_lazy_guest_memory`] maps the snapshot instead (see [`crate::lazy`]).
//!
//! Guest memory is read with volatile loads (as `vm-memory` itself accesses it), never through
//! a `&[u8]`, so vCPUs and device threads may keep writing while a pass runs.
//!
//! ```no_run
//! use mapped_ram_linux::vm_memory::{restore_guest_memory, DirtyTracking, VmLiveSave};
//! use mapped_ram_linux::{LiveOptions, RestoreOptions};
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
//! let path = std::path::Path::new("/var/tmp/vm.mr");
//! let mut live = VmLiveSave::begin(path, &mem, &["pc.ram"], DirtyTracking::VmMemory,
//!                                  &LiveOptions::default())?;
//! live.pass(&[])?;                                      // everything, while the guest runs
//! mem.write_obj(42u64, GuestAddress(0x1000)).unwrap(); // the guest (or a device) writes
//! live.pass(&[])?;                                      // only the dirty pages
//! live.finish(&[], None)?;                              // guest paused: last pass, commit
//! let (back, _) = restore_guest_memory::<()>(path, &[("pc.ram", GuestAddress(0))],
//!                                            &RestoreOptions::default())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use mapped_ram_core::bitmap::words_for;
pub use vm_memory;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, Bytes};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::error::{OptionError, RestoreError, RestoreErrorKind, SaveError};
use crate::inspect::{inspect, open_snapshot};
use crate::lazy::{self, LazyOptions, LazyReport, LazyTarget};
use crate::live::{
    DirtyLog, FinishedSave, LiveOptions, LiveRegion, LiveReport, LiveSave, PassReport,
};
use crate::mem::vm;
use crate::restore::{restore, RestoreOptions, RestoreRegion, RestoreReport};
use crate::save::{GuestRanges, SaveOptions, SaveReport};

/// Target page size of the guests this module saves: 4 KiB (x86-64, aarch64 with 4 KiB
/// pages), which is also the granularity of `vm-memory`'s `AtomicBitmap` on such hosts.
pub const PAGE_SIZE: u64 = 4096;

/// The regions of `mem`, in address order, as blocks named `names`.
pub fn live_regions<'m, B: Bitmap>(
    mem: &'m GuestMemoryMmap<B>,
    names: &[&'m str],
) -> Result<Vec<LiveRegion<'m>>, SaveError> {
    if names.len() != mem.num_regions() {
        return Err(OptionError::RegionNames {
            names: names.len(),
            regions: mem.num_regions(),
        }
        .into());
    }
    Ok(mem
        .iter()
        .zip(names)
        .map(|(region, name)| LiveRegion {
            name,
            memory: vm::region_memory(region),
            page_size: PAGE_SIZE,
        })
        .collect())
}

/// The guest address range of each region, named `names`, for [`SaveOptions::guest_ranges`].
fn guest_ranges<B: Bitmap>(mem: &GuestMemoryMmap<B>, names: &[&str]) -> Vec<GuestRanges> {
    mem.iter()
        .zip(names)
        .map(|(r, name)| GuestRanges {
            block: (*name).into(),
            ranges: std::iter::once(r.start_addr().0..r.start_addr().0 + r.len()).collect(),
        })
        .collect()
}

/// `opts` with the regions' guest addresses recorded, unless the caller gave ranges.
fn with_ranges<B: Bitmap>(
    opts: &SaveOptions,
    mem: &GuestMemoryMmap<B>,
    names: &[&str],
) -> SaveOptions {
    let mut opts = opts.clone();
    if opts.guest_ranges.is_empty() {
        opts.guest_ranges = guest_ranges(mem, names);
    }
    opts
}

/// Saves the memory of a paused guest to `path` in one pass (as [`crate::save()`] does),
/// recording each region's guest address (see [`crate::BlockInfo::guest_ranges`]).
pub fn save_guest_memory<B: Bitmap>(
    path: &Path,
    mem: &GuestMemoryMmap<B>,
    names: &[&str],
    opts: &SaveOptions,
) -> Result<SaveReport, SaveError> {
    let regions = live_regions(mem, names)?;
    crate::save::save_memory(path, &regions, &with_ranges(opts, mem, names), None)
}

/// Where a [`VmLiveSave`] learns which pages changed. A VMM says it once, at
/// [`VmLiveSave::begin`], and every pass then insists on it: writes by vCPUs are invisible to
/// `vm-memory`'s bitmaps, so a VMM whose guest runs on KVM must hand in KVM's logs each pass,
/// and forgetting them is an error rather than a snapshot with stale pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirtyTracking {
    /// Only the regions' `AtomicBitmap`s: every write goes through `vm-memory` (emulated
    /// devices, tests). Passes take no KVM logs.
    VmMemory,
    /// The regions' `AtomicBitmap`s ORed with KVM's dirty log of each region
    /// (`KVM_GET_DIRTY_LOG` of its memory slot), which every pass must be given.
    VmMemoryAndKvm,
}

/// KVM's dirty log of the guest region at `address` (`KVM_GET_DIRTY_LOG` of its slot): keyed
/// by the region, never by position.
#[derive(Debug, Clone, Copy)]
pub struct KvmLog<'d> {
    /// The region's guest physical address.
    pub address: GuestAddress,
    /// Its dirty bitmap (one bit per page).
    pub bitmap: &'d [u64],
}

/// The dirty bitmap types a VMM's `GuestMemoryMmap<B>` may have: `AtomicBitmap` (writes
/// through `vm-memory` tracked), `Option<AtomicBitmap>` (Firecracker: tracked only when
/// dirty tracking was turned on), and `()` (nothing tracked: only KVM's logs tell).
pub trait DirtyBitmap: Bitmap {
    /// The bitmap's words (one bit per page) for `pages` pages, clearing it; `None` when this
    /// bitmap tracks nothing.
    fn take(&self, pages: u64) -> Option<Vec<u64>>;
    /// Clears it.
    fn clear(&self);
    /// Whether it tracks writes, with one bit per page of `pages`.
    fn tracks(&self, pages: u64) -> bool;
}

impl DirtyBitmap for AtomicBitmap {
    fn take(&self, _pages: u64) -> Option<Vec<u64>> {
        Some(self.get_and_reset())
    }
    fn clear(&self) {
        self.reset();
    }
    fn tracks(&self, pages: u64) -> bool {
        self.len() as u64 == pages
    }
}

impl DirtyBitmap for Option<AtomicBitmap> {
    fn take(&self, pages: u64) -> Option<Vec<u64>> {
        self.as_ref().and_then(|b| b.take(pages))
    }
    fn clear(&self) {
        if let Some(b) = self {
            b.reset();
        }
    }
    fn tracks(&self, pages: u64) -> bool {
        self.as_ref().is_some_and(|b| b.tracks(pages))
    }
}

impl DirtyBitmap for () {
    fn take(&self, _pages: u64) -> Option<Vec<u64>> {
        None
    }
    fn clear(&self) {}
    fn tracks(&self, _pages: u64) -> bool {
        false
    }
}

/// A live save of `vm-memory` guest memory (see the module docs and [`crate::live`]), for any
/// of the bitmap types of [`DirtyBitmap`].
#[derive(Debug)]
pub struct VmLiveSave<'m, B: DirtyBitmap = AtomicBitmap> {
    live: LiveSave<'m>,
    mem: &'m GuestMemoryMmap<B>,
    names: Vec<&'m str>,
    tracking: DirtyTracking,
}

impl<'m, B: DirtyBitmap> VmLiveSave<'m, B> {
    /// Starts a live save of `mem` (one block per region, named `names`) to `path`, and clears
    /// the regions' dirty bitmaps: the first pass writes everything, later passes what was
    /// dirtied since the pass before, as `tracking` says.
    ///
    /// [`DirtyTracking::VmMemory`] needs bitmaps that track (an `AtomicBitmap` of one bit per
    /// page, or an `Option<AtomicBitmap>` that is `Some`); with `()` only KVM's logs can tell
    /// what changed ([`DirtyTracking::VmMemoryAndKvm`]).
    pub fn begin(
        path: &Path,
        mem: &'m GuestMemoryMmap<B>,
        names: &[&'m str],
        tracking: DirtyTracking,
        opts: &LiveOptions,
    ) -> Result<Self, SaveError> {
        let regions = live_regions(mem, names)?;
        if tracking == DirtyTracking::VmMemory {
            for region in mem.iter() {
                let pages = region.len() / PAGE_SIZE;
                if !region_bitmap(region).tracks(pages) {
                    return Err(OptionError::RegionBitmap {
                        address: region.start_addr().0,
                        bits: 0,
                        pages,
                    }
                    .into());
                }
            }
        }
        let opts = LiveOptions {
            save: with_ranges(&opts.save, mem, names),
            ..opts.clone()
        };
        let live = LiveSave::begin(path, &regions, &opts)?;
        for region in mem.iter() {
            region_bitmap(region).clear();
        }
        Ok(Self {
            live,
            mem,
            names: names.to_vec(),
            tracking,
        })
    }

    /// Fetches and clears the dirty bitmaps, ORed with the KVM logs, one per region.
    fn take_dirty(&self, kvm: &[KvmLog<'_>]) -> Result<Vec<Vec<u64>>, SaveError> {
        let tracking = |m: String| SaveError::from(OptionError::DirtyTracking(m));
        match self.tracking {
            DirtyTracking::VmMemory if !kvm.is_empty() => {
                return Err(tracking(
                    "KVM dirty logs given to a save begun with DirtyTracking::VmMemory".into(),
                ))
            }
            _ => {}
        }
        for log in kvm {
            if !self.mem.iter().any(|r| r.start_addr() == log.address) {
                return Err(tracking(format!(
                    "a KVM dirty log is given for guest address {:#x}, where no region starts",
                    log.address.0
                )));
            }
        }
        let mut out = Vec::with_capacity(self.mem.num_regions());
        for (region, name) in self.mem.iter().zip(&self.names) {
            let pages = region.len() / PAGE_SIZE;
            let mut words = region_bitmap(region)
                .take(pages)
                .unwrap_or_else(|| vec![0; words_for(pages) as usize]);
            let logs: Vec<&KvmLog<'_>> = kvm
                .iter()
                .filter(|l| l.address == region.start_addr())
                .collect();
            match (self.tracking, logs.as_slice()) {
                (DirtyTracking::VmMemoryAndKvm, []) => {
                    return Err(OptionError::MissingDirtyLog {
                        block: (*name).into(),
                    }
                    .into())
                }
                (_, [_, _, ..]) => {
                    return Err(OptionError::DuplicateDirtyBlock {
                        block: (*name).into(),
                    }
                    .into())
                }
                (_, [log]) => {
                    for (w, e) in words.iter_mut().zip(log.bitmap) {
                        *w |= *e;
                    }
                }
                (_, []) => {}
            }
            out.push(words);
        }
        Ok(out)
    }

    fn logs<'a>(&self, dirty: &'a [Vec<u64>]) -> Vec<DirtyLog<'a>>
    where
        'm: 'a,
    {
        self.names
            .iter()
            .zip(dirty)
            .map(|(name, words)| DirtyLog::new(name, words))
            .collect()
    }

    /// A pass over the pages dirtied since the previous pass (everything the first time):
    /// `vm-memory`'s bitmaps, ORed with `kvm` — one log per region with
    /// [`DirtyTracking::VmMemoryAndKvm`], none with [`DirtyTracking::VmMemory`].
    pub fn pass(&mut self, kvm: &[KvmLog<'_>]) -> Result<PassReport, SaveError> {
        let dirty = self.take_dirty(kvm)?;
        let logs = self.logs(&dirty);
        self.live.pass(&logs)
    }

    /// The last pass, with the guest paused, then the device state and bitmaps: the guest may
    /// resume when it returns; [`FinishedSave::commit`] makes the snapshot durable.
    pub fn finish_pass(
        self,
        kvm: &[KvmLog<'_>],
        device_state: Option<&[u8]>,
    ) -> Result<FinishedSave<'m>, SaveError> {
        let dirty = self.take_dirty(kvm)?;
        let logs = self.logs(&dirty);
        self.live.finish_pass(&logs, device_state)
    }

    /// [`finish_pass`](Self::finish_pass), then [`FinishedSave::commit`].
    pub fn finish(
        self,
        kvm: &[KvmLog<'_>],
        device_state: Option<&[u8]>,
    ) -> Result<LiveReport, SaveError> {
        self.finish_pass(kvm, device_state)?.commit()
    }

    /// The underlying live save.
    pub fn live(&self) -> &LiveSave<'m> {
        &self.live
    }
}

fn region_bitmap<B: Bitmap>(region: &GuestRegionMmap<B>) -> &B {
    let mapping: &MmapRegion<B> = region;
    mapping.bitmap()
}

fn sorted_by_address<'a>(layout: &[(&'a str, GuestAddress)]) -> Vec<(&'a str, GuestAddress)> {
    let mut v = layout.to_vec();
    v.sort_by_key(|(_, a)| a.0);
    v
}

/// The guest address of every block that recorded exactly one range.
fn recorded_layout(
    info: &crate::SnapshotInfo,
) -> Result<Vec<(String, GuestAddress)>, RestoreError> {
    let mut out = Vec::new();
    for b in &info.blocks {
        match b.guest_ranges.as_slice() {
            [] => {}
            [r] if r.end - r.start == b.layout.length => {
                out.push((b.name.clone(), GuestAddress(r.start)))
            }
            _ => {
                return Err(RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                    "block {:?} recorded guest ranges {:?} that are not one region of its {} bytes; give a layout",
                    b.name, b.guest_ranges, b.layout.length
                )))
                .into())
            }
        }
    }
    Ok(out)
}

fn collection<B: Bitmap>(
    regions: Vec<GuestRegionMmap<B>>,
) -> Result<GuestMemoryMmap<B>, RestoreError> {
    GuestMemoryMmap::from_regions(regions).map_err(|e| {
        RestoreErrorKind::Options(OptionError::GuestMemory(format!(
            "guest memory layout: {e}"
        )))
        .into()
    })
}

/// Restores the blocks of the snapshot at `path` into newly allocated guest memory: block
/// `name` at guest address `addr` for each `(name, addr)` of `layout`, sized as in the
/// snapshot. Blocks the layout does not name are skipped. An empty `layout` means the guest
/// addresses the snapshot recorded (every block saved by [`VmLiveSave`] or
/// [`save_guest_memory`]; a block recorded in several ranges cannot be one region and is an
/// error).
pub fn restore_guest_memory<B: NewBitmap>(
    path: &Path,
    layout: &[(&str, GuestAddress)],
    opts: &RestoreOptions,
) -> Result<(GuestMemoryMmap<B>, RestoreReport), RestoreError> {
    let info = inspect(path, opts.offset)?;
    let recorded = recorded_layout(&info)?;
    let layout = if layout.is_empty() {
        sorted_by_address(
            &recorded
                .iter()
                .map(|(n, a)| (n.as_str(), *a))
                .collect::<Vec<_>>(),
        )
    } else {
        sorted_by_address(layout)
    };
    let mut regions = Vec::with_capacity(layout.len());
    for (name, addr) in &layout {
        let block = info.block_for_restore(name)?;
        let len = usize::try_from(block.layout.length).map_err(|_| {
            RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                "block {name:?} is too large"
            )))
        })?;
        let region = GuestRegionMmap::<B>::from_range(*addr, len, None).map_err(|e| {
            RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                "guest memory for block {name:?}: {e}"
            )))
        })?;
        regions.push((region, block.layout.page_size));
    }
    let report = {
        let mut targets = Vec::with_capacity(regions.len());
        for ((region, page_size), (name, _)) in regions.iter_mut().zip(&layout) {
            let memory = vm::exclusive_bytes(region).ok_or_else(|| {
                RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                    "the new guest memory for block {name:?} is not exclusively ours"
                )))
            })?;
            targets.push(RestoreRegion {
                name,
                memory,
                page_size: *page_size,
            });
        }
        let opts = RestoreOptions {
            memory_is_zeroed: true,
            ..opts.clone()
        };
        restore(path, &mut targets, &opts, None)?
    };
    let mem = collection(regions.into_iter().map(|(r, _)| r).collect())?;
    Ok((mem, report))
}

/// Restores the blocks of the snapshot at `path` into the VMM's existing guest memory `mem`
/// (memfd, hugetlbfs, any bitmap type), without `unsafe` on either side: block `name` goes
/// to guest address `addr` for each `(name, addr)` of `layout` (an empty `layout`: the
/// addresses the snapshot recorded). Each chunk is assembled in a channel's buffer and written
/// with `vm-memory`'s own volatile `write_slice` (which also marks the pages dirty in `mem`'s
/// bitmap). The VMM keeps its vCPUs stopped while it runs.
pub fn restore_into_guest_memory<B: Bitmap + Send + Sync>(
    path: &Path,
    mem: &GuestMemoryMmap<B>,
    layout: &[(&str, GuestAddress)],
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let info = inspect(path, opts.offset)?;
    let recorded = recorded_layout(&info)?;
    let layout: Vec<(&str, GuestAddress)> = if layout.is_empty() {
        recorded.iter().map(|(n, a)| (n.as_str(), *a)).collect()
    } else {
        layout.to_vec()
    };
    let mut specs = Vec::with_capacity(layout.len());
    for (name, _) in &layout {
        let block = info.block_for_restore(name)?;
        specs.push((*name, block.layout.length, block.layout.page_size));
    }
    let write = |region: usize, offset: u64, bytes: &[u8]| -> std::io::Result<()> {
        let (_, base) = layout[region];
        let addr = base
            .checked_add(offset)
            .ok_or_else(|| std::io::Error::other("guest address overflows"))?;
        mem.write_slice(bytes, addr)
            .map_err(|e| std::io::Error::other(format!("guest memory at {:#x}: {e}", addr.0)))
    };
    crate::restore::restore_to(
        path,
        crate::restore::Dest::CopyOut(specs, &write),
        &RestoreOptions {
            memory_is_zeroed: false,
            ..opts.clone()
        },
        None,
    )
}

/// A `vm-memory` region being fixed up by a lazy restore.
struct VmTarget<'r, B: Bitmap>(&'r mut GuestRegionMmap<B>);

impl<B: Bitmap> LazyTarget for VmTarget<'_, B> {
    fn map_zero(&mut self, offset: usize, len: usize) -> std::io::Result<()> {
        vm::map_zero(self.0, offset, len)
    }
    fn bytes_mut(&mut self) -> std::io::Result<&mut [u8]> {
        vm::exclusive_bytes(self.0).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "guest region is not exclusively owned",
            )
        })
    }
}

/// Maps the blocks of the snapshot at `path` as guest memory (private file mappings, see
/// [`crate::lazy`]): block `name` at guest address `addr` for each `(name, addr)` of `layout`.
/// The guest can run as soon as this returns; pages are read when first touched.
///
/// The regions keep the snapshot's descriptor as their [`FileOffset`]; the mappings are
/// private, so never share them with another process (vhost-user) by that file.
pub fn restore_lazy_guest_memory<B: NewBitmap>(
    path: &Path,
    layout: &[(&str, GuestAddress)],
    opts: &LazyOptions,
) -> Result<(GuestMemoryMmap<B>, LazyReport), RestoreError> {
    let started = std::time::Instant::now();
    let snap = open_snapshot(path, opts.offset)?;
    let info = snap.info;
    let layout = sorted_by_address(layout);
    let names: Vec<&str> = layout.iter().map(|(n, _)| *n).collect();
    let chosen = lazy::choose_blocks(&info, &names)?;
    let clean = lazy::clean_zero(&info);
    let file = Arc::new(File::from(snap.fd));
    let mut report = LazyReport {
        machine: info.machine.clone(),
        blocks_skipped: info
            .blocks
            .iter()
            .filter(|b| !names.contains(&b.name.as_str()))
            .map(|b| b.name.clone())
            .collect(),
        ..LazyReport::default()
    };
    let prot = (rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE).bits() as i32;
    let flags = (rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE).bits() as i32;
    let mut regions = Vec::with_capacity(chosen.len());
    for (block, (name, addr)) in chosen.iter().zip(&layout) {
        let len = usize::try_from(block.layout.length).map_err(|_| {
            RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                "block {name:?} is too large"
            )))
        })?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, B::with_len(len))
            .with_file_offset(FileOffset::from_arc(
                Arc::clone(&file),
                block.layout.pages_offset,
            ))
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| {
                RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                    "mapping block {name:?}: {e}"
                )))
            })?;
        let mut region = GuestRegionMmap::new(mapping, *addr).ok_or_else(|| {
            RestoreErrorKind::Options(OptionError::GuestMemory(format!(
                "block {name:?} does not fit at {:#x}",
                addr.0
            )))
        })?;
        if clean {
            lazy::count_clean(block, &mut report);
        } else {
            lazy::fix_clear_pages(
                std::os::fd::AsFd::as_fd(&*file),
                path,
                block,
                &mut VmTarget(&mut region),
                opts,
                &mut report,
            )?;
        }
        report.blocks_restored.push(block.name.clone());
        regions.push(region);
    }
    let mem = collection(regions)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok((mem, report))
}
