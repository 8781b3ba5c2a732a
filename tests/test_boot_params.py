"""The zero page and e820 map, checked against the Linux boot protocol on Debian's
real bzImage (Documentation/arch/x86/boot.rst, zero-page.rst)."""

from __future__ import annotations

import struct

import pytest
from debian_kernel import KernelUnavailable, debian_kernel  # noqa: F401 - pytest fixture

from vmmcore.arch.x86_64 import boot_params as bp
from vmmcore.arch.x86_64 import layout
from vmmcore.arch.x86_64.linux_loader import load_kernel
from vmmcore.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30


def u8(b: bytes, off: int) -> int:
    return b[off]


def u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


@pytest.fixture
def mem512():
    with GuestMemory(layout.ram_ranges(512 * MiB)) as m:
        yield m


# -- e820 ----------------------------------------------------------------------------------

def check_e820_sane(e820: list[bp.E820Entry], mem_size: int) -> None:
    """Sorted, non-overlapping, RAM exactly = guest RAM minus the reserved areas."""
    for a, b in zip(e820, e820[1:], strict=False):
        assert a.end <= b.addr, f"e820 entries overlap or are unsorted: {a} {b}"
    ram = [e for e in e820 if e.type == bp.E820_RAM]
    for e in ram:
        assert not (e.addr < 0x100000 and e.end > 0x9FC00), "low reserved area used as RAM"
        assert any(r0 <= e.addr and e.end <= r0 + rs for r0, rs in layout.ram_ranges(mem_size))
    assert sum(e.size for e in ram) == mem_size - (0x100000 - 0x9FC00)


@pytest.mark.parametrize("mem_size", [2 * MiB, 512 * MiB, 3 * GiB, 3 * GiB + 4096,
                                      8 * GiB])
def test_e820_covers_ram_around_the_low_area_and_the_hole(mem_size):
    e820 = bp.build_e820(mem_size)
    check_e820_sane(e820, mem_size)
    assert e820[0] == bp.E820Entry(0, 0x9FC00, bp.E820_RAM)
    assert bp.E820Entry(0x9FC00, 0x100000 - 0x9FC00, bp.E820_RESERVED) in e820
    assert bp.E820Entry(layout.PCIE_ECAM_START, layout.PCIE_ECAM_SIZE,
                        bp.E820_RESERVED) in e820
    if mem_size > layout.MMIO_HOLE_START:
        assert e820[-1] == bp.E820Entry(layout.FOUR_GIB, mem_size - layout.MMIO_HOLE_START,
                                        bp.E820_RAM)
        assert any(e.end == layout.MMIO_HOLE_START and e.type == bp.E820_RAM for e in e820)


def test_e820_rejects_less_than_one_mib():
    with pytest.raises(bp.KernelLoadError, match="1 MiB"):
        bp.build_e820(512 * 1024)


def test_zero_page_roundtrips_e820_and_sets_loader_fields():
    e820 = bp.build_e820(64 * MiB)
    zp = bp.build_zero_page(None, cmdline_addr=layout.CMDLINE_ADDR, e820=e820,
                            initrd=(0x300_0000, 0x1234), cmdline_size=4095,
                            acpi_rsdp_addr=layout.ACPI_ADDR)
    assert len(zp) == 4096
    assert bp.parse_e820(zp) == e820
    assert zp[bp.HDR_TYPE_OF_LOADER] == 0xFF
    assert u32(zp, bp.HDR_CMD_LINE_PTR) == layout.CMDLINE_ADDR
    assert u32(zp, bp.BP_EXT_CMD_LINE_PTR) == 0
    assert (u32(zp, bp.HDR_RAMDISK_IMAGE), u32(zp, bp.HDR_RAMDISK_SIZE)) == (0x300_0000, 0x1234)
    assert u32(zp, bp.HDR_CMDLINE_SIZE) == 4095
    assert u64(zp, bp.BP_ACPI_RSDP_ADDR) == layout.ACPI_ADDR
    assert zp[bp.HDR_HEADER:bp.HDR_HEADER + 4] == b"HdrS"
    assert u16(zp, bp.HDR_BOOT_FLAG) == 0xAA55
    assert zp[bp.BP_SENTINEL] == 0


