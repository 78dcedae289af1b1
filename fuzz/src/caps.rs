//! Fuzz body for `mapped_ram_core::caps`: QEMU's three checkpoints and the strict mode.
//!
//! The input bytes are read in order (a missing byte reads as "use the default"):
//!
//! | bytes  | meaning                                                                           |
//! |--------|-----------------------------------------------------------------------------------|
//! | 0..4   | capabilities, `u32` little-endian (unknown bits dropped)                          |
//! | 4      | current `multifd-channels` (default 2)                                            |
//! | 5      | current compression (mod 6)                                                       |
//! | 6      | current flags: bit 0 TLS, bit 1 direct-io, bits 2.. zero-page-detection (mod 3)   |
//! | 7      | first update: bits 0..=4 pick the fields it sets; bit 5: host without O_DIRECT    |
//! | 8..12  | first update's `multifd-channels`, `u32` little-endian                            |
//! | 12, 13 | first update's compression and flags (as bytes 5, 6)                              |
//! | 14     | transport (mod 8: file, file+offset, fd, tcp, unix, vsock, exec, rdma)            |
//! | 15..23 | `offset=` of the file transport, `u64` little-endian                              |
//! | 23..27 | engine channel count, `u32` little-endian                                         |
//! | 27     | page size: `1 << (b & 63)`, or with bit 7 set the `u64` in bytes 28..36           |
//! | 36     | engine: bits 0..=1 direct-io (mod 3: off, on, auto), bits 2.. file access (mod 3) |
//! | 37..44 | second update, laid out like bytes 7..14                                          |

use mapped_ram_core::caps::{
    check_capabilities, check_migrate, check_migrate_incoming, check_parameters, check_strict,
    effective_direct_io, Capabilities, Compression, DirectIo, EngineConfig, FileAccess, Host,
    MigrateError, ParamUpdate, Parameters, ParamsError, SocketKind, StrictError, Transport,
    ZeroPageDetection, MIN_PAGE_SIZE,
};

/// Reads the input front to back; past the end every read is `None`.
struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.data.len() < N {
            self.data = &[];
            return None;
        }
        let (head, rest) = self.data.split_at(N);
        self.data = rest;
        head.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        self.array::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array::<8>().map(u64::from_le_bytes)
    }
}

fn compression(b: Option<u8>) -> Compression {
    let all = Compression::ALL;
    all[usize::from(b.unwrap_or(0)) % all.len()]
}

fn zero_page_detection(flags: u8) -> ZeroPageDetection {
    match (flags >> 2) % 3 {
        0 => ZeroPageDetection::Multifd,
        1 => ZeroPageDetection::Legacy,
        _ => ZeroPageDetection::None,
    }
}

/// An update as described by a mask byte and the following 6 bytes.
fn update(b: &mut Bytes<'_>) -> (ParamUpdate, u8) {
    let mask = b.u8().unwrap_or(0);
    let channels = b.u32().unwrap_or(2);
    let comp = compression(b.u8());
    let flags = b.u8().unwrap_or(0);
    let update = ParamUpdate {
        multifd_channels: (mask & 1 != 0).then_some(channels),
        multifd_compression: (mask & 2 != 0).then_some(comp),
        tls: (mask & 4 != 0).then_some(flags & 1 != 0),
        direct_io: (mask & 8 != 0).then_some(flags & 2 != 0),
        zero_page_detection: (mask & 16 != 0).then_some(zero_page_detection(flags)),
    };
    (update, mask)
}

fn transport(kind: Option<u8>, offset: Option<u64>) -> Transport {
    match kind.unwrap_or(0) % 8 {
        0 => Transport::File { offset: None },
        1 => Transport::File {
            offset: Some(offset.unwrap_or(0x1000)),
        },
        2 => Transport::Fd,
        3 => Transport::Socket(SocketKind::Tcp),
        4 => Transport::Socket(SocketKind::Unix),
        5 => Transport::Socket(SocketKind::Vsock),
        6 => Transport::Exec,
        _ => Transport::Rdma,
    }
}

