"""Reader and Writer: byte cursors over a descriptor chain (crosvm's descriptor_utils).

Devices think in requests ("a 16-byte header, then data, then one status byte"), not
in descriptors, and a driver may split those pieces across buffers any way it likes.
Reader walks the device-readable buffers and Writer the device-writable ones as one
contiguous stream each. views() hands out zero-copy memoryviews of the next n bytes,
ready for os.preadv/os.pwritev, so disk data moves between the file and guest RAM with
no copy in between.

A request shorter than the device needs is a malformed request: read_exact(),
read_obj() and write_all() raise VirtqueueError, which the worker turns into
DEVICE_NEEDS_RESET; devices that prefer an error status use the non-raising forms.
"""

from __future__ import annotations

import struct

from vmmcore.memory import GuestMemory
from vmmcore.virtio.queue import DescriptorChain, VirtqueueError


class _Cursor:
    """A position in a list of (addr, len) guest buffers."""

    def __init__(self, mem: GuestMemory, buffers: list[tuple[int, int]]) -> None:
        self._mem = mem
        self._bufs = list(buffers)
        self._index = 0
        self._offset = 0
        self.total = sum(n for _, n in buffers)
        self.done = 0

    def available_bytes(self) -> int:
        """Bytes left after the cursor."""
        return self.total - self.done

    def _take(self, n: int) -> list[tuple[int, int]]:
        """Advance by up to n bytes; the (addr, len) pieces passed over."""
        pieces = []
        while n > 0 and self._index < len(self._bufs):
            addr, length = self._bufs[self._index]
            step = min(n, length - self._offset)
            pieces.append((addr + self._offset, step))
            self._offset += step
            self.done += step
            n -= step
            if self._offset == length:
                self._index += 1
                self._offset = 0
        return pieces

    def views(self, n: int) -> list[memoryview]:
        """Zero-copy views of the next n bytes (fewer if the chain ends); advances."""
        return self._mem.scatter_slices(self._take(n))

    def consume(self, n: int) -> int:
        """Skip n bytes; returns how many were skipped."""
        return sum(length for _, length in self._take(n))

    def _split(self, offset: int) -> list[tuple[int, int]]:
        """Cut the remaining buffers at offset bytes from the cursor; return the tail."""
        keep: list[tuple[int, int]] = []
        tail: list[tuple[int, int]] = []
        pos = 0
        remaining = [(a + (self._offset if i == self._index else 0),
                      n - (self._offset if i == self._index else 0))
                     for i, (a, n) in enumerate(self._bufs) if i >= self._index]
        for addr, length in remaining:
            if pos + length <= offset:
                keep.append((addr, length))
            elif pos >= offset:
                tail.append((addr, length))
            else:
                cut = offset - pos
                keep.append((addr, cut))
                tail.append((addr + cut, length - cut))
            pos += length
        self._bufs, self._index, self._offset = keep, 0, 0
        self.total = self.done + sum(n for _, n in keep)
        return tail


class Reader(_Cursor):
    """The device-readable bytes of a chain, read front to back."""

    def __init__(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        super().__init__(mem, chain.readable)

    @property
    def bytes_read(self) -> int:
        return self.done

    def read(self, n: int | None = None) -> bytes:
        """Copy up to n bytes (all remaining when None)."""
        n = self.available_bytes() if n is None else n
        return b"".join(bytes(v) for v in self.views(n))

    def read_exact(self, n: int) -> bytes:
        """Exactly n bytes, or VirtqueueError if the request is shorter."""
        if n > self.available_bytes():
            raise VirtqueueError(
                f"request too short: need {n} more readable bytes, "
                f"{self.available_bytes()} left")
        return self.read(n)

    def read_obj(self, fmt: struct.Struct) -> tuple:
        """Unpack one structure from a private copy (the guest cannot change it after)."""
        return fmt.unpack(self.read_exact(fmt.size))


class Writer(_Cursor):
    """The device-writable bytes of a chain, written front to back."""

    def __init__(self, mem: GuestMemory, chain: DescriptorChain | None = None,
                 buffers: list[tuple[int, int]] | None = None) -> None:
        super().__init__(mem, chain.writable if chain is not None else buffers or [])

    @property
    def bytes_written(self) -> int:
        return self.done

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of data as fits; returns the count."""
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.views(src.nbytes):
            view[:] = src[pos:pos + view.nbytes]
            pos += view.nbytes
        return pos

    def write_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of data, or raise VirtqueueError (nothing written) if it cannot fit."""
        size = memoryview(data).nbytes
        if size > self.available_bytes():
            raise VirtqueueError(
                f"response does not fit: {size} bytes, {self.available_bytes()} writable")
        self.write(data)

    def write_obj(self, fmt: struct.Struct, *values: object) -> None:
        self.write_all(fmt.pack(*values))

    def split_at(self, offset: int) -> Writer:
        """Keep the next offset bytes here; return a Writer for everything after them.

        For requests whose last byte is a status (virtio-blk): split at
        available_bytes() - 1, stream data into this one, the status into the other.
        """
        tail = Writer(self._mem, buffers=self._split(max(offset, 0)))
        return tail
