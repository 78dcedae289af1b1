#!/usr/bin/env bash
# The object-store numbers of BENCHMARKS.md, in one run against the project's Ceph RGW
# (scripts/ceph-rgw/start.sh): the store's own ceiling (boto3: parallel multipart upload and
# parallel ranged GETs, scripts/store_ceiling.py) alternating with our save / restore / get /
# lazy restore of the same size (the store_bench example; payloads hashed into the signature
# like boto3's, and unsigned), then the upload of a large, mostly-zero guest. Prints every JSON line and the medians; writes nothing else.
#
#   sudo scripts/store-bench.sh                          # 2 GiB, 3 rounds, 16 channels, 4 MiB objects
#   sudo scripts/store-bench.sh --size-mib 512 --runs 1  # quick look
set -euo pipefail
cd "$(dirname "$0")/.."
size=2048 runs=3 channels=16 object=4 sparse_gib=8 sparse_data_gib=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --channels) channels=$2; shift 2 ;;
    --object-mib) object=$2; shift 2 ;;
    --sparse-gib) sparse_gib=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# Its own cluster, with room for a few generations of the image (memstore keeps deleted
# objects in RAM until the gateway's garbage collection, 30 s later); stopped at the end.
export MAPPED_RAM_RGW_DIR=${STORE_BENCH_RGW_DIR:-/var/tmp/mapped-ram-rgw-bench}
export MAPPED_RAM_RGW_MEMSTORE_BYTES=${MAPPED_RAM_RGW_MEMSTORE_BYTES:-$((6 * size << 20 + (2 << 30)))}
export MAPPED_RAM_RGW_PORT=${MAPPED_RAM_RGW_PORT:-7600} MAPPED_RAM_RGW_MON_PORT=${MAPPED_RAM_RGW_MON_PORT:-41789}
dir=$MAPPED_RAM_RGW_DIR
scripts/ceph-rgw/stop.sh >/dev/null 2>&1 || true
scripts/ceph-rgw/start.sh >/dev/null
trap 'scripts/ceph-rgw/stop.sh >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC1091
. "$dir/s3.env"
cargo build --release --locked -q -p mapped-ram-linux --features s3 --example store_bench
bench=target/release/examples/store_bench
bucket=bench-$$
curl -fsS --aws-sigv4 "aws:amz:$AWS_DEFAULT_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
  -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -X PUT "$AWS_ENDPOINT_URL/$bucket" >/dev/null
# The ceiling's parts: S3's multipart upload needs at least 5 MiB; 8 MiB unless objects are larger.
part=$((object > 8 ? object : 8))
out=$(mktemp)
for r in $(seq "$runs"); do
  echo "== round $r: ceiling (boto3, $channels threads, ${part} MiB parts)" >&2
  python3 scripts/store_ceiling.py --bucket "$bucket" --size-mib "$size" --threads "$channels" \
    --part-mib "$part" --runs 1 | tail -1 | sed 's/^/ceiling /' | tee -a "$out"
  echo "== round $r: mapped-ram ($channels channels, ${object} MiB objects)" >&2
  "$bench" --bucket "$bucket" --size-mib "$size" --data 1.0 --channels "$channels" \
    --object-mib "$object" --runs 1 --dir /var/tmp | grep summary | sed 's/^/ours /' | tee -a "$out"
  echo "== round $r: mapped-ram, unsigned payload (what https endpoints get by default)" >&2
  AWS_UNSIGNED_PAYLOAD=true "$bench" --bucket "$bucket" --size-mib "$size" --data 1.0 \
    --channels "$channels" --object-mib "$object" --runs 1 --dir /var/tmp |
    grep summary | sed 's/^/unsigned /' | tee -a "$out"
done
echo "== a ${sparse_gib} GiB guest with ${sparse_data_gib} GiB of data: bytes uploaded" >&2
data=$(python3 -c "print($sparse_data_gib / $sparse_gib)")
"$bench" --bucket "$bucket" --size-mib $((sparse_gib * 1024)) --data "$data" --channels "$channels" \
  --object-mib "$object" --runs 1 --save-only | sed 's/^/sparse /' | tee -a "$out"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [l.split(" ", 1) for l in open(sys.argv[1]) if l.strip()]
ceil = [json.loads(j) for k, j in rows if k == "ceiling"]
ours = [json.loads(j) for k, j in rows if k == "ours"]
unsigned = [json.loads(j) for k, j in rows if k == "unsigned"]
med = lambda xs, k: statistics.median(x[k] for x in xs)
put, get = med(ceil, "put_mib_s") / 1024, med(ceil, "get_mib_s") / 1024
save, restore = med(ours, "save_data_gib_s"), med(ours, "restore_data_gib_s")
print(f"ceiling: put {put:.3f} GiB/s, ranged GET {get:.3f} GiB/s, 4 KiB GET {med(ceil, 'get4k_ms'):.2f} ms")
print(f"ours:    save {save:.3f} GiB/s ({save / put:.2f}x put ceiling), restore {restore:.3f} GiB/s "
      f"({restore / get:.2f}x GET ceiling), get {med(ours, 'get_data_gib_s'):.3f} GiB/s, "
      f"lazy runnable {med(ours, 'runnable_ms'):.1f} ms, 10 % touched {med(ours, 'touch10_ms'):.0f} ms")
us, ur = med(unsigned, "save_data_gib_s"), med(unsigned, "restore_data_gib_s")
print(f"unsigned payload: save {us:.3f} GiB/s ({us / put:.2f}x put ceiling), restore {ur:.3f} GiB/s "
      f"({ur / get:.2f}x GET ceiling)")
PY
rm -f "$out"
