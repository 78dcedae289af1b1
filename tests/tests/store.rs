//! Snapshots in an S3 object store, against a real Ceph RGW (radosgw on 127.0.0.1, started by
//! `scripts/ceph-rgw/start.sh` through [`mapped_ram_tests::rgw`]): a store save is the local
//! save's file, byte for byte, in sparse objects; failures of the store (5xx, resets, slow
//! answers, a gateway killed mid-transfer, a save killed with SIGKILL, a concurrent save) are
//! retried or reported with the address, object and offset, and never replace or damage the
//! snapshot readers see; the userfaultfd restore serves faults from ranged GETs; QEMU loads
//! what `get` writes and `put` stores what QEMU wrote.
//!
//! Every test holds [`fault::serial`]: injected faults are process-wide, and another test's
//! store requests would meet them. A gateway that cannot start fails each test (unless
//! `MAPPED_RAM_ALLOW_SKIP` names `store`).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mapped_ram_linux::fault::{self, Fault, FaultKind};
use mapped_ram_linux::store::{Store, StoreError, StoreOptions};
use mapped_ram_linux::{
    inspect, read_device_state, save, IoFailure, Op, RestoreOptions, RestoreRegion, SaveOptions,
    SaveRegion, UffdOptions,
};
use mapped_ram_tests::image::{first_differing_page, pattern_image, PAGE_SIZE};
use mapped_ram_tests::rgw::{self, unique_bucket, Gateway};
use mapped_ram_tests::support::{cannot_run, cli_binary, scratch_dir, uffd_available};

const PS: u64 = 4096;
const MIB: usize = 1 << 20;
const BLOCK: &str = "pc.ram";

/// The shared gateway, or `None` after [`cannot_run`] (which fails the test unless skipping
/// is allowed).
fn gateway() -> Option<&'static Gateway> {
    match rgw::gateway() {
        Ok(g) => Some(g),
        Err(why) => {
            cannot_run("store", &why);
            None
        }
    }
}

/// Options for `gw`, set explicitly (not from the environment): small objects, so that a
/// small guest spans many of them.
fn options(gw: &Gateway, object_bytes: u64) -> StoreOptions {
    StoreOptions {
        channels: 4,
        object_bytes,
        retries: 4,
        retry_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(10),
        endpoint: Some(gw.endpoint.clone()),
        credentials: Some((gw.access_key.clone(), gw.secret_key.clone())),
        region: Some(gw.region.clone()),
        ..StoreOptions::default()
    }
}

/// A new bucket on `gw`.
fn bucket(gw: &Gateway, prefix: &str) -> String {
    let b = unique_bucket(prefix);
    gw.create_bucket(&b)
        .unwrap_or_else(|e| panic!("creating bucket {b}: {e}"));
    b
}

fn connect(bucket: &str, key: &str, opts: StoreOptions) -> Store {
    Store::connect(&format!("s3://{bucket}/{key}"), opts).unwrap()
}

fn region(ram: &[u8]) -> [SaveRegion<'_>; 1] {
    [SaveRegion {
        name: BLOCK,
        memory: ram,
        page_size: PS,
    }]
}

fn store_save(store: &Store, ram: &[u8]) -> mapped_ram_linux::store::StoreSaveReport {
    store
        .save(&region(ram), &SaveOptions::default(), None)
        .unwrap_or_else(|e| panic!("save to {}: {e}", store.url()))
}

fn store_restore(store: &Store, len: usize) -> Result<Vec<u8>, StoreError> {
    let mut back = vec![0u8; len];
    store.restore(
        &mut [RestoreRegion {
            name: BLOCK,
            memory: &mut back,
            page_size: PS,
        }],
        &RestoreOptions::default(),
        None,
    )?;
    Ok(back)
}

/// Fails naming the first page where `got` differs from `want` (a short failure message).
fn assert_same(what: &str, want: &[u8], got: &[u8]) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    if let Some(p) = first_differing_page(want, got) {
        panic!("{what}: page {p} (offset {:#x}) differs", p * PAGE_SIZE);
    }
}

/// The `mapped-ram` binary, or `None` after [`cannot_run`].
fn cli() -> Option<PathBuf> {
    let bin = cli_binary();
    if bin.is_none() {
        cannot_run(
            "store",
            "the mapped-ram binary is not built (cargo build first)",
        );
    }
    bin
}

