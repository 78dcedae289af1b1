//! The QEMU migration stream framing around RAM: encoder and decoder.
//!
//! A mapped-ram file is a QEMU migration stream whose RAM pages were moved out of the stream to
//! fixed, 1 MiB-aligned places in the file. What is left of the stream around the RAM is small
//! and rigid, and this module writes and reads exactly that (spec §a.4, §b.1):
//!
//! ```text
//! be32 magic "QEVM", be32 version 3
//! 0x07 CONFIGURATION: be32 len, machine type, configuration/* subsections (no footer)
//! 0x01 SECTION_START "ram" (instance 0, version 4)
//!      be64 total_ram | MEM_SIZE
//!      per block: u8 idlen, id, be64 length, [be64 GPA], 28-byte MappedRamHeader
//!                 (the stream then jumps to pages_offset + length)
//!      be64 EOS, 0x7e footer
//! 0x02 SECTION_PART (EOS + footer) ... 0x08 COMMAND ... 0x03 SECTION_END (EOS + footer)
//! device state (0x04 FULL sections ...), 0x00 EOF, [0x06 vmdesc JSON]
//! ```
//!
//! The encoder functions write one piece each into a [`ByteSink`]; a writer places them at
//! the offsets computed by [`crate::layout::Planner`]. The [`Decoder`] reads them back from a
//! positional [`ByteSource`], checking every field, and tells where device state begins. It
//! reads only the stream's own bytes (headers), never page data or bitmaps.
//!
//! # What the decoder accepts
//!
//! The decoder accepts what QEMU 9.0–11.0 write for a `file:` migration with `mapped-ram`, and
//! nothing looser; where QEMU's loader is more lenient than its writer, the decoder follows the
//! writer, so that everything it accepts re-encodes to the same bytes:
//!
//! * Version 3 only (2 is obsolete, QEMU refuses it too). The configuration section is required
//!   (QEMU's `send-configuration`, on for every machine type since 2.12).
//! * Configuration subsections (spec §b.1 step 3): they are read while the next byte is
//!   `0x05` and the subsection name starts with `configuration` (QEMU's
//!   `vmstate_subsection_load`); a `0x05` whose name does not is left in place, and is then
//!   rejected as the wrong section type, as QEMU does. A `configuration…` name other than
//!   `configuration/target-page-bits`, `configuration/capabilities` and `configuration/uuid`
//!   is an error (QEMU: "VM subsection … does not exist"). Each may occur at most once, in
//!   that order, with version 1 (QEMU's writer order; QEMU's loader would accept repeats).
//! * The capability list holds 1 or 2 names out of `x-ignore-shared` and `mapped-ram`, in QAPI
//!   order, without repeats: exactly what QEMU writes (its writer omits the subsection when
//!   neither capability is on). A name QEMU knows but never stores there (e.g. `multifd`) is
//!   [`DecodeErrorKind::CapabilityNotStored`]; a name QEMU does not know is
//!   [`DecodeErrorKind::UnknownCapability`] (QEMU: "Received unknown capability").
//! * `target_page_bits` must lie in [`MIN_TARGET_PAGE_BITS`]`..=`[`MAX_TARGET_PAGE_BITS`]; the
//!   target page size (TPS) is `1 << target_page_bits`, or 4096 when the subsection is absent
//!   (x86-64; aarch64 files carry the subsection).
//! * The first section after the configuration must be the `"ram"` SECTION_START with
//!   instance 0 and version 4, and the file must list `mapped-ram`. Its first word must carry
//!   exactly the `MEM_SIZE` flag in its low `TPS - 1` bits ("Unexpected RAM flags" otherwise).
//! * Block records: id of 1..=255 bytes of UTF-8, length > 0 and not more than what is left of
//!   the `MEM_SIZE` total, a be64 GPA iff `x-ignore-shared` is listed (what every QEMU writer
//!   does; the 9.x/10.x loaders forget to read it, spec §b.5), and a header accepted by
//!   [`BlockLayout::from_header`] (version <= 1, page size = TPS, page-aligned pages, bitmap
//!   between the header and the pages). A 0/0 header (no data in the file, QEMU 11.0's layout
//!   for blocks skipped by `x-ignore-shared`) is accepted only with `x-ignore-shared`; the next
//!   record then follows the header directly, otherwise it starts at `pages_offset + length`.
//!   Because the header must place bitmap and pages after itself, every block's region lies
//!   after the previous one: regions cannot overlap or run backwards.
//! * Section footers are required (QEMU's `send-section-footer`, on since 2.5), and RAM `EOS`
//!   words must be exactly `0x10`.
//! * After the RAM setup section only RAM PART sections, COMMAND records and finally the RAM
//!   END section may occur (what QEMU writes with RAM as the only iterative section). At most
//!   [`MAX_TAIL_RECORDS`] of them are walked, so a hostile file cannot make the decoder loop for
//!   long. Command payloads are skipped by their be16 length, not read; `SWITCHOVER_START` must
//!   have an empty payload, and commands 0 (invalid) and 8 (`PACKAGED`, postcopy only) are
//!   refused.
//!
//! No input makes the decoder panic, overflow or index out of bounds; every loop is bounded by a
//! constant or by the bytes it actually reads, and nothing is allocated.

use core::fmt;

use crate::caps::Capabilities;
use crate::layout::{BlockError, BlockLayout, MappedRamHeader, DEFAULT_PAGE_SIZE, HEADER_SIZE};

/// `"QEVM"`: the be32 at the start of every migration stream.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The stream version written and accepted (2 is the obsolete format QEMU refuses).
pub const QEMU_VM_FILE_VERSION: u32 = 3;

/// End of device state.
pub const QEMU_VM_EOF: u8 = 0x00;
/// First chunk of an iterative section (RAM setup).
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// Middle chunk of an iterative section.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// Last chunk of an iterative section.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// A complete (non-iterative) device section.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// A vmstate subsection marker.
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// The vmdesc JSON after [`QEMU_VM_EOF`].
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// The configuration section right after the file header.
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// A command record.
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// A section footer (followed by the be32 section id).
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// Obsolete RAM flag (since 2009).
pub const RAM_SAVE_FLAG_FULL: u64 = 0x001;
/// A zero page (never in a mapped-ram stream).
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x002;
/// Marks the RAM block list record (its value is the total RAM size).
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x004;
/// A page in the stream (never in a mapped-ram stream).
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x008;
/// End of a RAM section chunk.
pub const RAM_SAVE_FLAG_EOS: u64 = 0x010;
/// Same block as the previous page (not used by mapped-ram).
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x020;
/// XBZRLE-encoded page (never in a mapped-ram stream).
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x040;
/// RDMA hook (never in a mapped-ram stream).
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x080;
/// Legacy compressed page (removed in QEMU 9.1).
pub const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
/// Socket multifd sync (never written for mapped-ram).
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// Command `PACKAGED` (postcopy only; refused by the decoder).
pub const MIG_CMD_PACKAGED: u16 = 8;
/// Command `SWITCHOVER_START` (QEMU >= 10.0 with machine types >= 10.0), payload length 0.
pub const MIG_CMD_SWITCHOVER_START: u16 = 11;

/// Bytes of the RAM SECTION_START header: u8 type, be32 id, u8 3, `"ram"`, be32 instance,
/// be32 version.
pub const RAM_SECTION_START_LEN: u64 = 17;
/// Bytes [`encode_ram_start`] writes: the section header plus the be64 `MEM_SIZE` word.
pub const RAM_START_LEN: u64 = 25;
/// Version of the `"ram"` section.
pub const RAM_SECTION_VERSION: u32 = 4;
/// Instance id of the `"ram"` section.
pub const RAM_SECTION_INSTANCE: u32 = 0;
/// Id string of the RAM section.
pub const RAM_SECTION_IDSTR: &str = "ram";
/// Bytes of a section footer (0x7e + be32 section id).
pub const FOOTER_LEN: u64 = 5;
/// Bytes [`encode_eos_footer`] writes (be64 EOS + footer).
pub const EOS_FOOTER_LEN: u64 = 13;
/// Bytes [`encode_ram_part`] and [`encode_ram_end`] write.
pub const RAM_PART_LEN: u64 = 18;
/// Bytes of a command record header (u8 0x08, be16 cmd, be16 len).
pub const COMMAND_HEADER_LEN: u64 = 5;
/// Longest machine type name accepted or stored.
pub const MAX_MACHINE_NAME_LEN: usize = 256;
/// Smallest accepted `target_page_bits` (ARM's variable-page-size minimum, 1 KiB).
pub const MIN_TARGET_PAGE_BITS: u32 = 10;
/// Largest accepted `target_page_bits` (a sanity bound; QEMU targets use at most 16).
pub const MAX_TARGET_PAGE_BITS: u32 = 30;
/// Most PART sections plus COMMAND records the decoder walks between the RAM setup section
/// and the RAM END section (QEMU writes one PART per migration iteration).
pub const MAX_TAIL_RECORDS: u32 = 1 << 20;
/// Commands whose position [`Tail::commands`] keeps (all are counted).
pub const TAIL_COMMANDS_KEPT: usize = 8;

/// Name of the target page bits configuration subsection.
pub const SUBSECTION_TARGET_PAGE_BITS: &str = "configuration/target-page-bits";
/// Name of the capabilities configuration subsection.
pub const SUBSECTION_CAPABILITIES: &str = "configuration/capabilities";
/// Name of the UUID configuration subsection.
pub const SUBSECTION_UUID: &str = "configuration/uuid";
/// Version of every configuration subsection.
pub const SUBSECTION_VERSION: u32 = 1;

/// QEMU's name of the `x-ignore-shared` capability.
const NAME_X_IGNORE_SHARED: &str = "x-ignore-shared";
/// QEMU's name of the `mapped-ram` capability.
const NAME_MAPPED_RAM: &str = "mapped-ram";
/// Prefix every configuration subsection name must have (QEMU compares the section name).
const CONFIGURATION_PREFIX: &[u8] = b"configuration";

/// Bytes of a rejected name kept in a [`RawName`].
pub const RAW_NAME_KEPT: usize = 48;

/// The start of a name taken from a file (machine type, section id, capability, subsection),
/// kept for error reports: at most [`RAW_NAME_KEPT`] bytes plus the full length, shown with
/// non-printable bytes escaped and `...` when cut.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RawName {
    bytes: [u8; RAW_NAME_KEPT],
    kept: u8,
    len: u16,
}

impl RawName {
    /// Keeps the first [`RAW_NAME_KEPT`] bytes of `name`.
    pub fn new(name: &[u8]) -> Self {
        let mut bytes = [0u8; RAW_NAME_KEPT];
        let kept = name.len().min(RAW_NAME_KEPT);
        for (dst, src) in bytes.iter_mut().zip(name) {
            *dst = *src;
        }
        Self {
            bytes,
            kept: u8::try_from(kept).unwrap_or(0),
            len: u16::try_from(name.len()).unwrap_or(u16::MAX),
        }
    }

    /// The kept bytes.
    pub fn kept(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.kept)).unwrap_or(&[])
    }

    /// Length of the whole name in the file.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// `true` for an empty name.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `true` when the name was longer than what is kept.
    pub fn is_cut(&self) -> bool {
        usize::from(self.kept) < usize::from(self.len)
    }
}

impl fmt::Display for RawName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kept().escape_ascii())?;
        if self.is_cut() {
            write!(f, "... ({} bytes)", self.len)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RawName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawName(\"{self}\")")
    }
}

// ------------------------------------------------------------------------------------------
// Byte sources and sinks
// ------------------------------------------------------------------------------------------

/// A positional byte source (no `std::io`): a file, a memory image, a device.
pub trait ByteSource {
    /// What a failed read reports.
    type Error: fmt::Debug + fmt::Display;

    /// Reads up to `buf.len()` bytes at absolute `offset`, returning how many were read;
    /// 0 means end of file. Short reads are fine: the decoder asks again for the rest.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, Self::Error>;
}

/// A byte slice is a file whose offset 0 is `slice[0]`; reads past its end return 0.
impl ByteSource for &[u8] {
    type Error = core::convert::Infallible;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(avail) = self.get(start..) else {
            return Ok(0);
        };
        let n = avail.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
            Ok(n)
        } else {
            Ok(0)
        }
    }
}

impl<S: ByteSource + ?Sized> ByteSource for &mut S {
    type Error = S::Error;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, Self::Error> {
        (**self).read_at(offset, buf)
    }
}

