//! The structure of a new snapshot file, computed before anything is written, and the checks
//! every save shares (region names, page sizes, channel count, chunk size).

use mapped_ram_core::caps::Capabilities;
use mapped_ram_core::layout::{BlockLayout, LayoutError, Planner};
use mapped_ram_core::stream::{self, Config};

use crate::error::{OptionError, RegionError, SaveError};
use crate::file::VecSink;

/// The RAM section's id in files we write. QEMU numbers sections in registration order: with
/// `-machine none` RAM is section 1, with `pc` and `q35` it is 2; its loader accepts any id
/// that is not 0 as long as the file is self-consistent.
pub const RAM_SECTION_ID: u32 = 1;

/// Checks region names, page sizes and lengths, given as (name, length, page size); returns
/// their common page size (4096 when there are none).
pub(crate) fn check_regions<'n>(
    names_lengths: impl Iterator<Item = (&'n str, u64, u64)>,
) -> Result<u64, RegionError> {
    let mut seen = std::collections::HashSet::new();
    let mut common = None;
    for (count, (name, length, page_size)) in names_lengths.enumerate() {
        if count >= crate::MAX_BLOCKS {
            return Err(RegionError::TooMany {
                count: count + 1,
                max: crate::MAX_BLOCKS,
            });
        }
        if name.is_empty() || name.len() > 255 {
            return Err(RegionError::BadName { name: name.into() });
        }
        if !seen.insert(name) {
            return Err(RegionError::Duplicate { name: name.into() });
        }
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(RegionError::BadPageSize {
                name: name.into(),
                page_size,
            });
        }
        if length % page_size != 0 {
            return Err(RegionError::NotPageMultiple {
                name: name.into(),
                length,
                page_size,
            });
        }
        match common {
            None => common = Some(page_size),
            Some(expected) if expected != page_size => {
                return Err(RegionError::MixedPageSizes {
                    name: name.into(),
                    page_size,
                    expected,
                })
            }
            Some(_) => {}
        }
    }
    Ok(common.unwrap_or(4096))
}

/// The one option check of every operation that moves pages: channel count and chunk size
/// against the regions (name, length, page size); returns their common page size.
pub(crate) fn check_options<'n>(
    channels: usize,
    chunk_bytes: u64,
    regions: impl Iterator<Item = (&'n str, u64, u64)>,
) -> Result<u64, SaveError> {
    if channels == 0 || channels > 255 {
        return Err(OptionError::Channels(channels).into());
    }
    let page_size = check_regions(regions)?;
    if chunk_bytes < page_size || chunk_bytes % page_size != 0 {
        return Err(OptionError::ChunkSize {
            chunk_bytes,
            page_size,
        }
        .into());
    }
    Ok(page_size)
}

/// A new file's structure: the stream head at `offset`, a record per block, their layouts.
pub(crate) struct Plan {
    /// File magic, configuration section, RAM section start (written at the stream start).
    pub head: Vec<u8>,
    /// Where each block's record, header, bitmap and pages go.
    pub layouts: Vec<BlockLayout>,
    /// Each block's record and header bytes (written at its `record_offset`).
    pub records: Vec<Vec<u8>>,
    /// Where the stream goes on after the last block's pages.
    pub device_stream_start: u64,
}

fn infallible(r: Result<(), std::convert::Infallible>) {
    match r {
        Ok(()) => (),
        Err(never) => match never {},
    }
}

/// Lays out a new file for `blocks` (name, length) of `page_size` pages, for `machine`, with
/// the stream starting at `offset`.
pub(crate) fn plan(
    blocks: &[(&str, u64)],
    page_size: u64,
    machine: &str,
    offset: u64,
) -> Result<Plan, SaveError> {
    let mut config =
        Config::new(machine, Capabilities::MAPPED_RAM).map_err(|e| OptionError::Machine {
            machine: machine.into(),
            reason: e.to_string(),
        })?;
    // A target page size other than QEMU's default is recorded in the configuration section
    // (its `target_page_bits` subsection), as QEMU does for such targets; readers check the
    // block headers' page size against it.
    if page_size != 4096 {
        config.target_page_bits = Some(page_size.trailing_zeros());
    }
    let mut planner = Planner::new(0, page_size, false)?;
    for (name, length) in blocks {
        planner.push(name.len(), *length)?;
    }
    let total = planner.total_ram();
    let mut head = VecSink::default();
    infallible(stream::encode_preamble(&config, &mut head));
    infallible(stream::encode_ram_start(RAM_SECTION_ID, total, &mut head));
    let first_record = offset
        .checked_add(head.0.len() as u64)
        .ok_or(LayoutError::Overflow {
            what: "first block record",
        })?;
    let mut planner = Planner::new(first_record, page_size, false)?;
    let mut layouts = Vec::with_capacity(blocks.len());
    let mut records = Vec::with_capacity(blocks.len());
    for (name, length) in blocks {
        let layout = planner.push(name.len(), *length)?;
        let mut rec = VecSink::default();
        infallible(stream::encode_block_record(
            name,
            *length,
            None,
            &layout.header(),
            &mut rec,
        ));
        records.push(rec.0);
        layouts.push(layout);
    }
    Ok(Plan {
        head: head.0,
        layouts,
        records,
        device_stream_start: planner.cursor(),
    })
}

/// The stream after the last block's pages: RAM `EOS`, RAM END, then the device state, or a
/// bare `QEMU_VM_EOF` when there is none (an empty device state counts as none: a stream must
/// not end right after RAM END).
pub(crate) fn tail(device_state: Option<&[u8]>) -> Vec<u8> {
    let mut tail = VecSink::default();
    infallible(stream::encode_eos_footer(RAM_SECTION_ID, &mut tail));
    infallible(stream::encode_ram_end(RAM_SECTION_ID, &mut tail));
    match device_state {
        Some(bytes) if !bytes.is_empty() => tail.0.extend_from_slice(bytes),
        _ => infallible(stream::encode_eof(&mut tail)),
    }
    tail.0
}
