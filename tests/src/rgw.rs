//! A real S3 endpoint for the store tests: Ceph's radosgw (RGW) on 127.0.0.1.
//!
//! The cluster comes from `scripts/ceph-rgw/start.sh` (one monitor, one memstore OSD, radosgw;
//! see the script's header for its settings and the pitfalls they avoid). Two flavours:
//!
//! * [`gateway`] — one cluster shared by every test of every test binary, under
//!   `$MAPPED_RAM_RGW_DIR` (default `/var/tmp/mapped-ram-rgw`). The first call in a process runs
//!   `start.sh` while holding an exclusive `flock` on `<dir>/lock`, so test binaries that
//!   `cargo test` runs in parallel wait for one another: the first one starts the cluster
//!   (about 3 s), the others find it answering (`start.sh` is idempotent) and only read
//!   `<dir>/s3.env`. The shared cluster is left running when the tests end, for the next run;
//!   `scripts/ceph-rgw/stop.sh` takes it down. Tests share it by using their own buckets
//!   ([`unique_bucket`]).
//! * [`Gateway::private`] — a cluster of the test's own, with its own directory and ports, for
//!   tests that kill the gateway ([`Gateway::kill_gateway`], a SIGKILL of radosgw alone) and
//!   bring it back ([`Gateway::start_gateway`], same port, the data still in the OSD). Dropping
//!   it stops its daemons and deletes its directory.
//!
//! When the Ceph packages are missing (`.ci/install-deps` installs them) or the cluster does
//! not come up, both return `Err(reason)`; tests then call
//! [`support::cannot_run`](crate::support::cannot_run).
//!
//! The S3 calls of the helpers go through the `object_store` crate, the client the product
//! itself uses (path-style requests, plain http, static keys, region `us-east-1`), on a small
//! tokio runtime each [`Gateway`] owns; the helpers block, so call them from plain `#[test]`
//! functions, not from inside an async runtime. `object_store` cannot create buckets, so
//! [`Gateway::create_bucket`] signs its one request with `curl --aws-sigv4`. The helpers that
//! return no `Result` panic, with the store's error, when the request fails.
//!
//! [`Gateway::env`] gives the variables a child process (the `mapped-ram` CLI, boto3) needs,
//! including `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`: Pacific's RGW rejects the
//! aws-chunked uploads with trailing checksums that recent AWS SDKs send by default.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// Environment variable naming the shared gateway's directory (also read by the scripts).
pub const DIR_ENV: &str = "MAPPED_RAM_RGW_DIR";

/// The shared gateway's directory when [`DIR_ENV`] is not set.
pub const DEFAULT_DIR: &str = "/var/tmp/mapped-ram-rgw";

/// Exit status of `start.sh` when packages are missing.
const EXIT_MISSING_PACKAGES: i32 = 3;

/// A running radosgw and how to reach it.
pub struct Gateway {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The S3 user's access key.
    pub access_key: String,
    /// The S3 user's secret key.
    pub secret_key: String,
    /// The signing region (`us-east-1`).
    pub region: String,
    /// The state directory (`cluster/`, `s3.env`, `lock`, `start.log`).
    pub dir: PathBuf,
    /// Every `export` of `s3.env`, in order.
    vars: Vec<(String, String)>,
    /// `cluster/ceph.conf`, for `radosgw-admin`.
    ceph_conf: PathBuf,
    /// A private cluster: stopped and deleted on drop.
    owned: bool,
    runtime: tokio::runtime::Runtime,
}

