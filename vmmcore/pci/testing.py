"""Test doubles and a guest-side config-access driver for tier-1 PCI tests.

Shipped with the core (not under tests/) so that the virtio transport's and plugins'
tests can drive a PciRoot exactly as a guest would, without KVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmmcore.bus import Bus
from vmmcore.eventfd import EventFd
from vmmcore.pci.root import CONFIG_IO_PORT


@dataclass
class FakeIrqRouter:
    """Records routes and irqfds instead of calling KVM."""

    routes: dict[int, tuple[int, int]] = field(default_factory=dict)
    pushes: list[tuple[int, int, int]] = field(default_factory=list)
    irqfds: dict[int, list[tuple[EventFd, EventFd | None]]] = field(default_factory=dict)

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (address, data)
        self.pushes.append((gsi, address, data))

    def remove_route(self, gsi: int) -> None:
        self.routes.pop(gsi, None)

    def register_irqfd(self, evt: EventFd, gsi: int, resample: EventFd | None = None) -> None:
        self.irqfds.setdefault(gsi, []).append((evt, resample))

    def unregister_irqfd(self, evt: EventFd, gsi: int) -> None:
        entries = self.irqfds.get(gsi, [])
        self.irqfds[gsi] = [e for e in entries if e[0] is not evt]
        if not self.irqfds[gsi]:
            del self.irqfds[gsi]


@dataclass
class FakeIoEvents:
    """Records KVM_IOEVENTFD registrations: {(addr, length, datamatch, pio): evt}."""

    active: dict[tuple[int, int, int | None, bool], EventFd] = field(default_factory=dict)

    def register_ioeventfd(self, evt: EventFd, addr: int, length: int = 0, *,
                           datamatch: int | None = None, pio: bool = False) -> None:
        key = (addr, length, datamatch, pio)
        if key in self.active:
            raise AssertionError(f"ioeventfd registered twice at {key}")
        self.active[key] = evt

    def unregister_ioeventfd(self, evt: EventFd, addr: int, length: int = 0, *,
                             datamatch: int | None = None, pio: bool = False) -> None:
        key = (addr, length, datamatch, pio)
        if self.active.get(key) is not evt:
            raise AssertionError(f"ioeventfd at {key} was not registered")
        del self.active[key]


class ConfigMech1:
    """Guest-side configuration mechanism 1 over an IO bus (what a kernel does)."""

    def __init__(self, io_bus: Bus) -> None:
        self.io = io_bus

    def select(self, bus: int, dev: int, fn: int, reg: int) -> None:
        addr = 0x8000_0000 | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xFC)
        self.io.write(CONFIG_IO_PORT, addr.to_bytes(4, "little"))

    def read(self, bus: int, dev: int, fn: int, reg: int, size: int = 4) -> int:
        self.select(bus, dev, fn, reg)
        data = self.io.read(CONFIG_IO_PORT + 4 + (reg & 3), size)
        assert data is not None
        return int.from_bytes(data, "little")

    def write(self, bus: int, dev: int, fn: int, reg: int, value: int, size: int = 4) -> None:
        self.select(bus, dev, fn, reg)
        self.io.write(CONFIG_IO_PORT + 4 + (reg & 3), value.to_bytes(size, "little"))


class ConfigEcam:
    """Guest-side ECAM accesses over an MMIO bus."""

    def __init__(self, mmio_bus: Bus, base: int) -> None:
        self.mmio = mmio_bus
        self.base = base

    def addr(self, bus: int, dev: int, fn: int, reg: int) -> int:
        return self.base + ((bus << 20) | (dev << 15) | (fn << 12) | reg)

    def read(self, bus: int, dev: int, fn: int, reg: int, size: int = 4) -> int:
        data = self.mmio.read(self.addr(bus, dev, fn, reg), size)
        assert data is not None
        return int.from_bytes(data, "little")

    def write(self, bus: int, dev: int, fn: int, reg: int, value: int, size: int = 4) -> None:
        self.mmio.write(self.addr(bus, dev, fn, reg), value.to_bytes(size, "little"))
