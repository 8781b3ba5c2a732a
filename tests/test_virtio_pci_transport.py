"""VirtioPciDevice on a PciRoot, driven the way Linux's virtio_pci_modern does it."""

from __future__ import annotations

import os
import select
import struct

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus
from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.pci.root import PciRoot
from vmmcore.pci.testing import ConfigMech1, FakeIoEvents, FakeIrqRouter
from vmmcore.virtio import DeviceType, VirtioDevice
from vmmcore.virtio.pci_transport import VirtioPciDevice
from vmmcore.virtio.queue import VIRTQ_DESC_F_NEXT
from vmmcore.virtio.status import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
)
from vmmcore.virtio.testing import VirtqueueDriver

MiB = 1 << 20
TIMEOUT = 5.0


class Rng(VirtioDevice):
    device_type = DeviceType.RNG
    queue_max_sizes = (64,)

    def handle_queue(self, index: int) -> None:
        q, mem = self.queues[index], self.mem
        while (chain := q.pop(mem)) is not None:
            q.add_used(mem, chain, chain.write(mem, os.urandom(chain.writable_len)))
        self.signal_used(index)


class Gpu(Rng):
    device_type = DeviceType.GPU
    queue_max_sizes = (16, 16)
    device_features = 1 << 0

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(struct.pack("<IIII", 0, 0, 1, 0))


class Guest:
    """The guest side: PCI probing over 0xcf8 and virtio-pci modern register access."""

    def __init__(self, device: VirtioDevice) -> None:
        self.mem = GuestMemory([(0, 4 * MiB)])
        allocator = layout.system_allocator(4 * MiB)
        self.io, self.mmio = Bus("io"), Bus("mmio")
        self.router, self.ioev = FakeIrqRouter(), FakeIoEvents()
        self.root = PciRoot(self.io, self.mmio, allocator, irq_router=self.router,
                            ioevents=self.ioev)
        self.root.install()
        self.cf8 = ConfigMech1(self.io)
        self.pdev = VirtioPciDevice(device, self.mem)
        self.dev = self.root.add_device(self.pdev).device
        self.caps = self._virtio_caps()
        self.cf8.write(0, self.dev, 0, 0x04, 0x0006, 2)  # memory space + bus master
        lo = self.cf8.read(0, self.dev, 0, 0x10)
        hi = self.cf8.read(0, self.dev, 0, 0x14)
        self.bar = (lo & ~0xF) | hi << 32

    def cfg(self, reg: int, size: int = 4) -> int:
        return self.cf8.read(0, self.dev, 0, reg, size)

    def _virtio_caps(self) -> dict[int, tuple[int, ...]]:
        caps, ptr = {}, self.cfg(0x34, 1)
        while ptr:
            cap_id, nxt = self.cfg(ptr, 1), self.cfg(ptr + 1, 1)
            if cap_id == 0x09:
                raw = b"".join(self.cfg(ptr + i).to_bytes(4, "little") for i in range(0, 20, 4))
                cap_len, cfg_type, bar, _, off, length = struct.unpack_from("<BBBBxxII", raw, 2)
                extra = struct.unpack_from("<I", raw, 16)[0] if cap_len >= 20 else None
                caps[cfg_type] = (bar, off, length, extra, ptr)
            elif cap_id == 0x11:
                caps["msix"] = (ptr,)
            ptr = nxt
        return caps

    # common configuration registers (virtio 1.2 4.1.4.3)
    def read(self, cfg_type: int, off: int, size: int) -> int:
        base = self.caps[cfg_type][1]
        return int.from_bytes(self.mmio.read(self.bar + base + off, size), "little")

    def write(self, cfg_type: int, off: int, value: int, size: int) -> None:
        base = self.caps[cfg_type][1]
        self.mmio.write(self.bar + base + off, value.to_bytes(size, "little"))

    def common(self, off: int, size: int) -> int:
        return self.read(1, off, size)

    def set_common(self, off: int, value: int, size: int) -> None:
        self.write(1, off, value, size)

    def status(self) -> int:
        return self.common(0x14, 1)

    def device_features(self) -> int:
        self.set_common(0x00, 0, 4)
        lo = self.common(0x04, 4)
        self.set_common(0x00, 1, 4)
        return lo | self.common(0x04, 4) << 32

    def negotiate(self, features: int) -> bool:
        self.set_common(0x14, 0, 1)
        self.set_common(0x14, ACKNOWLEDGE, 1)
        self.set_common(0x14, ACKNOWLEDGE | DRIVER, 1)
        for sel in (0, 1):
            self.set_common(0x08, sel, 4)
            self.set_common(0x0C, (features >> (32 * sel)) & 0xFFFF_FFFF, 4)
        self.set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK, 1)
        return bool(self.status() & FEATURES_OK)

    def enable_msix(self) -> list[EventFd]:
        """MSI-X on, every vector unmasked with a distinct message; returns the irqfds."""
        (cap,) = self.caps["msix"]
        table = self.mmio
        n = (self.cfg(cap + 2, 2) & 0x7FF) + 1
        for v in range(n):
            entry = self.bar + 0x4000 + 16 * v
            table.write(entry, struct.pack("<IIII", 0xFEE0_0000, 0, 0x40 + v, 0))
        self.cf8.write(0, self.dev, 0, cap + 2, 1 << 15, 2)
        return [self.router.irqfds[gsi][0][0] for gsi in self.pdev.msix.gsis()]

    def setup_queue(self, index: int, drv: VirtqueueDriver, vector: int) -> None:
        self.set_common(0x16, index, 2)
        self.set_common(0x18, drv.size, 2)
        for off, addr in ((0x20, drv.desc), (0x28, drv.avail), (0x30, drv.used)):
            self.set_common(off, addr & 0xFFFF_FFFF, 4)  # two 32-bit halves, as Linux
            self.set_common(off + 4, addr >> 32, 4)
        self.set_common(0x1A, vector, 2)
        self.set_common(0x1C, 1, 2)

    def notify(self, index: int) -> None:
        self.set_common(0x16, index, 2)
        off = self.common(0x1E, 2)
        bar, base, _, mult, _ = self.caps[2]
        self.mmio.write(self.bar + base + off * mult, index.to_bytes(2, "little"))

    def close(self) -> None:
        self.pdev.destroy()
        self.root.close()
        self.mem.close()


