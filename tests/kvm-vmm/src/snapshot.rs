//! Every call into `mapped_ram_linux` of this VMM, so that an API change touches only this file.

use std::path::Path;

use mapped_ram_linux::{self as mr, GuestMemory, LiveOptions, LiveRegion, LiveSave};

use crate::vm::{Error, GuestRam, PAGE};

/// The RAM block's name in the snapshot (QEMU's name for a PC's RAM without a backend).
pub const BLOCK: &str = "pc.ram";

/// One pass: pages processed, written as data, seconds.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Pages processed (all in the first pass, the dirty ones later).
    pub pages: u64,
    /// Of those, pages with data.
    pub written: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

fn pass_of(p: &mr::PassReport) -> Pass {
    Pass {
        pages: p.pages_dirty,
        written: p.pages_written,
        seconds: p.seconds,
    }
}

/// A live save of a running guest's RAM.
pub struct Live<'m>(LiveSave<'m>);

impl<'m> Live<'m> {
    /// Starts a live save of `ram` (which a vCPU may be writing) to `path`.
    pub fn begin(path: &Path, ram: &'m GuestRam) -> Result<Self, Error> {
        // SAFETY: `ram`'s mapping stays mapped while it is borrowed ('m); it is written only by
        // the vCPU (outside Rust), never by Rust code of this process while inside a `Machine`.
        let memory = unsafe { GuestMemory::from_raw_parts(ram.as_ptr(), ram.len()) };
        let regions = [LiveRegion {
            name: BLOCK,
            memory,
            page_size: PAGE,
        }];
        Ok(Self(LiveSave::begin(
            path,
            &regions,
            &LiveOptions::default(),
        )?))
    }

    /// A pass over the pages of `dirty` (KVM's dirty log; ignored by the first pass).
    pub fn pass(&mut self, dirty: &[u64]) -> Result<Pass, Error> {
        Ok(pass_of(&self.0.pass(&[mr::DirtyLog::new(BLOCK, dirty)])?))
    }

    /// The last pass (guest stopped) with the final dirty log, then the device state and the
    /// bitmaps: the guest may resume when this returns. [`Finished::commit`] makes it durable.
    pub fn finish_pass(self, dirty: &[u64], device_state: &[u8]) -> Result<Finished<'m>, Error> {
        Ok(Finished(self.0.finish_pass(
            &[mr::DirtyLog::new(BLOCK, dirty)],
            Some(device_state),
        )?))
    }
}

/// A live save whose last pass is done, not yet durable.
pub struct Finished<'m>(mr::FinishedSave<'m>);

impl Finished<'_> {
    /// fdatasync, rename over the target, directory fsync: durable when it returns. Returns
    /// the final pass.
    pub fn commit(self) -> Result<Pass, Error> {
        let report = self.0.commit()?;
        Ok(pass_of(
            report.passes.last().ok_or("commit reported no pass")?,
        ))
    }
}

/// A restored guest: RAM, the device state saved with it, seconds the library call took.
pub struct Restored {
    /// Guest RAM, not yet attached to a VM.
    pub ram: GuestRam,
    /// The VMM's device state.
    pub device_state: Vec<u8>,
    /// Seconds in the restore call (not counting reading the device state).
    pub seconds: f64,
}

/// Copying restore into fresh anonymous memory.
pub fn restore_copy(path: &Path) -> Result<Restored, Error> {
    let t = std::time::Instant::now();
    let info = mr::inspect(path, 0)?;
    let block = info.block_for_restore(BLOCK)?;
    let mut ram = GuestRam::anonymous(usize::try_from(block.layout.length)?)?;
    let opts = mr::RestoreOptions {
        memory_is_zeroed: true,
        read_device_state: true,
        ..Default::default()
    };
    let mut regions = [mr::RestoreRegion {
        name: BLOCK,
        memory: ram.bytes_mut(),
        page_size: PAGE,
    }];
    // RAM and device state from the one open file: a snapshot renamed over the path
    // meanwhile cannot pair one guest's RAM with another's registers.
    let report = mr::restore(path, &mut regions, &opts, None)?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(Restored {
        ram,
        device_state: report
            .device_state
            .ok_or("the restore returned no device state")?,
        seconds,
    })
}

/// Lazy restore: the snapshot's pages mapped privately (`MAP_PRIVATE`), read on first touch.
pub fn restore_lazy(path: &Path) -> Result<Restored, Error> {
    let t = std::time::Instant::now();
    let opts = mr::LazyOptions {
        read_device_state: true,
        ..Default::default()
    };
    let mut lazy = mr::restore_lazy(path, &[BLOCK], &opts)?;
    let device_state = lazy
        .device_state
        .take()
        .ok_or("the lazy restore returned no device state")?;
    let mapping = lazy
        .blocks
        .pop()
        .ok_or("lazy restore returned no block")?
        .into_mapping();
    let seconds = t.elapsed().as_secs_f64();
    let (ptr, len) = (mapping.as_ptr(), mapping.len());
    // SAFETY: `ptr .. ptr + len` is the mapping's own readable, writable memory, kept mapped by
    // the `PrivateMapping` moved into the `GuestRam`; nothing else holds the mapping.
    let ram = unsafe { GuestRam::from_owner(Box::new(mapping), ptr, len) };
    Ok(Restored {
        ram,
        device_state,
        seconds,
    })
}
