//! Snapshots in an S3-compatible object store (`s3://bucket/key`): save, restore, inspect,
//! verify, lazy restore, and `put` / `get` between a store and a local file.
//!
//! # Layout on the store
//!
//! A store snapshot is a plain mapped-ram file cut into fixed-size objects
//! ([`mapped_ram_core::objects`]), plus a small JSON [`Manifest`] at the snapshot's key:
//!
//! ```text
//! s3://bucket/vm/guest.mr                                    the manifest (the commit point)
//! s3://bucket/vm/guest.mr.objects/<generation>/0000000000    file bytes 0 .. 4 MiB
//! s3://bucket/vm/guest.mr.objects/<generation>/0000000003    file bytes 12 .. 16 MiB
//! ```
//!
//! An object that would hold only zeros is never uploaded: the manifest lists the objects that
//! exist, and every other one reads as zeros. A guest of 8 GiB with 1 GiB of data costs about
//! 1 GiB of upload and storage (rounded to objects). Because every page of a mapped-ram file
//! has a fixed offset, any page is one ranged `GET` away: no index to fetch first. `get`
//! reassembles the exact file a local save writes (QEMU loads it); `put` uploads any local
//! mapped-ram file, QEMU's included, byte for byte.
//!
//! # A save is atomic for readers
//!
//! A save uploads its objects under a new *generation* and then writes the manifest, in one
//! `PUT` that only succeeds if the manifest is still the one the save started from
//! (`If-Match`, or `If-None-Match: *` for a new key): until that moment readers see the
//! previous snapshot, complete; after it, the new one. A second save that committed meanwhile
//! makes this one fail with [`StoreError::Conflict`] instead of silently replacing it. The
//! generation before the previous one is deleted after the commit; the previous one is kept
//! until the next save, so that a reader that started on it (a lazy restore of a running
//! guest) can finish. A failed save deletes what it uploaded; a killed one leaves a
//! generation that no manifest names, which the next save of that key deletes after its
//! commit — it deletes only generations that started before it, whose saves can no longer
//! commit, so a concurrent save's objects are never taken from under it
//! ([`StoreOptions::orphan_grace`]). Objects are single `PUT`s, never multipart uploads, so
//! nothing is ever left half-uploaded.
//!
//! # The executor
//!
//! The store is one more `Storage` under the one executor (`executor.rs`), not another
//! engine: the save is the write engine with a storage that gathers each chunk into one
//! object (`sink.rs`); restore, verify and the userfaultfd restore read through a storage whose
//! `read_pages` are ranged `GET`s (`source.rs`). Requests go through the `object_store` crate
//! (Apache Arrow's), whose S3 client brings signing, retries with exponential backoff on
//! 5xx, 429, timeouts and connection errors, and conditional `PUT`s; this module adds the
//! request timeout and the fault seam under those retries.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod client;
pub mod manifest;
mod save;
mod sink;
mod source;
mod transfer;

pub use manifest::Manifest;
pub use transfer::TransferReport;

use crate::error::{FormatError, IoFailure, Op, RestoreError, SaveError};
use crate::inspect::SnapshotInfo;
use crate::progress::{Cancel, ProgressFn};
use crate::restore::{RestoreOptions, RestoreRegion, RestoreReport};
use crate::save::{SaveOptions, SaveRegion, SaveReport};
use crate::uffd::{UffdOptions, UffdRestore, WorkingSet};
use crate::verify::{VerifyError, VerifyReport};
use crate::LiveRegion;

/// A snapshot's address in a store: `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket.
    pub bucket: String,
    /// The snapshot's key (the manifest's).
    pub key: String,
}