/// The merged value every accepted update must produce.
fn merged(current: &Parameters, update: &ParamUpdate) -> (u32, Compression, bool, bool) {
    (
        update
            .multifd_channels
            .unwrap_or(u32::from(current.multifd_channels)),
        update
            .multifd_compression
            .unwrap_or(current.multifd_compression),
        update.tls.unwrap_or(current.tls),
        update.direct_io.unwrap_or(current.direct_io),
    )
}

/// Asserts what every accepted or refused parameter update must satisfy.
fn check_update(
    caps: Capabilities,
    current: &Parameters,
    update: &ParamUpdate,
    host: &Host,
) -> Option<Parameters> {
    let result = check_parameters(caps, current, update, host);
    let (channels, comp, tls, direct_io) = merged(current, update);
    match result {
        Ok(new) => {
            assert_eq!(u32::from(new.multifd_channels), channels);
            assert!(new.multifd_channels >= 1);
            assert_eq!(new.multifd_compression, comp);
            assert_eq!(new.tls, tls);
            assert_eq!(new.direct_io, direct_io);
            assert_eq!(
                new.zero_page_detection,
                update
                    .zero_page_detection
                    .unwrap_or(current.zero_page_detection)
            );
            // Rule 10 looks at the values in effect before the update (QEMU's quirk).
            if caps.contains(Capabilities::MAPPED_RAM) {
                assert!(!current.tls && !current.multifd_compression.is_compressed());
            }
            if caps.contains(Capabilities::ZERO_COPY_SEND) {
                assert!(!new.tls && !new.multifd_compression.is_compressed());
            }
            if new.direct_io {
                assert!(host.o_direct_supported);
            }
            Some(new)
        }
        Err(e) => {
            match e {
                ParamsError::MultifdChannelsNotUint8 { value } => assert!(value > 255),
                ParamsError::MultifdChannelsRange { value } => assert_eq!(value, 0),
                ParamsError::ZeroCopy { .. } => {
                    assert!(caps.contains(Capabilities::ZERO_COPY_SEND))
                }
                ParamsError::MappedRamNeedsPlain { compression, tls } => {
                    assert!(caps.contains(Capabilities::MAPPED_RAM));
                    assert!(tls || compression.is_compressed());
                    assert_eq!(compression, current.multifd_compression);
                    assert_eq!(tls, current.tls);
                }
                ParamsError::NoDirectIo => assert!(direct_io && !host.o_direct_supported),
            }
            assert!(!e.to_string().is_empty() && !e.remedy().is_empty());
            None
        }
    }
}

/// Asserts what an accepted or refused `migrate` must satisfy.
fn check_start(caps: Capabilities, params: &Parameters, transport: &Transport, caps_ok: bool) {
    let outgoing = check_migrate(caps, params, transport);
    let incoming = check_migrate_incoming(caps, params, transport);
    match outgoing {
        Ok(()) => {
            assert_eq!(incoming, Ok(()));
            if caps.contains(Capabilities::MAPPED_RAM) {
                assert!(matches!(transport, Transport::File { .. }));
                if caps_ok {
                    assert_eq!(params.multifd_compression, Compression::None);
                    assert!(!params.tls);
                }
            }
            if caps.intersects(Capabilities::MULTIFD | Capabilities::POSTCOPY_PREEMPT) {
                assert!(transport.supports_multi_channels(caps));
            }
            if effective_direct_io(caps, params) {
                assert!(transport.supports_extra_fds());
            }
        }
        Err(e) => {
            // The outgoing side only adds checks after the incoming ones.
            match incoming {
                Ok(()) => assert!(matches!(
                    e,
                    MigrateError::MappedRamTls | MigrateError::MappedRamCompression { .. }
                )),
                Err(i) => assert_eq!(i, e),
            }
            assert!(
                !matches!(e, MigrateError::ExtraFds { .. }),
                "rule 18 is unreachable"
            );
            assert!(!e.to_string().is_empty() && !e.remedy().is_empty());
        }
    }
}

