//! QEMU 10.0's capability and parameter rules around `mapped-ram`, and a strict mode for our
//! own engine.
//!
//! QEMU validates a migration configuration at three checkpoints, and this module mirrors each
//! one with a pure function (rows refer to the rule table in section (c) of the project's spec):
//!
//! | QEMU command               | here                       | rules (in checking order) |
//! |----------------------------|----------------------------|---------------------------|
//! | `migrate-set-capabilities` | [`check_capabilities`]     | 6, 5, 9, 7, 4, 1, 2       |
//! | `migrate-set-parameters`   | [`check_parameters`]       | 12, 13, 10, 11            |
//! | `migrate`                  | [`check_migrate`]          | 16, 17, 18, 14, 15        |
//! | `migrate-incoming`         | [`check_migrate_incoming`] | 16, 17, 18                |
//!
//! (QEMU's functions: `migrate_caps_check` and `migrate_params_check` in `options.c`;
//! `migration_channels_and_transport_compatible` and `migrate_prepare` in `migration.c`.)
//!
//! The checks run in QEMU's order and the first failing one is reported, with QEMU's own error
//! text as its [`Display`](core::fmt::Display). Rule 21 is not an error: `direct-io` is silently
//! ignored unless both `mapped-ram` and `multifd` are on; [`effective_direct_io`] says whether
//! O_DIRECT is really used.
//!
//! Quirk worth knowing (rule 10): `migrate-set-parameters` tests the parameters *already in
//! effect*, not the ones being set. With `mapped-ram` on, setting `multifd-compression=zlib` is
//! accepted, and from then on every parameter change fails — even setting the compression back
//! to `none`. [`check_migrate`] still refuses to start such a migration (rule 15).
//!
//! [`check_strict`] is what our engine uses: it refuses everything QEMU refuses (wrapping QEMU's
//! errors) and also the combinations QEMU silently ignores or lets fail later, such as
//! `direct-io` without `multifd`, with messages that say what to change.
//!
//! Not modelled (they need run-time state we do not have): the host probes for postcopy and
//! background-snapshot, COLO without the replication module, rule 8 and the other "before
//! incoming starts" checks, dirty-limit's KVM requirement, RDMA's capability checks, and the
//! run-state checks of `migrate_prepare`. The host is assumed to be Linux (where zero-copy-send
//! exists).
//!
//! # Example
//!
//! ```
//! use mapped_ram_core::caps::{
//!     check_capabilities, check_migrate, check_parameters, Capabilities, Compression, Host,
//!     ParamUpdate, Parameters, ParamsError, Transport,
//! };
//!
//! let host = Host { o_direct_supported: true };
//! let caps = Capabilities::MAPPED_RAM | Capabilities::MULTIFD;
//! let params = Parameters::default();
//! check_capabilities(caps, &params).unwrap();
//!
//! let four = ParamUpdate { multifd_channels: Some(4), ..ParamUpdate::default() };
//! let params = check_parameters(caps, &params, &four, &host).unwrap();
//! assert_eq!(params.multifd_channels, 4);
//! check_migrate(caps, &params, &Transport::File { offset: Some(0x1000) }).unwrap();
//!
//! // Rule 10's quirk: zlib is accepted, then every later change is refused.
//! let zlib = ParamUpdate {
//!     multifd_compression: Some(Compression::Zlib),
//!     ..ParamUpdate::default()
//! };
//! let zlibbed = check_parameters(caps, &params, &zlib, &host).unwrap();
//! let err = check_parameters(caps, &zlibbed, &four, &host).unwrap_err();
//! assert!(matches!(err, ParamsError::MappedRamNeedsPlain { .. }));
//! assert_eq!(
//!     err.to_string(),
//!     "Mapped-ram only available for non-compressed non-TLS multifd migration"
//! );
//!
//! // The order capabilities are listed in the file's configuration section.
//! let listed: Vec<&str> = (Capabilities::MAPPED_RAM | Capabilities::X_IGNORE_SHARED)
//!     .iter_qapi_order()
//!     .filter_map(Capabilities::qemu_name)
//!     .collect();
//! assert_eq!(listed, ["x-ignore-shared", "mapped-ram"]);
//! ```

use core::fmt;

bitflags::bitflags! {
    /// A set of QEMU 10.0 migration capabilities (`MigrationCapability`).
    ///
    /// Bit `i` is the capability with index `i` in QAPI's `MigrationCapability` enum, so the
    /// flags are declared — and [`iter`](Capabilities::iter) yields them — in QAPI order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct Capabilities: u32 {
        /// `xbzrle`: delta-encode re-sent pages.
        const XBZRLE = 0x0000_0001;
        /// `rdma-pin-all`: pin all guest memory for RDMA.
        const RDMA_PIN_ALL = 0x0000_0002;
        /// `auto-converge`: throttle vCPUs when migration does not converge.
        const AUTO_CONVERGE = 0x0000_0004;
        /// `zero-blocks` (deprecated; a leftover of the removed block migration).
        const ZERO_BLOCKS = 0x0000_0008;
        /// `events`: emit MIGRATION events.
        const EVENTS = 0x0000_0010;
        /// `postcopy-ram`: allow switching to postcopy.
        const POSTCOPY_RAM = 0x0000_0020;
        /// `x-colo`: COLO fault tolerance (unstable).
        const X_COLO = 0x0000_0040;
        /// `release-ram`: discard source RAM during postcopy.
        const RELEASE_RAM = 0x0000_0080;
        /// `return-path`: destination-to-source channel.
        const RETURN_PATH = 0x0000_0100;
        /// `pause-before-switchover`.
        const PAUSE_BEFORE_SWITCHOVER = 0x0000_0200;
        /// `multifd`: RAM through several channels.
        const MULTIFD = 0x0000_0400;
        /// `dirty-bitmaps`: migrate block dirty bitmaps.
        const DIRTY_BITMAPS = 0x0000_0800;
        /// `postcopy-blocktime`.
        const POSTCOPY_BLOCKTIME = 0x0000_1000;
        /// `late-block-activate`.
        const LATE_BLOCK_ACTIVATE = 0x0000_2000;
        /// `x-ignore-shared`: skip shared memory-backend RAM (unstable).
        const X_IGNORE_SHARED = 0x0000_4000;
        /// `validate-uuid`.
        const VALIDATE_UUID = 0x0000_8000;
        /// `background-snapshot`: snapshot with write tracking.
        const BACKGROUND_SNAPSHOT = 0x0001_0000;
        /// `zero-copy-send`: MSG_ZEROCOPY socket sends for multifd.
        const ZERO_COPY_SEND = 0x0002_0000;
        /// `postcopy-preempt`: separate channel for postcopy page requests.
        const POSTCOPY_PREEMPT = 0x0004_0000;
        /// `switchover-ack`.
        const SWITCHOVER_ACK = 0x0008_0000;
        /// `dirty-limit`.
        const DIRTY_LIMIT = 0x0010_0000;
        /// `mapped-ram`: every page at a fixed file offset (the format of this project).
        const MAPPED_RAM = 0x0020_0000;
    }
}

/// The capabilities in QAPI enum order with their QEMU names.
static QAPI_TABLE: [(Capabilities, &str); 22] = [
    (Capabilities::XBZRLE, "xbzrle"),
    (Capabilities::RDMA_PIN_ALL, "rdma-pin-all"),
    (Capabilities::AUTO_CONVERGE, "auto-converge"),
    (Capabilities::ZERO_BLOCKS, "zero-blocks"),
    (Capabilities::EVENTS, "events"),
    (Capabilities::POSTCOPY_RAM, "postcopy-ram"),
    (Capabilities::X_COLO, "x-colo"),
    (Capabilities::RELEASE_RAM, "release-ram"),
    (Capabilities::RETURN_PATH, "return-path"),
    (
        Capabilities::PAUSE_BEFORE_SWITCHOVER,
        "pause-before-switchover",
    ),
    (Capabilities::MULTIFD, "multifd"),
    (Capabilities::DIRTY_BITMAPS, "dirty-bitmaps"),
    (Capabilities::POSTCOPY_BLOCKTIME, "postcopy-blocktime"),
    (Capabilities::LATE_BLOCK_ACTIVATE, "late-block-activate"),
    (Capabilities::X_IGNORE_SHARED, "x-ignore-shared"),
    (Capabilities::VALIDATE_UUID, "validate-uuid"),
    (Capabilities::BACKGROUND_SNAPSHOT, "background-snapshot"),
    (Capabilities::ZERO_COPY_SEND, "zero-copy-send"),
    (Capabilities::POSTCOPY_PREEMPT, "postcopy-preempt"),
    (Capabilities::SWITCHOVER_ACK, "switchover-ack"),
    (Capabilities::DIRTY_LIMIT, "dirty-limit"),
    (Capabilities::MAPPED_RAM, "mapped-ram"),
];

/// Capabilities that `background-snapshot` refuses, in the order QEMU tests them
/// (`check_caps_background_snapshot`, rule 9).
static BACKGROUND_SNAPSHOT_CONFLICTS: [Capabilities; 14] = [
    Capabilities::POSTCOPY_RAM,
    Capabilities::DIRTY_BITMAPS,
    Capabilities::POSTCOPY_BLOCKTIME,
    Capabilities::LATE_BLOCK_ACTIVATE,
    Capabilities::RETURN_PATH,
    Capabilities::MULTIFD,
    Capabilities::PAUSE_BEFORE_SWITCHOVER,
    Capabilities::AUTO_CONVERGE,
    Capabilities::RELEASE_RAM,
    Capabilities::RDMA_PIN_ALL,
    Capabilities::XBZRLE,
    Capabilities::X_COLO,
    Capabilities::VALIDATE_UUID,
    Capabilities::ZERO_COPY_SEND,
];

impl Capabilities {
    /// The capabilities recorded in the file's configuration section (`x-ignore-shared` and
    /// `mapped-ram`); the loader compares exactly these (rule 26).
    pub const FILE_LISTED: Self = Self::X_IGNORE_SHARED.union(Self::MAPPED_RAM);

