"""Split virtqueue, device side: chains, indirect tables, EVENT_IDX, hostile drivers."""

from __future__ import annotations

import os
import re

import pytest

from vmmcore.errors import VmmError
from vmmcore.memory import GuestMemory
from vmmcore.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Queue,
    VirtqueueError,
    prepare_queues,
    vring_need_event,
)
from vmmcore.virtio.status import TRANSPORT_FEATURES
from vmmcore.virtio.testing import VirtqueueDriver

KiB = 1024
MiB = 1024 * KiB
RAM = [(0, 2 * MiB), (16 * MiB, 1 * MiB)]  # a gap between the two regions
RING = 0x1000
DATA = 0x10000


@pytest.fixture
def mem():
    with GuestMemory(RAM) as m:
        yield m


def driver(mem, size=16, **kw) -> VirtqueueDriver:
    return VirtqueueDriver(mem, size, RING, DATA, 256 * KiB, **kw)


class Interrupts:
    """Records signal_used_queue calls, as VirtioInterrupt would receive them."""

    def __init__(self) -> None:
        self.vectors: list[int] = []

    def signal_used_queue(self, vector: int) -> None:
        self.vectors.append(vector)


# -- well-formed chains ---------------------------------------------------------------


def test_direct_chain_round_trip(mem):
    d = driver(mem)
    q = d.make_queue()
    head = d.add([b"hello", b"world"], [8, 4])
    chain = q.pop(mem)
    assert isinstance(chain, DescriptorChain)
    assert chain.head == head
    assert [n for _, n in chain.readable] == [5, 5]
    assert [n for _, n in chain.writable] == [8, 4]
    assert (chain.readable_len, chain.writable_len) == (10, 12)
    assert chain.descriptor_count == 4 and not chain.indirect
    assert chain.read(mem) == b"helloworld"
    assert chain.read(mem, 4, offset=3) == b"lowo"
    assert b"".join(bytes(v) for v in chain.readable_views(mem)) == b"helloworld"
    assert chain.write(mem, b"0123456789ABCDEF") == 12  # truncated to capacity
    q.add_used(mem, chain, 12)
    assert q.pop(mem) is None
    [used] = d.get_used()
    assert (used.head, used.length, used.data) == (head, 12, b"0123456789AB")


def test_writable_views_are_zero_copy(mem):
    d = driver(mem)
    q = d.make_queue()
    d.add([], [3, 5])
    chain = q.pop(mem)
    views = chain.writable_views(mem)
    views[0][:] = b"abc"
    views[1][:2] = b"de"
    q.add_used(mem, chain, 5)
    assert d.get_used()[0].data == b"abcde"


def test_chains_come_out_in_order_and_descriptors_are_recycled(mem):
    d = driver(mem, size=8)
    q = d.make_queue()
    for round_ in range(50):  # the ring wraps many times; free list is reused
        heads = [d.add([bytes([round_, i])], [1]) for i in range(4)]
        for h in heads:
            chain = q.pop(mem)
            assert chain.head == h
            assert chain.read(mem) == bytes([round_, heads.index(h)])
            chain.write(mem, b"!")
            q.add_used(mem, chain, 1)
        assert q.pop(mem) is None
        assert [u.head for u in d.get_used()] == heads
    assert d.num_free == 8


def test_not_ready_queue_pops_nothing(mem):
    d = driver(mem)
    q = d.make_queue()
    q.ready = False
    d.add([b"x"])
    assert q.pop(mem) is None


def test_zero_length_descriptors_are_dropped(mem):
    d = driver(mem)
    q = d.make_queue()
    d.write_desc(0, 0xDEAD_0000_0000, 0, VIRTQ_DESC_F_NEXT, 1)  # no bytes: never accessed
    d.write_desc(1, DATA, 4, VIRTQ_DESC_F_WRITE, 0)
    d.publish(0)
    chain = q.pop(mem)
    assert chain.readable == [] and chain.writable == [(DATA, 4)]
    assert chain.descriptor_count == 2


