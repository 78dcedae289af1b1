//! `put` and `get` between a store and a local file, the manifest commit they share with a
//! save, and [`for_each_object`]: object-at-a-time work on the one executor.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use mapped_ram_core::objects::{is_whole, object_count};
use mapped_ram_core::schedule::Chunk;

use super::manifest::{new_generation, Manifest, FORMAT, VERSION};
use super::source::bad_object;
use super::{Store, StoreError};
use crate::commit::Temp;
use crate::error::{IoFailure, Op};
use crate::executor::{self, ChunkList, Control, Job, Stopped};
use crate::file;
use crate::inspect::open_snapshot;
use crate::progress::{Cancel, Progress, ProgressFn};

/// What a `put` or `get` did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransferReport {
    /// The store address.
    pub url: String,
    /// The local file.
    pub path: PathBuf,
    /// The file's length.
    pub file_size: u64,
    /// Objects of the file.
    pub objects_total: u64,
    /// Objects sent or received (the others are zeros).
    pub objects_transferred: u64,
    /// Bytes sent or received.
    pub bytes_transferred: u64,
    /// The generation at the address.
    pub generation: String,
    /// Objects of older generations deleted (`put`).
    pub objects_deleted: u64,
    /// Seconds in all.
    pub seconds: f64,
}

impl TransferReport {
    /// Bytes transferred per second, in GiB.
    pub fn gib_per_second(&self) -> f64 {
        crate::save::gib_per_s(self.bytes_transferred, self.seconds)
    }
}

