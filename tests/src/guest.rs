//! A real Linux guest for the QEMU tests (`tests/tests/linux_guest.rs`).
//!
//! * **Kernel and busybox** come from Debian packages that `.ci/install-deps` downloads with
//!   `apt-get download` (no installation) into [`DEFAULT_GUEST_DIR`]
//!   (`/var/cache/mapped-ram-tests/`, override: `$MAPPED_RAM_GUEST_DIR`):
//!   `linux-image-cloud-amd64` (and the versioned package it depends on) gives
//!   `vmlinuz` (a bzImage); install-deps unpacks it with `dpkg-deb -x` and extracts the
//!   uncompressed ELF `vmlinux` from it (the kernel's `extract-vmlinux` logic: the first LZ4
//!   legacy frame magic `02 21 4c 18`, decompressed with `lz4`). `busybox-static` gives
//!   `busybox`. The files the tests use are [`GuestAssets::vmlinux`] and
//!   [`GuestAssets::busybox`].
//! * **Boot**: `-kernel vmlinux` boots through the PVH ELF note (`XEN_ELFNOTE_PHYS32_ENTRY`),
//!   which skips the firmware's real-mode kernel loading and the in-guest decompression.
//!   Measured on the 2-core dev machine (pc, TCG, to the first tick): 5.5 s idle; with other
//!   jobs running, 8.3 s against 12.1 s for `-kernel vmlinuz` (the bzImage, decompressed by
//!   the guest under TCG).
//! * **Initramfs** ([`write_initramfs`]): a `newc` cpio archive built at test time holding
//!   `/bin/busybox`, `/dev/console` and [`INIT_SCRIPT`]: it fills an 8 MiB file in a tmpfs
//!   with random bytes and then prints `MRTICK <counter> <md5 of that file>` on the serial
//!   console every second, recomputing the checksum from the tmpfs each time.
//! * **Accelerator**: TCG. `/dev/kvm` on the dev machine is a software nested hypervisor on
//!   which a stock kernel fails; the file format does not depend on the accelerator.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment variable naming the directory with `vmlinux` and `busybox`.
pub const GUEST_DIR_ENV: &str = "MAPPED_RAM_GUEST_DIR";
/// Where `.ci/install-deps` puts the guest kernel and busybox.
pub const DEFAULT_GUEST_DIR: &str = "/var/cache/mapped-ram-tests";
/// The kernel command line.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet rdinit=/init";
/// The marker of a tick line on the serial console.
pub const TICK_MARKER: &str = "MRTICK";

/// The guest's `/init` (run by busybox `sh`).
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /data
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
$B mount -t tmpfs -o size=32m tmpfs /data
$B dd if=/dev/urandom of=/data/blob bs=1048576 count=8 2>/dev/null
n=0
while true; do
  n=$((n+1))
  s=$($B md5sum /data/blob)
  echo "MRTICK $n ${s%% *}"
  $B sleep 1
done
"#;

/// The guest kernel and busybox found on this machine.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    /// Uncompressed ELF kernel with a PVH note.
    pub vmlinux: PathBuf,
    /// Statically linked busybox.
    pub busybox: PathBuf,
}

/// The directory holding the guest files: `$MAPPED_RAM_GUEST_DIR` or [`DEFAULT_GUEST_DIR`].
pub fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR))
}

impl GuestAssets {
    /// Finds `vmlinux` and `busybox` in [`guest_dir`], or says what is missing.
    pub fn find() -> Result<GuestAssets, String> {
        let dir = guest_dir();
        let vmlinux = dir.join("vmlinux");
        let busybox = dir.join("busybox");
        let mut missing = Vec::new();
        for p in [&vmlinux, &busybox] {
            if !p.is_file() {
                missing.push(p.display().to_string());
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "guest files missing: {} (run .ci/install-deps as root, or set {GUEST_DIR_ENV})",
                missing.join(", ")
            ));
        }
        let head = fs::read(&vmlinux)
            .map(|b| b.get(..4).map(<[u8]>::to_vec))
            .map_err(|e| format!("{}: {e}", vmlinux.display()))?;
        if head.as_deref() != Some(b"\x7fELF") {
            return Err(format!(
                "{} is not an ELF file (install-deps extracts it from the bzImage)",
                vmlinux.display()
            ));
        }
        Ok(GuestAssets { vmlinux, busybox })
    }
}