def test_add_used_checks_the_device_side(mem):
    d = driver(mem)
    q = d.make_queue()
    d.add([], [4])
    chain = q.pop(mem)
    with pytest.raises(ValueError):
        q.add_used(mem, chain, 5)
    with pytest.raises(ValueError):
        q.add_used(mem, 16, 0)


def test_readable_after_writable_is_reported_not_fatal(mem):
    d = driver(mem)
    q = d.make_queue()
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, DATA + 16, 4, 0, 0)
    d.publish(0)
    chain = q.pop(mem)
    assert chain.readable_after_writable
    with pytest.raises(VirtqueueError, match="readable descriptor after"):
        chain.require_device_order()


# -- indirect descriptors --------------------------------------------------------------------


def test_indirect_chain(mem):
    d = driver(mem, indirect=True)
    q = d.make_queue()
    head = d.add([b"abc", b"defg"], [2, 6], indirect=True)
    chain = q.pop(mem)
    assert chain.indirect and chain.head == head
    assert chain.descriptor_count == 5  # the table descriptor and its four entries
    assert chain.read(mem) == b"abcdefg"
    assert chain.write(mem, b"12345678") == 8
    q.add_used(mem, chain, 8)
    assert d.get_used()[0].data == b"12345678"
    assert d.num_free == 16


def test_direct_descriptors_then_an_indirect_table(mem):
    """virtio 1.2 2.7.5.3.2: zero or more chained descriptors, then one INDIRECT."""
    d = driver(mem, indirect=True)
    q = d.make_queue()
    table = 0x20000
    mem.write(DATA, b"head")
    mem.write(DATA + 0x100, b"tail")
    d.write_desc(0, DATA + 0x100, 4, VIRTQ_DESC_F_NEXT, 1, table=table)
    d.write_desc(1, DATA + 0x200, 8, VIRTQ_DESC_F_WRITE, 0, table=table)
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 5)
    # the WRITE bit on the table descriptor itself must be ignored
    d.write_desc(5, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0)
    d.publish(0)
    chain = q.pop(mem)
    assert chain.read(mem) == b"headtail"
    assert chain.writable == [(DATA + 0x200, 8)]
    assert not chain.readable_after_writable


# -- EVENT_IDX and flag-based suppression ------------------------------------------------------


def test_vring_need_event_wraps():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(65535, 0, 65535)  # the entry at 65535 was added
    assert vring_need_event(65534, 2, 65530)
    assert not vring_need_event(3, 2, 65530)
    assert not vring_need_event(5, 5, 5)  # nothing added


@pytest.mark.parametrize("start", [0, 100, 65530, 65535])
def test_event_idx_interrupt_suppression(mem, start):
    d = driver(mem, size=8, event_idx=True)
    q = d.make_queue()
    d.start_at(start, q)
    irq = Interrupts()
    q.vector = 3
    target = (start + 3) & 0xFFFF  # interrupt when the 4th used entry is written
    for i in range(6):
        d.add([b"x"])
        d.set_used_event(target)
        chain = q.pop(mem)
        q.add_used(mem, chain, 0)
        fired = q.trigger_interrupt(mem, irq)
        assert fired == (i == 3), (start, i)
    assert irq.vectors == [3]
    assert len(d.get_used()) == 6


def test_event_idx_batch_covering_used_event_interrupts_once(mem):
    d = driver(mem, size=8, event_idx=True)
    q = d.make_queue()
    d.start_at(65534, q)
    d.set_used_event(65535)
    for _ in range(3):
        d.add([b"x"])
    while (chain := q.pop(mem)) is not None:
        q.add_used(mem, chain, 0)
    assert q.needs_interrupt(mem)
    assert not q.needs_interrupt(mem)  # nothing new since


