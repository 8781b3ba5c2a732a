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
from vmmcore.errors import VmmError

pytestmark = pytest.mark.kvm

GUEST_SRC = Path(__file__).parent / "guest" / "virtio_wl.c"
RUN_TIMEOUT = 120


def build_guest(out: Path) -> Path:
    """gcc the guest with the runtime, the flags and the linker script of vmmcore.guests."""
    try:
        src = guest_builds.source_dir()
    except VmmError:            # a wheel install (tox): the checkout's guests/ still works
        src = Path(__file__).resolve().parents[3] / "guests"
        if not (src / guest_builds.LINKER_SCRIPT).is_file():
            pytest.skip("the guest runtime sources (guests/) are not available")
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
    from vmmcore.vm_events import VmEvent

    devices = []
    original = vm_builder._create_device

    def recorded(inst, device, index):    # note the model the core built
        pci = original(inst, device, index)
        model = getattr(pci, "device", None)
        if hasattr(model, "vm_memory"):
            assert model.vm_memory is inst.vm_memory    # the core's channel (API 1.1)
            devices.append(model)
        return pci

    monkeypatch.setattr(vm_builder, "_create_device", recorded)
    spec = get_registry().get("device", "virtio_wl").spec
    options = {o.name: o.default_value() for o in spec.options}
    options["wayland_sock"] = weston.socket
    out = tmp_path / "serial.txt"
    # In process (--disable-sandbox): the test reads the model's memfd afterwards. The
    # sandboxed default is test_vmm_run_gives_the_device_the_core_vm_memory_channel.
    config = VmConfig(kernel=build_guest(tmp_path / "virtio_wl.elf"), mem_mib=64,
                      serial=[f"type=file,path={out}"],
                      devices=[DeviceConfig("virtio_wl", options)], disable_sandbox=True)
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



