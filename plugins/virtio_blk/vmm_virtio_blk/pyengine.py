"""The Python request path: one virtio-blk request carried out through DiskFile calls.

Used for every disk format that cannot hand out a plain file (qcow2, ...) and whenever
engine=python is asked for; the native engine (_engine.c) implements the same checks in
the same order for formats that can (raw). A request that has a writable status byte
always gets a status: IOERR for bad headers, lengths, sectors past the end, writes to a
read-only disk, data in the wrong direction; UNSUPP for unknown types and flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmm_virtio_blk.protocol import (
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG,
    REQ_HEADER,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEGMENT,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    RequestError,
)
from vmmcore.memory import GuestMemory
from vmmcore.virtio import DescriptorChain, Reader, Writer

if TYPE_CHECKING:
    from vmm_virtio_blk.device import VirtioBlock


def execute(dev: VirtioBlock, mem: GuestMemory, chain: DescriptorChain) -> int:
    """Carry out one request; return the data bytes written to the guest.

    Raises RequestError for a request answered with IOERR or UNSUPP. The chain has at
    least one writable byte (its status), checked by handle_queue.
    """
    if chain.readable_after_writable:
        raise RequestError(VIRTIO_BLK_S_IOERR,
                           "device-readable descriptor after a device-writable one")
    if chain.readable_len < REQ_HEADER.size:
        raise RequestError(VIRTIO_BLK_S_IOERR,
                           f"request header is {chain.readable_len} bytes, not 16")
    reader = Reader(mem, chain)
    rtype, _reserved, sector = reader.read_obj(REQ_HEADER)
    writer = Writer(mem, chain)
    writer.split_at(chain.writable_len - 1)       # writer now covers the data only
    in_len = writer.available_bytes()
    out_len = reader.available_bytes()

    if rtype == VIRTIO_BLK_T_IN:
        return _transfer(dev, writer, sector, in_len, out_len, write=False)

    if rtype == VIRTIO_BLK_T_OUT:
        if dev.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        return _transfer(dev, reader, sector, out_len, in_len, write=True)

    if rtype == VIRTIO_BLK_T_FLUSH:
        dev.disk.flush()
        return 0

    if rtype == VIRTIO_BLK_T_GET_ID:
        if in_len < VIRTIO_BLK_ID_BYTES:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"GET_ID buffer of {in_len} bytes, "
                               f"needs {VIRTIO_BLK_ID_BYTES}")
        writer.write_all(dev.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
        return VIRTIO_BLK_ID_BYTES

    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        discard = rtype == VIRTIO_BLK_T_DISCARD
        supported = dev.can_discard if discard else dev.can_write_zeroes
        if dev.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes to a read-only disk")
        if not supported:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard/write-zeroes not offered")
        segments = _segments(dev, reader, out_len, discard)
        for offset, length, unmap in segments:
            if discard:
                dev.disk.discard(offset, length)
            else:
                dev.disk.write_zeroes(offset, length, may_unmap=unmap and dev.may_unmap)
        if dev.writethrough and not discard:
            dev.disk.flush()
        return 0

    raise RequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")


def _transfer(dev: VirtioBlock, data: Reader | Writer, sector: int, length: int,
              wrong_way: int, write: bool) -> int:
    """IN or OUT: `length` bytes of `data` (the chain's buffers in the request's direction)
    to or from the disk; `wrong_way` bytes in the other direction make it IOERR."""
    if wrong_way:
        which = "writable" if write else "readable"
        raise RequestError(VIRTIO_BLK_S_IOERR, f"{'write' if write else 'read'} request "
                           f"with {wrong_way} bytes of device-{which} data")
    offset = _data_range(dev, sector, length)
    views = data.views(length)
    try:
        if write:
            dev.disk.write_from(offset, views)
        else:
            dev.disk.read_into(offset, views)
    finally:
        _release(views)
    if write and dev.writethrough:
        dev.disk.flush()
    return 0 if write else length


def _data_range(dev: VirtioBlock, sector: int, length: int) -> int:
    """The byte offset of an IN/OUT request, after checking it lies on the disk."""
    if length % SECTOR_SIZE:
        raise RequestError(VIRTIO_BLK_S_IOERR,
                           f"data length {length} is not a multiple of 512")
    nsectors = length >> SECTOR_SHIFT
    if sector > dev.capacity or nsectors > dev.capacity - sector:
        raise RequestError(VIRTIO_BLK_S_IOERR,
                           f"sectors {sector}+{nsectors} are past the end of the "
                           f"{dev.capacity}-sector disk")
    return sector << SECTOR_SHIFT


def _segments(dev: VirtioBlock, reader: Reader, out_len: int,
              discard: bool) -> list[tuple[int, int, bool]]:
    """Parse and check every DISCARD/WRITE_ZEROES segment before doing any of them."""
    max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
    max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
    what = "discard" if discard else "write-zeroes"
    if out_len == 0 or out_len % SEGMENT.size:
        raise RequestError(VIRTIO_BLK_S_IOERR, f"{what} payload of {out_len} bytes is "
                           "not a non-zero multiple of 16")
    count = out_len // SEGMENT.size
    if count > max_seg:
        raise RequestError(VIRTIO_BLK_S_IOERR, f"{what} with {count} segments "
                           f"(max {max_seg})")
    out = []
    for _ in range(count):
        sector, nsectors, flags = reader.read_obj(SEGMENT)
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"{what}: unknown flags {flags:#x}")
        unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        if discard and unmap:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard with the unmap flag")
        if nsectors > max_sectors:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{what} of {nsectors} sectors "
                               f"(max {max_sectors})")
        if sector > dev.capacity or nsectors > dev.capacity - sector:
            raise RequestError(VIRTIO_BLK_S_IOERR,
                               f"{what} of sectors {sector}+{nsectors} past the end "
                               f"of the {dev.capacity}-sector disk")
        out.append((sector << SECTOR_SHIFT, nsectors << SECTOR_SHIFT, unmap))
    return out


def _release(views: Sequence[memoryview]) -> None:
    """Release guest-memory views at once (a live export would pin the mapping)."""
    for v in views:
        v.release()

