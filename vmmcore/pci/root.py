"""PciRoot: PCI bus 0, its host bridge, configuration access and BAR mappings.

The guest reaches configuration space two ways, both served here: configuration
mechanism 1 (an address register at port 0xcf8, data at 0xcfc-0xcff) and ECAM (a 256
MiB MMIO window announced by the ACPI MCFG table, offset = bus<<20 | dev<<15 | fn<<12
| reg). Both reduce to config_read/config_write on (bus, device, function, offset).

BAR mappings follow the guest's programming. Like crosvm and QEMU, a BAR is mapped
only while the command register enables its space (IO or memory) and its address is a
real one (not 0, not the all-ones sizing pattern), so sizing and Linux's rewrite of
64-bit BARs (done with decode off) never map half-written addresses. Every write's
ConfigWriteResult is applied to the buses: removed ranges are unmapped, added ones are
checked against the windows the firmware tables announce (the allocator's low and high
MMIO pools and the IO pool, which also keeps BARs out of RAM, the ECAM window, the
IOAPIC and LAPIC) and against the bus (no overlap with another device). A range that
fails either check is logged and left unmapped, the same outcome as a BAR in an address
nothing decodes on real hardware; the VMM keeps running.

Locking: one root lock serialises configuration writes and mapping changes; each
device has its own lock, taken by configuration accesses and by BAR accesses (which
arrive through per-BAR bus adapters), so a device model never runs on two vCPUs at
once. The device lock is always the innermost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

from vmmcore.allocator import SystemAllocator
from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus, BusDevice
from vmmcore.errors import AllocationError, BusConflictError, VmmError
from vmmcore.eventfd import EventFd
from vmmcore.pci.config_space import BarRange, BridgeSubclass, PciClass, PciConfiguration
from vmmcore.pci.device import (
    ConfiguredPciDevice,
    ConfigWriteResult,
    IoEventSpec,
    PciAddress,
    PciDevice,
)
from vmmcore.pci.intx import INTX_FIRST_GSI, PciIntx, intx_gsi
from vmmcore.pci.irq import IoEventRegistrar, IrqRouter

log = logging.getLogger(__name__)

CONFIG_IO_PORT = 0xCF8
CONFIG_IO_SIZE = 8
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_MASK = 0x80FF_FFFC        # enable, bus, device, function, register
HOST_BRIDGE_VENDOR_ID = 0x8086           # Intel
HOST_BRIDGE_DEVICE_ID = 0x29C0           # 82G33/P35 DRAM controller, QEMU q35's choice
IOAPIC_PCI_GSIS = range(INTX_FIRST_GSI, layout.IOAPIC_PINS)   # 16-23
NUM_DEVICES = 32


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class HostBridge(ConfiguredPciDevice):
    """00:00.0. Linux's pci_sanity_check accepts mechanism 1 when it finds a host
    bridge (class 0x0600) on bus 0, and the guest's lspci shows a familiar chipset."""

    def __init__(self) -> None:
        super().__init__(PciConfiguration(vendor_id=HOST_BRIDGE_VENDOR_ID,
                                          device_id=HOST_BRIDGE_DEVICE_ID,
                                          class_code=PciClass.BRIDGE,
                                          subclass=BridgeSubclass.HOST),
                         "pci-host-bridge")

    def assign_irq(self, intx: PciIntx) -> bool:
        return False


class _BarWindow(BusDevice):
    """The bus-side face of one BAR: forwards accesses, BAR-relative, under the device lock."""

    def __init__(self, slot: _Slot, bar: int) -> None:
        self._slot = slot
        self._bar = bar

    def debug_label(self) -> str:
        return f"{self._slot.device.debug_label()} BAR{self._bar}"

    def read(self, offset: int, size: int) -> bytes:
        try:
            with self._slot.lock:
                data = self._slot.device.read_bar(self._bar, offset, size)
        except Exception as e:     # an in-process device's bug: as a dead device reads
            _device_error(self._slot, "BAR read", e)
            return b"\xff" * size
        if len(data) != size:      # a device (or a proxy's child) got it wrong
            return (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, offset: int, data: bytes) -> None:
        try:
            with self._slot.lock:
                self._slot.device.write_bar(self._bar, offset, bytes(data))
        except Exception as e:
            _device_error(self._slot, "BAR write", e)


