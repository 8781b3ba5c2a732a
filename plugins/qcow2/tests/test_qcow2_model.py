"""Property tests: random write/discard/write-zeroes/resize sequences against a model
bytearray, on assorted geometries, with and without a backing file; then our own check
and qemu-img check must find the image consistent. Also concurrent writers/readers."""

from __future__ import annotations

import random
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qhelp import QEMU_IMG, pattern, qcheck, qimg, read_all, write
from vmm_qcow2.create import create_image
from vmm_qcow2.image import Qcow2File

SIZE = 1 << 20

ops = st.lists(
    st.tuples(st.sampled_from(["write", "write", "discard", "zero", "zero_unmap",
                               "resize", "flush", "reopen"]),
              st.integers(0, SIZE - 1), st.integers(1, 200_000), st.integers(0, 255)),
    min_size=1, max_size=25)

geometries = st.sampled_from([(512, 16, "1.1"), (512, 1, "1.1"), (4096, 64, "1.1"),
                              (4096, 16, "0.10"), (65536, 8, "1.1"), (2048, 2, "1.1")])


def _opener(path, fmt=None, *, read_only=True):
    return Qcow2File(path, read_only, _opener)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=ops, geo=geometries, with_backing=st.booleans())
def test_random_sequences(tmp_path_factory, seq, geo, with_backing):
    tmp = tmp_path_factory.mktemp("m")
    cs, rb, compat = geo
    model = bytearray(SIZE)
    backing = None
    if with_backing:
        backing = tmp / "base.qcow2"
        create_image(backing, SIZE + 70_000, cluster_size=4096)
        with Qcow2File(backing, False) as b:
            base = pattern(SIZE + 70_000, 99)
            write(b, 0, base)
        model[:] = base[:SIZE]
    p = tmp / "t.qcow2"
    create_image(p, SIZE, cluster_size=cs, refcount_bits=rb, compat=compat,
                 backing_file="base.qcow2" if backing else None, opener=_opener)
    d = Qcow2File(p, False, _opener)
    try:
        for i, (op, off, n, val) in enumerate(seq):
            size = d.size
            off = off % size
            n = min(n, size - off)
            if op == "write":
                data = pattern(n, val + i)
                write(d, off, data)
                model[off:off + n] = data
            elif op in ("zero", "zero_unmap"):
                d.write_zeroes(off, n, may_unmap=op == "zero_unmap")
                model[off:off + n] = bytes(n)
            elif op == "discard":
                d.discard(off, n)
                # discarded ranges read as anything: take what the image now says
                buf = bytearray(n)
                d.read_into(off, [memoryview(buf)])
                model[off:off + n] = buf
            elif op == "resize":
                new = max(4096, (off + n) // 512 * 512)
                d.resize(new)
                if new < size:
                    del model[new:]
                else:
                    model.extend(bytes(new - size))
            elif op == "flush":
                d.flush()
            else:
                d.close()
                d = Qcow2File(p, False, _opener)
            assert d.size == len(model)
        assert read_all(d) == bytes(model)
        res = d.check()
        assert res.corruptions == 0, res.errors
        assert res.leaks == 0, res.leaked_clusters
    finally:
        d.close()
    if QEMU_IMG:
        qcheck(p)
        raw = tmp / "model.raw"
        raw.write_bytes(model)
        r = qimg("compare", "-f", "qcow2", "-F", "raw", p, raw, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_concurrent_writers_and_readers(tmp_path):
    p = tmp_path / "c.qcow2"
    size = 8 << 20
    create_image(p, size, cluster_size=4096)
    d = Qcow2File(p, False)
    stripes = 8
    span = size // stripes
    errors = []

    def worker(k):
        try:
            rnd = random.Random(k)
            model = bytearray(span)
            base = k * span
            for i in range(150):
                off = rnd.randrange(span - 1)
                n = min(span - off, rnd.choice([512, 4096, 5000, 65536]))
                r = rnd.random()
                if r < 0.7:
                    data = pattern(n, k * 1000 + i)
                    write(d, base + off, data)
                    model[off:off + n] = data
                elif r < 0.85:
                    d.write_zeroes(base + off, n, may_unmap=True)
                    model[off:off + n] = bytes(n)
                else:
                    buf = bytearray(n)
                    d.read_into(base + off, [memoryview(buf)])
                    assert bytes(buf) == bytes(model[off:off + n])
            buf = bytearray(span)
            d.read_into(base, [memoryview(buf)])
            assert bytes(buf) == bytes(model)
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(stripes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d.close()
    assert not errors, errors
    with Qcow2File(p, True) as d2:
        res = d2.check()
        assert res.corruptions == 0 and res.leaks == 0, res.errors
    if QEMU_IMG:
        qcheck(p)


def test_scatter_gather_buffers(tmp_path):
    """Many small memoryviews (as a descriptor chain gives them) in one request."""
    p = tmp_path / "sg.qcow2"
    create_image(p, 4 << 20, cluster_size=4096)
    data = pattern(3 << 20, 5)
    bufs = []
    pos = 0
    rnd = random.Random(1)
    mv = memoryview(bytearray(data))
    while pos < len(data):
        n = min(len(data) - pos, rnd.choice([1, 7, 512, 4096, 10000]))
        bufs.append(mv[pos:pos + n])
        pos += n
    with Qcow2File(p, False) as d:
        d.write_from(1000, bufs)
        out = bytearray(len(data))
        omv = memoryview(out)
        obufs = [omv[i:i + 3000] for i in range(0, len(out), 3000)]
        d.read_into(1000, obufs)
        assert bytes(out) == data


def test_barriers_mode(tmp_path):
    """barriers=True (fdatasync between the ordered steps) gives the same results."""
    p = tmp_path / "b.qcow2"
    create_image(p, 4 << 20, cluster_size=4096, refcount_bits=64)
    rnd = random.Random(3)
    model = bytearray(4 << 20)
    with Qcow2File(p, False, barriers=True) as d:
        for i in range(60):
            off = rnd.randrange(len(model) - 1)
            n = min(len(model) - off, rnd.choice([100, 4096, 20000]))
            if i % 4 == 3:
                d.write_zeroes(off, n, may_unmap=True)
                model[off:off + n] = bytes(n)
            else:
                data = pattern(n, i)
                write(d, off, data)
                model[off:off + n] = data
        assert read_all(d) == bytes(model)
        assert d.check().clean
