"""Tier 2: a test guest on /dev/kvm drives virtio-wl over virtio-pci and talks Wayland to
a real headless weston: registry globals through VFD_RECV, a wl_shm pool on a VFD_NEW
buffer it maps at the returned pfn and draws into, attached to a surface.

The VM is built by vmmcore.vm_builder.build_vm with the README's wiring recipe applied
around _create_device (a VmMemoryController for the VM, set on the device), since the
builder does not wire VmMemoryRequest yet.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from vmmcore import guests as guest_builds

pytestmark = pytest.mark.kvm

GUEST_SRC = Path(__file__).parent / "guest" / "virtio_wl.c"
RUN_TIMEOUT = 120


def build_guest(out: Path) -> Path:
    """gcc the guest with the runtime, the flags and the linker script of vmmcore.guests."""
    src = guest_builds.source_dir()
    sources = [str(src / s) for s in (*guest_builds.RUNTIME_SOURCES, "runtime/virtio.c",
                                      "runtime/irq.c")] + [str(GUEST_SRC)]
    cmd = [guest_builds.compiler(), *guest_builds.CFLAGS, "-Werror", *guest_builds.LDFLAGS,
           f"-I{src / 'runtime'}", "-T", str(src / guest_builds.LINKER_SCRIPT), "-o", str(out),
           *sources]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def kvm_ok():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("tier 2 needs read-write access to /dev/kvm")


def test_guest_draws_into_a_shm_buffer_weston_accepts(kvm_ok, weston, tmp_path, monkeypatch):
    from vmmcore import vm_builder
    from vmmcore.config import DeviceConfig, VmConfig
    from vmmcore.registry import get_registry
    from vmmcore.vm_control import VmMemoryController
    from vmmcore.vm_events import VmEvent

    devices = []
    original = vm_builder._create_device

    def wired(inst, device, index):       # the README's recipe
        if getattr(inst, "vm_memory", None) is None:
            inst.vm_memory = VmMemoryController(inst.vm, inst.allocator)
            inst.stack.callback(inst.vm_memory.close)
        pci = original(inst, device, index)
        model = getattr(pci, "device", None)
        if hasattr(model, "vm_memory") and model.vm_memory is None:
            model.vm_memory = inst.vm_memory
            devices.append(model)
        return pci

    monkeypatch.setattr(vm_builder, "_create_device", wired)
    spec = get_registry().get("device", "virtio_wl").spec
    options = {o.name: o.default_value() for o in spec.options}
    options["wayland_sock"] = weston.socket
    out = tmp_path / "serial.txt"
    config = VmConfig(kernel=build_guest(tmp_path / "virtio_wl.elf"), mem_mib=64,
                      serial=[f"type=file,path={out}"],
                      devices=[DeviceConfig("virtio_wl", options)])
    config.validate()
    inst = vm_builder.build_vm(config)
    watchdog = threading.Timer(RUN_TIMEOUT, inst.stop, args=("test watchdog",))
    watchdog.start()
    try:
        vm_exit = inst.run()
        serial = out.read_text(errors="replace")
        assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 0), (vm_exit, serial)
        assert "virtio-wl: OK" in serial
        globals_ = re.findall(r"^global \d+ (\S+) \d+$", serial, re.M)
        assert "wl_compositor" in globals_ and "wl_shm" in globals_, serial
        m = re.search(r"^vfd_new id 2 pfn (0x[0-9a-f]+) size 16384$", serial, re.M)
        assert m, serial
        # What the guest drew at the pfn is in the memfd the compositor was given.
        [dev] = devices
        [mapping] = inst.vm_memory.mappings
        assert mapping.guest_addr == int(m.group(1), 16) << 12
        with mmap.mmap(dev.vfds[2].shm_fd, 16384) as pixels:
            words = struct.unpack("<4096I", pixels[:])
        assert words == tuple(0xFF000000 | ((i * 2654435761 & 0xFFFFFFFF) >> 8)
                              for i in range(4096))
    finally:
        watchdog.cancel()
        inst.close()
    assert inst.vm_memory.mappings == []