/// The gateway shared by the whole test process (and, through its directory and lock, by every
/// test process): started on first use, left running at exit. `Err(reason)` when it cannot run.
pub fn gateway() -> Result<&'static Gateway, String> {
    static SHARED: OnceLock<Result<Gateway, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let dir = std::env::var_os(DIR_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
            launch(&dir, &[], false)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A bucket name no other test (of this or any other process) uses: `prefix` lowercased, with
/// anything but letters, digits and '-' turned into '-', then the process id, a per-process
/// counter and the clock; at most 63 characters, as S3 requires.
pub fn unique_bucket(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let suffix = format!(
        "{:x}-{n:x}-{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    );
    let mut head: String = prefix
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    head.truncate(63 - 1 - suffix.len());
    let head = head.trim_matches('-');
    let head = if head.is_empty() { "t" } else { head };
    format!("{head}-{suffix}")
}

impl Gateway {
    /// A cluster of the caller's own (directory `<shared dir>-<name>-<pid>-<n>`, ports of its
    /// own), for tests that kill and restart the gateway. Stopped and deleted when dropped.
    pub fn private(name: &str) -> Result<Gateway, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(16)
            .collect();
        // Short: the admin sockets live below it, and a socket path has at most 107 bytes.
        let dir = PathBuf::from(format!("{DEFAULT_DIR}-{tag}-{pid}-{n}"));
        // Port ranges away from the shared cluster's, spread by process so that parallel test
        // binaries rarely meet (start.sh moves on past any port in use).
        let slot = u64::from(pid % 500) * 8 + (n % 4) * 2;
        let ports = [
            ("MAPPED_RAM_RGW_MON_PORT", (20000 + slot).to_string()),
            ("MAPPED_RAM_RGW_PORT", (27480 + slot).to_string()),
        ];
        let _ = fs::remove_dir_all(&dir);
        let gw = launch(&dir, &ports, true);
        if gw.is_err() {
            let _ = run_script(&dir, "stop.sh", &[], &[], None);
            let _ = fs::remove_dir_all(&dir);
        }
        gw
    }

    /// Creates `bucket` (a signed `PUT /bucket` through `curl --aws-sigv4`). Creating a bucket
    /// this user already owns succeeds.
    pub fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-m",
                "30",
                "-X",
                "PUT",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
            ])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.region))
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            // RGW checks the payload hash header curl would otherwise leave out of the signature.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(format!("{}/{bucket}", self.endpoint))
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        if out.status.success() && code.trim() == "200" {
            Ok(())
        } else {
            Err(format!(
                "create bucket {bucket}: HTTP {} {} {}",
                code.trim(),
                body.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The objects of `bucket` whose keys start with `prefix` (a plain string prefix, not only
    /// whole path segments), as `(key, size)` sorted by key.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let store = self.store(bucket);
        // object_store lists whole path segments: list below the prefix's directory, then filter.
        let dir = prefix.rsplit_once('/').map(|(d, _)| ObjectPath::from(d));
        let metas: Vec<_> = self
            .runtime
            .block_on(store.list(dir.as_ref()).try_collect())
            .unwrap_or_else(|e| panic!("list s3://{bucket}/{prefix}: {e}"));
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .filter(|(k, _)| k.starts_with(prefix))
            .collect();
        out.sort();
        out
    }

    /// Deletes one object (no error if it does not exist).
    pub fn delete_object(&self, bucket: &str, key: &str) {
        let store = self.store(bucket);
        self.runtime
            .block_on(store.delete(&ObjectPath::from(key)))
            .unwrap_or_else(|e| panic!("delete s3://{bucket}/{key}: {e}"));
    }

    /// Writes one object (a single PUT).
    pub fn put_object(&self, bucket: &str, key: &str, body: Vec<u8>) {
        let store = self.store(bucket);
        self.runtime
            .block_on(store.put(&ObjectPath::from(key), PutPayload::from(body)))
            .unwrap_or_else(|e| panic!("put s3://{bucket}/{key}: {e}"));
    }

    /// Reads one object; `None` if it does not exist.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let store = self.store(bucket);
        let got = self.runtime.block_on(async {
            match store.get(&ObjectPath::from(key)).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.unwrap_or_else(|e| panic!("get s3://{bucket}/{key}: {e}"))
    }

    /// `(objects, bytes)` of `bucket` as RGW accounts them (`radosgw-admin bucket stats`,
    /// the `usage` categories summed): `bytes` is the `size` field, the exact sum of the stored
    /// lengths (`size_actual` would round each object up to 4 KiB). Unlike a listing, this sees
    /// what a listing hides: every uploaded part of a multipart upload not yet completed or
    /// aborted counts as one object with its bytes, and the pending upload itself as one more
    /// (`rgw.multimeta`, 0 bytes). A completed multipart object counts once. The numbers change
    /// with each request, not when garbage collection later frees the space.
    pub fn bucket_stats(&self, bucket: &str) -> (u64, u64) {
        let out = Command::new("radosgw-admin")
            .args(["bucket", "stats"])
            .arg(format!("--bucket={bucket}"))
            .env("CEPH_CONF", &self.ceph_conf)
            .output()
            .unwrap_or_else(|e| panic!("radosgw-admin: {e}"));
        assert!(
            out.status.success(),
            "radosgw-admin bucket stats --bucket={bucket}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("radosgw-admin bucket stats: {e}"));
        let mut objects = 0;
        let mut bytes = 0;
        if let Some(usage) = stats["usage"].as_object() {
            for category in usage.values() {
                objects += category["num_objects"].as_u64().unwrap_or(0);
                bytes += category["size"].as_u64().unwrap_or(0);
            }
        }
        (objects, bytes)
    }

    /// The `AWS_*` variables of `s3.env` (endpoint, keys, region, `AWS_ALLOW_HTTP`, the
    /// `when_required` checksum switches), for a child process such as the `mapped-ram` CLI.
    pub fn env(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .cloned()
            .collect()
    }

    /// Kills radosgw alone with SIGKILL, like a crash (the cluster and its data stay). Meant for
    /// a [`Gateway::private`] one: the shared gateway serves other tests.
    pub fn kill_gateway(&self) {
        match run_script(
            &self.dir,
            "stop.sh",
            &["--gateway-only", "--kill"],
            &[],
            None,
        ) {
            Ok(0) => {}
            other => panic!(
                "stop.sh --gateway-only --kill in {}: {other:?}",
                self.dir.display()
            ),
        }
    }

    /// Starts radosgw again on the same port and waits until it answers (nothing happens if it
    /// already does).
    pub fn start_gateway(&self) -> Result<(), String> {
        let log = self.dir.join("start-gateway.log");
        match run_script(&self.dir, "start.sh", &["--gateway-only"], &[], Some(&log))? {
            0 => Ok(()),
            code => Err(format!(
                "start.sh --gateway-only exited with {code}: {}",
                tail(&log)
            )),
        }
    }

    /// A client for one bucket. Few retries: a test that kills the gateway wants the error.
    fn store(&self, bucket: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(120))
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_allow_http(true)
            .with_endpoint(&self.endpoint)
            .with_virtual_hosted_style_request(false)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_region(&self.region)
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            })
            .build()
            .unwrap_or_else(|e| panic!("S3 client for {bucket}: {e}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.owned {
            let _ = run_script(&self.dir, "stop.sh", &[], &[], None);
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `scripts/ceph-rgw/<name>` of this checkout.
fn script_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts/ceph-rgw")
        .join(name)
}

/// Runs `scripts/ceph-rgw/<name> <args>` for the cluster in `dir` with the extra `env`, both
/// output streams into the file `log` (or nowhere): files, not pipes, since the daemons it
/// starts would inherit a pipe and keep it open. The exit status (-1 when killed by a signal).
fn run_script(
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
    log: Option<&Path>,
) -> Result<i32, String> {
    let path = script_path(name);
    let mut cmd = Command::new(&path);
    cmd.args(args).env(DIR_ENV, dir).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    match log {
        Some(log) => {
            let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
            let err = out
                .try_clone()
                .map_err(|e| format!("{}: {e}", log.display()))?;
            cmd.stdout(out).stderr(err);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    Ok(status.code().unwrap_or(-1))
}

/// Runs `start.sh` for `dir` under the directory's lock and reads its `s3.env`.
fn launch(dir: &Path, env: &[(&str, String)], owned: bool) -> Result<Gateway, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved. The lock
    // is released when `lock` is closed at the end of this function.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let log = dir.join("start.log");
    let code = run_script(dir, "start.sh", &[], env, Some(&log))?;
    let path = script_path("start.sh");
    match code {
        0 => {}
        EXIT_MISSING_PACKAGES => {
            return Err(format!(
                "the Ceph S3 gateway's packages are missing (run .ci/install-deps as root): {}",
                tail(&log)
            ))
        }
        code => {
            return Err(format!(
                "{} failed (exit status {code}), log {}: {}",
                path.display(),
                log.display(),
                tail(&log)
            ))
        }
    }
    let env_path = dir.join("s3.env");
    let text = fs::read_to_string(&env_path).map_err(|e| format!("{}: {e}", env_path.display()))?;
    drop(lock);
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let var = |k: &str| {
        vars.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("{} has no {k}", env_path.display()))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rgw-helper")
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    Ok(Gateway {
        endpoint: var("AWS_ENDPOINT_URL")?,
        access_key: var("AWS_ACCESS_KEY_ID")?,
        secret_key: var("AWS_SECRET_ACCESS_KEY")?,
        region: var("AWS_REGION")?,
        dir: dir.to_path_buf(),
        ceph_conf: PathBuf::from(var("CEPH_CONF")?),
        vars,
        owned,
        runtime,
    })
}

/// The last lines of a log file, on one line.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join(" | ")
}