/// The generations under `key`'s objects prefix, with their object counts.
fn generations(gw: &Gateway, bucket: &str, key: &str) -> Vec<(String, usize)> {
    let prefix = format!("{key}.objects/");
    let mut out: Vec<(String, usize)> = Vec::new();
    for (k, _) in gw.list(bucket, &prefix) {
        let g = k[prefix.len()..].split('/').next().unwrap().to_string();
        match out.iter_mut().find(|(h, _)| *h == g) {
            Some((_, n)) => *n += 1,
            None => out.push((g, 1)),
        }
    }
    out.sort();
    out
}

/// Arms a fault that never fires on `op`, so that [`fault::seen`] counts its requests.
fn count(op: Op) {
    fault::inject(Fault {
        op,
        skip: 0,
        count: 0,
        kind: FaultKind::Reset,
    });
}

fn names(gens: &[(String, usize)]) -> Vec<&str> {
    gens.iter().map(|(g, _)| g.as_str()).collect()
}

fn io_failure(e: &StoreError) -> &IoFailure {
    match e {
        StoreError::Io(f) => f,
        StoreError::Save(mapped_ram_linux::SaveError::Io(f)) => f,
        other => panic!("expected an I/O failure, got {other:?} ({other})"),
    }
}

/// Save, get, inspect, verify, restore and put: the store holds the local save's file byte
/// for byte (what `get` writes, mode 0600), and keeps the current and the previous generation.
#[test]
fn round_trip_is_the_local_file_byte_for_byte() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let b = bucket(gw, "roundtrip");
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-roundtrip");
    let mut ram = pattern_image(24 * MIB, 71, 0.3, true);
    // Zero stretches that start and end inside objects: objects stored without their
    // leading or trailing zeros.
    for (from, to) in [
        (3 * MIB + 100 * 1024, 5 * MIB + 40 * 1024),
        (17 * MIB + 8192, 19 * MIB),
    ] {
        ram[from..to].fill(0);
    }
    let local = dir.join("local.mr");
    save(&local, &region(&ram), &SaveOptions::default(), None).unwrap();
    let want = std::fs::read(&local).unwrap();

    let store = connect(&b, "vm/guest.mr", options(gw, 256 << 10));
    let report = store_save(&store, &ram);
    assert_eq!(report.save.ram_bytes, ram.len() as u64);
    assert!(report.objects_uploaded > 0 && report.objects_uploaded < report.objects_total);
    eprintln!(
        "saved {} of {} objects, {} bytes",
        report.objects_uploaded, report.objects_total, report.bytes_uploaded
    );

    let got = dir.join("got.mr");
    let t = store.get(&got, None, None).unwrap();
    assert_eq!(t.generation, report.generation);
    assert_eq!(t.file_size, want.len() as u64);
    let bytes = std::fs::read(&got).unwrap();
    assert!(bytes == want, "get differs from the local save's file");
    let mode = std::fs::metadata(&got).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "guest memory must not be readable by others");

    let info = store.inspect().unwrap();
    assert_eq!(info.manifest.generation, report.generation);
    assert!(
        !info.manifest.trimmed.is_empty(),
        "the image has objects with zero ends: get and restore read trimmed objects"
    );
    assert_eq!(info.manifest.file_size, want.len() as u64);
    assert_eq!(info.info.blocks.len(), 1);
    assert_eq!(info.info.blocks[0].name.as_str(), BLOCK);
    let verified = store.verify(&region(&ram)).unwrap();
    assert!(
        verified.ok(),
        "{:?} {:?}",
        verified.mismatches,
        verified.corrupt
    );
    assert!(verified.pages_checksummed.unwrap_or(0) > 0);
    let mut other = ram.clone();
    other[5 * PS as usize + 7] ^= 0x40;
    let verified = store.verify(&region(&other)).unwrap();
    assert!(
        !verified.ok(),
        "verify against other RAM must report a mismatch"
    );

    assert_same(
        "restore from the store",
        &ram,
        &store_restore(&store, ram.len()).unwrap(),
    );

    // put of the local file: the same file comes back.
    let put_store = connect(&b, "vm/put.mr", options(gw, 256 << 10));
    let p = put_store.put(&local, 0, None, None).unwrap();
    assert_eq!(p.file_size, want.len() as u64);
    assert!(
        p.objects_transferred < p.objects_total,
        "put skips zero objects"
    );
    let got2 = dir.join("got2.mr");
    put_store.get(&got2, None, None).unwrap();
    assert!(
        std::fs::read(&got2).unwrap() == want,
        "put then get differs"
    );

    // Two more saves: only the current and the previous generation stay.
    let first = report.generation.clone();
    let second = store_save(&store, &pattern_image(24 * MIB, 72, 0.3, true));
    let ram3 = pattern_image(24 * MIB, 73, 0.3, true);
    let third = store_save(&store, &ram3);
    assert!(third.objects_deleted > 0, "the first generation is deleted");
    let gens = generations(gw, &b, "vm/guest.mr");
    let mut keep = vec![second.generation.as_str(), third.generation.as_str()];
    keep.sort();
    assert_eq!(names(&gens), keep, "first was {first}");
    assert_same(
        "after three saves",
        &ram3,
        &store_restore(&store, ram3.len()).unwrap(),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Zero regions cost no upload and no storage: a 512 MiB guest with 32 MiB of data stores
/// about 32 MiB (the store's own accounting), by save and by put of a sparse local file.
#[test]
fn zero_regions_are_not_uploaded() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let b = bucket(gw, "sparse");
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-sparse");
    let mut ram = vec![0u8; 512 * MIB];
    // 32 MiB of data: 64 runs of 512 KiB, spread over the guest, most of them across two
    // 1 MiB objects (objects are stored without their leading and trailing zeros).
    let data = pattern_image(32 * MIB, 9, 0.0, false);
    let run_len = 512 * 1024;
    for run in 0..64 {
        let at = run * 8 * MIB + (run % 5) * 192 * 1024;
        ram[at..at + run_len].copy_from_slice(&data[run * run_len..(run + 1) * run_len]);
    }
    let store = connect(&b, "big.mr", options(gw, 1 << 20));
    let report = store_save(&store, &ram);
    let (objects, bytes) = gw.bucket_stats(&b);
    eprintln!(
        "512 MiB guest, 32 MiB data: uploaded {} bytes in {} objects; the store holds {} bytes in {} objects",
        report.bytes_uploaded, report.objects_uploaded, bytes, objects
    );
    assert!(report.bytes_uploaded >= 32 * MIB as u64);
    assert!(
        report.bytes_uploaded < 40 * MIB as u64,
        "uploaded {} bytes for 32 MiB of data",
        report.bytes_uploaded
    );
    assert!(bytes < 40 * MIB as u64, "the store holds {bytes} bytes");
    assert!(!store.inspect().unwrap().manifest.trimmed.is_empty());
    assert_same(
        "sparse restore",
        &ram,
        &store_restore(&store, ram.len()).unwrap(),
    );

    // put of a sparse local file reads only its data (SEEK_DATA) and uploads as little.
    let local = dir.join("big.mr");
    save(&local, &region(&ram), &SaveOptions::default(), None).unwrap();
    let on_disk = std::fs::metadata(&local).unwrap();
    let put_store = connect(&b, "put.mr", options(gw, 1 << 20));
    let p = put_store.put(&local, 0, None, None).unwrap();
    assert!(
        p.bytes_transferred < 40 * MIB as u64,
        "put sent {} bytes of a {} byte file",
        p.bytes_transferred,
        on_disk.len()
    );
    drop(ram);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 503s, connection resets and an answer slower than the request timeout are retried: the
/// save and the restore succeed and the data is intact.
#[test]
fn transient_failures_are_retried() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let b = bucket(gw, "retry");
    let ram = pattern_image(8 * MIB, 5, 0.2, false);
    let mut opts = options(gw, 256 << 10);
    opts.request_timeout = Duration::from_secs(2);
    let store = connect(&b, "g.mr", opts);
    fault::clear();
    for (op, kind) in [
        (Op::StorePut, FaultKind::Status(503)),
        (Op::StorePut, FaultKind::Reset),
        (Op::StorePut, FaultKind::Delay(Duration::from_secs(3))),
        (Op::StoreGet, FaultKind::Status(500)),
        (Op::StoreGet, FaultKind::Reset),
        (Op::StoreGet, FaultKind::Delay(Duration::from_secs(3))),
    ] {
        fault::inject(Fault {
            op,
            skip: 3,
            count: 1,
            kind,
        });
    }
    let report = store.save(&region(&ram), &SaveOptions::default(), None);
    let back = store_restore(&store, ram.len());
    let fired = (fault::fired(Op::StorePut), fault::fired(Op::StoreGet));
    fault::clear();
    let report = report.unwrap_or_else(|e| panic!("save with transient failures: {e}"));
    assert_eq!(fired, (3, 3), "every injected failure met a request");
    assert_same("restore after retries", &ram, &back.unwrap());
    assert_eq!(
        store.inspect().unwrap().manifest.generation,
        report.generation
    );
}