/// Runs `f(channel, object, scratch)` for every object of `objects` on `channels` threads of
/// the executor; `f` returns the bytes it moved (progress).
/// `cancel` stops it between objects ([`StoreError::Cancelled`]).
pub(crate) fn for_each_object<F>(
    channels: usize,
    objects: Vec<u64>,
    progress: Option<(&mut ProgressFn<'_>, u64)>,
    cancel: Option<&Cancel>,
    url: &str,
    f: F,
) -> Result<(), StoreError>
where
    F: Fn(usize, u64, &mut Vec<u8>) -> Result<u64, StoreError> + Sync,
{
    struct Each<F>(F);
    impl<F> Job for Each<F>
    where
        F: Fn(usize, u64, &mut Vec<u8>) -> Result<u64, StoreError> + Sync,
    {
        type Scratch = Vec<u8>;
        type Error = StoreError;
        fn scratch(&self) -> Vec<u8> {
            Vec::new()
        }
        fn chunk(&self, ch: usize, buf: &mut Vec<u8>, c: &Chunk) -> Result<u64, StoreError> {
            (self.0)(ch, c.start, buf)
        }
    }
    let list = ChunkList::new(
        objects
            .into_iter()
            .map(|o| Chunk {
                block: 0,
                start: o,
                end: o + 1,
            })
            .collect(),
    );
    let (cb, total) = match progress {
        Some((cb, total)) => (Some(cb), total),
        None => (None, 0),
    };
    let ctl = Control {
        cancel,
        progress: cb,
        total,
    };
    match executor::execute(channels, &list, &Each(f), ctl) {
        Ok(()) => Ok(()),
        Err(Stopped::Cancelled) => Err(StoreError::Cancelled {
            url: url.to_string(),
        }),
        Err(Stopped::Failed(e)) => Err(e),
    }
}

/// Deletes the objects of `generation` (a save that failed), best effort.
pub(crate) fn undo(store: &Store, generation: &str) {
    if let Ok(all) = store.generations() {
        for (g, keys) in all {
            if g == generation {
                let _ = store.client.delete(&keys);
            }
        }
    }
}

/// Commits `manifest` at the address if it is still `current` (see the module docs); then
/// deletes the generations neither it nor its predecessor use. Returns the objects deleted.
pub(crate) fn commit_manifest(
    store: &Store,
    mut manifest: Manifest,
    current: Option<(Manifest, Option<String>)>,
) -> Result<u64, StoreError> {
    let url = store.url();
    manifest.created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = serde_json::to_vec(&manifest).map_err(|e| StoreError::BadManifest {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    let e_tag = current.as_ref().and_then(|(_, tag)| tag.as_deref());
    let key = &store.client.url.key;
    let body = Bytes::from(body);
    // The entity tag without its quotes first: Ceph RGW 16.2 compares `If-Match` with the
    // bare tag and answers 412 to the quoted form even when it matches. If a store refuses
    // the bare form while the manifest is still the one we saw, the quoted form is sent.
    let mut result = store
        .client
        .put_if(key, body.clone(), e_tag.map(|t| t.trim_matches('"')));
    if let (Err(e), Some(seen)) = (&result, e_tag) {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let now = store.current()?.and_then(|(_, t)| t);
            if now.as_deref() == Some(seen) && seen.starts_with('"') {
                result = store.client.put_if(key, body, Some(seen));
            }
        }
    }
    if let Err(e) = result {
        undo(store, &manifest.generation);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(StoreError::Conflict { url });
        }
        return Err(IoFailure::new(Op::StorePut, &url, None, e).into());
    }
    let keep: Vec<&str> = std::iter::once(manifest.generation.as_str())
        .chain(manifest.previous.as_deref())
        .collect();
    // Best effort: the snapshot is committed; what is left is deleted by the next save.
    Ok(store
        .delete_generations(&keep, &manifest.generation, store.opts.orphan_grace)
        .unwrap_or(0))
}

/// See [`Store::put`].
pub(super) fn put(
    store: &Store,
    path: &Path,
    offset: u64,
    mut progress: Option<ProgressFn<'_>>,
    cancel: Option<&Cancel>,
) -> Result<TransferReport, StoreError> {
    let started = Instant::now();
    let url = store.url();
    let snap = open_snapshot(path, offset)?;
    let layouts: Vec<_> = snap.info.blocks.iter().map(|b| b.layout).collect();
    let file_size = snap.info.file_size;
    let current = store.current()?;
    let object_bytes = store.opts.object_bytes;
    let generation = new_generation();
    let count = object_count(file_size, object_bytes);
    let fd = snap.fd.as_fd();
    let uploaded = Mutex::new(Vec::new());
    let trimmed = Mutex::new(Vec::new());
    let bytes = AtomicU64::new(0);
    let result = for_each_object(
        store.opts.channels,
        (0..count).collect(),
        progress.as_mut().map(|p| (p, file_size)),
        cancel,
        &url,
        |_, object, buf| {
            let start = object * object_bytes;
            let end = (start + object_bytes).min(file_size);
            // Holes cost nothing to skip; data that is all zeros is read and skipped.
            match file::seek(fd, start, true) {
                Ok(Some(at)) if at >= end => return Ok(end - start),
                Ok(None) => return Ok(end - start),
                _ => {}
            }
            buf.resize((end - start) as usize, 0);
            file::preadv_exact(fd, buf, start)
                .map_err(|e| IoFailure::new(Op::ReadPages, path, Some(start), e))?;
            let Some(mut extent) = super::manifest::stored_extent(buf) else {
                return Ok(end - start);
            };
            // Objects that hold metadata are stored whole (a reader fetches them first);
            // the others without their leading and trailing zeros.
            if !is_whole(&layouts, object_bytes, object) {
                extent = 0..buf.len();
            } else if extent.len() < buf.len() {
                trimmed.lock().unwrap_or_else(|p| p.into_inner()).push([
                    object,
                    start + extent.start as u64,
                    start + extent.end as u64,
                ]);
            }
            let key = store.client.url.object_key(&generation, object);
            let len = extent.len() as u64;
            store
                .client
                .put(&key, Bytes::copy_from_slice(&buf[extent]))
                .map_err(|e| IoFailure::new(Op::StorePut, &url, Some(start), e))?;
            uploaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(object);
            bytes.fetch_add(len, Ordering::Relaxed);
            Ok(end - start)
        },
    );
    if let Err(e) = result {
        undo(store, &generation);
        return Err(e);
    }
    let mut uploaded = uploaded.into_inner().unwrap_or_else(|p| p.into_inner());
    uploaded.sort_unstable();
    let metadata: Vec<u64> = uploaded
        .iter()
        .copied()
        .filter(|&o| !is_whole(&layouts, object_bytes, o))
        .collect();
    let bytes = bytes.load(Ordering::Relaxed);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        generation: generation.clone(),
        previous: current.as_ref().map(|(m, _)| m.generation.clone()),
        file_size,
        stream_offset: offset,
        object_bytes,
        objects: Manifest::ranges_of(uploaded.iter().copied()),
        metadata,
        trimmed: {
            let mut t = trimmed.into_inner().unwrap_or_else(|p| p.into_inner());
            t.sort_unstable();
            t
        },
        stored_bytes: bytes,
        created_unix: 0,
    };
    let deleted = commit_manifest(store, manifest, current)?;
    Ok(TransferReport {
        url,
        path: path.to_path_buf(),
        file_size,
        objects_total: count,
        objects_transferred: uploaded.len() as u64,
        bytes_transferred: bytes,
        generation,
        objects_deleted: deleted,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// See [`Store::get`].
pub(super) fn get(
    store: &Store,
    path: &Path,
    mut progress: Option<ProgressFn<'_>>,
    cancel: Option<&Cancel>,
) -> Result<TransferReport, StoreError> {
    let started = Instant::now();
    let url = store.url();
    let (manifest, _) = store
        .current()?
        .ok_or_else(|| StoreError::NoSnapshot { url: url.clone() })?;
    let temp = Temp::create(path, 0o600)?;
    file::set_len(temp.fd.as_fd(), manifest.file_size)
        .map_err(|e| IoFailure::new(Op::Truncate, &temp.path, Some(manifest.file_size), e))?;
    let fd = temp.fd.as_fd();
    let m = &manifest;
    let bytes = AtomicU64::new(0);
    let total = m.stored_bytes;
    if let Some(cb) = progress.as_mut() {
        cb(Progress { done: 0, total });
    }
    for_each_object(
        store.opts.channels,
        m.present().collect(),
        progress.as_mut().map(|p| (p, total)),
        cancel,
        &url,
        |_, object, _| {
            let range = m.stored_range(object);
            let key = store.client.url.object_key(&m.generation, object);
            let data = store
                .client
                .get_range(&key, 0..range.end - range.start)
                .map_err(|e| bad_object(&url, object, m.object_range(object).start, e))?;
            file::pwritev_all(fd, &data, range.start)
                .map_err(|e| IoFailure::new(Op::WritePages, &temp.path, Some(range.start), e))?;
            bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(data.len() as u64)
        },
    )?;
    temp.commit(path, true)?.release_in_background();
    Ok(TransferReport {
        url,
        path: path.to_path_buf(),
        file_size: m.file_size,
        objects_total: m.object_count(),
        objects_transferred: m.present_count(),
        bytes_transferred: bytes.load(Ordering::Relaxed),
        generation: m.generation.clone(),
        objects_deleted: 0,
        seconds: started.elapsed().as_secs_f64(),
    })
}
