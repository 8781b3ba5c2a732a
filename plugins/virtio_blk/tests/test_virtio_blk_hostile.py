"""Hostile-guest edge cases at the exact limits, on both engines (tier 1).

Each test sits on a boundary that an off-by-one or a missing overflow check in either
engine would get wrong: a buffer or indirect table that starts inside guest RAM and ends
past it, an address whose end wraps around 2**64, a `next` index equal to the table
length, a DISCARD/WRITE_ZEROES segment one sector over the limit on a disk big enough
for the range check not to hide it, a GET_ID buffer one byte short. (Found by breaking
each check in _ring.c/_blk.c in turn: the earlier tests still passed for these.)
"""

from __future__ import annotations

import pytest
from blk_rig import TIMEOUT, FileDisk, header, segment
from vmm_virtio_blk.device import (
    MAX_DISCARD_SECTORS,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)

from vmmcore.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

HDR, STATUS, TABLE = 0x200000, 0x200400, 0x201000


def _needs_reset(rig, reason: str) -> None:
    rig.drivers[0].kick_evt.write(1)
    assert rig.reset_seen.wait(TIMEOUT), "the device did not enter NEEDS_RESET"
    assert reason in rig.reset_reasons[0], rig.reset_reasons
    assert rig.drivers[0].used_idx() == 0          # nothing was answered


