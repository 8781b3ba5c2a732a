"""Interop with Debian's qemu-utils: qemu-img writes -> we read; we write -> qemu reads."""

from __future__ import annotations

import os
import random

import pytest
from qhelp import (
    needs_qemu,
    open_chain,
    pattern,
    qcheck,
    qimg,
    qio,
    raw_available,
    read_all,
    write,
)
from vmm_qcow2.create import create_image
from vmm_qcow2.image import Qcow2File

pytestmark = needs_qemu

MiB = 1 << 20

# (offset, length, byte) writes done by qemu-io, and applied to a model
WRITES = [(0, 4096, 0x11), (100_000, 70_000, 0x22), (3 * MiB + 512, 1536, 0x33),
          (5 * MiB - 1024, 9000, 0x44), (8 * MiB - 512, 512, 0x55)]


def _qemu_fill(path, model):
    cmds = []
    for off, n, b in WRITES:
        cmds.append(f"write -P {b} {off} {n}")
        model[off:off + n] = bytes([b]) * n
    cmds.append("write -z 100352 4096")        # a zero cluster/range in the middle
    model[100352:100352 + 4096] = bytes(4096)
    qio(path, *cmds)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat,refcount_bits", [("1.1", 16), ("0.10", 16), ("1.1", 1),
                                                  ("1.1", 8), ("1.1", 64)])
def test_read_qemu_image(tmp_path, cluster_size, compat, refcount_bits):
    p = tmp_path / "q.qcow2"
    qimg("create", "-f", "qcow2", "-o",
         f"cluster_size={cluster_size},compat={compat},refcount_bits={refcount_bits}", p,
         "8M")
    model = bytearray(8 * MiB)
    _qemu_fill(p, model)
    with Qcow2File(p, True) as d:
        assert d.size == 8 * MiB
        assert d.info()["cluster_size"] == cluster_size
        assert d.info()["refcount_bits"] == refcount_bits
        assert read_all(d) == bytes(model)
        assert d.check().clean


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat,refcount_bits", [("1.1", 16), ("0.10", 16), ("1.1", 1),
                                                  ("1.1", 64)])