    /// QEMU's name of a single capability (`"mapped-ram"`, `"x-ignore-shared"`, ...);
    /// `None` unless `self` is exactly one known flag.
    pub fn qemu_name(self) -> Option<&'static str> {
        QAPI_TABLE
            .iter()
            .find(|(flag, _)| *flag == self)
            .map(|(_, name)| *name)
    }

    /// The capability QEMU calls `name` (exact, case-sensitive match), if any.
    pub fn from_qemu_name(name: &str) -> Option<Self> {
        QAPI_TABLE
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(flag, _)| *flag)
    }

    /// The set flags one by one, in QAPI enum order (the order QEMU writes capabilities into
    /// the configuration section: `x-ignore-shared` before `mapped-ram`). Unknown bits are
    /// skipped.
    pub fn iter_qapi_order(self) -> impl Iterator<Item = Capabilities> {
        QAPI_TABLE
            .iter()
            .map(|(flag, _)| *flag)
            .filter(move |flag| self.contains(*flag))
    }

    /// The part of `self` that QEMU records in the file ([`Capabilities::FILE_LISTED`]).
    pub fn file_listed(self) -> Self {
        self.intersection(Self::FILE_LISTED)
    }
}

/// Comma-separated QEMU names in QAPI order (`"multifd, mapped-ram"`), `"(none)"` when empty.
impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for flag in self.iter_qapi_order() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(flag.qemu_name().unwrap_or("?"))?;
        }
        let unknown = self.bits() & !Self::all().bits();
        if unknown != 0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{unknown:#x}")?;
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Capabilities {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "Capabilities({=u32:#x})", self.bits());
    }
}

/// QEMU's `multifd-compression` parameter (`MultiFDCompression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Compression {
    /// `none` (the default).
    #[default]
    None,
    /// `zlib`.
    Zlib,
    /// `zstd`.
    Zstd,
    /// `qpl` (Intel In-Memory Analytics Accelerator).
    Qpl,
    /// `uadk` (HiSilicon accelerator).
    Uadk,
    /// `qatzip` (Intel QuickAssist).
    Qatzip,
}

impl Compression {
    /// All values, in QAPI order.
    pub const ALL: [Compression; 6] = [
        Compression::None,
        Compression::Zlib,
        Compression::Zstd,
        Compression::Qpl,
        Compression::Uadk,
        Compression::Qatzip,
    ];

    /// QEMU's name (`"none"`, `"zlib"`, ...).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
            Compression::Qpl => "qpl",
            Compression::Uadk => "uadk",
            Compression::Qatzip => "qatzip",
        }
    }

    /// The value QEMU calls `name`, if any.
    pub fn from_qemu_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.qemu_name() == name)
    }

    /// Whether this is anything but `none`.
    pub fn is_compressed(self) -> bool {
        self != Compression::None
    }
}

/// QEMU's `zero-page-detection` parameter (rule 23; no error rule depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZeroPageDetection {
    /// `none`: zero pages are written as data.
    None,
    /// `legacy`: the migration thread tests each page.
    Legacy,
    /// `multifd` (the default): multifd channels test pages; without multifd like `legacy`.
    #[default]
    Multifd,
}

impl ZeroPageDetection {
    /// QEMU's name (`"none"`, `"legacy"`, `"multifd"`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            ZeroPageDetection::None => "none",
            ZeroPageDetection::Legacy => "legacy",
            ZeroPageDetection::Multifd => "multifd",
        }
    }
}

/// The migration parameters the rules look at, as they are in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Parameters {
    /// `multifd-channels` (QAPI `uint8`, QEMU accepts 1..=255; default 2).
    pub multifd_channels: u8,
    /// `multifd-compression` (default `none`).
    pub multifd_compression: Compression,
    /// Whether `tls-creds` is non-empty (QEMU's `migrate_tls()`).
    pub tls: bool,
    /// `direct-io` as set (default false); see [`effective_direct_io`] for whether it is used.
    pub direct_io: bool,
    /// `zero-page-detection` (default `multifd`).
    pub zero_page_detection: ZeroPageDetection,
}

impl Default for Parameters {
    /// QEMU 10.0's defaults: 2 channels, no compression, no TLS, no direct-io, `multifd`
    /// zero-page detection.
    fn default() -> Self {
        Parameters {
            multifd_channels: 2,
            multifd_compression: Compression::None,
            tls: false,
            direct_io: false,
            zero_page_detection: ZeroPageDetection::Multifd,
        }
    }
}

/// One `migrate-set-parameters` command: `Some` for each parameter it sets.
///
/// `multifd_channels` is wider than QEMU's `uint8` so that out-of-range requests (0, 256, ...)
/// can be represented and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ParamUpdate {
    /// New `multifd-channels`.
    pub multifd_channels: Option<u32>,
    /// New `multifd-compression`.
    pub multifd_compression: Option<Compression>,
    /// New `tls-creds`: `Some(true)` for a non-empty id, `Some(false)` for `""`.
    pub tls: Option<bool>,
    /// New `direct-io`.
    pub direct_io: Option<bool>,
    /// New `zero-page-detection`.
    pub zero_page_detection: Option<ZeroPageDetection>,
}

impl ParamUpdate {
    /// An update that sets every parameter to the value in `params`.
    pub fn from_parameters(params: &Parameters) -> Self {
        ParamUpdate {
            multifd_channels: Some(u32::from(params.multifd_channels)),
            multifd_compression: Some(params.multifd_compression),
            tls: Some(params.tls),
            direct_io: Some(params.direct_io),
            zero_page_detection: Some(params.zero_page_detection),
        }
    }

    /// Whether the update sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == ParamUpdate::default()
    }
}

/// The kind of socket of a socket transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SocketKind {
    /// `tcp:HOST:PORT`.
    Tcp,
    /// `unix:PATH`.
    Unix,
    /// `vsock:CID:PORT`.
    Vsock,
}

/// The migration transport (the main channel's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Transport {
    /// `file:PATH[,offset=N]`, including `file:/dev/fdset/ID` (QEMU opens it by path, so it
    /// can open it again for the multifd channels).
    File {
        /// The `offset=` prefix, if given.
        offset: Option<u64>,
    },
    /// `fd:NAME` — not seekable for QEMU's checks even if the descriptor is a file (rule 16).
    Fd,
    /// A socket: `tcp:`, `unix:` or `vsock:`.
    Socket(SocketKind),
    /// `exec:CMD`.
    Exec,
    /// `rdma:HOST:PORT`.
    Rdma,
}

impl Transport {
    /// The URI scheme (`"file"`, `"fd"`, `"tcp"`, `"unix"`, `"vsock"`, `"exec"`, `"rdma"`).
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::File { .. } => "file",
            Transport::Fd => "fd",
            Transport::Socket(SocketKind::Tcp) => "tcp",
            Transport::Socket(SocketKind::Unix) => "unix",
            Transport::Socket(SocketKind::Vsock) => "vsock",
            Transport::Exec => "exec",
            Transport::Rdma => "rdma",
        }
    }

    /// QEMU's `transport_supports_seeking`: only `file:`.
    pub fn supports_seeking(&self) -> bool {
        matches!(self, Transport::File { .. })
    }

    /// QEMU's `transport_supports_multi_channels`: sockets (tcp, unix, vsock) always, `file:`
    /// only when `mapped-ram` is on, anything else never.
    pub fn supports_multi_channels(&self, caps: Capabilities) -> bool {
        match self {
            Transport::Socket(_) => true,
            Transport::File { .. } => caps.contains(Capabilities::MAPPED_RAM),
            Transport::Fd | Transport::Exec | Transport::Rdma => false,
        }
    }

    /// QEMU's `transport_supports_extra_fds`: only `file:` (QEMU can open it again).
    pub fn supports_extra_fds(&self) -> bool {
        matches!(self, Transport::File { .. })
    }
}

/// Facts about the host (or QEMU build) the parameter check depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Host {
    /// Whether O_DIRECT exists on this build/host (QEMU's `qemu_has_direct_io()`, rule 11).
    pub o_direct_supported: bool,
}

impl Default for Host {
    /// A Linux host: O_DIRECT is available.
    fn default() -> Self {
        Host {
            o_direct_supported: true,
        }
    }
}

/// Whether O_DIRECT is really used (QEMU's `migrate_direct_io()`): `direct-io` is set and both
/// `mapped-ram` and `multifd` are on. Otherwise `direct-io` is silently ignored (rule 21).
pub fn effective_direct_io(caps: Capabilities, params: &Parameters) -> bool {
    params.direct_io && caps.contains(Capabilities::MAPPED_RAM | Capabilities::MULTIFD)
}

// ---------------------------------------------------------------------------------------------
// Errors of the three QEMU checkpoints.
// ---------------------------------------------------------------------------------------------

const ZERO_COPY_TEXT: &str =
    "Zero copy only available for non-compressed non-TLS multifd migration";

/// `migrate-set-capabilities` refused the capability set (QEMU's `migrate_caps_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CapsError {
    /// Rule 6: `postcopy-ram` with `x-ignore-shared`.
    PostcopyIgnoreShared,
    /// Rule 5: `postcopy-ram` with `multifd` (tested in the postcopy block, before rules 1/4).
    PostcopyMultifd,
    /// Rule 9: `background-snapshot` with the capability carried (the first conflicting one in
    /// QEMU's list order).
    BackgroundSnapshot(Capabilities),
    /// Rule 7: `zero-copy-send` without plain multifd (multifd off, xbzrle on, or the current
    /// `multifd-compression`/`tls-creds` set).
    ZeroCopy {
        /// The `multifd-compression` in effect.
        compression: Compression,
        /// Whether `tls-creds` is set.
        tls: bool,
    },
    /// `postcopy-preempt` without `postcopy-ram` (QEMU check not in the spec table).
    PostcopyPreemptNeedsPostcopyRam,
    /// `switchover-ack` without `return-path` (QEMU check not in the spec table).
    SwitchoverAckNeedsReturnPath,
    /// `dirty-limit` with `auto-converge` (QEMU check not in the spec table).
    DirtyLimitAutoConverge,
    /// Rule 4: `multifd` with `xbzrle`.
    MultifdXbzrle,
    /// Rule 1: `mapped-ram` with `xbzrle`.
    MappedRamXbzrle,
    /// Rule 2: `mapped-ram` with `postcopy-ram`.
    MappedRamPostcopy,
}