def wait(evt: EventFd, timeout: float = TIMEOUT) -> bool:
    ready, _, _ = select.select([evt.fileno()], [], [], timeout)
    if ready:
        evt.try_read()
    return bool(ready)


@pytest.fixture
def guest():
    g = Guest(Rng())
    yield g
    g.close()


FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_EVENT_IDX
            | 1 << VIRTIO_F_RING_INDIRECT_DESC)


def bring_up(g: Guest, msix: bool = True, size: int = 16):
    vectors = g.enable_msix() if msix else []
    assert g.negotiate(FEATURES)
    if msix:
        g.set_common(0x10, 0, 2)  # config vector 0
        assert g.common(0x10, 2) == 0
    drv = VirtqueueDriver(g.mem, size, 0x10000, 0x20000, 0x10000, event_idx=True,
                          indirect=True)
    g.setup_queue(0, drv, 1 if msix else VIRTIO_MSI_NO_VECTOR)
    g.set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, 1)
    return drv, vectors


def test_identity_class_and_capabilities(guest):
    assert guest.cfg(0x00) == 0x1044_1AF4            # virtio, modern rng
    assert guest.cfg(0x08) >> 8 == 0xFF0000          # class OTHER
    assert guest.cfg(0x08) & 0xFF == 1               # revision 1: non-transitional
    assert guest.cfg(0x2C) == 0x0040_1AF4
    assert set(guest.caps) >= {1, 2, 3, 4, 5, "msix"}
    assert guest.caps[2][3] == 4                     # notify_off_multiplier
    assert guest.cfg(0x10) & 0x6 == 0x4              # BAR0: 64-bit memory
    assert guest.bar
    notify = {k[0] for k in guest.ioev.active}
    assert notify == {guest.bar + 0x3000}            # queue 0's doorbell is an ioeventfd


def test_gpu_is_a_display_controller():
    g = Guest(Gpu())
    try:
        assert g.cfg(0x00) == 0x1050_1AF4
        assert g.cfg(0x08) >> 8 == 0x038000
        assert g.read(4, 8, 4) == 1                  # device config through its cap
        assert g.common(0x12, 2) == 2                # num_queues
    finally:
        g.close()


def test_feature_negotiation(guest):
    offered = guest.device_features()
    assert offered == FEATURES                       # rng has no device bits
    assert not offered >> 34 & 1                     # RING_PACKED never offered
    assert not guest.negotiate(FEATURES | 1 << 40)   # unoffered bit: FEATURES_OK refused
    assert not guest.negotiate(FEATURES & ~(1 << VIRTIO_F_VERSION_1))
    assert guest.negotiate(FEATURES)


def test_rng_bring_up_with_msix(guest):
    drv, vectors = bring_up(guest)
    assert guest.status() & DRIVER_OK
    drv.add([], [64])
    guest.notify(0)
    assert wait(vectors[1]), "no MSI-X interrupt on the queue's vector"
    [used] = drv.get_used()
    assert used.length == 64 and used.data != b"\xaa" * 64
    drv.add([], [16], indirect=True)
    guest.notify(0)
    assert wait(vectors[1])
    assert drv.get_used()[0].length == 16


