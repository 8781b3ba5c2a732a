"""Load a Linux bzImage or an ELF64 kernel (vmlinux, our test guests) into guest RAM.

The VMM boots the kernel through the 64-bit boot protocol (Documentation/arch/x86/
boot.rst): there is no firmware and no real-mode setup code, so this module plays the
boot loader: it places the protected-mode kernel, the command line, the initrd and the
zero page, and reports the 64-bit entry point and where the zero page is (RSI).

Everything read from the image files is untrusted. All placement is checked against the
guest's RAM below the MMIO hole before anything is written, and every failure is a
KernelLoadError (a VmmError) with a message that says what is wrong.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmmcore.allocator import align_up
from vmmcore.arch.x86_64 import layout
from vmmcore.arch.x86_64.boot_params import (
    DEFAULT_INITRD_ADDR_MAX,
    KernelLoadError,
    SetupHeader,
    build_e820,
    build_zero_page,
    is_bzimage,
    parse_setup_header,
)
from vmmcore.memory import GuestMemory

__all__ = ["KernelLoadError", "LoadedKernel", "load_kernel"]

PAGE_SIZE = 4096
ENTRY_64_OFFSET = 0x200     # startup_64 is 0x200 into the protected-mode kernel

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PN_XNUM = 0xFFFF
MAX_PHNUM = 256            # real kernels have a handful; a hostile image may claim 65534
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


@dataclass
class LoadedKernel:
    """Where the kernel landed: what the vCPU set-up and the ACPI builder need."""

    entry: int                 # guest-physical 64-bit entry point (RIP)
    boot_params_addr: int      # the zero page, passed in RSI
    kind: str                  # "bzimage" or "elf"
    kernel_end: int            # one past the memory the kernel may use before it reads e820
    load_addr: int = 0
    initrd_addr: int = 0
    initrd_size: int = 0
    cmdline_addr: int = layout.CMDLINE_ADDR


@dataclass(frozen=True)
class _Segment:
    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


def low_ram_end(mem_size: int) -> int:
    """One past the last RAM byte below the MMIO hole: everything we place goes below."""
    return layout.ram_ranges(mem_size)[0][1]


def load_kernel(mem: GuestMemory, kernel: Path, cmdline: str, initrd: Path | None,
                mem_size: int) -> LoadedKernel:
    """Load kernel (bzImage or ELF64), cmdline and initrd; write the zero page.

    Returns the entry point and zero-page address for the boot vCPU. Raises
    KernelLoadError for unreadable or malformed images and for anything that does not
    fit in guest RAM; nothing is written outside guest RAM.
    """
    kernel = Path(kernel)
    try:
        with kernel.open("rb") as f:
            head = f.read(PAGE_SIZE)
            if head[:4] == ELF_MAGIC:
                loaded, header, cmdline_size, initrd_max = _load_elf(mem, f, mem_size)
            elif is_bzimage(head):
                loaded, header, cmdline_size, initrd_max = _load_bzimage(mem, f, mem_size)
            else:
                raise KernelLoadError("neither a bzImage nor an ELF64 kernel")
    except OSError as e:
        raise KernelLoadError(f"cannot read kernel {kernel}: {e.strerror or e}") from e
    except KernelLoadError as e:
        raise KernelLoadError(f"{kernel}: {e}") from None

    _write_cmdline(mem, cmdline, cmdline_size)
    if initrd is not None:
        loaded.initrd_addr, loaded.initrd_size = _load_initrd(
            mem, Path(initrd), loaded.kernel_end, min(low_ram_end(mem_size), initrd_max + 1))
    zero_page = build_zero_page(
        header, cmdline_addr=layout.CMDLINE_ADDR, e820=build_e820(mem_size),
        initrd=(loaded.initrd_addr, loaded.initrd_size) if loaded.initrd_size else None,
        cmdline_size=cmdline_size if header is None else None)
    mem.write(layout.ZERO_PAGE_ADDR, zero_page)
    loaded.boot_params_addr = layout.ZERO_PAGE_ADDR
    return loaded


def _write_cmdline(mem: GuestMemory, cmdline: str, cmdline_size: int) -> None:
    """Write the NUL-terminated command line at CMDLINE_ADDR after checking its length.

    cmdline_size is the kernel's limit without the terminating NUL (boot.rst); our own
    buffer at CMDLINE_ADDR holds CMDLINE_MAX_SIZE bytes including it.
    """
    try:
        raw = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise KernelLoadError("kernel command line must be ASCII") from None
    if b"\0" in raw:
        raise KernelLoadError("kernel command line contains a NUL byte")
    limit = min(cmdline_size, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise KernelLoadError(f"kernel command line is {len(raw)} bytes; the limit is "
                              f"{limit}")
    mem.write(layout.CMDLINE_ADDR, raw + b"\0")


def _read_exact(f: BinaryIO, offset: int, dest: memoryview) -> None:
    """Fill dest from file offset; a short read means the image is truncated."""
    f.seek(offset)
    got = 0
    while got < dest.nbytes:
        n = f.readinto(dest[got:])
        if not n:
            raise KernelLoadError(f"image truncated: wanted {dest.nbytes} bytes at "
                                  f"{offset:#x}, file ends after {got}")
        got += n


def _file_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


# -- bzImage -----------------------------------------------------------------------------

def _bzimage_load_addr(hdr: SetupHeader, payload: int, low_end: int) -> tuple[int, int]:
    """Pick where the protected-mode kernel goes; returns (load_addr, kernel_end).

    boot.rst: a relocating loader should use pref_address when it can; a non-relocatable
    kernel runs only there. Failing that, a relocatable kernel goes at KERNEL_START rounded
    up to kernel_alignment. Linux then runs at max(load address, its LOAD_PHYSICAL_ADDR,
    which is pref_address) and needs init_size bytes from there before it reads e820, so
    that is where kernel_end is.
    """
    def end_of(load: int) -> int:
        runtime = max(load, hdr.pref_address) if hdr.relocatable else load
        return max(load + payload, runtime + hdr.init_size)

    candidates = []
    if hdr.pref_address >= layout.HIGH_MEMORY_START:
        candidates.append(hdr.pref_address)
    if hdr.relocatable:
        candidates.append(align_up(layout.KERNEL_START, hdr.kernel_alignment))
        candidates.append(align_up(layout.KERNEL_START, 1 << hdr.min_alignment))
    for load in candidates:
        if load % (1 << hdr.min_alignment) == 0 and end_of(load) <= low_end:
            return load, end_of(load)
    if not candidates:
        raise KernelLoadError(f"non-relocatable bzImage with pref_address "
                              f"{hdr.pref_address:#x} below 1 MiB cannot be placed")
    need = end_of(candidates[-1])
    raise KernelLoadError(f"kernel needs guest RAM up to {need:#x} ({need >> 20} MiB) "
                          f"below the MMIO hole; only {low_end >> 20} MiB there")


def _load_bzimage(mem: GuestMemory, f: BinaryIO,
                  mem_size: int) -> tuple[LoadedKernel, bytes, int, int]:
    size = _file_size(f)
    low_end = low_ram_end(mem_size)
    if size > low_end:
        raise KernelLoadError(f"bzImage of {size} bytes is larger than guest RAM")
    f.seek(0)
    data = f.read(size)
    hdr = parse_setup_header(data)
    payload = len(data) - hdr.setup_size
    load, end = _bzimage_load_addr(hdr, payload, low_end)
    mem.write(load, memoryview(data)[hdr.setup_size:])
    initrd_max = hdr.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX
    loaded = LoadedKernel(entry=load + ENTRY_64_OFFSET, boot_params_addr=0,
                          kind="bzimage", kernel_end=align_up(end, PAGE_SIZE),
                          load_addr=load)
    return loaded, hdr.raw, hdr.cmdline_size, initrd_max


# -- ELF64 -------------------------------------------------------------------------------

def _parse_elf(f: BinaryIO) -> tuple[int, list[_Segment]]:
    """Validate the ELF header and PT_LOAD program headers; returns (e_entry, segments)."""
    size = _file_size(f)
    f.seek(0)
    raw = f.read(_EHDR.size)
    if len(raw) < _EHDR.size:
        raise KernelLoadError("ELF image truncated: no complete ELF header")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack(raw)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise KernelLoadError("ELF image is not 64-bit little-endian")
    if e_machine != EM_X86_64:
        raise KernelLoadError(f"ELF image is for machine {e_machine}, not x86-64")
    if e_type != ET_EXEC:
        raise KernelLoadError(f"ELF image type {e_type} is not an executable (ET_EXEC)")
    if e_phentsize != _PHDR.size:
        raise KernelLoadError(f"ELF program header size {e_phentsize} != {_PHDR.size}")
    if e_phnum == 0 or e_phnum == PN_XNUM or e_phnum > MAX_PHNUM:
        raise KernelLoadError(f"ELF image has an unsupported program header count {e_phnum}")
    if e_phoff + e_phnum * _PHDR.size > size:
        raise KernelLoadError("ELF program headers lie beyond the end of the file")
    f.seek(e_phoff)
    table = f.read(e_phnum * _PHDR.size)
    segments = []
    for i in range(e_phnum):
        p_type, _pf, off, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            table, i * _PHDR.size)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise KernelLoadError(f"ELF segment {i}: filesz {filesz:#x} > memsz {memsz:#x}")
        if off + filesz > size:
            raise KernelLoadError(f"ELF segment {i}: file data {off:#x}+{filesz:#x} lies "
                                  f"beyond the end of the file ({size:#x})")
        segments.append(_Segment(off, paddr, vaddr, filesz, memsz))
    if not segments:
        raise KernelLoadError("ELF image has no loadable (PT_LOAD) segments")
    return e_entry, segments


def _elf_entry(e_entry: int, segments: list[_Segment]) -> int:
    """The physical entry point.

    vmlinux declares ENTRY(phys_startup_64), so its e_entry is already physical; our test
    guests have p_vaddr == p_paddr. A kernel whose e_entry is virtual is translated
    through the segment whose virtual range holds it (as QEMU's ELF loader does).
    """
    for s in segments:
        if s.paddr <= e_entry < s.paddr + s.memsz:
            return e_entry
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + s.memsz:
            return e_entry - s.vaddr + s.paddr
    raise KernelLoadError(f"ELF entry point {e_entry:#x} is not inside any loaded segment")


def _load_elf(mem: GuestMemory, f: BinaryIO,
              mem_size: int) -> tuple[LoadedKernel, None, int, int]:
    e_entry, segments = _parse_elf(f)
    low_end = low_ram_end(mem_size)
    placed: list[tuple[int, int]] = []
    for s in segments:
        end = s.paddr + s.memsz
        if s.paddr < layout.HIGH_MEMORY_START:
            raise KernelLoadError(f"ELF segment at {s.paddr:#x} is below 1 MiB, where the "
                                  "VMM keeps the zero page, page tables and ACPI tables")
        if end > low_end:
            where = "overlaps the MMIO hole" if end > layout.MMIO_HOLE_START else \
                "is outside guest RAM"
            raise KernelLoadError(f"ELF segment {s.paddr:#x}+{s.memsz:#x} {where} (RAM "
                                  f"below the hole ends at {low_end:#x})")
        for a, b in placed:
            if s.paddr < b and a < end:
                raise KernelLoadError(f"ELF segments overlap at {max(a, s.paddr):#x}")
        placed.append((s.paddr, end))
    entry = _elf_entry(e_entry, segments)
    for s in segments:
        if s.filesz:
            _read_exact(f, s.offset, mem.slice(s.paddr, s.filesz))
        if s.memsz > s.filesz:
            mem.fill(s.paddr + s.filesz, s.memsz - s.filesz)     # the bss
    start = min(a for a, _ in placed)
    end = max(b for _, b in placed)
    loaded = LoadedKernel(entry=entry, boot_params_addr=0, kind="elf",
                          kernel_end=align_up(end, PAGE_SIZE), load_addr=start)
    return loaded, None, layout.CMDLINE_MAX_SIZE - 1, DEFAULT_INITRD_ADDR_MAX


# -- initrd ------------------------------------------------------------------------------

def _load_initrd(mem: GuestMemory, path: Path, kernel_end: int, top: int) -> tuple[int, int]:
    """Place the initrd page-aligned as high as possible in [kernel_end, top).

    High placement keeps it clear of the kernel's decompression area; top is the lower
    of RAM below the hole and initrd_addr_max + 1.
    """
    try:
        with path.open("rb") as f:
            size = _file_size(f)
            if size == 0:
                return 0, 0
            addr = (top - size) & ~(PAGE_SIZE - 1)
            if size > top or addr < kernel_end:
                raise KernelLoadError(
                    f"initrd {path} ({size} bytes) does not fit between the kernel end "
                    f"{kernel_end:#x} and {top:#x}; give the guest more memory")
            _read_exact(f, 0, mem.slice(addr, size))
    except OSError as e:
        raise KernelLoadError(f"cannot read initrd {path}: {e.strerror or e}") from e
    return addr, size
