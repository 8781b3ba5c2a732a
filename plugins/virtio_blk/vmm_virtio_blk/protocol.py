"""virtio-blk's wire format and limits (virtio 1.2, section 5.2): feature bits, request
types, statuses, the request header, DISCARD/WRITE_ZEROES segments and the config space.

Shared by both request engines (pyengine.py and the native _engine.c, whose #defines must
match these numbers) and by the tests.
"""

from __future__ import annotations

import hashlib
import os
import struct

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# Feature bits (virtio 1.2, 5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status values
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

REQ_HEADER = struct.Struct("<IIQ")          # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")             # sector, num_sectors, flags

#: struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes):
#: capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
#: topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
#: writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
#: discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
#: write_zeroes_may_unmap, unused1[3].
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60

DEFAULT_QUEUE_SIZE = 256
#: Native engine: most microseconds of adaptive ring polling (QEMU's poll-max-ns default).
DEFAULT_POLL_US = 32
#: Largest single data segment the guest may use (SIZE_MAX).
SIZE_MAX = 1 << 20
#: DISCARD / WRITE_ZEROES limits: sectors per segment and segments per request.
MAX_DISCARD_SECTORS = (1 << 22) - 8           # just under 2 GiB, 4 KiB aligned
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = (1 << 22) - 8
MAX_WRITE_ZEROES_SEG = 32
#: Discard granularity reported to the guest, in bytes (host file-system blocks).
DISCARD_GRANULARITY = 4096


def feature_bits(*, read_only: bool, discard: bool, write_zeroes: bool) -> int:
    """The device feature bits virtio-blk offers: always SIZE_MAX, SEG_MAX, BLK_SIZE,
    TOPOLOGY, FLUSH and MQ; RO, DISCARD and WRITE_ZEROES as the disk allows."""
    bits = [VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ]
    if read_only:
        bits.append(VIRTIO_BLK_F_RO)
    if discard:
        bits.append(VIRTIO_BLK_F_DISCARD)
    if write_zeroes:
        bits.append(VIRTIO_BLK_F_WRITE_ZEROES)
    return sum(1 << b for b in bits)


def default_id(path: str | os.PathLike[str]) -> bytes:
    """A stable 20-byte serial for a disk without id=: derived from its absolute path."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()
    return digest[:VIRTIO_BLK_ID_BYTES].encode()


class RequestError(Exception):
    """A request the device answers with a status other than OK (not a protocol error)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status