impl StoreUrl {
    /// Parses `s3://bucket/key`.
    ///
    /// ```
    /// # #[cfg(feature = "s3")] {
    /// use mapped_ram_linux::store::StoreUrl;
    /// let u = StoreUrl::parse("s3://snapshots/vm/guest.mr").unwrap();
    /// assert_eq!((u.bucket.as_str(), u.key.as_str()), ("snapshots", "vm/guest.mr"));
    /// assert!(StoreUrl::parse("s3://snapshots/").is_err());
    /// # }
    /// ```
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no key after the bucket"))?;
        if bucket.is_empty() || key.is_empty() || key.ends_with('/') {
            return Err(bad("it needs a bucket and a key that does not end with /"));
        }
        if key
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad("its key has an empty, . or .. segment"));
        }
        if key.contains(".objects/") || key.ends_with(".objects") {
            return Err(bad("a key may not name the objects of another snapshot"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// `true` for anything that starts with `s3://` (what the CLI treats as a store address).
    pub fn is_store(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// `s3://bucket/key`.
    pub fn display(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// The key prefix of every generation's objects: `<key>.objects/`.
    pub(crate) fn objects_prefix(&self) -> String {
        format!("{}.objects/", self.key)
    }

    /// The key of object `index` of `generation`.
    pub(crate) fn object_key(&self, generation: &str, index: u64) -> String {
        format!("{}.objects/{generation}/{index:010}", self.key)
    }
}

/// How to talk to the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Concurrent requests (channels): the executor's threads, each with one request in
    /// flight.
    pub channels: usize,
    /// Object size of a save or `put` (a power of two, 64 KiB to 256 MiB); a read takes the
    /// size from the manifest.
    pub object_bytes: u64,
    /// Retries of one request (5xx, 429, timeouts, connection errors), with exponential
    /// backoff from 100 ms to 5 s.
    pub retries: usize,
    /// No retry starts after this long since the request's first attempt.
    pub retry_timeout: Duration,
    /// One attempt's limit, from connecting to the end of the body.
    pub request_timeout: Duration,
    /// After its commit, a save deletes the generations that no manifest names and that
    /// started before it did (left by killed or failed saves: their commit can no longer
    /// succeed) — those that started at least this long before it. Generation names carry
    /// their start time by the writer's clock: zero (the default) is right for one host;
    /// give writers to one key from several hosts a grace above their clocks' skew.
    pub orphan_grace: Duration,
    /// The endpoint (`http://127.0.0.1:7480`), instead of `AWS_ENDPOINT_URL` /
    /// `AWS_ENDPOINT`; plain `http` is then allowed.
    pub endpoint: Option<String>,
    /// Access key id and secret, instead of `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub credentials: Option<(String, String)>,
    /// The region, instead of `AWS_DEFAULT_REGION` / `AWS_REGION`.
    pub region: Option<String>,
    /// Sign requests without hashing their payload (`UNSIGNED-PAYLOAD`). `None` (the
    /// default): `AWS_UNSIGNED_PAYLOAD` if set, else unsigned over https (TLS protects the
    /// payload, as the AWS SDKs assume) and hashed over plain http. Hashing costs a SHA-256
    /// pass over every byte uploaded: about 20 % of a save's throughput on two cores.
    pub unsigned_payload: Option<bool>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            channels: 16,
            object_bytes: DEFAULT_OBJECT_BYTES,
            retries: 10,
            retry_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            orphan_grace: Duration::ZERO,
            endpoint: None,
            credentials: None,
            region: None,
            unsigned_payload: None,
        }
    }
}

/// The default object size: 4 MiB.
pub const DEFAULT_OBJECT_BYTES: u64 = 4 << 20;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The address is not `s3://bucket/key`.
    #[error("{url} is not a store address: {reason}")]
    Url {
        /// The address given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request failed after its retries, or a local step failed: the operation, the
    /// object (or file) and the offset in the snapshot's file.
    #[error(transparent)]
    Io(#[from] IoFailure),
    /// There is no snapshot at the address.
    #[error("no snapshot at {url}")]
    NoSnapshot {
        /// The address.
        url: String,
    },
    /// The object at the address is not a manifest this build reads (a save does not replace
    /// it).
    #[error("{url} holds no valid snapshot manifest: {reason}")]
    BadManifest {
        /// The address.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Another save committed a snapshot at the address while this one was uploading; this
    /// one's objects were deleted, the other snapshot stands.
    #[error("another save committed {url} while this save was uploading; this save was undone")]
    Conflict {
        /// The address.
        url: String,
    },
    /// An object the manifest names is missing or has the wrong length (deleted by a newer
    /// save after two more commits, or damaged).
    #[error(
        "{url}: object {object} (file bytes from {offset:#x}) is missing or damaged: {reason}"
    )]
    BadObject {
        /// The address.
        url: String,
        /// Its index.
        object: u64,
        /// Its first byte in the file.
        offset: u64,
        /// What was found.
        reason: String,
    },
    /// A `put` or `get` was cancelled ([`Store::put`], [`Store::get`]): nothing was
    /// committed, the local file was left as it was.
    #[error("the transfer with {url} was cancelled")]
    Cancelled {
        /// The address.
        url: String,
    },
    /// The options are not usable (object size, channels).
    #[error("{0}")]
    Options(String),
    /// The save failed (guest memory, the snapshot's structure).
    #[error(transparent)]
    Save(#[from] SaveError),
    /// The restore failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The snapshot's structure is invalid.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The verification could not run.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// A connection to one snapshot's address in a store.
///
/// ```no_run
/// # #[cfg(feature = "s3")] {
/// use mapped_ram_linux::store::{Store, StoreOptions};
/// use mapped_ram_linux::{RestoreOptions, RestoreRegion, SaveOptions, SaveRegion};
///
/// // Endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
/// let store = Store::connect("s3://snapshots/vm1/guest.mr", StoreOptions::default())?;
/// let ram = vec![0u8; 64 << 20];
/// let regions = [SaveRegion { name: "pc.ram", memory: &ram, page_size: 4096 }];
/// let report = store.save(&regions, &SaveOptions::default(), None)?;
/// println!("uploaded {} of {} bytes", report.bytes_uploaded, report.save.ram_bytes);
/// let mut back = vec![0u8; 64 << 20];
/// store.restore(&mut [RestoreRegion { name: "pc.ram", memory: &mut back, page_size: 4096 }],
///               &RestoreOptions::default(), None)?;
/// # }
/// # Ok::<(), mapped_ram_linux::store::StoreError>(())
/// ```
pub struct Store {
    client: Arc<client::Client>,
    opts: StoreOptions,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.client.url.display())
            .field("opts", &self.opts)
            .finish()
    }
}

/// What a save to a store did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreSaveReport {
    /// The save as a local save reports it (pages, data bytes, seconds, ...); its `path` is
    /// the store address.
    pub save: SaveReport,
    /// The generation now at the address.
    pub generation: String,
    /// Objects uploaded (of [`objects_total`](Self::objects_total)).
    pub objects_uploaded: u64,
    /// Objects of the file, uploaded or not.
    pub objects_total: u64,
    /// Bytes uploaded: what the store now holds for this snapshot, beside the manifest.
    pub bytes_uploaded: u64,
    /// Objects of older generations deleted (superseded, or left by failed saves).
    pub objects_deleted: u64,
}

