"""A test-side virtio driver (public, for device plugins' tests): plays Linux's virtio_ring (split ring) in a GuestMemory.

It lays out the descriptor table, available and used rings, keeps a free-descriptor
list as Linux does (desc[i].next = i + 1), adds direct and indirect chains, decides
whether to kick the way virtqueue_kick_prepare() does (NO_NOTIFY, or avail_event with
EVENT_IDX), and reaps used entries the way virtqueue_get_buf() does (publishing
used_event when EVENT_IDX is on). Raw helpers write arbitrary descriptors and avail
entries for the malformed-chain tests.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Queue,
    vring_need_event,
)
from vmmcore.virtio.status import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC

DESC = struct.Struct("<QIHH")


@dataclass
class Used:
    """One reaped used entry: the head, the device's written length, the data it wrote."""

    head: int
    length: int
    data: bytes


@dataclass
class _Pending:
    descs: list[int]
    in_bufs: list[tuple[int, int]] = field(default_factory=list)


class VirtqueueDriver:
    """The driver half of one split virtqueue living at `base` in guest memory."""

    def __init__(self, mem: GuestMemory, size: int, base: int, data_base: int,
                 data_size: int, *, event_idx: bool = False, indirect: bool = False,
                 kick_evt: EventFd | None = None) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        self.event_idx = event_idx
        self.indirect = indirect
        self.kick_evt = kick_evt
        self.data_base = data_base
        self.data_end = data_base + data_size
        self._data_next = data_base
        mem.fill(base, self.end - base)
        for i in range(size):
            self.write_desc(i, 0, 0, 0, (i + 1) % size)
        self.free_head = 0
        self.num_free = size
        self.avail_idx = 0
        self.last_used = 0
        self.num_added = 0
        self.kicks = 0
        self.pending: dict[int, _Pending] = {}

    # -- set-up ------------------------------------------------------------------------

    @property
    def features(self) -> int:
        """The ring feature bits this driver negotiated."""
        return (self.event_idx << VIRTIO_F_RING_EVENT_IDX) | (
            self.indirect << VIRTIO_F_RING_INDIRECT_DESC)

    def make_queue(self, max_size: int | None = None) -> Queue:
        """A device-side Queue configured the way the transport would (ready, features)."""
        q = Queue(max_size or self.size)
        q.size = self.size
        q.desc_table, q.avail_ring, q.used_ring = self.desc, self.avail, self.used
        q.set_features(self.features)
        q.validate(self.mem)
        q.ready = True
        return q

    def start_at(self, idx: int, queue: Queue | None = None) -> None:
        """Start all ring indexes at idx (to test wraparound at 65535)."""
        self.avail_idx = self.last_used = idx
        self.mem.write_u16(self.avail + 2, idx)
        self.mem.write_u16(self.used + 2, idx)
        self.set_used_event(idx)
        if queue is not None:
            queue.restore_indices(idx, idx)

    def alloc(self, length: int) -> int:
        """Bump-allocate a 16-byte aligned data buffer (wraps to the start when full)."""
        length = max(length, 1)
        if self._data_next + length > self.data_end:
            self._data_next = self.data_base
        addr = self._data_next
        self._data_next = (addr + length + 15) & ~15
        return addr

    # -- raw access (malformed chains) ---------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        self.mem.pack_into(DESC, (self.desc if table is None else table) + 16 * i,
                           addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        """Put head into the next avail slot and publish it (no free-list bookkeeping)."""
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        self.num_added += 1

    def set_avail_idx(self, value: int) -> None:
        self.mem.write_u16(self.avail + 2, value & 0xFFFF)

    # -- adding buffers -------------------------------------------------------------------

    def add(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (),
            indirect: bool = False) -> int:
        """Add one chain: readable buffers holding `out`, writable ones of `in_sizes`."""
        bufs = []
        for data in out:
            addr = self.alloc(len(data))
            self.mem.write(addr, data)
            bufs.append((addr, len(data), 0))
        in_bufs = []
        for n in in_sizes:
            addr = self.alloc(n)
            self.mem.fill(addr, n, 0xAA)
            bufs.append((addr, n, VIRTQ_DESC_F_WRITE))
            in_bufs.append((addr, n))
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (addr, n, flags) in enumerate(bufs):
                nxt = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc(i, addr, n, flags | nxt, i + 1 if nxt else 0, table=table)
            bufs = [(table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        if len(bufs) > self.num_free:
            raise RuntimeError("virtqueue full")
        head = self.free_head
        descs = []
        i = head
        for k, (addr, n, flags) in enumerate(bufs):
            descs.append(i)
            nxt = self.mem.unpack_from(DESC, self.desc + 16 * i)[3]
            more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
            self.write_desc(i, addr, n, flags | more, nxt)
            i = nxt
        self.free_head = i
        self.num_free -= len(bufs)
        self.pending[head] = _Pending(descs, in_bufs)
        self.publish(head)
        return head

    def kick_needed(self) -> bool:
        """virtqueue_kick_prepare(): does the device want a notification?"""
        new = self.avail_idx
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            avail_event = self.mem.read_u16(self.used + 4 + 8 * self.size)
            return vring_need_event(avail_event, new, old)
        return not self.mem.read_u16(self.used) & VIRTQ_USED_F_NO_NOTIFY

    def kick(self) -> bool:
        """Notify the device if kick_needed(); return whether it did."""
        if self.kick_needed():
            self.kicks += 1
            if self.kick_evt is not None:
                self.kick_evt.write(1)
            return True
        return False

    # -- reaping ----------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def get_used(self) -> list[Used]:
        """virtqueue_get_buf() in a loop: reap all used entries, free their descriptors."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            pending = self.pending.pop(head, None)
            if pending is None:
                raise AssertionError(f"device returned head {head}, which is not in flight")
            data = bytearray()
            for addr, n in pending.in_bufs:
                take = min(n, length - len(data))
                if take <= 0:
                    break
                data += self.mem.read(addr, take)
            out.append(Used(head, length, bytes(data)))
            last = pending.descs[-1]
            addr, n, flags, _ = self.mem.unpack_from(DESC, self.desc + 16 * last)
            self.write_desc(last, addr, n, flags, self.free_head)
            self.free_head = head
            self.num_free += len(pending.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
            if self.event_idx:
                self.set_used_event(self.last_used)
        return out

    # -- interrupt suppression -----------------------------------------------------------------

    def set_used_event(self, value: int) -> None:
        """Ask for an interrupt once the device's used idx passes `value` (EVENT_IDX)."""
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    def disable_cb(self) -> None:
        self.mem.write_u16(self.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_cb(self) -> None:
        self.mem.write_u16(self.avail, 0)
        if self.event_idx:
            self.set_used_event(self.last_used)


class DeviceHarness:
    """A VirtioDevice activated on guest memory with one VirtqueueDriver per queue.

    For device plugins' tier-1 tests: MSI-X vector 0 is the config vector and queue i
    uses vector i + 1, each an EventFd the test can wait on; NEEDS_RESET reasons are
    collected. Nothing here needs KVM.
    """

    MiB = 1 << 20

    def __init__(self, device, *, mem_size: int = 4 * MiB, event_idx: bool = True,
                 queue_size: int | None = None) -> None:
        from vmmcore.interrupts import IrqFdInterrupt
        from vmmcore.virtio.device import EventFdMsix, VirtioInterrupt

        self.device = device
        self.mem = GuestMemory([(0, mem_size)])
        n = len(device.queue_max_sizes)
        self.kicks = [EventFd() for _ in range(n)]
        self.vectors = [EventFd() for _ in range(n + 1)]
        self.reset_reasons: list[str] = []
        self.interrupt = VirtioInterrupt(
            msix=EventFdMsix([IrqFdInterrupt(e) for e in self.vectors]),
            on_needs_reset=self.reset_reasons.append)
        self.interrupt.config_vector = 0
        # Rings in the first MiB, data buffers above it, split evenly between queues.
        data_each = (mem_size - self.MiB) // n
        self.drivers = [
            VirtqueueDriver(self.mem, queue_size or device.queue_max_sizes[i],
                            0x1000 + i * 0x10000, self.MiB + i * data_each, data_each,
                            event_idx=event_idx, indirect=True, kick_evt=self.kicks[i])
            for i in range(n)]

    def activate(self, features: int = 0) -> list[Queue]:
        """Negotiate (transport features plus `features`) and activate the device."""
        from vmmcore.virtio.queue import prepare_queues
        from vmmcore.virtio.status import TRANSPORT_FEATURES

        queues = []
        for i, d in enumerate(self.drivers):
            q = d.make_queue(self.device.queue_max_sizes[i])
            q.vector = i + 1
            queues.append(q)
        self.device.ack_features(features)
        prepare_queues(self.mem, TRANSPORT_FEATURES | features, queues)
        self.device.activate(self.mem, self.interrupt, queues, self.kicks)
        return queues

    def wait_used(self, queue: int = 0, count: int = 1, timeout: float = 5.0) -> list[Used]:
        """Kick queue `queue` and collect `count` used entries (waiting on its vector)."""
        import select

        d = self.drivers[queue]
        d.kick()
        got: list[Used] = []
        while len(got) < count:
            got.extend(d.get_used())
            if len(got) >= count:
                break
            ready, _, _ = select.select([self.vectors[queue + 1].fileno()], [], [], timeout)
            if not ready:
                break
            self.vectors[queue + 1].read()
        return got

    def close(self) -> None:
        self.device.shutdown()
        for e in (*self.kicks, *self.vectors):
            e.close()
        self.mem.close()