impl CapsError {
    /// The capabilities involved in the conflict.
    pub fn capabilities(&self) -> Capabilities {
        match self {
            CapsError::PostcopyIgnoreShared => {
                Capabilities::POSTCOPY_RAM | Capabilities::X_IGNORE_SHARED
            }
            CapsError::PostcopyMultifd => Capabilities::POSTCOPY_RAM | Capabilities::MULTIFD,
            CapsError::BackgroundSnapshot(cap) => Capabilities::BACKGROUND_SNAPSHOT | *cap,
            CapsError::ZeroCopy { .. } => Capabilities::ZERO_COPY_SEND,
            CapsError::PostcopyPreemptNeedsPostcopyRam => Capabilities::POSTCOPY_PREEMPT,
            CapsError::SwitchoverAckNeedsReturnPath => Capabilities::SWITCHOVER_ACK,
            CapsError::DirtyLimitAutoConverge => {
                Capabilities::DIRTY_LIMIT | Capabilities::AUTO_CONVERGE
            }
            CapsError::MultifdXbzrle => Capabilities::MULTIFD | Capabilities::XBZRLE,
            CapsError::MappedRamXbzrle => Capabilities::MAPPED_RAM | Capabilities::XBZRLE,
            CapsError::MappedRamPostcopy => Capabilities::MAPPED_RAM | Capabilities::POSTCOPY_RAM,
        }
    }

    /// What to change to get past this error.
    pub fn remedy(&self) -> &'static str {
        match self {
            CapsError::PostcopyIgnoreShared => "turn off postcopy-ram or x-ignore-shared",
            CapsError::PostcopyMultifd => "turn off postcopy-ram or multifd",
            CapsError::BackgroundSnapshot(_) => {
                "turn off background-snapshot or the capability named"
            }
            CapsError::ZeroCopy { .. } => {
                "turn off zero-copy-send, or use it only with multifd and without xbzrle, \
                 multifd-compression or tls-creds"
            }
            CapsError::PostcopyPreemptNeedsPostcopyRam => {
                "turn on postcopy-ram too, or turn off postcopy-preempt"
            }
            CapsError::SwitchoverAckNeedsReturnPath => {
                "turn on return-path too, or turn off switchover-ack"
            }
            CapsError::DirtyLimitAutoConverge => "use only one of dirty-limit and auto-converge",
            CapsError::MultifdXbzrle => "turn off xbzrle (multifd cannot delta-encode pages)",
            CapsError::MappedRamXbzrle => {
                "turn off xbzrle (mapped-ram stores whole pages at fixed offsets)"
            }
            CapsError::MappedRamPostcopy => {
                "turn off postcopy-ram (a mapped-ram file is written by precopy only)"
            }
        }
    }
}

impl fmt::Display for CapsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapsError::PostcopyIgnoreShared => {
                f.write_str("Postcopy is not compatible with ignore-shared")
            }
            CapsError::PostcopyMultifd => {
                f.write_str("Postcopy is not yet compatible with multifd")
            }
            CapsError::BackgroundSnapshot(cap) => match cap.qemu_name() {
                Some(name) => write!(f, "Background-snapshot is not compatible with {name}"),
                None => write!(f, "Background-snapshot is not compatible with {cap}"),
            },
            CapsError::ZeroCopy { .. } => f.write_str(ZERO_COPY_TEXT),
            CapsError::PostcopyPreemptNeedsPostcopyRam => {
                f.write_str("Postcopy preempt requires postcopy-ram")
            }
            CapsError::SwitchoverAckNeedsReturnPath => {
                f.write_str("Capability 'switchover-ack' requires capability 'return-path'")
            }
            CapsError::DirtyLimitAutoConverge => f.write_str(
                "dirty-limit conflicts with auto-converge either of then available currently",
            ),
            CapsError::MultifdXbzrle => f.write_str("Multifd is not compatible with xbzrle"),
            CapsError::MappedRamXbzrle => {
                f.write_str("Mapped-ram migration is incompatible with xbzrle")
            }
            CapsError::MappedRamPostcopy => {
                f.write_str("Mapped-ram migration is incompatible with postcopy")
            }
        }
    }
}

impl core::error::Error for CapsError {}

/// `migrate-set-parameters` refused the update (QEMU's `migrate_params_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ParamsError {
    /// `multifd-channels` above 255: refused by QMP's input visitor before any migration
    /// check (the parameter is a QAPI `uint8`).
    MultifdChannelsNotUint8 {
        /// The value asked for.
        value: u32,
    },
    /// Rule 12: `multifd-channels` below 1.
    MultifdChannelsRange {
        /// The value asked for.
        value: u32,
    },
    /// Rule 13: `zero-copy-send` is on and the resulting `multifd-compression` is not `none`
    /// or the resulting `tls-creds` is non-empty.
    ZeroCopy {
        /// The resulting `multifd-compression`.
        compression: Compression,
        /// Whether the resulting `tls-creds` is non-empty.
        tls: bool,
    },
    /// Rule 10: `mapped-ram` is on and the parameters *already in effect* (not the new ones)
    /// have compression or TLS.
    MappedRamNeedsPlain {
        /// The `multifd-compression` in effect before the update.
        compression: Compression,
        /// Whether `tls-creds` was non-empty before the update.
        tls: bool,
    },
    /// Rule 11: `direct-io=true` on a build/host without O_DIRECT.
    NoDirectIo,
}

impl ParamsError {
    /// What to change to get past this error.
    pub fn remedy(&self) -> &'static str {
        match self {
            ParamsError::MultifdChannelsNotUint8 { .. }
            | ParamsError::MultifdChannelsRange { .. } => {
                "give multifd-channels a value between 1 and 255"
            }
            ParamsError::ZeroCopy { .. } => {
                "set multifd-compression to none and clear tls-creds, or turn off zero-copy-send"
            }
            ParamsError::MappedRamNeedsPlain { .. } => {
                "with mapped-ram on, multifd-compression must stay none and tls-creds empty; \
                 turn mapped-ram off, fix those two parameters, then turn it back on"
            }
            ParamsError::NoDirectIo => "set direct-io to false: this host has no O_DIRECT",
        }
    }
}

impl fmt::Display for ParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamsError::MultifdChannelsNotUint8 { .. } => {
                f.write_str("Parameter 'multifd-channels' expects uint8_t")
            }
            ParamsError::MultifdChannelsRange { .. } => {
                f.write_str("Parameter 'multifd_channels' expects a value between 1 and 255")
            }
            ParamsError::ZeroCopy { .. } => f.write_str(ZERO_COPY_TEXT),
            ParamsError::MappedRamNeedsPlain { .. } => f.write_str(
                "Mapped-ram only available for non-compressed non-TLS multifd migration",
            ),
            ParamsError::NoDirectIo => f.write_str("No build-time support for direct-io"),
        }
    }
}

impl core::error::Error for ParamsError {}

/// `migrate` / `migrate-incoming` refused to start (QEMU's `migration_transport_compatible`
/// and `migrate_prepare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MigrateError {
    /// Rule 16: `mapped-ram` needs `file:`.
    SeekableTransport {
        /// The transport given.
        transport: Transport,
    },
    /// Rule 17: `multifd`/`postcopy-preempt` need a multi-channel transport (`file:` only
    /// counts with `mapped-ram`).
    MultiChannelTransport {
        /// The transport given.
        transport: Transport,
    },
    /// Rule 18: effective direct-io with multifd needs a transport QEMU can open again.
    /// Unreachable in practice: rule 16 fires first.
    ExtraFds {
        /// The transport given.
        transport: Transport,
    },
    /// Rule 14: `mapped-ram` with `tls-creds` set (outgoing only).
    MappedRamTls,
    /// Rule 15: `mapped-ram` with `multifd-compression` (outgoing only).
    MappedRamCompression {
        /// The compression in effect.
        compression: Compression,
    },
}

impl MigrateError {
    /// What to change to get past this error.
    pub fn remedy(&self) -> &'static str {
        match self {
            MigrateError::SeekableTransport { .. } => {
                "migrate to a file: URI, or turn off mapped-ram"
            }
            MigrateError::MultiChannelTransport { .. } => {
                "use a tcp:, unix: or vsock: URI (or file: with mapped-ram on), or turn off \
                 multifd and postcopy-preempt"
            }
            MigrateError::ExtraFds { .. } => "use a file: URI, or set direct-io to false",
            MigrateError::MappedRamTls => {
                "clear tls-creds: a mapped-ram file cannot be TLS-encrypted"
            }
            MigrateError::MappedRamCompression { .. } => {
                "set multifd-compression to none: mapped-ram stores raw pages at fixed offsets"
            }
        }
    }
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::SeekableTransport { .. } => {
                f.write_str("Migration requires seekable transport (e.g. file)")
            }
            MigrateError::MultiChannelTransport { .. } => {
                f.write_str("Migration requires multi-channel URIs (e.g. tcp)")
            }
            MigrateError::ExtraFds { .. } => {
                f.write_str("Migration requires a transport that allows for extra fds (e.g. file)")
            }
            MigrateError::MappedRamTls => f.write_str("Cannot use TLS with mapped-ram"),
            MigrateError::MappedRamCompression { .. } => {
                f.write_str("Cannot use compression with mapped-ram")
            }
        }
    }
}

impl core::error::Error for MigrateError {}

// ---------------------------------------------------------------------------------------------
// The three QEMU checkpoints.
// ---------------------------------------------------------------------------------------------

/// QEMU's `migrate_caps_check` for `migrate-set-capabilities`.
///
/// `new` is the whole capability set as it would be after the command (the old set with the
/// command's changes applied); `params` are the parameters in effect (rule 7 reads
/// `multifd-compression` and `tls-creds` from them). Order, as in QEMU 10.0: the postcopy block
/// (6, 5), background-snapshot (9), zero-copy-send (7), postcopy-preempt, switchover-ack,
/// dirty-limit, multifd (4), mapped-ram (1, 2).
pub fn check_capabilities(new: Capabilities, params: &Parameters) -> Result<(), CapsError> {
    if new.contains(Capabilities::POSTCOPY_RAM) {
        if new.contains(Capabilities::X_IGNORE_SHARED) {
            return Err(CapsError::PostcopyIgnoreShared);
        }
        if new.contains(Capabilities::MULTIFD) {
            return Err(CapsError::PostcopyMultifd);
        }
    }

    if new.contains(Capabilities::BACKGROUND_SNAPSHOT) {
        if let Some(cap) = BACKGROUND_SNAPSHOT_CONFLICTS
            .iter()
            .find(|cap| new.contains(**cap))
        {
            return Err(CapsError::BackgroundSnapshot(*cap));
        }
    }

    if new.contains(Capabilities::ZERO_COPY_SEND)
        && (!new.contains(Capabilities::MULTIFD)
            || new.contains(Capabilities::XBZRLE)
            || params.multifd_compression.is_compressed()
            || params.tls)
    {
        return Err(CapsError::ZeroCopy {
            compression: params.multifd_compression,
            tls: params.tls,
        });
    }

    if new.contains(Capabilities::POSTCOPY_PREEMPT) && !new.contains(Capabilities::POSTCOPY_RAM) {
        return Err(CapsError::PostcopyPreemptNeedsPostcopyRam);
    }

    if new.contains(Capabilities::SWITCHOVER_ACK) && !new.contains(Capabilities::RETURN_PATH) {
        return Err(CapsError::SwitchoverAckNeedsReturnPath);
    }

    if new.contains(Capabilities::DIRTY_LIMIT | Capabilities::AUTO_CONVERGE) {
        return Err(CapsError::DirtyLimitAutoConverge);
    }

    if new.contains(Capabilities::MULTIFD | Capabilities::XBZRLE) {
        return Err(CapsError::MultifdXbzrle);
    }

    if new.contains(Capabilities::MAPPED_RAM) {
        if new.contains(Capabilities::XBZRLE) {
            return Err(CapsError::MappedRamXbzrle);
        }
        if new.contains(Capabilities::POSTCOPY_RAM) {
            return Err(CapsError::MappedRamPostcopy);
        }
    }

    Ok(())
}

