"""Tier 2: KVM's binary statistics (vmmcore.kvm.stats) and `vmm kvm_stats`.

The end-to-end test is also the evidence behind benchmarks/blk's interrupt-driven rows:
a guest of `vmm run` that waits in HLT for virtio-blk interrupts is halted by KVM, and
KVM's halt polling (when this host's kvm module has halt_poll_ns > 0) polls for those
interrupts before putting the vCPU thread to sleep -- what benchmarks/halt_poll.py models.
(On kvm-pvm most of these HLTs find the interrupt already pending -- the guest's ring-0
code is emulated, so the device has finished by then -- and KVM does not halt at all;
the halts that do block are the ones polled for.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmmcore import guests as guest_builds
from vmmcore.errors import KvmError

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)

HALT_POLL_NS = Path("/sys/module/kvm/parameters/halt_poll_ns")
READS = 1000                      # the guest's extra reads, each waiting in HLT


KVM_CAP_BINARY_STATS_FD = 203


@pytest.fixture(autouse=True)
def binary_stats():
    from vmmcore.kvm import Kvm

    kvm = Kvm()
    try:
        if not kvm.check_extension(KVM_CAP_BINARY_STATS_FD):
            pytest.skip("this kernel's KVM has no binary statistics (Linux 5.14+)")
    finally:
        kvm.close()


@pytest.fixture
def vm_and_vcpu():
    from vmmcore.kvm import Kvm

    vm = Kvm().create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    yield vm, vcpu
    vcpu.close()
    vm.close()


def test_vcpu_and_vm_statistics_are_read_with_their_descriptors(vm_and_vcpu):
    vm, vcpu = vm_and_vcpu
    stats = vcpu.stats()
    assert stats is vcpu.stats()                        # one file, opened once
    assert stats.id.endswith("/vcpu-0") and stats.id.startswith(vm.stats().id)
    names = {d.name: d for d in stats.descs}
    for name in ("halt_exits", "halt_attempted_poll", "halt_successful_poll", "exits"):
        assert names[name].type == "cumulative" and names[name].size == 1
    values = stats.read()
    assert set(values) == set(names)
    assert values["halt_exits"] == 0 and values["exits"] == 0      # never ran
    for d in stats.descs:                               # histograms: one value per bucket
        if d.type.endswith("hist"):
            assert isinstance(values[d.name], list) and len(values[d.name]) == d.size
        else:
            assert isinstance(values[d.name], int)
    assert names["halt_poll_success_ns"].unit_label == "ns"
    assert stats.units()["halt_wait_ns"] == "ns"
    assert "exits" not in stats.units()                 # a plain count has no unit
    assert isinstance(vm.stats().read(), dict)


def test_statistics_fail_cleanly_once_the_vcpu_is_closed():
    from vmmcore.kvm import Kvm

    vm = Kvm().create_vm()
    vcpu = vm.create_vcpu(0)
    stats = vcpu.stats()
    vcpu.close()
    with pytest.raises(KvmError, match="closed"):
        stats.read()
    with pytest.raises(KvmError, match="gone"):
        vcpu.stats()
    vm.close()
    with pytest.raises(KvmError, match="gone"):
        vm.stats()


# -- a guest waiting for virtio-blk interrupts, seen through `vmm kvm_stats` ---------------


def vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmcore.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def reap(proc: subprocess.Popen) -> None:
    """However the test ended, the VMM process is gone afterwards."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_a_blk_guest_s_halts_and_their_halt_polling_show_in_kvm_stats(tmp_path):
    from vmmcore.registry import get_registry

    for kind, name in (("device", "virtio_blk"), ("disk_format", "raw")):
        rec = get_registry().get(kind, name)
        if rec is None:
            pytest.skip(f"the {kind} plugin {name} is not installed in this environment")
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * 1024))
    serial = tmp_path / "serial.txt"
    sockdir = Path(tempfile.mkdtemp(prefix="vmmst", dir="/tmp"))   # short unix socket path
    sock = sockdir / "vm.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmcore.cli", "run", "-m", "64", "-p", f"reads={READS}",
         "-p", "hold=1", "--serial", f"type=file,path={serial}", "-s", str(sock),
         str(guest_builds.guest_path("tests/virtio_blk")), "--device",
         f"virtio_blk:path={img}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while "holding" not in text and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            text = serial.read_text(errors="replace") if serial.exists() else ""
        assert "holding" in text, (text, proc.poll())
        m = re.search(rf"virtio-blk: {READS} more reads, (\d+) halts", text)
        assert m, text
        guest_halts = int(m.group(1))

        result = vmm("kvm_stats", str(sock), "halt_", "--json")
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        [vcpu] = stats["vcpus"]
        s = vcpu["stats"]
        assert all(k.startswith("halt_") for k in s) and all(
            k.startswith("halt_") for k in stats["vm"]["stats"]), s
        assert stats["units"]["halt_wait_ns"] == "ns"
        # every HLT the guest executed is one KVM counted (plus any from before the reads)
        assert s["halt_exits"] >= guest_halts > 0, (s, guest_halts)
        assert s["halt_successful_poll"] <= s["halt_attempted_poll"], s
        poll_ns = int(HALT_POLL_NS.read_text()) if HALT_POLL_NS.exists() else 0
        if poll_ns:
            # The guest halts only in irq_wait_vector (waiting for the device; the LAPIC
            # timer there is a 10 ms safety net) and in the final cli;hlt, which is still
            # in progress. So the polls counted here were for virtio-blk completions:
            # KVM's halt polling is on for this VMM's guests (nothing here turns it off).
            # It starts after the first blocking halt shorter than halt_poll_ns; with
            # 1000 reads there are dozens of those.
            assert s["halt_attempted_poll"] > 0, s

        table = vmm("kvm_stats", str(sock), "halt_exits")
        assert table.returncode == 0, table.stderr
        assert re.search(r"^\s+halt_exits\s+\d+", table.stdout, re.M), table.stdout
        bad = vmm("kvm_stats", str(sock), "")
        assert bad.returncode == 1 and "names" in bad.stderr, bad
        assert vmm("stop", str(sock)).returncode == 0
        assert proc.wait(30) == 0
    finally:
        reap(proc)
        for f in sockdir.iterdir():
            f.unlink()
        sockdir.rmdir()