/// A sequential byte sink.
pub trait ByteSink {
    /// What a failed write reports.
    type Error: fmt::Debug + fmt::Display;

    /// Writes all of `bytes` (or fails).
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
}

impl<K: ByteSink + ?Sized> ByteSink for &mut K {
    type Error = K::Error;

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
        (**self).write_all(bytes)
    }
}

/// A [`ByteSink`] over a `&mut [u8]` that tracks its position and fails when full.
///
/// A refused write stores nothing, but the encoder functions write a record in several
/// pieces, so a record that did not fit may be partly written.
#[derive(Debug)]
pub struct SliceSink<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

/// A [`SliceSink`] had no room for a write (nothing of that write was stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SinkFull {
    /// Bytes already written when the write was refused.
    pub written: usize,
    /// Size of the refused write.
    pub needed: usize,
    /// Capacity of the buffer.
    pub capacity: usize,
}

impl fmt::Display for SinkFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "buffer full: {} more bytes after {} of {}",
            self.needed, self.written, self.capacity
        )
    }
}

impl core::error::Error for SinkFull {}

impl<'a> SliceSink<'a> {
    /// A sink writing from the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.pos
    }

    /// The bytes written so far.
    pub fn as_written(&self) -> &[u8] {
        self.buf.get(..self.pos).unwrap_or(&[])
    }
}

impl ByteSink for SliceSink<'_> {
    type Error = SinkFull;

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), SinkFull> {
        let full = SinkFull {
            written: self.pos,
            needed: bytes.len(),
            capacity: self.buf.len(),
        };
        let end = self.pos.checked_add(bytes.len()).ok_or(full)?;
        let dst = self.buf.get_mut(self.pos..end).ok_or(full)?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
}

/// A [`ByteSink`] that only counts bytes (for computing lengths).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CountingSink {
    /// Bytes written so far (saturating).
    pub count: u64,
}

impl CountingSink {
    /// A sink that has counted nothing yet.
    pub fn new() -> Self {
        Self { count: 0 }
    }
}

impl ByteSink for CountingSink {
    type Error = core::convert::Infallible;

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
        self.count = self.count.saturating_add(len64(bytes.len()));
        Ok(())
    }
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

// ------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------

/// The configuration section: machine type, stored capabilities, optional target page bits
/// and UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// Machine type name (`"pc-q35-10.0"`, `"microvm"`, ...); QEMU's loader requires it to
    /// equal the destination's.
    pub machine: heapless::String<MAX_MACHINE_NAME_LEN>,
    /// Capabilities. Only `x-ignore-shared` and `mapped-ram` are stored in the file; the
    /// encoder ignores any other flag, the decoder never sets one.
    pub capabilities: Capabilities,
    /// `configuration/target-page-bits` (present on targets with a variable page size, e.g.
    /// aarch64; absent on x86-64, meaning 4 KiB pages).
    pub target_page_bits: Option<u32>,
    /// `configuration/uuid` (present with `validate-uuid` and `-uuid`).
    pub uuid: Option<[u8; 16]>,
}

/// A [`Config`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConfigError {
    /// The machine type name is longer than [`MAX_MACHINE_NAME_LEN`] bytes.
    MachineNameTooLong {
        /// Its length in bytes.
        len: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::MachineNameTooLong { len } => write!(
                f,
                "machine type name of {len} bytes (at most {MAX_MACHINE_NAME_LEN})"
            ),
        }
    }
}

impl core::error::Error for ConfigError {}

impl Config {
    /// A configuration without target page bits and UUID.
    pub fn new(machine: &str, capabilities: Capabilities) -> Result<Self, ConfigError> {
        let machine = heapless::String::try_from(machine)
            .map_err(|()| ConfigError::MachineNameTooLong { len: machine.len() })?;
        Ok(Self {
            machine,
            capabilities,
            target_page_bits: None,
            uuid: None,
        })
    }

    /// The target page size: `1 << target_page_bits`, or 4096 without the subsection; `None`
    /// when `target_page_bits` is outside
    /// [`MIN_TARGET_PAGE_BITS`]`..=`[`MAX_TARGET_PAGE_BITS`].
    pub fn target_page_size(&self) -> Option<u64> {
        match self.target_page_bits {
            None => Some(DEFAULT_PAGE_SIZE),
            Some(bits) if (MIN_TARGET_PAGE_BITS..=MAX_TARGET_PAGE_BITS).contains(&bits) => {
                1u64.checked_shl(bits)
            }
            Some(_) => None,
        }
    }

    /// `true` when the file lists `x-ignore-shared`: every block record carries a GPA.
    pub fn with_gpa(&self) -> bool {
        self.capabilities.contains(Capabilities::X_IGNORE_SHARED)
    }

    /// `true` when the file lists `mapped-ram`.
    pub fn mapped_ram(&self) -> bool {
        self.capabilities.contains(Capabilities::MAPPED_RAM)
    }

    /// The stored capabilities, as names in file order (x-ignore-shared first).
    fn stored_capability_names(&self) -> ([&'static str; 2], usize) {
        let mut names = [""; 2];
        let mut n = 0usize;
        for (flag, name) in [
            (Capabilities::X_IGNORE_SHARED, NAME_X_IGNORE_SHARED),
            (Capabilities::MAPPED_RAM, NAME_MAPPED_RAM),
        ] {
            if self.capabilities.contains(flag) {
                if let Some(slot) = names.get_mut(n) {
                    *slot = name;
                    n = n.saturating_add(1);
                }
            }
        }
        (names, n)
    }
}

// ------------------------------------------------------------------------------------------
// Encoder
// ------------------------------------------------------------------------------------------

fn put_u8<K: ByteSink>(sink: &mut K, v: u8) -> Result<(), K::Error> {
    sink.write_all(&[v])
}

fn put_be16<K: ByteSink>(sink: &mut K, v: u16) -> Result<(), K::Error> {
    sink.write_all(&v.to_be_bytes())
}

fn put_be32<K: ByteSink>(sink: &mut K, v: u32) -> Result<(), K::Error> {
    sink.write_all(&v.to_be_bytes())
}

fn put_be64<K: ByteSink>(sink: &mut K, v: u64) -> Result<(), K::Error> {
    sink.write_all(&v.to_be_bytes())
}

/// Writes a u8 length and the bytes, cut at 255 bytes.
fn put_short_str<K: ByteSink>(sink: &mut K, s: &[u8]) -> Result<(), K::Error> {
    let len = u8::try_from(s.len()).unwrap_or(u8::MAX);
    put_u8(sink, len)?;
    sink.write_all(s.get(..usize::from(len)).unwrap_or(&[]))
}

fn put_subsection_header<K: ByteSink>(sink: &mut K, name: &str) -> Result<(), K::Error> {
    put_u8(sink, QEMU_VM_SUBSECTION)?;
    put_short_str(sink, name.as_bytes())?;
    put_be32(sink, SUBSECTION_VERSION)
}

/// Writes the file header and the configuration section, as QEMU does: magic, version,
/// `0x07`, be32 name length, machine type, then the subsections
/// `configuration/target-page-bits` (if `Some`), `configuration/capabilities` (only when
/// `x-ignore-shared` or `mapped-ram` is set: QEMU omits the subsection with an empty list;
/// the names in QAPI order, x-ignore-shared first) and `configuration/uuid` (if `Some`).
/// There is no footer after the configuration section.
pub fn encode_preamble<K: ByteSink>(cfg: &Config, sink: &mut K) -> Result<(), K::Error> {
    put_be32(sink, QEMU_VM_FILE_MAGIC)?;
    put_be32(sink, QEMU_VM_FILE_VERSION)?;
    put_u8(sink, QEMU_VM_CONFIGURATION)?;
    let name = cfg.machine.as_bytes();
    put_be32(sink, u32::try_from(name.len()).unwrap_or(u32::MAX))?;
    sink.write_all(name)?;
    if let Some(bits) = cfg.target_page_bits {
        put_subsection_header(sink, SUBSECTION_TARGET_PAGE_BITS)?;
        put_be32(sink, bits)?;
    }
    let (names, count) = cfg.stored_capability_names();
    if count > 0 {
        put_subsection_header(sink, SUBSECTION_CAPABILITIES)?;
        put_be32(sink, u32::try_from(count).unwrap_or(0))?;
        for name in names.iter().take(count) {
            put_short_str(sink, name.as_bytes())?;
        }
    }
    if let Some(uuid) = &cfg.uuid {
        put_subsection_header(sink, SUBSECTION_UUID)?;
        sink.write_all(uuid)?;
    }
    Ok(())
}

/// Bytes [`encode_preamble`] writes for `cfg` (the offset of the first section after a
/// zero `offset=` prefix).
pub fn preamble_len(cfg: &Config) -> u64 {
    let mut counter = CountingSink::new();
    match encode_preamble(cfg, &mut counter) {
        Ok(()) => counter.count,
        Err(never) => match never {},
    }
}

/// Writes the RAM SECTION_START header (`0x01`, be32 `section_id`, `"ram"`, instance 0,
/// version 4) and the be64 `total_ram | MEM_SIZE` word: [`RAM_START_LEN`] bytes. `total_ram`
/// is the sum of all block lengths (a multiple of the target page size).
pub fn encode_ram_start<K: ByteSink>(
    section_id: u32,
    total_ram: u64,
    sink: &mut K,
) -> Result<(), K::Error> {
    put_u8(sink, QEMU_VM_SECTION_START)?;
    put_be32(sink, section_id)?;
    put_short_str(sink, RAM_SECTION_IDSTR.as_bytes())?;
    put_be32(sink, RAM_SECTION_INSTANCE)?;
    put_be32(sink, RAM_SECTION_VERSION)?;
    put_be64(sink, total_ram | RAM_SAVE_FLAG_MEM_SIZE)
}

/// Writes one block record: u8 id length, id, be64 `length`, be64 `gpa` if `Some` (files
/// listing `x-ignore-shared`), and the 28-byte header.
///
/// `name` must be 1..=255 bytes, as [`crate::layout::Planner::push`] (which a writer calls
/// first to place the block) already enforces; this function has no error of its own, so a
/// longer name is cut at 255 bytes, and an empty one gives a record the decoder rejects. Use
/// [`encode_block_record_checked`] to have them refused.
pub fn encode_block_record<K: ByteSink>(
    name: &str,
    length: u64,
    gpa: Option<u64>,
    header: &MappedRamHeader,
    sink: &mut K,
) -> Result<(), K::Error> {
    put_short_str(sink, name.as_bytes())?;
    put_be64(sink, length)?;
    if let Some(gpa) = gpa {
        put_be64(sink, gpa)?;
    }
    sink.write_all(&header.encode())
}

/// A checked encoder call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError<E> {
    /// The sink failed.
    Sink(E),
    /// A block id must be 1..=255 bytes.
    BadIdLength(usize),
}

