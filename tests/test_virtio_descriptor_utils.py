"""Reader/Writer cursors over descriptor chains: requests split across buffers."""

from __future__ import annotations

import os
import struct

import pytest

from vmmcore.memory import GuestMemory
from vmmcore.virtio.descriptor_utils import Reader, Writer
from vmmcore.virtio.queue import VirtqueueError
from vmmcore.virtio.testing import VirtqueueDriver

HEADER = struct.Struct("<IIQ")  # virtio-blk's request header: type, reserved, sector


@pytest.fixture
def rig():
    with GuestMemory([(0, 1 << 20)]) as mem:
        d = VirtqueueDriver(mem, 16, 0x1000, 0x10000, 0x40000, indirect=True)
        yield mem, d, d.make_queue()


def test_header_split_across_buffers(rig):
    mem, d, q = rig
    raw = HEADER.pack(1, 0, 0x1234) + b"payload"
    d.add([raw[:3], raw[3:11], raw[11:]], [1])
    r = Reader(mem, q.pop(mem))
    assert r.available_bytes() == len(raw)
    assert r.read_obj(HEADER) == (1, 0, 0x1234)
    assert r.bytes_read == 16
    assert r.read() == b"payload"
    assert r.available_bytes() == 0
    with pytest.raises(VirtqueueError, match="request too short"):
        r.read_exact(1)


def test_zero_copy_views_for_preadv(rig, tmp_path):
    mem, d, q = rig
    path = tmp_path / "disk"
    path.write_bytes(bytes(range(256)) * 4)
    d.add([HEADER.pack(0, 0, 0)], [100, 412, 1], indirect=True)
    chain = q.pop(mem)
    w = Writer(mem, chain)
    status = w.split_at(w.available_bytes() - 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.preadv(fd, w.views(512), 0) == 512
    finally:
        os.close(fd)
    status.write_obj(struct.Struct("B"), 0)
    assert w.available_bytes() == 0 and status.available_bytes() == 0
    q.add_used(mem, chain, w.bytes_written + status.bytes_written)
    [used] = d.get_used()
    assert used.data == (bytes(range(256)) * 2) + b"\x00"


def test_split_in_the_middle_of_a_buffer(rig):
    mem, d, q = rig
    d.add([], [4, 6])
    w = Writer(mem, q.pop(mem))
    assert w.write(b"ab") == 2
    tail = w.split_at(5)  # 2 written + 5 kept = 7: cuts the second buffer at 3
    assert w.available_bytes() == 5 and tail.available_bytes() == 3
    assert w.write(b"cdefgXX") == 5
    tail.write_all(b"xyz")
    with pytest.raises(VirtqueueError, match="does not fit"):
        tail.write_all(b"!")


def test_writer_short_write_reports_count(rig):
    mem, d, q = rig
    d.add([b"r"], [3])
    chain = q.pop(mem)
    w = Writer(mem, chain)
    assert w.write(b"12345") == 3
    assert Reader(mem, chain).consume(10) == 1