@pytest.mark.parametrize("start", [0, 65534])
def test_event_idx_kick_suppression(mem, start):
    d = driver(mem, size=8, event_idx=True)
    q = d.make_queue()
    d.start_at(start, q)
    assert q.pop(mem) is None  # empty: the device publishes avail_event = next_avail
    d.add([b"a"])
    assert d.kick()  # crossed avail_event
    d.add([b"b"])
    assert not d.kick()  # device has not caught up: no further kicks needed
    assert q.pop(mem).read(mem) == b"a"  # pop advances avail_event
    d.add([b"c"])
    assert not d.kick()  # avail_event (start+1) was already passed by "b"
    assert q.pop(mem).read(mem) == b"b"
    assert q.pop(mem).read(mem) == b"c"
    assert q.pop(mem) is None
    d.add([b"d"])
    assert d.kick()
    assert d.kicks == 2


def test_event_idx_disable_notification_stops_avail_event(mem):
    d = driver(mem, size=8, event_idx=True)
    q = d.make_queue()
    d.add([b"a"])
    assert d.kick()  # avail_event starts at 0: the first entry crosses it
    q.disable_notification(mem)
    assert q.pop(mem) is not None  # while disabled, pop leaves avail_event alone
    assert q.pop(mem) is None
    d.add([b"b"])
    assert not d.kick()
    assert q.enable_notification(mem)  # "b" arrived while disabled
    assert q.pop(mem).read(mem) == b"b"
    assert not q.enable_notification(mem)
    d.add([b"c"])
    assert d.kick()


def test_no_interrupt_flag_without_event_idx(mem):
    d = driver(mem)
    q = d.make_queue()
    irq = Interrupts()
    d.disable_cb()
    d.add([b"x"])
    q.add_used(mem, q.pop(mem), 0)
    assert not q.trigger_interrupt(mem, irq)
    d.enable_cb()
    d.add([b"y"])
    q.add_used(mem, q.pop(mem), 0)
    assert q.trigger_interrupt(mem, irq)
    assert irq.vectors == [0xFFFF]  # no MSI-X vector assigned
    assert not q.needs_interrupt(mem)  # no new used entries


def test_no_notify_flag_without_event_idx(mem):
    d = driver(mem)
    q = d.make_queue()
    d.add([b"x"])
    assert d.kick()
    q.disable_notification(mem)
    d.add([b"y"])
    assert not d.kick()
    assert q.enable_notification(mem)  # work pending
    d.add([b"z"])
    assert d.kick()


def test_used_event_is_ignored_without_event_idx(mem):
    d = driver(mem)
    q = d.make_queue()
    d.set_used_event(1000)
    d.add([b"x"])
    q.add_used(mem, q.pop(mem), 0)
    assert q.needs_interrupt(mem)


# -- queue configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("attr,value,msg", [
    ("size", 0, "power of two"),
    ("size", 12, "power of two"),
    ("size", 32, "power of two"),
    ("desc_table", RING + 8, "not 16-byte aligned"),
    ("avail_ring", RING + 16 * 16 + 1, "not 2-byte aligned"),
    ("used_ring", 0x1102, "not 4-byte aligned"),
    ("desc_table", 2 * MiB - 16, "outside guest RAM"),
    ("used_ring", 17 * MiB - 8, "outside guest RAM"),
    ("avail_ring", 1 << 63, "outside guest RAM"),
])
def test_validate_rejects_bad_rings(mem, attr, value, msg):
    q = driver(mem).make_queue()
    setattr(q, attr, value)
    with pytest.raises(VirtqueueError, match=msg):
        q.validate(mem)
    assert not q.is_valid(mem)


def test_prepare_queues_takes_features_and_skips_unready(mem):
    d = driver(mem)
    q = d.make_queue()
    idle = Queue(16)
    prepare_queues(mem, TRANSPORT_FEATURES, [q, idle])
    assert q.event_idx and q.indirect
    assert not idle.event_idx


def test_queue_max_size_must_be_power_of_two():
    with pytest.raises(ValueError):
        Queue(100)
    with pytest.raises(ValueError):
        Queue(65536)


