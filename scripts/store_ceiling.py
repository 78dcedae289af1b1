#!/usr/bin/env python3
"""The S3 store's own ceiling, measured with boto3, for BENCHMARKS.md.

What the object store gives a client that does nothing but move bytes, to compare the
mapped-ram store path against:

  (a) PUT: a multipart upload of a random in-memory buffer of --size-mib, --threads UploadPart
      calls of --part-mib in flight at once (CreateMultipartUpload to CompleteMultipartUpload);
  (b) GET: the whole object again in --part-mib ranged GETs, --threads at once;
  (c) 4 KiB: the median latency of 100 ranged GETs of 4 KiB at random offsets, one at a time.

Each of --runs runs writes its own object and deletes it; the medians over the runs are printed,
and a last line of JSON: {"put_mib_s": ..., "get_mib_s": ..., "get4k_ms": ...}.

Endpoint and keys come from the environment, as scripts/ceph-rgw/start.sh writes them:

  . /var/tmp/mapped-ram-rgw/s3.env && scripts/store_ceiling.py --bucket ceiling

The bucket is created if it does not exist (and then deleted at the end). Requests are
path-style; checksums are computed only where the API requires them (Pacific's RGW refuses
the aws-chunked uploads with trailing checksums that botocore >= 1.36 sends otherwise).
botocore hashes every payload it signs over plain http (SigV4); --unsigned-payload sends
UNSIGNED-PAYLOAD instead, taking the client's SHA-256 out of the measurement.
"""

import argparse
import concurrent.futures as futures
import json
import os
import random
import statistics
import sys
import time

try:
    import boto3
    import botocore
    from botocore.config import Config
    from botocore.exceptions import ClientError
except ImportError:
    sys.exit("store_ceiling.py needs boto3: apt-get install python3-boto3 (.ci/install-deps)")

MIB = 1 << 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bucket", default=None,
                   help="bucket to use (default: store-ceiling-<pid>, created and deleted)")
    p.add_argument("--size-mib", type=int, default=1024, help="object size in MiB (default 1024)")
    p.add_argument("--threads", "--parts", dest="threads", type=int, default=16,
                   help="requests in flight at once, for the PUT and the GET (default 16)")
    p.add_argument("--part-mib", type=int, default=8,
                   help="multipart part and GET range size in MiB (default 8)")
    p.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    p.add_argument("--unsigned-payload", action="store_true",
                   help="sign requests with UNSIGNED-PAYLOAD instead of hashing the body")
    a = p.parse_args()
    if a.size_mib < 1 or a.threads < 1 or a.part_mib < 5 or a.runs < 1:
        p.error("need --size-mib >= 1, --threads >= 1, --part-mib >= 5 (S3's smallest part), --runs >= 1")
    return a


def client(threads, unsigned_payload):
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
    if not endpoint:
        sys.exit("no AWS_ENDPOINT_URL: source the gateway's s3.env first "
                 "(. /var/tmp/mapped-ram-rgw/s3.env)")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    options = dict(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        max_pool_connections=max(10, 2 * threads),
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=300,
    )
    try:
        config = Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", **options)
    except TypeError:
        # botocore < 1.36 (bookworm's 1.29) has no such settings and sends no such checksums.
        config = Config(**options)
    if unsigned_payload:
        # botocore always hashes the payload over http; this skips it (RGW accepts it).
        from botocore.auth import S3SigV4Auth
        S3SigV4Auth._should_sha256_sign_payload = lambda self, request: False
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def ensure_bucket(s3, bucket):
    """Creates the bucket if it does not exist; True if this call created it."""
    try:
        s3.head_bucket(Bucket=bucket)
        return False
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    s3.create_bucket(Bucket=bucket)
    return True


def spans(size, step):
    return [(off, min(step, size - off)) for off in range(0, size, step)]


def put(s3, pool, bucket, key, buf, part):
    t = time.perf_counter()
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        def one(n, off, length):
            body = bytes(buf[off:off + length])
            r = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=body)
            return {"PartNumber": n, "ETag": r["ETag"]}

        jobs = [pool.submit(one, n + 1, off, length)
                for n, (off, length) in enumerate(spans(len(buf), part))]
        parts = [j.result() for j in jobs]
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": parts})
    except BaseException:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        raise
    return time.perf_counter() - t


def get(s3, pool, bucket, key, size, part, expect):
    def one(off, length):
        r = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + length - 1}")
        data = r["Body"].read()
        if len(data) != length:
            raise RuntimeError(f"GET {key} at {off}: {len(data)} bytes, expected {length}")
        return off, data

    t = time.perf_counter()
    chunks = list(pool.map(lambda s: one(*s), spans(size, part)))
    elapsed = time.perf_counter() - t
    # Checked after the clock stops: every range holds what was uploaded.
    for off, data in chunks:
        if data != expect[off:off + len(data)]:
            raise RuntimeError(f"GET {key} at {off}: not the uploaded bytes")
    return elapsed


def small_gets(s3, bucket, key, size, count=100):
    rng = random.Random(size)
    times = []
    for _ in range(count):
        off = rng.randrange(0, max(1, size // 4096)) * 4096
        t = time.perf_counter()
        r = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + 4095}")
        r["Body"].read()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    a = parse_args()
    s3 = client(a.threads, a.unsigned_payload)
    bucket = a.bucket or f"store-ceiling-{os.getpid()}"
    size, part = a.size_mib * MIB, a.part_mib * MIB
    created = ensure_bucket(s3, bucket)
    print(f"boto3 {boto3.__version__} (botocore {botocore.__version__}), "
          f"{os.environ.get('AWS_ENDPOINT_URL') or os.environ.get('AWS_ENDPOINT')} bucket {bucket}: "
          f"{a.size_mib} MiB object, {a.part_mib} MiB parts/ranges, {a.threads} in flight, "
          f"{a.runs} runs, payload {'unsigned' if a.unsigned_payload else 'SHA-256 signed'}",
          flush=True)
    t = time.perf_counter()
    buf = os.urandom(size)
    print(f"random buffer: {time.perf_counter() - t:.1f} s", flush=True)

    puts, gets, lat = [], [], []
    written = []
    try:
        with futures.ThreadPoolExecutor(max_workers=a.threads) as pool:
            for run in range(1, a.runs + 1):
                key = f"store-ceiling/{os.getpid()}-{run}"
                written.append(key)
                tp = put(s3, pool, bucket, key, buf, part)
                tg = get(s3, pool, bucket, key, size, part, buf)
                t4 = small_gets(s3, bucket, key, size)
                s3.delete_object(Bucket=bucket, Key=key)
                written.remove(key)
                puts.append(a.size_mib / tp)
                gets.append(a.size_mib / tg)
                lat.append(t4 * 1000)
                print(f"run {run}: PUT {puts[-1]:7.1f} MiB/s ({tp:.2f} s)  "
                      f"GET {gets[-1]:7.1f} MiB/s ({tg:.2f} s)  4 KiB GET {lat[-1]:.2f} ms",
                      flush=True)
    finally:
        for key in written:
            s3.delete_object(Bucket=bucket, Key=key)
        if created:
            s3.delete_bucket(Bucket=bucket)

    result = {
        "put_mib_s": round(statistics.median(puts), 1),
        "get_mib_s": round(statistics.median(gets), 1),
        "get4k_ms": round(statistics.median(lat), 2),
    }
    print(f"median of {a.runs}: PUT {result['put_mib_s']} MiB/s, GET {result['get_mib_s']} MiB/s, "
          f"4 KiB GET {result['get4k_ms']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