/// One entry of a `newc` cpio archive.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Writes the initramfs (uncompressed `newc` cpio) with busybox and [`INIT_SCRIPT`] to `out`.
pub fn write_initramfs(busybox: &Path, out: &Path) -> io::Result<()> {
    let bb = fs::read(busybox)?;
    let mut a = Vec::with_capacity(bb.len() + 4096);
    cpio_entry(&mut a, 1, "bin", 0o040_755, (0, 0), &[]);
    cpio_entry(&mut a, 2, "bin/busybox", 0o100_755, (0, 0), &bb);
    cpio_entry(&mut a, 3, "dev", 0o040_755, (0, 0), &[]);
    cpio_entry(&mut a, 4, "dev/console", 0o020_600, (5, 1), &[]);
    cpio_entry(&mut a, 5, "init", 0o100_755, (0, 0), INIT_SCRIPT.as_bytes());
    cpio_entry(&mut a, 6, "TRAILER!!!", 0, (0, 0), &[]);
    fs::File::create(out)?.write_all(&a)
}

/// The QEMU arguments that boot the guest and send its serial console to `serial_log`.
pub fn boot_args(assets: &GuestAssets, initramfs: &Path, serial_log: &Path) -> Vec<String> {
    vec![
        "-kernel".into(),
        assets.vmlinux.display().to_string(),
        "-initrd".into(),
        initramfs.display().to_string(),
        "-append".into(),
        KERNEL_CMDLINE.into(),
        "-chardev".into(),
        format!("file,id=ser0,path={}", serial_log.display()),
        "-serial".into(),
        "chardev:ser0".into(),
        // A VGA card adds the `vga.vram` (16 MiB) and `vga.rom` RAM blocks.
        "-device".into(),
        "VGA".into(),
        "-no-reboot".into(),
    ]
}

/// One `MRTICK` line of the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The counter (1 for the first line after boot).
    pub n: u64,
    /// md5 of the tmpfs file, 32 hex digits.
    pub sum: String,
}

/// The complete tick lines of a serial log, in order. A line counts only if it ends with a
/// newline, starts with the marker and carries a counter and a 32-hex-digit checksum (a line
/// cut by the migration, half on the source's console and half on the destination's, does
/// not).
pub fn parse_ticks(text: &str) -> Vec<Tick> {
    let mut out = Vec::new();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => return out,
    };
    for line in complete.lines() {
        let mut w = line.trim_end_matches('\r').split(' ');
        if w.next() != Some(TICK_MARKER) {
            continue;
        }
        let (Some(n), Some(sum), None) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        if sum.len() == 32 && sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            out.push(Tick {
                n,
                sum: sum.to_string(),
            });
        }
    }
    out
}

/// The ticks in the serial log at `path` (none if it does not exist yet).
pub fn read_ticks(path: &Path) -> Vec<Tick> {
    match fs::read(path) {
        Ok(b) => parse_ticks(&String::from_utf8_lossy(&b)),
        Err(_) => Vec::new(),
    }
}

/// Waits until the serial log holds a tick with a counter of at least `min_n`; returns all
/// ticks seen then. `alive` is polled so that a QEMU that died fails at once; the wait is
/// bounded by `timeout`, and the error quotes the log's tail.
pub fn wait_for_tick(
    serial_log: &Path,
    min_n: u64,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<Vec<Tick>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ticks = read_ticks(serial_log);
        if ticks.iter().any(|t| t.n >= min_n) {
            return Ok(ticks);
        }
        let tail = || {
            let text = fs::read(serial_log).unwrap_or_default();
            let s = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
            format!("serial log {} ends with:\n{s}", serial_log.display())
        };
        alive().map_err(|e| format!("{e}; {}", tail()))?;
        if Instant::now() >= deadline {
            return Err(format!("no tick >= {min_n} within {timeout:?}; {}", tail()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ticks_and_ignores_cut_lines() {
        let s = "[ 1.0] boot\nMRTICK 1 0123456789abcdef0123456789abcdef\nMRTICK 2 0123\nTICK\nMRTICK 3 0123456789abcdef0123456789abcdef\nMRTICK 4 0123";
        let t = parse_ticks(s);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].n, t[1].n), (1, 3));
        assert_eq!(t[1].sum, "0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut a = Vec::new();
        cpio_entry(&mut a, 1, "init", 0o100_755, (0, 0), b"abc");
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        assert_eq!(&a[110..115], b"init\0");
    }
}