def test_vmm_run_gives_the_device_the_core_vm_memory_channel(kvm_ok, weston, tmp_path):
    """`vmm run GUEST --device virtio_wl:...` (sandboxed, the default): the device process
    maps its VFD_NEW memfds through VmMemoryRequests to the main process; the guest
    completes."""
    import sys

    out = tmp_path / "serial.txt"
    result = subprocess.run(
        [sys.executable, "-m", "vmmcore.cli", "run", str(build_guest(tmp_path / "wl.elf")),
         "-m", "64", "--serial", f"type=file,path={out}",
         "--device", f"virtio_wl:wayland_sock={weston.socket}"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    serial = out.read_text(errors="replace") if out.exists() else ""
    assert result.returncode == 0, (result.returncode, result.stderr, serial)
    assert "virtio-wl: OK" in serial and re.search(r"^vfd_new id 2 pfn 0x[0-9a-f]+ ", serial,
                                                   re.M), serial

def test_sandboxed_device_under_its_policy(kvm_ok, tmp_path, monkeypatch):
    """The same guest with the device in a jailed child (ProxyDevice) under the plugin's
    seccomp policy: the compositor socket and a VmMemoryServer socket are bind-mounted
    into the jail; VmMemoryRequests cross to the main process, which maps the memfd."""
    pytest.importorskip("vmmcore.sandbox.proxy")
    from wl_rig import WESTON, Weston

    if WESTON is None:
        pytest.skip("weston is not installed (apt-get install -y weston)")
    from vmm_virtio_wl.device import create

    from vmmcore import vm_builder
    from vmmcore.config import DeviceConfig, VmConfig
    from vmmcore.plugin_api import DeviceContext
    from vmmcore.registry import get_registry
    from vmmcore.sandbox.jail import JailConfig
    from vmmcore.sandbox.policy import compile_policy
    from vmmcore.sandbox.proxy import ProxyDevice
    from vmmcore.virtio.pci_transport import VirtioPciDevice
    from vmmcore.vm_control import ConnectingVmMemoryClient, VmMemoryController, VmMemoryServer
    from vmmcore.vm_events import VmEvent

    # Not under /tmp: the jail's new root is a tmpfs mounted over /tmp, which would hide
    # bind sources there.
    base = next((d for d in ("/var/tmp", "/run") if os.access(d, os.W_OK)), None)
    if base is None:
        pytest.skip("no writable directory outside /tmp for the bind-mounted sockets")
    weston = Weston(base_dir=base)
    record = get_registry().get("device", "virtio_wl")
    # A wheel install of the core (tox) lacks seccomp/common_device.policy: use the checkout's.
    checkout_policies = Path(__file__).resolve().parents[3] / "seccomp"
    seccomp_dirs = [checkout_policies] if checkout_policies.is_dir() else []
    vm_sock = weston.runtime_dir / "vm-memory.sock"
    servers = []
    proxies = []

    def sandboxed(inst, device, index):
        inst.vm_memory = VmMemoryController(inst.vm, inst.allocator)
        inst.stack.callback(inst.vm_memory.close)
        server = VmMemoryServer(inst.vm_memory, vm_sock)
        inst.stack.callback(server.close)
        servers.append(server)
        ctx = DeviceContext(name=f"virtio_wl{index}", index=index,
                            mem_size=inst.config.mem_mib << 20)
        options = dict(device.options)

        def build(mem):              # runs in the device process, before the jail closes
            model = create(options, ctx)
            model.vm_memory = ConnectingVmMemoryClient(vm_sock)
            return VirtioPciDevice(model, mem, label=ctx.name)

        paths = [str(p) for p in create(options, ctx).host_paths()] + [str(vm_sock)]
        jail = JailConfig(binds=[(p, p, True) for p in paths],
                          seccomp=compile_policy([record.policy_path], search_path=seccomp_dirs),
                          preload=("vmm_virtio_wl.device", "vmm_virtio_wl.protocol"))
        proxy = ProxyDevice(build, inst.mem, label=ctx.name, jail=jail)
        inst.stack.callback(proxy.destroy)
        proxies.append(proxy)
        return proxy

    monkeypatch.setattr(vm_builder, "_create_device", sandboxed)
    options = {o.name: o.default_value() for o in record.spec.options}
    options["wayland_sock"] = weston.socket
    out = tmp_path / "serial.txt"
    # In process (--disable-sandbox): the test reads the model's memfd afterwards. The
    # sandboxed default is test_vmm_run_gives_the_device_the_core_vm_memory_channel.
    config = VmConfig(kernel=build_guest(tmp_path / "virtio_wl.elf"), mem_mib=64,
                      serial=[f"type=file,path={out}"],
                      devices=[DeviceConfig("virtio_wl", options)], disable_sandbox=True)
    config.validate()
    try:
        inst = vm_builder.build_vm(config)
        servers[0].start()             # a thread: only after the device process forked
        watchdog = threading.Timer(RUN_TIMEOUT, inst.stop, args=("test watchdog",))
        watchdog.start()
        try:
            vm_exit = inst.run()
            serial = out.read_text(errors="replace")
            assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 0), (vm_exit, serial)
            assert "virtio-wl: OK" in serial
            # the device really ran in another process, under a seccomp filter
            [proxy] = proxies
            assert proxy.device_pid != os.getpid() and not proxy.dead
            status = Path(f"/proc/{proxy.device_pid}/status").read_text()
            assert re.search(r"^Seccomp:\s+2$", status, re.M), status
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
            m = re.search(r"^vfd_new id 2 pfn (0x[0-9a-f]+) size 16384$", serial, re.M)
            assert m, serial
            [mapping] = inst.vm_memory.mappings
            assert mapping.guest_addr == int(m.group(1), 16) << 12
            words = struct.unpack("<4096I", inst.vm_memory.read(mapping.slot, 0, 16384))
            assert words == tuple(0xFF000000 | ((i * 2654435761 & 0xFFFFFFFF) >> 8)
                                  for i in range(4096))
        finally:
            watchdog.cancel()
            inst.close()
        assert inst.vm_memory.mappings == []
    finally:
        weston.stop()