GUEST_WARNING_LIMIT = 8


def _guest_warning(slot: _Slot, message: str, *args: object) -> None:
    """A warning the guest can cause at will (it may reprogram a BAR forever): logged the
    first GUEST_WARNING_LIMIT times per device, then silenced, saying so."""
    slot.warnings += 1
    if slot.warnings <= GUEST_WARNING_LIMIT:
        log.warning(message, *args)
        if slot.warnings == GUEST_WARNING_LIMIT:
            log.warning("pci %s: further warnings about this device are suppressed",
                        slot.address)


def _device_error(slot: _Slot, what: str, error: Exception) -> None:
    """A device raised on the vCPU path: log it (once per device, the guest may repeat the
    access forever) and carry on, as a sandboxed device's failure does."""
    if not slot.failed:
        slot.failed = True
        log.error("pci %s: %s failed: %s: %s (logged once)", slot.device.debug_label(),
                  what, type(error).__name__, error, exc_info=error)


@dataclass(eq=False)
class _Slot:
    """A device on the bus and the root's bookkeeping for it."""

    address: PciAddress
    device: PciDevice
    lock: threading.Lock = field(default_factory=threading.Lock)
    windows: dict[int, _BarWindow] = field(default_factory=dict)
    mapped: dict[int, BarRange] = field(default_factory=dict)
    ioevents: list[IoEventSpec] = field(default_factory=list)
    irqfds: list[tuple[EventFd, int]] = field(default_factory=list)
    owned_fds: list[EventFd] = field(default_factory=list)
    gsis: list[int] = field(default_factory=list)
    allocated: list[BarRange] = field(default_factory=list)
    failed: bool = False            # the device raised on the vCPU path (logged once)
    warnings: int = 0               # guest-caused warnings logged so far (capped)


