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
//! use mapped_ram_linux::vm_memory::{restore_guest_memory, VmLiveSave};
//! use mapped_ram_linux::{LiveOptions, RestoreOptions};
//! use vm_memory::bitmap::AtomicBitmap;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
//! let path = std::path::Path::new("/var/tmp/vm.mr");
//! let mut live = VmLiveSave::begin(path, &mem, &["pc.ram"], &LiveOptions::default())?;
//! live.pass()?;                                         // everything, while the guest runs
//! mem.write_obj(42u64, GuestAddress(0x1000)).unwrap(); // the guest (or a device) writes
//! live.pass()?;                                         // only the dirty pages
//! live.finish(None, None)?;                             // guest paused: last pass, commit
//! let (back, _) = restore_guest_memory::<()>(path, &[("pc.ram", GuestAddress(0))],
//!                                            &RestoreOptions::default())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

pub use vm_memory;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::error::{OptionError, RestoreError, RestoreErrorKind, SaveError};
use crate::inspect::{inspect, open_snapshot};
use crate::lazy::{self, LazyOptions, LazyReport, LazyTarget};
use crate::live::{LiveOptions, LiveRegion, LiveReport, LiveSave, PassReport};
use crate::mem::vm;
use crate::restore::{restore, RestoreOptions, RestoreRegion, RestoreReport};
use crate::save::{SaveOptions, SaveReport};

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

/// Saves the memory of a paused guest to `path` in one pass (as [`crate::save()`] does).
pub fn save_guest_memory<B: Bitmap>(
    path: &Path,
    mem: &GuestMemoryMmap<B>,
    names: &[&str],
    opts: &SaveOptions,
) -> Result<SaveReport, SaveError> {
    let regions = live_regions(mem, names)?;
    let live = LiveSave::begin(
        path,
        &regions,
        &LiveOptions {
            save: opts.clone(),
            punch_holes: true,
        },
    )?;
    live.finish(&[], None).map(|r| r.save)
}

/// A live save of `vm-memory` guest memory, with `AtomicBitmap` dirty tracking (see the
/// module docs and [`crate::live`]).
#[derive(Debug)]
pub struct VmLiveSave<'m> {
    live: LiveSave<'m>,
    mem: &'m GuestMemoryMmap<AtomicBitmap>,
}

impl<'m> VmLiveSave<'m> {
    /// Starts a live save of `mem` (one block per region, named `names`) to `path`, and clears
    /// the regions' dirty bitmaps: the first pass writes everything, later passes what was
    /// dirtied since the pass before.
    pub fn begin(
        path: &Path,
        mem: &'m GuestMemoryMmap<AtomicBitmap>,
        names: &[&'m str],
        opts: &LiveOptions,
    ) -> Result<Self, SaveError> {
        let regions = live_regions(mem, names)?;
        for region in mem.iter() {
            let pages = region.len() / PAGE_SIZE;
            let bitmap = region_bitmap(region);
            if bitmap.len() as u64 != pages {
                return Err(OptionError::RegionBitmap {
                    address: region.start_addr().0,
                    bits: bitmap.len(),
                    pages,
                }
                .into());
            }
        }
        let live = LiveSave::begin(path, &regions, opts)?;
        for region in mem.iter() {
            region_bitmap(region).reset();
        }
        Ok(Self { live, mem })
    }

    /// Fetches and clears the dirty bitmaps, ORed with `kvm` logs (one per region) if given.
    fn take_dirty(&self, kvm: Option<&[&[u64]]>) -> Result<Vec<Vec<u64>>, SaveError> {
        if let Some(k) = kvm {
            if k.len() != self.mem.num_regions() {
                return Err(OptionError::DirtyLogCount {
                    logs: k.len(),
                    blocks: self.mem.num_regions(),
                }
                .into());
            }
        }
        Ok(self
            .mem
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let mut words = region_bitmap(region).get_and_reset();
                if let Some(extra) = kvm.map(|k| k[i]) {
                    for (w, e) in words.iter_mut().zip(extra) {
                        *w |= *e;
                    }
                }
                words
            })
            .collect())
    }

    /// A pass over the pages dirtied since the previous pass (everything the first time).
    pub fn pass(&mut self) -> Result<PassReport, SaveError> {
        self.pass_with(None)
    }

    /// A pass over the pages dirtied since the previous pass according to `vm-memory` or to
    /// the KVM dirty logs `kvm` (one per region, in address order).
    pub fn pass_with(&mut self, kvm: Option<&[&[u64]]>) -> Result<PassReport, SaveError> {
        let dirty = self.take_dirty(kvm)?;
        let refs: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
        self.live.pass(&refs)
    }

    /// The last pass, with the guest paused (and the final KVM dirty logs, if any), then the
    /// device state, bitmaps, sync and rename (see [`LiveSave::finish`]).
    pub fn finish(
        self,
        kvm: Option<&[&[u64]]>,
        device_state: Option<&[u8]>,
    ) -> Result<LiveReport, SaveError> {
        let dirty = self.take_dirty(kvm)?;
        let refs: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
        self.live.finish(&refs, device_state)
    }

    /// The underlying live save.
    pub fn live(&self) -> &LiveSave<'m> {
        &self.live
    }
}

fn region_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

fn sorted_by_address<'a>(layout: &[(&'a str, GuestAddress)]) -> Vec<(&'a str, GuestAddress)> {
    let mut v = layout.to_vec();
    v.sort_by_key(|(_, a)| a.0);
    v
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
/// snapshot. Blocks the layout does not name are skipped.
pub fn restore_guest_memory<B: NewBitmap>(
    path: &Path,
    layout: &[(&str, GuestAddress)],
    opts: &RestoreOptions,
) -> Result<(GuestMemoryMmap<B>, RestoreReport), RestoreError> {
    let info = inspect(path, opts.offset)?;
    let layout = sorted_by_address(layout);
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