/// QEMU's `migrate-set-parameters`: merges `update` into `current` and checks the result like
/// `migrate_params_check`, returning the parameters that would then be in effect.
///
/// Order, as in QEMU 10.0: the QMP `uint8` range of `multifd-channels` (before anything else),
/// rule 12 and rule 13 on the merged values, rule 10 on the *current* values (the quirk), rule
/// 11 on the merged `direct-io`.
pub fn check_parameters(
    caps: Capabilities,
    current: &Parameters,
    update: &ParamUpdate,
    host: &Host,
) -> Result<Parameters, ParamsError> {
    let multifd_channels = match update.multifd_channels {
        None => current.multifd_channels,
        Some(value) => {
            let channels =
                u8::try_from(value).map_err(|_| ParamsError::MultifdChannelsNotUint8 { value })?;
            if channels < 1 {
                return Err(ParamsError::MultifdChannelsRange { value });
            }
            channels
        }
    };
    let merged = Parameters {
        multifd_channels,
        multifd_compression: update
            .multifd_compression
            .unwrap_or(current.multifd_compression),
        tls: update.tls.unwrap_or(current.tls),
        direct_io: update.direct_io.unwrap_or(current.direct_io),
        zero_page_detection: update
            .zero_page_detection
            .unwrap_or(current.zero_page_detection),
    };

    // The current value is always valid, but a caller may hand us anything.
    if merged.multifd_channels < 1 {
        return Err(ParamsError::MultifdChannelsRange { value: 0 });
    }

    if caps.contains(Capabilities::ZERO_COPY_SEND)
        && (merged.multifd_compression.is_compressed() || merged.tls)
    {
        return Err(ParamsError::ZeroCopy {
            compression: merged.multifd_compression,
            tls: merged.tls,
        });
    }

    if caps.contains(Capabilities::MAPPED_RAM)
        && (current.multifd_compression.is_compressed() || current.tls)
    {
        return Err(ParamsError::MappedRamNeedsPlain {
            compression: current.multifd_compression,
            tls: current.tls,
        });
    }

    if merged.direct_io && !host.o_direct_supported {
        return Err(ParamsError::NoDirectIo);
    }

    Ok(merged)
}

/// QEMU's checks when an outgoing `migrate` starts.
///
/// Order, as in QEMU 10.0's `qmp_migrate`: the transport checks of
/// `migration_channels_and_transport_compatible` (16, 17, 18) run before `migrate_prepare`
/// (14, 15). So `mapped-ram` with TLS to `unix:` reports the transport, not TLS.
pub fn check_migrate(
    caps: Capabilities,
    params: &Parameters,
    transport: &Transport,
) -> Result<(), MigrateError> {
    check_migrate_incoming(caps, params, transport)?;

    if caps.contains(Capabilities::MAPPED_RAM) {
        if params.tls {
            return Err(MigrateError::MappedRamTls);
        }
        if params.multifd_compression.is_compressed() {
            return Err(MigrateError::MappedRamCompression {
                compression: params.multifd_compression,
            });
        }
    }
    Ok(())
}

/// QEMU's checks when `migrate-incoming` starts: only the transport checks (16, 17, 18);
/// rules 14 and 15 belong to the outgoing side.
pub fn check_migrate_incoming(
    caps: Capabilities,
    params: &Parameters,
    transport: &Transport,
) -> Result<(), MigrateError> {
    let transport = *transport;
    if caps.contains(Capabilities::MAPPED_RAM) && !transport.supports_seeking() {
        return Err(MigrateError::SeekableTransport { transport });
    }
    if caps.intersects(Capabilities::MULTIFD | Capabilities::POSTCOPY_PREEMPT)
        && !transport.supports_multi_channels(caps)
    {
        return Err(MigrateError::MultiChannelTransport { transport });
    }
    if caps.contains(Capabilities::MULTIFD)
        && effective_direct_io(caps, params)
        && !transport.supports_extra_fds()
    {
        return Err(MigrateError::ExtraFds { transport });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strict mode for our engine.
// ---------------------------------------------------------------------------------------------

/// The smallest page size our engine accepts (x86-64 and aarch64 `virt` target pages).
pub const MIN_PAGE_SIZE: u64 = 4096;

/// What the engine should do about O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DirectIo {
    /// Never use O_DIRECT.
    Off,
    /// Use O_DIRECT for the page data; refuse any configuration in which it would not be used.
    On,
    /// Use O_DIRECT when the configuration and host allow it, otherwise not, without error.
    #[default]
    Auto,
}

/// How the engine gets at the migration file (meaningful for [`Transport::File`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FileAccess {
    /// The engine opens the file by path and can open it again for the page channels.
    #[default]
    Path,
    /// The caller handed over at least two separately opened descriptors of the file (not
    /// `dup()`s of each other; like a QEMU fdset with two entries).
    SeparateFds,
    /// The caller handed over a single descriptor (or `dup()`s of one): every channel shares
    /// one open file description and so one set of status flags.
    SingleFd,
}

/// Our engine's configuration, checked by [`check_strict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EngineConfig {
    /// The QEMU capabilities the file/stream is produced or consumed with.
    pub capabilities: Capabilities,
    /// Number of multifd page channels (QEMU's `multifd-channels`); must be 1 without multifd.
    pub channels: u32,
    /// `multifd-compression`.
    pub compression: Compression,
    /// Whether TLS credentials are configured.
    pub tls: bool,
    /// `zero-page-detection`.
    pub zero_page_detection: ZeroPageDetection,
    /// Target page size in bytes: a power of two, at least [`MIN_PAGE_SIZE`].
    pub page_size: u64,
    /// O_DIRECT policy.
    pub direct_io: DirectIo,
    /// Where the migration goes to / comes from.
    pub transport: Transport,
    /// How the file is reached (for [`Transport::File`]).
    pub file_access: FileAccess,
}

impl EngineConfig {
    /// `mapped-ram` + `multifd` with QEMU's default 2 channels to `file:` (opened by path, with
    /// the given `offset=`), 4 KiB pages, O_DIRECT when possible.
    pub fn mapped_ram_file(offset: Option<u64>) -> Self {
        EngineConfig {
            capabilities: Capabilities::MAPPED_RAM | Capabilities::MULTIFD,
            channels: 2,
            compression: Compression::None,
            tls: false,
            zero_page_detection: ZeroPageDetection::Multifd,
            page_size: MIN_PAGE_SIZE,
            direct_io: DirectIo::Auto,
            transport: Transport::File { offset },
            file_access: FileAccess::Path,
        }
    }

    /// Whether a second, separately opened descriptor of the migration file can be had (file
    /// transport reached by path or through separately opened descriptors).
    pub fn second_fd_available(&self) -> bool {
        matches!(self.transport, Transport::File { .. })
            && matches!(self.file_access, FileAccess::Path | FileAccess::SeparateFds)
    }

    /// Whether O_DIRECT would be used: for [`DirectIo::On`] the request itself (which
    /// [`check_strict`] then validates), for [`DirectIo::Auto`] whether `mapped-ram`,
    /// `multifd`, the host and a second descriptor all allow it.
    pub fn resolve_direct_io(&self, host: &Host) -> bool {
        match self.direct_io {
            DirectIo::Off => false,
            DirectIo::On => true,
            DirectIo::Auto => {
                self.capabilities
                    .contains(Capabilities::MAPPED_RAM | Capabilities::MULTIFD)
                    && host.o_direct_supported
                    && self.second_fd_available()
            }
        }
    }
}