impl<E: fmt::Display> fmt::Display for EncodeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::Sink(e) => write!(f, "write failed: {e}"),
            EncodeError::BadIdLength(len) => {
                write!(f, "block id string of {len} bytes (must be 1..=255)")
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for EncodeError<E> {}

/// [`encode_block_record`], refusing an id that is empty or longer than 255 bytes (nothing is
/// written then).
pub fn encode_block_record_checked<K: ByteSink>(
    name: &str,
    length: u64,
    gpa: Option<u64>,
    header: &MappedRamHeader,
    sink: &mut K,
) -> Result<(), EncodeError<K::Error>> {
    if name.is_empty() || name.len() > 255 {
        return Err(EncodeError::BadIdLength(name.len()));
    }
    encode_block_record(name, length, gpa, header, sink).map_err(EncodeError::Sink)
}

/// Bytes [`encode_block_record`] writes for an id of `name_len` bytes (1..=255).
pub fn block_record_len(name_len: usize, with_gpa: bool) -> u64 {
    let gpa = if with_gpa { 8 } else { 0 };
    len64(name_len.min(255))
        .saturating_add(1 + 8 + 28)
        .saturating_add(gpa)
}

/// Writes a section footer: `0x7e`, be32 `section_id`.
pub fn encode_section_footer<K: ByteSink>(section_id: u32, sink: &mut K) -> Result<(), K::Error> {
    put_u8(sink, QEMU_VM_SECTION_FOOTER)?;
    put_be32(sink, section_id)
}

/// Writes the end of a RAM section chunk: be64 `EOS` (0x10) and the footer (13 bytes). After
/// the last block this closes the RAM setup section.
pub fn encode_eos_footer<K: ByteSink>(section_id: u32, sink: &mut K) -> Result<(), K::Error> {
    put_be64(sink, RAM_SAVE_FLAG_EOS)?;
    encode_section_footer(section_id, sink)
}

/// Writes a RAM PART section of a mapped-ram stream: `0x02`, be32 id, `EOS`, footer (18 bytes).
pub fn encode_ram_part<K: ByteSink>(section_id: u32, sink: &mut K) -> Result<(), K::Error> {
    put_u8(sink, QEMU_VM_SECTION_PART)?;
    put_be32(sink, section_id)?;
    encode_eos_footer(section_id, sink)
}

/// Writes the RAM END section of a mapped-ram stream: `0x03`, be32 id, `EOS`, footer (18 bytes).
pub fn encode_ram_end<K: ByteSink>(section_id: u32, sink: &mut K) -> Result<(), K::Error> {
    put_u8(sink, QEMU_VM_SECTION_END)?;
    put_be32(sink, section_id)?;
    encode_eos_footer(section_id, sink)
}

/// Writes a command record: `0x08`, be16 `cmd`, be16 payload length, payload. A payload longer
/// than 65535 bytes is cut there (no QEMU command has one that long).
pub fn encode_command<K: ByteSink>(cmd: u16, payload: &[u8], sink: &mut K) -> Result<(), K::Error> {
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    put_u8(sink, QEMU_VM_COMMAND)?;
    put_be16(sink, cmd)?;
    put_be16(sink, len)?;
    sink.write_all(payload.get(..usize::from(len)).unwrap_or(&[]))
}

/// Writes the end of device state (`0x00`).
pub fn encode_eof<K: ByteSink>(sink: &mut K) -> Result<(), K::Error> {
    put_u8(sink, QEMU_VM_EOF)
}

/// Writes the vmdesc record: `0x06`, be32 length, JSON (cut at `u32::MAX` bytes).
pub fn encode_vmdesc<K: ByteSink>(json: &[u8], sink: &mut K) -> Result<(), K::Error> {
    let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
    put_u8(sink, QEMU_VM_VMDESCRIPTION)?;
    put_be32(sink, len)?;
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    sink.write_all(json.get(..n).unwrap_or(json))
}

// ------------------------------------------------------------------------------------------
// Decoder
// ------------------------------------------------------------------------------------------

/// The RAM SECTION_START record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RamStart {
    /// Section id of the RAM section (1 in every file seen); PART/END/footers repeat it.
    pub section_id: u32,
    /// Instance id (always 0).
    pub instance_id: u32,
    /// Section version (always 4).
    pub version_id: u32,
    /// Sum of the lengths of all blocks (the `MEM_SIZE` value).
    pub total_ram: u64,
    /// Absolute offset of the SECTION_START byte.
    pub section_offset: u64,
    /// Absolute offset of the first block record (after the `MEM_SIZE` word).
    pub first_record_offset: u64,
}

/// One RAM block record and its validated layout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockRecord {
    /// Block id (`"pc.ram"`, `"microvm.ram"`, `"pc.bios"`, ...).
    pub name: heapless::String<255>,
    /// Block length (`used_length`) in bytes.
    pub length: u64,
    /// Guest physical address; present iff the configuration lists `x-ignore-shared`.
    pub gpa: Option<u64>,
    /// The 28-byte header as read.
    pub header: MappedRamHeader,
    /// Where the block lives, checked by [`BlockLayout::from_header`].
    pub layout: BlockLayout,
    /// Absolute offset of the record (its id length byte).
    pub record_offset: u64,
}

impl BlockRecord {
    /// `true` for a block without data in the file (0/0 header).
    pub fn is_empty(&self) -> bool {
        self.header.is_empty()
    }

    /// Absolute offset just past the 28-byte header.
    pub fn header_end(&self) -> u64 {
        self.layout.header_offset.saturating_add(len64(HEADER_SIZE))
    }

    /// Absolute offset where the next record (or the RAM setup `EOS`) starts.
    pub fn next_offset(&self) -> u64 {
        if self.is_empty() {
            self.header_end()
        } else {
            self.layout.pages_end()
        }
    }
}

/// A command record between the RAM setup section and the RAM END section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Command {
    /// Command id ([`MIG_CMD_SWITCHOVER_START`], ...).
    pub cmd: u16,
    /// Payload length in bytes (the payload follows the 5-byte record header).
    pub len: u16,
    /// Absolute offset of the `0x08` byte.
    pub offset: u64,
}

/// What follows the RAM blocks, up to the first device record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Tail {
    /// Offset of the RAM setup `EOS` word (`pages_end` of the last block): where the stream
    /// continues after the RAM regions.
    pub device_stream_start: u64,
    /// Offset just after the RAM END section's footer: the first device record.
    pub device_state_offset: u64,
    /// The byte at `device_state_offset` (`0x04` FULL, `0x00` EOF, ...), `None` at end of file.
    pub first_device_record: Option<u8>,
    /// RAM PART sections seen.
    pub parts: u32,
    /// The first [`TAIL_COMMANDS_KEPT`] command records.
    pub commands: heapless::Vec<Command, TAIL_COMMANDS_KEPT>,
    /// Command records seen (all of them).
    pub commands_total: u32,
}

/// Why a file was rejected, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DecodeError<E> {
    /// Absolute file offset of the rejected field (or of the read that failed).
    pub offset: u64,
    /// What was wrong.
    pub kind: DecodeErrorKind<E>,
}

/// What was wrong with a file. Every variant carries the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeErrorKind<E> {
    /// The byte source failed.
    Source(E),
    /// The file ends inside a field.
    Truncated {
        /// The field.
        what: &'static str,
        /// Its size in bytes.
        needed: u64,
    },
    /// A field would extend past offset `u64::MAX`.
    OffsetOverflow {
        /// The field.
        what: &'static str,
    },
    /// The file does not start with `QEVM`.
    BadMagic(u32),
    /// A stream version other than 3.
    BadVersion(u32),
    /// A record of another type than the one required here.
    UnexpectedRecord {
        /// What was required.
        expected: &'static str,
        /// The type byte found.
        found: u8,
    },
    /// A machine type name longer than [`MAX_MACHINE_NAME_LEN`].
    MachineNameTooLong(u32),
    /// A name that is not UTF-8.
    NotUtf8 {
        /// Which name.
        what: &'static str,
        /// Its bytes.
        bytes: RawName,
    },
    /// A `configuration…` subsection QEMU does not have.
    UnknownSubsection(RawName),
    /// A configuration subsection repeated or out of QEMU's order.
    SubsectionOutOfOrder(&'static str),
    /// A configuration subsection with a version other than 1.
    BadSubsectionVersion {
        /// The subsection.
        name: &'static str,
        /// Its version.
        version: u32,
    },
    /// `target_page_bits` outside [`MIN_TARGET_PAGE_BITS`]`..=`[`MAX_TARGET_PAGE_BITS`].
    BadTargetPageBits(u32),
    /// A capability count other than 1 or 2.
    BadCapabilityCount(u32),
    /// A capability name QEMU does not know.
    UnknownCapability(RawName),
    /// A capability QEMU knows but never stores in the configuration.
    CapabilityNotStored(RawName),
    /// A capability listed twice or after `mapped-ram`.
    CapabilityOutOfOrder(RawName),
    /// The configuration does not list `mapped-ram`: the RAM section is not in this format.
    NotMappedRam,
    /// The first section is not `"ram"`.
    NotRam(RawName),
    /// The RAM section's instance id is not 0.
    BadRamInstance(u32),
    /// The RAM section's version is not 4.
    BadRamVersion(u32),
    /// The RAM section's first word lacks the `MEM_SIZE` flag.
    MissingMemSize(u64),
    /// The `MEM_SIZE` word carries other flags too.
    StrayRamFlags(u64),
    /// A block id of length 0.
    ZeroLengthId,
    /// A block of length 0.
    ZeroLengthBlock,
    /// A block longer than what is left of the `MEM_SIZE` total.
    BlocksExceedTotal {
        /// The block's length.
        length: u64,
        /// What was left of the total.
        remaining: u64,
    },
    /// The block's header is not usable (version, page size, alignment, bitmap place,
    /// overflow).
    Block(BlockError),
    /// A 0/0 header in a file that does not list `x-ignore-shared`.
    UnexpectedEmptyHeader(MappedRamHeader),
    /// A RAM word that should be a plain `EOS` (0x10).
    ExpectedEos(u64),
    /// A byte where a section footer (0x7e) should be.
    BadFooter(u8),
    /// A footer naming another section.
    FooterSectionId {
        /// The section being closed.
        expected: u32,
        /// The id in the footer.
        found: u32,
    },
    /// A PART/END section of another section than RAM.
    ForeignSection {
        /// Section type (PART or END).
        section_type: u8,
        /// Its section id.
        section_id: u32,
    },
    /// A command the decoder refuses (invalid, `PACKAGED`, or `SWITCHOVER_START` with a payload).
    BadCommand {
        /// Command id.
        cmd: u16,
        /// Payload length.
        len: u16,
    },
    /// More than [`MAX_TAIL_RECORDS`] PART/COMMAND records before the RAM END section.
    TooManyRecords(u32),
    /// A decoder method called out of order (or after an error).
    WrongState {
        /// The method.
        call: &'static str,
        /// The state the decoder was in.
        state: &'static str,
    },
}

impl<E: fmt::Display> fmt::Display for DecodeErrorKind<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DecodeErrorKind as K;
        match self {
            K::Source(e) => write!(f, "read failed: {e}"),
            K::Truncated { what, needed } => {
                write!(f, "file ends inside the {what} ({needed} bytes)")
            }
            K::OffsetOverflow { what } => write!(f, "{what} lies past the largest file offset"),
            K::BadMagic(m) => write!(
                f,
                "bad magic {m:#010x} (expected {QEMU_VM_FILE_MAGIC:#010x} \"QEVM\")"
            ),
            K::BadVersion(v) => write!(f, "stream version {v} (expected {QEMU_VM_FILE_VERSION})"),
            K::UnexpectedRecord { expected, found } => {
                write!(f, "record type {found:#04x} where {expected} is required")
            }
            K::MachineNameTooLong(len) => write!(
                f,
                "machine type name of {len} bytes (at most {MAX_MACHINE_NAME_LEN})"
            ),
            K::NotUtf8 { what, bytes } => {
                write!(f, "{what} \"{}\" is not UTF-8", bytes)
            }
            K::UnknownSubsection(name) => {
                write!(f, "unknown configuration subsection \"{}\"", name)
            }
            K::SubsectionOutOfOrder(name) => {
                write!(
                    f,
                    "configuration subsection {name} repeated or out of order"
                )
            }
            K::BadSubsectionVersion { name, version } => {
                write!(
                    f,
                    "{name} version {version} (expected {SUBSECTION_VERSION})"
                )
            }
            K::BadTargetPageBits(bits) => write!(
                f,
                "target page bits {bits} (expected {MIN_TARGET_PAGE_BITS}..={MAX_TARGET_PAGE_BITS})"
            ),
            K::BadCapabilityCount(n) => {
                write!(f, "capability count {n} (QEMU stores 1 or 2)")
            }
            K::UnknownCapability(name) => {
                write!(f, "unknown capability \"{}\"", name)
            }
            K::CapabilityNotStored(name) => write!(
                f,
                "capability \"{}\" is never stored in the configuration",
                name
            ),
            K::CapabilityOutOfOrder(name) => {
                write!(f, "capability \"{}\" repeated or out of order", name)
            }
            K::NotMappedRam => write!(f, "the configuration does not list mapped-ram"),
            K::NotRam(name) => write!(f, "first section is \"{}\", not \"ram\"", name),
            K::BadRamInstance(i) => write!(f, "RAM section instance {i} (expected 0)"),
            K::BadRamVersion(v) => {
                write!(
                    f,
                    "RAM section version {v} (expected {RAM_SECTION_VERSION})"
                )
            }
            K::MissingMemSize(w) => write!(f, "RAM word {w:#x} lacks the MEM_SIZE flag"),
            K::StrayRamFlags(w) => write!(f, "unexpected RAM flags in {w:#x}"),
            K::ZeroLengthId => write!(f, "block id length 0"),
            K::ZeroLengthBlock => write!(f, "block length 0"),
            K::BlocksExceedTotal { length, remaining } => write!(
                f,
                "block length {length:#x} exceeds the {remaining:#x} bytes left of the RAM total"
            ),
            K::Block(e) => write!(f, "block header: {e}"),
            K::UnexpectedEmptyHeader(_) => write!(
                f,
                "block header without bitmap and pages in a file without x-ignore-shared"
            ),
            K::ExpectedEos(w) => write!(f, "RAM word {w:#x} where EOS (0x10) is required"),
            K::BadFooter(b) => write!(f, "byte {b:#04x} where a section footer (0x7e) is required"),
            K::FooterSectionId { expected, found } => {
                write!(f, "footer of section {found} closes section {expected}")
            }
            K::ForeignSection {
                section_type,
                section_id,
            } => write!(
                f,
                "section type {section_type:#04x} of section {section_id}, not of RAM"
            ),
            K::BadCommand { cmd, len } => write!(f, "command {cmd} with {len} payload bytes"),
            K::TooManyRecords(n) => write!(f, "more than {n} records before the RAM END section"),
            K::WrongState { call, state } => write!(f, "{call} called {state}"),
        }
    }
}

