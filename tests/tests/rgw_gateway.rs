//! The Ceph S3 gateway of the store tests (`mapped_ram_tests::rgw`) comes up and each of its
//! helpers does what it says: bucket creation, put / get / list / delete, the store's own
//! accounting of a bucket, and a private gateway that is killed and comes back on its port.
//!
//! Without the Ceph packages (`.ci/install-deps`) these tests fail unless
//! `MAPPED_RAM_ALLOW_SKIP=rgw_gateway` lets them skip.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use mapped_ram_tests::rgw::{self, Gateway};
use mapped_ram_tests::support::{self, Rng};

const TEST: &str = "rgw_gateway";

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// `http://127.0.0.1:PORT` → `127.0.0.1:PORT`.
fn host_port(endpoint: &str) -> &str {
    endpoint.trim_start_matches("http://").trim_end_matches('/')
}

#[test]
fn shared_gateway_helpers() {
    let gw = match rgw::gateway() {
        Ok(gw) => gw,
        Err(why) => return support::cannot_run(TEST, &why),
    };
    assert!(
        gw.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        gw.endpoint
    );
    assert_eq!(gw.region, "us-east-1");
    // A second call is the same gateway, not a second start.
    assert!(std::ptr::eq(gw, rgw::gateway().unwrap()));

    let env = gw.env();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("AWS_ENDPOINT_URL"), Some(gw.endpoint.as_str()));
    assert_eq!(get("AWS_ENDPOINT"), Some(gw.endpoint.as_str()));
    assert_eq!(get("AWS_ACCESS_KEY_ID"), Some(gw.access_key.as_str()));
    assert_eq!(get("AWS_SECRET_ACCESS_KEY"), Some(gw.secret_key.as_str()));
    assert_eq!(get("AWS_ALLOW_HTTP"), Some("true"));
    assert_eq!(
        get("AWS_REQUEST_CHECKSUM_CALCULATION"),
        Some("when_required")
    );
    assert!(env.iter().all(|(k, _)| k.starts_with("AWS_")), "{env:?}");

    let a = rgw::unique_bucket("Gateway_Helpers.Test");
    let b = rgw::unique_bucket(
        "gateway-helpers-test-with-a-name-much-longer-than-s3-allows-in-a-bucket",
    );
    assert_ne!(a, b);
    for name in [&a, &b] {
        assert!(name.len() <= 63 && name.len() >= 3, "{name}");
        assert!(
            name.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
            "{name}"
        );
        assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
    }

    let bucket = a;
    gw.create_bucket(&bucket).expect("create bucket");
    gw.create_bucket(&bucket)
        .expect("creating an own bucket again succeeds");
    assert_eq!(gw.list(&bucket, ""), vec![]);
    assert_eq!(gw.bucket_stats(&bucket), (0, 0));

    let mib = random_bytes(1, 1 << 20);
    gw.put_object(&bucket, "snap/one.bin", mib.clone());
    gw.put_object(&bucket, "snap/two.bin", b"two".to_vec());
    gw.put_object(&bucket, "snapshot.manifest", b"{}".to_vec());
    assert_eq!(
        gw.get_object(&bucket, "snap/one.bin").as_deref(),
        Some(&mib[..])
    );
    assert_eq!(gw.get_object(&bucket, "snap/missing"), None);

    assert_eq!(
        gw.list(&bucket, ""),
        vec![
            ("snap/one.bin".to_string(), 1 << 20),
            ("snap/two.bin".to_string(), 3),
            ("snapshot.manifest".to_string(), 2),
        ]
    );
    // A plain string prefix, not only whole path segments.
    assert_eq!(
        gw.list(&bucket, "snap/t"),
        vec![("snap/two.bin".to_string(), 3)]
    );
    assert_eq!(gw.list(&bucket, "snap").len(), 3);
    assert_eq!(gw.list(&bucket, "snap/").len(), 2);

    assert_eq!(gw.bucket_stats(&bucket), (3, (1 << 20) + 3 + 2));

    gw.delete_object(&bucket, "snap/two.bin");
    gw.delete_object(&bucket, "snap/two.bin"); // absent: no error
    gw.delete_object(&bucket, "snapshot.manifest");
    assert_eq!(
        gw.list(&bucket, ""),
        vec![("snap/one.bin".to_string(), 1 << 20)]
    );
    assert_eq!(gw.bucket_stats(&bucket), (1, 1 << 20));
    gw.delete_object(&bucket, "snap/one.bin");
    assert_eq!(gw.bucket_stats(&bucket), (0, 0));
}

#[test]
fn private_gateway_killed_and_restarted() {
    let gw = match Gateway::private("rgw-gateway") {
        Ok(gw) => gw,
        Err(why) => return support::cannot_run(TEST, &why),
    };
    let dir = gw.dir.clone();
    let addr = host_port(&gw.endpoint).to_string();
    if let Ok(shared) = rgw::gateway() {
        assert_ne!(
            shared.endpoint, gw.endpoint,
            "a private gateway has a port of its own"
        );
        assert_ne!(shared.dir, gw.dir);
    }

    let bucket = rgw::unique_bucket("private");
    gw.create_bucket(&bucket).expect("create bucket");
    let data = random_bytes(2, 300_000);
    gw.put_object(&bucket, "k", data.clone());

    gw.kill_gateway();
    assert!(
        TcpStream::connect(&addr).is_err(),
        "{addr} still answers after the kill"
    );

    let t = Instant::now();
    gw.start_gateway().expect("restart the gateway");
    eprintln!("gateway restarted in {:?}", t.elapsed());
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{addr} after the restart: {e}"));
    // Same port, same cluster: the object written before the kill is still there.
    assert_eq!(gw.get_object(&bucket, "k").as_deref(), Some(&data[..]));
    assert_eq!(gw.list(&bucket, ""), vec![("k".to_string(), 300_000)]);
    gw.start_gateway()
        .expect("starting an answering gateway is a no-op");

    drop(gw);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        TcpStream::connect(&addr).is_err(),
        "{addr} still answers after the drop"
    );
}
