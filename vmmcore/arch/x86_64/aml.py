"""A small AML (ACPI Machine Language) encoder for the DSDT, per ACPI 6.x chapter 20.

We only need static data objects: names, packages, integers, strings, scopes, devices
and resource templates for a PCI host bridge. Each function returns the encoded bytes of
one term so callers compose them like the ASL they mirror:

    name("_S5_", package([5, 5, 0, 0]))   ==   Name (_S5_, Package () {5, 5, 0, 0})

Integers are encoded in the smallest form (ZeroOp, OneOp, Byte/Word/DWord/QWordPrefix), so
the output matches what iasl produces for the same ASL.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
ONES_OP = 0xFF
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82            # after EXT_OP_PREFIX
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = 0x5C            # '\'
PARENT_PREFIX = 0x5E        # '^'

MAX_PKG_LENGTH = (1 << 28) - 1
_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")

AmlTerm = bytes
AmlValue = int | str | bytes


class AmlError(ValueError):
    """An object cannot be encoded (bad name, value out of range, too large)."""


def pkg_length(body_len: int) -> bytes:
    """Encode a PkgLength for body_len bytes that follow it.

    The encoded length counts its own 1-4 bytes. One byte holds up to 63; otherwise the
    lead byte's bits 7-6 give the number of following bytes, its bits 3-0 the low nibble,
    and each following byte the next 8 bits.
    """
    if body_len < 0:
        raise AmlError(f"negative package length {body_len}")
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise AmlError(f"package of {body_len} bytes exceeds the AML PkgLength limit")


def integer(value: int) -> AmlTerm:
    """An integer constant in its shortest encoding (our DSDT is revision 2: 64-bit)."""
    if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
        raise AmlError(f"integer {value} does not fit in 64 bits")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(value: str) -> AmlTerm:
    """A NUL-terminated ASCII string constant."""
    if not value.isascii() or "\0" in value:
        raise AmlError(f"AML strings are 7-bit ASCII without NUL: {value!r}")
    return bytes([STRING_PREFIX]) + value.encode("ascii") + b"\0"


def name_seg(seg: str) -> bytes:
    """One 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not _NAME_SEG.fullmatch(seg):
        raise AmlError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional '\' or '^' prefixes, then dot-separated segments."""
    if not path:
        raise AmlError("empty ACPI name")
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX]), rest[1:]
    if not rest:
        return prefix + b"\0"                     # NullName (e.g. the root itself)
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"name path {path!r} has too many segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def data(value: AmlValue) -> AmlTerm:
    """Encode a Python value: int -> integer, str -> string, bytes -> already AML."""
    if isinstance(value, bool):
        return integer(int(value))
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise AmlError(f"cannot encode {type(value).__name__} as AML")


def name(path: str, value: AmlValue) -> AmlTerm:
    """Name (path, value)."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def package(elements: Sequence[AmlValue]) -> AmlTerm:
    """Package () {elements}: at most 255 elements (VarPackage is not needed here)."""
    if len(elements) > 0xFF:
        raise AmlError(f"package of {len(elements)} elements needs VarPackageOp")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(content: bytes) -> AmlTerm:
    """Buffer () {content}."""
    body = integer(len(content)) + content
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, terms: Iterable[AmlTerm]) -> AmlTerm:
    """Scope (path) {terms}."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, terms: Iterable[AmlTerm]) -> AmlTerm:
    """Device (path) {terms}."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method_return(path: str, value: AmlValue, *, args: int = 0) -> AmlTerm:
    """Method (path, args, NotSerialized) { Return (value) } - e.g. a constant _STA."""
    if not 0 <= args <= 7:
        raise AmlError(f"a method takes 0-7 arguments, not {args}")
    body = name_string(path) + bytes([args]) + bytes([RETURN_OP]) + data(value)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def eisa_id(text: str) -> AmlTerm:
    """EisaId ("PNP0A08"): three letters and four hex digits compressed into a DWORD."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"bad EISA id {text!r}")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


# -- resource templates (ACPI 6.x section 6.4) ----------------------------------------------

RES_END_TAG = 0x79
RES_IO = 0x47
RES_WORD_ADDRESS = 0x88
RES_DWORD_ADDRESS = 0x87
RES_QWORD_ADDRESS = 0x8A
ADDR_SPACE_MEMORY = 0
ADDR_SPACE_IO = 1
ADDR_SPACE_BUS = 2
# General flags: bit 3 MaxFixed, bit 2 MinFixed, bit 1 decode (0 positive), bit 0 consumer.
GEN_FLAGS_PRODUCER_FIXED = 0x0C
MEM_FLAGS_CACHEABLE_RW = 0x03       # ReadWrite, Cacheable
MEM_FLAGS_NONCACHEABLE_RW = 0x01
IO_FLAGS_ENTIRE_RANGE = 0x03


def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): a fixed range of ports."""
    return struct.pack("<BBHHBB", RES_IO, 0x01, base, base, 1, length)


def _address(tag: str, space: int, type_flags: int, base: int, length: int) -> bytes:
    fmt, desc, limit = {"W": ("<H", RES_WORD_ADDRESS, 0xFFFF),
                        "D": ("<I", RES_DWORD_ADDRESS, 0xFFFF_FFFF),
                        "Q": ("<Q", RES_QWORD_ADDRESS, 0xFFFF_FFFF_FFFF_FFFF)}[tag]
    if length <= 0 or base + length - 1 > limit:
        raise AmlError(f"address range {base:#x}+{length:#x} does not fit a {tag}word")
    width = struct.calcsize(fmt)
    fields = b"".join(struct.pack(fmt, v) for v in
                      (0, base, base + length - 1, 0, length))   # gran, min, max, tra, len
    body = bytes([space, GEN_FLAGS_PRODUCER_FIXED, type_flags]) + fields
    assert len(fields) == 5 * width
    return bytes([desc]) + struct.pack("<H", len(body)) + body


def word_bus_number(first: int, last: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, ..., first, last, ...)."""
    return _address("W", ADDR_SPACE_BUS, 0, first, last - first + 1)


def word_io(base: int, length: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address("W", ADDR_SPACE_IO, IO_FLAGS_ENTIRE_RANGE, base, length)


def dword_memory(base: int, length: int, *, cacheable: bool = False) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, ..., ReadWrite, ...)."""
    flags = MEM_FLAGS_CACHEABLE_RW if cacheable else MEM_FLAGS_NONCACHEABLE_RW
    return _address("D", ADDR_SPACE_MEMORY, flags, base, length)


def qword_memory(base: int, length: int, *, cacheable: bool = False) -> bytes:
    """QWordMemory (ResourceProducer, ...) for windows above 4 GiB."""
    flags = MEM_FLAGS_CACHEABLE_RW if cacheable else MEM_FLAGS_NONCACHEABLE_RW
    return _address("Q", ADDR_SPACE_MEMORY, flags, base, length)


def resource_template(descriptors: Iterable[bytes]) -> AmlTerm:
    """ResourceTemplate () {...}: a Buffer ending in an End Tag with a zero checksum."""
    return buffer(b"".join(descriptors) + bytes([RES_END_TAG, 0]))