# -- Debian's real bzImage ------------------------------------------------------------------

def test_debian_setup_header_is_understood(debian_kernel):  # noqa: F811
    data = debian_kernel.vmlinuz.read_bytes()
    hdr = bp.parse_setup_header(data)
    assert hdr.version >= 0x020C
    assert hdr.xloadflags & bp.XLF_KERNEL_64
    assert hdr.relocatable
    assert hdr.kernel_alignment & (hdr.kernel_alignment - 1) == 0
    assert hdr.cmdline_size >= 255
    assert hdr.init_size > len(data) - hdr.setup_size
    assert hdr.raw == data[0x1F1:0x202 + data[0x201]]


def test_debian_bzimage_loads_per_boot_protocol(debian_kernel, mem512, tmp_path):  # noqa: F811
    data = debian_kernel.vmlinuz.read_bytes()
    hdr = bp.parse_setup_header(data)
    initrd = tmp_path / "initrd.img"
    initrd_bytes = bytes(range(256)) * 4099          # deliberately not page-sized
    initrd.write_bytes(initrd_bytes)
    cmdline = "console=ttyS0 panic=-1 quiet"
    k = load_kernel(mem512, debian_kernel.vmlinuz, cmdline, initrd, 512 * MiB)

    # Kernel: the protected-mode part, at pref_address (aligned), 64-bit entry at +0x200.
    assert k.kind == "bzimage"
    assert k.load_addr == hdr.pref_address
    assert k.load_addr % hdr.kernel_alignment == 0
    assert k.entry == k.load_addr + 0x200
    assert mem512.read(k.load_addr, 4096) == data[hdr.setup_size:hdr.setup_size + 4096]
    tail = len(data) - hdr.setup_size
    assert mem512.read(k.load_addr + tail - 4096, 4096) == data[-4096:]
    assert k.kernel_end >= k.load_addr + hdr.init_size
    assert k.boot_params_addr == layout.ZERO_PAGE_ADDR

    zp = mem512.read(layout.ZERO_PAGE_ADDR, 4096)
    # The setup header is the kernel's own, with only loader-owned fields changed.
    end = 0x202 + data[0x201]
    changed = {i for i in range(0x1F1, end) if zp[i] != data[i]}
    loader_owned = (set(range(bp.HDR_TYPE_OF_LOADER, bp.HDR_TYPE_OF_LOADER + 2))
                    | set(range(bp.HDR_RAMDISK_IMAGE, bp.HDR_RAMDISK_IMAGE + 8))
                    | set(range(bp.HDR_HEAP_END_PTR, bp.HDR_HEAP_END_PTR + 2))
                    | set(range(bp.HDR_CMD_LINE_PTR, bp.HDR_CMD_LINE_PTR + 4)))
    assert changed <= loader_owned, sorted(hex(i) for i in changed - loader_owned)
    assert zp[bp.HDR_TYPE_OF_LOADER] == 0xFF
    assert zp[bp.HDR_LOADFLAGS] & bp.LOADED_HIGH
    assert not zp[bp.HDR_LOADFLAGS] & bp.CAN_USE_HEAP

    # Command line: NUL-terminated at CMDLINE_ADDR, within the kernel's cmdline_size.
    ptr = u32(zp, bp.HDR_CMD_LINE_PTR) | u32(zp, bp.BP_EXT_CMD_LINE_PTR) << 32
    assert ptr == layout.CMDLINE_ADDR
    assert mem512.read(ptr, len(cmdline) + 1) == cmdline.encode() + b"\0"

    # initrd: page aligned, above the kernel, below min(RAM, initrd_addr_max), intact.
    addr, size = u32(zp, bp.HDR_RAMDISK_IMAGE), u32(zp, bp.HDR_RAMDISK_SIZE)
    assert (addr, size) == (k.initrd_addr, len(initrd_bytes))
    assert addr % 4096 == 0 and addr >= k.kernel_end
    assert addr + size <= min(512 * MiB, hdr.initrd_addr_max + 1)
    assert 512 * MiB - (addr + size) < 4096, "initrd should sit as high as possible"
    assert mem512.read(addr, size) == initrd_bytes

    # e820: sane, and the kernel, zero page, cmdline and initrd all lie in RAM entries.
    e820 = bp.parse_e820(zp)
    check_e820_sane(e820, 512 * MiB)
    for a, n in [(k.load_addr, k.kernel_end - k.load_addr), (layout.ZERO_PAGE_ADDR, 4096),
                 (layout.CMDLINE_ADDR, len(cmdline) + 1), (addr, size)]:
        assert any(e.type == bp.E820_RAM and e.addr <= a and a + n <= e.end for e in e820)


