"""Test rig for the virtio-blk device model: guest memory, driven queues, MSI-X vectors.

The split-ring driver is the core's public test driver, vmmcore.virtio.testing (it plays
Linux's virtio_ring). The disk is a
small file-backed DiskFile defined here, so these tests need only the core and this
plugin (tox installs nothing else); tests of effects on the host file use the raw format
when it is installed.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from vmm_virtio_blk.device import REQ_HEADER, SEGMENT, VirtioBlock  # noqa: E402

from vmmcore.disk import Buffers, DiskCapabilities, DiskError, DiskFile, FileExtent  # noqa: E402
from vmmcore.eventfd import EventFd  # noqa: E402
from vmmcore.interrupts import IrqFdInterrupt  # noqa: E402
from vmmcore.memory import GuestMemory  # noqa: E402
from vmmcore.virtio import EventFdMsix, VirtioInterrupt, prepare_queues  # noqa: E402
from vmmcore.virtio.status import (  # noqa: E402
    TRANSPORT_FEATURES,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
)
from vmmcore.virtio.testing import VirtqueueDriver  # noqa: E402

MiB = 1 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX")
TIMEOUT = 10.0
SECTORS = MiB // 512                 # of the default 1 MiB test image


def host(path: Path, offset: int, n: int) -> bytes:
    """n bytes of the host file at offset (what the device really wrote)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _batched(call, fd: int, bufs: list, offset: int) -> int:
    """preadv/pwritev of any number of buffers, IOV_MAX at a time (as raw does)."""
    done = 0
    for i in range(0, len(bufs), IOV_MAX):
        done += call(fd, bufs[i:i + IOV_MAX], offset + done)
    return done


