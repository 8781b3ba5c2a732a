"""Crash safety: a writer killed with SIGKILL at random moments, many times; afterwards
`qemu-img check` (and our check) finds no corruption (leaks at most), and every chunk
the writer flushed before dying reads back intact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qhelp import QEMU_IMG, pattern, qcheck
from vmm_qcow2.create import create_image
from vmm_qcow2.image import Qcow2File

WRITER = Path(__file__).with_name("crash_writer.py")


@pytest.mark.parametrize("cluster_size,refcount_bits", [(65536, 16), (512, 64), (4096, 1)])
def test_kill_writer(tmp_path, cluster_size, refcount_bits):
    rnd = random.Random(cluster_size + refcount_bits)
    p = tmp_path / "crash.qcow2"
    size = 8 << 20
    chunk = 16384
    create_image(p, size, cluster_size=cluster_size, refcount_bits=refcount_bits)
    flushed: set[int] = set()
    for run in range(8):
        proc = subprocess.Popen([sys.executable, str(WRITER), str(p), str(run), str(chunk)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(rnd.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode in (-signal.SIGKILL, 0), out
        done = {int(x) for x in out.split() if x.isdigit()}
        # every run rewrites chunks with the same content, so all announced ones count
        flushed |= done
        if QEMU_IMG:
            qcheck(p)
        with Qcow2File(p, True) as d:
            res = d.check()
            assert res.corruptions == 0, res.errors
            half = d.size // 2
            for i in sorted(flushed):
                buf = bytearray(chunk)
                d.read_into(half + i * chunk, [memoryview(buf)])
                assert bytes(buf) == pattern(chunk, i), f"run {run}: chunk {i} lost"
    assert flushed, "the writer never got to flush anything"
    # leaks are reclaimable: repair, then the image is clean
    with Qcow2File(p, False) as d:
        d.repair_leaks()
        assert d.check().clean
    if QEMU_IMG:
        assert qcheck(p).get("leaks", 0) == 0
    os.unlink(p)
