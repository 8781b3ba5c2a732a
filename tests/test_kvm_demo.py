"""Tier 2: the demo guest (`vmm run` with no kernel) on the host's /dev/kvm.

With virtio-blk disks attached, the demo brings each one up with the guest runtime's
virtio-pci driver (guests/runtime/virtio.c, BARs assigned by the guest), prints its
capacity, whether it is read-only and the first 16 bytes of sector 0, and never writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)

RUN_TIMEOUT = 120
EXCEPTION_EXITS = range(0xE0, 0x100)
DISK_LINE = re.compile(r"^ +(vd[a-z]) at 00:([0-9a-f]{2})\.(\d): (\d+) sectors \((\d+) MiB\), "
                       r"(read-only|read-write)", re.M)
SECTOR_LINE = re.compile(r"^ +sector 0: ([0-9a-f ]+?)  \|(.*)\|$", re.M)


def vmm(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def require_blk() -> None:
    from vmmcore.registry import get_registry

    for kind, name in (("device", "virtio_blk"), ("disk_format", "raw")):
        rec = get_registry().get(kind, name)
        if rec is None:
            pytest.skip(f"the {kind} plugin {name} is not installed in this environment")
        if rec.broken:
            pytest.fail(f"the {kind} plugin {name} is broken: {rec.error}")
        if not rec.implemented:
            pytest.skip(f"the {kind} plugin {name} says it is not implemented yet")


def image(path: Path, size: int, first: bytes) -> bytes:
    data = bytearray(size)
    data[:len(first)] = first
    data[512:520] = b"sector 1"            # the demo must read sector 0 only
    path.write_bytes(data)
    return bytes(data)


def shown(first16: bytes) -> tuple[str, str]:
    """What the demo prints for 16 bytes: hex in groups of 4 bytes, printable ASCII."""
    hx = " ".join(first16[i:i + 4].hex() for i in range(0, 16, 4))
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in first16)
    return hx, text


def test_vmm_run_without_devices_boots_the_demo_and_exits_0():
    result = vmm("run")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "vmm demo guest" in out, out
    assert "  PCI      bus 0:" in out and "  RTC" in out, out
    assert "disks" not in out and not DISK_LINE.search(out), out


def test_demo_shows_each_disk_size_and_first_sector_and_writes_nothing(tmp_path):
    require_blk()
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    first_rw = b"vmm demo rw disk\x00\x01\xff"
    first_ro = b"\xeb\x3c\x90MSWIN4.1 read-only"
    before_rw = image(rw, 8 << 20, first_rw)             # 16384 sectors, 8 MiB
    before_ro = image(ro, 3 << 20, first_ro)             # 6144 sectors, 3 MiB
    stat_rw, stat_ro = rw.stat(), ro.stat()

    result = vmm("run", "--rwdisk", str(rw), "--disk", str(ro))
    assert result.returncode not in EXCEPTION_EXITS, explain(result)
    assert result.returncode == 0, explain(result)
    out = result.stdout
    assert "vmm demo guest" in out and "powering off" in out, out
    assert "2 virtio-blk" in out, out

    disks = DISK_LINE.findall(out)
    assert [(d[0], d[3], d[4], d[5]) for d in disks] == [
        ("vda", "16384", "8", "read-write"),            # command-line order
        ("vdb", "6144", "3", "read-only"),
    ], out
    sectors = SECTOR_LINE.findall(out)
    assert sectors == [shown(before_rw[:16]), shown(before_ro[:16])], out
    assert "|vmm demo rw disk|" in out and "|.<.MSWIN4.1 read|" in out, out
    assert "failed" not in out, out

    # read-only: neither host file changed, not even its modification time
    assert rw.read_bytes() == before_rw and ro.read_bytes() == before_ro
    assert rw.stat().st_mtime_ns == stat_rw.st_mtime_ns
    assert ro.stat().st_mtime_ns == stat_ro.st_mtime_ns


def test_demo_reads_a_disk_given_as_a_device_and_an_empty_one(tmp_path):
    require_blk()
    img, empty = tmp_path / "disk.img", tmp_path / "empty.img"
    before = image(img, 1 << 20, bytes(range(0x30, 0x40)))
    empty.write_bytes(b"")
    result = vmm("run", "--device", f"virtio_blk:path={img},ro=true",
                 "--device", f"virtio_blk:path={empty}")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    disks = DISK_LINE.findall(out)
    assert [(d[3], d[5]) for d in disks] == [("2048", "read-only"), ("0", "read-write")], out
    assert SECTOR_LINE.findall(out) == [shown(before[:16])], out
    assert "sector 0: (empty disk)" in out, out
    assert img.read_bytes() == before and empty.read_bytes() == b""