class PciRoot:
    """Bus 0 of the VM's PCI hierarchy. See the module docstring."""

    def __init__(self, io_bus: Bus, mmio_bus: Bus, allocator: SystemAllocator, *,
                 irq_router: IrqRouter | None = None,
                 ioevents: IoEventRegistrar | None = None,
                 mmio_windows: list[tuple[int, int]] | None = None,
                 io_windows: list[tuple[int, int]] | None = None) -> None:
        """irq_router and ioevents are the KVM side (None: no interrupts/doorbells,
        for tests). Windows are (base, size) lists; by default the allocator's pools."""
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.allocator = allocator
        self.irq_router = irq_router
        self.ioevent_registrar = ioevents
        self.mmio_windows = mmio_windows if mmio_windows is not None else [
            (allocator.low_mmio.base, allocator.low_mmio.size),
            (allocator.high_mmio.base, allocator.high_mmio.size)]
        self.io_windows = io_windows if io_windows is not None else [
            (allocator.io.base, allocator.io.size)]
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        # GSIs 16-23 are IOAPIC inputs in KVM's default routing; an MSI route on one of
        # them would be refused, so keep the allocator from handing them out for MSI-X.
        for gsi in IOAPIC_PCI_GSIS:
            with contextlib.suppress(AllocationError):
                allocator.gsi.reserve(gsi, "ioapic-pci-intx")
        self._slots[0] = _Slot(PciAddress(0, 0), HostBridge())

    # -- devices ------------------------------------------------------------------------

    def add_device(self, device: PciDevice, dev_num: int | None = None) -> PciAddress:
        """Put device on bus 0 (at dev_num, or the allocator's next free number) and give
        it BAR addresses, MSI-X vectors and an INTx line. Raises VmmError on failure,
        having given back what it took."""
        label = device.debug_label()
        with self._lock:
            if dev_num is None:
                dev_num = self.allocator.pci_devices.allocate(label)
            else:
                self.allocator.pci_devices.reserve(dev_num, label)
            slot = _Slot(PciAddress(0, dev_num), device)
            try:
                slot.allocated = list(device.allocate_io_bars(self.allocator))
                self._setup_msix(slot)
                self._setup_intx(slot)
                slot.ioevents = list(device.ioevents())
            except BaseException:
                self._release(slot)
                raise
            self._slots[dev_num] = slot
            for r in device.bar_ranges():
                self._map(slot, r)
            log.info("pci %s: %s", slot.address, label)
            return slot.address

    def _setup_msix(self, slot: _Slot) -> None:
        n = slot.device.msix_vectors()
        if not n or self.irq_router is None:
            return
        vectors = []
        for i in range(n):
            gsi = self.allocator.gsi.allocate(f"{slot.device.debug_label()} msix{i}")
            slot.gsis.append(gsi)
            evt = EventFd(nonblocking=True)
            slot.owned_fds.append(evt)
            self.irq_router.register_irqfd(evt, gsi)
            slot.irqfds.append((evt, gsi))
            vectors.append((gsi, evt))
        slot.device.assign_msix(self.irq_router, vectors)

    def _setup_intx(self, slot: _Slot) -> None:
        if self.irq_router is None:
            return
        pin = 1   # INTA: a single-function device uses INTA, the swizzle spreads the GSIs
        gsi = intx_gsi(slot.address.device, pin)
        evt, resample = EventFd(nonblocking=True), EventFd(nonblocking=True)
        slot.owned_fds += [evt, resample]
        if slot.device.assign_irq(PciIntx(gsi, pin, evt, resample)):
            self.irq_router.register_irqfd(evt, gsi, resample)
            slot.irqfds.append((evt, gsi))

    def remove_device(self, dev_num: int) -> PciDevice:
        """Take a device off the bus and give its resources back."""
        with self._lock:
            if dev_num == 0 or dev_num not in self._slots:
                raise VmmError(f"pci: no removable device at 00:{dev_num:02x}.0")
            slot = self._slots.pop(dev_num)
            self._release(slot)
            slot.device.destroy()
            return slot.device

    def _release(self, slot: _Slot) -> None:
        for bar in list(slot.mapped):
            self._unmap(slot, bar)
        for evt, gsi in slot.irqfds:
            if self.irq_router is not None:
                try:
                    self.irq_router.unregister_irqfd(evt, gsi)
                except VmmError as e:
                    log.warning("pci %s: %s", slot.address, e)
        for gsi in slot.gsis:
            if self.irq_router is not None:
                self.irq_router.remove_route(gsi)
            self.allocator.gsi.release(gsi)
        for evt in slot.owned_fds:
            evt.close()
        for r in slot.allocated:
            self._release_bar_allocation(r)
        with contextlib.suppress(AllocationError):
            self.allocator.pci_devices.release(slot.address.device)

    def _release_bar_allocation(self, r: BarRange) -> None:
        pools = [self.allocator.io] if r.is_io else [self.allocator.low_mmio,
                                                     self.allocator.high_mmio]
        for pool in pools:
            with contextlib.suppress(AllocationError):
                pool.release(r.base)

    def devices(self) -> list[tuple[PciAddress, PciDevice]]:
        """Every function on the bus, host bridge first (for ACPI, MP tables, logs)."""
        with self._lock:
            return [(s.address, s.device) for _, s in sorted(self._slots.items())]

    def mapped_ranges(self, dev_num: int) -> list[BarRange]:
        """The BAR ranges of a device currently on the buses."""
        with self._lock:
            slot = self._slots.get(dev_num)
            return sorted(slot.mapped.values(), key=lambda r: r.bar) if slot else []

    # -- configuration access --------------------------------------------------------------

    def _slot(self, bus: int, dev: int, fn: int) -> _Slot | None:
        if bus != 0 or fn != 0:       # one bus, single-function devices only
            return None
        return self._slots.get(dev)

    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int:
        """A configuration read; absent functions and malformed accesses read all-ones."""
        if size not in (1, 2, 4) or (offset % 4) + size > 4 or not 0 <= offset < 4096:
            return _all_ones(size) if 0 < size <= 8 else 0
        slot = self._slot(bus, dev, fn)
        if slot is None:
            return _all_ones(size)
        try:
            with slot.lock:
                value = slot.device.config_register_read(offset // 4)
        except Exception as e:
            _device_error(slot, "config read", e)
            return _all_ones(size)
        return (value >> (8 * (offset % 4))) & _all_ones(size)

    def config_write(self, bus: int, dev: int, fn: int, offset: int, data: bytes) -> None:
        """A configuration write; writes to absent functions or of odd shape are dropped."""
        size = len(data)
        if size not in (1, 2, 4) or (offset % 4) + size > 4 or not 0 <= offset < 4096:
            return
        with self._lock:
            slot = self._slot(bus, dev, fn)
            if slot is None:
                return
            try:
                with slot.lock:
                    result = slot.device.config_register_write(offset // 4, offset % 4,
                                                               bytes(data))
            except Exception as e:
                _device_error(slot, "config write", e)
                return
            if result:
                self._apply(slot, result)

    # -- BAR mappings ---------------------------------------------------------------------

    def _apply(self, slot: _Slot, result: ConfigWriteResult) -> None:
        for r in result.removed:
            self._unmap(slot, r.bar)
        for r in result.added:
            self._unmap(slot, r.bar)
            self._map(slot, r)

    def _in_windows(self, r: BarRange) -> bool:
        windows = self.io_windows if r.is_io else self.mmio_windows
        return any(base <= r.base and r.end <= base + size for base, size in windows)

    def _map(self, slot: _Slot, r: BarRange) -> None:
        if not 0 <= r.bar < 6 or r.size <= 0 or r.size & (r.size - 1) or r.base % r.size:
            _guest_warning(slot, "pci %s: ignoring malformed BAR range %s", slot.address, r)
            return
        if not self._in_windows(r):
            _guest_warning(slot, "pci %s (%s): BAR%d at %#x+%#x is outside the PCI %s "
                           "windows; left unmapped", slot.address, slot.device.debug_label(),
                           r.bar, r.base, r.size, "IO" if r.is_io else "MMIO")
            return
        window = slot.windows.get(r.bar)
        if window is None:
            window = slot.windows[r.bar] = _BarWindow(slot, r.bar)
        bus = self.io_bus if r.is_io else self.mmio_bus
        try:
            bus.insert(window, r.base, r.size)
        except BusConflictError as e:
            _guest_warning(slot, "pci %s: BAR%d left unmapped: %s", slot.address, r.bar, e)
            return
        slot.mapped[r.bar] = r
        for spec in slot.ioevents:
            if spec.bar == r.bar:
                self._ioevent(slot, spec, r, register=True)

    def _unmap(self, slot: _Slot, bar: int) -> None:
        r = slot.mapped.pop(bar, None)
        if r is None:
            return
        for spec in slot.ioevents:
            if spec.bar == bar:
                self._ioevent(slot, spec, r, register=False)
        bus = self.io_bus if r.is_io else self.mmio_bus
        try:
            bus.remove(r.base, r.size)
        except BusConflictError as e:
            log.error("pci %s: BAR%d was not on the bus: %s", slot.address, bar, e)

    def _ioevent(self, slot: _Slot, spec: IoEventSpec, r: BarRange, register: bool) -> None:
        if self.ioevent_registrar is None:
            return
        if not 0 <= spec.offset < r.size or spec.offset + spec.length > r.size:
            _guest_warning(slot, "pci %s: ioevent at BAR%d+%#x is outside the BAR",
                           slot.address, spec.bar, spec.offset)
            return
        fn = (self.ioevent_registrar.register_ioeventfd if register
              else self.ioevent_registrar.unregister_ioeventfd)
        try:
            fn(spec.evt, r.base + spec.offset, spec.length, datamatch=spec.datamatch,
               pio=r.is_io)
        except VmmError as e:
            _guest_warning(slot, "pci %s: ioeventfd at %#x: %s", slot.address, r.base + spec.offset, e)

    # -- the guest-facing bus devices ------------------------------------------------

    def config_io_device(self) -> PciConfigIo:
        return PciConfigIo(self)

    def ecam_device(self) -> PciConfigMmio:
        return PciConfigMmio(self)

    def install(self, *, ecam_base: int = layout.PCIE_ECAM_START,
                ecam_size: int = layout.PCIE_ECAM_SIZE) -> None:
        """Map mechanism 1 at ports 0xcf8-0xcff and ECAM at [ecam_base, +ecam_size)."""
        self.io_bus.insert(self.config_io_device(), CONFIG_IO_PORT, CONFIG_IO_SIZE)
        self.mmio_bus.insert(self.ecam_device(), ecam_base, ecam_size)

    def close(self) -> None:
        """Release every device's resources (the VM is going away)."""
        with self._lock:
            for dev_num in [d for d in self._slots if d != 0]:
                self.remove_device(dev_num)


def build_pci_root(vm: object, io_bus: Bus, mmio_bus: Bus,
                   allocator: SystemAllocator) -> PciRoot:
    """The VMM's wiring: routes and irqfds through KvmIrqRouter(vm), doorbells through
    vm's KVM_IOEVENTFD, mechanism 1 and ECAM mapped on the buses. Call after
    Vm.create_irqchip() and before any vCPU runs; add devices, then start vCPUs."""
    from vmmcore.pci.irq import KvmIrqRouter

    root = PciRoot(io_bus, mmio_bus, allocator, irq_router=KvmIrqRouter(vm),
                   ioevents=vm)  # type: ignore[arg-type]
    root.install()
    return root


class PciConfigIo(BusDevice):
    """Configuration mechanism 1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc-0xcff.

    Only a dword access at 0xcf8 reaches the address register, as on real chipsets
    (and QEMU): byte or word accesses there are ordinary IO cycles that nothing
    claims, which is what Linux's pci_check_type1 probe expects of the outb to 0xcfb.
    Data accesses of 1, 2 or 4 bytes within 0xcfc-0xcff pick the bytes of the
    addressed dword.
    """

    def __init__(self, root: PciRoot) -> None:
        self._root = root
        self._address = 0

    def debug_label(self) -> str:
        return "pci-config-io"

    def read(self, offset: int, size: int) -> bytes:
        value = _all_ones(size)
        if offset == 0 and size == 4:
            value = self._address
        elif offset >= 4 and size in (1, 2, 4) and offset - 4 + size <= 4:
            target = self._target(offset - 4)
            if target is not None:
                value = self._root.config_read(*target, size)
        return value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            self._address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK
        elif offset >= 4 and size in (1, 2, 4) and offset - 4 + size <= 4:
            target = self._target(offset - 4)
            if target is not None:
                self._root.config_write(*target, bytes(data))

    def _target(self, byte: int) -> tuple[int, int, int, int] | None:
        a = self._address
        if not a & CONFIG_ADDRESS_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + byte


class PciConfigMmio(BusDevice):
    """ECAM: the configuration space of bus b, device d, function f at b<<20|d<<15|f<<12."""

    def __init__(self, root: PciRoot) -> None:
        self._root = root

    def debug_label(self) -> str:
        return "pci-ecam"

    @staticmethod
    def decode(offset: int) -> tuple[int, int, int, int]:
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4):
            return b"\xff" * size
        return self._root.config_read(*self.decode(offset), size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self._root.config_write(*self.decode(offset), bytes(data))