impl<E: fmt::Display> fmt::Display for DecodeError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at file offset {:#x}: {}", self.offset, self.kind)
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for DecodeError<E> {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Configured,
    InRam,
    Done,
    Failed,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::Start => "before read_config",
            State::Configured => "after read_config",
            State::InRam => "while reading blocks",
            State::Done => "after finish",
            State::Failed => "after an error",
        }
    }
}

type DResult<T, E> = Result<T, DecodeError<E>>;

fn raw_name(bytes: &[u8]) -> RawName {
    RawName::new(bytes)
}

/// Reads a mapped-ram file's stream framing: configuration, RAM block records, and the RAM
/// sections up to the first device record.
///
/// Call [`read_config`](Self::read_config), [`read_ram_start`](Self::read_ram_start),
/// [`next_block`](Self::next_block) until it returns `None`, then [`finish`](Self::finish)
/// (or use [`decode_file`]). After an error the decoder refuses further calls.
#[derive(Debug)]
pub struct Decoder<S: ByteSource> {
    src: S,
    base: u64,
    pos: u64,
    state: State,
    page_size: u64,
    with_gpa: bool,
    mapped_ram: bool,
    ram_section_id: u32,
    remaining: u64,
    blocks: u32,
}

impl<S: ByteSource> Decoder<S> {
    /// A decoder for the stream starting at absolute offset `base_offset` of `src` (the
    /// `offset=` of a `file:` URI; 0 normally).
    pub fn new(src: S, base_offset: u64) -> Self {
        Self {
            src,
            base: base_offset,
            pos: base_offset,
            state: State::Start,
            page_size: DEFAULT_PAGE_SIZE,
            with_gpa: false,
            mapped_ram: false,
            ram_section_id: 0,
            remaining: 0,
            blocks: 0,
        }
    }

    /// Absolute offset of the next byte the decoder will read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The `offset=` prefix given to [`new`](Self::new).
    pub fn base_offset(&self) -> u64 {
        self.base
    }

    /// Target page size of the stream (4096 until the configuration says otherwise).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Block records returned so far.
    pub fn blocks_read(&self) -> u32 {
        self.blocks
    }

    /// Bytes of the `MEM_SIZE` total not yet covered by block records.
    pub fn remaining_ram(&self) -> u64 {
        self.remaining
    }

