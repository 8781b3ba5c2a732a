"""What plugin discovery adds to the CLI's start-up, against a bare interpreter.

Runs each command many times, interleaved so that machine noise hits all of them alike,
and prints the median wall time, the ratio to `python -c pass` and the milliseconds
added:

    python -c pass                       the floor: starting the interpreter
    python -c "import click"             what any click CLI pays
    vmm --help                           must not touch plugins at all
    vmm run --help                       the device options are static: no discovery either
    vmm plugins list                     entry-point discovery + importing every plugin spec
    vmm plugins list (no stevedore cache)  the same after an install invalidated the cache

Target (issue 3): `vmm --help` and `vmm plugins list` each add under 100 ms to
`python -c pass`.  Usage:

    python benchmarks/startup.py [--runs N]

`vmm` is run as `python -m vmmcore.cli` with the same interpreter, so the numbers do not
include the console-script wrapper (a few ms).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_MS = 100.0


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    args = ap.parse_args()

    py = sys.executable
    vmm = [py, "-m", "vmmcore.cli"]
    warm_cache = tempfile.mkdtemp(prefix="vmm-bench-cache-")
    env = {**os.environ, "XDG_CACHE_HOME": warm_cache}
    cases: list[tuple[str, list[str], str]] = [
        ("python -c pass", [py, "-c", "pass"], "warm"),
        ("python -c 'import click'", [py, "-c", "import click"], "warm"),
        ("vmm --help", [*vmm, "--help"], "warm"),
        ("vmm run --help", [*vmm, "run", "--help"], "warm"),
        ("vmm plugins list", [*vmm, "plugins", "list"], "warm"),
        ("vmm plugins list (cold cache)", [*vmm, "plugins", "list"], "cold"),
    ]
    try:
        for _, cmd, _kind in cases:      # warm up the OS caches and stevedore's cache
            _time(cmd, env)
        samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(args.runs):
            for name, cmd, kind in cases:
                if kind == "cold":
                    cold = tempfile.mkdtemp(prefix="vmm-bench-cold-")
                    samples[name].append(_time(cmd, {**os.environ, "XDG_CACHE_HOME": cold}))
                    shutil.rmtree(cold, ignore_errors=True)
                else:
                    samples[name].append(_time(cmd, env))
    finally:
        shutil.rmtree(warm_cache, ignore_errors=True)

    base = statistics.median(samples["python -c pass"])
    print(f"{'command':32} {'median':>9} {'ratio':>7} {'added':>9}   ({args.runs} runs, "
          f"{sys.implementation.name} {sys.version.split()[0]})")
    failed = False
    for name, _, _ in cases:
        med = statistics.median(samples[name])
        added = (med - base) * 1000
        mark = ""
        if name in ("vmm --help", "vmm plugins list"):
            ok = added < TARGET_MS
            failed |= not ok
            mark = f"   target < {TARGET_MS:.0f} ms: {'ok' if ok else 'MISSED'}"
        print(f"{name:32} {med * 1000:7.1f}ms {med / base:6.2f}x {added:7.1f}ms{mark}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