/// A store snapshot's structure and manifest (see [`Store::inspect`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreInfo {
    /// The snapshot's structure, as [`crate::inspect()`] reports a file's.
    pub info: SnapshotInfo,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Store {
    /// Connects to the snapshot address `url` (`s3://bucket/key`), with the endpoint and
    /// credentials of the `AWS_*` environment variables. Nothing is sent yet.
    pub fn connect(url: &str, opts: StoreOptions) -> Result<Self, StoreError> {
        let parsed = StoreUrl::parse(url)?;
        if opts.channels == 0 || opts.channels > 255 {
            return Err(StoreError::Options(format!(
                "channels must be between 1 and 255, not {}",
                opts.channels
            )));
        }
        if !opts.object_bytes.is_power_of_two()
            || !(manifest::MIN_OBJECT_BYTES..=manifest::MAX_OBJECT_BYTES)
                .contains(&opts.object_bytes)
        {
            return Err(StoreError::Options(format!(
                "object size must be a power of two from 64 KiB to 256 MiB, not {}",
                opts.object_bytes
            )));
        }
        let client = client::Client::connect(&parsed, &opts)
            .map_err(|e| IoFailure::new(Op::StoreGet, parsed.display(), None, e))?;
        Ok(Self {
            client: Arc::new(client),
            opts,
        })
    }

    /// The address, `s3://bucket/key`.
    pub fn url(&self) -> String {
        self.client.url.display()
    }

    /// The options it was connected with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Saves `regions` (memory that does not change while saved: a paused guest) as the
    /// snapshot at the address, atomically (see the module docs). `opts` as for a local
    /// save; its channels, direct I/O, offset and fsync settings do not apply (the store's
    /// options say how many requests run at once).
    pub fn save(
        &self,
        regions: &[SaveRegion<'_>],
        opts: &SaveOptions,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<StoreSaveReport, StoreError> {
        let blocks = regions
            .iter()
            .map(|r| crate::writer::Block {
                name: r.name,
                memory: crate::mem::GuestMemory::from_slice(r.memory),
                page_size: r.page_size,
            })
            .collect();
        save::save(self, blocks, opts, progress)
    }

    /// [`Store::save`] of memory another party may change (RAM files read with `pread`,
    /// shared mappings): each chunk is copied before it is checked and uploaded.
    pub fn save_memory(
        &self,
        regions: &[LiveRegion<'_>],
        opts: &SaveOptions,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<StoreSaveReport, StoreError> {
        save::save(self, crate::live::blocks(regions), opts, progress)
    }

    /// Restores the blocks `regions` name, with ranged `GET`s on the store's channels; the
    /// same checks, checksum verification and report as [`crate::restore()`].
    pub fn restore(
        &self,
        regions: &mut [RestoreRegion<'_>],
        opts: &RestoreOptions,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<RestoreReport, StoreError> {
        let snap = source::open(self)?;
        let mut opts = opts.clone();
        opts.channels = self.opts.channels;
        // One read per object at most: a read never spans more than two objects.
        opts.chunk_bytes = snap.source.object_bytes();
        let report = crate::restore::restore_from_storage(
            &snap.info,
            snap.source.metadata_fd(),
            &snap.label,
            &snap.source,
            regions,
            &opts,
            progress,
        )?;
        Ok(report)
    }

    /// The snapshot's structure and manifest (only the manifest and the objects that hold
    /// metadata are fetched).
    pub fn inspect(&self) -> Result<StoreInfo, StoreError> {
        let snap = source::open(self)?;
        Ok(StoreInfo {
            info: snap.info,
            manifest: snap.source.manifest().clone(),
        })
    }

    /// Checks the snapshot as [`crate::verify()`] checks a file: structure, every stored
    /// page against its checksum, and the `expected` RAM.
    pub fn verify(&self, expected: &[SaveRegion<'_>]) -> Result<VerifyReport, StoreError> {
        let snap = source::open(self)?;
        Ok(crate::verify::verify_on(
            &snap.info,
            snap.source.metadata_fd(),
            &snap.label,
            &snap.source,
            expected,
        )?)
    }

    /// Restores the blocks `names` (every block with data when empty) into memory served by
    /// userfaultfd, faults answered by ranged `GET`s of their window while a prefetch streams
    /// the rest in (the recorded working set first): returns as soon as the memory can be
    /// handed to the guest, after fetching only the manifest and the metadata objects. See
    /// [`crate::restore_uffd`].
    pub fn restore_uffd(
        &self,
        names: &[&str],
        opts: &UffdOptions,
    ) -> Result<UffdRestore, StoreError> {
        let started = Instant::now();
        let snap = source::open(self)?;
        let mut opts = opts.clone();
        if opts.prefetch_channels > 0 {
            opts.prefetch_channels = self.opts.channels;
        }
        if opts.working_set.is_none() {
            opts.working_set = self.working_set_of(&snap.source.manifest().generation)?;
        }
        let label = snap.label.clone();
        let source: crate::uffd::Source = Arc::new(snap.source);
        Ok(crate::uffd::restore_uffd_from(
            &snap.info, &label, source, None, names, &opts, started,
        )?)
    }

    /// Uploads the local mapped-ram file `path` (ours or QEMU's; its migration stream at
    /// `offset`) as the snapshot at the address, sparse and atomically, as a save would.
    ///
    /// `cancel` stops it between objects with [`StoreError::Cancelled`]: nothing is
    /// committed and what it uploaded is deleted.
    pub fn put(
        &self,
        path: &Path,
        offset: u64,
        progress: Option<ProgressFn<'_>>,
        cancel: Option<&Cancel>,
    ) -> Result<TransferReport, StoreError> {
        transfer::put(self, path, offset, progress, cancel)
    }

    /// Downloads the snapshot into the local file `path`, byte for byte the file that was
    /// saved or put (written to a temporary beside `path`, synced and renamed over it).
    ///
    /// `cancel` stops it between objects with [`StoreError::Cancelled`]: `path` is left as
    /// it was and the temporary removed.
    pub fn get(
        &self,
        path: &Path,
        progress: Option<ProgressFn<'_>>,
        cancel: Option<&Cancel>,
    ) -> Result<TransferReport, StoreError> {
        transfer::get(self, path, progress, cancel)
    }

    /// Stores `ws` (recorded by a restore of this snapshot, [`UffdRestore::working_set`]) with
    /// the snapshot now at the address: later [`Store::restore_uffd`]s prefetch it first. It
    /// lives and is deleted with the snapshot's generation.
    pub fn save_working_set(&self, ws: &WorkingSet) -> Result<(), StoreError> {
        let url = self.url();
        let (m, _) = self
            .current()?
            .ok_or_else(|| StoreError::NoSnapshot { url: url.clone() })?;
        let key = self.working_set_key(&m.generation);
        self.client
            .put(&key, bytes::Bytes::from(ws.to_text()))
            .map_err(|e| IoFailure::new(Op::StorePut, &url, None, e))?;
        Ok(())
    }

    /// The working set stored with generation `generation`, if any.
    fn working_set_of(&self, generation: &str) -> Result<Option<WorkingSet>, StoreError> {
        let key = self.working_set_key(generation);
        let url = self.url();
        match self.client.get(&key) {
            Ok(Some(f)) => Ok(Some(WorkingSet::parse(&f.bytes, Path::new(&url))?)),
            Ok(None) => Ok(None),
            Err(e) => Err(IoFailure::new(Op::StoreGet, &url, None, e).into()),
        }
    }

    fn working_set_key(&self, generation: &str) -> String {
        format!(
            "{}{generation}/working-set",
            self.client.url.objects_prefix()
        )
    }

    /// The manifest at the address and its entity tag; `None` when there is none.
    fn current(&self) -> Result<Option<(Manifest, Option<String>)>, StoreError> {
        let url = self.url();
        let key = self.client.url.key.clone();
        let Some(fetched) = self
            .client
            .get(&key)
            .map_err(|e| IoFailure::new(Op::StoreGet, &url, None, e))?
        else {
            return Ok(None);
        };
        let bad = |reason: String| StoreError::BadManifest {
            url: url.clone(),
            reason,
        };
        if fetched.bytes.len() > manifest::MAX_MANIFEST_BYTES {
            return Err(bad(format!("{} bytes is too large", fetched.bytes.len())));
        }
        let m: Manifest = serde_json::from_slice(&fetched.bytes).map_err(|e| bad(e.to_string()))?;
        m.check().map_err(bad)?;
        Ok(Some((m, fetched.e_tag)))
    }

    /// Generations under the address's objects prefix, with their object keys.
    fn generations(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let prefix = self.client.url.objects_prefix();
        let listed = self.client.list(&prefix).map_err(|e| {
            IoFailure::new(
                Op::StoreList,
                format!("s3://{}/{prefix}", self.client.url.bucket),
                None,
                e,
            )
        })?;
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (key, _) in listed {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let generation = rest.split('/').next().unwrap_or("").to_string();
            match out.iter_mut().find(|(g, _)| *g == generation) {
                Some((_, keys)) => keys.push(key),
                None => out.push((generation, vec![key])),
            }
        }
        Ok(out)
    }

    /// After a commit of generation `ours`: deletes every generation except `keep` that
    /// started at least `grace` before `ours` did (left by killed or failed saves, or
    /// superseded); returns how many objects it deleted.
    ///
    /// A generation that started before this save and that the new manifest does not name
    /// cannot be committed any more: its save read an older manifest and its conditional
    /// `PUT` will fail ([`StoreError::Conflict`]). One that started after this save may still
    /// commit, so it is left alone. The two saves' clocks are compared: `grace` covers the
    /// skew between hosts that save to one key.
    fn delete_generations(
        &self,
        keep: &[&str],
        ours: &str,
        grace: Duration,
    ) -> Result<u64, StoreError> {
        let limit = manifest::generation_start(ours)
            .map(|t| t.saturating_sub(grace.as_millis() as u64))
            .unwrap_or(0);
        let mut deleted = 0u64;
        for (generation, keys) in self.generations()? {
            if keep.contains(&generation.as_str()) {
                continue;
            }
            // Names that are not ours (no start time) are left by nothing this code writes;
            // they are deleted like an orphan.
            if manifest::generation_start(&generation).is_some_and(|t| t >= limit) {
                continue;
            }
            self.client.delete(&keys).map_err(|e| {
                IoFailure::new(Op::StoreDelete, self.object_url(&generation), None, e)
            })?;
            deleted += keys.len() as u64;
        }
        Ok(deleted)
    }

    fn object_url(&self, generation: &str) -> String {
        format!(
            "s3://{}/{}{generation}/",
            self.client.url.bucket,
            self.client.url.objects_prefix()
        )
    }
}

/// The label of a store snapshot in errors and reports: its address.
fn label(store: &Store) -> PathBuf {
    PathBuf::from(store.url())
}

/// An `io::Error` for a local step (the metadata memfd).
fn local(op: Op, what: &str, e: io::Error) -> StoreError {
    StoreError::Io(IoFailure::new(op, what, None, e))
}