def test_reset_forgets_everything(mem):
    d = driver(mem)
    q = d.make_queue()
    d.add([b"x"])
    q.pop(mem)
    q.reset()
    assert (q.ready, q.next_avail, q.next_used, q.desc_table, q.size) == (False, 0, 0, 0, 16)


# -- the hostile driver: each malformed chain ends in one VirtqueueError ----------------------


def _raw(mem, indirect=True, size=16):
    d = driver(mem, size=size, indirect=indirect)
    return d, d.make_queue()


def _expect(mem, q, pattern):
    with pytest.raises(VirtqueueError, match=pattern) as info:
        q.pop(mem)
    assert isinstance(info.value, VmmError)
    return info.value


def test_head_index_out_of_range(mem):
    d, q = _raw(mem)
    d.publish(16)
    _expect(mem, q, r"avail ring slot 0 names descriptor 16, queue size is 16")


def test_next_index_out_of_range(mem):
    d, q = _raw(mem)
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 99)
    d.publish(0)
    _expect(mem, q, r"next index 99 is beyond the queue size \(16\)")


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 3, 1]])
def test_descriptor_loops(mem, links):
    d, q = _raw(mem)
    for i, nxt in enumerate(links):
        d.write_desc(i, DATA, 4, VIRTQ_DESC_F_NEXT, nxt)
    d.publish(0)
    _expect(mem, q, r"longer than the queue size \(16\): a loop\?")


def test_chain_longer_than_a_small_queue(mem):
    d, q = _raw(mem, size=2)
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, DATA, 4, VIRTQ_DESC_F_NEXT, 0)
    d.publish(0)
    _expect(mem, q, r"longer than the queue size \(2\)")


def test_loop_inside_an_indirect_table(mem):
    d, q = _raw(mem)
    table = 0x20000
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 1, table=table)
    d.write_desc(1, DATA, 4, VIRTQ_DESC_F_NEXT, 0, table=table)
    d.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, r"longer than the indirect table \(2\)")


def test_indirect_next_beyond_table(mem):
    d, q = _raw(mem)
    table = 0x20000
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 2, table=table)
    d.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, r"next index 2 is beyond the indirect table \(2\)")


def test_nested_indirect(mem):
    d, q = _raw(mem)
    table = 0x20000
    d.write_desc(0, table + 0x100, 16, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    d.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, r"nested indirect")


def test_indirect_with_next(mem):
    d, q = _raw(mem)
    d.write_desc(0, 0x20000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    d.publish(0)
    _expect(mem, q, r"sets both INDIRECT and NEXT")


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_indirect_table_length(mem, length):
    d, q = _raw(mem)
    d.write_desc(0, 0x20000, length, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, rf"indirect table length {length} is not a non-zero multiple of 16")


def test_indirect_without_the_feature(mem):
    d, q = _raw(mem, indirect=False)
    d.write_desc(0, 0x20000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, r"RING_INDIRECT_DESC was not negotiated")


@pytest.mark.parametrize("addr", [2 * MiB - 16 * 4, 3 * MiB, (1 << 64) - 16])
def test_indirect_table_outside_ram(mem, addr):
    d, q = _raw(mem)
    d.write_desc(0, addr, 16 * 8, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, r"indirect table 0x[0-9a-f]+\+0x80 is outside guest RAM")


@pytest.mark.parametrize("addr,length", [
    (2 * MiB - 4, 8),             # straddles the end of the first region
    (2 * MiB, 16),                # in the gap
    (17 * MiB - 1, 2),            # straddles the end of RAM
    ((1 << 64) - 1, 0xFFFF_FFFF),  # wraps a 64-bit address
    (0, 0xFFFF_FFFF),             # longer than any region
])
def test_buffer_outside_ram(mem, addr, length):
    d, q = _raw(mem)
    d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, addr, length, VIRTQ_DESC_F_WRITE, 0)
    d.publish(0)
    _expect(mem, q, re.escape(f"buffer {addr:#x}+{length:#x} is outside guest RAM"))