/// A save that fails (an object PUT, or the manifest PUT itself) is undone: the previous
/// snapshot stays the one readers get, and no object of the failed save is left.
#[test]
fn failed_save_keeps_the_previous_snapshot() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let b = bucket(gw, "failsave");
    let ram_a = pattern_image(8 * MIB, 11, 0.2, false);
    let ram_b = pattern_image(8 * MIB, 12, 0.2, false);
    let mut opts = options(gw, 256 << 10);
    opts.retries = 1;
    let store = connect(&b, "g.mr", opts);
    fault::clear();
    count(Op::StorePut);
    let a = store_save(&store, &ram_a);
    // PUTs of a save of this size and zero layout (objects and the manifest).
    let puts = fault::seen(Op::StorePut);
    assert!(puts > 2, "{puts} PUTs");

    for (what, skip) in [("an object PUT", 5), ("the manifest PUT", puts - 1)] {
        fault::clear();
        fault::inject(Fault {
            op: Op::StorePut,
            skip,
            count: 1000,
            kind: FaultKind::Status(500),
        });
        let failed = store.save(&region(&ram_b), &SaveOptions::default(), None);
        fault::clear();
        let e = match failed {
            Ok(r) => panic!("{what}: the save succeeded ({})", r.generation),
            Err(e) => e,
        };
        let f = io_failure(&e);
        // An object's PUT is the write of its pages (the executor's operation, with the
        // offset); the manifest's is a store PUT.
        assert!(matches!(f.op, Op::StorePut | Op::WritePages), "{what}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("s3://{b}/g.mr")), "{what}: {msg}");
        assert_eq!(
            store.inspect().unwrap().manifest.generation,
            a.generation,
            "{what}: the previous snapshot is current"
        );
        assert_same(what, &ram_a, &store_restore(&store, ram_a.len()).unwrap());
        let gens = generations(gw, &b, "g.mr");
        assert_eq!(
            names(&gens),
            vec![a.generation.as_str()],
            "{what}: objects left"
        );
    }
}