def test_debian_cmdline_longer_than_cmdline_size_is_refused(debian_kernel, mem512):  # noqa: F811
    hdr = bp.parse_setup_header(debian_kernel.vmlinuz.read_bytes())
    load_kernel(mem512, debian_kernel.vmlinuz, "x" * hdr.cmdline_size, None, 512 * MiB)
    with pytest.raises(bp.KernelLoadError, match="command line"):
        load_kernel(mem512, debian_kernel.vmlinuz, "x" * (hdr.cmdline_size + 1), None,
                    512 * MiB)


def test_debian_kernel_in_too_little_memory_says_how_much(debian_kernel):  # noqa: F811
    with GuestMemory(layout.ram_ranges(32 * MiB)) as m, \
            pytest.raises(bp.KernelLoadError, match="needs guest RAM up to"):
        load_kernel(m, debian_kernel.vmlinuz, "", None, 32 * MiB)


def test_debian_initrd_that_does_not_fit_is_refused(debian_kernel, tmp_path):  # noqa: F811
    initrd = tmp_path / "big.img"
    with initrd.open("wb") as f:
        f.truncate(60 * MiB)
    with GuestMemory(layout.ram_ranges(128 * MiB)) as m, \
            pytest.raises(bp.KernelLoadError, match="does not fit"):
        load_kernel(m, debian_kernel.vmlinuz, "", initrd, 128 * MiB)


def test_debian_truncated_images_are_refused(debian_kernel, mem512, tmp_path):  # noqa: F811
    data = debian_kernel.vmlinuz.read_bytes()
    hdr = bp.parse_setup_header(data)
    for n in (0, 0x100, 0x203, 0x263, hdr.setup_size):
        p = tmp_path / f"cut{n}"
        p.write_bytes(data[:n])
        with pytest.raises(bp.KernelLoadError):
            load_kernel(mem512, p, "", None, 512 * MiB)


def test_debian_vmlinux_elf_loads_at_its_physical_addresses(debian_kernel, tmp_path):  # noqa: F811
    """The uncompressed vmlinux: e_entry is phys_startup_64, segments at p_paddr."""
    try:
        vmlinux = debian_kernel.vmlinux()
    except KernelUnavailable as e:
        pytest.skip(str(e))
    head = vmlinux.read_bytes()[:4096]
    e_entry, e_phoff = struct.unpack_from("<QQ", head, 24)
    phnum = struct.unpack_from("<H", head, 56)[0]
    loads = [struct.unpack_from("<IIQQQQQQ", head, e_phoff + i * 56) for i in range(phnum)]
    loads = [p for p in loads if p[0] == 1]
    with GuestMemory(layout.ram_ranges(256 * MiB)) as m:
        k = load_kernel(m, vmlinux, "console=ttyS0", None, 256 * MiB)
        assert k.kind == "elf"
        assert k.entry == e_entry < 1 << 32                    # already physical
        assert k.kernel_end == max(p[4] + p[6] for p in loads + [(0,) * 8]) + 0xFFF & ~0xFFF
        with vmlinux.open("rb") as f:
            for _t, _fl, off, _va, pa, filesz, _ms, _al in loads:
                f.seek(off)
                n = min(filesz, 4096)
                assert m.read(pa, n) == f.read(n)
        zp = m.read(layout.ZERO_PAGE_ADDR, 4096)
        check_e820_sane(bp.parse_e820(zp), 256 * MiB)
        assert u32(zp, bp.HDR_CMD_LINE_PTR) == layout.CMDLINE_ADDR
