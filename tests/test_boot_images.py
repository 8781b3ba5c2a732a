"""Synthesized kernel images for the boot tests: minimal bzImages and ELF64 executables.

A helper module for the other test_boot_* files (imported by name), with a self-test.

Each builder returns bytes that a test may then corrupt field by field.
"""

from __future__ import annotations

import struct

from vmmcore.arch.x86_64 import boot_params as bp


def make_bzimage(*, payload: bytes = b"\x90" * 8192, setup_sects: int = 4,
                 version: int = 0x020F, xloadflags: int = bp.XLF_KERNEL_64,
                 alignment: int = 0x20_0000, relocatable: int = 1, min_alignment: int = 21,
                 pref_address: int = 0x100_0000, init_size: int = 0x40_0000,
                 cmdline_size: int = 2047, initrd_addr_max: int = 0x7FFF_FFFF,
                 header_len_byte: int = 0x6A) -> bytes:
    """A bzImage whose setup header says what the arguments say; payload follows setup."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[bp.HDR_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", setup, bp.HDR_BOOT_FLAG, bp.BOOT_FLAG_MAGIC)
    setup[bp.HDR_JUMP] = 0xEB
    setup[bp.HDR_JUMP + 1] = header_len_byte
    setup[bp.HDR_HEADER:bp.HDR_HEADER + 4] = bp.HDRS_MAGIC
    struct.pack_into("<H", setup, bp.HDR_VERSION, version)
    setup[bp.HDR_LOADFLAGS] = bp.LOADED_HIGH
    struct.pack_into("<I", setup, bp.HDR_INITRD_ADDR_MAX, initrd_addr_max)
    struct.pack_into("<I", setup, bp.HDR_KERNEL_ALIGNMENT, alignment)
    setup[bp.HDR_RELOCATABLE] = relocatable
    setup[bp.HDR_MIN_ALIGNMENT] = min_alignment
    struct.pack_into("<H", setup, bp.HDR_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, bp.HDR_CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", setup, bp.HDR_PREF_ADDRESS, pref_address)
    struct.pack_into("<I", setup, bp.HDR_INIT_SIZE, init_size)
    return bytes(setup) + payload


EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")


def make_elf(segments: list[dict], *, entry: int = 0x20_0000, machine: int = 62,
             e_type: int = 2, phnum: int | None = None, phoff: int | None = None,
             elf_class: int = 2) -> bytes:
    """An ELF64 executable; each segment dict has paddr and data, optionally vaddr,
    memsz, filesz, offset and type overriding what the data implies."""
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    table_off = EHDR.size
    data_off = table_off + PHDR.size * len(segments)
    body = bytearray()
    phdrs = bytearray()
    for s in segments:
        data = s.get("data", b"")
        off = s.get("offset", data_off + len(body))
        body += data
        phdrs += PHDR.pack(s.get("type", 1), 7, off, s.get("vaddr", s["paddr"]), s["paddr"],
                           s.get("filesz", len(data)), s.get("memsz", len(data)), 0x1000)
    ehdr = EHDR.pack(ident, e_type, machine, 1, entry,
                     table_off if phoff is None else phoff, 0, 0, EHDR.size, PHDR.size,
                     len(segments) if phnum is None else phnum, 0, 0, 0)
    return ehdr + bytes(phdrs) + bytes(body)


# -- the builders themselves produce what the loader accepts --------------------------------

def test_synthesized_bzimage_parses():
    hdr = bp.parse_setup_header(make_bzimage())
    assert hdr.setup_sects == 4 and hdr.relocatable and hdr.cmdline_size == 2047


def test_synthesized_elf_has_the_requested_segments():
    elf = make_elf([{"paddr": 0x20_0000, "data": b"\xf4"}])
    assert elf[:4] == b"\x7fELF"
    assert PHDR.unpack_from(elf, EHDR.size)[4] == 0x20_0000
