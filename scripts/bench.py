#!/usr/bin/env python3
"""One interleaved benchmark run of mapped-ram against the disk ceiling (fio) and QEMU 10.0.

Everything runs on the same guest images, in the same directory, on the same disk, in one
interleaved loop (each round measures every configuration once), with caches dropped before
every timed step. Writes BENCHMARKS.md (medians of the rounds, with min-max) and the raw
samples to <dir>/results.json.

    scripts/bench.sh                       # 2 GiB images, 3 rounds (about 15 minutes)
    scripts/bench.sh --size 256M --runs 1  # a quick smoke run

Needs root (drop_caches), fio, qemu-system-x86_64 10.x and a release build (bench.sh builds it).
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

PAGE = 4096
GIB = 1 << 30


def parse_size(s):
    s = s.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1].lower(), 1)
    return int(s[:-1] if mult != 1 else s) * mult


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# System helpers

_warned = False


def drop_caches():
    global _warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        if not _warned:
            log(f"warning: cannot drop caches ({e}); numbers include a warm page cache")
            _warned = True


def cached_kib():
    """Page cache of regular files: Cached less Shmem (the guest images and the restore
    destination live on /dev/shm, which /proc/meminfo counts as Cached too)."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0])
    return fields.get("Cached", 0) - fields.get("Shmem", 0)


def rss_anon_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def run_measured(cmd):
    """Runs cmd; returns wall seconds, CPU seconds, peak anonymous RSS, page-cache growth."""
    cache0 = cached_kib()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, rss_anon_kib(proc.pid))
        time.sleep(0.002)
    wall = time.monotonic() - t0
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {err.strip()}")
    return {
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "user_cpu": ru.ru_utime,
        "peak_anon_mib": peak / 1024,
        "cache_growth_mib": max(0, cached_kib() - cache0) / 1024,
        "stdout": out,
    }


