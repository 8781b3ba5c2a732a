"""virtio-blk over the raw format, built by the plugin factory as `vmm run` builds it:
effects of guest requests on the host file (sparse images, holes, O_DIRECT)."""

from __future__ import annotations

import os
import random

import pytest
from blk_rig import BlkRig, MiB, header, segment
from vmm_virtio_blk.device import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_WRITE_ZEROES,
    create,
    default_id,
)

from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.plugin_api import DeviceContext
from vmmcore.registry import Registry

pytest.importorskip("vmm_raw")

OK, IOERR = VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR
SIZE = 64 * MiB


def blocks(path) -> int:
    return os.stat(path).st_blocks


@pytest.fixture
def sparse(tmp_path):
    p = tmp_path / "sparse.img"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


@pytest.fixture
def build(engine):
    """Build the device as `vmm run` does, on the engine under test."""
    rigs = []

    def make(spelling: str, value: str) -> BlkRig:
        [d] = collect_devices(DeviceArgs([(spelling, f"{value},engine={engine}")]),
                              registry=Registry())
        dev = create(dict(d.options), DeviceContext(name="virtio_blk0", index=0,
                                                     mem_size=1 << 30))
        assert dev.engine == engine
        rig = BlkRig(dev)
        rig.activate()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def test_sparse_image_through_the_device(sparse, build):
    rig = build("--rwdisk", str(sparse))
    dev = rig.device
    assert dev.capacity == SIZE // 512
    assert dev.features() >> VIRTIO_BLK_F_DISCARD & 1
    assert dev.features() >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert rig.do([header(VIRTIO_BLK_T_GET_ID)], [20, 1]).data == default_id(sparse)
    assert blocks(sparse) == 0
    assert rig.do_read(12345, 8192).data == bytes(8192)      # holes read as zeroes
    assert blocks(sparse) == 0                                # and stay holes
    data = os.urandom(MiB)
    assert rig.do_write(2048, data).status == OK             # at 1 MiB
    assert rig.do([header(VIRTIO_BLK_T_FLUSH)], [1]).status == OK
    assert blocks(sparse) >= MiB // 512
    with open(sparse, "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == data
    assert os.path.getsize(sparse) == SIZE


def test_discard_frees_host_blocks(sparse, build):
    rig = build("--rwdisk", str(sparse))
    assert rig.do_write(0, os.urandom(2 * MiB)).status == OK
    full = blocks(sparse)
    req = rig.do([header(VIRTIO_BLK_T_DISCARD), segment(0, 2048), segment(2048, 1024)], [1])
    assert req.status == OK
    assert blocks(sparse) <= full - (3 * MiB // 2) // 512 + 16
    assert rig.do_read(0, MiB + MiB // 2).data == bytes(MiB + MiB // 2)
    assert os.path.getsize(sparse) == SIZE


def test_write_zeroes_effects(sparse, build):
    rig = build("--rwdisk", str(sparse))
    data = os.urandom(4 * MiB)
    assert rig.do_write(0, data).status == OK
    allocated = blocks(sparse)
    # without UNMAP: zeroes, space stays allocated (ZERO_RANGE)
    assert rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(1, 2047)], [1]).status == OK
    # with UNMAP (may_unmap is set): the range becomes a hole
    assert rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(4096, 4096, 1)],
                  [1]).status == OK
    assert blocks(sparse) <= allocated - (2 * MiB) // 512 + 16
    with open(sparse, "rb") as f:
        content = f.read(4 * MiB)
    assert content[:512] == data[:512]
    assert content[512:MiB] == bytes(MiB - 512)
    assert content[MiB:2 * MiB] == data[MiB:2 * MiB]
    assert content[2 * MiB:] == bytes(2 * MiB)


def test_sparse_false_keeps_blocks(sparse, build):
    rig = build("--device", f"virtio_blk:path={sparse},sparse=false")
    assert not rig.device.features() >> VIRTIO_BLK_F_DISCARD & 1
    assert rig.do_write(0, os.urandom(MiB)).status == OK
    allocated = blocks(sparse)
    # the driver may still ask for UNMAP; the device must not deallocate
    assert rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 2048, 1)], [1]).status == OK
    assert blocks(sparse) >= allocated - 16
    with open(sparse, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_read_only_disk_leaves_the_file_alone(tmp_path, build):
    p = tmp_path / "ro.img"
    data = os.urandom(MiB)
    p.write_bytes(data)
    rig = build("--disk", str(p))
    assert rig.device.read_only and rig.device.disk.read_only
    assert rig.do_read(8, 4096).data == data[4096:8192]
    assert rig.do_write(8, os.urandom(4096)).status == IOERR
    assert rig.do([header(VIRTIO_BLK_T_DISCARD), segment(0, 8)], [1]).status == IOERR
    assert rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8)], [1]).status == IOERR
    assert p.read_bytes() == data


@pytest.mark.parametrize("direct", [False, True])
def test_32_in_flight_random_io_matches_the_host_file(tmp_path, build, direct):
    p = tmp_path / "data.img"
    size = 16 * MiB
    model = bytearray(os.urandom(size))
    p.write_bytes(model)
    try:
        rig = build("--device", f"virtio_blk:path={p},direct={str(direct).lower()}")
    except Exception as e:  # no O_DIRECT on this file system
        if direct:
            pytest.skip(f"O_DIRECT unavailable: {e}")
        raise
    rng = random.Random(7)
    slots = size // (64 << 10)
    for _ in range(10):
        reqs = []
        for slot in rng.sample(range(slots), 32):       # 32 disjoint 64 KiB slots
            length = 512 * rng.randrange(1, 129)
            sector = slot * 128 + rng.randrange(0, 129 - length // 512)
            start = sector * 512
            if rng.random() < 0.5:
                data = os.urandom(length)
                model[start:start + length] = data
                # split the data over several descriptors
                cut = rng.randrange(0, length + 1)
                out = [header(1, sector)] + [b for b in (data[:cut], data[cut:]) if b]
                reqs.append(("w", rig.submit(out, [1], kick=False), start, length))
            else:
                reqs.append(("r", rig.read(sector, length, kick=False), start, length))
        rig.drivers[0].kick_evt.write(1)
        done = rig.wait(32)
        assert [r.status for r in done] == [OK] * 32
        for kind, req, start, length in reqs:
            if kind == "r":
                assert req.data == bytes(model[start:start + length])
    assert rig.do([header(VIRTIO_BLK_T_FLUSH)], [1]).status == OK
    assert p.read_bytes() == bytes(model)