class FileDisk(DiskFile):
    """A minimal raw-like DiskFile (preadv/pwritev, zero-writing discard)."""

    format_name = "testfile"

    def __init__(self, path: Path, read_only: bool = False) -> None:
        super().__init__(path, read_only)
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self._size = os.fstat(self.fd).st_size
        self.flushes = 0
        self.calls: list[tuple] = []

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> DiskCapabilities:
        return DiskCapabilities(discard=not self.read_only, write_zeroes=not self.read_only,
                                resize=not self.read_only)

    def resize(self, new_size: int) -> None:
        os.ftruncate(self.fd, new_size)
        self._size = new_size

    def read_into(self, offset: int, bufs: Buffers) -> int:
        total = sum(b.nbytes for b in bufs)
        self.check_range(offset, total)
        n = _batched(os.preadv, self.fd, list(bufs), offset)
        assert n == total
        return n

    def write_from(self, offset: int, bufs: Buffers) -> int:
        if self.read_only:
            raise DiskError("read-only")
        total = sum(b.nbytes for b in bufs)
        self.check_range(offset, total)
        n = _batched(os.pwritev, self.fd, list(bufs), offset)
        assert n == total
        return n

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        os.pwrite(self.fd, bytes(length), offset)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.calls.append(("write_zeroes", offset, length, may_unmap))
        os.pwrite(self.fd, bytes(length), offset)

    def fds(self) -> list[int]:
        return [self.fd]

    def file_extent(self) -> FileExtent | None:
        """The whole file is the disk (so the native engine can serve it too; the
        counters above then stay untouched: see BlkRig.flushes/disk_ops)."""
        return FileExtent(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def wait_fd(evt: EventFd, timeout: float) -> bool:
    ready, _, _ = select.select([evt.fileno()], [], [], timeout)
    if ready:
        evt.read()
    return bool(ready)


@dataclass
class Request:
    queue: int
    head: int
    in_bufs: list[tuple[int, int]]
    length: int = -1
    status: int = -1
    data: bytes = b""


def header(rtype: int, sector: int = 0, reserved: int = 0) -> bytes:
    return REQ_HEADER.pack(rtype, reserved, sector)


def segment(sector: int, nsectors: int, flags: int = 0) -> bytes:
    return SEGMENT.pack(sector, nsectors, flags)


class BlkRig:
    """One VirtioBlock with `num_queues` driven queues in 32 MiB of guest memory."""

    DATA_BASE = 0x100000
    DATA_PER_QUEUE = 8 * MiB

    def __init__(self, device: VirtioBlock, *, event_idx: bool = True,
                 ack: int | None = None) -> None:
        self.device = device
        n = device.num_queues
        self.mem = GuestMemory([(0, self.DATA_BASE + n * self.DATA_PER_QUEUE)])
        self.kicks = [EventFd() for _ in range(n)]
        self.vectors = [EventFd() for _ in range(n + 1)]        # 0: config, 1+i: queue i
        self.reset_reasons: list[str] = []
        self.reset_seen = threading.Event()
        self.interrupt = VirtioInterrupt(
            msix=EventFdMsix([IrqFdInterrupt(e) for e in self.vectors]),
            on_needs_reset=self._on_reset)
        self.interrupt.config_vector = 0
        qs = device.queue_size
        self.drivers = []
        for i in range(n):
            base = 0x1000 + i * 0x10000
            assert 16 * qs + 6 + 2 * qs + 6 + 8 * qs + 8 < 0x10000
            self.drivers.append(VirtqueueDriver(
                self.mem, qs, base, self.DATA_BASE + i * self.DATA_PER_QUEUE,
                self.DATA_PER_QUEUE, event_idx=event_idx, indirect=True,
                kick_evt=self.kicks[i]))
        device.ack_features(device.features() if ack is None else ack)
        self.requests: dict[tuple[int, int], Request] = {}

    def _on_reset(self, reason: str) -> None:
        self.reset_reasons.append(reason)
        self.reset_seen.set()

    def activate(self) -> None:
        queues = []
        for i, d in enumerate(self.drivers):
            q = d.make_queue(self.device.queue_size)
            q.vector = 1 + i
            queues.append(q)
        # the ring features are what the driver negotiated (TRANSPORT_FEATURES offers
        # EVENT_IDX: OR-ing it in would give the device EVENT_IDX behind the back of a
        # driver built with event_idx=False)
        ring = (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_RING_INDIRECT_DESC)
        prepare_queues(self.mem, TRANSPORT_FEATURES & ~ring | self.drivers[0].features,
                       queues)
        self.device.activate(self.mem, self.interrupt, queues, self.kicks)

    # -- submitting ----------------------------------------------------------------------

    def submit(self, out=(), in_sizes=(), queue: int = 0, indirect: bool = False,
               kick: bool = True) -> Request:
        d = self.drivers[queue]
        head = d.add(list(out), list(in_sizes), indirect=indirect)
        req = Request(queue, head, list(d.pending[head].in_bufs))
        self.requests[(queue, head)] = req
        if kick:
            d.kick_evt.write(1)
        return req

    def read(self, sector: int, nbytes: int, queue: int = 0, **kw) -> Request:
        return self.submit([header(0, sector)], [nbytes, 1], queue=queue, **kw)

    def write(self, sector: int, data: bytes, queue: int = 0, **kw) -> Request:
        return self.submit([header(1, sector), data], [1], queue=queue, **kw)

    # -- completing -------------------------------------------------------------------------

    def _reap(self, queue: int) -> list[Request]:
        done = []
        for used in self.drivers[queue].get_used():
            req = self.requests.pop((queue, used.head))
            req.length = used.length
            addr, n = req.in_bufs[-1]
            req.status = self.mem.read(addr + n - 1, 1)[0]
            data = b"".join(self.mem.read(a, n) for a, n in req.in_bufs)[:-1]
            req.data = data[:max(used.length - 1, 0)]
            done.append(req)
        return done

    def wait(self, n: int = 1, queue: int = 0, timeout: float = TIMEOUT) -> list[Request]:
        """Reap until n requests of `queue` completed (in completion order)."""
        got: list[Request] = []
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while len(got) < n and not deadline.is_set():
                got += self._reap(queue)
                if len(got) < n:
                    wait_fd(self.vectors[1 + queue], 0.05)
        finally:
            timer.cancel()
        assert len(got) >= n, f"only {len(got)} of {n} requests completed"
        return got

    def do(self, *args, **kw) -> Request:
        """Submit one request and wait for it."""
        req = self.submit(*args, **kw)
        [done] = self.wait(1, queue=req.queue)
        return done

    def do_read(self, sector: int, nbytes: int) -> Request:
        req = self.read(sector, nbytes)
        [done] = self.wait(1, queue=req.queue)
        return done

    def do_write(self, sector: int, data: bytes) -> Request:
        req = self.write(sector, data)
        [done] = self.wait(1, queue=req.queue)
        return done

    # -- what the disk was asked to do (the Python engine calls the DiskFile, the native
    # engine does the I/O itself and counts it) ------------------------------------------

    @property
    def native(self) -> bool:
        return self.device.engine == "native"

    def flushes(self) -> int:
        if self.native:
            return self.device.engine_stats()["flushes"]
        return self.device.disk.flushes

    def disk_ops(self) -> int:
        """DISCARD and WRITE_ZEROES segments carried out so far."""
        if self.native:
            stats = self.device.engine_stats()
            return stats["discards"] + stats["write_zeroes"]
        return len(self.device.disk.calls)

    def close(self) -> None:
        self.device.shutdown()
        for e in (*self.kicks, *self.vectors):
            e.close()
        self.mem.close()


def make_image(path: Path, size: int, pattern: bool = True) -> bytes:
    data = bytearray(size)
    if pattern:
        for i in range(0, size, 512):
            data[i:i + 8] = struct.pack("<Q", i // 512)
            data[i + 8:i + 512] = bytes([(i // 512) & 0xFF]) * 504
    path.write_bytes(data)
    return bytes(data)
