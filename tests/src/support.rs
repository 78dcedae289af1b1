//! Small helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The `mapped-ram` binary built beside the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/mapped-ram`), if it was built.
pub fn cli_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("mapped-ram");
    bin.is_file().then_some(bin)
}

/// xorshift64*: reproducible pseudo-random numbers (cut points, bit positions, delays).
pub struct Rng(pub u64);

impl Rng {
    /// The next number of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Environment variable listing the tests allowed to skip when a prerequisite is missing:
/// comma-separated test names (e.g. `linux_guest`) or `all`.
pub const ALLOW_SKIP_ENV: &str = "MAPPED_RAM_ALLOW_SKIP";

/// True if `$MAPPED_RAM_ALLOW_SKIP` names `test` (or is `all`).
pub fn skip_allowed(test: &str) -> bool {
    std::env::var(ALLOW_SKIP_ENV)
        .map(|v| v.split(',').map(str::trim).any(|t| t == test || t == "all"))
        .unwrap_or(false)
}

/// A test that cannot run because `why`: panics (the test fails) unless
/// `MAPPED_RAM_ALLOW_SKIP` names `test`; then prints a loud `SKIPPED` line and returns.
pub fn cannot_run(test: &str, why: &str) {
    if !skip_allowed(test) {
        panic!("{test} cannot run: {why} (set {ALLOW_SKIP_ENV}={test} to skip it)");
    }
    eprintln!("SKIPPED ({test}, allowed by {ALLOW_SKIP_ENV}): {why}");
}

/// A fresh, empty scratch directory `<tmpdir>/<name>-<pid>` on the disk file system of the
/// target directory (ext4 here, not tmpfs). Pass `env!("CARGO_TARGET_TMPDIR")` as `tmpdir`
/// (only integration tests have it).
pub fn scratch_dir(tmpdir: &str, name: &str) -> PathBuf {
    let dir = Path::new(tmpdir).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Puts `vm.nr_hugepages` back when dropped.
pub struct HugeReservation(Option<u64>);

impl Drop for HugeReservation {
    fn drop(&mut self) {
        if let Some(total) = self.0 {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", total.to_string());
        }
    }
}

/// Makes `n` 2 MiB huge pages free (root: raises `vm.nr_hugepages`, put back when the guard
/// drops); `None`, loudly, when the kernel refuses.
pub fn reserve_huge_pages(test: &str, n: u64) -> Option<HugeReservation> {
    let read = |k: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let free = read("HugePages_Free:");
    if free >= n {
        return Some(HugeReservation(None));
    }
    let total = read("HugePages_Total:");
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (total + n - free).to_string());
    let guard = HugeReservation(Some(total));
    let got = read("HugePages_Free:");
    if got < n {
        cannot_run(
            test,
            &format!("the kernel gave {got} free 2 MiB huge pages, {n} needed (vm.nr_hugepages)"),
        );
        return None;
    }
    Some(guard)
}

/// Whether userfaultfd restores work here: a 1 MiB snapshot saved in `dir` and restored with
/// [`mapped_ram_linux::restore_uffd`]. If not, [`cannot_run`] for `test` (which fails the test
/// unless skipping is allowed) and `false`.
pub fn uffd_available(test: &str, dir: &Path) -> bool {
    use mapped_ram_linux::{restore_uffd, save, SaveOptions, SaveRegion, UffdOptions};
    let path = dir.join("uffd-probe.mr");
    let ram = vec![1u8; 1 << 20];
    let region = [SaveRegion {
        name: "pc.ram",
        memory: &ram,
        page_size: 4096,
    }];
    save(&path, &region, &SaveOptions::default(), None)
        .unwrap_or_else(|e| panic!("saving the userfaultfd probe {}: {e}", path.display()));
    let ok = match restore_uffd(&path, &[], &UffdOptions::default()) {
        Ok(_) => true,
        Err(e) => {
            cannot_run(test, &format!("userfaultfd unavailable: {e}"));
            false
        }
    };
    let _ = std::fs::remove_file(&path);
    ok
}
