#!/usr/bin/env bash
# Takes down what scripts/ceph-rgw/start.sh brought up under $MAPPED_RAM_RGW_DIR
# (default /var/tmp/mapped-ram-rgw), by the daemons' PID files.
#
#   stop.sh                        # stop radosgw, the OSD and the monitor; delete the cluster
#   stop.sh --keep                 # the same, but leave cluster/ (logs) on disk
#   stop.sh --gateway-only [--kill]  # stop radosgw alone (SIGTERM; --kill: SIGKILL at once,
#                                  # like a crash); the cluster and its data stay, and
#                                  # `start.sh --gateway-only` brings it back on the same port
set -uo pipefail

dir=${MAPPED_RAM_RGW_DIR:-/var/tmp/mapped-ram-rgw}
state=$dir/cluster
gateway_only=0 kill_now=0 keep=0
for arg in "$@"; do
  case $arg in
    --gateway-only) gateway_only=1 ;;
    --kill) kill_now=1 ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "stop.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

# Alive = /proc/PID/stat exists and is not a zombie's (the daemons are re-parented, and the
# PID 1 of a container may be slow to reap them).
alive() {
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]
}

# halt <pid file> <first signal>: signal, wait up to 5 s, then SIGKILL; forget the PID file.
halt() {
  local file=$1 sig=$2 pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null)
  if [ -n "$pid" ] && alive "$pid"; then
    echo "stop.sh: $(basename "$file" .pid) (pid $pid) <- SIG$sig"
    kill "-$sig" "$pid" 2>/dev/null
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then
      echo "stop.sh: $(basename "$file" .pid) still alive after 5 s <- SIGKILL"
      kill -KILL "$pid" 2>/dev/null
      for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.05; done
    fi
  fi
  rm -f "$file"
}

gateway_signal=TERM
[ $kill_now = 1 ] && gateway_signal=KILL
for f in "$state"/run/client.rgw.*.pid; do
  [ -e "$f" ] && halt "$f" "$gateway_signal"
done
[ $gateway_only = 1 ] && exit 0

# The OSD gets SIGKILL: its data is thrown away, and a memstore OSD would first write all of
# it to disk on a clean shutdown. The monitor goes last.
for f in "$state"/run/osd.*.pid; do
  [ -e "$f" ] && halt "$f" KILL
done
halt "$state/run/mon.a.pid" TERM

if [ $keep = 0 ]; then
  rm -rf "$state" "$dir/s3.env"
fi
exit 0