/// [`check_strict`] refused the engine configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StrictError {
    /// The page size is not a power of two of at least [`MIN_PAGE_SIZE`].
    PageSize {
        /// The page size given.
        page_size: u64,
    },
    /// The channel count is outside 1..=255.
    Channels {
        /// The count given.
        channels: u32,
    },
    /// QEMU's `migrate-set-capabilities` would refuse this.
    Caps(CapsError),
    /// QEMU's `migrate-set-parameters` would refuse this.
    Params(ParamsError),
    /// QEMU's `migrate` would refuse this.
    Migrate(MigrateError),
    /// `direct-io` on without `mapped-ram`: QEMU would silently not use O_DIRECT.
    DirectIoWithoutMappedRam,
    /// `direct-io` on without `multifd`: QEMU would silently not use O_DIRECT.
    DirectIoWithoutMultifd,
    /// `direct-io` on, but no second, separately opened descriptor can be had for the
    /// O_DIRECT page I/O.
    DirectIoNeedsSecondFd {
        /// The transport given.
        transport: Transport,
        /// How the file is reached.
        file_access: FileAccess,
    },
    /// More than one channel without `multifd`: QEMU would silently use only the main channel.
    ChannelsWithoutMultifd {
        /// The count given.
        channels: u32,
    },
    /// `multifd-compression` without `multifd`: QEMU would silently not compress.
    CompressionWithoutMultifd {
        /// The compression given.
        compression: Compression,
    },
    /// `zero-copy-send` with `mapped-ram`: accepted by QEMU but without effect on positional
    /// file writes.
    ZeroCopyHasNoEffect,
    /// `x-ignore-shared` with `mapped-ram`: QEMU 10.x writes a file its own loader rejects
    /// (rule 25).
    IgnoreSharedWithMappedRam,
    /// `return-path` to a `file:`: not checked by QEMU, but the migration fails once running
    /// (rule 24).
    ReturnPathWithFile,
}

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrictError::PageSize { page_size } => write!(
                f,
                "page size {page_size} is not a power of two of at least {MIN_PAGE_SIZE} bytes; \
                 use the guest's target page size (4096 on x86-64 and aarch64 virt)"
            ),
            StrictError::Channels { channels } => write!(
                f,
                "{channels} channels requested, but QEMU's multifd-channels is a value between \
                 1 and 255; choose a channel count in that range"
            ),
            StrictError::Caps(e) => {
                write!(
                    f,
                    "{e} (QEMU 10.0 refuses this capability set); {}",
                    e.remedy()
                )
            }
            StrictError::Params(e) => {
                write!(
                    f,
                    "{e} (QEMU 10.0 refuses these parameters); {}",
                    e.remedy()
                )
            }
            StrictError::Migrate(e) => {
                write!(
                    f,
                    "{e} (QEMU 10.0 refuses to start this migration); {}",
                    e.remedy()
                )
            }
            StrictError::DirectIoWithoutMappedRam => f.write_str(
                "direct-io would have no effect without mapped-ram (QEMU silently ignores it: \
                 only mapped-ram page data is aligned for O_DIRECT); turn on mapped-ram, or set \
                 direct-io to off or auto",
            ),
            StrictError::DirectIoWithoutMultifd => f.write_str(
                "direct-io would have no effect without multifd (QEMU silently ignores it: only \
                 the multifd channels open the file with O_DIRECT); turn on multifd, or set \
                 direct-io to off or auto",
            ),
            StrictError::DirectIoNeedsSecondFd {
                transport,
                file_access,
            } => {
                let how = match (transport, file_access) {
                    (Transport::File { .. }, FileAccess::SingleFd) => "a single file descriptor",
                    (Transport::File { .. }, _) => "the file",
                    _ => "this transport",
                };
                write!(
                    f,
                    "direct-io needs a second, separately opened descriptor of the migration \
                     file for the O_DIRECT page I/O, and {} ({}:) cannot provide one (O_DIRECT \
                     belongs to the open file description, so a dup() will not do); migrate to \
                     a file: opened by path, pass two separately opened descriptors, or set \
                     direct-io to off or auto",
                    how,
                    transport.scheme()
                )
            }
            StrictError::ChannelsWithoutMultifd { channels } => write!(
                f,
                "{channels} channels requested but the multifd capability is off, so QEMU \
                 would silently use the main channel only; turn on multifd or set the channel \
                 count to 1"
            ),
            StrictError::CompressionWithoutMultifd { compression } => write!(
                f,
                "multifd-compression {} would have no effect without multifd (QEMU silently \
                 ignores it); turn on multifd or set multifd-compression to none",
                compression.qemu_name()
            ),
            StrictError::ZeroCopyHasNoEffect => f.write_str(
                "zero-copy-send would have no effect with mapped-ram (pages are written with \
                 positional file writes, not socket sends); turn off zero-copy-send",
            ),
            StrictError::IgnoreSharedWithMappedRam => f.write_str(
                "x-ignore-shared with mapped-ram makes QEMU 10.x write a file that its own \
                 loader rejects; turn off x-ignore-shared",
            ),
            StrictError::ReturnPathWithFile => f.write_str(
                "return-path needs a channel back from the destination, which a file: \
                 transport does not have (QEMU fails mid-migration with \"Unable to read from \
                 file: Bad file descriptor\"); turn off return-path",
            ),
        }
    }
}

impl core::error::Error for StrictError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            StrictError::Caps(e) => Some(e),
            StrictError::Params(e) => Some(e),
            StrictError::Migrate(e) => Some(e),
            _ => None,
        }
    }
}

impl From<CapsError> for StrictError {
    fn from(e: CapsError) -> Self {
        StrictError::Caps(e)
    }
}

impl From<ParamsError> for StrictError {
    fn from(e: ParamsError) -> Self {
        StrictError::Params(e)
    }
}

impl From<MigrateError> for StrictError {
    fn from(e: MigrateError) -> Self {
        StrictError::Migrate(e)
    }
}

