#!/usr/bin/env bash
# A disposable S3 endpoint for the store tests and benchmarks: a one-node Ceph 16.2 cluster
# (one monitor, one memstore OSD, no manager) and a radosgw in front of it, all on 127.0.0.1.
#
#   scripts/ceph-rgw/start.sh                 # bring everything up (or report that it is up)
#   scripts/ceph-rgw/start.sh --gateway-only  # bring radosgw back on its old port (the
#                                             # cluster must still be running)
#   . "$MAPPED_RAM_RGW_DIR/s3.env"            # AWS_* variables for the CLI, boto3, curl
#
# Everything lives under $MAPPED_RAM_RGW_DIR (default /var/tmp/mapped-ram-rgw):
#   cluster/      configuration, monitor store, OSD, logs (cluster/log/), PID files (cluster/run/)
#   s3.env        `export` lines: endpoint, keys, region and the SDK switches Pacific's RGW needs
# Running it again while the gateway answers prints the details and changes nothing; a running
# cluster whose gateway is gone gets its gateway back; a dead or half-started cluster is
# stopped and replaced by a fresh, empty one. scripts/ceph-rgw/stop.sh
# takes it down. The packages come from .ci/install-deps; this script installs nothing.
#
# Tunables (environment):
#   MAPPED_RAM_RGW_MON_PORT        first monitor port tried (default 40789; it uses two)
#   MAPPED_RAM_RGW_PORT            first gateway port tried (default 7480)
#   MAPPED_RAM_RGW_MEMSTORE_BYTES  capacity the OSD advertises (default 8 GiB); memstore keeps
#                                  the objects in RAM, so only what is stored is used
#   MAPPED_RAM_RGW_ACCESS_KEY / MAPPED_RAM_RGW_SECRET_KEY   the S3 user's keys
#   MAPPED_RAM_RGW_TIMEOUT         seconds to wait for each daemon (default 120)
#
# Why some settings are what they are (each one cost time to find):
#   * `ms mon client mode = crc`: the cluster runs without cephx, and radosgw otherwise asks
#     the monitor for a secure session, which cannot be had; it then waits forever
#     (its log says `get_initial_auth_request returned -13`).
#   * `tcp_nodelay=1` on the beast frontend: small ranged GETs took ~45 ms (Nagle's algorithm
#     meeting delayed ACKs) instead of a few.
#   * `paxos propose interval = 0.05`: the monitor batches map changes for 1 s by default, and
#     radosgw creates its pools one after another; bootstrap took 13 s, now about 2.
#   * `rgw gc obj min wait` / `rgw gc processor period` = 30 s: deleted and overwritten data
#     stays in the OSD (RAM, with memstore) until garbage collection, by default after 2 hours.
#   * The daemons fork into the background and are re-parented; a container's PID 1 may leave
#     them as zombies, so a PID counts as running only if /proc/PID/stat is not in state Z.
#   * s3.env sets AWS_REQUEST_CHECKSUM_CALCULATION=when_required (and the response twin):
#     recent AWS SDKs upload with aws-chunked encoding and a trailing checksum by default,
#     which Pacific's RGW answers with HTTP 411 MissingContentLength.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${MAPPED_RAM_RGW_DIR:-/var/tmp/mapped-ram-rgw}
state=$dir/cluster
conf=$state/ceph.conf
env_file=$dir/s3.env
rgw_name=client.rgw.mappedram
access_key=${MAPPED_RAM_RGW_ACCESS_KEY:-mappedramaccesskey01}
secret_key=${MAPPED_RAM_RGW_SECRET_KEY:-mappedramsecretkey0000000000000000000001}
memstore_bytes=${MAPPED_RAM_RGW_MEMSTORE_BYTES:-8589934592}
patience=${MAPPED_RAM_RGW_TIMEOUT:-120}

gateway_only=0
for arg in "$@"; do
  case $arg in
    --gateway-only) gateway_only=1 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'ceph-rgw [%3ss] %s\n' "$SECONDS" "$*" >&2; }