    /// The byte source.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.src
    }

    /// Gives the byte source back.
    pub fn into_inner(self) -> S {
        self.src
    }

    /// Reads the file header and the configuration section (with its `configuration/*`
    /// subsections).
    pub fn read_config(&mut self) -> Result<Config, DecodeError<S::Error>> {
        self.expect_state(State::Start, "read_config")?;
        let r = self.read_config_inner();
        self.settle(r, State::Configured)
    }

    /// Reads the RAM SECTION_START record and its `MEM_SIZE` word.
    pub fn read_ram_start(&mut self) -> Result<RamStart, DecodeError<S::Error>> {
        self.expect_state(State::Configured, "read_ram_start")?;
        let r = self.read_ram_start_inner();
        self.settle(r, State::InRam)
    }

    /// Reads the next block record and moves past its region; `None` once the blocks cover
    /// the `MEM_SIZE` total.
    pub fn next_block(&mut self) -> Result<Option<BlockRecord>, DecodeError<S::Error>> {
        self.expect_state(State::InRam, "next_block")?;
        let r = self.next_block_inner();
        self.settle(r, State::InRam)
    }

    /// Reads what follows the blocks (skipping any block not yet read): the RAM setup `EOS`
    /// and footer, RAM PART sections and commands, and the RAM END section.
    pub fn finish(&mut self) -> Result<Tail, DecodeError<S::Error>> {
        self.expect_state(State::InRam, "finish")?;
        let r = self.finish_inner();
        self.settle(r, State::Done)
    }

    fn expect_state(&mut self, want: State, call: &'static str) -> DResult<(), S::Error> {
        if self.state == want {
            return Ok(());
        }
        let state = self.state.describe();
        self.state = State::Failed;
        Err(DecodeError {
            offset: self.pos,
            kind: DecodeErrorKind::WrongState { call, state },
        })
    }

    fn settle<T>(&mut self, r: DResult<T, S::Error>, next: State) -> DResult<T, S::Error> {
        self.state = if r.is_ok() { next } else { State::Failed };
        r
    }

    fn err<T>(offset: u64, kind: DecodeErrorKind<S::Error>) -> DResult<T, S::Error> {
        Err(DecodeError { offset, kind })
    }

    /// Reads as much of `buf` as the source has at `offset`; returns the count.
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> DResult<usize, S::Error> {
        let mut got = 0usize;
        // Each round reads at least one byte or stops, so this runs at most buf.len() times.
        while got < buf.len() {
            let at = offset.saturating_add(len64(got));
            let Some(dst) = buf.get_mut(got..) else {
                break;
            };
            let want = dst.len();
            let n = match self.src.read_at(at, dst) {
                Ok(n) => n,
                Err(e) => return Self::err(at, DecodeErrorKind::Source(e)),
            };
            if n == 0 {
                break;
            }
            got = got.saturating_add(n.min(want));
        }
        Ok(got)
    }

    fn read_exact_at(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        what: &'static str,
    ) -> DResult<(), S::Error> {
        let needed = len64(buf.len());
        if offset.checked_add(needed).is_none() {
            return Self::err(offset, DecodeErrorKind::OffsetOverflow { what });
        }
        if self.fill(offset, buf)? < buf.len() {
            return Self::err(offset, DecodeErrorKind::Truncated { what, needed });
        }
        Ok(())
    }

    /// Reads `buf` at the current position and advances; returns the field's offset.
    fn take(&mut self, buf: &mut [u8], what: &'static str) -> DResult<u64, S::Error> {
        let at = self.pos;
        self.read_exact_at(at, buf, what)?;
        // read_exact_at checked that this does not overflow.
        self.pos = at.saturating_add(len64(buf.len()));
        Ok(at)
    }

    fn skip(&mut self, n: u64, what: &'static str) -> DResult<(), S::Error> {
        match self.pos.checked_add(n) {
            Some(p) => {
                self.pos = p;
                Ok(())
            }
            None => Self::err(self.pos, DecodeErrorKind::OffsetOverflow { what }),
        }
    }

    fn u8(&mut self, what: &'static str) -> DResult<(u64, u8), S::Error> {
        let mut b = [0u8; 1];
        let at = self.take(&mut b, what)?;
        Ok((at, b[0]))
    }

    fn be16(&mut self, what: &'static str) -> DResult<(u64, u16), S::Error> {
        let mut b = [0u8; 2];
        let at = self.take(&mut b, what)?;
        Ok((at, u16::from_be_bytes(b)))
    }

    fn be32(&mut self, what: &'static str) -> DResult<(u64, u32), S::Error> {
        let mut b = [0u8; 4];
        let at = self.take(&mut b, what)?;
        Ok((at, u32::from_be_bytes(b)))
    }

    fn be64(&mut self, what: &'static str) -> DResult<(u64, u64), S::Error> {
        let mut b = [0u8; 8];
        let at = self.take(&mut b, what)?;
        Ok((at, u64::from_be_bytes(b)))
    }

    /// The byte at the current position without consuming it; `None` at end of file.
    fn peek_u8(&mut self) -> DResult<Option<u8>, S::Error> {
        let mut b = [0u8; 1];
        let at = self.pos;
        Ok((self.fill(at, &mut b)? == 1).then_some(b[0]))
    }

    /// Reads a u8-length-prefixed name into `buf`; returns (offset of the length byte, length).
    fn short_name(
        &mut self,
        buf: &mut [u8; 255],
        what: &'static str,
    ) -> DResult<(u64, usize), S::Error> {
        let (at, len) = self.u8(what)?;
        let len = usize::from(len);
        if let Some(dst) = buf.get_mut(..len) {
            self.take(dst, what)?;
        }
        Ok((at, len))
    }

    fn footer(&mut self, section_id: u32) -> DResult<(), S::Error> {
        let (at, b) = self.u8("section footer")?;
        if b != QEMU_VM_SECTION_FOOTER {
            return Self::err(at, DecodeErrorKind::BadFooter(b));
        }
        let (at, found) = self.be32("footer section id")?;
        if found != section_id {
            return Self::err(
                at,
                DecodeErrorKind::FooterSectionId {
                    expected: section_id,
                    found,
                },
            );
        }
        Ok(())
    }

    fn eos(&mut self) -> DResult<(), S::Error> {
        let (at, w) = self.be64("RAM EOS word")?;
        if w != RAM_SAVE_FLAG_EOS {
            return Self::err(at, DecodeErrorKind::ExpectedEos(w));
        }
        Ok(())
    }

    fn read_config_inner(&mut self) -> DResult<Config, S::Error> {
        let (at, magic) = self.be32("file magic")?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Self::err(at, DecodeErrorKind::BadMagic(magic));
        }
        let (at, version) = self.be32("file version")?;
        if version != QEMU_VM_FILE_VERSION {
            return Self::err(at, DecodeErrorKind::BadVersion(version));
        }
        let (at, t) = self.u8("configuration section type")?;
        if t != QEMU_VM_CONFIGURATION {
            return Self::err(
                at,
                DecodeErrorKind::UnexpectedRecord {
                    expected: "the CONFIGURATION section (0x07)",
                    found: t,
                },
            );
        }
        let (at, len) = self.be32("machine type name length")?;
        let n = match usize::try_from(len) {
            Ok(n) if n <= MAX_MACHINE_NAME_LEN => n,
            _ => return Self::err(at, DecodeErrorKind::MachineNameTooLong(len)),
        };
        let mut buf = [0u8; MAX_MACHINE_NAME_LEN];
        let name = buf.get_mut(..n).unwrap_or(&mut []);
        let at = self.take(name, "machine type name")?;
        let Ok(machine) = core::str::from_utf8(name) else {
            return Self::err(
                at,
                DecodeErrorKind::NotUtf8 {
                    what: "machine type name",
                    bytes: raw_name(name),
                },
            );
        };
        let machine = heapless::String::try_from(machine).unwrap_or_default();
        let mut cfg = Config {
            machine,
            capabilities: Capabilities::empty(),
            target_page_bits: None,
            uuid: None,
        };
        self.read_subsections(&mut cfg)?;
        // read_subsections validated the bits, so this is Some.
        self.page_size = cfg.target_page_size().unwrap_or(DEFAULT_PAGE_SIZE);
        self.with_gpa = cfg.with_gpa();
        self.mapped_ram = cfg.mapped_ram();
        Ok(cfg)
    }

    fn read_subsections(&mut self, cfg: &mut Config) -> DResult<(), S::Error> {
        const NAMES: [&str; 3] = [
            SUBSECTION_TARGET_PAGE_BITS,
            SUBSECTION_CAPABILITIES,
            SUBSECTION_UUID,
        ];
        // Index of the first subsection still allowed; each one read raises it, so the loop
        // runs at most NAMES.len() times before a repeat is rejected.
        let mut next = 0usize;
        while self.peek_u8()? == Some(QEMU_VM_SUBSECTION) {
            let start = self.pos;
            let mut name = [0u8; 255];
            let name_at = start.saturating_add(1);
            let mut len = [0u8; 1];
            self.read_exact_at(name_at, &mut len, "subsection name length")?;
            let len = usize::from(len[0]);
            let name = name.get_mut(..len).unwrap_or(&mut []);
            self.read_exact_at(name_at.saturating_add(1), name, "subsection name")?;
            if len <= CONFIGURATION_PREFIX.len() || !name.starts_with(CONFIGURATION_PREFIX) {
                // Not ours: QEMU stops here too and then fails on the section type.
                break;
            }
            let Some(index) = NAMES.iter().position(|n| n.as_bytes() == &name[..]) else {
                return Self::err(start, DecodeErrorKind::UnknownSubsection(raw_name(name)));
            };
            let sub = NAMES.get(index).copied().unwrap_or("");
            if index < next {
                return Self::err(start, DecodeErrorKind::SubsectionOutOfOrder(sub));
            }
            next = index.saturating_add(1);
            // u8 marker, u8 length, name.
            self.skip(len64(len).saturating_add(2), "subsection header")?;
            let (at, version) = self.be32("subsection version")?;
            if version != SUBSECTION_VERSION {
                return Self::err(
                    at,
                    DecodeErrorKind::BadSubsectionVersion { name: sub, version },
                );
            }
            match index {
                0 => {
                    let (at, bits) = self.be32("target page bits")?;
                    if !(MIN_TARGET_PAGE_BITS..=MAX_TARGET_PAGE_BITS).contains(&bits) {
                        return Self::err(at, DecodeErrorKind::BadTargetPageBits(bits));
                    }
                    cfg.target_page_bits = Some(bits);
                }
                1 => cfg.capabilities = self.read_capabilities()?,
                _ => {
                    let mut uuid = [0u8; 16];
                    self.take(&mut uuid, "uuid")?;
                    cfg.uuid = Some(uuid);
                }
            }
        }
        Ok(())
    }

    fn read_capabilities(&mut self) -> DResult<Capabilities, S::Error> {
        let (at, count) = self.be32("capability count")?;
        if !(1..=2).contains(&count) {
            return Self::err(at, DecodeErrorKind::BadCapabilityCount(count));
        }
        let mut caps = Capabilities::empty();
        // Rank in QAPI order of the last capability read (x-ignore-shared 1, mapped-ram 2).
        let mut last = 0u8;
        for _ in 0..count {
            let mut buf = [0u8; 255];
            let (at, len) = self.short_name(&mut buf, "capability name")?;
            let name = buf.get(..len).unwrap_or(&[]);
            let (rank, flag) = if name == NAME_X_IGNORE_SHARED.as_bytes() {
                (1, Capabilities::X_IGNORE_SHARED)
            } else if name == NAME_MAPPED_RAM.as_bytes() {
                (2, Capabilities::MAPPED_RAM)
            } else {
                let known = core::str::from_utf8(name)
                    .ok()
                    .and_then(Capabilities::from_qemu_name)
                    .is_some();
                let raw = raw_name(name);
                return Self::err(
                    at,
                    if known {
                        DecodeErrorKind::CapabilityNotStored(raw)
                    } else {
                        DecodeErrorKind::UnknownCapability(raw)
                    },
                );
            };
            if rank <= last {
                return Self::err(at, DecodeErrorKind::CapabilityOutOfOrder(raw_name(name)));
            }
            last = rank;
            caps |= flag;
        }
        Ok(caps)
    }

    fn read_ram_start_inner(&mut self) -> DResult<RamStart, S::Error> {
        let section_offset = self.pos;
        let (at, t) = self.u8("section type")?;
        if t != QEMU_VM_SECTION_START {
            return Self::err(
                at,
                DecodeErrorKind::UnexpectedRecord {
                    expected: "the RAM SECTION_START (0x01)",
                    found: t,
                },
            );
        }
        let (_, section_id) = self.be32("section id")?;
        let mut buf = [0u8; 255];
        let (at, len) = self.short_name(&mut buf, "section id string")?;
        let idstr = buf.get(..len).unwrap_or(&[]);
        if idstr != RAM_SECTION_IDSTR.as_bytes() {
            return Self::err(at, DecodeErrorKind::NotRam(raw_name(idstr)));
        }
        let (at, instance_id) = self.be32("RAM section instance id")?;
        if instance_id != RAM_SECTION_INSTANCE {
            return Self::err(at, DecodeErrorKind::BadRamInstance(instance_id));
        }
        let (at, version_id) = self.be32("RAM section version")?;
        if version_id != RAM_SECTION_VERSION {
            return Self::err(at, DecodeErrorKind::BadRamVersion(version_id));
        }
        if !self.mapped_ram {
            return Self::err(section_offset, DecodeErrorKind::NotMappedRam);
        }
        let (at, word) = self.be64("RAM MEM_SIZE word")?;
        let mask = self.page_size.saturating_sub(1);
        let flags = word & mask;
        if flags & RAM_SAVE_FLAG_MEM_SIZE == 0 {
            return Self::err(at, DecodeErrorKind::MissingMemSize(word));
        }
        if flags != RAM_SAVE_FLAG_MEM_SIZE {
            return Self::err(at, DecodeErrorKind::StrayRamFlags(word));
        }
        let total_ram = word & !mask;
        self.ram_section_id = section_id;
        self.remaining = total_ram;
        Ok(RamStart {
            section_id,
            instance_id,
            version_id,
            total_ram,
            section_offset,
            first_record_offset: self.pos,
        })
    }

    fn next_block_inner(&mut self) -> DResult<Option<BlockRecord>, S::Error> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let record_offset = self.pos;
        let mut buf = [0u8; 255];
        let (at, len) = self.short_name(&mut buf, "block id")?;
        if len == 0 {
            return Self::err(at, DecodeErrorKind::ZeroLengthId);
        }
        let id = buf.get(..len).unwrap_or(&[]);
        let Ok(id) = core::str::from_utf8(id) else {
            return Self::err(
                at,
                DecodeErrorKind::NotUtf8 {
                    what: "block id",
                    bytes: raw_name(id),
                },
            );
        };
        let name = heapless::String::try_from(id).unwrap_or_default();
        let (at, length) = self.be64("block length")?;
        if length == 0 {
            return Self::err(at, DecodeErrorKind::ZeroLengthBlock);
        }
        if length > self.remaining {
            return Self::err(
                at,
                DecodeErrorKind::BlocksExceedTotal {
                    length,
                    remaining: self.remaining,
                },
            );
        }
        let gpa = if self.with_gpa {
            Some(self.be64("block guest physical address")?.1)
        } else {
            None
        };
        let mut raw = [0u8; HEADER_SIZE];
        let header_offset = self.take(&mut raw, "mapped-ram header")?;
        let header = MappedRamHeader::decode_any_version(&raw);
        let layout = match BlockLayout::from_header(
            record_offset,
            header_offset,
            length,
            &header,
            self.page_size,
        ) {
            Ok(l) => l,
            Err(e) => return Self::err(header_offset, DecodeErrorKind::Block(e)),
        };
        if header.is_empty() && !self.with_gpa {
            return Self::err(
                header_offset,
                DecodeErrorKind::UnexpectedEmptyHeader(header),
            );
        }
        let record = BlockRecord {
            name,
            length,
            gpa,
            header,
            layout,
            record_offset,
        };
        // from_header put the bitmap and pages after the header, so this moves forward.
        let next = record.next_offset();
        if next < self.pos {
            return Self::err(
                header_offset,
                DecodeErrorKind::Block(BlockError::BitmapOutOfPlace {
                    bitmap_offset: header.bitmap_offset,
                    bitmap_size: layout.bitmap_size,
                    pages_offset: header.pages_offset,
                }),
            );
        }
        self.pos = next;
        self.remaining = self.remaining.saturating_sub(length);
        self.blocks = self.blocks.saturating_add(1);
        Ok(Some(record))
    }

    fn finish_inner(&mut self) -> DResult<Tail, S::Error> {
        // Skip blocks not read yet. Each round consumes at least one target page of the
        // MEM_SIZE total and reads a block record from the file.
        while self.next_block_inner()?.is_some() {}
        let id = self.ram_section_id;
        let device_stream_start = self.pos;
        self.eos()?;
        self.footer(id)?;
        let mut tail = Tail {
            device_stream_start,
            device_state_offset: 0,
            first_device_record: None,
            parts: 0,
            commands: heapless::Vec::new(),
            commands_total: 0,
        };
        let mut records = 0u32;
        loop {
            let (at, t) = self.u8("record type")?;
            if records >= MAX_TAIL_RECORDS {
                return Self::err(at, DecodeErrorKind::TooManyRecords(MAX_TAIL_RECORDS));
            }
            records = records.saturating_add(1);
            match t {
                QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                    let (id_at, section_id) = self.be32("section id")?;
                    if section_id != id {
                        return Self::err(
                            id_at,
                            DecodeErrorKind::ForeignSection {
                                section_type: t,
                                section_id,
                            },
                        );
                    }
                    self.eos()?;
                    self.footer(id)?;
                    if t == QEMU_VM_SECTION_END {
                        break;
                    }
                    tail.parts = tail.parts.saturating_add(1);
                }
                QEMU_VM_COMMAND => {
                    let (_, cmd) = self.be16("command id")?;
                    let (_, len) = self.be16("command length")?;
                    let bad = match cmd {
                        0 | MIG_CMD_PACKAGED => true,
                        MIG_CMD_SWITCHOVER_START => len != 0,
                        _ => false,
                    };
                    if bad {
                        return Self::err(at, DecodeErrorKind::BadCommand { cmd, len });
                    }
                    self.skip(u64::from(len), "command payload")?;
                    // A full list only stops recording; commands_total still counts.
                    let _ = tail.commands.push(Command {
                        cmd,
                        len,
                        offset: at,
                    });
                    tail.commands_total = tail.commands_total.saturating_add(1);
                }
                found => {
                    return Self::err(
                        at,
                        DecodeErrorKind::UnexpectedRecord {
                            expected: "a RAM PART/END section or a COMMAND",
                            found,
                        },
                    )
                }
            }
        }
        tail.device_state_offset = self.pos;
        tail.first_device_record = self.peek_u8()?;
        Ok(tail)
    }
}

/// Everything [`decode_file`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FileInfo {
    /// The configuration section.
    pub config: Config,
    /// The RAM SECTION_START record.
    pub ram: RamStart,
    /// The RAM sections after the blocks, and where device state starts.
    pub tail: Tail,
    /// Number of block records.
    pub blocks: u32,
}

/// [`decode_file`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeFileError<E, U> {
    /// The file was rejected.
    Decode(DecodeError<E>),
    /// The block callback failed.
    Callback {
        /// Index of the block (0-based).
        block: u32,
        /// The callback's error.
        error: U,
    },
}