def test_write_then_qemu_reads(tmp_path, cluster_size, compat, refcount_bits):
    p = tmp_path / "w.qcow2"
    create_image(p, 8 * MiB, cluster_size=cluster_size, compat=compat,
                 refcount_bits=refcount_bits)
    model = bytearray(8 * MiB)
    with Qcow2File(p, False) as d:
        for off, n, b in WRITES:
            write(d, off, bytes([b]) * n)
            model[off:off + n] = bytes([b]) * n
        d.write_zeroes(100_000, 10_000)
        model[100_000:110_000] = bytes(10_000)
        d.flush()
    qcheck(p)
    cmds = [f"read -P {b} {off} {n}" for off, n, b in WRITES if not
            (off < 110_000 and off + n > 100_000)]
    qio(p, *cmds, "read -P 0 100000 10000")
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    r = qimg("compare", "-f", "qcow2", "-F", "raw", p, raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    info = qimg("info", "--output=json", p).stdout
    assert f'"cluster-size": {cluster_size}' in info


def test_many_random_writes_qemu_compare(tmp_path):
    p = tmp_path / "r.qcow2"
    size = 32 * MiB
    create_image(p, size, cluster_size=4096)
    rnd = random.Random(7)
    model = bytearray(size)
    with Qcow2File(p, False) as d:
        for i in range(300):
            off = rnd.randrange(size - 1)
            n = min(size - off, rnd.choice([1, 511, 4096, 10_000, 70_000, 300_000]))
            data = pattern(n, i)
            write(d, off, data)
            model[off:off + n] = data
        assert read_all(d) == bytes(model)
    qcheck(p)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    r = qimg("compare", "-f", "qcow2", "-F", "raw", p, raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_read_compressed(tmp_path, ctype, cluster_size):
    if ctype == "zstd":
        pytest.importorskip("zstandard", reason="zstd clusters need the zstandard package "
                            "(a dependency of vmm-qcow2; tox installs plugins --no-deps)")
    src = tmp_path / "src.raw"
    data = bytearray(4 * MiB)
    for i in range(0, len(data), 8192):         # compressible but not constant
        data[i:i + 100] = pattern(100, i)
    data[MiB:MiB + 65536] = os.urandom(65536)   # incompressible: stored uncompressed
    src.write_bytes(data)
    dst = tmp_path / "c.qcow2"
    qimg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
         f"compression_type={ctype},cluster_size={cluster_size}", src, dst)
    with Qcow2File(dst, True) as d:
        assert d.info()["compression_type"] == ctype
        assert read_all(d) == bytes(data)
        # unaligned reads through the compressed clusters
        buf = bytearray(10_000)
        d.read_into(12_345, [memoryview(buf)])
        assert bytes(buf) == bytes(data[12_345:22_345])
        assert d.check().clean
    # overwrite parts of compressed clusters: copy-on-write of the decompressed data
    with Qcow2File(dst, False) as d:
        write(d, 5000, b"\xab" * 3000)
        data[5000:8000] = b"\xab" * 3000
        assert read_all(d) == bytes(data)
    qcheck(dst)
    qio(dst, "read -P 0xab 5000 3000")
    r = qimg("compare", "-F", "raw", dst, src, check=False)
    assert r.returncode == 1     # differs exactly where we wrote
    src.write_bytes(data)
    assert qimg("compare", "-F", "raw", dst, src, check=False).returncode == 0


def test_qemu_backing_chain(tmp_path):
    """base (qcow2) <- mid <- top, relative names, written by qemu; we read."""
    os.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    base = tmp_path / "sub" / "base.qcow2"
    qimg("create", "-f", "qcow2", base, "4M")
    qio(base, "write -P 1 0 4M")
    mid = tmp_path / "sub" / "mid.qcow2"
    qimg("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qio(mid, "write -P 2 65536 65536", "write -z 1M 65536")
    top = tmp_path / "top.qcow2"
    qimg("create", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", top, "6M")
    qio(top, "write -P 3 1000 10")
    expect = bytearray(b"\x01" * (4 * MiB) + bytes(2 * MiB))
    expect[65536:131072] = b"\x02" * 65536
    expect[MiB:MiB + 65536] = bytes(65536)
    expect[1000:1010] = b"\x03" * 10
    os.chdir("/")
    d = open_chain(top)
    try:
        assert d.format_name == "qcow2" and d.size == 6 * MiB
        assert read_all(d) == bytes(expect)
        assert d.info()["backing_file"] == "sub/mid.qcow2"
    finally:
        d.close()


def test_our_overlay_cow_qemu_reads(tmp_path):
    """We create an overlay on a qemu-made base and write partial clusters (COW)."""
    base = tmp_path / "base.qcow2"
    qimg("create", "-f", "qcow2", base, "2M")
    qio(base, "write -P 7 0 2M")
    top = tmp_path / "top.qcow2"
    create_image(top, None, backing_file="base.qcow2")
    d = open_chain(top, read_only=False)
    try:
        assert d.size == 2 * MiB
        write(d, 100, b"\x09" * 50)            # partial cluster: rest copied from base
        d.write_zeroes(65536, 65536)           # whole cluster: zero flag over the base
        d.discard(131072 * 2, 65536)           # discard over a backing file
    finally:
        d.close()
    qcheck(top)
    qio(top, "read -P 7 0 100", "read -P 9 100 50", "read -P 7 150 65386",
        "read -P 0 65536 65536", "read -P 7 131072 65536")
    info = qimg("info", "--output=json", top).stdout
    assert '"backing-filename": "base.qcow2"' in info
    assert '"backing-filename-format": "qcow2"' in info


@pytest.mark.skipif(not raw_available(), reason="the raw format plugin is not implemented")
def test_raw_backing(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(b"\x05" * MiB)
    top = tmp_path / "top.qcow2"
    qimg("create", "-f", "qcow2", "-b", "base.img", "-F", "raw", top)
    qio(top, "write -P 6 4096 4096")
    d = open_chain(top)
    try:
        expect = bytearray(b"\x05" * MiB)
        expect[4096:8192] = b"\x06" * 4096
        assert read_all(d) == bytes(expect)
    finally:
        d.close()


def test_snapshots(tmp_path):
    p = tmp_path / "s.qcow2"
    qimg("create", "-f", "qcow2", p, "4M")
    qio(p, "write -P 1 0 4M")
    qimg("snapshot", "-c", "first", p)
    qio(p, "write -P 2 0 1M")
    qimg("snapshot", "-c", "second", p)
    with Qcow2File(p, True) as d:
        names = [s["name"] for s in d.info()["snapshots"]]
        assert names == ["first", "second"]
        assert d.check().clean
    # the active image is written by us while snapshots share its clusters
    with Qcow2File(p, False) as d:
        write(d, 512, b"\x03" * 1000)          # shared cluster: copy on write
        write(d, 3 * MiB, b"\x04" * 70_000)
        d.discard(2 * MiB, 65536)
        d.write_zeroes(MiB, 65536)
        expect = bytearray(b"\x02" * MiB + b"\x01" * 3 * MiB)
        expect[512:1512] = b"\x03" * 1000
        expect[3 * MiB:3 * MiB + 70_000] = b"\x04" * 70_000
        expect[MiB:MiB + 65536] = bytes(65536)
        got = read_all(d)
        assert got[:2 * MiB] == bytes(expect[:2 * MiB])
        assert got[2 * MiB + 65536:] == bytes(expect[2 * MiB + 65536:])
        assert d.check().clean
    qcheck(p)
    # the snapshots still hold their data
    out = tmp_path / "first.raw"
    qimg("convert", "-l", "snapshot.name=first", "-O", "raw", p, out)
    assert out.read_bytes() == b"\x01" * 4 * MiB
    qimg("convert", "-l", "snapshot.name=second", "-O", "raw", p, out)
    assert out.read_bytes() == b"\x02" * MiB + b"\x01" * 3 * MiB


def test_lazy_refcounts_dirty_repaired(tmp_path):
    p = tmp_path / "l.qcow2"
    qimg("create", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "4M")
    # qemu-io dies (SIGKILL via sigraise) with the dirty bit set and refcounts stale
    qio(p, "write -P 8 0 1M", "sigraise 9", check=False)
    info = qimg("info", "--output=json", "-U", p).stdout
    assert '"dirty-flag": true' in info
    with Qcow2File(p, True) as d:                # read-only: no repair, data readable
        assert d.info()["dirty"]
        buf = bytearray(MiB)
        d.read_into(0, [memoryview(buf)])
        assert bytes(buf) == b"\x08" * MiB
    with Qcow2File(p, False) as d:               # read-write: refcounts rebuilt
        assert not d.info()["dirty"]
        assert d.check().clean
        write(d, 2 * MiB, b"\x09" * 4096)
    assert qcheck(p).get("leaks", 0) == 0
    qio(p, "read -P 8 0 1M", "read -P 9 2M 4096")


def test_resize(tmp_path):
    p = tmp_path / "g.qcow2"
    create_image(p, MiB, cluster_size=512)
    with Qcow2File(p, False) as d:
        write(d, MiB - 100, b"\x01" * 100)
        d.resize(300 * MiB)         # grows the L1 table (512-byte clusters: 64 KiB per L2)
        write(d, 299 * MiB, b"\x02" * 4096)
        d.resize(MiB - 50)          # shrink: the tail cluster's bytes past the end ...
        d.resize(2 * MiB)           # ... read as zeroes when it grows again
        buf = bytearray(200)
        d.read_into(MiB - 150, [memoryview(buf)])
        assert bytes(buf) == bytes(50) + b"\x01" * 50 + bytes(100)
    qcheck(p)
    assert '"virtual-size": 2097152' in qimg("info", "--output=json", p).stdout
    qio(p, "read -P 1 1048476 50", "read -P 0 1048526 50")


def test_refcount_table_growth(tmp_path):
    """512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, so a
    few MiB of data need many blocks and several refcount-table growths."""
    p = tmp_path / "t.qcow2"
    create_image(p, 16 * MiB, cluster_size=512, refcount_bits=64)
    data = pattern(6 * MiB, 3)
    with Qcow2File(p, False) as d:
        for off in range(0, len(data), 256 * 1024):
            write(d, off, data[off:off + 256 * 1024])
        assert d.header.refcount_table_clusters > 1
        assert d.check().clean
    qcheck(p)
    raw = tmp_path / "m.raw"
    raw.write_bytes(data + bytes(10 * MiB))
    assert qimg("compare", "-F", "raw", p, raw, check=False).returncode == 0


def test_our_deep_chain_qemu_compares(tmp_path):
    """A chain of 12 images made and written by us; qemu reads it through its chain."""
    size = 2 * MiB
    expect = bytearray(size)
    prev = None
    for level in range(12):
        p = tmp_path / f"l{level}.qcow2"
        create_image(p, size, cluster_size=4096,
                     backing_file=prev.name if prev else None)
        d = open_chain(p, read_only=False)
        try:
            off = level * 150_000 + 1234
            data = pattern(70_000, level)
            write(d, off, data)
            expect[off:off + 70_000] = data
            assert read_all(d) == bytes(expect)
        finally:
            d.close()
        prev = p
    qcheck(prev)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    assert qimg("compare", "-F", "raw", prev, raw, check=False).returncode == 0


def test_large_virtual_size(tmp_path):
    p = tmp_path / "big.qcow2"
    create_image(p, 1 << 40)
    with Qcow2File(p, False) as d:
        write(d, (1 << 40) - 4096, b"\x07" * 4096)
        write(d, 3 << 30, b"\x08" * 512)
    qcheck(p)
    qio(p, f"read -P 7 {(1 << 40) - 4096} 4096", f"read -P 8 {3 << 30} 512",
        "read -P 0 0 64k")
    assert p.stat().st_size < 2 * MiB


def test_snapshots_v2(tmp_path):
    p = tmp_path / "s2.qcow2"
    qimg("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", p, "1M")
    qio(p, "write -P 1 0 1M")
    qimg("snapshot", "-c", "s", p)
    with Qcow2File(p, False) as d:
        write(d, 100, b"\x02" * 10_000)
    qcheck(p)
    qio(p, "read -P 1 0 100", "read -P 2 100 10000", "read -P 1 10100 1038476")
    out = tmp_path / "s.raw"
    qimg("convert", "-l", "snapshot.name=s", "-O", "raw", p, out)
    assert out.read_bytes() == b"\x01" * MiB
