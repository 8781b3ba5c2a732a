"""MMIO and port-IO buses: guest address ranges mapped to BusDevice objects.

The vCPU exit path looks an address up here on every IO/MMIO exit, so lookup is a
bisect over an immutable snapshot that is swapped atomically on insert/remove: readers
never take a lock, and a guest reprogramming a BAR (which moves a mapping) while other
vCPUs run is safe. Each device is served under its own lock, like crosvm's Mutex per
device, so a device model never sees two vCPUs at once.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from vmmcore.errors import BusConflictError


class BusDevice:
    """A device reachable through a bus range. Offsets are relative to the range base."""

    def debug_label(self) -> str:
        """Name used in logs and conflict messages."""
        return type(self).__name__

    def read(self, offset: int, size: int) -> bytes:
        """Return size bytes read at offset (little-endian device registers)."""
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of data at offset."""


@dataclass(frozen=True)
class BusRange:
    """One registered range."""

    base: int
    length: int
    device: BusDevice
    lock: threading.Lock = field(compare=False)

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """An address space (MMIO or port IO) of non-overlapping device ranges."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._mutate = threading.Lock()
        # (bases, ranges) swapped as one object so readers always see a matching pair.
        self._snapshot: tuple[tuple[int, ...], tuple[BusRange, ...]] = ((), ())
        self._device_locks: dict[int, threading.Lock] = {}

    def _lock_for(self, device: BusDevice) -> threading.Lock:
        return self._device_locks.setdefault(id(device), threading.Lock())

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        """Map [base, base+length) to device; overlapping an existing range is an error."""
        if length <= 0 or base < 0:
            raise BusConflictError(f"{self.name} bus: invalid range {base:#x}+{length:#x}")
        with self._mutate:
            for r in self.ranges():
                if base < r.end and r.base < base + length:
                    raise BusConflictError(
                        f"{self.name} bus: {device.debug_label()} at {base:#x}+{length:#x} "
                        f"overlaps {r.device.debug_label()} at {r.base:#x}+{r.length:#x}"
                    )
            ranges = sorted(
                (*self.ranges(), BusRange(base, length, device, self._lock_for(device))),
                key=lambda r: r.base,
            )
            self._publish(ranges)

    def remove(self, base: int, length: int | None = None) -> BusDevice:
        """Unmap the range starting at base (and of that length, when given)."""
        with self._mutate:
            for r in self.ranges():
                if r.base == base and (length is None or r.length == length):
                    self._publish([x for x in self.ranges() if x is not r])
                    return r.device
        raise BusConflictError(f"{self.name} bus: nothing mapped at {base:#x}")

    def remove_device(self, device: BusDevice) -> None:
        """Unmap every range of a device."""
        with self._mutate:
            self._publish([r for r in self.ranges() if r.device is not device])

    def _publish(self, ranges: list[BusRange]) -> None:
        snapshot = tuple(ranges)
        self._snapshot = (tuple(r.base for r in snapshot), snapshot)

    def ranges(self) -> tuple[BusRange, ...]:
        """The current mappings, sorted by base."""
        return self._snapshot[1]

    def lookup(self, addr: int) -> tuple[BusRange, int] | None:
        """The range holding addr and the offset into it, or None."""
        bases, ranges = self._snapshot
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.base + r.length:
                return r, addr - r.base
        return None

    def read(self, addr: int, size: int) -> bytes | None:
        """Read from the device at addr; None when nothing is mapped there."""
        hit = self.lookup(addr)
        if hit is None:
            return None
        r, offset = hit
        with r.lock:
            return r.device.read(offset, size)

    def write(self, addr: int, data: bytes) -> bool:
        """Write to the device at addr; False when nothing is mapped there."""
        hit = self.lookup(addr)
        if hit is None:
            return False
        r, offset = hit
        with r.lock:
            r.device.write(offset, data)
        return True
