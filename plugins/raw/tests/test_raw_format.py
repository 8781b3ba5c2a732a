"""The raw disk format: data paths, sparse files, discard/write-zeroes, O_DIRECT, errors."""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import random
import threading

import pytest
import vmm_raw.raw as raw_mod
from vmm_raw.raw import IOV_MAX, RawDisk, RawFormat

from vmmcore.disk import DiskCapabilities, DiskError, open_disk

MiB = 1 << 20


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "disk.img"
    data = os.urandom(MiB)
    p.write_bytes(data)
    return p, data


def blocks(path) -> int:
    return os.stat(path).st_blocks


def test_open_disk_detects_and_selects_raw(img):
    path, data = img
    for fmt in (None, "raw"):
        with open_disk(path, fmt) as d:
            assert isinstance(d, RawDisk) and d.format_name == "raw"
            assert d.size == MiB and not d.read_only
            assert d.capabilities() == DiskCapabilities(discard=True, write_zeroes=True,
                                                        resize=True, sparse=True)
            assert d.info()["format"] == "raw" and d.info()["virtual_size"] == MiB


def test_read_write_scatter_gather(img):
    path, data = img
    with open_disk(path) as d:
        bufs = [bytearray(n) for n in (1, 511, 4096, 3000)]
        total = sum(len(b) for b in bufs)
        assert d.read_into(1000, [memoryview(b) for b in bufs]) == total
        assert b"".join(bufs) == data[1000:1000 + total]
        new = os.urandom(7000)
        assert d.write_from(5, [memoryview(new)[:10], memoryview(new)[10:]]) == 7000
    assert path.read_bytes()[5:7005] == new


def test_more_buffers_than_iov_max(img):
    path, data = img
    n = IOV_MAX + 300
    with open_disk(path) as d:
        bufs = [bytearray(16) for _ in range(n)]
        d.read_into(0, [memoryview(b) for b in bufs])
        assert b"".join(bufs) == data[:16 * n]
        out = [bytes([i & 0xFF]) * 16 for i in range(n)]
        d.write_from(0, [memoryview(b) for b in out])
    assert path.read_bytes()[:16 * n] == b"".join(out)


def test_short_transfers_are_resumed(img, monkeypatch):
    path, data = img
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short_preadv(fd, bufs, offset):       # at most 100 bytes per call
        budget, cut = 100, []
        for b in bufs:
            if budget <= 0:
                break
            cut.append(b[:budget])
            budget -= len(cut[-1])
        return real_preadv(fd, cut, offset)

    def short_pwritev(fd, bufs, offset):
        return real_pwritev(fd, [bytes(b)[:77] for b in bufs[:1]], offset)

    monkeypatch.setattr(raw_mod.os, "preadv", short_preadv)
    monkeypatch.setattr(raw_mod.os, "pwritev", short_pwritev)
    with open_disk(path) as d:
        bufs = [bytearray(300), bytearray(450)]
        d.read_into(123, [memoryview(b) for b in bufs])
        assert b"".join(bufs) == data[123:873]
        new = os.urandom(1000)
        d.write_from(4096, [memoryview(new[:400]), memoryview(new[400:])])
    assert path.read_bytes()[4096:5096] == new


def test_reads_past_eof_of_a_short_file_are_zeroes(img):
    path, data = img
    with open_disk(path) as d:
        os.truncate(path, 4096)          # the file shrinks behind the disk's back
        buf = bytearray(8192)
        d.read_into(0, [memoryview(buf)])
        assert buf[:4096] == data[:4096] and buf[4096:] == bytes(4096)
        buf = bytearray(512)
        d.read_into(MiB - 512, [memoryview(buf)])
        assert buf == bytes(512)


def test_out_of_range_is_a_disk_error(img):
    path, _ = img
    with open_disk(path) as d:
        for off, n in ((MiB, 1), (MiB - 1, 2), (-1, 1), (2**64, 512)):
            with pytest.raises(DiskError, match="outside the"):
                d.read_into(off, [memoryview(bytearray(n))])
            with pytest.raises(DiskError, match="outside the"):
                d.write_from(off, [memoryview(bytes(n))])
        with pytest.raises(DiskError):
            d.discard(MiB - 512, 1024)
        with pytest.raises(DiskError):
            d.write_zeroes(MiB, 512)


