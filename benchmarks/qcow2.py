"""qcow2 throughput: vmm's qcow2 format against qemu-io on the same image, in one run.

    python3 -m benchmarks.qcow2 [--size 256M] [--repeats 3] [--dir DIR]

Workloads (each on a fresh copy of the same image, our side and qemu-io alternating):

- seqwrite: 1 MiB writes from 0 to SIZE into an empty image (allocating clusters);
- seqread:  1 MiB reads of the whole, now written, image;
- randwrite: 4 KiB writes at random 4 KiB-aligned offsets of the written image (in place);
- randread:  4 KiB reads at random offsets.

qemu-io runs the same request list as `-c` commands in one process (its start-up time,
measured with an empty command list, is subtracted); ours is a Python loop over
Qcow2File.read_into/write_from with one reused buffer (page cache on both sides, no
flush per request, one final flush for writes on both sides). Prints MiB/s and IOPS
and the ratio ours/qemu-io. The issue's target: at least qemu-io's sequential throughput.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from vmm_qcow2.create import create_image
from vmm_qcow2.image import Qcow2File

MiB = 1 << 20


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _requests(kind: str, size: int, rnd: random.Random) -> list[tuple[int, int]]:
    if kind.startswith("seq"):
        return [(off, MiB) for off in range(0, size, MiB)]
    return [(rnd.randrange(size // 4096) * 4096, 4096) for _ in range(4000)]


def _ours(path: Path, kind: str, reqs: list[tuple[int, int]]) -> float:
    d = Qcow2File(path, not kind.endswith("write"))
    buf = memoryview(bytearray(os.urandom(MiB)))
    t0 = time.perf_counter()
    if kind.endswith("write"):
        for off, n in reqs:
            d.write_from(off, [buf[:n]])
        d.flush()
    else:
        for off, n in reqs:
            d.read_into(off, [buf[:n]])
    t = time.perf_counter() - t0
    d.close()
    return t


def _qemu_io(path: Path, kind: str, reqs: list[tuple[int, int]]) -> float:
    verb = "write" if kind.endswith("write") else "read"
    cmds: list[str] = []
    for off, n in reqs:
        cmds += ["-c", f"{verb} {off} {n}"]
    if verb == "write":
        cmds += ["-c", "flush"]
    base = ["qemu-io", "-f", "qcow2", "-t", "writeback"]
    t0 = time.perf_counter()
    subprocess.run([*base, "-c", "flush", str(path)], check=True, capture_output=True)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*base, *cmds, str(path)], check=True, capture_output=True)
    return max(1e-6, time.perf_counter() - t0 - startup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if not shutil.which("qemu-io"):
        raise SystemExit("qemu-io not found (Debian: apt-get install qemu-utils)")
    size = _size(args.size)
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        empty = tmp / "empty.qcow2"
        create_image(empty, size)
        full = tmp / "full.qcow2"
        shutil.copy(empty, full)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(full)],
                       check=True, capture_output=True)
        print(f"image {args.size}, 64 KiB clusters, page cache on both sides, "
              f"median of {args.repeats}")
        print(f"{'workload':<10} {'vmm':>14} {'qemu-io':>14} {'ratio':>7}")
        for kind in ("seqwrite", "seqread", "randwrite", "randread"):
            reqs = _requests(kind, size, rnd)
            src = empty if kind == "seqwrite" else full
            ours, theirs = [], []
            for _ in range(args.repeats):
                for who, fn, acc in (("vmm", _ours, ours), ("qemu", _qemu_io, theirs)):
                    img = tmp / f"{who}.qcow2"
                    shutil.copy(src, img)
                    acc.append(fn(img, kind, reqs))
                    img.unlink()
            nbytes = sum(n for _, n in reqs)
            a, b = statistics.median(ours), statistics.median(theirs)
            if kind.startswith("seq"):
                fa, fb, unit = nbytes / a / MiB, nbytes / b / MiB, "MiB/s"
            else:
                fa, fb, unit = len(reqs) / a, len(reqs) / b, "IOPS"
            print(f"{kind:<10} {fa:>8.0f} {unit:<5} {fb:>8.0f} {unit:<5} {fa / fb:>6.2f}x")


if __name__ == "__main__":
    main()