def cmp_files(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


# --------------------------------------------------------------------------------------------
# Images


def make_image(path, size, clustered, seed):
    """~25 % zero pages (page by page, or in 2 MiB runs); the rest random bytes."""
    rng = random.Random(seed)
    group = 2 << 20
    with open(path, "wb") as f:
        for _ in range(size // group):
            if clustered:
                f.write(bytes(group) if rng.random() < 0.25 else os.urandom(group))
                continue
            buf = bytearray(os.urandom(group))
            for p in range(group // PAGE):
                if rng.random() < 0.25:
                    buf[p * PAGE:(p + 1) * PAGE] = bytes(PAGE)
            f.write(buf)


# --------------------------------------------------------------------------------------------
# fio


def fio(directory, rw, jobs, size):
    path = os.path.join(directory, "fio.dat")
    per_job = size // jobs
    cmd = ["fio", "--name=ceiling", f"--filename={path}", f"--rw={rw}", "--bs=1M",
           "--direct=1", "--ioengine=psync", f"--numjobs={jobs}", f"--size={per_job}",
           f"--offset_increment={per_job}", "--group_reporting", "--output-format=json"]
    if rw == "write":
        cmd.append("--end_fsync=1")
    drop_caches()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if rw == "write" else "read"]
    return side["bw_bytes"]


# --------------------------------------------------------------------------------------------
# mapped-ram


def ours_save(binary, image, out, channels, dio, gap=None, checksums=True, preallocate=True):
    if os.path.exists(out):
        os.unlink(out)
    drop_caches()
    cmd = [binary, "--json", "save", "--ram", f"mem={image}", "-o", out,
           "--channels", str(channels), "--direct-io", dio]
    if gap is not None:
        cmd += ["--write-gap-pages", str(gap)]
    if not checksums:
        cmd += ["--checksums", "off"]
    if not preallocate:
        cmd.append("--no-preallocate")
    m = run_measured(cmd)
    r = json.loads(m["stdout"])
    return {"seconds": r["seconds"], "data_bytes": r["data_bytes"], "cpu": m["cpu"],
            "user_cpu": m["user_cpu"], "peak_anon_mib": m["peak_anon_mib"],
            "cache_growth_mib": m["cache_growth_mib"], "direct_io": r["direct_io"],
            "writes": r["writes"]}


def ours_restore(binary, snap, image, dst, channels, dio, gap=None):
    if os.path.exists(dst):
        os.unlink(dst)
    drop_caches()
    cmd = [binary, "--json", "restore", snap, "--ram", f"mem={dst}",
           "--channels", str(channels), "--direct-io", dio]
    if gap is not None:
        cmd += ["--read-gap-pages", str(gap)]
    m = run_measured(cmd)
    r = json.loads(m["stdout"])
    ok = cmp_files(image, dst)
    os.unlink(dst)
    if not ok:
        raise RuntimeError(f"restore of {snap} is not byte-identical")
    return {"seconds": r["seconds"], "data_bytes": r["data_bytes"], "cpu": m["cpu"],
            "user_cpu": m["user_cpu"], "peak_anon_mib": m["peak_anon_mib"],
            "cache_growth_mib": m["cache_growth_mib"], "direct_io": r["direct_io"],
            "reads": r["reads"]}


def stored_bytes(binary, snap):
    info = json.loads(subprocess.run([binary, "--json", "inspect", snap], capture_output=True,
                                     text=True, check=True).stdout)
    return sum(b["pages_stored"] * b["page_size"] for b in info["blocks"])


# --------------------------------------------------------------------------------------------
# QEMU


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")


def qemu_start(mem_path, size, sock, incoming):
    cmd = ["qemu-system-x86_64", "-machine", "none,memory-backend=mem", "-object",
           f"memory-backend-file,id=mem,size={size},mem-path={mem_path},share=on",
           "-nodefaults", "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off"]
    if incoming:
        cmd += ["-incoming", "defer"]
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, Qmp(sock)


def qemu_setup(q, multifd, dio):
    caps = [{"capability": "mapped-ram", "state": True},
            {"capability": "multifd", "state": multifd > 0}]
    q.cmd("migrate-set-capabilities", capabilities=caps)
    params = {"max-bandwidth": 1 << 40, "direct-io": dio}
    if multifd > 0:
        params["multifd-channels"] = multifd
    q.cmd("migrate-set-parameters", **params)


def qemu_wait(q, proc):
    while True:
        st = q.cmd("query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU migration {status}: {st.get('error-desc')}")
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited: {proc.stderr.read().decode()}")
        time.sleep(0.005)


def qemu_stop(proc, q):
    try:
        q.cmd("quit")
    except Exception:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def qemu_save(image, size, out, multifd, dio, sock):
    if os.path.exists(out):
        os.unlink(out)
    proc, q = qemu_start(image, size, sock, False)
    try:
        qemu_setup(q, multifd, dio)
        drop_caches()
        cache0 = cached_kib()
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.monotonic()
        q.cmd("migrate", uri=f"file:{out}")
        qemu_wait(q, proc)
        t1 = time.monotonic()
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)  # QEMU never syncs; a durable save includes it
        os.close(fd)
        t2 = time.monotonic()
        cpu = cpu_seconds(proc.pid) - cpu0
        growth = max(0, cached_kib() - cache0) / 1024
    finally:
        qemu_stop(proc, q)
    return {"seconds": t2 - t0, "seconds_nosync": t1 - t0, "cpu": cpu,
            "cache_growth_mib": growth}


def qemu_restore(snap, image, dst, size, multifd, dio, sock):
    if os.path.exists(dst):
        os.unlink(dst)
    proc, q = qemu_start(dst, size, sock, True)
    try:
        qemu_setup(q, multifd, dio)
        drop_caches()
        cache0 = cached_kib()
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.monotonic()
        q.cmd("migrate-incoming", uri=f"file:{snap}")
        qemu_wait(q, proc)
        t1 = time.monotonic()
        cpu = cpu_seconds(proc.pid) - cpu0
        growth = max(0, cached_kib() - cache0) / 1024
    finally:
        qemu_stop(proc, q)
    ok = cmp_files(image, dst)
    os.unlink(dst)
    if not ok:
        raise RuntimeError(f"QEMU restore of {snap} is not byte-identical")
    return {"seconds": t1 - t0, "cpu": cpu, "cache_growth_mib": growth}


# --------------------------------------------------------------------------------------------
# Report


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_range(xs, f="{:.2f}"):
    if not xs:
        return "-"
    return f"{f.format(med(xs))} ({f.format(min(xs))}–{f.format(max(xs))})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/mapped-ram")
    ap.add_argument("--channels", default="1,2,4")
    ap.add_argument("--extra-channels", default="8",
                    help="channel counts run with direct-io on only (memory at many channels)")
    ap.add_argument("--qemu-multifd", default="0,1,2,4", help="0 = mapped-ram without multifd")
    ap.add_argument("--gaps", default="0,16,64,256", help="write/read gap policies tried at the best channel count")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()

    size = parse_size(a.size)
    os.makedirs(a.dir, exist_ok=True)
    # findmnt names ext4 as such (stat -f says "ext2/ext3" for all three).
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", a.dir], capture_output=True,
                        text=True).stdout.strip() or "unknown file system"
    channels = [int(c) for c in a.channels.split(",")]
    a.extra_channels = [int(c) for c in a.extra_channels.split(",") if c]
    multifds = [int(c) for c in a.qemu_multifd.split(",")]
    gaps = [int(g) for g in a.gaps.split(",")]
    shm = "/dev/shm"
    images = {"scattered": f"{shm}/mrbench-scattered.img", "clustered": f"{shm}/mrbench-clustered.img"}
    dst = f"{shm}/mrbench-dst.img"
    sock = os.path.join(a.dir, "qmp.sock")
    ours_file = os.path.join(a.dir, "ours.mr")
    qemu_file = os.path.join(a.dir, "qemu.mr")

    for i, (name, path) in enumerate(images.items()):
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            log(f"making {name} image ({size >> 20} MiB)")
            make_image(path, size, name == "clustered", 1000 + i)

    R = {"fio": {}, "ours_save": {}, "ours_restore": {}, "qemu_save": {}, "qemu_restore": {},
         "stored": {}, "qemu_stored": {}}

    def add(table, key, sample):
        R[table].setdefault(key, []).append(sample)

    for run in range(a.runs):
        log(f"== round {run + 1}/{a.runs}")
        for rw in ("write", "read"):
            for jobs in (1, 2):
                bw = fio(a.dir, rw, jobs, min(size, 2 * GIB))
                add("fio", f"{rw}-{jobs}", bw)
                log(f"fio {rw} {jobs} job(s): {bw / GIB:.2f} GiB/s")
        os.unlink(os.path.join(a.dir, "fio.dat"))
        for img, path in images.items():
            for dio in ("off", "on"):
                for ch in channels:
                    s = ours_save(a.bin, path, ours_file, ch, dio)
                    add("ours_save", f"{img}|{ch}|{dio}|default", s)
                    R["stored"][img] = stored_bytes(a.bin, ours_file)
                    r = ours_restore(a.bin, ours_file, path, dst, ch, dio)
                    add("ours_restore", f"{img}|{ch}|{dio}|default", r)
                    log(f"ours {img} ch={ch} dio={dio}: save {size / GIB / s['seconds']:.2f} GiB/s, "
                        f"restore {size / GIB / r['seconds']:.2f} GiB/s")
            for ch in a.extra_channels:
                # Memory and CPU at more channels than cores (issue target: < 64 MiB at 8).
                s = ours_save(a.bin, path, ours_file, ch, "on")
                add("ours_save", f"{img}|{ch}|on|default", s)
                r = ours_restore(a.bin, ours_file, path, dst, ch, "on")
                add("ours_restore", f"{img}|{ch}|on|default", r)
                log(f"ours {img} ch={ch} dio=on: save {size / GIB / s['seconds']:.2f} GiB/s, "
                    f"restore {size / GIB / r['seconds']:.2f} GiB/s, peak anon "
                    f"{s['peak_anon_mib']:.1f}/{r['peak_anon_mib']:.1f} MiB")
            best_ch = max(channels)
            for gap in gaps:
                s = ours_save(a.bin, path, ours_file, best_ch, "on", gap)
                add("ours_save", f"{img}|{best_ch}|on|gap{gap}", s)
                r = ours_restore(a.bin, ours_file, path, dst, best_ch, "on", gap)
                add("ours_restore", f"{img}|{best_ch}|on|gap{gap}", r)
                log(f"ours {img} gap={gap}: save {size / GIB / s['seconds']:.2f} GiB/s, "
                    f"restore {size / GIB / r['seconds']:.2f} GiB/s")
            # The cost of page checksums, and what is left without them (zero-page detection,
            # scheduling, the syscalls' user-space share).
            s = ours_save(a.bin, path, ours_file, best_ch, "on", checksums=False)
            add("ours_save", f"{img}|{best_ch}|on|checksums-off", s)
            log(f"ours {img} checksums off: save {size / GIB / s['seconds']:.2f} GiB/s")
            # What preallocating the page regions (fallocate before O_DIRECT writes) gains.
            s = ours_save(a.bin, path, ours_file, best_ch, "on", preallocate=False)
            add("ours_save", f"{img}|{best_ch}|on|no-preallocate", s)
            log(f"ours {img} no preallocation: save {size / GIB / s['seconds']:.2f} GiB/s")
            if a.no_qemu:
                continue
            for dio in (False, True):
                for mf in multifds:
                    if mf == 0 and dio:
                        continue  # direct-io is silently ignored without multifd
                    s = qemu_save(path, size, qemu_file, mf, dio, sock)
                    add("qemu_save", f"{img}|{mf}|{'on' if dio else 'off'}", s)
                    R["qemu_stored"][img] = stored_bytes(a.bin, qemu_file)
                    r = qemu_restore(qemu_file, path, dst, size, mf, dio, sock)
                    add("qemu_restore", f"{img}|{mf}|{'on' if dio else 'off'}", r)
                    log(f"qemu {img} multifd={mf} dio={dio}: save+fsync {size / GIB / s['seconds']:.2f} GiB/s, "
                        f"restore {size / GIB / r['seconds']:.2f} GiB/s")
            for f in (ours_file, qemu_file):
                if os.path.exists(f):
                    os.unlink(f)

    with open(os.path.join(a.dir, "results.json"), "w") as f:
        json.dump({"size": size, "runs": a.runs, "results": R}, f, indent=1)
    write_report(a, size, fs, R, channels)


