"""SystemAllocator: the one owner of guest address space and interrupt numbers.

Devices never pick addresses themselves: BARs, shared-memory windows (virtio-wl,
virtio-gpu blobs), GSIs and PCI slots all come from here, so two devices can never
collide and a device that goes away gives its resources back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vmmcore.errors import AllocationError


def align_up(value: int, align: int) -> int:
    """Round value up to a power-of-two alignment."""
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True)
class Allocation:
    """One handed-out range and who asked for it."""

    base: int
    size: int
    tag: str


class AddressPool:
    """A first-fit allocator over [base, base+size) with aligned, tagged allocations."""

    def __init__(self, name: str, base: int, size: int) -> None:
        if size <= 0:
            raise AllocationError(f"pool {name}: empty range")
        self.name = name
        self.base = base
        self.size = size
        self._lock = threading.Lock()
        self._used: dict[int, Allocation] = {}

    @property
    def end(self) -> int:
        return self.base + self.size

    def allocations(self) -> list[Allocation]:
        """Current allocations, sorted by address."""
        with self._lock:
            return sorted(self._used.values(), key=lambda a: a.base)

    def allocate(self, size: int, tag: str, align: int = 1) -> int:
        """Reserve size bytes aligned to align (a power of two); returns the base."""
        if size <= 0:
            raise AllocationError(f"pool {self.name}: cannot allocate {size} bytes for {tag}")
        if align <= 0 or align & (align - 1):
            raise AllocationError(f"pool {self.name}: alignment {align:#x} is not a power of two")
        with self._lock:
            candidate = align_up(self.base, align)
            for a in sorted(self._used.values(), key=lambda a: a.base):
                if candidate + size <= a.base:
                    break
                candidate = max(candidate, align_up(a.base + a.size, align))
            if candidate + size > self.end:
                raise AllocationError(
                    f"pool {self.name} exhausted: no {size:#x} bytes aligned to {align:#x} "
                    f"left for {tag} in {self.base:#x}-{self.end - 1:#x}"
                )
            self._used[candidate] = Allocation(candidate, size, tag)
            return candidate

    def allocate_at(self, base: int, size: int, tag: str) -> int:
        """Reserve exactly [base, base+size), e.g. a BAR the guest programmed itself."""
        if size <= 0 or base < self.base or base + size > self.end:
            raise AllocationError(
                f"pool {self.name}: {base:#x}+{size:#x} for {tag} is outside "
                f"{self.base:#x}-{self.end - 1:#x}"
            )
        with self._lock:
            for a in self._used.values():
                if base < a.base + a.size and a.base < base + size:
                    raise AllocationError(
                        f"pool {self.name}: {base:#x}+{size:#x} for {tag} overlaps {a.tag} "
                        f"at {a.base:#x}+{a.size:#x}"
                    )
            self._used[base] = Allocation(base, size, tag)
            return base

    def release(self, base: int) -> Allocation:
        """Give back the allocation starting at base."""
        with self._lock:
            try:
                return self._used.pop(base)
            except KeyError:
                raise AllocationError(f"pool {self.name}: nothing allocated at {base:#x}") from None


class IdPool:
    """Small integers (GSIs, PCI device numbers) handed out lowest first."""

    def __init__(self, name: str, first: int, last: int) -> None:
        self.name = name
        self.first = first
        self.last = last
        self._lock = threading.Lock()
        self._used: dict[int, str] = {}

    def allocate(self, tag: str) -> int:
        """The lowest free id."""
        with self._lock:
            for n in range(self.first, self.last + 1):
                if n not in self._used:
                    self._used[n] = tag
                    return n
        raise AllocationError(
            f"{self.name} exhausted: all of {self.first}-{self.last} are in use (wanted by {tag})"
        )

    def reserve(self, n: int, tag: str) -> int:
        """Claim a specific id (e.g. a legacy IRQ)."""
        with self._lock:
            if not self.first <= n <= self.last:
                raise AllocationError(f"{self.name}: {n} is outside {self.first}-{self.last}")
            if n in self._used:
                raise AllocationError(f"{self.name}: {n} is taken by {self._used[n]} (wanted by {tag})")
            self._used[n] = tag
            return n

    def release(self, n: int) -> None:
        with self._lock:
            if self._used.pop(n, None) is None:
                raise AllocationError(f"{self.name}: {n} was not allocated")

    def in_use(self) -> dict[int, str]:
        with self._lock:
            return dict(self._used)


class SystemAllocator:
    """All allocatable resources of one VM, built from the architecture's layout."""

    def __init__(
        self,
        *,
        io: tuple[int, int],
        low_mmio: tuple[int, int],
        high_mmio: tuple[int, int],
        gsi: tuple[int, int],
        pci_devices: tuple[int, int] = (1, 31),
        gpu_memory: tuple[int, int] | None = None,
    ) -> None:
        """Each pool is (base, size) for address pools, (first, last) for id pools."""
        self.io = AddressPool("io", *io)
        self.low_mmio = AddressPool("low_mmio", *low_mmio)
        self.high_mmio = AddressPool("high_mmio", *high_mmio)
        self.gsi = IdPool("gsi", *gsi)
        self.pci_devices = IdPool("pci_devices", *pci_devices)
        self.gpu_memory = AddressPool("gpu_memory", *gpu_memory) if gpu_memory else None

    def allocate_mmio(self, size: int, tag: str, align: int | None = None,
                      prefer_high: bool = False) -> int:
        """An MMIO range; BARs are naturally aligned, so align defaults to size."""
        align = align or max(size, 4096)
        if prefer_high:
            return self.high_mmio.allocate(size, tag, align)
        return self.low_mmio.allocate(size, tag, align)

    def release_mmio(self, base: int) -> None:
        """Release an MMIO range from whichever pool holds it."""
        pool = self.high_mmio if base >= self.high_mmio.base else self.low_mmio
        pool.release(base)