def _read_chain(rig, data_addr: int, data_len: int) -> None:
    d = rig.drivers[0]
    rig.mem.write(HDR, header(VIRTIO_BLK_T_IN))
    d.write_desc(0, HDR, 16, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, data_addr, data_len, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    d.write_desc(2, STATUS, 1, VIRTQ_DESC_F_WRITE, 0)
    d.publish(0)


@pytest.mark.parametrize("back", [256, 1])
def test_buffer_straddling_the_end_of_guest_memory(rig, back):
    """Starts inside RAM (the last `back` bytes), ends past it: refused, not read into."""
    end = rig.mem.size
    _read_chain(rig, end - back, 512)
    _needs_reset(rig, "outside guest RAM")


@pytest.mark.parametrize("addr", [2**64 - 256, 2**64 - 1])
def test_buffer_whose_end_wraps_around_2_64(rig, addr):
    _read_chain(rig, addr, 512)
    _needs_reset(rig, "outside guest RAM")


def test_indirect_table_straddling_the_end_of_guest_memory(rig):
    d = rig.drivers[0]
    table = rig.mem.size - 32                   # room for 2 of its 3 entries
    d.write_desc(0, table, 48, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _needs_reset(rig, "outside guest RAM")


def test_next_equal_to_the_queue_size(rig):
    d = rig.drivers[0]
    rig.mem.write(HDR, header(VIRTIO_BLK_T_IN))
    d.write_desc(0, HDR, 16, VIRTQ_DESC_F_NEXT, d.size)
    d.publish(0)
    _needs_reset(rig, "beyond the queue size")


def test_next_equal_to_the_indirect_table_length(rig):
    d = rig.drivers[0]
    rig.mem.write(HDR, header(VIRTIO_BLK_T_IN))
    d.write_desc(0, HDR, 16, VIRTQ_DESC_F_NEXT, 1, table=TABLE)
    d.write_desc(1, STATUS, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2, table=TABLE)
    d.write_desc(0, TABLE, 32, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _needs_reset(rig, "beyond the indirect table")


def test_get_id_buffer_one_byte_short(rig):
    req = rig.submit([header(VIRTIO_BLK_T_GET_ID)], [19, 1], kick=False)
    addr, n = req.in_bufs[0]
    rig.mem.write(addr, b"\xcc" * n)
    rig.drivers[0].kick_evt.write(1)
    [done] = rig.wait(1)
    assert (done.status, done.length) == (VIRTIO_BLK_S_IOERR, 1)
    assert rig.mem.read(addr, n) == b"\xcc" * 19


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_segment_one_sector_over_the_limit(tmp_path, rig_factory, rtype):
    """On a 4 GiB sparse disk the range check passes, so only the per-segment sector
    limit stands between the request and a 2 GiB hole or write."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(4 << 30)
        f.seek(0)
        f.write(b"\xab" * 4096)
    rig = rig_factory(FileDisk(path))
    req = rig.do([header(rtype), segment(0, MAX_DISCARD_SECTORS + 1)], [1])
    assert req.status == VIRTIO_BLK_S_IOERR
    assert rig.disk_ops() == 0
    with open(path, "rb") as f:
        assert f.read(4096) == b"\xab" * 4096
    assert not rig.interrupt.needs_reset


def test_more_segments_than_iov_max(rig_factory, image):
    """2000 data descriptors of odd sizes (1 and 511 bytes): more than IOV_MAX (1024)
    iovecs, so the transfer is split into several preadv/pwritev calls whose
    boundaries fall inside sectors. (A chain may be as long as the queue: 2048.)"""
    path, contents = image
    rig = rig_factory(FileDisk(path), queue_size=2048)
    sizes = [1, 511] * 1000                     # 1000 sectors
    req = rig.do([header(VIRTIO_BLK_T_IN, 7)], [*sizes, 1], indirect=True)
    assert req.status == 0 and req.data == contents[7 * 512:(7 + 1000) * 512]
    data = bytes(range(256)) * (1000 * 2)
    chunks, pos = [], 0
    for n in sizes:
        chunks.append(data[pos:pos + n])
        pos += n
    req = rig.do([header(VIRTIO_BLK_T_OUT, 3), *chunks], [1], indirect=True)
    assert req.status == 0
    with open(path, "rb") as f:
        f.seek(3 * 512)
        assert f.read(len(data)) == data


@pytest.mark.parametrize("event_idx", [True, False])
def test_ring_indexes_wrap_at_65536(image, rig_factory, event_idx):
    """Ring indexes start 6 short of 2**16: requests across the wrap complete, each
    one interrupts (EVENT_IDX or not), and reset hands back the wrapped cursors."""
    from blk_rig import wait_fd

    from vmmcore.virtio import prepare_queues
    from vmmcore.virtio.status import TRANSPORT_FEATURES

    path, contents = image
    rig = rig_factory(FileDisk(path), activate=False, rig_kw={"event_idx": event_idx})
    d = rig.drivers[0]
    q = d.make_queue(rig.device.queue_size)
    q.vector = 1
    d.start_at(65530, q)
    prepare_queues(rig.mem, TRANSPORT_FEATURES & ~(3 << 28) | d.features, [q])
    assert q.event_idx == event_idx
    rig.device.activate(rig.mem, rig.interrupt, [q], rig.kicks)
    for i in range(20):
        rig.read(i, 512)
        assert wait_fd(rig.vectors[1], TIMEOUT), f"request {i}: no interrupt"
        [done] = rig._reap(0)
        assert done.status == 0 and done.data == contents[512 * i:512 * (i + 1)]
    assert d.used_idx() == (65530 + 20) & 0xFFFF
    assert rig.device.reset()
    assert (q.next_avail, q.next_used) == ((65530 + 20) & 0xFFFF,) * 2


@pytest.mark.parametrize("queue_size", [16, 256])
def test_chain_longer_than_the_queue_needs_reset(rig_factory, image, queue_size):
    """Spec 2.7.5.3.1: no chain is longer than the queue size, indirect entries
    included. One descriptor more than the queue holds is refused (NEEDS_RESET) on
    both engines, so a request cannot make the device walk 65536 descriptors; exactly
    the queue size is served."""
    path, contents = image
    rig = rig_factory(FileDisk(path), queue_size=queue_size)
    # header + (queue_size - 2) one-sector segments + status = queue_size descriptors
    req = rig.do([header(VIRTIO_BLK_T_IN, 0)], [512] * (queue_size - 2) + [1],
                 indirect=True)
    assert req.status == 0 and req.data == contents[:(queue_size - 2) * 512]
    assert not rig.reset_seen.is_set()
    rig.submit([header(VIRTIO_BLK_T_IN, 0)], [512] * (queue_size - 1) + [1],
               indirect=True)
    rig.drivers[0].kick_evt.write(1)
    assert rig.reset_seen.wait(TIMEOUT), "the device did not enter NEEDS_RESET"
    assert "exceed the queue size" in rig.reset_reasons[0], rig.reset_reasons
    assert rig.drivers[0].used_idx() == 1          # only the first request was answered