def write_report(a, size, fs, R, channels):
    gib = size / GIB
    fio_w = max(med(R["fio"]["write-1"]), med(R["fio"]["write-2"]))
    fio_r = max(med(R["fio"]["read-1"]), med(R["fio"]["read-2"]))
    L = []
    w = L.append
    w("# Benchmarks\n")
    w(f"Produced by `scripts/bench.sh --size {a.size} --runs {a.runs}` on "
      f"{time.strftime('%Y-%m-%d')}: one interleaved run on the same images, directory "
      f"(`{a.dir}`, {fs}) and disk; caches dropped before every timed step. Guest images: "
      f"{size >> 20} MiB each on /dev/shm (QEMU's `memory-backend-file`, our `--ram` file), "
      f"~25 % zero pages scattered page by page, or in 2 MiB runs; the rest random bytes. "
      f"Medians of {a.runs} round(s), (min–max). Machine: {os.cpu_count()} CPUs. "
      f"This machine is noisy (±40 % between runs): compare within one table.\n")
    w("Durable save = until the data is on disk: ours includes `fdatasync` + directory `fsync`; "
      "QEMU's time is migrate-to-completed **plus an `fsync` of the file** (QEMU never syncs). "
      "Data rate = page bytes written (or read) per second; ratios to fio use it.\n")
    w("## Disk ceiling (fio, O_DIRECT, 1 MiB blocks)\n")
    w("| test | 1 job GiB/s | 2 jobs GiB/s |\n|---|---|---|")
    for rw in ("write", "read"):
        w(f"| sequential {rw} | {fmt_range([x / GIB for x in R['fio'][rw + '-1']])} | "
          f"{fmt_range([x / GIB for x in R['fio'][rw + '-2']])} |")
    w("")
    for img in ("scattered", "clustered"):
        qs = {k: v for k, v in R["qemu_save"].items() if k.startswith(img + "|")}
        qr = {k: v for k, v in R["qemu_restore"].items() if k.startswith(img + "|")}
        best_qs = min((med([x["seconds"] for x in v]), k) for k, v in qs.items()) if qs else (float("nan"), "-")
        best_qr = min((med([x["seconds"] for x in v]), k) for k, v in qr.items()) if qr else (float("nan"), "-")
        for direction, table, best in (("save", "ours_save", best_qs), ("restore", "ours_restore", best_qr)):
            w(f"## {img.capitalize()} image: {direction}\n")
            ceiling = fio_w if direction == "save" else fio_r
            w(f"QEMU's best configuration ({direction}): {best[1].split('|', 1)[-1].replace('|', ' multifd, direct-io ')} "
              f"at {gib / best[0]:.2f} GiB/s (median). fio ceiling: {ceiling / GIB:.2f} GiB/s.\n")
            w("| tool | channels | direct-io | policy | GiB/s of RAM | data GiB/s | × fio | × QEMU best | CPU s | user CPU s/GiB | page-cache growth | peak anon RSS MiB |")
            w("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for key, samples in R[table].items():
                im, ch, dio, pol = key.split("|")
                if im != img:
                    continue
                secs = [x["seconds"] for x in samples]
                data = [x["data_bytes"] / x["seconds"] / GIB for x in samples]
                ratio_fio = med([x["data_bytes"] / x["seconds"] for x in samples]) / ceiling
                ratio_q = best[0] / med(secs) if best[0] == best[0] else float("nan")
                growth = med([x["cache_growth_mib"] for x in samples]) / (size >> 20) * 100
                w(f"| mapped-ram | {ch} | {dio} | {pol} | {fmt_range([gib / s for s in secs])} | "
                  f"{fmt_range(data)} | {ratio_fio:.2f} | {ratio_q:.2f} | {med([x['cpu'] for x in samples]):.2f} | "
                  f"{med([x.get('user_cpu', float('nan')) for x in samples]) / gib:.3f} | "
                  f"{growth:.1f} % | {med([x['peak_anon_mib'] for x in samples]):.1f} |")
            qtab = qs if direction == "save" else qr
            stored = R["qemu_stored"].get(img, 0)
            for key, samples in qtab.items():
                _, mf, dio = key.split("|")
                secs = [x["seconds"] for x in samples]
                data = [stored / s / GIB for s in secs]
                growth = med([x["cache_growth_mib"] for x in samples]) / (size >> 20) * 100
                w(f"| QEMU 10.0 | {'multifd ' + mf if mf != '0' else 'no multifd'} | {dio} | - | "
                  f"{fmt_range([gib / s for s in secs])} | {fmt_range(data)} | "
                  f"{med([stored / s for s in secs]) / ceiling:.2f} | {best[0] / med(secs):.2f} | "
                  f"{med([x['cpu'] for x in samples]):.2f} | - | {growth:.1f} % | - |")
            w("")
    begin, end = "<!-- bench.py: begin -->", "<!-- bench.py: end -->"
    body = begin + "\n" + "\n".join(L) + "\n" + end
    old = open(a.out).read() if os.path.exists(a.out) else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = body + "\n\n" + old
    with open(a.out, "w") as f:
        f.write(new.rstrip("\n") + "\n")
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