def test_total_length_overflows_u32(mem):
    """4097 readable descriptors of 1 MiB each: every one valid, the sum > 2**32-1
    (in a queue large enough for such a chain)."""
    d, q = _raw(mem, size=8192)
    table, n = 0x40000, 4097
    for i in range(n):
        nxt = VIRTQ_DESC_F_NEXT if i + 1 < n else 0
        d.write_desc(i, MiB, MiB, nxt, i + 1 if nxt else 0, table=table)
    d.write_desc(0, table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, r"total length exceeds 2\*\*32-1 bytes")


@pytest.mark.parametrize("direct", [0, 3])
def test_chain_longer_than_the_queue_size(mem, direct):
    """Spec 2.7.5.3.1: a chain holds at most queue-size descriptors, indirect entries
    included; one more is refused before any entry is read."""
    d, q = _raw(mem)                     # queue size 16
    table = 0x40000
    for i in range(direct):
        d.write_desc(i, MiB, 8, VIRTQ_DESC_F_NEXT, i + 1)
    d.write_desc(direct, table, 16 * (17 - direct), VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    _expect(mem, q, rf"{direct} descriptors and an indirect table of {17 - direct} "
            r"entries exceed the queue size \(16\)")


def test_chain_as_long_as_the_queue_size(mem):
    d, q = _raw(mem)
    table = 0x40000
    for i in range(16):
        nxt = VIRTQ_DESC_F_NEXT if i < 15 else 0
        d.write_desc(i, MiB + 8 * i, 8, nxt, i + 1 if nxt else 0, table=table)
    d.write_desc(0, table, 16 * 16, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    chain = q.pop(mem)
    assert (chain.readable_len, len(chain.readable)) == (16 * 8, 16)


@pytest.mark.parametrize("jump", [17, 1000, 65535])
def test_avail_idx_jumps_more_than_queue_size(mem, jump):
    d, q = _raw(mem)
    d.set_avail_idx(jump)
    _expect(mem, q, rf"avail idx is {jump} entries ahead of the device \(next 0\), "
                    r"more than the queue size 16")


def test_avail_ring_outside_ram_at_pop_time(mem):
    d, q = _raw(mem)
    q.avail_ring = 2 * MiB + 0x1000  # never validated: pop must still be safe
    _expect(mem, q, r"virtqueue access outside guest RAM")


def test_used_ring_outside_ram_at_add_used(mem):
    d, q = _raw(mem)
    d.add([b"x"])
    chain = q.pop(mem)
    q.used_ring = 2 * MiB + 0x1000
    with pytest.raises(VirtqueueError, match="used ring outside guest RAM"):
        q.add_used(mem, chain, 0)


# -- the indexes the guest polls are never torn ------------------------------------------


def test_index_stores_are_single_16_bit_stores():
    """A reader on another CPU (a forked process mapping the same memfd, reading with a
    native 16-bit load as a guest would) must never see half of an index update. The
    writer flips 0x00ff <-> 0x0100, where a byte-wise store would expose 0x0000 or
    0x01ff."""
    import ctypes
    import mmap
    import time

    from vmmcore.virtio.queue import _load_u16, _store_u16

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs to race")
    with GuestMemory([(0, 4096)]) as m:
        _store_u16(m, 2, 0x00FF)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            shared = mmap.mmap(m.fd, 4096)
            idx = ctypes.c_uint16.from_buffer(shared, 2)
            torn, end = 0, time.monotonic() + 0.5
            while time.monotonic() < end:
                for _ in range(1000):
                    if idx.value not in (0x00FF, 0x0100):
                        torn += 1
            os._exit(1 if torn else 0)
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            for _ in range(1000):
                _store_u16(m, 2, 0x0100)
                _store_u16(m, 2, 0x00FF)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a reader saw a torn index"
        assert _load_u16(m, 2) == 0x00FF
