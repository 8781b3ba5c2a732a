"""load_kernel on synthesized bzImages and ELF64 images, well-formed and hostile.

Hostile images must give a KernelLoadError (a VmmError) with a clear message: never a
traceback, never a write outside guest RAM.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_boot_images import EHDR, PHDR, make_bzimage, make_elf

from vmmcore.arch.x86_64 import boot_params as bp
from vmmcore.arch.x86_64 import layout
from vmmcore.arch.x86_64.linux_loader import LoadedKernel, load_kernel
from vmmcore.errors import VmmError
from vmmcore.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30
MEM = 64 * MiB


@pytest.fixture
def mem():
    with GuestMemory(layout.ram_ranges(MEM)) as m:
        yield m


def load(mem: GuestMemory, tmp_path, image: bytes, *, cmdline: str = "console=ttyS0",
         initrd: bytes | None = None, mem_size: int = MEM) -> LoadedKernel:
    k = tmp_path / "kernel"
    k.write_bytes(image)
    rd = None
    if initrd is not None:
        rd = tmp_path / "initrd"
        rd.write_bytes(initrd)
    return load_kernel(mem, k, cmdline, rd, mem_size)


def zero_page(mem: GuestMemory) -> bytes:
    return mem.read(layout.ZERO_PAGE_ADDR, 4096)


# -- bzImage --------------------------------------------------------------------------------

def test_bzimage_goes_to_pref_address_with_entry_at_0x200(mem, tmp_path):
    payload = bytes(range(256)) * 40
    k = load(mem, tmp_path, make_bzimage(payload=payload))
    assert (k.kind, k.load_addr, k.entry) == ("bzimage", 0x100_0000, 0x100_0200)
    assert mem.read(0x100_0000, len(payload)) == payload
    assert k.kernel_end == 0x100_0000 + 0x40_0000


def test_relocatable_bzimage_without_usable_pref_address_goes_to_kernel_start(mem, tmp_path):
    img = make_bzimage(pref_address=0x1000, init_size=0x10_0000)
    k = load(mem, tmp_path, img)
    assert k.load_addr == layout.KERNEL_START
    assert k.entry == layout.KERNEL_START + 0x200


def test_relocatable_fallback_respects_kernel_alignment(mem, tmp_path):
    img = make_bzimage(pref_address=0, alignment=0x40_0000, min_alignment=22,
                       init_size=0x10_0000)
    assert load(mem, tmp_path, img).load_addr == 0x40_0000


def test_relocatable_kernel_runs_at_pref_address_so_it_must_fit_there(mem, tmp_path):
    # Linux decompresses to max(load address, LOAD_PHYSICAL_ADDR == pref_address).
    with pytest.raises(bp.KernelLoadError, match="needs guest RAM up to 0x30100000"):
        load(mem, tmp_path, make_bzimage(pref_address=0x3000_0000, init_size=0x10_0000))


def test_non_relocatable_bzimage_only_at_pref_address(mem, tmp_path):
    k = load(mem, tmp_path, make_bzimage(relocatable=0, pref_address=0x80_0000,
                                         min_alignment=12))
    assert k.load_addr == 0x80_0000
    with pytest.raises(bp.KernelLoadError, match="needs guest RAM"):
        load(mem, tmp_path, make_bzimage(relocatable=0, pref_address=0x1_0000_0000))
    with pytest.raises(bp.KernelLoadError, match="non-relocatable"):
        load(mem, tmp_path, make_bzimage(relocatable=0, pref_address=0x1000))


def test_initrd_sits_page_aligned_at_the_top_below_initrd_addr_max(mem, tmp_path):
    k = load(mem, tmp_path, make_bzimage(initrd_addr_max=0x27F_FFFF), initrd=b"R" * 5000)
    assert k.initrd_addr == (0x280_0000 - 5000) & ~0xFFF
    zp = zero_page(mem)
    assert struct.unpack_from("<II", zp, bp.HDR_RAMDISK_IMAGE) == (k.initrd_addr, 5000)
    assert mem.read(k.initrd_addr, 5000) == b"R" * 5000


def test_initrd_that_would_overlap_the_kernel_is_refused(mem, tmp_path):
    with pytest.raises(bp.KernelLoadError, match="initrd .* does not fit"):
        load(mem, tmp_path, make_bzimage(initrd_addr_max=0x13F_FFFF), initrd=b"R" * 4096)


def test_missing_files_are_clear_errors(mem, tmp_path):
    with pytest.raises(bp.KernelLoadError, match="cannot read kernel"):
        load_kernel(mem, tmp_path / "nope", "", None, MEM)
    with pytest.raises(bp.KernelLoadError, match="cannot read kernel"):
        load_kernel(mem, tmp_path, "", None, MEM)     # a directory
    (tmp_path / "k").write_bytes(make_bzimage())
    with pytest.raises(bp.KernelLoadError, match="cannot read initrd"):
        load_kernel(mem, tmp_path / "k", "", tmp_path / "nope", MEM)


@pytest.mark.parametrize("cmdline,match", [
    ("a" * 2048, "2048 bytes; the limit is 2047"),
    ("root=/dev/vda\0init=/evil", "NUL"),
    ("caf\u00e9", "ASCII"),
])
def test_bad_command_lines(mem, tmp_path, cmdline, match):
    with pytest.raises(bp.KernelLoadError, match=match):
        load(mem, tmp_path, make_bzimage(), cmdline=cmdline)


def test_cmdline_size_is_capped_by_our_buffer(mem, tmp_path):
    img = make_bzimage(cmdline_size=0xFFFF_FFFF)
    load(mem, tmp_path, img, cmdline="a" * (layout.CMDLINE_MAX_SIZE - 1))
    with pytest.raises(bp.KernelLoadError, match="command line"):
        load(mem, tmp_path, img, cmdline="a" * layout.CMDLINE_MAX_SIZE)


@pytest.mark.parametrize("image,match", [
    (b"", "neither"),
    (b"MZ" + bytes(1000), "neither"),
    (make_bzimage()[:0x230], "truncated"),
    (make_bzimage().replace(b"HdrS", b"HdrX"), "neither"),
    (make_bzimage(payload=b""), "no protected-mode kernel"),
    (make_bzimage(payload=b"x" * 100)[:0x1F1] + b"\xff" + make_bzimage(payload=b"x" * 100)[0x1F2:],
     "setup_sects=255 is absurd"),
    (make_bzimage(version=0x0206), "too old"),
    (make_bzimage(xloadflags=0), "XLF_KERNEL_64"),
    (make_bzimage(alignment=0), "kernel_alignment"),
    (make_bzimage(alignment=0x30_0000), "kernel_alignment"),
    (make_bzimage(min_alignment=200), "min_alignment"),
    (make_bzimage(header_len_byte=0x10), "before the 2.12 fields"),
    (make_bzimage(init_size=0xFFFF_FFFF), "needs guest RAM"),
    (make_bzimage(pref_address=0xFFFF_FFFF_FFFF_F000, relocatable=0), "needs guest RAM"),
], ids=lambda v: v if isinstance(v, str) else f"{len(v)}b")
def test_hostile_bzimages(mem, tmp_path, image, match):
    with pytest.raises(bp.KernelLoadError, match=match):
        load(mem, tmp_path, image)


def test_bad_boot_flag(mem, tmp_path):
    img = bytearray(make_bzimage())
    img[0x1FE] = 0
    with pytest.raises(bp.KernelLoadError, match="boot_flag"):
        load(mem, tmp_path, bytes(img))


def test_zimage_without_loaded_high(mem, tmp_path):
    img = bytearray(make_bzimage())
    img[bp.HDR_LOADFLAGS] = 0
    with pytest.raises(bp.KernelLoadError, match="LOADED_HIGH"):
        load(mem, tmp_path, bytes(img))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches=st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)),
                        max_size=12))
def test_fuzzed_headers_load_or_fail_cleanly(mem, tmp_path, patches):
    img = bytearray(make_bzimage())
    for off, val in patches:
        img[off] = val
    try:
        k = load(mem, tmp_path, bytes(img))
    except VmmError:
        return
    assert layout.HIGH_MEMORY_START <= k.load_addr < k.kernel_end <= MEM


# -- ELF ------------------------------------------------------------------------------------

def test_elf_segments_loaded_bss_zeroed_zero_page_written(mem, tmp_path):
    mem.fill(0x20_0000, 0x10000, 0xAA)
    text = b"\xf4" * 100
    img = make_elf([{"paddr": 0x20_0000, "data": text},
                    {"paddr": 0x20_1000, "data": b"DATA", "memsz": 0x2000}],
                   entry=0x20_0010)
    k = load(mem, tmp_path, img, cmdline="hello", initrd=b"I" * 100)
    assert (k.kind, k.entry, k.load_addr, k.kernel_end) == ("elf", 0x20_0010, 0x20_0000,
                                                            0x20_3000)
    assert mem.read(0x20_0000, 100) == text
    assert mem.read(0x20_1000, 4) == b"DATA"
    assert mem.read(0x20_1004, 0x2000 - 4) == bytes(0x2000 - 4)    # bss
    assert k.boot_params_addr == layout.ZERO_PAGE_ADDR
    zp = zero_page(mem)
    assert zp[bp.HDR_HEADER:bp.HDR_HEADER + 4] == b"HdrS"
    assert zp[bp.HDR_TYPE_OF_LOADER] == 0xFF
    assert struct.unpack_from("<I", zp, bp.HDR_CMD_LINE_PTR)[0] == layout.CMDLINE_ADDR
    assert struct.unpack_from("<I", zp, bp.HDR_CMDLINE_SIZE)[0] == layout.CMDLINE_MAX_SIZE - 1
    assert mem.read(layout.CMDLINE_ADDR, 6) == b"hello\0"
    assert bp.parse_e820(zp) == bp.build_e820(MEM)
    assert k.initrd_addr >= k.kernel_end
    assert mem.read(k.initrd_addr, 100) == b"I" * 100


def test_elf_virtual_entry_is_translated_to_physical(mem, tmp_path):
    img = make_elf([{"paddr": 0x100_0000, "vaddr": 0xFFFF_FFFF_8100_0000, "data": b"x" * 64}],
                   entry=0xFFFF_FFFF_8100_0020)
    assert load(mem, tmp_path, img).entry == 0x100_0020


def test_elf_physical_entry_like_vmlinux_is_kept(mem, tmp_path):
    # vmlinux: ENTRY(phys_startup_64), so e_entry is already physical.
    img = make_elf([{"paddr": 0x100_0000, "vaddr": 0xFFFF_FFFF_8100_0000, "data": b"x" * 64}],
                   entry=0x100_0000)
    assert load(mem, tmp_path, img).entry == 0x100_0000


def test_elf_non_load_and_empty_segments_are_skipped(mem, tmp_path):
    img = make_elf([{"paddr": 0, "data": b"note", "type": 4},
                    {"paddr": 0x10, "data": b"", "memsz": 0},
                    {"paddr": 0x20_0000, "data": b"\xf4"}])
    assert load(mem, tmp_path, img).entry == 0x20_0000


def test_elf_segment_overlapping_the_mmio_hole(tmp_path):
    size = 3 * GiB + 64 * MiB
    with GuestMemory(layout.ram_ranges(size)) as m:
        img = make_elf([{"paddr": layout.MMIO_HOLE_START - 0x1000, "data": b"x" * 16,
                         "memsz": 0x2000}], entry=layout.MMIO_HOLE_START - 0x1000)
        with pytest.raises(bp.KernelLoadError, match="overlaps the MMIO hole"):
            load(m, tmp_path, img, mem_size=size)
        img = make_elf([{"paddr": layout.FOUR_GIB, "data": b"x"}], entry=layout.FOUR_GIB)
        with pytest.raises(bp.KernelLoadError, match="MMIO hole"):
            load(m, tmp_path, img, mem_size=size)


@pytest.mark.parametrize("segments,kw,match", [
    ([{"paddr": MEM - 0x1000, "data": b"x", "memsz": 0x2000}], {}, "outside guest RAM"),
    ([{"paddr": 0x20_0000, "data": b"x", "memsz": 1 << 63}], {}, "MMIO hole"),
    ([{"paddr": 0xFFFF_FFFF_FFFF_F000, "data": b"x"}], {}, "MMIO hole"),
    ([{"paddr": 0x7000, "data": b"x"}], {}, "below 1 MiB"),
    ([{"paddr": 0x20_0000, "data": b"x", "filesz": 0x1000_0000, "memsz": 0x1000_0000}], {},
     "beyond the end of the file"),
    ([{"paddr": 0x20_0000, "data": b"xx", "memsz": 1}], {}, "filesz 0x2 > memsz 0x1"),
    ([{"paddr": 0x20_0000, "data": b"x", "offset": 1 << 62}], {}, "beyond the end"),
    ([{"paddr": 0x20_0000, "data": b"x" * 0x2000},
      {"paddr": 0x20_1000, "data": b"y"}], {}, "overlap"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"entry": 0x90_0000}, "entry point"),
    ([{"paddr": 0x20_0000, "data": b"x", "type": 4}], {}, "no loadable"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"machine": 3}, "not x86-64"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"e_type": 3}, "ET_EXEC"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"elf_class": 1}, "64-bit"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"phnum": 0xFFFF}, "program header count"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"phnum": 200}, "beyond the end of the file"),
    ([{"paddr": 0x20_0000, "data": b"x"}], {"phoff": 1 << 60}, "beyond the end of the file"),
])
def test_hostile_elf_images(mem, tmp_path, segments, kw, match):
    kw.setdefault("entry", 0x20_0000)
    with pytest.raises(bp.KernelLoadError, match=match):
        load(mem, tmp_path, make_elf(segments, **kw))


def test_truncated_elf_header(mem, tmp_path):
    img = make_elf([{"paddr": 0x20_0000, "data": b"x"}])
    for n in (4, 20, EHDR.size - 1, EHDR.size + PHDR.size - 1):
        with pytest.raises(bp.KernelLoadError):
            load(mem, tmp_path, img[:n])


def test_hostile_elf_writes_nothing(mem, tmp_path):
    """Validation happens before any byte is copied: a bad second segment leaves RAM."""
    mem.fill(0x20_0000, 0x1000, 0x55)
    img = make_elf([{"paddr": 0x20_0000, "data": b"x" * 16},
                    {"paddr": MEM, "data": b"y"}])
    with pytest.raises(bp.KernelLoadError):
        load(mem, tmp_path, img)
    assert mem.read(0x20_0000, 16) == b"\x55" * 16


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches=st.lists(st.tuples(st.integers(0, EHDR.size + 2 * PHDR.size - 1),
                                  st.integers(0, 255)), max_size=12))
def test_fuzzed_elf_headers_load_or_fail_cleanly(mem, tmp_path, patches):
    img = bytearray(make_elf([{"paddr": 0x20_0000, "data": b"x" * 64},
                              {"paddr": 0x30_0000, "data": b"y" * 64, "memsz": 0x1000}]))
    for off, val in patches:
        img[off] = val
    try:
        k = load(mem, tmp_path, bytes(img))
    except VmmError:
        return
    assert layout.HIGH_MEMORY_START <= k.entry < k.kernel_end <= MEM
