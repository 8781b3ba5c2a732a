"""PciVirtioRig: a virtio device on a PciRoot, sandboxed or in-process, driven like Linux.

For tier-1 tests of device plugins in both modes ("a device behaves the same sandboxed
and with --disable-sandbox")::

    from vmmcore.sandbox.testing import PciVirtioRig

    @pytest.mark.parametrize("sandboxed", [False, True])
    def test_rng(sandboxed):
        with PciVirtioRig(lambda mem: VirtioPciDevice(create(opts, ctx), mem),
                          sandboxed=sandboxed, policies=[PLUGIN_POLICY]) as rig:
            used = rig.request(0, in_sizes=[64])
            assert used.length == 64

The rig brings the function up through configuration space (memory decoding, MSI-X with
one vector per queue plus the config vector, feature negotiation, queue set-up through
the common configuration, DRIVER_OK). A kick writes the queue's ioeventfd directly, as
KVM would, and completion waits on the vector's irqfd, so in the sandboxed case the data
path runs without the main process exactly as in a VM. Sandboxed, the device process is
jailed under the given policy files (the core's common policy is found by @include);
``log_failures=True`` is --seccomp-log-failures. While it waits for an interrupt the
rig watches the device process too: its death raises DeviceDied with the report vmm run
gives (the signal, or the system call seccomp refused), not a timeout.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Callable, Sequence

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus
from vmmcore.memory import GuestMemory
from vmmcore.pci.device import PciDevice, start_device
from vmmcore.pci.root import PciRoot
from vmmcore.pci.testing import ConfigMech1, FakeIoEvents, FakeIrqRouter
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.policy import compile_policy
from vmmcore.sandbox.proxy import DeviceDied, ProxyDevice
from vmmcore.virtio.status import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from vmmcore.virtio.testing import Used, VirtqueueDriver

MiB = 1 << 20
RING_FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_EVENT_IDX
                 | 1 << VIRTIO_F_RING_INDIRECT_DESC)


class PciVirtioRig:
    """See the module docstring."""

    def __init__(self, build: Callable[[GuestMemory], PciDevice], *, sandboxed: bool,
                 policies: Sequence[str] = (), log_failures: bool = False,
                 jail: JailConfig | None = None, mem_size: int = 8 * MiB,
                 features: int = 0, queue_size: int | None = None,
                 label: str = "virtio-dev", timeout: float = 10.0,
                 keep_fds: Sequence[int] = ()) -> None:
        self.mem = GuestMemory([(0, mem_size)])
        self.io, self.mmio = Bus("io"), Bus("mmio")
        self.router, self.ioev = FakeIrqRouter(), FakeIoEvents()
        self.root = PciRoot(self.io, self.mmio, layout.system_allocator(mem_size),
                            irq_router=self.router, ioevents=self.ioev)
        self.root.install()
        self.cf8 = ConfigMech1(self.io)
        self.timeout = timeout
        self.device: PciDevice | None = None
        try:
            if sandboxed:
                cfg = jail if jail is not None else JailConfig()
                if policies and cfg.seccomp is None:
                    cfg.seccomp = compile_policy(list(policies), log_failures=log_failures)
                self.device = ProxyDevice(build, self.mem, label=label, jail=cfg,
                                          timeout=timeout, keep_fds=keep_fds)
            else:                        # as vm_builder does with --disable-sandbox
                self.device = build(self.mem)
                start_device(self.device)
            self.dev = self.root.add_device(self.device).device
            self._bring_up(features, queue_size)
        except BaseException:
            self.close()
            raise

    # -- configuration -----------------------------------------------------------------------

    def cfg(self, reg: int, size: int = 4) -> int:
        return self.cf8.read(0, self.dev, 0, reg, size)

    def set_cfg(self, reg: int, value: int, size: int = 4) -> None:
        self.cf8.write(0, self.dev, 0, reg, value, size)

    def _caps(self) -> dict:
        caps, ptr = {}, self.cfg(0x34, 1)
        while ptr:
            cap_id = self.cfg(ptr, 1)
            if cap_id == 0x09:
                cfg_type, off = self.cfg(ptr + 3, 1), self.cfg(ptr + 8)
                caps.setdefault(cfg_type, (off, ptr))
            elif cap_id == 0x11:
                caps["msix"] = ptr
            ptr = self.cfg(ptr + 1, 1)
        return caps

    def common(self, off: int, size: int) -> int:
        return int.from_bytes(self.mmio.read(self.bar + self._common + off, size), "little")

    def set_common(self, off: int, value: int, size: int) -> None:
        self.mmio.write(self.bar + self._common + off, value.to_bytes(size, "little"))

    def read_device_config(self, off: int, size: int) -> bytes:
        return self.mmio.read(self.bar + self._device_cfg + off, size)

    def status(self) -> int:
        return self.common(0x14, 1)

    def _bring_up(self, features: int, queue_size: int | None) -> None:
        self.set_cfg(0x04, 0x0006, 2)                  # memory decoding + bus master
        self.bar = (self.cfg(0x10) & ~0xF) | self.cfg(0x14) << 32
        caps = self._caps()
        self._common, self._device_cfg = caps[1][0], caps.get(4, (0, 0))[0]
        notify_off, notify_cap = caps[2]
        self._notify, self._mult = notify_off, self.cfg(notify_cap + 16)
        msix = caps["msix"]
        nvec = (self.cfg(msix + 2, 2) & 0x7FF) + 1
        table = (self.cfg(msix + 4) & ~7)
        for v in range(nvec):
            self.mmio.write(self.bar + table + 16 * v,
                            struct.pack("<IIII", 0xFEE0_0000, 0, 0x40 + v, 0))
        self.set_cfg(msix + 2, 1 << 15, 2)             # MSI-X enable
        self.set_common(0x14, 0, 1)
        self.set_common(0x14, ACKNOWLEDGE | DRIVER, 1)
        offered = 0
        for sel in (0, 1):
            self.set_common(0x00, sel, 4)
            offered |= self.common(0x04, 4) << (32 * sel)
        self.features = offered & (RING_FEATURES | features)
        for sel in (0, 1):
            self.set_common(0x08, sel, 4)
            self.set_common(0x0C, (self.features >> (32 * sel)) & 0xFFFF_FFFF, 4)
        self.set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK, 1)
        if not self.status() & FEATURES_OK:
            raise AssertionError(f"features {self.features:#x} refused")
        self.set_common(0x10, 0, 2)                    # config vector 0
        nq = self.common(0x12, 2)
        self.drivers: list[VirtqueueDriver] = []
        data_each = (self.mem.size - MiB) // max(nq, 1)
        for i in range(nq):
            self.set_common(0x16, i, 2)
            size = min(self.common(0x18, 2), queue_size or 1 << 15)
            drv = VirtqueueDriver(self.mem, size, 0x1000 + i * 0x10000, MiB + i * data_each,
                                  data_each,
                                  event_idx=bool(self.features >> VIRTIO_F_RING_EVENT_IDX & 1),
                                  indirect=bool(
                                      self.features >> VIRTIO_F_RING_INDIRECT_DESC & 1))
            self.set_common(0x18, size, 2)
            for off, addr in ((0x20, drv.desc), (0x28, drv.avail), (0x30, drv.used)):
                self.set_common(off, addr & 0xFFFF_FFFF, 4)
                self.set_common(off + 4, addr >> 32, 4)
            self.set_common(0x1A, i + 1, 2)
            self.set_common(0x1C, 1, 2)
            self.drivers.append(drv)
        self.set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, 1)
        # MSI-X GSIs are allocated in vector order; 16-23 are the IOAPIC's (INTx).
        msix_gsis = sorted(g for g in self.router.irqfds if not 16 <= g < 24)
        self.vectors = [self.router.irqfds[g][0][0] for g in msix_gsis]
        self.kicks = {}
        for (addr, _len, _dm, _pio), evt in self.ioev.active.items():
            index = (addr - self.bar - self._notify) // max(self._mult, 1)
            self.kicks[index] = evt

    # -- requests ------------------------------------------------------------------------------

    def kick(self, queue: int) -> None:
        """Notify the device, as KVM does on a notify write: the ioeventfd."""
        self.kicks[queue].write(1)

    def wait_vector(self, vector: int, timeout: float | None = None) -> bool:
        """Wait for the vector's irqfd. The device process's pidfd is watched too, as
        vmm run's supervisor does, so a device that died (seccomp, a crash) raises
        DeviceDied naming the signal or system call at once instead of a timeout."""
        evt = self.vectors[vector]
        watched = [evt.fileno(), *self._pidfd()]
        deadline = time.monotonic() + (timeout or self.timeout)
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(watched, [], [], remaining)
            if evt.fileno() in ready:
                evt.try_read()
                return True
            if ready:
                self._raise_if_died()
                watched = [evt.fileno()]   # exited, not reaped yet: just the irqfd
        return False

    def _pidfd(self) -> list[int]:
        pidfd = getattr(self.device, "pidfd", None)
        return [] if pidfd is None else [pidfd]

    def _raise_if_died(self) -> None:
        """Reap and describe the exited device process (ProxyDevice.check_exited, which
        also reads the keeper's seccomp-violation event) and raise its report."""
        device = self.device
        if isinstance(device, ProxyDevice) and device.check_exited():
            raise DeviceDied(device.death_reason or "the device process died")

    def request(self, queue: int, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (),
                timeout: float | None = None) -> Used:
        """One chain on queue; kick; wait for its used entry (raises on timeout)."""
        drv = self.drivers[queue]
        drv.add(list(out), list(in_sizes))
        self.kick(queue)
        used: list[Used] = []
        while not used:
            used = drv.get_used()
            if used:
                break
            if not self.wait_vector(queue + 1, timeout):
                raise TimeoutError(f"queue {queue}: no used buffer "
                                   f"(device dead: {getattr(self.device, 'dead', False)})")
        return used[0]

    def reset(self) -> None:
        self.set_common(0x14, 0, 1)

    def close(self) -> None:
        if self.device is not None:
            self.device.destroy()
            self.device = None
        self.root.close()
        self.mem.close()

    def __enter__(self) -> PciVirtioRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
