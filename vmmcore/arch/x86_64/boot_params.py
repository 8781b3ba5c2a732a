"""The Linux x86 "zero page" (struct boot_params) and the bzImage setup header.

Follows Documentation/arch/x86/boot.rst (64-bit boot protocol) and zero-page.rst. We do
not run the kernel's 16-bit setup code: the VMM is the boot loader, so it must copy the
kernel's own setup header into the zero page, fill in the loader-owned fields
(type_of_loader, cmd_line_ptr, ramdisk_*), and describe memory with an e820 table,
exactly what a BIOS+boot loader pair would have left behind.

The kernel image is hostile input (it may come from anywhere): every offset and size
read from it is checked before use and problems raise KernelLoadError, a ConfigError (exit status 2), so
the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmmcore.arch.x86_64 import layout
from vmmcore.errors import ConfigError


class KernelLoadError(ConfigError):
    """The kernel, initrd or command line cannot be loaded (bad image, does not fit).

    A ConfigError: the user named a file that cannot boot, so `vmm run` exits 2."""


ZERO_PAGE_SIZE = 4096

# Offsets inside struct boot_params (and, for the setup header, inside the bzImage file:
# the header sits at the same offset 0x1f1 in both).
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")          # addr, size, type (packed, 20 bytes)

SETUP_HEADER_OFFSET = 0x1F1
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_MIN_ALIGNMENT = 0x235
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260
HDR_MIN_END = 0x264          # a 2.12+ header (xloadflags, pref_address, init_size) ends here

HDRS_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55
MIN_BOOT_PROTOCOL = 0x020C   # 2.12: xloadflags, whose XLF_KERNEL_64 the 64-bit entry needs
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
TYPE_OF_LOADER_UNDEFINED = 0xFF   # "boot loader without an assigned id"
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF

E820_RAM = 1
E820_RESERVED = 2

# The BIOS/EBDA area, the VGA hole and the option-ROM/BIOS area: never RAM for the
# guest. The ACPI tables (ACPI_ADDR) and MP table (EBDA_START) live inside it.
LOW_RESERVED = (layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START)
# Address ranges in the MMIO hole that must be e820-reserved: the PCIe ECAM (Linux only
# trusts an MCFG window that the firmware also reserved) and KVM's identity-map page plus
# its three TSS pages (KVM_SET_IDENTITY_MAP_ADDR / KVM_SET_TSS_ADDR).
DEFAULT_RESERVED: tuple[tuple[int, int], ...] = (
    (layout.PCIE_ECAM_START, layout.PCIE_ECAM_SIZE),
    (layout.IDENTITY_MAP_ADDR, 4 * 4096),
)


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that the loader needs, validated."""

    raw: bytes                 # the header bytes 0x1f1 .. end, to copy into the zero page
    version: int
    setup_sects: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code (boot sector + setup) before the protected-mode kernel."""
        return (self.setup_sects + 1) * 512


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def _u32(data: bytes, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def _u64(data: bytes, off: int) -> int:
    return struct.unpack_from("<Q", data, off)[0]


def is_bzimage(data: bytes) -> bool:
    """True when data looks like a bzImage (has the "HdrS" magic at 0x202)."""
    return len(data) >= HDR_HEADER + 4 and data[HDR_HEADER:HDR_HEADER + 4] == HDRS_MAGIC


def parse_setup_header(data: bytes) -> SetupHeader:
    """Parse and validate a bzImage's setup header; data is the whole image file.

    We only support what the 64-bit entry needs: boot protocol >= 2.12 with
    XLF_KERNEL_64, a sane setup_sects, and a protected-mode payload that exists.
    """
    if len(data) < HDR_MIN_END:
        raise KernelLoadError(f"kernel image is truncated ({len(data)} bytes): too short "
                              "for a bzImage setup header")
    if data[HDR_HEADER:HDR_HEADER + 4] != HDRS_MAGIC:
        raise KernelLoadError("kernel image is not a bzImage: no 'HdrS' magic at 0x202")
    if _u16(data, HDR_BOOT_FLAG) != BOOT_FLAG_MAGIC:
        raise KernelLoadError("bzImage has a bad boot_flag (expected 0xaa55 at 0x1fe)")
    version = _u16(data, HDR_VERSION)
    if version < MIN_BOOT_PROTOCOL:
        raise KernelLoadError(
            f"bzImage boot protocol {version >> 8}.{version & 0xff:02d} is too old: the "
            "64-bit entry needs 2.12 or later")
    header_end = HDR_HEADER + data[HDR_JUMP + 1]     # 0x202 + byte at 0x201
    if header_end < HDR_MIN_END:
        raise KernelLoadError(f"bzImage setup header ends at {header_end:#x}, before the "
                              f"2.12 fields ({HDR_MIN_END:#x})")
    setup_sects = _u8(data, HDR_SETUP_SECTS) or 4       # 0 means 4 (boot.rst)
    setup_size = (setup_sects + 1) * 512
    if header_end > setup_size or header_end > ZERO_PAGE_SIZE:
        raise KernelLoadError(f"bzImage setup header (ends {header_end:#x}) does not fit in "
                              f"its setup area ({setup_size:#x} bytes)")
    if setup_size >= len(data):
        raise KernelLoadError(
            f"bzImage is truncated or setup_sects={setup_sects} is absurd: setup area "
            f"{setup_size:#x} bytes, file {len(data):#x} bytes, no protected-mode kernel")
    xloadflags = _u16(data, HDR_XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise KernelLoadError("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")
    if not _u8(data, HDR_LOADFLAGS) & LOADED_HIGH:
        raise KernelLoadError("bzImage is a zImage (LOADED_HIGH not set): unsupported")
    alignment = _u32(data, HDR_KERNEL_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1) or alignment > 1 << 30:
        raise KernelLoadError(f"bzImage kernel_alignment {alignment:#x} is not a sane "
                              "power of two")
    min_alignment = _u8(data, HDR_MIN_ALIGNMENT)
    if min_alignment > 30:
        raise KernelLoadError(f"bzImage min_alignment 2^{min_alignment} is absurd")
    return SetupHeader(
        raw=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        version=version,
        setup_sects=setup_sects,
        loadflags=_u8(data, HDR_LOADFLAGS),
        initrd_addr_max=_u32(data, HDR_INITRD_ADDR_MAX),
        kernel_alignment=alignment,
        relocatable=bool(_u8(data, HDR_RELOCATABLE)),
        min_alignment=min_alignment,
        xloadflags=xloadflags,
        cmdline_size=_u32(data, HDR_CMDLINE_SIZE),
        pref_address=_u64(data, HDR_PREF_ADDRESS),
        init_size=_u32(data, HDR_INIT_SIZE),
    )


@dataclass(frozen=True)
class E820Entry:
    """One e820 range as Linux sees it."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def _subtract(ranges: list[tuple[int, int]], hole: tuple[int, int]) -> list[tuple[int, int]]:
    """Remove [hole_start, hole_end) from a list of [start, end) ranges."""
    h0, h1 = hole
    out = []
    for r0, r1 in ranges:
        if h1 <= r0 or h0 >= r1:
            out.append((r0, r1))
            continue
        if r0 < h0:
            out.append((r0, h0))
        if h1 < r1:
            out.append((h1, r1))
    return out


