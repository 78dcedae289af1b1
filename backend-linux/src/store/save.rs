//! Save to a store: the write engine ([`crate::writer`]) with the store's [`Sink`] as its
//! storage and a memfd as its "file" for the metadata; then the objects that hold metadata,
//! then the manifest (see the [module docs](super)).

use std::collections::HashSet;
use std::os::fd::AsFd;

use bytes::Bytes;
use mapped_ram_core::objects::{object_chunks, object_count};

use super::manifest::{new_generation, Manifest, FORMAT, VERSION};
use super::sink::Sink;
use super::transfer::{commit_manifest, for_each_object, undo};
use super::{label, local, Store, StoreError, StoreSaveReport};
use crate::error::{IoFailure, Op};
use crate::file::{self, DirectIo};
use crate::progress::ProgressFn;
use crate::save::SaveOptions;
use crate::writer::{Block, Dirty, Writer};

pub(super) fn save(
    store: &Store,
    blocks: Vec<Block<'_>>,
    so: &SaveOptions,
    mut progress: Option<ProgressFn<'_>>,
) -> Result<StoreSaveReport, StoreError> {
    let url = store.url();
    let current = store.current()?;
    let object_bytes = store.opts.object_bytes;
    let generation = new_generation();
    let meta =
        rustix::fs::memfd_create("mapped-ram-store-metadata", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| local(Op::Open, "memfd", e.into()))?;
    let mut so = so.clone();
    so.channels = store.opts.channels;
    so.chunk_bytes = object_bytes;
    so.direct_io = DirectIo::Off;
    so.fsync = false;
    so.offset = 0;
    so.preallocate = false;
    let w = Writer::to_fds(meta.as_fd(), meta.as_fd(), blocks, &so)?;
    let whole: HashSet<u64> = object_chunks(&w.layouts, object_bytes)
        .filter(|c| c.whole)
        .map(|c| c.object)
        .collect();
    let sink = Sink::new(
        &store.client,
        &store.client.url,
        &generation,
        object_bytes,
        meta.as_fd(),
        whole,
        so.channels,
    );
    let mut w = w.with_sink(&sink, object_bytes, &label(store));
    let result = (|| {
        w.pass(Dirty::All, progress.as_mut())?;
        let finished = w.finish(None)?;
        // The objects that hold metadata, from the memfd; an all-zero one is not uploaded.
        let count = object_count(finished.file_size, object_bytes);
        let todo: Vec<u64> = (0..count).filter(|o| !sink.whole.contains(o)).collect();
        let metadata = std::sync::Mutex::new(Vec::new());
        for_each_object(
            store.opts.channels,
            todo,
            None,
            None,
            &url,
            |_, object, buf| {
                let start = object * object_bytes;
                let len = object_bytes.min(finished.file_size - start) as usize;
                buf.resize(len, 0);
                file::preadv_exact(meta.as_fd(), buf, start)
                    .map_err(|e| local(Op::ReadStream, "memfd", e))?;
                if crate::zero::is_zero(buf) {
                    return Ok(0);
                }
                sink.upload(object, Bytes::copy_from_slice(buf))
                    .map_err(|e| IoFailure::new(Op::StorePut, &url, Some(start), e))?;
                metadata
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(object);
                Ok(len as u64)
            },
        )?;
        let mut metadata = metadata.into_inner().unwrap_or_else(|p| p.into_inner());
        metadata.sort_unstable();
        Ok::<_, StoreError>((finished, metadata))
    })();
    let (finished, metadata) = match result {
        Ok(v) => v,
        Err(e) => {
            undo(store, &generation);
            return Err(e);
        }
    };
    let mut uploaded = sink
        .uploaded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    uploaded.sort_unstable();
    let bytes_uploaded = sink.bytes.load(std::sync::atomic::Ordering::Relaxed);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        generation: generation.clone(),
        previous: current.as_ref().map(|(m, _)| m.generation.clone()),
        file_size: finished.file_size,
        stream_offset: 0,
        object_bytes,
        objects: Manifest::ranges_of(uploaded.iter().copied()),
        metadata,
        trimmed: {
            let mut t = sink
                .trimmed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            t.sort_unstable();
            t
        },
        stored_bytes: bytes_uploaded,
        created_unix: 0,
    };
    let mut save = crate::save::report(&w, &finished);
    let deleted = commit_manifest(store, manifest.clone(), current)?;
    save.seconds = w.started.elapsed().as_secs_f64();
    save.channels = store.opts.channels;
    Ok(StoreSaveReport {
        save,
        generation,
        objects_uploaded: uploaded.len() as u64,
        objects_total: object_count(finished.file_size, object_bytes),
        bytes_uploaded,
        objects_deleted: deleted,
    })
}
