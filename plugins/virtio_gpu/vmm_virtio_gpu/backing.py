"""A resource's backing store: the guest scatter list of RESOURCE_ATTACH_BACKING.

Both modes use it: 2D gathers pixel rows out of it with numpy, 3D hands virglrenderer
the host addresses of its pieces (struct iovec) in the device process's mapping of
guest RAM. Every entry is checked to lie inside one guest RAM region when attached.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.protocol import GpuError
from vmmcore.memory import GuestMemory
from vmmcore.virtio import Reader

#: largest scatter list one RESOURCE_ATTACH_BACKING may carry
MAX_BACKING_ENTRIES = 1 << 16


@dataclass
class Backing:
    """Guest (address, length) pieces, with prefix sums of their lengths for bisect."""

    entries: list[tuple[int, int]]
    starts: list[int] = field(default_factory=list)
    length: int = 0

    @classmethod
    def read(cls, reader: Reader, count: int, mem: GuestMemory) -> Backing:
        """The `count` struct virtio_gpu_mem_entry that follow an ATTACH_BACKING body."""
        if count == 0 or count > MAX_BACKING_ENTRIES:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"{count} backing entries (1..{MAX_BACKING_ENTRIES})")
        size = count * p.MEM_ENTRY.size
        if reader.available_bytes() < size:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"{count} backing entries announced, "
                           f"{reader.available_bytes() // p.MEM_ENTRY.size} present")
        backing = cls([])
        for addr, length in p.MEM_ENTRY.iter_unpack(reader.read(size)):
            if length == 0:
                continue
            if not mem.is_valid_range(addr, length):
                raise GpuError(p.RESP_ERR_UNSPEC,
                               f"backing entry {addr:#x}+{length:#x} is outside guest RAM")
            backing.entries.append((addr, length))
            backing.starts.append(backing.length)
            backing.length += length
        if not backing.entries:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, "backing entries are all empty")
        return backing

    def gather(self, mem: GuestMemory, start: int, end: int) -> np.ndarray:
        """Bytes [start, end) as one uint8 array (zero-copy when in one piece)."""
        i = bisect.bisect_right(self.starts, start) - 1
        pieces = []
        pos = start
        while pos < end:
            addr, length = self.entries[i]
            skip = pos - self.starts[i]
            take = min(length - skip, end - pos)
            if take > 0:
                pieces.append(np.frombuffer(mem.slice(addr + skip, take), np.uint8))
                pos += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def host_pieces(self, mem: GuestMemory) -> list[tuple[int, int]]:
        """(host virtual address, length) of every piece, for a struct iovec array."""
        out = []
        for addr, length in self.entries:
            region = mem.region_of(addr)
            assert region is not None          # checked in read()
            out.append((mem.host_address(region) + addr - region.guest_addr, length))
        return out