def build_e820(mem_size: int,
               reserved: Iterable[tuple[int, int]] = DEFAULT_RESERVED) -> list[E820Entry]:
    """The guest's e820 map: RAM from layout.ram_ranges minus reserved areas, sorted.

    The low area 0x9fc00-0x100000 (EBDA, VGA, ROMs, where our ACPI and MP tables live) is
    always reserved; `reserved` adds ranges (outside or inside RAM) that Linux must not
    use or must see as firmware-claimed (ECAM, KVM's TSS/identity map).
    """
    if mem_size < layout.HIGH_MEMORY_START:
        raise KernelLoadError(f"guest memory {mem_size:#x} is below the 1 MiB minimum")
    holes = [(LOW_RESERVED[0], LOW_RESERVED[0] + LOW_RESERVED[1])]
    holes += [(a, a + s) for a, s in reserved if s > 0]
    ram = [(a, a + s) for a, s in layout.ram_ranges(mem_size)]
    for hole in holes:
        ram = _subtract(ram, hole)
    entries = [E820Entry(a, b - a, E820_RAM) for a, b in ram]
    entries += [E820Entry(a, b - a, E820_RESERVED) for a, b in _merge(holes)]
    entries.sort(key=lambda e: e.addr)
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise KernelLoadError(f"e820 map has {len(entries)} entries; the zero page holds "
                              f"{E820_MAX_ENTRIES_ZEROPAGE}")
    return entries


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping or touching [start, end) ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def build_zero_page(header: bytes | None, *, cmdline_addr: int, e820: Sequence[E820Entry],
                    initrd: tuple[int, int] | None = None, acpi_rsdp_addr: int = 0,
                    cmdline_size: int | None = None) -> bytearray:
    """A 4 KiB struct boot_params ready to copy to layout.ZERO_PAGE_ADDR.

    header is the kernel's setup header bytes (from 0x1f1) for a bzImage, or None for an
    ELF kernel, in which case we synthesize the few header fields an ELF-booted Linux
    reads (boot_flag, HdrS, version, kernel_alignment, cmdline_size) as crosvm does.
    """
    zp = bytearray(ZERO_PAGE_SIZE)
    if header is not None:
        zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(header)] = header
    else:
        struct.pack_into("<H", zp, HDR_BOOT_FLAG, BOOT_FLAG_MAGIC)
        zp[HDR_HEADER:HDR_HEADER + 4] = HDRS_MAGIC
        struct.pack_into("<H", zp, HDR_VERSION, MIN_BOOT_PROTOCOL)
        struct.pack_into("<I", zp, HDR_KERNEL_ALIGNMENT, 0x100_0000)
        zp[HDR_LOADFLAGS] = LOADED_HIGH
        struct.pack_into("<I", zp, HDR_INITRD_ADDR_MAX, DEFAULT_INITRD_ADDR_MAX)
    if cmdline_size is not None:
        struct.pack_into("<I", zp, HDR_CMDLINE_SIZE, cmdline_size)
    zp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    # No real-mode setup code runs, so no heap; keep LOADED_HIGH as the kernel set it.
    zp[HDR_LOADFLAGS] = (zp[HDR_LOADFLAGS] | LOADED_HIGH) & ~CAN_USE_HEAP & 0xFF
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    addr, size = initrd if initrd else (0, 0)
    struct.pack_into("<I", zp, HDR_RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, HDR_RAMDISK_SIZE, size & 0xFFFF_FFFF)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
    struct.pack_into("<I", zp, BP_EXT_RAMDISK_SIZE, size >> 32)
    struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, acpi_rsdp_addr)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise KernelLoadError(f"too many e820 entries ({len(e820)})")
    zp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        E820_ENTRY.pack_into(zp, BP_E820_TABLE + i * E820_ENTRY.size, e.addr, e.size, e.type)
    zp[BP_SENTINEL] = 0     # non-zero tells Linux the loader did not clear the page
    return zp


def parse_e820(zero_page: bytes) -> list[E820Entry]:
    """Read the e820 table back from a zero page (used by tests and diagnostics)."""
    n = min(zero_page[BP_E820_ENTRIES], E820_MAX_ENTRIES_ZEROPAGE)
    return [E820Entry(*E820_ENTRY.unpack_from(zero_page, BP_E820_TABLE + i * E820_ENTRY.size))
            for i in range(n)]