impl<E: fmt::Display, U: fmt::Display> fmt::Display for DecodeFileError<E, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeFileError::Decode(e) => e.fmt(f),
            DecodeFileError::Callback { block, error } => {
                write!(f, "block {block}: {error}")
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display, U: fmt::Debug + fmt::Display> core::error::Error
    for DecodeFileError<E, U>
{
}

impl<E, U> From<DecodeError<E>> for DecodeFileError<E, U> {
    fn from(e: DecodeError<E>) -> Self {
        DecodeFileError::Decode(e)
    }
}

/// Decodes a whole file's framing, calling `on_block` for each block record in order.
pub fn decode_file<S: ByteSource, U>(
    src: S,
    base_offset: u64,
    mut on_block: impl FnMut(&BlockRecord) -> Result<(), U>,
) -> Result<FileInfo, DecodeFileError<S::Error, U>> {
    let mut dec = Decoder::new(src, base_offset);
    let config = dec.read_config()?;
    let ram = dec.read_ram_start()?;
    let mut blocks = 0u32;
    while let Some(block) = dec.next_block()? {
        on_block(&block).map_err(|error| DecodeFileError::Callback {
            block: blocks,
            error,
        })?;
        blocks = blocks.saturating_add(1);
    }
    let tail = dec.finish()?;
    Ok(FileInfo {
        config,
        ram,
        tail,
        blocks,
    })
}

/// Finds the vmdesc record in the last bytes of a file the way `scripts/analyze-migration.py`
/// does (spec §b.3): the last NUL byte, then the first `{` after it; the byte 5 before the `{`
/// must be `0x06` and the 4 bytes before it the JSON length, which must fit in `tail`.
/// Returns the index of the `0x06` byte in `tail` and the JSON length.
pub fn find_vmdesc(tail: &[u8]) -> Option<(usize, u32)> {
    let nul = tail.iter().rposition(|&b| b == 0)?;
    let rest = tail.get(nul..)?;
    let brace = nul.checked_add(rest.iter().position(|&b| b == b'{')?)?;
    let start = brace.checked_sub(5)?;
    let header = tail.get(start..brace)?;
    let (marker, len) = header.split_first()?;
    if *marker != QEMU_VM_VMDESCRIPTION {
        return None;
    }
    let len = u32::from_be_bytes(len.try_into().ok()?);
    let end = brace.checked_add(usize::try_from(len).ok()?)?;
    (end <= tail.len()).then_some((start, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Planner;
    use std::vec::Vec;

    /// A sink writing at a movable position into a growing vector (a sparse-file stand-in).
    struct FileSink {
        data: Vec<u8>,
        pos: usize,
    }

    impl FileSink {
        fn new() -> Self {
            Self {
                data: Vec::new(),
                pos: 0,
            }
        }
        fn seek(&mut self, pos: u64) {
            self.pos = usize::try_from(pos).unwrap();
        }
    }

    impl ByteSink for FileSink {
        type Error = core::convert::Infallible;
        fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
            let end = self.pos + bytes.len();
            if self.data.len() < end {
                self.data.resize(end, 0);
            }
            self.data[self.pos..end].copy_from_slice(bytes);
            self.pos = end;
            Ok(())
        }
    }

    fn microvm_cfg() -> Config {
        Config::new("microvm", Capabilities::MAPPED_RAM).unwrap()
    }

    /// The §a.6 file up to and including the first device record's header bytes.
    fn worked_example() -> Vec<u8> {
        let cfg = microvm_cfg();
        let mut f = FileSink::new();
        encode_preamble(&cfg, &mut f).unwrap();
        assert_eq!(f.pos, 0x43);
        assert_eq!(preamble_len(&cfg), 0x43);
        let mut p = Planner::new(0x43 + RAM_START_LEN, 4096, false).unwrap();
        let ram = p.push(11, 0x200_0000).unwrap();
        let bios = p.push(7, 0x1_0000).unwrap();
        encode_ram_start(1, p.total_ram(), &mut f).unwrap();
        assert_eq!(f.pos, 0x5c);
        encode_block_record("microvm.ram", ram.length, None, &ram.header(), &mut f).unwrap();
        f.write_all(&[0x81]).unwrap(); // first bitmap byte, as in the real file
        f.seek(bios.record_offset);
        encode_block_record("pc.bios", bios.length, None, &bios.header(), &mut f).unwrap();
        f.write_all(&[0x80, 0x3f]).unwrap();
        f.seek(p.cursor());
        encode_eos_footer(1, &mut f).unwrap();
        encode_ram_part(1, &mut f).unwrap();
        encode_command(MIG_CMD_SWITCHOVER_START, &[], &mut f).unwrap();
        encode_ram_end(1, &mut f).unwrap();
        f.write_all(&[4, 0, 0, 0, 0, 5]).unwrap();
        f.write_all(b"timer").unwrap();
        f.write_all(&[0, 0, 0, 0, 0, 0, 0, 2]).unwrap();
        f.data
    }

    fn at(data: &[u8], off: usize, bytes: &[u8]) {
        assert_eq!(&data[off..off + bytes.len()], bytes, "at {off:#x}");
    }

    #[test]
    fn worked_example_bytes() {
        let d = worked_example();
        at(&d, 0x00, &[0x51, 0x45, 0x56, 0x4d]);
        at(&d, 0x04, &[0, 0, 0, 3]);
        at(&d, 0x08, &[7]);
        at(&d, 0x09, &[0, 0, 0, 7]);
        at(&d, 0x0d, b"microvm");
        at(&d, 0x14, &[5, 0x1a]);
        at(&d, 0x16, b"configuration/capabilities");
        at(&d, 0x30, &[0, 0, 0, 1, 0, 0, 0, 1, 0x0a]);
        at(&d, 0x39, b"mapped-ram");
        at(&d, 0x43, &[1, 0, 0, 0, 1, 3, 0x72, 0x61, 0x6d]);
        at(&d, 0x4c, &[0, 0, 0, 0, 0, 0, 0, 4]);
        at(&d, 0x54, &[0, 0, 0, 0, 2, 1, 0, 4]);
        at(&d, 0x5c, b"\x0bmicrovm.ram");
        at(&d, 0x68, &[0, 0, 0, 0, 2, 0, 0, 0]);
        at(&d, 0x70, &[0, 0, 0, 1]);
        at(&d, 0x74, &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        at(&d, 0x7c, &[0, 0, 0, 0, 0, 0, 0, 0x8c]);
        at(&d, 0x84, &[0, 0, 0, 0, 0, 0x10, 0, 0]);
        at(&d, 0x8c, &[0x81]);
        at(&d, 0x210_0000, b"\x07pc.bios");
        at(&d, 0x210_0008, &[0, 0, 0, 0, 0, 1, 0, 0]);
        at(&d, 0x210_0010, &[0, 0, 0, 1]);
        at(&d, 0x210_0014, &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        at(&d, 0x210_001c, &[0, 0, 0, 0, 2, 0x10, 0, 0x2c]);
        at(&d, 0x210_0024, &[0, 0, 0, 0, 2, 0x20, 0, 0]);
        at(&d, 0x210_002c, &[0x80, 0x3f]);
        at(&d, 0x221_0000, &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        at(&d, 0x221_0008, &[0x7e, 0, 0, 0, 1]);
        at(&d, 0x221_000d, &[2, 0, 0, 0, 1]);
        at(&d, 0x221_0012, &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        at(&d, 0x221_001a, &[0x7e, 0, 0, 0, 1]);
        at(&d, 0x221_001f, &[8, 0, 0x0b, 0, 0]);
        at(&d, 0x221_0024, &[3, 0, 0, 0, 1]);
        at(&d, 0x221_0029, &[0, 0, 0, 0, 0, 0, 0, 0x10]);
        at(&d, 0x221_0031, &[0x7e, 0, 0, 0, 1]);
        at(&d, 0x221_0036, b"\x04\x00\x00\x00\x00\x05timer");
    }

    #[test]
    fn worked_example_decodes() {
        let d = worked_example();
        let mut seen = Vec::new();
        let info = decode_file(&d[..], 0, |b| {
            seen.push(b.clone());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(info.config, microvm_cfg());
        assert_eq!(
            info.ram,
            RamStart {
                section_id: 1,
                instance_id: 0,
                version_id: 4,
                total_ram: 0x201_0000,
                section_offset: 0x43,
                first_record_offset: 0x5c,
            }
        );
        assert_eq!(info.blocks, 2);
        assert_eq!(seen[0].name, "microvm.ram");
        assert_eq!(seen[0].record_offset, 0x5c);
        assert_eq!(seen[0].length, 0x200_0000);
        assert_eq!(seen[0].gpa, None);
        assert_eq!(seen[0].layout.header_offset, 0x70);
        assert_eq!(seen[0].layout.bitmap_offset, 0x8c);
        assert_eq!(seen[0].layout.bitmap_size, 1024);
        assert_eq!(seen[0].layout.pages_offset, 0x10_0000);
        assert_eq!(seen[1].name, "pc.bios");
        assert_eq!(seen[1].record_offset, 0x210_0000);
        assert_eq!(seen[1].header.bitmap_offset, 0x210_002c);
        assert_eq!(seen[1].layout.pages_offset, 0x220_0000);
        let t = &info.tail;
        assert_eq!(t.device_stream_start, 0x221_0000);
        assert_eq!(t.device_state_offset, 0x221_0036);
        assert_eq!(t.first_device_record, Some(QEMU_VM_SECTION_FULL));
        assert_eq!(t.parts, 1);
        assert_eq!(t.commands_total, 1);
        assert_eq!(
            t.commands[..],
            [Command {
                cmd: MIG_CMD_SWITCHOVER_START,
                len: 0,
                offset: 0x221_001f
            }]
        );

        // Step by step, with positions.
        let mut dec = Decoder::new(&d[..], 0);
        dec.read_config().unwrap();
        assert_eq!(dec.position(), 0x43);
        dec.read_ram_start().unwrap();
        assert_eq!(dec.position(), 0x5c);
        dec.next_block().unwrap().unwrap();
        assert_eq!(dec.position(), 0x210_0000);
        dec.next_block().unwrap().unwrap();
        assert_eq!(dec.position(), 0x221_0000);
        assert_eq!(dec.next_block().unwrap(), None);
        assert_eq!(dec.finish().unwrap(), info.tail);
        // finish() skips unread blocks.
        let mut dec = Decoder::new(&d[..], 0);
        dec.read_config().unwrap();
        dec.read_ram_start().unwrap();
        assert_eq!(dec.finish().unwrap(), info.tail);
        // Out of order.
        let mut dec = Decoder::new(&d[..], 0);
        let e = dec.next_block().unwrap_err();
        assert!(matches!(
            e.kind,
            DecodeErrorKind::WrongState {
                call: "next_block",
                ..
            }
        ));
    }

    #[test]
    fn vmdesc_found_like_analyze_migration() {
        let mut f = FileSink::new();
        f.write_all(&[0x04, 0, 0, 0, 0x0c, 0x7e, 0, 0, 0, 0x0c])
            .unwrap();
        encode_eof(&mut f).unwrap();
        let json = br#"{"page_size": 4096, "devices": []}"#;
        encode_vmdesc(json, &mut f).unwrap();
        assert_eq!(find_vmdesc(&f.data), Some((11, json.len() as u32)));
        assert_eq!(find_vmdesc(&f.data[..f.data.len() - 1]), None);
        assert_eq!(find_vmdesc(b"no nul here {"), None);
        assert_eq!(find_vmdesc(b"\0{"), None);
        // A length with no NUL byte: the EOF byte is the last NUL.
        let mut big = vec![0x7e, 0, 0, 0, 1, 0, 6, 1, 1, 1, 1, b'{'];
        big.resize(12 + 0x0101_0101 - 1, b' ');
        assert_eq!(find_vmdesc(&big), Some((6, 0x0101_0101)));
    }

    #[test]
    fn ignore_shared_gpa_and_empty_block() {
        let mut cfg = Config::new(
            "pc-q35-11.0",
            Capabilities::X_IGNORE_SHARED | Capabilities::MAPPED_RAM,
        )
        .unwrap();
        cfg.uuid = Some([0xab; 16]);
        let mut f = FileSink::new();
        encode_preamble(&cfg, &mut f).unwrap();
        let plen = preamble_len(&cfg);
        assert_eq!(f.pos as u64, plen);
        // Capabilities in QAPI order, then the uuid subsection.
        let caps_at = 4 + 4 + 1 + 4 + 11;
        at(&f.data, caps_at, b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x02\x0fx-ignore-shared\x0amapped-ram\x05\x12configuration/uuid\x00\x00\x00\x01");
        let mut p = Planner::new(plen + RAM_START_LEN, 4096, true).unwrap();
        let shared = p.push_empty(6, 0x4000_0000).unwrap();
        let bios = p.push(7, 0x4_0000).unwrap();
        encode_ram_start(2, p.total_ram(), &mut f).unwrap();
        encode_block_record("pc.ram", shared.length, Some(0), &shared.header(), &mut f).unwrap();
        assert_eq!(f.pos as u64, bios.record_offset);
        encode_block_record(
            "pc.bios",
            bios.length,
            Some(0xfffc_0000),
            &bios.header(),
            &mut f,
        )
        .unwrap();
        f.seek(p.cursor());
        encode_eos_footer(2, &mut f).unwrap();
        encode_ram_end(2, &mut f).unwrap();

        let mut blocks = Vec::new();
        let info = decode_file(&f.data[..], 0, |b| {
            blocks.push(b.clone());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(info.config, cfg);
        assert_eq!(info.ram.section_id, 2);
        assert_eq!(info.ram.total_ram, 0x4004_0000);
        assert!(blocks[0].is_empty());
        assert_eq!(blocks[0].gpa, Some(0));
        assert_eq!(blocks[0].next_offset(), bios.record_offset);
        assert_eq!(blocks[1].gpa, Some(0xfffc_0000));
        assert_eq!(blocks[1].layout, bios);
        assert_eq!(info.tail.device_stream_start, p.cursor());
        assert_eq!(info.tail.device_state_offset, p.cursor() + 13 + 18);
        assert_eq!(info.tail.first_device_record, None);
        assert_eq!(info.tail.parts, 0);

        // The same 0/0 header without x-ignore-shared is refused.
        let cfg = microvm_cfg();
        let mut f = FileSink::new();
        encode_preamble(&cfg, &mut f).unwrap();
        encode_ram_start(1, 0x1000, &mut f).unwrap();
        let hdr_at = f.pos as u64 + 1 + 6 + 8;
        encode_block_record("pc.ram", 0x1000, None, &shared.header(), &mut f).unwrap();
        let e = decode_file(&f.data[..], 0, |_| Ok::<(), ()>(())).unwrap_err();
        assert_eq!(
            e,
            DecodeFileError::Decode(DecodeError {
                offset: hdr_at,
                kind: DecodeErrorKind::UnexpectedEmptyHeader(shared.header())
            })
        );
    }

    /// A small valid file: one 4 KiB block, pages at 1 MiB, RAM tail.
    fn small_file(base: u64) -> Vec<u8> {
        let cfg = microvm_cfg();
        let mut f = FileSink::new();
        f.write_all(&vec![b'X'; base as usize]).unwrap();
        encode_preamble(&cfg, &mut f).unwrap();
        let mut p = Planner::new(base + preamble_len(&cfg) + RAM_START_LEN, 4096, false).unwrap();
        let b = p.push(3, 0x1000).unwrap();
        encode_ram_start(1, p.total_ram(), &mut f).unwrap();
        encode_block_record("rom", b.length, None, &b.header(), &mut f).unwrap();
        f.seek(p.cursor());
        encode_eos_footer(1, &mut f).unwrap();
        encode_ram_part(1, &mut f).unwrap();
        encode_command(MIG_CMD_SWITCHOVER_START, &[], &mut f).unwrap();
        encode_ram_end(1, &mut f).unwrap();
        f.data
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let d = small_file(0);
        assert!(decode_file(&d[..], 0, |_| Ok::<(), ()>(())).is_ok());
        // Every cut in the records, a sample of cuts in the page region (all alike).
        let cuts = (0..0x200)
            .chain((0x200..0x10_0f00).step_by(4093))
            .chain(0x10_0f00..d.len());
        for n in cuts {
            let r = decode_file(&d[..n], 0, |_| Ok::<(), ()>(()));
            match r {
                Err(DecodeFileError::Decode(e)) => {
                    // The rejected field is the one the cut went through (or lies past it).
                    let DecodeErrorKind::Truncated { needed, .. } = e.kind else {
                        panic!("{n}: {e}");
                    };
                    assert!(e.offset + needed > n as u64, "{n}: {e}");
                }
                other => panic!("truncated at {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn offset_prefix() {
        let d = small_file(0x1000);
        assert!(d[..0x1000].iter().all(|&b| b == b'X'));
        at(&d, 0x1000, b"QEVM");
        let info = decode_file(&d[..], 0x1000, |b| {
            assert_eq!(b.record_offset, 0x1000 + 0x43 + 25);
            assert_eq!(b.layout.bitmap_offset, 0x1000 + 0x43 + 25 + 1 + 3 + 8 + 28);
            assert_eq!(b.layout.pages_offset, 0x10_0000);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(info.ram.section_offset, 0x1043);
        assert_eq!(info.tail.device_stream_start, 0x10_1000);
        assert_eq!(info.tail.device_state_offset, 0x10_1000 + 13 + 18 + 5 + 18);
        let e = decode_err(&d);
        assert_eq!(
            e.to_string(),
            "at file offset 0x0: bad magic 0x58585858 (expected 0x5145564d \"QEVM\")"
        );
    }

    fn decode_err(d: &[u8]) -> DecodeError<core::convert::Infallible> {
        match decode_file(d, 0, |_| Ok::<(), ()>(())) {
            Err(DecodeFileError::Decode(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejections() {
        let good = small_file(0);
        let with = |off: usize, bytes: &[u8]| {
            let mut d = good.clone();
            d[off..off + bytes.len()].copy_from_slice(bytes);
            decode_err(&d)
        };
        let e = with(4, &[0, 0, 0, 2]);
        assert_eq!((e.offset, e.kind), (4, DecodeErrorKind::BadVersion(2)));
        let e = with(8, &[1]);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::UnexpectedRecord { found: 1, .. }
        ));
        let e = with(9, &[0, 0, 1, 1]);
        assert_eq!(e.kind, DecodeErrorKind::MachineNameTooLong(257));
        let e = with(0x0d, &[0xff]);
        assert_eq!(
            e.to_string(),
            "at file offset 0xd: machine type name \"\\xfficrovm\" is not UTF-8"
        );
        let e = with(0x16 + 14, b"capabilitiez");
        assert_eq!(e.offset, 0x14);
        assert_eq!(
            e.to_string(),
            "at file offset 0x14: unknown configuration subsection \"configuration/capabilitiez\""
        );
        // A subsection not named configuration*: left for the section reader, which refuses it.
        let e = with(0x16, b"Configuration");
        assert_eq!(
            (e.offset, e.kind),
            (
                0x14,
                DecodeErrorKind::UnexpectedRecord {
                    expected: "the RAM SECTION_START (0x01)",
                    found: 5
                }
            )
        );
        let e = with(0x30, &[0, 0, 0, 2]);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::BadSubsectionVersion { version: 2, .. }
        ));
        let e = with(0x34, &[0, 0, 0, 0]);
        assert_eq!(e.kind, DecodeErrorKind::BadCapabilityCount(0));
        let e = with(0x34, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(e.kind, DecodeErrorKind::BadCapabilityCount(u32::MAX));
        let e = with(0x39, b"mapped-rom");
        assert_eq!(e.offset, 0x38);
        assert_eq!(
            e.to_string(),
            "at file offset 0x38: unknown capability \"mapped-rom\""
        );
        let e = with(0x38, b"\x07multifd");
        assert_eq!(
            (e.offset, e.kind),
            (
                0x38,
                DecodeErrorKind::CapabilityNotStored(raw_name(b"multifd"))
            )
        );
        let e = with(0x44, &[0, 0, 0, 7]);
        assert_eq!(
            (e.offset, e.kind),
            (
                0x10_1009,
                DecodeErrorKind::FooterSectionId {
                    expected: 7,
                    found: 1
                }
            )
        );
        let e = with(0x49, b"rom");
        assert_eq!(e.kind, DecodeErrorKind::NotRam(raw_name(b"rom")));
        let e = with(0x4c, &[0, 0, 0, 1]);
        assert_eq!(e.kind, DecodeErrorKind::BadRamInstance(1));
        let e = with(0x50, &[0, 0, 0, 3]);
        assert_eq!(e.kind, DecodeErrorKind::BadRamVersion(3));
        let e = with(0x5b, &[0]);
        assert_eq!(
            (e.offset, e.kind),
            (0x54, DecodeErrorKind::MissingMemSize(0x1000))
        );
        let e = with(0x5b, &[0x0c]);
        assert_eq!(e.kind, DecodeErrorKind::StrayRamFlags(0x100c));
        // A total larger than the blocks: the next record is read where the stream goes on.
        let e = with(0x5a, &[0x20]);
        assert_eq!(
            (e.offset, e.kind),
            (0x10_1000, DecodeErrorKind::ZeroLengthId)
        );
        let e = with(0x5c, &[0]);
        assert_eq!(
            (e.offset, e.to_string()),
            (0x5c, "at file offset 0x5c: block id length 0".into())
        );
        let e = with(0x5d, &[0xc3, 0x28]);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::NotUtf8 {
                what: "block id",
                ..
            }
        ));
        let e = with(0x60, &[0; 8]);
        assert_eq!((e.offset, e.kind), (0x60, DecodeErrorKind::ZeroLengthBlock));
        let e = with(0x60, &[0, 0, 0, 0, 0, 0, 0x20, 0]);
        assert_eq!(
            e.kind,
            DecodeErrorKind::BlocksExceedTotal {
                length: 0x2000,
                remaining: 0x1000
            }
        );
        let e = with(0x68, &[0, 0, 0, 2]);
        assert_eq!(e.offset, 0x68);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::Block(BlockError::Header(_))
        ));
        // A bitmap pointing back into the record.
        let e = with(0x74 + 7, &[0x5c]);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::Block(BlockError::BitmapOutOfPlace { .. })
        ));
        let tail = 0x10_1000;
        let e = with(tail + 7, &[0x11]);
        assert_eq!(
            (e.offset, e.kind),
            (tail as u64, DecodeErrorKind::ExpectedEos(0x11))
        );
        let e = with(tail + 8, &[0x7f]);
        assert_eq!(e.kind, DecodeErrorKind::BadFooter(0x7f));
        let e = with(tail + 13, &[4]);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::UnexpectedRecord { found: 4, .. }
        ));
        let e = with(tail + 14, &[0, 0, 0, 0]);
        assert_eq!(
            e.kind,
            DecodeErrorKind::ForeignSection {
                section_type: 2,
                section_id: 0
            }
        );
        let e = with(tail + 13 + 18 + 4, &[1]);
        assert_eq!(
            (e.offset, e.kind),
            (
                (tail + 31) as u64,
                DecodeErrorKind::BadCommand { cmd: 11, len: 1 }
            )
        );
        let e = with(tail + 13 + 18 + 1, &[0, 8]);
        assert_eq!(e.kind, DecodeErrorKind::BadCommand { cmd: 8, len: 0 });
    }

    /// A compact file (pages page-aligned instead of 1 MiB aligned, which the loader accepts)
    /// with every optional part: target page bits, both capabilities, uuid, GPAs, a 0/0 block,
    /// PART sections and commands.
    fn compact_file() -> Vec<u8> {
        let mut cfg = Config::new(
            "virt-10.0",
            Capabilities::X_IGNORE_SHARED | Capabilities::MAPPED_RAM,
        )
        .unwrap();
        cfg.target_page_bits = Some(12);
        cfg.uuid = Some(*b"0123456789abcdef");
        let mut f = FileSink::new();
        encode_preamble(&cfg, &mut f).unwrap();
        encode_ram_start(3, 0x5000, &mut f).unwrap();
        let mut pos = f.pos as u64;
        for (name, len, empty) in [
            ("mach-virt.ram", 0x3000u64, false),
            ("sh", 0x1000, true),
            ("rom", 0x1000, false),
        ] {
            let header_offset = pos + 1 + name.len() as u64 + 16;
            let h = if empty {
                MappedRamHeader {
                    version: 1,
                    page_size: 4096,
                    bitmap_offset: 0,
                    pages_offset: 0,
                }
            } else {
                let bitmap_offset = header_offset + 28;
                MappedRamHeader {
                    version: 1,
                    page_size: 4096,
                    bitmap_offset,
                    pages_offset: crate::layout::align_up(bitmap_offset + 8, 4096).unwrap(),
                }
            };
            encode_block_record(name, len, Some(0x4000_0000), &h, &mut f).unwrap();
            f.write_all(&[0xff]).unwrap();
            pos = if empty {
                header_offset + 28
            } else {
                h.pages_offset + len
            };
            f.seek(pos);
        }
        encode_eos_footer(3, &mut f).unwrap();
        encode_ram_part(3, &mut f).unwrap();
        encode_command(42, b"xyz", &mut f).unwrap();
        encode_ram_part(3, &mut f).unwrap();
        encode_command(MIG_CMD_SWITCHOVER_START, &[], &mut f).unwrap();
        encode_ram_end(3, &mut f).unwrap();
        encode_eof(&mut f).unwrap();
        encode_vmdesc(b"{}", &mut f).unwrap();
        f.data
    }

    #[test]
    fn compact_file_decodes() {
        let d = compact_file();
        assert!(d.len() < 0x8000);
        let mut names = Vec::new();
        let info = decode_file(&d[..], 0, |b| {
            names.push((b.name.clone(), b.is_empty(), b.gpa));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(info.config.target_page_bits, Some(12));
        assert_eq!(info.config.uuid, Some(*b"0123456789abcdef"));
        assert_eq!(names.len(), 3);
        assert!(names[1].1 && !names[0].1 && !names[2].1);
        assert_eq!(names[2].2, Some(0x4000_0000));
        assert_eq!(info.tail.parts, 2);
        assert_eq!(info.tail.commands_total, 2);
        assert_eq!(info.tail.commands[0].cmd, 42);
        assert_eq!(info.tail.commands[0].len, 3);
        assert_eq!(info.tail.first_device_record, Some(QEMU_VM_EOF));
        let eof = info.tail.device_state_offset as usize;
        assert_eq!(find_vmdesc(&d[eof..]), Some((1, 2)));
        // A callback error stops decoding and names the block.
        let e =
            decode_file(&d[..], 0, |b| if b.is_empty() { Err("no") } else { Ok(()) }).unwrap_err();
        assert_eq!(
            e,
            DecodeFileError::Callback {
                block: 1,
                error: "no"
            }
        );
        assert_eq!(e.to_string(), "block 1: no");
    }

    #[test]
    fn configuration_rules() {
        let base = Config::new(
            "m",
            Capabilities::X_IGNORE_SHARED | Capabilities::MAPPED_RAM,
        )
        .unwrap();
        let enc = |cfg: &Config| {
            let mut f = FileSink::new();
            encode_preamble(cfg, &mut f).unwrap();
            f.data
        };
        let read = |d: &[u8]| Decoder::new(d, 0).read_config();
        // Other capabilities are not written; without any stored one there is no subsection.
        let mut cfg = base.clone();
        cfg.capabilities |= Capabilities::from_qemu_name("multifd").unwrap();
        assert_eq!(enc(&cfg), enc(&base));
        cfg.capabilities = Capabilities::from_qemu_name("multifd").unwrap();
        assert_eq!(enc(&cfg), b"QEVM\0\0\0\x03\x07\0\0\0\x01m");
        assert_eq!(
            read(&enc(&cfg)).unwrap().capabilities,
            Capabilities::empty()
        );
        assert_eq!(preamble_len(&cfg), 14);
        // Page bits.
        let mut cfg = base.clone();
        cfg.target_page_bits = Some(14);
        let d = enc(&cfg);
        assert_eq!(read(&d).unwrap(), cfg);
        let mut dec = Decoder::new(&d[..], 0);
        dec.read_config().unwrap();
        assert_eq!(dec.page_size(), 16384);
        cfg.target_page_bits = Some(9);
        let e = read(&enc(&cfg)).unwrap_err();
        assert_eq!(
            (e.offset, e.kind),
            (14 + 2 + 30 + 4, DecodeErrorKind::BadTargetPageBits(9))
        );
        assert_eq!(cfg.target_page_size(), None);
        cfg.target_page_bits = Some(64);
        assert_eq!(cfg.target_page_size(), None);
        // Subsections repeated or out of order.
        let mut d = enc(&base);
        d.extend_from_slice(&d.clone()[14..]);
        let e = read(&d).unwrap_err();
        assert_eq!(
            (e.offset as usize, e.kind),
            (
                d.len() / 2 + 7,
                DecodeErrorKind::SubsectionOutOfOrder(SUBSECTION_CAPABILITIES)
            )
        );
        // Capabilities: names, order, repeats.
        let caps_doc = |names: &[&[u8]]| {
            let mut d = enc(&Config::new("m", Capabilities::empty()).unwrap());
            d.extend_from_slice(b"\x05\x1aconfiguration/capabilities\0\0\0\x01");
            d.extend_from_slice(&(names.len() as u32).to_be_bytes());
            for n in names {
                d.push(n.len() as u8);
                d.extend_from_slice(n);
            }
            read(&d)
        };
        assert_eq!(
            caps_doc(&[b"mapped-ram"]).unwrap().capabilities,
            Capabilities::MAPPED_RAM
        );
        let e = caps_doc(&[b"mapped-ram", b"x-ignore-shared"]).unwrap_err();
        assert_eq!(
            e.kind,
            DecodeErrorKind::CapabilityOutOfOrder(raw_name(b"x-ignore-shared"))
        );
        assert_eq!(e.offset, 14 + 32 + 4 + 11);
        let e = caps_doc(&[b"mapped-ram", b"mapped-ram"]).unwrap_err();
        assert_eq!(
            e.kind,
            DecodeErrorKind::CapabilityOutOfOrder(raw_name(b"mapped-ram"))
        );
        let e = caps_doc(&[b"multifd"]).unwrap_err();
        assert_eq!(
            e.kind,
            DecodeErrorKind::CapabilityNotStored(raw_name(b"multifd"))
        );
        let e = caps_doc(&[b"\xff"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at file offset 0x32: unknown capability \"\\xff\""
        );
        let e = caps_doc(&[b"a", b"b", b"c"]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::BadCapabilityCount(3));
        // Not a mapped-ram file.
        let mut d = enc(&Config::new("m", Capabilities::X_IGNORE_SHARED).unwrap());
        let ram_at = d.len() as u64;
        encode_ram_start(1, 0, &mut FileSinkAt(&mut d)).unwrap();
        let mut dec = Decoder::new(&d[..], 0);
        dec.read_config().unwrap();
        let e = dec.read_ram_start().unwrap_err();
        assert_eq!((e.offset, e.kind), (ram_at, DecodeErrorKind::NotMappedRam));
        let e = dec.finish().unwrap_err();
        assert!(matches!(
            e.kind,
            DecodeErrorKind::WrongState {
                state: "after an error",
                ..
            }
        ));
        // Machine names.
        assert_eq!(
            Config::new(&"x".repeat(257), Capabilities::empty()),
            Err(ConfigError::MachineNameTooLong { len: 257 })
        );
        let long = Config::new(&"x".repeat(256), Capabilities::empty()).unwrap();
        assert_eq!(read(&enc(&long)).unwrap(), long);
    }

    /// Appends to a vector.
    struct FileSinkAt<'a>(&'a mut Vec<u8>);

    impl ByteSink for FileSinkAt<'_> {
        type Error = core::convert::Infallible;
        fn write_all(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
            self.0.extend_from_slice(bytes);
            Ok(())
        }
    }

    #[test]
    fn zero_blocks_and_record_cap() {
        let mut d = Vec::new();
        let mut s = FileSinkAt(&mut d);
        encode_preamble(&microvm_cfg(), &mut s).unwrap();
        encode_ram_start(1, 0, &mut s).unwrap();
        encode_eos_footer(1, &mut s).unwrap();
        for _ in 0..MAX_TAIL_RECORDS {
            encode_ram_part(1, &mut s).unwrap();
        }
        let end_at = d.len() as u64;
        encode_ram_end(1, &mut FileSinkAt(&mut d)).unwrap();
        let e = decode_err(&d);
        assert_eq!(
            (e.offset, e.kind),
            (end_at, DecodeErrorKind::TooManyRecords(MAX_TAIL_RECORDS))
        );
        // One record fewer is fine.
        let cut = d.len() - 2 * RAM_PART_LEN as usize;
        let mut d2 = d[..cut].to_vec();
        encode_ram_end(1, &mut FileSinkAt(&mut d2)).unwrap();
        let info = decode_file(&d2[..], 0, |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(info.blocks, 0);
        assert_eq!(info.tail.device_stream_start, 0x43 + RAM_START_LEN);
        assert_eq!(info.tail.parts, MAX_TAIL_RECORDS - 1);
    }

    #[test]
    fn sinks() {
        let mut buf = [0u8; 20];
        let mut s = SliceSink::new(&mut buf);
        encode_ram_part(7, &mut s).unwrap();
        assert_eq!(s.written(), 18);
        assert_eq!(
            s.as_written(),
            &[2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 7]
        );
        let e = encode_eof(&mut s)
            .and_then(|()| encode_command(1, &[], &mut s))
            .unwrap_err();
        assert_eq!(
            e,
            SinkFull {
                written: 20,
                needed: 2,
                capacity: 20
            }
        );
        assert_eq!(s.written(), 20); // an encoder call may stop inside its record
        let mut c = CountingSink::new();
        encode_ram_end(1, &mut c).unwrap();
        encode_eos_footer(1, &mut c).unwrap();
        encode_ram_start(1, 0, &mut c).unwrap();
        encode_command(1, &[1, 2, 3], &mut c).unwrap();
        assert_eq!(
            c.count,
            RAM_PART_LEN + EOS_FOOTER_LEN + RAM_START_LEN + COMMAND_HEADER_LEN + 3
        );
        let h = MappedRamHeader {
            version: 1,
            page_size: 4096,
            bitmap_offset: 0,
            pages_offset: 0,
        };
        let mut c = CountingSink::new();
        encode_block_record("pc.ram", 1, Some(2), &h, &mut c).unwrap();
        assert_eq!(c.count, block_record_len(6, true));
        let long = "x".repeat(300);
        assert_eq!(
            encode_block_record_checked(&long, 1, None, &h, &mut c),
            Err(EncodeError::BadIdLength(300))
        );
        assert_eq!(
            encode_block_record_checked("", 1, None, &h, &mut c),
            Err(EncodeError::BadIdLength(0))
        );
        let mut c = CountingSink::new();
        encode_block_record(&long, 1, None, &h, &mut c).unwrap();
        assert_eq!(c.count, block_record_len(255, false));
    }

    /// A source that returns one byte per call and fails past a limit.
    struct Trickle<'a>(&'a [u8], u64);

    impl ByteSource for Trickle<'_> {
        type Error = &'static str;
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, Self::Error> {
            if offset >= self.1 {
                return Err("device gone");
            }
            let mut one = self.0;
            one.read_at(offset, buf.get_mut(..1).unwrap_or(&mut []))
                .map_err(|e| match e {})
        }
    }

    #[test]
    fn short_reads_and_source_errors() {
        let d = compact_file();
        let full = decode_file(&d[..], 0, |_| Ok::<(), ()>(())).unwrap();
        let info = decode_file(Trickle(&d, u64::MAX), 0, |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(info, full);
        let e = decode_file(Trickle(&d, 0x30), 0, |_| Ok::<(), ()>(())).unwrap_err();
        let DecodeFileError::Decode(e) = e else {
            panic!()
        };
        assert_eq!(
            (e.offset, e.kind.clone()),
            (0x30, DecodeErrorKind::Source("device gone"))
        );
        assert_eq!(
            e.to_string(),
            "at file offset 0x30: read failed: device gone"
        );
    }

    #[test]
    fn extreme_offsets() {
        // Base near the top of the offset space.
        let mut dec = Decoder::new(&[][..], u64::MAX - 2);
        let e = dec.read_config().unwrap_err();
        assert_eq!(
            e.kind,
            DecodeErrorKind::OffsetOverflow { what: "file magic" }
        );
        // A command payload that would run past u64::MAX cannot happen with slices, but a
        // block whose pages end near it is refused by the layout checks.
        let mut d = Vec::new();
        let mut s = FileSinkAt(&mut d);
        encode_preamble(&microvm_cfg(), &mut s).unwrap();
        encode_ram_start(1, 0x1000, &mut s).unwrap();
        let h = MappedRamHeader {
            version: 1,
            page_size: 4096,
            bitmap_offset: 0x100,
            pages_offset: !0xfff,
        };
        encode_block_record("x", 0x1000, None, &h, &mut s).unwrap();
        let e = decode_err(&d);
        assert!(
            matches!(e.kind, DecodeErrorKind::Block(BlockError::Layout(_))),
            "{e}"
        );
    }

    #[test]
    fn random_mutations_never_panic() {
        let seeds = [compact_file(), small_file(0)[..0x200].to_vec(), {
            let mut d = small_file(0);
            d.drain(0x200..0x10_0000);
            d
        }];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ok = 0;
        for i in 0..30_000 {
            let mut d = seeds[i % seeds.len()].clone();
            for _ in 0..=(rnd() % 4) {
                let pos = (rnd() % d.len() as u64) as usize;
                match rnd() % 4 {
                    0 => d[pos] = rnd() as u8,
                    1 => d[pos] ^= 1 << (rnd() % 8),
                    2 => d.truncate(pos),
                    _ => d[pos] = [0, 1, 0xff, 0x7e, 0x10][(rnd() % 5) as usize],
                }
                if d.is_empty() {
                    break;
                }
            }
            let base = if rnd() % 8 == 0 { rnd() % 16 } else { 0 };
            let r = decode_file(&d[..], base, |b| {
                assert!(b.next_offset() > b.record_offset);
                Ok::<(), ()>(())
            });
            if let Err(DecodeFileError::Decode(e)) = &r {
                let _ = e.to_string();
            } else {
                ok += 1;
            }
        }
        assert!(ok > 0);
    }
}
