"""Creating qcow2 images (`vmm create_qcow2`, DiskFormat.create).

A new image starts as QEMU lays one out: the header cluster (header, extensions,
backing file name), one refcount-table cluster, one refcount block; then it is opened
and resized to its virtual size, which allocates the L1 table through the ordinary
allocation path.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from vmm_qcow2.layout import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    HEADER_V3_WRITE_LEN,
    MAX_BACKING_NAME,
    MAX_VIRTUAL_SIZE,
    Header,
    feature_table,
    pack_extension,
)
from vmmcore.disk import DiskError

DEFAULT_CLUSTER_SIZE = 65536


def _default_opener(path: Path, format: str | None = None, *, read_only: bool = True):
    from vmmcore.disk import open_disk

    return open_disk(path, format, read_only=read_only)


def create_image(path: Path, size: int | None = None, *, backing_file: str | None = None,
                 backing_format: str | None = None,
                 cluster_size: int = DEFAULT_CLUSTER_SIZE, refcount_bits: int = 16,
                 compat: str = "1.1", lazy_refcounts: bool = False,
                 opener=None, **unknown: object) -> None:
    """Create a qcow2 image at path (overwriting it). DiskError for bad parameters."""
    if unknown:
        raise DiskError(f"unknown qcow2 create option(s): {', '.join(sorted(unknown))}")
    opener = opener or _default_opener
    path = Path(path)
    cs = int(cluster_size)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise DiskError(f"cluster size {cs} is invalid: a power of two from 512 to 2M")
    if compat in ("0.10", "v2", "2"):
        version = 2
    elif compat in ("1.1", "v3", "3"):
        version = 3
    else:
        raise DiskError(f"compat {compat!r} is invalid: 0.10 or 1.1")
    rb = int(refcount_bits)
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise DiskError(f"refcount bits {rb} is invalid: a power of two from 1 to 64")
    if version == 2 and rb != 16:
        raise DiskError("compat 0.10 images have 16-bit refcounts only")
    if version == 2 and lazy_refcounts:
        raise DiskError("lazy refcounts need compat 1.1")

    backing_name = None
    if backing_file:
        backing_name = str(backing_file)
        bpath = Path(backing_name) if os.path.isabs(backing_name) else path.parent / backing_name
        if os.path.realpath(bpath) == os.path.realpath(path):
            raise DiskError(f"{path}: an image cannot be its own backing file")
        b = opener(bpath, backing_format, read_only=True)
        try:
            backing_format = backing_format or b.format_name
            if size is None:
                size = b.size
        finally:
            b.close()
        if len(backing_name.encode()) > MAX_BACKING_NAME:
            raise DiskError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    if size is None:
        raise DiskError("no size given (and no backing file to take it from)")
    size = int(size)
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise DiskError(f"size {size} is out of range")

    h = Header(version=version, cluster_bits=cs.bit_length() - 1, size=0,
               refcount_table_offset=cs, refcount_table_clusters=1,
               refcount_order=rb.bit_length() - 1,
               compatible=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
               header_length=HEADER_V3_WRITE_LEN if version == 3 else 72)
    exts = b""
    if backing_name and backing_format:
        exts += pack_extension(EXT_BACKING_FORMAT, backing_format.encode())
    name_bytes = backing_name.encode() if backing_name else b""
    fixed = len(h.pack())
    features = pack_extension(EXT_FEATURE_TABLE, feature_table()) if version == 3 else b""
    if fixed + len(exts) + len(features) + 8 + len(name_bytes) <= cs:
        exts += features
    exts += struct.pack(">II", EXT_END, 0)
    if backing_name:
        h.backing_file_offset = fixed + len(exts)
        h.backing_file_size = len(name_bytes)
    cluster0 = h.pack() + exts + name_bytes
    if len(cluster0) > cs:
        raise DiskError(f"the header and backing file name do not fit in a {cs}-byte "
                        "cluster")
    cluster0 += bytes(cs - len(cluster0))
    reftable = struct.pack(">Q", 2 * cs) + bytes(cs - 8)
    block = bytearray(cs)
    for i in range(3):      # header, refcount table, refcount block
        if rb >= 8:
            w = rb // 8
            block[i * w:(i + 1) * w] = (1).to_bytes(w, "big")
        else:
            per = 8 // rb
            block[i // per] |= 1 << (rb * (i % per))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DiskError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.pwrite(fd, cluster0 + reftable + bytes(block), 0)
        os.fsync(fd)
    except OSError as e:
        raise DiskError(f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(fd)

    from vmm_qcow2.image import Qcow2File

    img = Qcow2File(path, False, opener)
    try:
        img.resize(size, hide_backing=False)
    finally:
        img.close()
