#!/usr/bin/env python3
"""A/B of two `mapped-ram` binaries (e.g. the engine before and after a change) on the same
2 GiB images, disk and run: alternating save and restore at the default channel count, plus a
save over an existing snapshot against a save into an empty path. Medians of the rounds.

    python3 scripts/ab.py OLD_BINARY NEW_BINARY [--size 2G] [--runs 3] [--dir target/bench]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench import drop_caches, make_image, parse_size, cmp_files  # noqa: E402


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def save(binary, image, out, fresh=True, extra=()):
    if fresh and os.path.exists(out):
        os.unlink(out)
    drop_caches()
    r = run([binary, "--json", "save", "--ram", f"mem={image}", "-o", out, *extra])
    return r["gib_per_s"]


def restore(binary, snap, image, dst):
    if os.path.exists(dst):
        os.unlink(dst)
    drop_caches()
    r = run([binary, "--json", "restore", snap, "--ram", f"mem={dst}"])
    ok = cmp_files(image, dst)
    os.unlink(dst)
    assert ok, "restore is byte-identical"
    return r["gib_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--new-save-args", default="", help="extra save flags for NEW, e.g. --map-ram")
    a = ap.parse_args()
    size = parse_size(a.size)
    os.makedirs(a.dir, exist_ok=True)
    images = {}
    for kind, clustered in [("scattered", False), ("clustered", True)]:
        path = f"/dev/shm/mrab-{kind}.img"
        if not os.path.exists(path) or os.path.getsize(path) != size:
            make_image(path, size, clustered, 7)
        images[kind] = path
    dst = "/dev/shm/mrab-dst.img"
    rows = {}
    for rnd in range(a.runs):
        for kind, image in images.items():
            for name, binary in [("old", a.old), ("new", a.new)]:
                snap = os.path.join(a.dir, f"ab-{name}.mr")
                extra = a.new_save_args.split() if name == "new" else ()
                rows.setdefault((kind, "save, empty path", name), []).append(
                    save(binary, image, snap, extra=extra))
                rows.setdefault((kind, "save over existing", name), []).append(
                    save(binary, image, snap, fresh=False, extra=extra))
                rows.setdefault((kind, "restore", name), []).append(restore(binary, snap, image, dst))
        print(f"round {rnd + 1} done", file=sys.stderr, flush=True)
    print(f"| image ({a.size}) | operation | old GiB/s median (min–max) | new GiB/s median (min–max) | new/old |")
    print("|---|---|---|---|---|")
    for kind in images:
        for op in ["save, empty path", "save over existing", "restore"]:
            o, n = rows[(kind, op, "old")], rows[(kind, op, "new")]
            mo, mn = statistics.median(o), statistics.median(n)
            print(f"| {kind} | {op} | {mo:.2f} ({min(o):.2f}–{max(o):.2f}) | "
                  f"{mn:.2f} ({min(n):.2f}–{max(n):.2f}) | {mn / mo:.2f} |")


if __name__ == "__main__":
    main()
