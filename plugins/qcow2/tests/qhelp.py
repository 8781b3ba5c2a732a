"""Helpers for the qcow2 tests: qemu-img/qemu-io wrappers and a deterministic pattern."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(
    not (QEMU_IMG and QEMU_IO),
    reason="qemu-img/qemu-io not installed (Debian: apt-get install qemu-utils; "
           "scripts/e2e-setup installs it)")


def qimg(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=300)


def qio(path: Path, *cmds: str, fmt: str = "qcow2", check: bool = True
        ) -> subprocess.CompletedProcess:
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=300)
    if check and (r.returncode or "failed" in r.stdout or "error" in r.stdout.lower()):
        raise AssertionError(f"qemu-io {cmds}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def qcheck(path: Path) -> dict:
    """qemu-img check --output=json; asserts that no corruption was found."""
    r = qimg("check", "--output=json", path, check=False)
    # exit 0 clean, 3 leaks only; 2 corruption, 1 check failed
    assert r.returncode in (0, 3), f"qemu-img check rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    data = json.loads(r.stdout)
    assert not data.get("corruptions"), data
    return data


def pattern(n: int, seed: int) -> bytes:
    """n bytes that differ with position and seed (cheap, not random)."""
    block = bytes((seed * 7 + i * 13 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def read_all(disk) -> bytes:
    out = bytearray(disk.size)
    step = 1 << 20
    for off in range(0, disk.size, step):
        n = min(step, disk.size - off)
        disk.read_into(off, [memoryview(out)[off:off + n]])
    return bytes(out)


def write(disk, off: int, data: bytes) -> None:
    disk.write_from(off, [memoryview(data)])


def open_chain(path: Path, read_only: bool = True):
    """Open through the core's open_disk (so backing files of any format work)."""
    from vmmcore.disk import open_disk

    return open_disk(path, read_only=read_only)


def raw_available() -> bool:
    from vmmcore.registry import Registry

    rec = Registry(fresh=True).get("disk_format", "raw")
    return bool(rec and rec.spec is not None and rec.spec.implemented)
