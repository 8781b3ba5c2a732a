"""The split virtqueue, device side (OASIS virtio 1.2, section 2.7).

The guest driver owns the descriptor table and the available ring; the device owns the
used ring. Everything the device reads from the guest is hostile: every address goes
through GuestMemory (which refuses anything outside guest RAM), every index is checked
against the queue or table size, chains are walked with a visit counter (so a loop ends
as an error, not a hang), and total lengths are checked against u32. Every such fault
raises VirtqueueError, which the device worker turns into DEVICE_NEEDS_RESET; nothing in
this module lets IndexError, struct.error or GuestMemoryError escape from pop().

Memory ordering. Python has no fences, so this module relies on three facts:

* x86-64 is TSO: loads are not reordered with older loads, stores are not reordered with
  older stores. Reading avail->idx before the ring entry and descriptors it publishes,
  and writing the used element before used->idx, therefore needs only program order
  (Linux's virt_rmb/virt_wmb are compiler barriers on x86). CPython performs each access
  as a separate call into C through opaque pointers, so the C compiler cannot reorder
  them either.
* The one reordering TSO allows is a later load passing an earlier store. That matters
  exactly where both sides "store, then check the other side": the device publishing
  used->idx then reading used_event (needs_interrupt), and the device publishing
  avail_event then re-reading avail->idx (pop / enable_notification). There
  memory_fence() issues a full barrier: acquiring and releasing a threading.Lock
  executes a LOCK-prefixed read-modify-write in the C library (sem_wait/sem_post or a
  pthread mutex), and a locked instruction is a full fence on x86.
* 16-bit indexes the other side polls (used->idx, avail->idx, avail_event) are accessed
  as one native, naturally aligned 16-bit load or store (memoryview.cast("H")), never
  byte by byte, so the driver can never observe a torn index. Ring alignment (desc 16,
  avail 2, used 4) is checked in validate().

On a weakly ordered host (arm64) program order would not be enough for the element /
index pair; this VMM targets x86-64 KVM only.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from vmmcore.errors import GuestMemoryError, VmmError
from vmmcore.memory import GuestMemory
from vmmcore.virtio.status import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_MSI_NO_VECTOR,
)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
U32_MAX = 0xFFFF_FFFF

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class SignalsQueues(Protocol):
    """What trigger_interrupt needs (VirtioInterrupt satisfies it)."""

    def signal_used_queue(self, vector: int) -> None:
        """Signal that a queue using MSI-X vector `vector` has new used buffers."""


class VirtqueueError(VmmError):
    """The driver broke the virtqueue protocol; the device must enter NEEDS_RESET."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when event_idx lies in [old_idx, new_idx) modulo 2**16 (virtio 1.2, 2.7.10).

    Used both ways: the device asks whether the used entries it added since old_idx
    crossed the driver's used_event, the driver whether its new available entries crossed
    the device's avail_event.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


