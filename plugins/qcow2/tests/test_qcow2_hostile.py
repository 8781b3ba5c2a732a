"""Hostile images: every malformation gives a DiskError naming the problem, never a
traceback of another kind, and never a write outside the image (or into its metadata)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct

import pytest
from qhelp import write
from vmm_qcow2.create import create_image
from vmm_qcow2.image import Qcow2File, Qcow2Format

from vmmcore.disk import DiskError

CS = 65536


def _img(tmp_path, name="h.qcow2", size=4 << 20, **kw):
    p = tmp_path / name
    create_image(p, size, **kw)
    with Qcow2File(p, False) as d:
        write(d, 0, b"\x01" * 70000)           # two data clusters, one L2 table
    return p


def _patch(p, off, data):
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(data)


def _hdr(p):
    with Qcow2File(p, True) as d:
        return d.header, list(d._l1)


def _digest(paths):
    return {str(q): hashlib.sha256(q.read_bytes()).hexdigest() for q in paths}


def _exercise(p):
    """Open, read everything, write, discard, zero, resize: whatever fails must fail
    with DiskError."""
    d = Qcow2File(p, False)
    try:
        buf = bytearray(d.size if d.size < (16 << 20) else 1 << 20)
        d.read_into(0, [memoryview(buf)])
        write(d, 100, b"\x02" * 200_000)
        d.discard(0, CS)
        d.write_zeroes(CS, CS)
        d.resize(d.size + (1 << 20))
        d.flush()
    finally:
        d.close()


CASES = []


def case(fn):
    CASES.append(fn)
    return fn


@case
def bad_magic(p):
    _patch(p, 0, b"QFI\x00")
    return "bad magic"


@case
def bad_version(p):
    _patch(p, 4, struct.pack(">I", 7))
    return "version 7"


@case
def huge_cluster_bits(p):
    _patch(p, 20, struct.pack(">I", 40))
    return "cluster_bits 40"


@case
def absurd_size(p):
    _patch(p, 24, struct.pack(">Q", 1 << 63))
    return "absurd"


@case
def l1_too_small(p):
    _patch(p, 24, struct.pack(">Q", 1 << 50))
    return "L1 table too small"


@case
def l1_past_eof(p):
    h, _ = _hdr(p)
    _patch(p, 40, struct.pack(">Q", 1 << 40))
    return "L1 table"


@case
def l1_unaligned(p):
    h, _ = _hdr(p)
    _patch(p, 40, struct.pack(">Q", h.l1_table_offset + 8))
    return "not cluster aligned"


@case
def l1_absurd(p):
    _patch(p, 36, struct.pack(">I", 0x7FFFFFFF))
    return "absurd"


@case
def reftable_overlaps_l1(p):
    h, _ = _hdr(p)
    _patch(p, 48, struct.pack(">Q", h.l1_table_offset))
    return "overlaps"


@case
def reftable_is_header(p):
    _patch(p, 48, struct.pack(">Q", 0))
    return "header"


@case
def reftable_absurd(p):
    _patch(p, 56, struct.pack(">I", 1 << 30))
    return "absurd"


@case
def l2_past_eof(p):
    h, _ = _hdr(p)
    _patch(p, h.l1_table_offset, struct.pack(">Q", (1 << 45) | (1 << 63)))
    return "past the end"


@case
def l2_is_l1(p):
    h, _ = _hdr(p)
    _patch(p, h.l1_table_offset, struct.pack(">Q", h.l1_table_offset | (1 << 63)))
    return "L2 table"


@case
def l2_is_header(p):
    h, _ = _hdr(p)
    _patch(p, h.l1_table_offset, struct.pack(">Q", 1 << 63))
    # offset 0 with COPIED: "unallocated" for a reader; must never be written into
    return None


@case
def data_past_eof(p):
    _h, l1 = _hdr(p)
    l2 = l1[0] & 0x00FFFFFFFFFFFE00
    _patch(p, l2, struct.pack(">Q", (1 << 50) | (1 << 63)))
    return "past"


@case
def data_is_refcount_table(p):
    h, l1 = _hdr(p)
    l2 = l1[0] & 0x00FFFFFFFFFFFE00
    _patch(p, l2, struct.pack(">Q", h.refcount_table_offset | (1 << 63)))
    return "overlaps metadata"


@case
def data_unaligned(p):
    _h, l1 = _hdr(p)
    l2 = l1[0] & 0x00FFFFFFFFFFFE00
    e = struct.unpack(">Q", p.read_bytes()[l2:l2 + 8])[0]
    _patch(p, l2, struct.pack(">Q", e + 512))
    return "not cluster aligned"


@case
def compressed_garbage(p):
    _h, l1 = _hdr(p)
    l2 = l1[0] & 0x00FFFFFFFFFFFE00
    e = struct.unpack(">Q", p.read_bytes()[l2:l2 + 8])[0] & 0x00FFFFFFFFFFFE00
    _patch(p, l2, struct.pack(">Q", (1 << 62) | e | (3 << 54)))
    return "compressed cluster"


@case
def compressed_past_eof(p):
    _h, l1 = _hdr(p)
    l2 = l1[0] & 0x00FFFFFFFFFFFE00
    _patch(p, l2, struct.pack(">Q", (1 << 62) | (1 << 40)))
    return "compressed cluster"


@case
def refblock_past_eof(p):
    h, _ = _hdr(p)
    _patch(p, h.refcount_table_offset, struct.pack(">Q", 1 << 45))
    return "refcount block"


@case
def refcount_zero_for_metadata(p):
    """Refcounts claim the L1 and L2 clusters are free: allocation must not reuse them."""
    h, _ = _hdr(p)
    rb = struct.unpack(">Q", p.read_bytes()[h.refcount_table_offset:][:8])[0]
    _patch(p, rb, bytes(CS))
    return None


@case
def unknown_incompatible(p):
    _patch(p, 72, struct.pack(">Q", 1 << 40))
    return "unsupported incompatible feature"


@case
def external_data_file(p):
    _patch(p, 72, struct.pack(">Q", 1 << 2))
    return "external data file"


@case
def extl2(p):
    _patch(p, 72, struct.pack(">Q", 1 << 4))
    return "extended L2"


@case
def encrypted(p):
    _patch(p, 32, struct.pack(">I", 1))
    return "encrypted"


@case
def extension_overrun(p):
    _patch(p, 112, struct.pack(">II", 0x12345678, 1 << 30))
    return "overruns"


@case
def refcount_order_bad(p):
    _patch(p, 96, struct.pack(">I", 9))
    return "refcount_order"


@case
def header_length_bad(p):
    _patch(p, 100, struct.pack(">I", 1 << 20))
    return "header_length"


@case
def snapshot_table_past_eof(p):
    _patch(p, 60, struct.pack(">IQ", 1, 1 << 40))
    return "snapshot table"


@case
def snapshot_count_absurd(p):
    _patch(p, 60, struct.pack(">I", 1 << 30))
    return "snapshots is absurd"


@case
def truncated(p):
    os.truncate(p, 50)
    return "truncated"


@case
def truncated_tables(p):
    os.truncate(p, CS + 100)
    return "past the end"


@case
def corrupt_bit(p):
    _patch(p, 72, struct.pack(">Q", 1 << 1))
    return "corrupt"


@pytest.mark.parametrize("mutate", CASES, ids=[c.__name__ for c in CASES])
def test_hostile(tmp_path, mutate):
    p = _img(tmp_path)
    other = tmp_path / "neighbour.bin"
    other.write_bytes(os.urandom(4096))
    want = mutate(p)
    size_before = p.stat().st_size
    before = _digest([other])
    try:
        _exercise(p)
    except DiskError as e:
        msg = str(e)
        assert str(p) in msg or "h.qcow2" in msg
        if want:
            assert want.lower() in msg.lower(), msg
    else:
        assert want is None, f"no error for {mutate.__name__}"
    assert _digest([other]) == before
    # the image never grows absurdly (no write at a hostile offset)
    assert p.stat().st_size < size_before + (64 << 20)


def test_metadata_never_overwritten_by_data(tmp_path):
    """With refcounts zeroed, new allocations must avoid the header, L1, refcount
    table/blocks and L2 tables."""
    p = _img(tmp_path)
    refcount_zero_for_metadata(p)
    with Qcow2File(p, False) as d:
        h = d.header
        meta_before = p.read_bytes()[:h.l1_table_offset + 8]
        with contextlib.suppress(DiskError):
            write(d, 3 << 20, b"\x03" * (CS * 3))
    assert p.read_bytes()[:h.l1_table_offset + 8][:72] == meta_before[:72]


def test_backing_loop(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_image(a, 1 << 20)
    create_image(b, 1 << 20, backing_file="a.qcow2")
    # make a's backing file b: a -> b -> a
    _set_backing(a, "b.qcow2")
    from vmmcore.disk import open_disk

    with pytest.raises(DiskError, match="loop|deeper"):
        open_disk(a)


def test_backing_self_loop(tmp_path):
    a = tmp_path / "a.qcow2"
    create_image(a, 1 << 20)
    _set_backing(a, "a.qcow2")
    with pytest.raises(DiskError, match="loop"):
        Qcow2Format().open(a, read_only=True, opener=lambda *x, **k: None)


def test_backing_missing(tmp_path):
    a = tmp_path / "a.qcow2"
    create_image(a, 1 << 20)
    _set_backing(a, "nope.qcow2")
    from vmmcore.disk import open_disk

    with pytest.raises(DiskError, match="nope.qcow2"):
        open_disk(a)


def test_backing_url_refused(tmp_path):
    a = tmp_path / "a.qcow2"
    create_image(a, 1 << 20)
    _set_backing(a, "nbd://evil/x")
    from vmmcore.disk import open_disk

    with pytest.raises(DiskError, match="local files"):
        open_disk(a)


def _set_backing(p, name):
    data = name.encode()
    off = 1024
    _patch(p, off, data)
    _patch(p, 8, struct.pack(">QI", off, len(data)))


def test_out_of_range_requests(tmp_path):
    p = _img(tmp_path)
    with Qcow2File(p, False) as d:
        for off, n in [(d.size, 1), (-1, 1), (d.size - 10, 11)]:
            with pytest.raises(DiskError):
                d.read_into(off, [memoryview(bytearray(n))])
            with pytest.raises(DiskError):
                write(d, off, bytes(n))
        with pytest.raises(DiskError):
            d.resize(1 << 62)


def test_read_only_refuses_writes(tmp_path):
    p = _img(tmp_path)
    before = p.read_bytes()
    with Qcow2File(p, True) as d:
        for op in (lambda: write(d, 0, b"x"), lambda: d.discard(0, CS),
                   lambda: d.write_zeroes(0, CS), lambda: d.resize(1 << 30)):
            with pytest.raises(DiskError):
                op()
    assert p.read_bytes() == before


def test_not_found(tmp_path):
    with pytest.raises(DiskError, match="cannot open"):
        Qcow2File(tmp_path / "missing.qcow2", True)
