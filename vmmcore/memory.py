"""GuestMemory: guest RAM backed by one memfd, mapped MAP_SHARED.

The memfd is the unit of sharing: the main process registers its mapping with KVM,
and each sandboxed device process receives the same fd and maps it itself, so device
data paths never copy through the main process.

Every guest-supplied address is hostile. All accessors check that the whole range lies
inside one RAM region and raise GuestMemoryError otherwise; nothing here can touch host
memory outside the mapping.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmmcore.errors import GuestMemoryError

assert sys.byteorder == "little", "vmm emulates x86-64 guests on an x86-64 host"

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous guest-physical RAM range and where it lives in the memfd."""

    guest_addr: int
    size: int
    file_offset: int

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_addr + self.size


class GuestMemory:
    """Guest RAM: a list of non-overlapping regions laid end to end in one memfd."""

    def __init__(self, ranges: Iterable[tuple[int, int]], fd: int | None = None) -> None:
        """Create (or, given fd, adopt) guest RAM for the (guest_addr, size) ranges.

        Ranges must be page aligned and non-overlapping. With fd=None a new memfd is
        created and sized; with an fd (a device process) the existing file is mapped.
        """
        self.regions: tuple[MemoryRegion, ...] = self._layout(ranges)
        self.size = sum(r.size for r in self.regions)
        owned = fd is None
        try:
            if fd is None:
                fd = os.memfd_create("vmm-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, self.size)
                # Device processes get this fd: sealed, none of them can shrink it under
                # us (an access past a shrunk end would be SIGBUS in the VMM).
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            elif os.fstat(fd).st_size < self.size:
                raise GuestMemoryError(
                    f"guest memory fd holds {os.fstat(fd).st_size} bytes, need {self.size}"
                )
            self._mmap = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            if owned and fd is not None:
                os.close(fd)
            raise GuestMemoryError(f"cannot map {self.size >> 20} MiB of guest memory: "
                                   f"{e.strerror}") from None
        self.fd = fd
        self._view = memoryview(self._mmap)
        self._starts = [r.guest_addr for r in self.regions]

    @staticmethod
    def _layout(ranges: Iterable[tuple[int, int]]) -> tuple[MemoryRegion, ...]:
        regions = []
        offset = 0
        for addr, size in sorted(ranges):
            if size <= 0 or addr % mmap.PAGESIZE or size % mmap.PAGESIZE:
                raise GuestMemoryError(f"bad RAM range {addr:#x}+{size:#x}: not page aligned")
            if regions and addr < regions[-1].end:
                raise GuestMemoryError(f"RAM range {addr:#x}+{size:#x} overlaps another")
            regions.append(MemoryRegion(addr, size, offset))
            offset += size
        if not regions:
            raise GuestMemoryError("guest memory needs at least one RAM range")
        return tuple(regions)

    # -- lookup -------------------------------------------------------------------

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return self.regions[-1].end

    def region_of(self, addr: int) -> MemoryRegion | None:
        """The region holding addr, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self.regions[i]
            if addr < region.end:
                return region
        return None

    def _offset(self, addr: int, length: int) -> int:
        """File offset of [addr, addr+length), which must lie inside one region."""
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{length:#x}")
        region = self.region_of(addr)
        if region is None or addr + length > region.end:
            raise GuestMemoryError(
                f"guest range {addr:#x}+{length:#x} is outside guest RAM"
            )
        return region.file_offset + (addr - region.guest_addr)

    def is_valid_range(self, addr: int, length: int) -> bool:
        """True when [addr, addr+length) lies inside one RAM region."""
        try:
            self._offset(addr, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, region: MemoryRegion) -> int:
        """Host virtual address of a region's mapping (for KVM_SET_USER_MEMORY_REGION)."""
        import cffi  # local: only the main process needs raw addresses

        ffi = cffi.FFI()
        base = int(ffi.cast("uintptr_t", ffi.from_buffer(self._mmap)))
        return base + region.file_offset

    # -- access -------------------------------------------------------------------

    def slice(self, addr: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest memory [addr, addr+length)."""
        off = self._offset(addr, length)
        return self._view[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        """Copy length bytes from guest memory."""
        off = self._offset(addr, length)
        return self._mmap[off:off + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy data into guest memory at addr."""
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        off = self._offset(addr, length)
        self._view[off:off + length] = data

    def read_into(self, addr: int, buf: bytearray | memoryview) -> None:
        """Fill buf from guest memory at addr."""
        mv = memoryview(buf).cast("B")
        off = self._offset(addr, mv.nbytes)
        mv[:] = self._view[off:off + mv.nbytes]

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set [addr, addr+length) to one byte value (e.g. zeroing a BSS)."""
        off = self._offset(addr, length)
        self._mmap[off:off + length] = bytes([byte]) * length

    # Integer accessors. Naturally aligned ones are single native loads and stores
    # (memoryview.cast): another process or thread sharing the memfd (a device process,
    # the guest's vCPUs) never sees a half-written value. struct.pack_into writes byte by
    # byte, so it is only the fallback for unaligned fields. Guest and host are x86-64,
    # both little-endian, so native order is the guest's.

    def _read_int(self, addr: int, size: int, code: str, fmt: struct.Struct) -> int:
        off = self._offset(addr, size)
        if off % size:
            return fmt.unpack_from(self._mmap, off)[0]
        return self._view[off:off + size].cast(code)[0]

    def _write_int(self, addr: int, size: int, code: str, fmt: struct.Struct,
                   value: int) -> None:
        off = self._offset(addr, size)
        if off % size:
            fmt.pack_into(self._mmap, off, value)
        else:
            self._view[off:off + size].cast(code)[0] = value

    def read_u8(self, addr: int) -> int:
        return self._view[self._offset(addr, 1)]

    def read_u16(self, addr: int) -> int:
        return self._read_int(addr, 2, "H", _U16)

    def read_u32(self, addr: int) -> int:
        return self._read_int(addr, 4, "I", _U32)

    def read_u64(self, addr: int) -> int:
        return self._read_int(addr, 8, "Q", _U64)

    def write_u8(self, addr: int, value: int) -> None:
        self._view[self._offset(addr, 1)] = value

    def write_u16(self, addr: int, value: int) -> None:
        self._write_int(addr, 2, "H", _U16, value)

    def write_u32(self, addr: int, value: int) -> None:
        self._write_int(addr, 4, "I", _U32, value)

    def write_u64(self, addr: int, value: int) -> None:
        self._write_int(addr, 8, "Q", _U64, value)

    def unpack_from(self, fmt: struct.Struct, addr: int) -> tuple:
        """struct.unpack a guest structure in place (bounds-checked)."""
        return fmt.unpack_from(self._mmap, self._offset(addr, fmt.size))

    def pack_into(self, fmt: struct.Struct, addr: int, *values: object) -> None:
        """struct.pack a guest structure in place (bounds-checked)."""
        fmt.pack_into(self._mmap, self._offset(addr, fmt.size), *values)

    def scatter_slices(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Views for a list of (addr, length) guest buffers, e.g. a descriptor chain."""
        return [self.slice(a, n) for a, n in ranges]

    def close(self) -> None:
        """Unmap and close the memfd. Idempotent; if views handed out are still alive the
        mapping stays until they go (garbage collection unmaps it), the fd is closed."""
        if self.fd < 0:
            return
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
