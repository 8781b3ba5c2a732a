"""GuestMemory: layout around the MMIO hole, bounds checks, zero-copy views, sharing."""

import mmap
import os

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.errors import GuestMemoryError
from vmmcore.memory import GuestMemory

MiB = 1024 * 1024


@pytest.fixture
def mem():
    with GuestMemory([(0, 4 * MiB), (16 * MiB, 2 * MiB)]) as m:
        yield m


def test_regions_are_laid_end_to_end_in_the_memfd(mem):
    assert [(r.guest_addr, r.size, r.file_offset) for r in mem.regions] == [
        (0, 4 * MiB, 0), (16 * MiB, 2 * MiB, 4 * MiB)]
    assert mem.size == 6 * MiB
    assert os.fstat(mem.fd).st_size == 6 * MiB


def test_ram_ranges_split_around_the_hole():
    assert layout.ram_ranges(256 * MiB) == [(0, 256 * MiB)]
    big = 4 * 1024 * MiB
    assert layout.ram_ranges(big) == [(0, layout.MMIO_HOLE_START),
                                      (layout.FOUR_GIB, big - layout.MMIO_HOLE_START)]
    with pytest.raises(ValueError):
        layout.ram_ranges(4095)


@pytest.mark.parametrize("addr,length", [
    (4 * MiB - 4, 8),          # straddles the end of a region
    (4 * MiB, 1),              # in the gap between regions
    (18 * MiB, 1),             # past the end
    (-1, 1),                   # negative
    (0, -1),                   # negative length
    (16 * MiB - 1, 2),         # starts in the gap
    (2**64 - 1, 2),            # wraps
])
def test_out_of_range_accesses_raise_one_error_type(mem, addr, length):
    with pytest.raises(GuestMemoryError):
        mem.read(addr, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(addr, b"\0" * length)
    with pytest.raises(GuestMemoryError):
        mem.slice(addr, length)
    assert not mem.is_valid_range(addr, length)


def test_integer_accessors_check_bounds(mem):
    mem.write_u64(4 * MiB - 8, 0x1122334455667788)
    assert mem.read_u64(4 * MiB - 8) == 0x1122334455667788
    assert mem.read_u32(4 * MiB - 4) == 0x11223344
    for fn in (mem.read_u8, mem.read_u16, mem.read_u32, mem.read_u64):
        with pytest.raises(GuestMemoryError):
            fn(4 * MiB)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(4 * MiB - 2, 1)


def test_slices_are_zero_copy_views(mem):
    view = mem.slice(16 * MiB + 100, 4)
    view[:] = b"abcd"
    assert mem.read(16 * MiB + 100, 4) == b"abcd"
    mem.write(16 * MiB + 101, b"Z")
    assert bytes(view) == b"aZcd"
    view.release()


def test_a_second_mapping_of_the_memfd_sees_the_same_bytes(mem):
    """What a sandboxed device process does: map the same memfd itself."""
    other = GuestMemory([(0, 4 * MiB), (16 * MiB, 2 * MiB)], fd=os.dup(mem.fd))
    try:
        mem.write(16 * MiB + 7, b"shared")
        assert other.read(16 * MiB + 7, 6) == b"shared"
    finally:
        other.close()


def test_adopting_a_too_small_fd_is_refused():
    fd = os.memfd_create("small")
    os.ftruncate(fd, mmap.PAGESIZE)
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 2 * mmap.PAGESIZE)], fd=fd)
    os.close(fd)


@pytest.mark.parametrize("ranges", [[], [(0, 100)], [(0, 8192), (4096, 8192)], [(1, 4096)]])
def test_bad_layouts_are_rejected(ranges):
    with pytest.raises(GuestMemoryError):
        GuestMemory(ranges)


def test_fill_and_read_into(mem):
    mem.fill(100, 10, 0xAB)
    buf = bytearray(10)
    mem.read_into(100, buf)
    assert buf == b"\xab" * 10


def test_an_impossible_size_is_a_clear_error_not_an_oserror():
    with pytest.raises(GuestMemoryError, match="cannot map"):
        GuestMemory([(0, 1 << 50)])


def test_the_memfd_is_sealed_against_shrinking_by_a_device_process():
    with GuestMemory([(0, 2 * mmap.PAGESIZE)]) as mem:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 0)
        mem.write_u8(mmap.PAGESIZE, 7)
        assert mem.read_u8(mmap.PAGESIZE) == 7


def test_close_with_a_live_view_still_closes_the_fd():
    mem = GuestMemory([(0, mmap.PAGESIZE)])
    view = mem.slice(0, 16)
    fd = mem.fd
    mem.close()
    mem.close()                       # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
    view.release()


def test_aligned_integer_writes_are_never_seen_half_done_by_another_process():
    """A device process polls a ring index while the other side updates it: an aligned
    write_u16 must be one store (struct.pack_into alone writes byte by byte)."""
    import time

    with GuestMemory([(0, mmap.PAGESIZE)]) as mem:
        mem.write_u16(64, 0x00FF)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the reader
            os.close(r)
            torn = 0
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                for _ in range(1000):
                    if mem.read_u16(64) not in (0x00FF, 0x0100):
                        torn += 1
            os.write(w, str(torn).encode())
            os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for _ in range(1000):
                mem.write_u16(64, 0x0100)
                mem.write_u16(64, 0x00FF)
        torn = int(os.read(r, 32))
        os.close(r)
        os.waitpid(pid, 0)
    assert torn == 0
