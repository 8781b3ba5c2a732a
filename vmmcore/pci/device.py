"""PciDevice: what every PCI function implements, so the PciRoot can host it.

This is the contract a device plugin meets (normally indirectly, through the virtio-pci
transport VirtioPciDevice; a non-virtio device may implement it directly). It follows
crosvm's PciDevice trait, made Pythonic:

* Configuration space goes through config_register_read/config_register_write in
  dword registers (reg_idx = offset // 4), the unit both CF8/CFC and ECAM reduce to.
  config_register_write returns a ConfigWriteResult naming the BAR ranges that stopped
  or started decoding, so the root can move the bus mappings; the device itself never
  touches a bus. (A sandboxed ProxyDevice forwards the write and returns the child's
  result; the root validates every range before mapping it, so a lying device can
  only hurt itself.)
* BAR accesses arrive as read_bar(bar, offset, size)/write_bar(bar, offset, data),
  offsets relative to the BAR: where the guest placed the BAR does not matter to the
  device.
* Resources come from outside: BAR addresses from a SystemAllocator
  (allocate_io_bars), the INTx line from assign_irq, MSI-X GSIs and irqfds from
  assign_msix, queue doorbells as BAR-relative ioevents() that the root registers with
  KVM_IOEVENTFD wherever the BAR currently is.

ConfiguredPciDevice implements all of it over a PciConfiguration; a device model
subclasses it and adds BARs, capabilities and BAR handlers.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from vmmcore.allocator import SystemAllocator
from vmmcore.errors import AllocationError, ConfigError, VmmError
from vmmcore.eventfd import EventFd
from vmmcore.pci.config_space import (
    COMMAND_INTX_DISABLE,
    BarKind,
    BarRange,
    PciBar,
    PciConfiguration,
)
from vmmcore.pci.intx import PciIntx
from vmmcore.pci.irq import IrqRouter
from vmmcore.pci.msix import MsixConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class PciAddress:
    """bus:device.function, printed the way lspci and Linux do."""

    bus: int
    device: int
    function: int = 0

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function:x}"


@dataclass
class ConfigWriteResult:
    """BAR ranges a configuration write stopped (removed) or started (added) decoding."""

    removed: list[BarRange] = field(default_factory=list)
    added: list[BarRange] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.removed or self.added)


@dataclass(frozen=True)
class IoEventSpec:
    """A doorbell: guest writes at BAR-relative offset signal evt via KVM_IOEVENTFD.

    length 0 matches any write size; datamatch (when set) only writes of that value.
    """

    bar: int
    offset: int
    evt: EventFd
    length: int = 0
    datamatch: int | None = None


def diff_bar_ranges(old: list[BarRange], new: list[BarRange]) -> ConfigWriteResult:
    """What moved between two bar_ranges() snapshots (compared per BAR index)."""
    old_by_bar = {r.bar: r for r in old}
    new_by_bar = {r.bar: r for r in new}
    result = ConfigWriteResult()
    for bar in sorted(old_by_bar.keys() | new_by_bar.keys()):
        before, after = old_by_bar.get(bar), new_by_bar.get(bar)
        if before == after:
            continue
        if before is not None:
            result.removed.append(before)
        if after is not None:
            result.added.append(after)
    return result


class PciDevice(ABC):
    """The interface between a PCI function and the PciRoot. See the module docstring."""

    def debug_label(self) -> str:
        """Name for logs and error messages."""
        return type(self).__name__

    def keep_fds(self) -> list[int]:
        """File descriptors the device needs after being jailed (eventfds, memfds...)."""
        return []

    # -- configuration space ----------------------------------------------------------

    @abstractmethod
    def read_config_register(self, reg_idx: int) -> int:
        """The dword register reg_idx (0-1023) as the guest sees it."""

    @abstractmethod
    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        """Apply a guest write of 1, 2 or 4 bytes at byte offset (0-3) of reg_idx."""

    @abstractmethod
    def bar_ranges(self) -> list[BarRange]:
        """The BAR ranges the device decodes right now (decode enabled, address valid)."""

    def config_register_read(self, reg_idx: int) -> int:
        """What the root calls for a configuration read."""
        return self.read_config_register(reg_idx) & 0xFFFF_FFFF

    def config_register_write(self, reg_idx: int, offset: int, data: bytes) -> ConfigWriteResult:
        """What the root calls for a configuration write: applies it, reports BAR moves.

        BAR moves can come from a BAR register write, from the command register's
        IO/memory decode bits, or (for a device with side effects) from anything else,
        so the decoded ranges are compared before and after every write.
        """
        before = self.bar_ranges()
        self.write_config_register(reg_idx, offset, data)
        return diff_bar_ranges(before, self.bar_ranges())

    # -- BARs ---------------------------------------------------------------------------

    def allocate_io_bars(self, allocator: SystemAllocator) -> list[BarRange]:
        """Place every BAR in guest address space; returns the ranges (not yet decoded)."""
        return []

    def read_bar(self, bar: int, offset: int, size: int) -> bytes:
        """A guest read of size bytes at offset inside BAR bar."""
        return b"\xff" * size

    def write_bar(self, bar: int, offset: int, data: bytes) -> None:  # noqa: B027 (optional hook)
        """A guest write at offset inside BAR bar."""

    def ioevents(self) -> list[IoEventSpec]:
        """Doorbells to register with KVM_IOEVENTFD while their BAR is mapped."""
        return []

    # -- interrupts ---------------------------------------------------------------------

    def assign_irq(self, intx: PciIntx) -> bool:
        """Offer the device its INTx line; return False if it does not use INTx."""
        return False

    def msix_vectors(self) -> int:
        """How many MSI-X vectors the device has (0: no MSI-X)."""
        return 0

    def assign_msix(self, router: IrqRouter, vectors: list[tuple[int, EventFd]]) -> None:  # noqa: B027 (optional hook)
        """Give the device each vector's GSI and irqfd (registered with KVM_IRQFD)."""

    def on_device_sandboxed(self) -> None:  # noqa: B027 (optional hook)
        """Start what must start in the process that runs the device (plugin API 1.5).

        Called once, in the device process right after its jail closed (seccomp on)
        and before the device is placed; with --disable-sandbox in the main process
        once every device exists. An exception stops `vmm run` with one line naming
        the device (start_device), so a backend that cannot work here fails before
        the guest runs instead of on its first request. crosvm's on_device_sandboxed.
        """

    def destroy(self) -> None:  # noqa: B027 (optional hook)
        """The device is being removed or the VM is shutting down."""