/// A restore or get that cannot read its objects fails with the address, object and offset;
/// get leaves no file behind.
#[test]
fn failed_restore_names_the_object() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let b = bucket(gw, "failrestore");
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-failrestore");
    let ram = pattern_image(8 * MIB, 13, 0.2, false);
    let mut opts = options(gw, 256 << 10);
    opts.retries = 1;
    let store = connect(&b, "g.mr", opts);
    fault::clear();
    let report = store_save(&store, &ram);

    // Every GET after the manifest and metadata fails with 500.
    fault::inject(Fault {
        op: Op::StoreGet,
        skip: 4,
        count: 100_000,
        kind: FaultKind::Status(500),
    });
    let e = store_restore(&store, ram.len()).unwrap_err();
    let got = dir.join("got.mr");
    let e2 = store.get(&got, None, None).unwrap_err();
    fault::clear();
    for e in [&e, &e2] {
        let msg = e.to_string();
        assert!(msg.contains(&format!("s3://{b}/g.mr")), "{msg}");
        assert!(msg.contains("500") || msg.contains("Injected"), "{msg}");
    }
    assert!(!got.exists(), "a failed get leaves no file");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no temporary left"
    );

    // A data object deleted behind the snapshot's back: BadObject names it.
    let (key, _) = gw
        .list(&b, &format!("g.mr.objects/{}/", report.generation))
        .into_iter()
        .nth(3)
        .expect("objects");
    let index: u64 = key.rsplit('/').next().unwrap().parse().unwrap();
    gw.delete_object(&b, &key);
    let object_bytes = 256u64 << 10;
    let e = store_restore(&store, ram.len()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&format!("s3://{b}/g.mr")), "{msg}");
    assert!(
        msg.contains(&key) || msg.contains(&format!("object {index}")),
        "a restore must name the missing object: {msg}"
    );
    match store.get(&got, None, None).unwrap_err() {
        StoreError::BadObject { object, offset, .. } => {
            assert_eq!(object, index);
            assert_eq!(offset, index * object_bytes);
        }
        other => panic!("get of a snapshot with a missing object: {other}"),
    }
    assert!(!got.exists(), "a failed get leaves no file");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The userfaultfd restore from the store: faults are answered by ranged GETs before the
