//! The read side of the store executor: opening a store snapshot (its manifest, then the
//! objects that hold metadata, into a local memfd) and a [`Storage`] whose reads are ranged
//! `GET`s.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use super::client::Client;
use super::manifest::Manifest;
use super::transfer::for_each_object;
use super::{label, local, Store, StoreError};
use crate::error::{IoFailure, Op};
use crate::executor::{Pages, Storage};
use crate::file;
use crate::inspect::{read_structure, SnapshotInfo};

/// A store snapshot, opened: its structure and the storage that reads its pages.
pub(crate) struct Opened {
    pub info: SnapshotInfo,
    pub source: StoreSource,
    pub label: PathBuf,
}

/// Reads a store snapshot's pages (see the module docs): from the metadata memfd for the
/// objects that hold metadata (fetched when the snapshot was opened), zeros for objects that
/// do not exist, ranged `GET`s for the rest.
pub(crate) struct StoreSource {
    client: Arc<Client>,
    manifest: Manifest,
    meta: OwnedFd,
    label: String,
}

impl StoreSource {
    pub fn object_bytes(&self) -> u64 {
        self.manifest.object_bytes
    }

    pub fn metadata_fd(&self) -> BorrowedFd<'_> {
        self.meta.as_fd()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

impl Storage for StoreSource {
    fn write_pages(&self, _: usize, _: Pages, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn read_pages(&self, _: usize, _: Pages, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let m = &self.manifest;
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            if pos >= m.file_size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: read past the end at {pos:#x}", self.label),
                ));
            }
            let object = pos / m.object_bytes;
            let range = m.object_range(object);
            let n = (buf.len() - at).min((range.end - pos) as usize);
            let dst = &mut buf[at..at + n];
            if !m.has(object) {
                dst.fill(0);
            } else if m.metadata.binary_search(&object).is_ok() {
                file::preadv_exact(self.meta.as_fd(), dst, pos)?;
            } else {
                // Only the object's stored bytes are fetched; what lies outside them is zero.
                let stored = m.stored_range(object);
                let lo = pos.max(stored.start);
                let hi = (pos + n as u64).min(stored.end);
                if lo >= hi {
                    dst.fill(0);
                } else {
                    let (a, b) = ((lo - pos) as usize, (hi - pos) as usize);
                    dst[..a].fill(0);
                    dst[b..].fill(0);
                    let bytes = self.client.get_range(
                        &self.client.url.object_key(&m.generation, object),
                        lo - stored.start..hi - stored.start,
                    )?;
                    dst[a..b].copy_from_slice(&bytes);
                }
            }
            at += n;
        }
        Ok(())
    }
}

/// Opens the snapshot at `store`'s address: the manifest, then the metadata objects (in
/// parallel) into a memfd the size of the file, whose structure is then read and checked
/// like a local file's.
pub(crate) fn open(store: &Store) -> Result<Opened, StoreError> {
    let url = store.url();
    let (mut manifest, _) = store
        .current()?
        .ok_or_else(|| StoreError::NoSnapshot { url: url.clone() })?;
    manifest.metadata.sort_unstable();
    let meta =
        rustix::fs::memfd_create("mapped-ram-store-metadata", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| local(Op::Open, "memfd", e.into()))?;
    file::set_len(meta.as_fd(), manifest.file_size).map_err(|e| local(Op::Truncate, "memfd", e))?;
    let client = &store.client;
    let m = &manifest;
    let fd = meta.as_fd();
    for_each_object(
        store.opts.channels,
        m.metadata.clone(),
        None,
        None,
        &url,
        |_, object, _| {
            let range = m.object_range(object);
            let key = client.url.object_key(&m.generation, object);
            let bytes = client
                .get_range(&key, 0..range.end - range.start)
                .map_err(|e| bad_object(&url, object, range.start, e))?;
            file::write_all_at(fd, &bytes, range.start, Op::WriteStream)
                .map_err(|e| local(Op::WriteStream, "memfd", e))?;
            Ok(bytes.len() as u64)
        },
    )?;
    let label = label(store);
    let info = read_structure(meta.as_fd(), &label, manifest.stream_offset)?;
    // Every object that holds metadata must have been fetched: the manifest must list it.
    let layouts: Vec<_> = info.blocks.iter().map(|b| b.layout).collect();
    for object in manifest.present() {
        let whole = mapped_ram_core::objects::is_whole(&layouts, manifest.object_bytes, object);
        if !whole && manifest.metadata.binary_search(&object).is_err() {
            return Err(StoreError::BadManifest {
                url,
                reason: format!("object {object} holds metadata but is not listed as such"),
            });
        }
    }
    Ok(Opened {
        info,
        source: StoreSource {
            client: Arc::clone(&store.client),
            manifest,
            meta,
            label: store.url(),
        },
        label,
    })
}

/// A failed fetch of an object the manifest names: missing (`NotFound`) or short is damage;
/// anything else is the request's failure.
pub(crate) fn bad_object(url: &str, object: u64, offset: u64, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof => StoreError::BadObject {
            url: url.to_string(),
            object,
            offset,
            reason: e.to_string(),
        },
        _ => StoreError::Io(IoFailure::new(Op::StoreGet, url, Some(offset), e)),
    }
}
