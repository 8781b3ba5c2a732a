"""qcow2 on-disk layout: constants, the header, header extensions, the snapshot table.

Everything here follows QEMU's qcow2 specification (docs/interop/qcow2.txt). All numbers
in the file are big-endian. Parsing validates: a hostile image gives a DiskError naming
the problem (see :func:`parse_header`), never a struct.error or an IndexError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"QFI\xfb"

HEADER_V2_LEN = 72
HEADER_V3_LEN = 104
#: what we write for version 3: the 104-byte header, the compression-type byte, padding
HEADER_V3_WRITE_LEN = 112

MIN_CLUSTER_BITS = 9          # 512 B
MAX_CLUSTER_BITS = 21         # 2 MiB
MAX_REFCOUNT_ORDER = 6        # 64-bit refcounts

#: Limits against absurd headers (the same ones QEMU applies).
MAX_VIRTUAL_SIZE = 1 << 61
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56     # bits 9..55 of a table entry

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit", (0, 1): "corrupt bit", (0, 2): "external data file",
    (0, 3): "compression type", (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps", (2, 1): "raw external data",
}

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entries
OFFSET_MASK = 0x00FFFFFFFFFFFE00      # L1 and standard L2 entries: host offset bits 9..55
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # refcount table entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_RESERVED = 0x7F000000000001FF
L2E_RESERVED = 0x3F000000000001FE

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")   # 72 bytes
_HEADER_V3_TAIL = struct.Struct(">QQQII")       # 32 bytes, offsets 72..103
_SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")   # 40 bytes


class LayoutError(ValueError):
    """A structural problem in the image; the caller turns it into a DiskError."""


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V3_WRITE_LEN
    compression_type: int = COMPRESSION_ZLIB
    # parsed header extensions
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[tuple[int, int]] = field(default_factory=list)   # (type, length)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def pack(self) -> bytes:
        """The fixed header (72 bytes for v2, header_length bytes for v3)."""
        out = _HEADER_V2.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            out += _HEADER_V3_TAIL.pack(self.incompatible, self.compatible, self.autoclear,
                                        self.refcount_order, self.header_length)
            if self.header_length > HEADER_V3_LEN:
                out += bytes([self.compression_type])
                out += bytes(self.header_length - len(out))
        return out

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit)) or FEATURE_NAMES.get((kind, bit)) or (
            f"unknown feature bit {bit}")


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate the header in buf (the image's first cluster, or less at EOF)."""
    if len(buf) < HEADER_V2_LEN:
        if buf[:4] != MAGIC:
            raise LayoutError("not a qcow2 image (bad magic)")
        raise LayoutError(f"header truncated ({len(buf)} bytes)")
    f = _HEADER_V2.unpack_from(buf)
    if f[0] != MAGIC:
        raise LayoutError("not a qcow2 image (bad magic)")
    h = Header(version=f[1], backing_file_offset=f[2], backing_file_size=f[3],
               cluster_bits=f[4], size=f[5], crypt_method=f[6], l1_size=f[7],
               l1_table_offset=f[8], refcount_table_offset=f[9],
               refcount_table_clusters=f[10], nb_snapshots=f[11], snapshots_offset=f[12])
    if h.version not in (2, 3):
        raise LayoutError(f"unsupported qcow2 version {h.version} (2 and 3 are supported)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise LayoutError(f"cluster_bits {h.cluster_bits} out of range "
                          f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
    cs = h.cluster_size
    if h.version >= 3:
        if len(buf) < HEADER_V3_LEN:
            raise LayoutError("version 3 header truncated")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _HEADER_V3_TAIL.unpack_from(buf, HEADER_V2_LEN)
        if h.header_length < HEADER_V3_LEN or h.header_length > cs:
            raise LayoutError(f"header_length {h.header_length} out of range "
                              f"({HEADER_V3_LEN}..{cs})")
        if h.header_length > HEADER_V3_LEN:
            if len(buf) < h.header_length:
                raise LayoutError("header truncated")
            h.compression_type = buf[HEADER_V3_LEN]
    else:
        h.refcount_order = 4
        h.header_length = HEADER_V2_LEN
    if h.refcount_order > MAX_REFCOUNT_ORDER:
        raise LayoutError(f"refcount_order {h.refcount_order} out of range (0..6)")
    if h.size > MAX_VIRTUAL_SIZE:
        raise LayoutError(f"virtual size {h.size} is absurd (more than 2^61 bytes)")
    if h.crypt_method:
        raise LayoutError(f"encrypted images are not supported (crypt_method "
                          f"{h.crypt_method})")

    # header extensions (they end at the backing file name, or at the cluster end)
    ext_end = cs
    if h.backing_file_offset:
        ext_end = min(ext_end, h.backing_file_offset)
    _parse_extensions(h, buf, h.header_length if h.version >= 3 else HEADER_V2_LEN,
                      min(ext_end, len(buf)))

    if h.compression_type not in COMPRESSION_NAMES:
        raise LayoutError(f"unknown compression type {h.compression_type}")
    if h.compression_type != COMPRESSION_ZLIB and not h.incompatible & INCOMPAT_COMPRESSION:
        raise LayoutError("compression type set without the compression-type feature bit")
    if h.incompatible & INCOMPAT_COMPRESSION and h.compression_type == COMPRESSION_ZLIB:
        raise LayoutError("compression-type feature bit set for zlib")
    unsupported = h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION)
    if unsupported:
        names = [h.feature_name(0, b) for b in range(64) if unsupported >> b & 1]
        raise LayoutError("unsupported incompatible feature(s): " + ", ".join(names))

    # backing file name
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
            raise LayoutError(f"backing file name length {h.backing_file_size} is invalid")
        end = h.backing_file_offset + h.backing_file_size
        if end > cs or end > len(buf):
            raise LayoutError("backing file name lies outside the header cluster")
        h.backing_file = buf[h.backing_file_offset:end].decode("utf-8", "surrogateescape")

    # the tables' places
    entries_per_l2 = cs // 8
    need_l1 = -(-h.size // (cs * entries_per_l2))
    if h.l1_size < need_l1:
        raise LayoutError(f"L1 table too small ({h.l1_size} entries) for the virtual size "
                          f"{h.size} ({need_l1} needed)")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise LayoutError(f"L1 table size {h.l1_size} entries is absurd")
    if h.l1_size:
        _check_region("L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise LayoutError("no refcount table (refcount_table_clusters is 0)")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise LayoutError(f"refcount table of {h.refcount_table_clusters} clusters is absurd")
    _check_region("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs,
                  cs, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise LayoutError(f"{h.nb_snapshots} snapshots is absurd")
    if h.nb_snapshots:
        _check_region("snapshot table", h.snapshots_offset, 1, cs, file_size)
    return h


def _check_region(what: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise LayoutError(f"{what} offset {offset:#x} is not cluster aligned")
    if offset == 0:
        raise LayoutError(f"{what} overlaps the header (offset 0)")
    if offset + length > file_size:
        raise LayoutError(f"{what} at {offset:#x}+{length} lies past the end of the file "
                          f"({file_size} bytes)")


def _parse_extensions(h: Header, buf: bytes, start: int, end: int) -> None:
    off = start
    while off + 8 <= end:
        etype, elen = struct.unpack_from(">II", buf, off)
        off += 8
        if etype == EXT_END:
            return
        if off + elen > end:
            raise LayoutError(f"header extension {etype:#x} of {elen} bytes overruns the "
                              "header cluster")
        data = buf[off:off + elen]
        h.extensions.append((etype, elen))
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace").rstrip("\0") or None
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, elen - elen % 48, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_names[(kind, bit)] = name
        elif etype == EXT_DATA_FILE:
            raise LayoutError("external data files are not supported")
        elif etype == EXT_CRYPTO:
            raise LayoutError("encrypted images are not supported")
        off += _align_up(elen, 8)


def pack_extension(etype: int, data: bytes) -> bytes:
    return struct.pack(">II", etype, len(data)) + data + bytes(_align_up(len(data), 8)
                                                              - len(data))


def feature_table() -> bytes:
    out = b""
    for (kind, bit), name in sorted(FEATURE_NAMES.items()):
        out += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    return out


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "date_sec": self.date_sec,
                "date_nsec": self.date_nsec, "vm_clock_nsec": self.vm_clock_nsec,
                "vm_state_size": self.vm_state_size, "disk_size": self.disk_size,
                "l1_size": self.l1_size}


def parse_snapshots(data: bytes, count: int, cs: int, file_size: int
                    ) -> tuple[list[Snapshot], int]:
    """Parse count snapshot entries from data; returns them and the table's byte length."""
    out = []
    off = 0
    for i in range(count):
        if off + _SNAPSHOT_FIXED.size > len(data):
            raise LayoutError(f"snapshot table truncated at entry {i}")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmstate,
         extra_len) = _SNAPSHOT_FIXED.unpack_from(data, off)
        p = off + _SNAPSHOT_FIXED.size
        extra = data[p:p + extra_len]
        p += extra_len
        ident = data[p:p + id_len]
        p += id_len
        name = data[p:p + name_len]
        p += name_len
        if p > len(data):
            raise LayoutError(f"snapshot table truncated at entry {i}")
        disk_size = None
        if len(extra) >= 16:
            vmstate = max(vmstate, struct.unpack_from(">Q", extra, 0)[0])
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if l1_size * 8 > MAX_L1_BYTES:
            raise LayoutError(f"snapshot {i}: L1 table size {l1_size} is absurd")
        if l1_size:
            _check_region(f"snapshot {i} L1 table", l1_off, l1_size * 8, cs, file_size)
        out.append(Snapshot(l1_off, l1_size, ident.decode("utf-8", "replace"),
                            name.decode("utf-8", "replace"), dsec, dnsec, clock, vmstate,
                            disk_size))
        off = _align_up(p, 8)
    return out, off