/// memory crossed the network; the recorded working set is stored with the snapshot and a
/// later restore prefetches everything; the memory is the saved guest's.
#[test]
fn lazy_restore_from_the_store() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let probe = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-uffd-probe");
    if !uffd_available("store", &probe) {
        return;
    }
    let b = bucket(gw, "lazy");
    let ram = pattern_image(32 * MIB, 17, 0.3, true);
    // Unsigned payloads (what https endpoints get by default) are accepted too.
    let mut opts = options(gw, 1 << 20);
    opts.unsigned_payload = Some(true);
    let store = connect(&b, "g.mr", opts);
    fault::clear();
    let report = store_save(&store, &ram);
    count(Op::StoreGet);
    let gets_before = fault::seen(Op::StoreGet);

    let opts = UffdOptions {
        prefetch_channels: 0,
        record_working_set: Some(Duration::from_secs(60)),
        ..UffdOptions::default()
    };
    let r = store.restore_uffd(&[], &opts).unwrap();
    let gets_open = fault::seen(Op::StoreGet) - gets_before;
    let mem = r.block(BLOCK).unwrap().as_slice();
    let pages = mem.len() / PS as usize;
    // Touch every 13th page in a scattered order.
    for k in (0..pages).step_by(13) {
        let p = (k * 7919) % pages;
        let at = p * PS as usize;
        assert_eq!(
            mem[at..at + PS as usize],
            ram[at..at + PS as usize],
            "page {p}"
        );
    }
    let stats = r.stats();
    assert!(stats.faults > 0, "{stats:?}");
    assert!(!stats.prefetch_done || stats.prefetched_pages == 0);
    assert!(
        fault::seen(Op::StoreGet) - gets_before > gets_open,
        "faults read from the store"
    );
    let ws = r.working_set();
    assert!(ws.pages.len() >= pages / 13 / 4, "{} pages", ws.pages.len());
    assert!(r.error().is_none());
    drop(r);
    store.save_working_set(&ws).unwrap();
    let listed = gw.list(
        &b,
        &format!("g.mr.objects/{}/working-set", report.generation),
    );
    assert_eq!(
        listed.len(),
        1,
        "the working set is stored with its generation"
    );

    let opts = UffdOptions {
        prefetch_channels: 2,
        ..UffdOptions::default()
    };
    let mut r = store.restore_uffd(&[BLOCK], &opts).unwrap();
    r.wait_prefetched().unwrap();
    let stats = r.stats();
    assert!(
        stats.prefetch_done && stats.prefetched_pages > 0,
        "{stats:?}"
    );
    assert_same(
        "prefetched memory",
        &ram,
        r.block(BLOCK).unwrap().as_slice(),
    );
}

/// Where [`competing_save`] saves: set by the test before it arms the hook (a hook is a plain
/// `fn()`).
static COMPETITOR: Mutex<Option<(String, String, StoreOptions)>> = Mutex::new(None);

/// Runs a whole other save to the same address, from another thread (its own client and
/// runtime), while the first save is between reading the current manifest and uploading.
fn competing_save() {
    let (bucket, key, opts) = COMPETITOR.lock().unwrap().clone().unwrap();
    std::thread::spawn(move || {
        let store = connect(&bucket, &key, opts);
        store_save(&store, &pattern_image(4 * MIB, 99, 0.1, false));
    })
    .join()
    .unwrap();
}

/// Two saves to one address at once: the one that commits second gets `Conflict` and its
/// objects are deleted; the first one's snapshot stands.
#[test]
fn concurrent_save_conflicts() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let b = bucket(gw, "conflict");
    let opts = options(gw, 256 << 10);
    for existing in [false, true] {
        let key = format!("g{}.mr", existing as u8);
        let store = connect(&b, &key, opts.clone());
        if existing {
            store_save(&store, &pattern_image(4 * MIB, 98, 0.1, false));
        }
        *COMPETITOR.lock().unwrap() = Some((b.clone(), key.clone(), opts.clone()));
        fault::clear();
        // The save's first object PUT runs the competing save first.
        fault::inject(Fault {
            op: Op::StorePut,
            skip: 0,
            count: 1,
            kind: FaultKind::Hook(competing_save),
        });
        let ram = pattern_image(4 * MIB, 97, 0.1, false);
        let result = store.save(&region(&ram), &SaveOptions::default(), None);
        let hooked = fault::fired(Op::StorePut);
        fault::clear();
        assert_eq!(hooked, 1, "the competing save ran");
        match result {
            Err(StoreError::Conflict { url }) => assert_eq!(url, format!("s3://{b}/{key}")),
            Err(e) => panic!("expected Conflict, got {e}"),
            Ok(r) => panic!("the second commit succeeded ({})", r.generation),
        }
        let current = store.inspect().unwrap().manifest;
        let gens = generations(gw, &b, &key);
        assert!(
            names(&gens).contains(&current.generation.as_str()),
            "{gens:?}"
        );
        assert!(gens.len() <= 2, "the loser's objects are deleted: {gens:?}");
        assert_same(
            "the winner's snapshot",
            &pattern_image(4 * MIB, 99, 0.1, false),
            &store_restore(&store, 4 * MIB).unwrap(),
        );
    }
}

