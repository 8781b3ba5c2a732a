"""SystemAllocator: aligned first-fit allocation, release, exhaustion and conflicts."""

import pytest

from vmmcore.allocator import AddressPool, IdPool, align_up
from vmmcore.arch.x86_64 import layout
from vmmcore.errors import AllocationError

MiB = 1024 * 1024


def test_align_up():
    assert align_up(0, 4096) == 0
    assert align_up(1, 4096) == 4096
    assert align_up(4096, 4096) == 4096


def test_allocations_are_aligned_and_disjoint():
    pool = AddressPool("p", 0x1000, 0x10000)
    a = pool.allocate(0x100, "a", align=0x1000)
    b = pool.allocate(0x2000, "b", align=0x2000)
    c = pool.allocate(0x10, "c")
    assert a == 0x1000 and b % 0x2000 == 0 and b >= a + 0x100
    spans = sorted((x.base, x.base + x.size) for x in pool.allocations())
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:], strict=False))
    assert c == 0x1100          # first fit fills the gap after a


def test_release_makes_space_reusable():
    pool = AddressPool("p", 0, 0x3000)
    a = pool.allocate(0x1000, "a")
    pool.allocate(0x2000, "b")
    with pytest.raises(AllocationError, match="exhausted"):
        pool.allocate(0x1000, "c")
    assert pool.release(a).tag == "a"
    assert pool.allocate(0x1000, "c") == a
    with pytest.raises(AllocationError, match="nothing allocated"):
        pool.release(0x123)


def test_exhaustion_message_names_pool_and_requester():
    pool = AddressPool("low_mmio", 0, 0x1000)
    with pytest.raises(AllocationError, match=r"low_mmio exhausted.*for gpu"):
        pool.allocate(0x2000, "gpu")


@pytest.mark.parametrize("size,align", [(0, 1), (-1, 1), (16, 3), (16, 0)])
def test_bad_requests(size, align):
    with pytest.raises(AllocationError):
        AddressPool("p", 0, 0x1000).allocate(size, "x", align)


def test_allocate_at_checks_range_and_overlap():
    pool = AddressPool("p", 0x1000, 0x1000)
    pool.allocate_at(0x1800, 0x100, "bar")
    with pytest.raises(AllocationError, match="overlaps bar"):
        pool.allocate_at(0x17F0, 0x20, "other")
    with pytest.raises(AllocationError, match="outside"):
        pool.allocate_at(0x1F00, 0x200, "other")


def test_id_pool():
    pool = IdPool("gsi", 16, 18)
    assert [pool.allocate("d") for _ in range(3)] == [16, 17, 18]
    with pytest.raises(AllocationError, match="gsi exhausted"):
        pool.allocate("e")
    pool.release(17)
    assert pool.allocate("f") == 17
    with pytest.raises(AllocationError, match="taken by"):
        pool.reserve(16, "g")
    with pytest.raises(AllocationError, match="outside"):
        pool.reserve(99, "g")
    with pytest.raises(AllocationError):
        pool.release(99)


def test_layout_pools_do_not_overlap_ram_or_each_other():
    mem_size = 6 * 1024 * MiB
    alloc = layout.system_allocator(mem_size)
    assert alloc.low_mmio.end <= layout.PCIE_ECAM_START
    assert alloc.high_mmio.base >= layout.ram_end(mem_size)
    low = alloc.allocate_mmio(0x4000, "bar0")
    high = alloc.allocate_mmio(1 << 32, "big", prefer_high=True)
    assert low % 0x4000 == 0 and layout.LOW_MMIO_START <= low < layout.PCIE_ECAM_START
    assert high % (1 << 32) == 0 and high >= layout.FOUR_GIB
    alloc.release_mmio(low)
    alloc.release_mmio(high)
    assert alloc.gsi.allocate("dev") == layout.FIRST_ALLOCATABLE_GSI
    assert alloc.pci_devices.allocate("dev") == 1