def test_read_only(img):
    path, data = img
    with open_disk(path, read_only=True) as d:
        assert d.read_only
        assert fcntl.fcntl(d.fds()[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert d.capabilities() == DiskCapabilities(sparse=True)
        buf = bytearray(512)
        d.read_into(0, [memoryview(buf)])
        assert buf == data[:512]
        for op in (lambda: d.write_from(0, [memoryview(bytes(512))]),
                   lambda: d.discard(0, 512), lambda: d.write_zeroes(0, 512),
                   lambda: d.resize(2 * MiB)):
            with pytest.raises(DiskError, match="read-only"):
                op()
        d.flush()                                  # harmless
    assert path.read_bytes() == data


def test_read_only_file_opens_read_only(img):
    path, _ = img
    path.chmod(0o444)
    if os.geteuid() != 0:
        with pytest.raises(DiskError, match="cannot open raw disk image .* read-write"):
            open_disk(path)
    with open_disk(path, read_only=True) as d:
        assert d.size == MiB


def test_sparse_image_reads_zeroes(tmp_path):
    p = tmp_path / "sparse.img"
    RawFormat().create(p, 1 << 30)
    assert os.path.getsize(p) == 1 << 30 and blocks(p) == 0
    with open_disk(p) as d:
        buf = bytearray(b"\xff" * 65536)
        d.read_into(500 * MiB, [memoryview(buf)])
        assert buf == bytes(65536)
        d.write_from(700 * MiB, [memoryview(b"x" * 4096)])
    assert 0 < blocks(p) <= 64


def test_discard_punches_a_hole(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(os.urandom(4 * MiB))
    before = blocks(p)
    with open_disk(p) as d:
        d.discard(MiB, 2 * MiB)
        d.flush()
        buf = bytearray(2 * MiB)
        d.read_into(MiB, [memoryview(buf)])
    assert buf == bytes(2 * MiB)
    assert os.path.getsize(p) == 4 * MiB                       # KEEP_SIZE
    assert blocks(p) <= before - (2 * MiB // 512) + 16


def test_write_zeroes(tmp_path):
    p = tmp_path / "z.img"
    data = os.urandom(4 * MiB)
    p.write_bytes(data)
    with open_disk(p) as d:
        d.write_zeroes(512, MiB)                              # ZERO_RANGE: stays allocated
        kept = blocks(p)
        d.write_zeroes(2 * MiB, MiB, may_unmap=True)           # unmapped: a hole
    content = p.read_bytes()
    assert content[:512] == data[:512]
    assert content[512:512 + MiB] == bytes(MiB)
    assert content[512 + MiB:2 * MiB] == data[512 + MiB:2 * MiB]
    assert content[2 * MiB:3 * MiB] == bytes(MiB)
    assert content[3 * MiB:] == data[3 * MiB:]
    assert os.path.getsize(p) == 4 * MiB
    assert blocks(p) <= kept - (MiB // 512) + 16


def test_fallbacks_when_fallocate_is_unsupported(img, monkeypatch, caplog):
    path, data = img

    def nope(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(raw_mod, "fallocate", nope)
    with open_disk(path) as d, caplog.at_level(logging.WARNING):
        d.write_zeroes(4096, 3 * MiB // 4, may_unmap=True)     # written as zero bytes
        d.discard(0, 4096)                                     # advisory: ignored
        d.discard(0, 4096)
    content = path.read_bytes()
    assert content[4096:4096 + 3 * MiB // 4] == bytes(3 * MiB // 4)
    assert content[:4096] == data[:4096]
    assert caplog.text.count("cannot punch holes") == 1


def test_fallocate_hard_error_is_a_disk_error(img, monkeypatch):
    path, _ = img

    def eio(fd, mode, offset, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(raw_mod, "fallocate", eio)
    with open_disk(path) as d:
        with pytest.raises(DiskError, match="discard .* failed: Input/output error"):
            d.discard(0, 4096)
        with pytest.raises(DiskError, match="write-zeroes .* failed"):
            d.write_zeroes(0, 4096)


def test_resize(img):
    path, data = img
    with open_disk(path) as d:
        d.resize(2 * MiB)
        assert d.size == 2 * MiB and os.path.getsize(path) == 2 * MiB
        buf = bytearray(512)
        d.read_into(2 * MiB - 512, [memoryview(buf)])
        assert buf == bytes(512)
        d.resize(4096)
        assert d.size == 4096
        with pytest.raises(DiskError):
            d.read_into(4096, [memoryview(bytearray(1))])
        with pytest.raises(DiskError, match="invalid size"):
            d.resize(-1)
    assert path.read_bytes() == data[:4096]


@pytest.mark.parametrize("case", ["aligned", "unaligned_memory", "unaligned_offset",
                                  "large_unaligned"])
def test_direct_io(img, case, monkeypatch):
    path, data = img
    monkeypatch.setattr(raw_mod, "CHUNK", 64 << 10)      # several bounce rounds
    try:
        d = open_disk(path, direct=True)
    except DiskError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    with d:
        assert d.direct and len(d.fds()) == 2
        assert fcntl.fcntl(d.fds()[1], fcntl.F_GETFL) & os.O_DIRECT
        if case == "aligned":
            m = mmap.mmap(-1, 8192)
            views = [memoryview(m)[:4096], memoryview(m)[4096:]]
            offset = 8192
        elif case == "unaligned_memory":
            raw = bytearray(8192 + 1)
            views = [memoryview(raw)[1:4097], memoryview(raw)[4097:]]
            offset = 4096
        elif case == "unaligned_offset":
            raw = bytearray(1536)
            views = [memoryview(raw)]
            offset = 512
        else:                                              # several bounce chunks
            raw = bytearray(MiB // 2 + 3)
            views = [memoryview(raw)[3:]]
            offset = 0
        total = sum(v.nbytes for v in views)
        d.read_into(offset, views)
        assert b"".join(bytes(v) for v in views) == data[offset:offset + total]
        new = os.urandom(total)
        pos = 0
        for v in views:
            v[:] = new[pos:pos + v.nbytes]
            pos += v.nbytes
        d.write_from(offset, views)
        for v in views:
            v.release()
        check = bytearray(total)
        d.read_into(offset, [memoryview(check)])
        assert check == new
    assert path.read_bytes()[offset:offset + total] == new


def test_direct_is_refused_by_formats_without_it(img, monkeypatch):
    import vmmcore.disk as disk_mod

    class NoDirect(RawFormat):
        def open(self, path, *, read_only, opener):
            return RawDisk(path, read_only)

    monkeypatch.setattr(disk_mod, "_formats", lambda: {"raw": (None, NoDirect)})
    path, _ = img
    with pytest.raises(DiskError, match="does not support direct=true"):
        open_disk(path, direct=True)
    open_disk(path).close()


def test_concurrent_io_from_many_threads(tmp_path):
    p = tmp_path / "c.img"
    size = 4 * MiB
    model = bytearray(os.urandom(size))
    p.write_bytes(model)
    errors = []
    lock = threading.Lock()
    with open_disk(p) as d:
        def worker(seed: int) -> None:
            rng = random.Random(seed)
            region = seed * (size // 16)             # each thread owns a region
            try:
                for _ in range(200):
                    off = region + 512 * rng.randrange(0, (size // 16 - 8192) // 512)
                    n = 512 * rng.randrange(1, 16)
                    if rng.random() < 0.5:
                        new = os.urandom(n)
                        d.write_from(off, [memoryview(new)])
                        with lock:
                            model[off:off + n] = new
                    else:
                        buf = bytearray(n)
                        d.read_into(off, [memoryview(buf)])
                        with lock:
                            expect = bytes(model[off:off + n])
                        assert buf == expect
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        d.flush()
    assert not errors, errors[0]
    assert p.read_bytes() == bytes(model)


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(DiskError, match="cannot open raw disk image .*missing.img"):
        open_disk(tmp_path / "missing.img", "raw")
    with pytest.raises(DiskError, match="cannot open raw disk image"):
        RawFormat().open(tmp_path / "missing.img", read_only=True)
    with pytest.raises(DiskError, match="cannot open raw disk image .*Is a directory"):
        RawFormat().open(tmp_path, read_only=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)          # so opening does not block
    try:
        with pytest.raises(DiskError, match="neither a regular file nor a block device"):
            RawFormat().open(fifo, read_only=True)
    finally:
        os.close(fd)


def test_create(tmp_path):
    p = tmp_path / "new.img"
    RawFormat().create(p, 10 * MiB)
    assert os.path.getsize(p) == 10 * MiB
    with pytest.raises(DiskError, match="cannot create raw image"):
        RawFormat().create(p, MiB)
    with pytest.raises(DiskError, match="take no options"):
        RawFormat().create(tmp_path / "x.img", MiB, cluster_size=65536)


def test_closed_disk(img):
    path, _ = img
    d = open_disk(path)
    d.close()
    d.close()                                      # idempotent
    assert d.fds() == []
    with pytest.raises(DiskError, match="is closed"):
        d.read_into(0, [memoryview(bytearray(512))])


def test_direct_alignment_adapts_after_einval(img, monkeypatch):
    """A device with 4 KiB sectors refuses 512-aligned O_DIRECT: switch to 4 KiB."""
    path, data = img
    try:
        d = open_disk(path, direct=True)
    except DiskError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    real = os.preadv
    refused = []

    def picky(fd, bufs, offset):
        if fd == d.fds()[1] and (offset % 4096 or sum(len(b) for b in bufs) % 4096):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(raw_mod.os, "preadv", picky)
    with d:
        m = mmap.mmap(-1, 8192)
        view = memoryview(m)
        d.read_into(512, [view[:1024]])           # 512-aligned: refused, then buffered
        assert refused == [512] and d._align == 4096
        assert bytes(view[:1024]) == data[512:1536]
        d.read_into(4096, [view[:4096]])          # 4 KiB aligned: straight through
        assert refused == [512] and bytes(view[:4096]) == data[4096:8192]
        view.release()