/// Checks our engine's configuration strictly and returns the QEMU parameters to use
/// (with `direct_io` resolved: true exactly when O_DIRECT will be used).
///
/// In order: the page size and channel count; QEMU's three checkpoints, run so that the
/// outcome does not depend on the order a QEMU user would have set things in (the capability
/// check sees the final parameters, and the parameter check treats them as already in effect,
/// so rule 10 applies in full); then what QEMU accepts but ignores or fails on later:
/// `direct-io` without `mapped-ram` or `multifd` or a second descriptor, extra channels or
/// compression without `multifd`, `zero-copy-send`, `x-ignore-shared` or `return-path` with
/// `mapped-ram`/`file:`.
///
/// If this returns `Ok(params)`, then [`check_capabilities`], [`check_parameters`] (with
/// `params` as current and as update) and [`check_migrate`] all accept `params`.
pub fn check_strict(cfg: &EngineConfig, host: &Host) -> Result<Parameters, StrictError> {
    if !cfg.page_size.is_power_of_two() || cfg.page_size < MIN_PAGE_SIZE {
        return Err(StrictError::PageSize {
            page_size: cfg.page_size,
        });
    }
    let multifd_channels = match u8::try_from(cfg.channels) {
        Ok(n) if n >= 1 => n,
        _ => {
            return Err(StrictError::Channels {
                channels: cfg.channels,
            })
        }
    };

    let caps = cfg.capabilities;
    let wanted = Parameters {
        multifd_channels,
        multifd_compression: cfg.compression,
        tls: cfg.tls,
        direct_io: cfg.resolve_direct_io(host),
        zero_page_detection: cfg.zero_page_detection,
    };

    check_capabilities(caps, &wanted)?;
    let params = check_parameters(caps, &wanted, &ParamUpdate::from_parameters(&wanted), host)?;
    check_migrate(caps, &params, &cfg.transport)?;

    let mapped_ram = caps.contains(Capabilities::MAPPED_RAM);
    let multifd = caps.contains(Capabilities::MULTIFD);
    if cfg.direct_io == DirectIo::On {
        if !mapped_ram {
            return Err(StrictError::DirectIoWithoutMappedRam);
        }
        if !multifd {
            return Err(StrictError::DirectIoWithoutMultifd);
        }
        if !cfg.second_fd_available() {
            return Err(StrictError::DirectIoNeedsSecondFd {
                transport: cfg.transport,
                file_access: cfg.file_access,
            });
        }
    }
    if !multifd && cfg.channels > 1 {
        return Err(StrictError::ChannelsWithoutMultifd {
            channels: cfg.channels,
        });
    }
    if !multifd && cfg.compression.is_compressed() {
        return Err(StrictError::CompressionWithoutMultifd {
            compression: cfg.compression,
        });
    }
    if mapped_ram && caps.contains(Capabilities::ZERO_COPY_SEND) {
        return Err(StrictError::ZeroCopyHasNoEffect);
    }
    if mapped_ram && caps.contains(Capabilities::X_IGNORE_SHARED) {
        return Err(StrictError::IgnoreSharedWithMappedRam);
    }
    if caps.contains(Capabilities::RETURN_PATH) && matches!(cfg.transport, Transport::File { .. }) {
        return Err(StrictError::ReturnPathWithFile);
    }

    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MR: Capabilities = Capabilities::MAPPED_RAM;
    const MF: Capabilities = Capabilities::MULTIFD;
    const XB: Capabilities = Capabilities::XBZRLE;
    const PC: Capabilities = Capabilities::POSTCOPY_RAM;
    const PP: Capabilities = Capabilities::POSTCOPY_PREEMPT;
    const XIS: Capabilities = Capabilities::X_IGNORE_SHARED;
    const ZC: Capabilities = Capabilities::ZERO_COPY_SEND;
    const BS: Capabilities = Capabilities::BACKGROUND_SNAPSHOT;
    const RP: Capabilities = Capabilities::RETURN_PATH;
    const NONE: Capabilities = Capabilities::empty();

    const FILE: Transport = Transport::File { offset: None };
    const FILE_OFF: Transport = Transport::File {
        offset: Some(0x1000),
    };
    const TCP: Transport = Transport::Socket(SocketKind::Tcp);
    const UNIX: Transport = Transport::Socket(SocketKind::Unix);
    const VSOCK: Transport = Transport::Socket(SocketKind::Vsock);
    const FD: Transport = Transport::Fd;
    const EXEC: Transport = Transport::Exec;
    const RDMA: Transport = Transport::Rdma;

    const HOST: Host = Host {
        o_direct_supported: true,
    };
    const NO_ODIRECT: Host = Host {
        o_direct_supported: false,
    };

    const ZLIB: Compression = Compression::Zlib;
    const ZSTD: Compression = Compression::Zstd;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Verdict {
        Ok,
        Caps(CapsError),
        Params(ParamsError),
        Migrate(MigrateError),
    }

    /// One scenario: `params` are in effect, then `caps` are set (checkpoint caps), then
    /// optionally `update` is set (checkpoint params), then optionally `migrate` to `transport`.
    struct Row {
        name: &'static str,
        caps: Capabilities,
        params: Parameters,
        update: Option<ParamUpdate>,
        transport: Option<Transport>,
        host: Host,
        expect: Verdict,
    }

    fn r() -> Row {
        Row {
            name: "",
            caps: NONE,
            params: Parameters::default(),
            update: None,
            transport: None,
            host: HOST,
            expect: Verdict::Ok,
        }
    }

    fn p() -> Parameters {
        Parameters::default()
    }

    fn comp(c: Compression) -> Parameters {
        Parameters {
            multifd_compression: c,
            ..p()
        }
    }

    fn tls() -> Parameters {
        Parameters { tls: true, ..p() }
    }

    fn dio() -> Parameters {
        Parameters {
            direct_io: true,
            ..p()
        }
    }

    fn u() -> ParamUpdate {
        ParamUpdate::default()
    }

    fn up_channels(n: u32) -> Option<ParamUpdate> {
        Some(ParamUpdate {
            multifd_channels: Some(n),
            ..u()
        })
    }

    fn up_comp(c: Compression) -> Option<ParamUpdate> {
        Some(ParamUpdate {
            multifd_compression: Some(c),
            ..u()
        })
    }

    fn up_tls() -> Option<ParamUpdate> {
        Some(ParamUpdate {
            tls: Some(true),
            ..u()
        })
    }

    fn up_dio(on: bool) -> Option<ParamUpdate> {
        Some(ParamUpdate {
            direct_io: Some(on),
            ..u()
        })
    }

    fn run_row(row: &Row) -> Verdict {
        if let Err(e) = check_capabilities(row.caps, &row.params) {
            return Verdict::Caps(e);
        }
        let params = match &row.update {
            None => row.params,
            Some(update) => match check_parameters(row.caps, &row.params, update, &row.host) {
                Ok(p) => p,
                Err(e) => return Verdict::Params(e),
            },
        };
        if let Some(t) = &row.transport {
            if let Err(e) = check_migrate(row.caps, &params, t) {
                return Verdict::Migrate(e);
            }
        }
        Verdict::Ok
    }

    #[rustfmt::skip]
    fn rows() -> Vec<Row> {
        use CapsError as C;
        use MigrateError as M;
        use ParamsError as P;
        use Verdict as V;
        let zc_plain = C::ZeroCopy { compression: Compression::None, tls: false };
        vec![
            // ---- rule 1
            Row { name: "r1 mapped-ram alone to file", caps: MR, transport: Some(FILE), ..r() },
            Row { name: "r1 xbzrle alone", caps: XB, ..r() },
            Row { name: "r1 mapped-ram+xbzrle", caps: MR | XB, expect: V::Caps(C::MappedRamXbzrle), ..r() },
            // ---- rule 2
            Row { name: "r2 postcopy alone", caps: PC, ..r() },
            Row { name: "r2 mapped-ram+postcopy", caps: MR | PC, expect: V::Caps(C::MappedRamPostcopy), ..r() },
            // ---- rule 4
            Row { name: "r4 multifd+xbzrle", caps: MF | XB, expect: V::Caps(C::MultifdXbzrle), ..r() },
            Row { name: "r4 before r1", caps: MR | MF | XB, expect: V::Caps(C::MultifdXbzrle), ..r() },
            // ---- rule 5
            Row { name: "r5 postcopy+multifd", caps: PC | MF, expect: V::Caps(C::PostcopyMultifd), ..r() },
            Row { name: "r5 before r2", caps: MR | MF | PC, expect: V::Caps(C::PostcopyMultifd), ..r() },
            Row { name: "r5 before r4", caps: PC | MF | XB, expect: V::Caps(C::PostcopyMultifd), ..r() },
            // ---- rule 6
            Row { name: "r6 postcopy+ignore-shared", caps: PC | XIS, expect: V::Caps(C::PostcopyIgnoreShared), ..r() },
            Row { name: "r6 before r5", caps: PC | XIS | MF, expect: V::Caps(C::PostcopyIgnoreShared), ..r() },
            Row { name: "r6/r25 ignore-shared+mapped-ram accepted", caps: XIS | MR, transport: Some(FILE), ..r() },
            // ---- rule 7
            Row { name: "r7 zero-copy alone", caps: ZC, expect: V::Caps(zc_plain), ..r() },
            Row { name: "r7 zero-copy+multifd", caps: ZC | MF, transport: Some(TCP), ..r() },
            Row { name: "r7 zero-copy+multifd+xbzrle (before r4)", caps: ZC | MF | XB, expect: V::Caps(zc_plain), ..r() },
            Row { name: "r7 zero-copy+multifd, zstd in effect", caps: ZC | MF, params: comp(ZSTD), expect: V::Caps(C::ZeroCopy { compression: ZSTD, tls: false }), ..r() },
            Row { name: "r7 zero-copy+multifd, tls in effect", caps: ZC | MF, params: tls(), expect: V::Caps(C::ZeroCopy { compression: Compression::None, tls: true }), ..r() },
            Row { name: "r7 mapped-ram+multifd+zero-copy accepted", caps: MR | MF | ZC, transport: Some(FILE), ..r() },
            // ---- rule 9
            Row { name: "r9 background-snapshot+multifd", caps: BS | MF, expect: V::Caps(C::BackgroundSnapshot(MF)), ..r() },
            Row { name: "r9 first in QEMU's list order", caps: BS | PC | Capabilities::DIRTY_BITMAPS, expect: V::Caps(C::BackgroundSnapshot(PC)), ..r() },
            Row { name: "r9 xbzrle listed before validate-uuid", caps: BS | Capabilities::VALIDATE_UUID | XB, expect: V::Caps(C::BackgroundSnapshot(XB)), ..r() },
            Row { name: "r9 before r7", caps: BS | ZC, expect: V::Caps(C::BackgroundSnapshot(ZC)), ..r() },
            Row { name: "r9 return-path", caps: BS | RP, expect: V::Caps(C::BackgroundSnapshot(RP)), ..r() },
            Row { name: "r9 mapped-ram+background-snapshot accepted", caps: BS | MR, transport: Some(FILE), ..r() },
            Row { name: "r9 events is fine", caps: BS | Capabilities::EVENTS, ..r() },
            // ---- further QEMU capability rules
            Row { name: "postcopy-preempt needs postcopy-ram", caps: PP, expect: V::Caps(C::PostcopyPreemptNeedsPostcopyRam), ..r() },
            Row { name: "switchover-ack needs return-path", caps: Capabilities::SWITCHOVER_ACK, expect: V::Caps(C::SwitchoverAckNeedsReturnPath), ..r() },
            Row { name: "dirty-limit vs auto-converge", caps: Capabilities::DIRTY_LIMIT | Capabilities::AUTO_CONVERGE, expect: V::Caps(C::DirtyLimitAutoConverge), ..r() },
            // ---- rule 12 (and QMP's uint8 range)
            Row { name: "r12 channels 0", caps: MF, update: up_channels(0), expect: V::Params(P::MultifdChannelsRange { value: 0 }), ..r() },
            Row { name: "r12 channels 256", caps: MF, update: up_channels(256), expect: V::Params(P::MultifdChannelsNotUint8 { value: 256 }), ..r() },
            Row { name: "r12 channels 1", caps: MF, update: up_channels(1), transport: Some(TCP), ..r() },
            Row { name: "r12 channels 255", caps: MF | MR, update: up_channels(255), transport: Some(FILE), ..r() },
            // ---- rule 10
            Row { name: "r10 quirk: zlib accepted after mapped-ram", caps: MR, update: up_comp(ZLIB), ..r() },
            Row { name: "r10 quirk: tls accepted after mapped-ram", caps: MR | MF, update: up_tls(), ..r() },
            Row { name: "r10 quirk: a later change fails", caps: MR, params: comp(ZLIB), update: up_channels(4), expect: V::Params(P::MappedRamNeedsPlain { compression: ZLIB, tls: false }), ..r() },
            Row { name: "r10 quirk: even going back to none fails", caps: MR, params: comp(ZLIB), update: up_comp(Compression::None), expect: V::Params(P::MappedRamNeedsPlain { compression: ZLIB, tls: false }), ..r() },
            Row { name: "r10 quirk: an empty update fails", caps: MR | MF, params: tls(), update: Some(u()), expect: V::Params(P::MappedRamNeedsPlain { compression: Compression::None, tls: true }), ..r() },
            Row { name: "r10 not without mapped-ram", caps: MF, params: comp(ZLIB), update: up_channels(4), transport: Some(TCP), ..r() },
            Row { name: "r10 quirk caught by r15 at migrate", caps: MR | MF, update: up_comp(ZLIB), transport: Some(FILE), expect: V::Migrate(M::MappedRamCompression { compression: ZLIB }), ..r() },
            Row { name: "r12 before r10", caps: MR, params: comp(ZLIB), update: up_channels(0), expect: V::Params(P::MultifdChannelsRange { value: 0 }), ..r() },
            // ---- rule 11
            Row { name: "r11 direct-io without O_DIRECT", caps: MR | MF, update: up_dio(true), host: NO_ODIRECT, expect: V::Params(P::NoDirectIo), ..r() },
            Row { name: "r11 direct-io with O_DIRECT", caps: MR | MF, update: up_dio(true), transport: Some(FILE), ..r() },
            Row { name: "r11 direct-io off without O_DIRECT", caps: MR | MF, update: up_dio(false), host: NO_ODIRECT, ..r() },
            Row { name: "r11 after r10", caps: MR, params: tls(), update: up_dio(true), host: NO_ODIRECT, expect: V::Params(P::MappedRamNeedsPlain { compression: Compression::None, tls: true }), ..r() },
            // ---- rule 13
            Row { name: "r13 zero-copy, then zlib", caps: ZC | MF, update: up_comp(ZLIB), expect: V::Params(P::ZeroCopy { compression: ZLIB, tls: false }), ..r() },
            Row { name: "r13 zero-copy, then tls", caps: ZC | MF, update: up_tls(), expect: V::Params(P::ZeroCopy { compression: Compression::None, tls: true }), ..r() },
            Row { name: "r13 before r10", caps: ZC | MF | MR, update: up_comp(ZSTD), expect: V::Params(P::ZeroCopy { compression: ZSTD, tls: false }), ..r() },
            // ---- rules 14 and 15
            Row { name: "r14 mapped-ram+tls", caps: MR, params: tls(), transport: Some(FILE), expect: V::Migrate(M::MappedRamTls), ..r() },
            Row { name: "r15 mapped-ram+zstd", caps: MR | MF, params: comp(ZSTD), transport: Some(FILE), expect: V::Migrate(M::MappedRamCompression { compression: ZSTD }), ..r() },
            Row { name: "r14 before r15", caps: MR, params: Parameters { tls: true, multifd_compression: Compression::Qatzip, ..p() }, transport: Some(FILE), expect: V::Migrate(M::MappedRamTls), ..r() },
            Row { name: "r14 not without mapped-ram", caps: MF, params: tls(), transport: Some(TCP), ..r() },
            // ---- rule 16
            Row { name: "r16 fd: rejected", caps: MR, transport: Some(FD), expect: V::Migrate(M::SeekableTransport { transport: FD }), ..r() },
            Row { name: "r16 unix: rejected", caps: MR, transport: Some(UNIX), expect: V::Migrate(M::SeekableTransport { transport: UNIX }), ..r() },
            Row { name: "r16 exec: rejected", caps: MR, transport: Some(EXEC), expect: V::Migrate(M::SeekableTransport { transport: EXEC }), ..r() },
            Row { name: "r16 tcp: rejected", caps: MR | MF, transport: Some(TCP), expect: V::Migrate(M::SeekableTransport { transport: TCP }), ..r() },
            Row { name: "r16 rdma: rejected", caps: MR, transport: Some(RDMA), expect: V::Migrate(M::SeekableTransport { transport: RDMA }), ..r() },
            Row { name: "r16 before r14", caps: MR, params: tls(), transport: Some(UNIX), expect: V::Migrate(M::SeekableTransport { transport: UNIX }), ..r() },
            Row { name: "r16 file with offset", caps: MR, transport: Some(FILE_OFF), ..r() },
            // ---- rule 17
            Row { name: "r17 multifd to file without mapped-ram", caps: MF, transport: Some(FILE), expect: V::Migrate(M::MultiChannelTransport { transport: FILE }), ..r() },
            Row { name: "r17 multifd to fd:", caps: MF, transport: Some(FD), expect: V::Migrate(M::MultiChannelTransport { transport: FD }), ..r() },
            Row { name: "r17 multifd to exec:", caps: MF, transport: Some(EXEC), expect: V::Migrate(M::MultiChannelTransport { transport: EXEC }), ..r() },
            Row { name: "r17 multifd to rdma:", caps: MF, transport: Some(RDMA), expect: V::Migrate(M::MultiChannelTransport { transport: RDMA }), ..r() },
            Row { name: "r17 postcopy-preempt to file", caps: PC | PP, transport: Some(FILE), expect: V::Migrate(M::MultiChannelTransport { transport: FILE }), ..r() },
            Row { name: "r17 multifd to unix:", caps: MF, transport: Some(UNIX), ..r() },
            Row { name: "r17 multifd to vsock:", caps: MF, transport: Some(VSOCK), ..r() },
            Row { name: "r17 mapped-ram+multifd to file", caps: MR | MF, transport: Some(FILE_OFF), ..r() },
            Row { name: "r17 before r14/r15", caps: MF, params: Parameters { tls: true, multifd_compression: ZLIB, ..p() }, transport: Some(EXEC), expect: V::Migrate(M::MultiChannelTransport { transport: EXEC }), ..r() },
            // ---- rule 18 (unreachable: rule 16 first) and rule 21
            Row { name: "r18 masked by r16", caps: MR | MF, params: dio(), transport: Some(UNIX), expect: V::Migrate(M::SeekableTransport { transport: UNIX }), ..r() },
            Row { name: "r21 direct-io without mapped-ram", caps: MF, params: dio(), transport: Some(TCP), ..r() },
            Row { name: "r21 direct-io without multifd", caps: MR, params: dio(), transport: Some(FILE), ..r() },
            Row { name: "r21 direct-io alone, to exec:", caps: NONE, update: up_dio(true), transport: Some(EXEC), ..r() },
            Row { name: "plain file: migration", caps: NONE, transport: Some(FILE), ..r() },
            Row { name: "plain fd: migration", caps: Capabilities::EVENTS, transport: Some(FD), ..r() },
        ]
    }

    #[test]
    fn qemu_rules_table() {
        let rows = rows();
        assert!(rows.len() >= 40, "only {} rows", rows.len());
        let mut failures = Vec::new();
        for row in &rows {
            let got = run_row(row);
            if got != row.expect {
                failures.push(format!(
                    "{}: expected {:?}, got {:?}",
                    row.name, row.expect, got
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn rule_10_quirk_sequence() {
        let caps = MR | MF;
        let start = Parameters::default();
        check_capabilities(caps, &start).unwrap();
        let zlib = check_parameters(caps, &start, &up_comp(ZLIB).unwrap(), &HOST)
            .expect("zlib is accepted: the check looks at the old value");
        assert_eq!(zlib.multifd_compression, ZLIB);
        let legacy = ParamUpdate {
            zero_page_detection: Some(ZeroPageDetection::Legacy),
            ..u()
        };
        for update in [
            up_channels(4).unwrap(),
            up_comp(Compression::None).unwrap(),
            legacy,
        ] {
            assert_eq!(
                check_parameters(caps, &zlib, &update, &HOST),
                Err(ParamsError::MappedRamNeedsPlain {
                    compression: ZLIB,
                    tls: false
                })
            );
        }
        assert_eq!(
            check_migrate(caps, &zlib, &FILE),
            Err(MigrateError::MappedRamCompression { compression: ZLIB })
        );
        // With mapped-ram off the parameters can be fixed, then mapped-ram turned on again.
        let fixed =
            check_parameters(MF, &zlib, &up_comp(Compression::None).unwrap(), &HOST).unwrap();
        check_capabilities(caps, &fixed).unwrap();
        check_migrate(caps, &fixed, &FILE).unwrap();
    }

    #[test]
    fn parameters_merge() {
        let cur = Parameters {
            multifd_channels: 8,
            ..p()
        };
        let update = ParamUpdate {
            direct_io: Some(true),
            zero_page_detection: Some(ZeroPageDetection::None),
            ..u()
        };
        let new = check_parameters(MR | MF, &cur, &update, &HOST).unwrap();
        assert_eq!(
            new,
            Parameters {
                multifd_channels: 8,
                multifd_compression: Compression::None,
                tls: false,
                direct_io: true,
                zero_page_detection: ZeroPageDetection::None,
            }
        );
        assert!(effective_direct_io(MR | MF, &new));
        assert!(!effective_direct_io(MR, &new));
        assert!(!effective_direct_io(MF, &new));
        assert!(!effective_direct_io(MR | MF, &p()));
        let all = ParamUpdate::from_parameters(&new);
        assert_eq!(check_parameters(NONE, &p(), &all, &HOST), Ok(new));
        assert!(u().is_empty());
        assert!(!ParamUpdate::from_parameters(&p()).is_empty());
        // A caller-made current value of 0 channels is refused too.
        let zero = Parameters {
            multifd_channels: 0,
            ..p()
        };
        assert_eq!(
            check_parameters(NONE, &zero, &u(), &HOST),
            Err(ParamsError::MultifdChannelsRange { value: 0 })
        );
    }

    #[rustfmt::skip]
    #[test]
    fn qemu_error_texts() {
        let none = Compression::None;
        let cases: Vec<(String, &str)> = vec![
            (CapsError::MappedRamXbzrle.to_string(), "Mapped-ram migration is incompatible with xbzrle"),
            (CapsError::MappedRamPostcopy.to_string(), "Mapped-ram migration is incompatible with postcopy"),
            (CapsError::MultifdXbzrle.to_string(), "Multifd is not compatible with xbzrle"),
            (CapsError::PostcopyMultifd.to_string(), "Postcopy is not yet compatible with multifd"),
            (CapsError::PostcopyIgnoreShared.to_string(), "Postcopy is not compatible with ignore-shared"),
            (CapsError::ZeroCopy { compression: none, tls: false }.to_string(), "Zero copy only available for non-compressed non-TLS multifd migration"),
            (CapsError::BackgroundSnapshot(MF).to_string(), "Background-snapshot is not compatible with multifd"),
            (CapsError::BackgroundSnapshot(Capabilities::VALIDATE_UUID).to_string(), "Background-snapshot is not compatible with validate-uuid"),
            (CapsError::BackgroundSnapshot(ZC).to_string(), "Background-snapshot is not compatible with zero-copy-send"),
            (CapsError::PostcopyPreemptNeedsPostcopyRam.to_string(), "Postcopy preempt requires postcopy-ram"),
            (ParamsError::MultifdChannelsRange { value: 0 }.to_string(), "Parameter 'multifd_channels' expects a value between 1 and 255"),
            (ParamsError::MultifdChannelsNotUint8 { value: 300 }.to_string(), "Parameter 'multifd-channels' expects uint8_t"),
            (ParamsError::MappedRamNeedsPlain { compression: ZLIB, tls: false }.to_string(), "Mapped-ram only available for non-compressed non-TLS multifd migration"),
            (ParamsError::NoDirectIo.to_string(), "No build-time support for direct-io"),
            (ParamsError::ZeroCopy { compression: ZLIB, tls: false }.to_string(), "Zero copy only available for non-compressed non-TLS multifd migration"),
            (MigrateError::MappedRamTls.to_string(), "Cannot use TLS with mapped-ram"),
            (MigrateError::MappedRamCompression { compression: ZSTD }.to_string(), "Cannot use compression with mapped-ram"),
            (MigrateError::SeekableTransport { transport: UNIX }.to_string(), "Migration requires seekable transport (e.g. file)"),
            (MigrateError::MultiChannelTransport { transport: FILE }.to_string(), "Migration requires multi-channel URIs (e.g. tcp)"),
            (MigrateError::ExtraFds { transport: TCP }.to_string(), "Migration requires a transport that allows for extra fds (e.g. file)"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn names_and_order() {
        let mut count = 0;
        for flag in Capabilities::all().iter_qapi_order() {
            let name = flag.qemu_name().unwrap();
            assert_eq!(Capabilities::from_qemu_name(name), Some(flag));
            count += 1;
        }
        assert_eq!(count, 22);
        // Bits ascend in QAPI order, and bitflags' own iterator agrees.
        let ours: Vec<Capabilities> = Capabilities::all().iter_qapi_order().collect();
        let theirs: Vec<Capabilities> = Capabilities::all().iter().collect();
        assert_eq!(ours, theirs);
        assert!(ours.windows(2).all(|w| w[0].bits() < w[1].bits()));

        assert_eq!(MR.qemu_name(), Some("mapped-ram"));
        assert_eq!(Capabilities::qemu_name(XIS), Some("x-ignore-shared"));
        assert_eq!((MR | MF).qemu_name(), None);
        assert_eq!(NONE.qemu_name(), None);
        assert_eq!(Capabilities::from_qemu_name("Mapped-Ram"), None);
        assert_eq!(Capabilities::from_qemu_name("compress"), None);

        let listed: Vec<_> = (MF | MR | XIS | Capabilities::EVENTS)
            .file_listed()
            .iter_qapi_order()
            .collect();
        assert_eq!(listed, [XIS, MR]);
        assert_eq!(Capabilities::FILE_LISTED, XIS | MR);

        assert_eq!(
            (MR | MF | XIS).to_string(),
            "multifd, x-ignore-shared, mapped-ram"
        );
        assert_eq!(NONE.to_string(), "(none)");
        let odd = Capabilities::from_bits_retain(0x8000_0001);
        assert_eq!(odd.to_string(), "xbzrle, 0x80000000");
        assert_eq!(
            CapsError::BackgroundSnapshot(MF | XB).to_string(),
            "Background-snapshot is not compatible with xbzrle, multifd"
        );

        for c in Compression::ALL {
            assert_eq!(Compression::from_qemu_name(c.qemu_name()), Some(c));
        }
        assert_eq!(Compression::from_qemu_name("lz4"), None);
        assert_eq!(ZeroPageDetection::default().qemu_name(), "multifd");
        assert_eq!(TCP.scheme(), "tcp");
        assert_eq!(FILE_OFF.scheme(), "file");
    }

    #[test]
    fn incoming_skips_prepare_checks() {
        assert_eq!(check_migrate_incoming(MR, &tls(), &FILE), Ok(()));
        assert_eq!(
            check_migrate(MR, &tls(), &FILE),
            Err(MigrateError::MappedRamTls)
        );
        assert_eq!(
            check_migrate_incoming(MR, &p(), &FD),
            Err(MigrateError::SeekableTransport { transport: FD })
        );
    }

    // ---- strict mode

    fn e() -> EngineConfig {
        EngineConfig::mapped_ram_file(None)
    }

    #[rustfmt::skip]
    #[test]
    fn strict_table() {
        use StrictError as S;
        let single = FileAccess::SingleFd;
        // Ok(b): accepted, with O_DIRECT resolved to b.
        let cases: Vec<(&str, EngineConfig, Host, Result<bool, StrictError>)> = vec![
            ("default", e(), HOST, Ok(true)),
            ("default, no O_DIRECT: auto falls back", e(), NO_ODIRECT, Ok(false)),
            ("auto, single fd: falls back", EngineConfig { file_access: single, ..e() }, HOST, Ok(false)),
            ("auto without multifd: off", EngineConfig { capabilities: MR, channels: 1, ..e() }, HOST, Ok(false)),
            ("on, path", EngineConfig { direct_io: DirectIo::On, ..e() }, HOST, Ok(true)),
            ("on, separate fds", EngineConfig { direct_io: DirectIo::On, file_access: FileAccess::SeparateFds, ..e() }, HOST, Ok(true)),
            ("off", EngineConfig { direct_io: DirectIo::Off, ..e() }, HOST, Ok(false)),
            ("64 KiB pages", EngineConfig { page_size: 65536, ..e() }, HOST, Ok(true)),
            ("255 channels", EngineConfig { channels: 255, ..e() }, HOST, Ok(true)),
            ("mapped-ram alone, 1 channel", EngineConfig { capabilities: MR, channels: 1, direct_io: DirectIo::Off, ..e() }, HOST, Ok(false)),
            ("background-snapshot", EngineConfig { capabilities: MR | BS, channels: 1, ..e() }, HOST, Ok(false)),
            ("compression with multifd over tcp", EngineConfig { capabilities: MF, compression: ZSTD, transport: TCP, ..e() }, HOST, Ok(false)),
            // refusals of our own
            ("page size 0", EngineConfig { page_size: 0, ..e() }, HOST, Err(S::PageSize { page_size: 0 })),
            ("page size 2048", EngineConfig { page_size: 2048, ..e() }, HOST, Err(S::PageSize { page_size: 2048 })),
            ("page size 12288", EngineConfig { page_size: 12288, ..e() }, HOST, Err(S::PageSize { page_size: 12288 })),
            ("0 channels", EngineConfig { channels: 0, ..e() }, HOST, Err(S::Channels { channels: 0 })),
            ("256 channels", EngineConfig { channels: 256, ..e() }, HOST, Err(S::Channels { channels: 256 })),
            ("on without multifd (QEMU ignores it)", EngineConfig { capabilities: MR, channels: 1, direct_io: DirectIo::On, ..e() }, HOST, Err(S::DirectIoWithoutMultifd)),
            ("on without mapped-ram (QEMU ignores it)", EngineConfig { capabilities: MF, direct_io: DirectIo::On, transport: TCP, ..e() }, HOST, Err(S::DirectIoWithoutMappedRam)),
            ("on with a single fd", EngineConfig { direct_io: DirectIo::On, file_access: single, ..e() }, HOST, Err(S::DirectIoNeedsSecondFd { transport: FILE, file_access: single })),
            ("channels without multifd", EngineConfig { capabilities: MR, channels: 4, ..e() }, HOST, Err(S::ChannelsWithoutMultifd { channels: 4 })),
            ("compression without multifd", EngineConfig { capabilities: NONE, channels: 1, compression: ZSTD, transport: TCP, ..e() }, HOST, Err(S::CompressionWithoutMultifd { compression: ZSTD })),
            ("zero-copy has no effect", EngineConfig { capabilities: MR | MF | ZC, ..e() }, HOST, Err(S::ZeroCopyHasNoEffect)),
            ("ignore-shared with mapped-ram", EngineConfig { capabilities: MR | MF | XIS, ..e() }, HOST, Err(S::IgnoreSharedWithMappedRam)),
            ("return-path to file", EngineConfig { capabilities: MR | MF | RP, ..e() }, HOST, Err(S::ReturnPathWithFile)),
            // QEMU's refusals, wrapped
            ("on, no O_DIRECT", EngineConfig { direct_io: DirectIo::On, ..e() }, NO_ODIRECT, Err(S::Params(ParamsError::NoDirectIo))),
            ("xbzrle", EngineConfig { capabilities: MR | XB, channels: 1, ..e() }, HOST, Err(S::Caps(CapsError::MappedRamXbzrle))),
            ("zlib, whatever the order", EngineConfig { compression: ZLIB, ..e() }, HOST, Err(S::Params(ParamsError::MappedRamNeedsPlain { compression: ZLIB, tls: false }))),
            ("tls", EngineConfig { tls: true, ..e() }, HOST, Err(S::Params(ParamsError::MappedRamNeedsPlain { compression: Compression::None, tls: true }))),
            ("unix:", EngineConfig { transport: UNIX, ..e() }, HOST, Err(S::Migrate(MigrateError::SeekableTransport { transport: UNIX }))),
            ("fd:", EngineConfig { transport: FD, ..e() }, HOST, Err(S::Migrate(MigrateError::SeekableTransport { transport: FD }))),
            ("multifd to file without mapped-ram", EngineConfig { capabilities: MF, ..e() }, HOST, Err(S::Migrate(MigrateError::MultiChannelTransport { transport: FILE }))),
        ];
        let mut failures = Vec::new();
        for (name, cfg, host, want) in &cases {
            let got = check_strict(cfg, host).map(|p| p.direct_io);
            if got != *want {
                failures.push(format!("{name}: expected {want:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn strict_texts() {
        let s = StrictError::DirectIoWithoutMultifd.to_string();
        assert!(s.contains("no effect without multifd"), "{s}");
        assert!(s.contains("turn on multifd"), "{s}");
        let s = StrictError::Migrate(MigrateError::MappedRamTls).to_string();
        assert!(s.starts_with("Cannot use TLS with mapped-ram"), "{s}");
        assert!(s.contains("clear tls-creds"), "{s}");
        let s = StrictError::DirectIoNeedsSecondFd {
            transport: FILE,
            file_access: FileAccess::SingleFd,
        }
        .to_string();
        assert!(s.contains("a single file descriptor (file:)"), "{s}");
        let s = StrictError::Caps(CapsError::BackgroundSnapshot(MF)).to_string();
        assert!(
            s.starts_with("Background-snapshot is not compatible with multifd"),
            "{s}"
        );
        use core::error::Error as _;
        assert!(StrictError::Params(ParamsError::NoDirectIo)
            .source()
            .is_some());
        assert!(StrictError::ZeroCopyHasNoEffect.source().is_none());
    }

    /// A tiny deterministic generator for the property test below.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 16
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    #[test]
    fn strict_implies_qemu_and_invariants() {
        let transports = [FILE, FILE_OFF, TCP, UNIX, VSOCK, FD, EXEC, RDMA];
        let accesses = [
            FileAccess::Path,
            FileAccess::SeparateFds,
            FileAccess::SingleFd,
        ];
        let mut g = Lcg(0x5eed);
        let mut strict_ok = 0;
        for _ in 0..20_000 {
            // Sparse random capabilities plus one of the interesting combinations.
            let bits = (g.next() & g.next() & g.next()) as u32;
            let caps = Capabilities::from_bits_truncate(bits)
                | g.pick(&[NONE, MR, MF, MR | MF, MR | MF, ZC | MF]);
            let host = Host {
                o_direct_supported: g.pick(&[true, true, true, false]),
            };
            let cfg = EngineConfig {
                capabilities: caps,
                channels: g.pick(&[0, 1, 1, 2, 4, 255, 256, u32::MAX]),
                compression: g.pick(&[Compression::None, Compression::None, ZLIB]),
                tls: g.pick(&[false, false, false, false, true]),
                zero_page_detection: g.pick(&[ZeroPageDetection::None, ZeroPageDetection::Multifd]),
                page_size: g.pick(&[0, 4096, 4096, 8192, 65536, 12288, 1 << 63]),
                direct_io: g.pick(&[DirectIo::Off, DirectIo::On, DirectIo::Auto]),
                transport: g.pick(&transports),
                file_access: g.pick(&accesses),
            };
            if let Ok(params) = check_strict(&cfg, &host) {
                strict_ok += 1;
                let all = ParamUpdate::from_parameters(&params);
                assert_eq!(check_capabilities(caps, &params), Ok(()), "{cfg:?}");
                assert_eq!(
                    check_parameters(caps, &params, &all, &host),
                    Ok(params),
                    "{cfg:?}"
                );
                assert_eq!(
                    check_migrate(caps, &params, &cfg.transport),
                    Ok(()),
                    "{cfg:?}"
                );
                assert_eq!(
                    params.direct_io,
                    effective_direct_io(caps, &params),
                    "{cfg:?}"
                );
                if params.direct_io {
                    assert!(
                        host.o_direct_supported && cfg.second_fd_available(),
                        "{cfg:?}"
                    );
                }
                if cfg.direct_io == DirectIo::On {
                    assert!(params.direct_io, "{cfg:?}");
                }
                assert!(cfg.page_size >= MIN_PAGE_SIZE && cfg.page_size.is_power_of_two());
                if caps.contains(MR) {
                    assert!(!params.tls && !params.multifd_compression.is_compressed());
                    assert!(matches!(cfg.transport, Transport::File { .. }));
                }
            }
            // QEMU-level invariants on the same inputs.
            let params = Parameters {
                multifd_channels: g.pick(&[0, 1, 2, 255]),
                multifd_compression: cfg.compression,
                tls: cfg.tls,
                direct_io: g.pick(&[false, true]),
                zero_page_detection: cfg.zero_page_detection,
            };
            if check_capabilities(caps, &params).is_ok()
                && check_migrate(caps, &params, &cfg.transport).is_ok()
            {
                if caps.contains(MR) {
                    assert!(!params.tls && !params.multifd_compression.is_compressed());
                    assert!(cfg.transport.supports_seeking());
                }
                if caps.contains(MF) {
                    assert!(cfg.transport.supports_multi_channels(caps));
                }
            }
        }
        assert!(strict_ok > 100, "only {strict_ok} accepted configurations");
    }
}