_fence_lock = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier (see the module docstring for why a lock gives one)."""
    _fence_lock.acquire()
    _fence_lock.release()


def _load_u16(mem: GuestMemory, addr: int) -> int:
    """One native 16-bit load (not byte-wise), bounds-checked by GuestMemory."""
    return mem.slice(addr, 2).cast("H")[0]


def _store_u16(mem: GuestMemory, addr: int, value: int) -> None:
    """One native 16-bit store, so the guest never sees half of an index update."""
    mem.slice(addr, 2).cast("H")[0] = value & 0xFFFF


@dataclass
class DescriptorChain:
    """One popped descriptor chain: the guest buffers of a request, already validated.

    readable/writable hold (guest_addr, length) copies taken once at pop time, so a
    guest rewriting the descriptor table afterwards cannot change what the device
    accesses. The buffer contents are still guest memory: a device must copy a header
    out before validating it. Zero-length descriptors carry no data and are omitted.
    """

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    readable_len: int
    writable_len: int
    descriptor_count: int
    indirect: bool = False
    #: A device-readable descriptor followed a device-writable one. The spec forbids
    #: it (2.7.4.2); most devices treat it as an error via require_device_order().
    readable_after_writable: bool = False

    def require_device_order(self) -> None:
        """Raise VirtqueueError if the chain puts readable buffers after writable ones."""
        if self.readable_after_writable:
            raise VirtqueueError(
                f"descriptor chain {self.head}: device-readable descriptor after a "
                "device-writable one")

    def readable_views(self, mem: GuestMemory) -> list[memoryview]:
        """Zero-copy views of the device-readable buffers, in chain order."""
        return mem.scatter_slices(self.readable)

    def writable_views(self, mem: GuestMemory) -> list[memoryview]:
        """Zero-copy views of the device-writable buffers, in chain order."""
        return mem.scatter_slices(self.writable)

    def read(self, mem: GuestMemory, size: int | None = None, offset: int = 0) -> bytes:
        """Copy up to size bytes of the readable buffers, starting offset bytes in."""
        want = self.readable_len - offset if size is None else size
        out = bytearray()
        for addr, length in self.readable:
            if len(out) >= want:
                break
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, want - len(out))
            out += mem.read(addr + offset, take)
            offset = 0
        return bytes(out)

    def write(self, mem: GuestMemory, data: bytes | bytearray | memoryview,
              offset: int = 0) -> int:
        """Scatter data into the writable buffers from offset; return bytes written.

        Data beyond the writable capacity is dropped (the count says how much fitted).
        """
        src = memoryview(data).cast("B")
        done = 0
        for addr, length in self.writable:
            if done >= src.nbytes:
                break
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, src.nbytes - done)
            mem.write(addr + offset, src[done:done + take])
            done += take
            offset = 0
        return done


class Queue:
    """A split virtqueue as the device sees it.

    The transport sets size, desc_table, avail_ring, used_ring, vector and ready from
    the driver's writes, then calls prepare_queues() (features + validation) before
    handing the queues to VirtioDevice.activate(). next_avail / next_used are the
    device's private ring cursors (public so tests can start them near 65535).
    """

    def __init__(self, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (virtio 1.2, 2.4)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.vector = VIRTIO_MSI_NO_VECTOR
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        self._notify_enabled = True
        self._signalled_used = 0
        self._unsignalled = 0

    # -- configuration -------------------------------------------------------------

    def set_features(self, features: int) -> None:
        """Take the negotiated ring features (EVENT_IDX, INDIRECT_DESC) from the driver."""
        self.event_idx = bool(features >> VIRTIO_F_RING_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_F_RING_INDIRECT_DESC & 1)

    def validate(self, mem: GuestMemory) -> None:
        """Check size, alignment and that all three rings lie in guest RAM."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise VirtqueueError(
                f"queue size {size} is not a power of two in 1..{self.max_size}")
        for name, addr, align, length in (
            ("descriptor table", self.desc_table, 16, DESC_SIZE * size),
            ("available ring", self.avail_ring, 2, 6 + 2 * size),
            ("used ring", self.used_ring, 4, 6 + USED_ELEM_SIZE * size),
        ):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not mem.is_valid_range(addr, length):
                raise VirtqueueError(
                    f"{name} {addr:#x}+{length:#x} is outside guest RAM")

    def restore_indices(self, next_avail: int, next_used: int) -> None:
        """Set the ring cursors (snapshot restore; tests starting near 65535)."""
        self.next_avail = next_avail & 0xFFFF
        self.next_used = self._signalled_used = next_used & 0xFFFF
        self._unsignalled = 0

    def is_valid(self, mem: GuestMemory) -> bool:
        """True when validate() would pass."""
        try:
            self.validate(mem)
        except VirtqueueError:
            return False
        return True

    # -- ring field addresses --------------------------------------------------------

    @property
    def _used_event_addr(self) -> int:
        return self.avail_ring + 4 + 2 * self.size

    @property
    def _avail_event_addr(self) -> int:
        return self.used_ring + 4 + USED_ELEM_SIZE * self.size

    def _avail_idx(self, mem: GuestMemory) -> int:
        return _load_u16(mem, self.avail_ring + 2)

    # -- available ring ---------------------------------------------------------------

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None when the driver has published no more.

        With EVENT_IDX and notifications enabled, an empty ring re-arms avail_event and
        re-checks after a full fence, so a buffer added concurrently is either returned
        here or announced by a kick: a `while (c := q.pop(mem))` loop misses nothing.
        """
        if not self.ready:
            return None
        try:
            pending = (self._avail_idx(mem) - self.next_avail) & 0xFFFF
            if pending == 0:
                if not (self.event_idx and self._notify_enabled):
                    return None
                _store_u16(mem, self._avail_event_addr, self.next_avail)
                memory_fence()
                pending = (self._avail_idx(mem) - self.next_avail) & 0xFFFF
                if pending == 0:
                    return None
            if pending > self.size:
                raise VirtqueueError(
                    f"avail idx is {pending} entries ahead of the device "
                    f"(next {self.next_avail}), more than the queue size {self.size}")
            slot = self.next_avail & (self.size - 1)
            head = _load_u16(mem, self.avail_ring + 4 + 2 * slot)
            chain = self._walk_chain(mem, head, slot)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            if self.event_idx and self._notify_enabled:
                _store_u16(mem, self._avail_event_addr, self.next_avail)
        except GuestMemoryError as e:
            raise VirtqueueError(f"virtqueue access outside guest RAM: {e}") from e
        return chain

    def _walk_chain(self, mem: GuestMemory, head: int, slot: int) -> DescriptorChain:
        """Follow one chain from head, validating every descriptor (see module doc)."""
        size = self.size
        if head >= size:
            raise VirtqueueError(
                f"avail ring slot {slot} names descriptor {head}, queue size is {size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total_r = total_w = 0
        seen_write = out_of_order = in_indirect = False
        table, table_len, where = self.desc_table, size, "queue size"
        index, visited, total_visited = head, 0, 0
        while True:
            visited += 1
            total_visited += 1
            if visited > table_len:
                raise VirtqueueError(
                    f"descriptor chain from head {head} is longer than the {where} "
                    f"({table_len}): a loop?")
            addr, length, flags, nxt = mem.unpack_from(_DESC, table + DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError(
                        f"chain {head}: nested indirect descriptor at table index {index}")
                if not self.indirect:
                    raise VirtqueueError(
                        f"chain {head}: indirect descriptor but RING_INDIRECT_DESC "
                        "was not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(
                        f"chain {head}: descriptor {index} sets both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(
                        f"chain {head}: indirect table length {length} is not a "
                        "non-zero multiple of 16")
                if visited - 1 + length // DESC_SIZE > size:
                    # Spec 2.7.5.3.1: no chain longer than the queue size, indirect
                    # entries included. Bounds the work one request can cost.
                    raise VirtqueueError(
                        f"chain {head}: {visited - 1} descriptors and an indirect table "
                        f"of {length // DESC_SIZE} entries exceed the queue size ({size})")
                if not mem.is_valid_range(addr, length):
                    raise VirtqueueError(
                        f"chain {head}: indirect table {addr:#x}+{length:#x} is outside "
                        "guest RAM")
                table, table_len, where = addr, length // DESC_SIZE, "indirect table"
                index, visited, in_indirect = 0, 0, True
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                out_of_order = True
            if length:
                if not mem.is_valid_range(addr, length):
                    raise VirtqueueError(
                        f"chain {head}: buffer {addr:#x}+{length:#x} is outside guest RAM")
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append((addr, length))
                    total_w += length
                else:
                    readable.append((addr, length))
                    total_r += length
                if total_r + total_w > U32_MAX:
                    raise VirtqueueError(
                        f"chain {head}: total length exceeds 2**32-1 bytes")
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise VirtqueueError(
                    f"chain {head}: next index {nxt} is beyond the {where} ({table_len})")
            index = nxt
        return DescriptorChain(head, readable, writable, total_r, total_w, total_visited,
                               in_indirect, out_of_order)

    # -- used ring -----------------------------------------------------------------------

    def add_used(self, mem: GuestMemory, chain: DescriptorChain | int, written: int) -> None:
        """Return a chain to the driver, saying how many bytes the device wrote into it.

        The used element is stored before used->idx; on x86 TSO program order keeps the
        two stores in that order for every observer (module docstring).
        """
        head = chain.head if isinstance(chain, DescriptorChain) else chain
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor index of a {self.size} queue")
        limit = chain.writable_len if isinstance(chain, DescriptorChain) else U32_MAX
        if not 0 <= written <= limit:
            raise ValueError(f"written length {written} exceeds the chain's {limit} bytes")
        slot = self.next_used & (self.size - 1)
        try:
            mem.pack_into(_USED_ELEM, self.used_ring + 4 + USED_ELEM_SIZE * slot,
                          head, written)
            self.next_used = (self.next_used + 1) & 0xFFFF
            _store_u16(mem, self.used_ring + 2, self.next_used)
        except GuestMemoryError as e:
            raise VirtqueueError(f"used ring outside guest RAM: {e}") from e
        self._unsignalled += 1

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the used buffers added since the last call must be signalled.

        Without EVENT_IDX: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT. With it:
        when the used entries added since the last call cover used_event. Each call
        consumes the window it judged, so call it once after a batch of add_used().
        """
        if self._unsignalled == 0:
            return False
        added, self._unsignalled = self._unsignalled, 0
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        memory_fence()  # our used->idx store must be visible before we read driver state
        try:
            if not self.event_idx:
                return not _load_u16(mem, self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
            if added >= 0x8000:  # window too wide for u16 arithmetic: be safe
                return True
            return vring_need_event(_load_u16(mem, self._used_event_addr), new, old)
        except GuestMemoryError as e:
            raise VirtqueueError(f"available ring outside guest RAM: {e}") from e

    def trigger_interrupt(self, mem: GuestMemory, interrupt: SignalsQueues) -> bool:
        """Signal the queue's vector if needs_interrupt(); return whether it did."""
        if self.needs_interrupt(mem):
            interrupt.signal_used_queue(self.vector)
            return True
        return False

    # -- driver notification suppression ------------------------------------------------

    def disable_notification(self, mem: GuestMemory) -> None:
        """Ask the driver not to kick (NO_NOTIFY, or stop advancing avail_event)."""
        self._notify_enabled = False
        if not self.event_idx:
            try:
                _store_u16(mem, self.used_ring, VIRTQ_USED_F_NO_NOTIFY)
            except GuestMemoryError as e:
                raise VirtqueueError(f"used ring outside guest RAM: {e}") from e

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (pop them now)."""
        self._notify_enabled = True
        try:
            if self.event_idx:
                _store_u16(mem, self._avail_event_addr, self.next_avail)
            else:
                _store_u16(mem, self.used_ring, 0)
            memory_fence()
            return self._avail_idx(mem) != self.next_avail
        except GuestMemoryError as e:
            raise VirtqueueError(f"virtqueue outside guest RAM: {e}") from e


def prepare_queues(mem: GuestMemory, features: int, queues: list[Queue]) -> None:
    """What the transport does at DRIVER_OK: give ready queues the negotiated features
    and validate their rings (VirtqueueError -> the transport sets NEEDS_RESET)."""
    for q in queues:
        if q.ready:
            q.set_features(features)
            q.validate(mem)