def test_intx_fallback_and_isr(guest):
    drv, _ = bring_up(guest, msix=False)
    intx_evt = guest.pdev.intx.irq_evt
    drv.add([], [8])
    guest.notify(0)
    assert wait(intx_evt), "no INTx"
    assert guest.read(3, 0, 1) == 1                  # ISR: queue bit; read clears
    assert guest.read(3, 0, 1) == 0
    assert not guest.pdev.intx.pending


def test_bad_ring_address_at_driver_ok_needs_reset(guest):
    vectors = guest.enable_msix()
    assert guest.negotiate(FEATURES)
    guest.set_common(0x10, 0, 2)
    guest.set_common(0x16, 0, 2)
    guest.set_common(0x20, 0x7FFF_0000, 4)           # descriptor table beyond RAM
    guest.set_common(0x1C, 1, 2)
    guest.set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, 1)
    assert guest.status() & DEVICE_NEEDS_RESET
    assert wait(vectors[0]), "no config interrupt"
    assert guest.pdev.device.worker is None          # never activated


def test_malformed_chain_needs_reset_then_reset_recovers(guest):
    drv, vectors = bring_up(guest)
    drv.write_desc(0, 0x20000, 4, VIRTQ_DESC_F_NEXT | 2, 0)  # a loop
    drv.publish(0)
    guest.notify(0)
    assert wait(vectors[0]), "no config interrupt for NEEDS_RESET"
    assert guest.status() & DEVICE_NEEDS_RESET
    assert guest.read(3, 0, 1) & 2                   # ISR config bit
    guest.set_common(0x14, 0, 1)                     # driver resets the device
    assert guest.status() == 0
    drv, vectors = bring_up(guest)
    assert not guest.status() & DEVICE_NEEDS_RESET
    drv.add([], [4])
    guest.notify(0)
    assert wait(vectors[1])
    assert drv.get_used()[0].length == 4


def test_hostile_common_config_accesses(guest):
    guest.set_common(0x16, 999, 2)                   # no such queue
    assert guest.common(0x18, 2) == 0                # reads as "unavailable"
    guest.set_common(0x18, 8, 2)
    guest.set_common(0x1C, 1, 2)                     # ignored
    guest.set_common(0x16, 0, 2)
    assert guest.common(0x18, 2) == 64               # max size until the driver sets it
    guest.set_common(0x1A, 500, 2)                   # no such MSI-X vector
    assert guest.common(0x1A, 2) == VIRTIO_MSI_NO_VECTOR
    guest.set_common(0x08, 7, 4)
    guest.set_common(0x0C, 0xFFFF_FFFF, 4)           # feature window 7: ignored
    guest.write(1, 0x37, 0xFF, 1)                    # last byte of queue_device
    assert guest.common(0x30, 8) == 0xFF << 56
    guest.mmio.write(guest.bar + 0x36, b"\x01\x02\x03\x04")  # straddles the end
    assert guest.mmio.read(guest.bar + 0x38, 4) == bytes(4)  # beyond: zeros
    guest.write(4, 0x10, 0x1234, 2)                  # read-only device config
    assert guest.read(4, 0, 4) == 0
    guest.set_common(0x1C, 1, 2)
    guest.set_common(0x20, 0x1000, 4)                # queue enabled: addresses frozen
    assert guest.common(0x20, 4) == 0


def test_pci_cfg_capability_window(guest):
    *_, cap = guest.caps[5]
    guest.cf8.write(0, guest.dev, 0, cap + 4, 0, 1)          # bar 0
    guest.cf8.write(0, guest.dev, 0, cap + 8, 0x12, 4)       # offset: num_queues
    guest.cf8.write(0, guest.dev, 0, cap + 12, 2, 4)         # length 2
    assert guest.cfg(cap + 16) == 1
    guest.cf8.write(0, guest.dev, 0, cap + 8, 0x16, 4)       # queue_select
    guest.cf8.write(0, guest.dev, 0, cap + 16, 5, 4)
    assert guest.common(0x16, 2) == 5


def test_queue_set_up_is_frozen_after_driver_ok():
    g = Guest(Gpu())
    try:
        drv, _ = bring_up(g)
        g.set_common(0x16, 1, 2)                     # queue 1 was never enabled
        g.set_common(0x20, 0x5000, 4)
        g.set_common(0x1C, 1, 2)                     # enabling it now is ignored
        assert g.common(0x1C, 2) == 0 and g.common(0x20, 4) == 0
        assert not g.pdev.queues[1].ready
    finally:
        g.close()
