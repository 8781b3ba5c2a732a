"""Property tests: random (hostile) rings never break the virtqueue parser.

Whatever the driver writes into the descriptor table, the indirect tables and the
available ring, pop() / add_used() / needs_interrupt() either work or raise
VirtqueueError: never IndexError, struct.error, GuestMemoryError or anything else; every
buffer they hand out lies in guest RAM; and the device writes nothing but its own used
ring.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmmcore.memory import GuestMemory
from vmmcore.virtio.queue import U32_MAX, Queue, VirtqueueError
from vmmcore.virtio.status import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
from vmmcore.virtio.testing import VirtqueueDriver

KiB = 1024
RAM = [(0, 64 * KiB), (128 * KiB, 64 * KiB)]  # two regions with a gap
DESC_TABLE, AVAIL, USED = 0x1000, 0x1100, 0x1200
TABLES = (0x4000, 0x5000, 0x20000, 0x2FFC0)  # where random indirect tables live
DESC = struct.Struct("<QIHH")

INTERESTING_ADDRS = [0, DESC_TABLE, AVAIL, USED, 0x8000, 0xFFF0, 0xFFFF, 0x10000,
                     0x1FFF0, 0x20000, 0x2FFF0, 0x30000, 2**63, 2**64 - 16, 2**64 - 1,
                     *TABLES]
INTERESTING_LENS = [0, 1, 2, 15, 16, 17, 32, 48, 64, 0x100, 0x10000, 0x8000_0000, U32_MAX]

# Mostly plausible values (so that many chains parse and the success paths are
# exercised too), mixed with edge values and anything at all.
valid_addrs = st.one_of(st.integers(0x2000, 0xF000), st.integers(0x20000, 0x2F000))
addrs = st.one_of(valid_addrs, valid_addrs, st.sampled_from(INTERESTING_ADDRS),
                  st.integers(0, 2**64 - 1))
small_lengths = st.integers(1, 0x100)
lengths = st.one_of(small_lengths, small_lengths, st.sampled_from(INTERESTING_LENS),
                    st.integers(0, U32_MAX))
plain_flags = st.sampled_from([0, 1, 2, 3])
flags = st.one_of(plain_flags, plain_flags, plain_flags, st.integers(0, 7),
                  st.integers(0, 0xFFFF))
indirect_descs = st.tuples(st.sampled_from(TABLES), st.sampled_from([16, 32, 64, 128, 0, 24]),
                           st.sampled_from([4, 4 | 2, 4 | 1]), st.integers(0, 3))


def descriptors(size: int, count: int) -> st.SearchStrategy:
    valid_next = st.integers(0, size - 1)
    nexts = st.one_of(valid_next, valid_next, valid_next, st.integers(0, size + 1),
                      st.integers(0, 0xFFFF))
    plain = st.tuples(addrs, lengths, flags, nexts)
    return st.lists(st.one_of(plain, plain, plain, indirect_descs),
                    min_size=count, max_size=count)


@st.composite
def rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = draw(descriptors(size, size))
    indirect_tables = [draw(descriptors(8, draw(st.integers(0, 8)))) for _ in TABLES]
    if draw(st.integers(0, 9)) < 8:
        heads = draw(st.permutations(range(size)))
    else:
        heads = draw(st.lists(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)),
                              min_size=size, max_size=size))
    start = draw(st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)))
    if draw(st.integers(0, 9)) < 8:
        ahead = draw(st.integers(1, size))
    else:
        ahead = draw(st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF)))
    used_event = draw(st.integers(0, 0xFFFF))
    avail_flags = draw(st.integers(0, 0xFFFF))
    features = (draw(st.booleans()) << VIRTIO_F_RING_EVENT_IDX
                | (draw(st.integers(0, 3)) > 0) << VIRTIO_F_RING_INDIRECT_DESC)
    raw = draw(st.one_of(st.none(), st.none(), st.none(),
                         st.binary(min_size=16 * size, max_size=16 * size)))
    return dict(size=size, table=table, indirect_tables=indirect_tables, heads=heads,
                start=start, ahead=ahead, used_event=used_event, avail_flags=avail_flags,
                features=features, raw=raw)


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(RAM) as m:
        yield m


def _snapshot(mem: GuestMemory) -> list[bytes]:
    return [mem.read(r.guest_addr, r.size) for r in mem.regions]


def _lay_out(mem: GuestMemory, r: dict) -> Queue:
    for region in mem.regions:
        mem.fill(region.guest_addr, region.size, 0x5A)
    size = r["size"]
    if r["raw"] is not None:
        mem.write(DESC_TABLE, r["raw"])
    else:
        for i, d in enumerate(r["table"]):
            mem.pack_into(DESC, DESC_TABLE + 16 * i, *d)
    for base, entries in zip(TABLES, r["indirect_tables"], strict=True):
        for i, d in enumerate(entries):
            if mem.is_valid_range(base + 16 * i, 16):
                mem.pack_into(DESC, base + 16 * i, *d)
    mem.write_u16(AVAIL, r["avail_flags"])
    mem.write_u16(AVAIL + 2, (r["start"] + r["ahead"]) & 0xFFFF)
    for i, head in enumerate(r["heads"]):
        mem.write_u16(AVAIL + 4 + 2 * i, head)
    mem.write_u16(AVAIL + 4 + 2 * size, r["used_event"])
    q = Queue(16)
    q.size = size
    q.desc_table, q.avail_ring, q.used_ring = DESC_TABLE, AVAIL, USED
    q.set_features(r["features"])
    q.validate(mem)
    q.ready = True
    q.restore_indices(r["start"], r["start"])
    return q


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=rings())
def test_random_rings_only_ever_raise_virtqueue_error(mem, r):
    q = _lay_out(mem, r)
    before = _snapshot(mem)
    used_lo, used_hi = USED, USED + 6 + 8 * r["size"]
    popped = 0
    try:
        for _ in range(r["size"] + 2):
            chain = q.pop(mem)
            if chain is None:
                break
            popped += 1
            for addr, length in chain.readable + chain.writable:
                assert length > 0 and mem.is_valid_range(addr, length)
            assert chain.readable_len + chain.writable_len <= U32_MAX
            assert 0 <= chain.head < r["size"]
            q.add_used(mem, chain, chain.writable_len)
            q.needs_interrupt(mem)
    except VirtqueueError as e:
        event("error: " + re.sub(r"0x[0-9a-f+x]+|\d+", "N", str(e))[:50])
    assert popped <= r["size"]
    event(f"chains popped: {min(popped, 3)}{'+' if popped > 3 else ''}")
    after = _snapshot(mem)
    assert after[1] == before[1], "device wrote into the second region"
    changed = [i for i in range(len(after[0])) if after[0][i] != before[0][i]] \
        if after[0] != before[0] else []
    assert all(used_lo <= a < used_hi for a in changed), "device wrote outside its used ring"


chain_specs = st.lists(
    st.tuples(st.lists(st.binary(min_size=1, max_size=64), max_size=4),
              st.lists(st.integers(1, 64), max_size=4), st.booleans())
    .filter(lambda c: c[0] or c[1]),
    min_size=1, max_size=24)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=chain_specs, start=st.integers(0, 0xFFFF), event_idx=st.booleans(),
       size=st.sampled_from([8, 16, 32]))
def test_well_formed_chains_round_trip(mem, specs, start, event_idx, size):
    """Chains a Linux-like driver builds always parse, with the bytes it put in them.
    (At most 8 descriptors each: no chain is longer than the queue, spec 2.7.5.3.1.)"""
    for region in mem.regions:
        mem.fill(region.guest_addr, region.size)
    d = VirtqueueDriver(mem, size, DESC_TABLE, 0x20000, 0xF000, event_idx=event_idx,
                        indirect=True)
    q = d.make_queue()
    d.start_at(start, q)
    for out, in_sizes, indirect in specs:
        indirect = indirect or len(out) + len(in_sizes) > size  # as Linux would
        head = d.add(out, in_sizes, indirect=indirect)
        chain = q.pop(mem)
        assert chain is not None and chain.head == head
        assert chain.read(mem) == b"".join(out)
        assert chain.writable_len == sum(in_sizes)
        reply = bytes(range(256))[:chain.writable_len]
        assert chain.write(mem, reply) == len(reply)
        q.add_used(mem, chain, len(reply))
        assert q.pop(mem) is None
        used = d.get_used()
        assert [(u.head, u.data) for u in used] == [(head, reply)]
