"""Tier 2: our virtio-rng test guest on /dev/kvm against a sandboxed device.

The VM is built by build_vm without devices; the device is added as a ProxyDevice
(jailed, under the plugin's policy) before run(), as the builder's sandbox wiring does.
The guest enumerates it, sets up MSI-X and a queue, and reads random bytes: queue kicks
(KVM_IOEVENTFD) and MSI-X interrupts (KVM_IRQFD, routes pushed through the main
process) reach the device process without the main process. A device that makes a
forbidden system call stops the VM with an error naming it.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmmcore import guests as guest_builds
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.policy import compile_policy
from vmmcore.sandbox.proxy import ProxyDevice, SandboxSupervisor
from vmmcore.virtio.pci_transport import VirtioPciDevice
from vmmcore.vm_events import VmEvent

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)

RUN_TIMEOUT = 120
RNG_LINE = re.compile(r"^rng\[(\d)\]: ([0-9a-f]{128})$", re.M)


def _rng_plugin():
    try:
        from vmm_virtio_rng import device as rng_device
        from vmm_virtio_rng.plugin import PLUGIN
    except ImportError:
        pytest.skip("the virtio_rng plugin is not installed")
    import vmm_virtio_rng

    policy = Path(vmm_virtio_rng.__file__).parent / PLUGIN.policy
    return rng_device, {o.name: o.default_value() for o in PLUGIN.options}, policy


def _run(tmp_path, build, policy) -> tuple:
    from vmmcore.config import VmConfig
    from vmmcore.vm_builder import build_vm

    try:
        guest = guest_builds.guest_path("tests/virtio_rng")
    except Exception as e:  # no gcc / guest build failed
        pytest.skip(f"test guest unavailable: {e}")
    out = tmp_path / "serial.txt"
    config = VmConfig(kernel=guest, mem_mib=64, serial=[f"type=file,path={out}"])
    config.validate()
    inst = build_vm(config)
    try:
        supervisor = SandboxSupervisor(inst.events)
        inst.stack.callback(supervisor.stop)
        proxy = supervisor.add(ProxyDevice(build, inst.mem, label="virtio_rng0",
                                           jail=JailConfig(seccomp=compile_policy([policy]))))
        inst.pci_root.add_device(proxy)
        supervisor.start()
        watchdog = threading.Timer(RUN_TIMEOUT, inst.stop, args=("test watchdog",))
        watchdog.start()
        try:
            vm_exit = inst.run()
        finally:
            watchdog.cancel()
    finally:
        inst.close()
    return vm_exit, out.read_text(errors="replace"), proxy


def test_sandboxed_virtio_rng_serves_the_guest(tmp_path):
    rng_device, options, policy = _rng_plugin()
    ctx = SimpleNamespace(name="virtio_rng0", index=0, mem_size=64 << 20)

    def build(mem):
        return VirtioPciDevice(rng_device.create(options, ctx), mem, label=ctx.name)

    vm_exit, serial, proxy = _run(tmp_path, build, policy)
    assert (vm_exit.event, vm_exit.status) == (VmEvent.GUEST_EXIT, 0), (vm_exit, serial)
    assert serial.count("msix interrupt received") == 2, serial
    samples = dict(RNG_LINE.findall(serial))
    assert set(samples) == {"0", "1"} and samples["0"] != samples["1"], serial
    assert "virtio-rng: OK" in serial
    assert proxy.dead and "shut down" in proxy.death_reason   # destroyed with the VM


def test_device_killed_by_seccomp_stops_the_vm_with_an_error(tmp_path):
    rng_device, options, policy = _rng_plugin()
    ctx = SimpleNamespace(name="virtio_rng0", index=0, mem_size=64 << 20)

    class Forbidden(rng_device.VirtioRng):
        def handle_queue(self, index: int) -> None:
            os.getpgrp()                      # not in its policy

    def build(mem):
        model = rng_device.create(options, ctx)
        model.__class__ = Forbidden
        return VirtioPciDevice(model, mem, label=ctx.name)

    vm_exit, serial, _ = _run(tmp_path, build, policy)
    assert vm_exit.event is VmEvent.ERROR and vm_exit.status == 1, (vm_exit, serial)
    assert vm_exit.message == ("device virtio_rng0 was killed by seccomp: system call 111 "
                               "(getpgrp) is not allowed by its policy")
