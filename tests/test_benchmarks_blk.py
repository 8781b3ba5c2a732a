"""benchmarks/blk runs end to end: every workload, the three ways its driver waits
(interrupts with KVM-style halt polling, interrupts with none, polled), both file modes,
a forked device process. Nothing here looks at speed; a
benchmark whose driver hangs, misreads a block or prints no table is a broken tool."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("vmm_virtio_blk", "vmm_raw")),
    reason="benchmarks.blk drives the virtio_blk and raw plugins; not installed here")


def test_every_workload_runs_and_reports(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.blk", "--size", "8M", "--seconds", "0.05",
         "--repeats", "1", "--depth", "4", "--halt-poll-ns", "200000", "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines()
            if re.match(r"(rand|seq)(read|write) ", line)]
    labels = {(" ".join(r.split()[:3] + [w for w in ("sleep", "polled") if f" {w} " in r]),
               "direct" if " direct " in r else "buffered") for r in rows}
    expected = {(f"{w} {wait}".strip(), mode)
                for w in ("randread 4K QD1", "randread 4K QD4", "seqread 1M QD1",
                          "seqwrite 1M QD1")
                for wait in ("", "sleep", "polled") if not (wait and "QD4" in w)
                for mode in ("buffered", "direct")}
    assert labels == expected, proc.stdout
    # every device row says which wake-ups it paid for: kicks/interrupts/sleeps per request
    waits = {r.split()[3] if r.split()[3] in ("sleep", "polled") else "irq":
             re.search(r" (\d+\.\d\d)/(\d+\.\d\d)/(\d+\.\d\d) ", r) for r in rows
             if " 1M QD1 " in r and " buffered " in r and "read" in r}
    assert all(waits.values()), proc.stdout
    irqs = {w: float(m.group(2)) for w, m in waits.items()}
    assert irqs["polled"] == 0 and irqs["irq"] > 0.9 and irqs["sleep"] > 0.9, proc.stdout
    assert float(waits["sleep"].group(3)) > 0.9, proc.stdout    # halt_poll_ns=0: all sleep
    # with halt polling, most waits for a ~40 µs 1 MiB page-cache read end in the poll
    assert float(waits["irq"].group(3)) < 0.5, proc.stdout
    assert "poll_us=32" in proc.stdout                      # the device's default
    assert not list(tmp_path.iterdir()), "the image was left behind"