def start_failure_text(exc: BaseException) -> str:
    """Why on_device_sandboxed() failed: a VmmError's message is already written for
    users; anything else is a plugin bug and keeps its type name."""
    return str(exc) if isinstance(exc, VmmError) else f"{type(exc).__name__}: {exc}"


def start_failure(label: str, why: str, config: bool = False) -> VmmError:
    """The one-line start-up error; a ConfigError (exit status 2) when the hook said the
    configuration is at fault, else a VmmError (status 1: the host or the VMM)."""
    return (ConfigError if config else VmmError)(f"device {label} failed to start: {why}")


def start_device(device: PciDevice) -> None:
    """Run device.on_device_sandboxed() in this process; its failure as start_failure."""
    try:
        device.on_device_sandboxed()
    except Exception as e:
        raise start_failure(device.debug_label(), start_failure_text(e),
                            isinstance(e, ConfigError)) from e


class ConfiguredPciDevice(PciDevice):
    """A PciDevice over a PciConfiguration, with optional MSI-X and INTx.

    Subclasses declare BARs on self.config (config.add_bar), may create self.msix
    (MsixConfig) and then implement bar_read/bar_write for their own registers; MSI-X
    table and PBA accesses are handled here.
    """

    def __init__(self, config: PciConfiguration, label: str | None = None) -> None:
        self.config = config
        self.msix: MsixConfig | None = None
        self.intx: PciIntx | None = None
        self._label = label or type(self).__name__

    def debug_label(self) -> str:
        return self._label

    def read_config_register(self, reg_idx: int) -> int:
        return self.config.read_reg(reg_idx)

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        intx_was_disabled = self.config.command & COMMAND_INTX_DISABLE
        self.config.write_reg(reg_idx, offset, data)
        if intx_was_disabled and not self.config.command & COMMAND_INTX_DISABLE \
                and self.intx is not None:
            self.intx.refresh()     # a level that rose while disabled is asserted now

    def bar_ranges(self) -> list[BarRange]:
        return self.config.bar_ranges()

    def allocate_io_bars(self, allocator: SystemAllocator) -> list[BarRange]:
        """Memory BARs from the 32-bit pool, IO BARs from the IO pool.

        64-bit BARs fall back to the high pool when the low one is full: Linux can use
        either as long as the host bridge's _CRS announces both windows.
        """
        ranges: list[BarRange] = []
        try:
            for bar in self.config.bars():
                ranges.append(self._allocate_bar(allocator, bar))
        except AllocationError:
            for r in ranges:      # give back what this call took, then report
                pool = allocator.io if r.is_io else (
                    allocator.high_mmio if r.base >= allocator.high_mmio.base
                    else allocator.low_mmio)
                pool.release(r.base)
            raise
        return ranges

    def _allocate_bar(self, allocator: SystemAllocator, bar: PciBar) -> BarRange:
        tag = f"{self._label} BAR{bar.index}"
        if bar.kind is BarKind.IO:
            base = allocator.io.allocate(bar.size, tag, bar.size)
        else:
            align = max(bar.size, 4096)
            try:
                base = allocator.allocate_mmio(bar.size, tag, align=align)
            except AllocationError:
                if bar.kind is not BarKind.MEM64:
                    raise
                base = allocator.allocate_mmio(bar.size, tag, align=align, prefer_high=True)
        self.config.set_bar_address(bar.index, base)
        return BarRange(bar.index, base, bar.size, bar.kind, bar.prefetchable)

    def read_bar(self, bar: int, offset: int, size: int) -> bytes:
        if self.msix is not None:
            data = self.msix.read_bar(bar, offset, size)
            if data is not None:
                return data
        return self.bar_read(bar, offset, size)

    def write_bar(self, bar: int, offset: int, data: bytes) -> None:
        if self.msix is not None and self.msix.write_bar(bar, offset, data):
            return
        self.bar_write(bar, offset, data)

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        """Device registers outside the MSI-X structures; unclaimed bytes read as zero."""
        return bytes(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        """Device registers outside the MSI-X structures."""

    def assign_irq(self, intx: PciIntx) -> bool:
        self.intx = intx
        intx.bind_config(self.config)
        self.config.set_interrupt(intx.gsi, intx.pin)
        return True

    def msix_vectors(self) -> int:
        return self.msix.num_vectors if self.msix is not None else 0

    def assign_msix(self, router: IrqRouter, vectors: list[tuple[int, EventFd]]) -> None:
        if self.msix is not None:
            self.msix.assign(router, vectors)

    def keep_fds(self) -> list[int]:
        fds = []
        if self.intx is not None:
            fds += [self.intx.irq_evt.fd, self.intx.resample_evt.fd]
        if self.msix is not None:
            fds += [evt.fd for evt in self.msix.events() if evt is not None]
        return fds