/// Derives capabilities, parameters, updates, a transport and an engine configuration from
/// `data`, runs every check and asserts the invariants between them.
pub fn run(data: &[u8]) {
    let mut b = Bytes { data };
    let caps = Capabilities::from_bits_truncate(b.u32().unwrap_or(0));
    let current_channels = b.u8().unwrap_or(2);
    let current_comp = compression(b.u8());
    let current_flags = b.u8().unwrap_or(0);
    let current = Parameters {
        multifd_channels: current_channels,
        multifd_compression: current_comp,
        tls: current_flags & 1 != 0,
        direct_io: current_flags & 2 != 0,
        zero_page_detection: zero_page_detection(current_flags),
    };
    let (first, mask) = update(&mut b);
    let host = Host {
        o_direct_supported: mask & 32 == 0,
    };
    let kind = b.u8();
    let transport = transport(kind, b.u64());
    let engine_channels = b.u32().unwrap_or(2);
    let page_byte = b.u8();
    let raw_page_size = b.u64();
    let page_size = match page_byte {
        None => MIN_PAGE_SIZE,
        Some(p) if p & 0x80 != 0 => raw_page_size.unwrap_or(MIN_PAGE_SIZE),
        Some(p) => 1u64 << (p & 63),
    };
    let engine_flags = b.u8().unwrap_or(2);
    let (second, _) = update(&mut b);

    // Names round-trip and come out in QAPI order.
    let mut last = 0;
    for flag in caps.iter_qapi_order() {
        assert!(flag.bits() > last);
        last = flag.bits();
        let name = flag.qemu_name().expect("every single flag has a name");
        assert_eq!(Capabilities::from_qemu_name(name), Some(flag));
    }
    assert!(!caps.to_string().is_empty());

    // Checkpoint caps.
    let caps_result = check_capabilities(caps, &current);
    if let Err(e) = caps_result {
        assert!(caps.contains(e.capabilities()), "{e:?} with {caps:?}");
        assert!(!e.to_string().is_empty() && !e.remedy().is_empty());
    }
    let caps_ok = caps_result.is_ok();

    // Checkpoint params, twice in a row (rule 10's quirk shows on the second one).
    let effective = match check_update(caps, &current, &first, &host) {
        Some(new) => {
            let again = check_update(caps, &new, &second, &host);
            if again.is_some() && caps.contains(Capabilities::MAPPED_RAM) {
                assert!(!new.tls && !new.multifd_compression.is_compressed());
            }
            new
        }
        None => current,
    };

    // Checkpoint migrate, with the parameters that ended up in effect.
    check_start(
        caps,
        &effective,
        &transport,
        caps_ok && check_capabilities(caps, &effective).is_ok(),
    );
    check_start(caps, &current, &transport, caps_ok);

    // Strict mode.
    let cfg = EngineConfig {
        capabilities: caps,
        channels: engine_channels,
        compression: current_comp,
        tls: current.tls,
        zero_page_detection: current.zero_page_detection,
        page_size,
        direct_io: [DirectIo::Off, DirectIo::On, DirectIo::Auto]
            [usize::from((engine_flags & 3) % 3)],
        transport,
        file_access: [
            FileAccess::Path,
            FileAccess::SeparateFds,
            FileAccess::SingleFd,
        ][usize::from((engine_flags >> 2) % 3)],
    };
    match check_strict(&cfg, &host) {
        Ok(params) => {
            let all = ParamUpdate::from_parameters(&params);
            assert_eq!(check_capabilities(caps, &params), Ok(()));
            assert_eq!(check_parameters(caps, &params, &all, &host), Ok(params));
            assert_eq!(check_migrate(caps, &params, &transport), Ok(()));
            assert_eq!(params.direct_io, effective_direct_io(caps, &params));
            if params.direct_io {
                assert!(host.o_direct_supported && cfg.second_fd_available());
            }
            if cfg.direct_io == DirectIo::On {
                assert!(params.direct_io);
            }
            assert!(page_size.is_power_of_two() && page_size >= MIN_PAGE_SIZE);
            assert_eq!(u32::from(params.multifd_channels), engine_channels);
            if !caps.contains(Capabilities::MULTIFD) {
                assert_eq!(engine_channels, 1);
            }
            if caps.contains(Capabilities::MAPPED_RAM) {
                assert!(
                    !caps.intersects(Capabilities::ZERO_COPY_SEND | Capabilities::X_IGNORE_SHARED)
                );
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let StrictError::Channels { channels } = e {
                assert!(channels == 0 || channels > 255);
            }
        }
    }
}
