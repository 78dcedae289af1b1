//! The write side of the store executor: a [`Storage`] that gathers each chunk the write
//! engine writes into one object and uploads it when the chunk is done.
//!
//! The engine's chunks are cut at object boundaries
//! ([`object_chunks`](mapped_ram_core::objects::object_chunks)). A chunk that fills one object
//! entirely is staged in its channel's buffer and `PUT` at
//! [`end_chunk`](Storage::end_chunk), without its leading and trailing zeros; a chunk whose
//! pages are all zero is never written, so its object never exists. Pages of the other objects (those that also hold metadata) go
//! into the local metadata file, a memfd, with the stream, bitmaps and checksums; those few
//! objects are uploaded after the engine's finish step.

use std::collections::HashSet;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::client::Client;
use super::StoreUrl;
use crate::error::Op;
use crate::executor::{Pages, Storage};
use crate::file;

/// See the module docs.
pub(crate) struct Sink<'a> {
    pub client: &'a Client,
    pub url: &'a StoreUrl,
    pub generation: &'a str,
    pub object_bytes: u64,
    /// The local metadata file (pages of objects that are not whole land here).
    pub meta: BorrowedFd<'a>,
    /// The objects that one chunk fills entirely.
    pub whole: HashSet<u64>,
    stages: Vec<Mutex<Stage>>,
    /// Objects uploaded.
    pub uploaded: Mutex<Vec<u64>>,
    /// Bytes uploaded.
    pub bytes: AtomicU64,
    /// Objects stored without their leading and trailing zeros (see [`Manifest::trimmed`]).
    ///
    /// [`Manifest::trimmed`]: super::Manifest::trimmed
    pub trimmed: Mutex<Vec<[u64; 3]>>,
}

/// A channel's object being assembled.
#[derive(Default)]
struct Stage {
    object: Option<u64>,
    buf: Vec<u8>,
}

impl<'a> Sink<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: &'a Client,
        url: &'a StoreUrl,
        generation: &'a str,
        object_bytes: u64,
        meta: BorrowedFd<'a>,
        whole: HashSet<u64>,
        channels: usize,
    ) -> Self {
        Self {
            client,
            url,
            generation,
            object_bytes,
            meta,
            whole,
            stages: (0..channels.max(1)).map(|_| Mutex::default()).collect(),
            uploaded: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            trimmed: Mutex::new(Vec::new()),
        }
    }

    /// Uploads object `index` with `body`.
    pub fn upload(&self, index: u64, body: Bytes) -> io::Result<()> {
        let len = body.len() as u64;
        self.client
            .put(&self.url.object_key(self.generation, index), body)?;
        self.uploaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(index);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl Storage for Sink<'_> {
    fn write_pages(&self, channel: usize, _: Pages, data: &[u8], offset: u64) -> io::Result<()> {
        let object = offset / self.object_bytes;
        if !self.whole.contains(&object) {
            return file::write_all_at(self.meta, data, offset, Op::WritePages);
        }
        let mut stage = self.stages[channel % self.stages.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if stage.object != Some(object) {
            if let Some(other) = stage.object {
                return Err(io::Error::other(format!(
                    "internal: object {object} written before object {other} was finished"
                )));
            }
            stage.object = Some(object);
            stage.buf = vec![0u8; self.object_bytes as usize];
        }
        let at = (offset - object * self.object_bytes) as usize;
        let dst = stage
            .buf
            .get_mut(at..at + data.len())
            .ok_or_else(|| io::Error::other("internal: a write crosses an object boundary"))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn read_pages(&self, _: usize, _: Pages, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn end_chunk(&self, channel: usize) -> io::Result<()> {
        let (object, buf) = {
            let mut stage = self.stages[channel % self.stages.len()]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match stage.object.take() {
                Some(object) => (object, std::mem::take(&mut stage.buf)),
                None => return Ok(()),
            }
        };
        // Leading and trailing zeros are not stored: they read as zeros.
        let Some(extent) = super::manifest::stored_extent(&buf) else {
            return Ok(());
        };
        if extent.len() < buf.len() {
            let start = object * self.object_bytes;
            self.trimmed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push([
                    object,
                    start + extent.start as u64,
                    start + extent.end as u64,
                ]);
        }
        self.upload(object, Bytes::from(buf).slice(extent))
    }
}