fail() {
  say "FAILED: $*"
  local f
  for f in "$state"/log/*.log; do
    [ -s "$f" ] || continue
    echo "----- last lines of $f" >&2
    tail -n 15 "$f" >&2
  done
  exit 1
}

# --- what must be installed -------------------------------------------------------------------
missing=()
for tool in ceph ceph-mon ceph-osd monmaptool radosgw radosgw-admin curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "start.sh: cannot start the Ceph S3 gateway, missing: ${missing[*]}" >&2
  echo "start.sh: install them with '.ci/install-deps' (as root; Debian bookworm packages" \
    "ceph-mon ceph-osd radosgw ceph-common curl)" >&2
  exit 3
fi

# --- small helpers ------------------------------------------------------------------------------
# A PID file names a live process (a zombie is a dead one).
pid_alive() {
  local pid st
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] || return 1
  st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
osd_pidfile() { ls "$state"/run/osd.*.pid 2>/dev/null | head -n 1; }
cluster_alive() { pid_alive "$state/run/mon.a.pid" && pid_alive "$(osd_pidfile)"; }
gateway_alive() { pid_alive "$state/run/$rgw_name.pid"; }
answers() { curl -fsS -o /dev/null -m 5 "http://127.0.0.1:$1/"; }
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # free_port <first> <how many in a row>
  local p=$1 n=${2:-1} i ok
  while :; do
    ok=1
    for ((i = 0; i < n; i++)); do
      if in_use $((p + i)); then ok=0; break; fi
    done
    [ $ok = 1 ] && { echo "$p"; return; }
    p=$((p + n))
  done
}
wait_until() { # wait_until <description> <command...>
  local what=$1 deadline=$((SECONDS + patience))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "no $what after ${patience} s"
    sleep 0.2
  done
}
saved_rgw_port() { cat "$state/rgw.port" 2>/dev/null; }
report() {
  echo "state:     $state (logs in $state/log)"
  echo "variables: $env_file   (. it for the CLI / boto3)"
  echo "user:      access key $access_key, secret key $secret_key"
  echo "S3 ready at http://127.0.0.1:$1"
}
start_gateway() {
  local port
  port=$(saved_rgw_port)
  if in_use "$port"; then fail "port $port of the gateway is taken by another process"; fi
  say "radosgw on 127.0.0.1:$port"
  # Forks into the background once it has reached the cluster; `timeout` bounds a hang.
  CEPH_CONF=$conf timeout "$patience" radosgw -n "$rgw_name" </dev/null >>"$state/log/radosgw.out" 2>&1 ||
    fail "radosgw did not start"
  wait_until "answer from the gateway on port $port" answers "$port"
}

# --- gateway only -----------------------------------------------------------------------------
if [ $gateway_only = 1 ]; then
  [ -f "$conf" ] && [ -n "$(saved_rgw_port)" ] && cluster_alive ||
    { echo "start.sh --gateway-only: no running cluster under $state (run start.sh first)" >&2; exit 1; }
  port=$(saved_rgw_port)
  if gateway_alive && answers "$port"; then
    say "radosgw already answers"
  else
    if gateway_alive; then
      say "radosgw is running but not answering: stopping it first"
      MAPPED_RAM_RGW_DIR=$dir "$here/stop.sh" --gateway-only --kill >&2
    fi
    start_gateway
  fi
  report "$port"
  exit 0
fi

# --- already up? --------------------------------------------------------------------------------
if [ -f "$env_file" ] && [ -n "$(saved_rgw_port)" ] && cluster_alive; then
  if gateway_alive && answers "$(saved_rgw_port)"; then
    say "already running"
  else
    # The cluster and its data are fine; only the gateway is gone (or hung): replace it.
    say "cluster running, gateway not answering: restarting radosgw"
    gateway_alive && MAPPED_RAM_RGW_DIR=$dir "$here/stop.sh" --gateway-only --kill >&2
    start_gateway
  fi
  report "$(saved_rgw_port)"
  exit 0
fi

# --- a fresh cluster --------------------------------------------------------------------------
MAPPED_RAM_RGW_DIR=$dir "$here/stop.sh" >/dev/null 2>&1 || true
rm -rf "$state" "$env_file"
mkdir -p "$state"/{run,log,mon,osd,rgw,crash}

mon_port=$(free_port "${MAPPED_RAM_RGW_MON_PORT:-40789}" 2)
rgw_port=$(free_port "${MAPPED_RAM_RGW_PORT:-7480}")
echo "$rgw_port" >"$state/rgw.port"
fsid=$(cat /proc/sys/kernel/random/uuid)
mon_addrs="[v2:127.0.0.1:$mon_port,v1:127.0.0.1:$((mon_port + 1))]"

cat >"$conf" <<EOF
# Written by scripts/ceph-rgw/start.sh: a throw-away single-node cluster without cephx.
[global]
fsid = $fsid
mon host = $mon_addrs
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
run dir = $state/run
pid file = $state/run/\$name.pid
admin socket = $state/run/\$name.asok
log file = $state/log/\$name.log
mon cluster log file = $state/log/cluster.log
crash dir = $state/crash
keyring = $state/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
mon warn on insecure global id reclaim allowed = false

[mon]
mon data = $state/mon/\$cluster-\$id
mon allow pool delete = true
paxos propose interval = 0.05
paxos min wait = 0.01

[osd]
osd data = $state/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = $memstore_bytes

[$rgw_name]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
rgw data = $state/rgw
rgw thread pool size = 128
rgw gc obj min wait = 30
rgw gc processor period = 30
EOF
export CEPH_CONF=$conf

say "monitor on 127.0.0.1:$mon_port"
monmaptool --create --fsid "$fsid" --addv a "$mon_addrs" "$state/monmap" >/dev/null
ceph-mon -i a --mkfs --monmap "$state/monmap" >>"$state/log/mon-mkfs.log" 2>&1 || fail "ceph-mon --mkfs"
timeout "$patience" ceph-mon -i a </dev/null >>"$state/log/mon.out" 2>&1 || fail "ceph-mon did not start"
wait_until "monitor quorum" ceph --connect-timeout 5 mon stat

say "memstore OSD ($memstore_bytes bytes advertised)"
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
osd_id=$(ceph osd new "$osd_uuid")
mkdir -p "$state/osd/ceph-$osd_id"
ceph-osd -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >>"$state/log/osd-mkfs.log" 2>&1 || fail "ceph-osd --mkfs"
timeout "$patience" ceph-osd -i "$osd_id" </dev/null >>"$state/log/osd.out" 2>&1 || fail "ceph-osd did not start"
osd_up() { ceph osd stat -f json | grep -q '"num_up_osds":1,'; }
wait_until "OSD up" osd_up

start_gateway

say "S3 user"
radosgw-admin user create --uid=mapped-ram --display-name="mapped-ram tests" \
  --access-key="$access_key" --secret="$secret_key" >/dev/null 2>>"$state/log/radosgw-admin.out" ||
  fail "radosgw-admin user create"

endpoint=http://127.0.0.1:$rgw_port
cat >"$env_file.tmp" <<EOF
# Written by scripts/ceph-rgw/start.sh for the gateway under $dir.
export AWS_ENDPOINT_URL=$endpoint
export AWS_ENDPOINT=$endpoint
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
export CEPH_CONF=$conf
EOF
mv "$env_file.tmp" "$env_file"
say "up"
report "$rgw_port"