/// A CLI save killed with SIGKILL mid-upload: the snapshot at the address is still the
/// previous one, and the next save deletes what the killed one uploaded.
#[test]
fn killed_cli_save_leaves_the_previous_snapshot() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let Some(cli) = cli() else { return };
    let b = bucket(gw, "killcli");
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-killcli");
    let ram_a = pattern_image(4 * MIB, 21, 0.1, false);
    let store = connect(&b, "g.mr", options(gw, 64 << 10));
    let a = store_save(&store, &ram_a);

    let ram_b = pattern_image(64 * MIB, 22, 0.0, false);
    let ram_file = dir.join("ram-b");
    std::fs::write(&ram_file, &ram_b).unwrap();
    let mut child = Command::new(cli)
        .args(["save", "--ram"])
        .arg(format!("{BLOCK}={}", ram_file.display()))
        .args(["-o", &format!("s3://{b}/g.mr")])
        .args(["--object-size", "64K", "--channels", "1"])
        .envs(gw.env())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut uploaded = 0;
    while Instant::now() < deadline {
        uploaded = generations(gw, &b, "g.mr")
            .iter()
            .filter(|(g, _)| *g != a.generation)
            .map(|(_, n)| *n)
            .sum::<usize>();
        if uploaded >= 20 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the CLI save ended before it was killed: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(uploaded >= 20, "the CLI save uploaded nothing in 60 s");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(store.inspect().unwrap().manifest.generation, a.generation);
    assert_same(
        "after the kill",
        &ram_a,
        &store_restore(&store, ram_a.len()).unwrap(),
    );
    assert_eq!(
        generations(gw, &b, "g.mr").len(),
        2,
        "the killed save's objects are there"
    );

    let next = store_save(&store, &ram_a);
    assert!(
        next.objects_deleted >= 20,
        "{} deleted",
        next.objects_deleted
    );
    let mut keep = vec![a.generation.as_str(), next.generation.as_str()];
    keep.sort();
    assert_eq!(names(&generations(gw, &b, "g.mr")), keep);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The gateway process killed mid-save: the save fails with the address in bounded time, the
/// previous snapshot stays; killed mid-restore and started again within the retry window:
/// the restore completes, byte-identical.
#[test]
fn gateway_killed_mid_transfer() {
    let _serial = fault::serial();
    if gateway().is_none() {
        return;
    }
    let gw = match Gateway::private("store-kill") {
        Ok(g) => g,
        Err(why) => {
            cannot_run("store", &why);
            return;
        }
    };
    let b = bucket(&gw, "kill");
    let ram_a = pattern_image(4 * MIB, 31, 0.1, false);
    let mut opts = options(&gw, 64 << 10);
    opts.channels = 2;
    opts.retries = 2;
    opts.request_timeout = Duration::from_secs(2);
    opts.retry_timeout = Duration::from_secs(6);
    let store = Arc::new(connect(&b, "g.mr", opts.clone()));
    let a = store_save(&store, &ram_a);

    // Mid-save: slow PUTs (40 ms each) so that the kill lands in the upload.
    fault::clear();
    fault::inject(Fault {
        op: Op::StorePut,
        skip: 0,
        count: 1_000_000,
        kind: FaultKind::Delay(Duration::from_millis(40)),
    });
    let started = Instant::now();
    let saver = {
        let store = store.clone();
        std::thread::spawn(move || {
            let ram_b = pattern_image(16 * MIB, 32, 0.0, false);
            store
                .save(&region(&ram_b), &SaveOptions::default(), None)
                .map(|r| r.generation)
        })
    };
    while generations(&gw, &b, "g.mr").len() < 2 && !saver.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.kill_gateway();
    let failed = saver.join().unwrap();
    fault::clear();
    let e = failed.expect_err("a save to a dead gateway must fail");
    eprintln!(
        "save to a killed gateway failed after {:?}: {e}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(e.to_string().contains(&format!("s3://{b}/g.mr")), "{e}");
    gw.start_gateway().unwrap();
    assert_eq!(store.inspect().unwrap().manifest.generation, a.generation);
    assert_same(
        "after the killed save",
        &ram_a,
        &store_restore(&store, ram_a.len()).unwrap(),
    );

    // Mid-restore, with a retry window the restart fits in.
    let ram_c = pattern_image(16 * MIB, 33, 0.1, false);
    let mut patient = opts.clone();
    patient.retries = 20;
    patient.retry_timeout = Duration::from_secs(90);
    let store = Arc::new(connect(&b, "g.mr", patient));
    store_save(&store, &ram_c);
    fault::inject(Fault {
        op: Op::StoreGet,
        skip: 0,
        count: 1_000_000,
        kind: FaultKind::Delay(Duration::from_millis(40)),
    });
    let reading = Arc::new(AtomicBool::new(false));
    let restorer = {
        let store = store.clone();
        let reading = reading.clone();
        std::thread::spawn(move || {
            let mut back = vec![0u8; 16 * MIB];
            let mut progress = |_: mapped_ram_linux::Progress| {
                reading.store(true, Ordering::Relaxed);
            };
            store
                .restore(
                    &mut [RestoreRegion {
                        name: BLOCK,
                        memory: &mut back,
                        page_size: PS,
                    }],
                    &RestoreOptions::default(),
                    Some(&mut progress),
                )
                .map(|_| back)
        })
    };
    while !reading.load(Ordering::Relaxed) && !restorer.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!restorer.is_finished(), "the restore ended before the kill");
    gw.kill_gateway();
    std::thread::sleep(Duration::from_secs(1));
    gw.start_gateway().unwrap();
    let back = restorer.join().unwrap();
    fault::clear();
    assert_same("restore across a gateway restart", &ram_c, &back.unwrap());

    // The killed save's objects are deleted by the next save.
    let next = store_save(&store, &ram_a);
    assert_eq!(generations(&gw, &b, "g.mr").len(), 2, "{}", next.generation);
}

/// QEMU's own file, put into the store and got back, is byte-identical and restores from the
/// store; our store save of another image, got back to a file, is loaded by QEMU.
#[test]
fn qemu_files_through_the_store() {
    use mapped_ram_tests::qemu::{
        qemu_load, qemu_save, require_qemu, GuestConfig, LoadOpts, MachineKind, SaveOpts,
        MAIN_RAM_BLOCK,
    };
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let Some(_qemu) = require_qemu() else { return };
    let b = bucket(gw, "qemu");
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-qemu");
    let size = 64 * MIB;
    let cfg = GuestConfig::new(MachineKind::None, size as u64);
    let image_a = pattern_image(size, 41, 0.4, true);
    let theirs = dir.join("qemu.mig");
    let saved = qemu_save(&cfg, &image_a, &SaveOpts::new(&theirs)).unwrap();
    let store = connect(&b, "qemu.mr", options(gw, 1 << 20));
    let p = store.put(&theirs, 0, None, None).unwrap();
    assert!(
        p.objects_transferred < p.objects_total,
        "zero objects are skipped"
    );
    let got = dir.join("got.mig");
    store.get(&got, None, None).unwrap();
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(&theirs).unwrap(),
        "QEMU's file through the store differs"
    );
    let mut back = vec![0u8; size];
    store
        .restore(
            &mut [RestoreRegion {
                name: MAIN_RAM_BLOCK,
                memory: &mut back,
                page_size: PS,
            }],
            &RestoreOptions::default(),
            None,
        )
        .unwrap();
    assert_same("QEMU's guest restored from the store", &image_a, &back);

    // Ours: image B with QEMU's machine, device state and other blocks, saved to the store.
    let info = inspect(&theirs, 0).unwrap();
    let device_state = read_device_state(&theirs, 0).unwrap();
    let image_b = pattern_image(size, 42, 0.4, true);
    let blocks = saved.blocks_with(&image_b);
    let regions: Vec<SaveRegion<'_>> = blocks
        .iter()
        .map(|(name, data)| SaveRegion {
            name: name.as_str(),
            memory: data,
            page_size: PS,
        })
        .collect();
    let ours = connect(&b, "ours.mr", options(gw, 1 << 20));
    ours.save(
        &regions,
        &SaveOptions {
            machine: info.machine.clone(),
            device_state: Some(device_state),
            ..SaveOptions::default()
        },
        None,
    )
    .unwrap();
    let ours_file = dir.join("ours.mig");
    ours.get(&ours_file, None, None).unwrap();
    let loaded = qemu_load(&cfg, &LoadOpts::new(&ours_file))
        .unwrap_or_else(|e| panic!("QEMU failed to load our store snapshot: {e}"));
    assert_eq!(loaded.query_migrate["status"], "completed");
    assert_same(
        "guest RAM QEMU loaded from our store snapshot",
        &image_b,
        &loaded.ram.read().unwrap(),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The CLI end to end: `save -o s3://…`, `inspect --json`, `verify`, `restore`, `get` (the
/// local save's file byte for byte) and `put`; SIGINT during `put` and `get` cancels them:
/// exit 130, nothing committed and no objects left by `put`, no file and no temporary left by
/// `get`.
#[test]
fn cli_round_trip_and_cancelled_transfers() {
    let _serial = fault::serial();
    let Some(gw) = gateway() else { return };
    let Some(cli) = cli() else { return };
    let b = bucket(gw, "cli");
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "store-cli");
    let ram = pattern_image(16 * MIB, 51, 0.3, true);
    let ram_file = dir.join("ram");
    std::fs::write(&ram_file, &ram).unwrap();
    let local = dir.join("local.mr");
    save(&local, &region(&ram), &SaveOptions::default(), None).unwrap();
    let url = format!("s3://{b}/vm/g.mr");
    let ram_arg = format!("{BLOCK}={}", ram_file.display());
    let run = |args: &[&str], signal: Option<&str>| {
        let mut c = Command::new(&cli);
        c.args(args).envs(gw.env());
        if let Some(s) = signal {
            c.env("MAPPED_RAM_TEST_SIGNAL_AT_PROGRESS", s);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| {
        let (code, stdout, stderr) = run(args, None);
        assert_eq!(code, Some(0), "mapped-ram {args:?}: {stderr}");
        stdout
    };
    ok(&[
        "save",
        "--ram",
        &ram_arg,
        "-o",
        &url,
        "--object-size",
        "256K",
    ]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["inspect", &url, "--json"])).unwrap();
    assert_eq!(info["manifest"]["object_bytes"], 256 << 10, "{info}");
    ok(&["verify", &url, "--ram", &ram_arg]);
    let back = dir.join("back");
    ok(&[
        "restore",
        &url,
        "--ram",
        &format!("{BLOCK}={}", back.display()),
    ]);
    assert_same(
        "CLI restore from the store",
        &ram,
        &std::fs::read(&back).unwrap(),
    );
    let got = dir.join("got.mr");
    ok(&["get", &url, "-o", got.to_str().unwrap()]);
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(&local).unwrap(),
        "CLI get differs from the local save"
    );

    // SIGINT during put (64 KiB objects, one channel): nothing committed, nothing left.
    let put_url = format!("s3://{b}/vm/put.mr");
    let (code, _, stderr) = run(
        &[
            "put",
            local.to_str().unwrap(),
            &put_url,
            "--object-size",
            "64K",
            "--channels",
            "1",
        ],
        Some("INT"),
    );
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("cancelled by SIGINT"), "{stderr}");
    assert!(
        gw.list(&b, "vm/put.mr").is_empty(),
        "a cancelled put left objects"
    );
    // SIGINT during get: the target is not created, no temporary stays.
    let cancelled = dir.join("cancelled.mr");
    let (code, _, stderr) = run(
        &[
            "get",
            &url,
            "-o",
            cancelled.to_str().unwrap(),
            "--channels",
            "1",
        ],
        Some("INT"),
    );
    assert_eq!(code, Some(130), "{stderr}");
    assert!(!cancelled.exists(), "a cancelled get created its file");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cancelled"))
        .collect();
    assert!(left.is_empty(), "a cancelled get left {left:?}");
    // And put itself works.
    ok(&["put", local.to_str().unwrap(), &put_url]);
    let got2 = dir.join("got2.mr");
    ok(&["get", &put_url, "-o", got2.to_str().unwrap()]);
    assert!(std::fs::read(&got2).unwrap() == std::fs::read(&local).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
