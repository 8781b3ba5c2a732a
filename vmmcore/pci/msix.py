"""MSI-X: the capability, the vector table and pending-bit array, masking and routing.

Each vector is a GSI (from SystemAllocator.gsi) whose KVM route is the MSI message the
guest wrote into the table, and an eventfd registered with KVM_IRQFD on that GSI. The
device model calls trigger(vector): unless the vector or the whole function is masked
it writes the eventfd and KVM injects the MSI without the main process; when masked it
sets the vector's pending bit instead, and unmasking delivers the pending message and
clears the bit (PCI Local Bus 3.0, 6.8.2). Because the table lives with the device,
this works the same when the device runs in its own sandboxed process.

Routes are pushed to the IrqRouter lazily: when a vector becomes deliverable (MSI-X
enabled, function and vector unmasked) or its message changes while it is deliverable,
and only if the message differs from what was last pushed. Linux masks a vector while
rewriting it (three separate dword writes), so this pushes one complete route per
update instead of three half-written ones, and never loses an update: a vector cannot
fire while it is masked anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmmcore.eventfd import EventFd
from vmmcore.pci.config_space import PciConfiguration
from vmmcore.pci.irq import IrqRouter

log = logging.getLogger(__name__)

MSIX_CAP_ID = 0x11
MSIX_CAP_LENGTH = 12
MSIX_TABLE_ENTRY_SIZE = 16
MSIX_MAX_VECTORS = 2048
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_FUNCTION_MASK = 1 << 14
MSIX_CONTROL_TABLE_SIZE_MASK = 0x7FF
MSIX_VECTOR_CONTROL_MASKED = 1 << 0
MSIX_BIR_MASK = 0x7

# Dword index of each field inside a table entry.
_ADDR_LO, _ADDR_HI, _DATA, _CTRL = range(4)


@dataclass(frozen=True)
class MsixVector:
    """One vector as the guest programmed it."""

    address: int
    data: int
    masked: bool


class MsixConfig:
    """The MSI-X state of one function: capability registers, table, PBA, delivery.

    The device model creates it with its layout, calls add_capability() on its
    PciConfiguration, forwards BAR accesses through read_bar()/write_bar(), and raises
    interrupts with trigger(). The PciRoot (or the sandbox, for a jailed device) calls
    assign() with each vector's GSI and irqfd before the guest runs.
    """

    def __init__(self, num_vectors: int, *, table_bar: int, table_offset: int,
                 pba_bar: int, pba_offset: int, label: str = "pci") -> None:
        if not 1 <= num_vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1-{MSIX_MAX_VECTORS} vectors, not {num_vectors}")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        if not (0 <= table_bar <= 5 and 0 <= pba_bar <= 5):
            raise ValueError("MSI-X BIR must name BAR 0-5")
        self.label = label
        self.num_vectors = num_vectors
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.table_size = num_vectors * MSIX_TABLE_ENTRY_SIZE
        self.pba_size = ((num_vectors + 63) // 64) * 8
        if table_bar == pba_bar and (table_offset < pba_offset + self.pba_size
                                     and pba_offset < table_offset + self.table_size):
            raise ValueError("MSI-X table and PBA overlap")
        self._lock = threading.RLock()
        self._table = [[0, 0, 0, MSIX_VECTOR_CONTROL_MASKED] for _ in range(num_vectors)]
        self._pending = [False] * num_vectors
        self._pushed: list[tuple[int, int] | None] = [None] * num_vectors
        self._gsis: list[int | None] = [None] * num_vectors
        self._events: list[EventFd | None] = [None] * num_vectors
        self._router: IrqRouter | None = None
        self._config: PciConfiguration | None = None
        self._cap_offset = 0
        self._control = 0
        self._listeners: list[Callable[[], None]] = []

    # -- set-up -----------------------------------------------------------------------

    def add_capability(self, config: PciConfiguration) -> int:
        """Add the MSI-X capability to config; returns its offset."""
        body = bytearray(MSIX_CAP_LENGTH - 2)
        body[0:2] = ((self.num_vectors - 1) & MSIX_CONTROL_TABLE_SIZE_MASK).to_bytes(2, "little")
        body[2:6] = (self.table_offset | self.table_bar).to_bytes(4, "little")
        body[6:10] = (self.pba_offset | self.pba_bar).to_bytes(4, "little")
        wmask = bytearray(len(body))
        wmask[0:2] = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_bytes(2, "little")
        self._config = config
        self._cap_offset = config.add_capability(MSIX_CAP_ID, bytes(body), bytes(wmask),
                                                 self._on_capability_write)
        return self._cap_offset

    def assign(self, router: IrqRouter, vectors: Sequence[tuple[int, EventFd]]) -> None:
        """Give each vector its GSI and irqfd (already registered with KVM_IRQFD)."""
        if len(vectors) != self.num_vectors:
            raise ValueError(f"{self.label}: {len(vectors)} GSIs for {self.num_vectors} vectors")
        with self._lock:
            self._router = router
            for i, (gsi, evt) in enumerate(vectors):
                self._gsis[i], self._events[i] = gsi, evt
                self._pushed[i] = None
            self._sync_all()
            self._notify()

    def gsis(self) -> list[int | None]:
        return list(self._gsis)

    def events(self) -> list[EventFd | None]:
        return list(self._events)

    # -- capability registers ----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self._control & MSIX_CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control & MSIX_CONTROL_FUNCTION_MASK)

    def _on_capability_write(self, cap_offset: int, rel_offset: int) -> None:
        assert self._config is not None
        with self._lock:
            self._control = self._config.get_u16(cap_offset + 2)
            self._sync_all()
            self._notify()

    def _sync_all(self) -> None:
        """After enable/function-mask changed: push routes, deliver what is pending."""
        for v in range(self.num_vectors):
            if self._deliverable(v):
                self._sync_route(v)
                if self._pending[v]:
                    self._pending[v] = False
                    self._deliver(v)

    # -- table and PBA (in a BAR) ----------------------------------------------------

    def read_bar(self, bar: int, offset: int, size: int) -> bytes | None:
        """The bytes at offset of BAR bar if they are the table or PBA, else None."""
        if bar == self.table_bar and 0 <= offset - self.table_offset < self.table_size:
            return self.table_read(offset - self.table_offset, size)
        if bar == self.pba_bar and 0 <= offset - self.pba_offset < self.pba_size:
            return self.pba_read(offset - self.pba_offset, size)
        return None

    def write_bar(self, bar: int, offset: int, data: bytes) -> bool:
        """Handle a write to the table or PBA; False when offset is neither."""
        if bar == self.table_bar and 0 <= offset - self.table_offset < self.table_size:
            self.table_write(offset - self.table_offset, data)
            return True
        # The PBA is read-only: a write there is claimed and dropped.
        return bar == self.pba_bar and 0 <= offset - self.pba_offset < self.pba_size

    def table_read(self, offset: int, size: int) -> bytes:
        """Any offset and size; bytes past the table read as zero."""
        with self._lock:
            out = bytearray(size)
            for i in range(size):
                pos = offset + i
                if 0 <= pos < self.table_size:
                    entry, dword, byte = pos // 16, (pos % 16) // 4, pos % 4
                    out[i] = (self._table[entry][dword] >> (8 * byte)) & 0xFF
            return bytes(out)

    def table_write(self, offset: int, data: bytes) -> None:
        """The spec allows dword and qword accesses; other sizes are merged bytewise
        rather than rejected, since that cannot hurt and some guests do odd things."""
        with self._lock:
            touched: set[int] = set()
            before = {}
            for i, b in enumerate(data):
                pos = offset + i
                if not 0 <= pos < self.table_size:
                    continue
                entry, dword, byte = pos // 16, (pos % 16) // 4, pos % 4
                if entry not in before:
                    before[entry] = list(self._table[entry])
                shift = 8 * byte
                val = self._table[entry][dword]
                self._table[entry][dword] = (val & ~(0xFF << shift)) | (b << shift)
                touched.add(entry)
            for entry in sorted(touched):
                e = self._table[entry]
                e[_ADDR_LO] &= 0xFFFF_FFFC        # the message address is dword aligned
                e[_CTRL] &= MSIX_VECTOR_CONTROL_MASKED   # other control bits are reserved
                self._entry_changed(entry, before[entry])
            if touched:
                self._notify()

    def _entry_changed(self, v: int, old: list[int]) -> None:
        if not self._deliverable(v):
            return
        self._sync_route(v)
        if old[_CTRL] & MSIX_VECTOR_CONTROL_MASKED and self._pending[v]:
            self._pending[v] = False
            self._deliver(v)

    def pba_read(self, offset: int, size: int) -> bytes:
        with self._lock:
            bits = 0
            for v, p in enumerate(self._pending):
                if p:
                    bits |= 1 << v
            raw = bits.to_bytes(self.pba_size, "little")
            return bytes(raw[offset + i] if 0 <= offset + i < self.pba_size else 0
                         for i in range(size))

    # -- per-vector state --------------------------------------------------------------

    def vector(self, v: int) -> MsixVector:
        with self._lock:
            e = self._table[v]
            return MsixVector(e[_ADDR_LO] | (e[_ADDR_HI] << 32), e[_DATA],
                              bool(e[_CTRL] & MSIX_VECTOR_CONTROL_MASKED))

    def is_masked(self, v: int) -> bool:
        """Masked by its own control bit or by the function mask."""
        with self._lock:
            return self.function_masked or bool(self._table[v][_CTRL] & MSIX_VECTOR_CONTROL_MASKED)

    def is_pending(self, v: int) -> bool:
        with self._lock:
            return self._pending[v]

    def clear_pending(self, v: int) -> None:
        """The device's reason to interrupt went away while masked (PCI 3.0 6.8.2.9)."""
        with self._lock:
            if 0 <= v < self.num_vectors:
                self._pending[v] = False

    def _deliverable(self, v: int) -> bool:
        return self.enabled and not self.function_masked and not (
            self._table[v][_CTRL] & MSIX_VECTOR_CONTROL_MASKED)

    def _sync_route(self, v: int) -> None:
        gsi = self._gsis[v]
        if self._router is None or gsi is None:
            return
        e = self._table[v]
        message = (e[_ADDR_LO] | (e[_ADDR_HI] << 32), e[_DATA])
        if self._pushed[v] != message:
            self._router.set_msi_route(gsi, *message)
            self._pushed[v] = message

    def _deliver(self, v: int) -> None:
        evt = self._events[v]
        if evt is None:
            log.debug("%s: MSI-X vector %d has no irqfd; dropped", self.label, v)
            return
        evt.write(1)

    # -- the device's side -------------------------------------------------------------

    def direct_eventfd(self, v: int) -> int | None:
        """The irqfd that trigger(v) would just write right now, or None.

        None when trigger() has more to decide (MSI-X off, vector or function masked, no
        irqfd). A device's native data plane writes the fd itself and re-asks whenever a
        listener (add_listener) reports a change (plugin API 1.2).
        """
        with self._lock:
            if not 0 <= v < self.num_vectors or not self._deliverable(v):
                return None
            evt = self._events[v]
            if evt is None:
                return None
            self._sync_route(v)
            return evt.fileno()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call callback whenever direct_eventfd() answers may have changed.

        It runs under the MSI-X lock, before the guest's write completes, so a mask
        takes effect for the listener at once; keep it short and free of other locks.
        """
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a device's bug must not break the guest's MSI-X write
                log.exception("%s: MSI-X listener failed", self.label)

    def trigger(self, v: int) -> bool:
        """Signal vector v; True when delivered, False when left pending or impossible.

        With MSI-X disabled nothing is signalled through MSI-X (the caller falls back
        to INTx); an out-of-range vector (e.g. a guest-chosen queue vector) is ignored.
        """
        if not 0 <= v < self.num_vectors:
            return False
        with self._lock:
            if not self.enabled:
                return False
            if not self._deliverable(v):
                self._pending[v] = True
                return False
            self._sync_route(v)
            self._deliver(v)
            return True

    def reset(self) -> None:
        """Function-level reset: all vectors masked, nothing pending, capability off."""
        with self._lock:
            self._table = [[0, 0, 0, MSIX_VECTOR_CONTROL_MASKED]
                           for _ in range(self.num_vectors)]
            self._pending = [False] * self.num_vectors
            self._control = 0
            if self._config is not None:
                ctrl = self._config.get_u16(self._cap_offset + 2)
                self._config.set_u16(self._cap_offset + 2, ctrl & MSIX_CONTROL_TABLE_SIZE_MASK)
            self._notify()
