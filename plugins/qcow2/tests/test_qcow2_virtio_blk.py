"""virtio-blk over a qcow2 image, built by the virtio_blk plugin's factory as `vmm run`
builds it: 32 requests in flight from the device's thread pool (writes that allocate,
reads, write-zeroes, discard), then qemu-img checks and compares the image.
Skipped when the virtio_blk plugin is not installed (tox installs one plugin at a time)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("vmm_virtio_blk")
_BLK_TESTS = Path(__file__).resolve().parents[2] / "virtio_blk" / "tests"
if not (_BLK_TESTS / "blk_rig.py").exists():
    pytest.skip("the virtio_blk test rig is not in this tree", allow_module_level=True)
sys.path.insert(0, str(_BLK_TESTS))

from blk_rig import BlkRig, header  # noqa: E402
from qhelp import QEMU_IMG, qcheck, qimg  # noqa: E402
from vmm_qcow2.create import create_image  # noqa: E402
from vmm_virtio_blk.device import (  # noqa: E402
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_WRITE_ZEROES,
    create,
)

from vmmcore.device_options import DeviceArgs, collect_devices  # noqa: E402
from vmmcore.plugin_api import DeviceContext  # noqa: E402
from vmmcore.registry import Registry  # noqa: E402

MiB = 1 << 20


def _rig(path: Path) -> BlkRig:
    [d] = collect_devices(DeviceArgs([("--device", f"virtio_blk:path={path}")]),
                          registry=Registry())
    dev = create(dict(d.options), DeviceContext(name="virtio_blk0", index=0,
                                                 mem_size=1 << 30))
    rig = BlkRig(dev)
    rig.activate()
    return rig


def _range(sector: int, count: int, flags: int = 0) -> bytes:
    import struct

    return struct.pack("<QII", sector, count, flags)


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_in_flight_io_on_qcow2(tmp_path, cluster_size):
    p = tmp_path / "disk.qcow2"
    size = 16 * MiB
    create_image(p, size, cluster_size=cluster_size)
    model = bytearray(size)
    rig = _rig(p)
    try:
        assert type(rig.device.disk).__name__ == "Qcow2File"
        rng = random.Random(cluster_size)
        slots = size // (64 << 10)
        for rnd in range(8):
            reqs = []
            for slot in rng.sample(range(slots), 32):
                length = 512 * rng.randrange(1, 129)
                sector = slot * 128 + rng.randrange(0, 129 - length // 512)
                start = sector * 512
                r = rng.random()
                if r < 0.55:
                    data = rng.randbytes(length)
                    model[start:start + length] = data
                    cut = rng.randrange(0, length + 1)
                    out = [header(1, sector)] + [b for b in (data[:cut], data[cut:]) if b]
                    reqs.append(("w", rig.submit(out, [1], kick=False), start, length))
                elif r < 0.65 and rnd:
                    model[start:start + length] = bytes(length)
                    out = [header(VIRTIO_BLK_T_WRITE_ZEROES),
                           _range(sector, length // 512, 1)]
                    reqs.append(("z", rig.submit(out, [1], kick=False), start, length))
                else:
                    reqs.append(("r", rig.read(sector, length, kick=False), start, length))
            rig.drivers[0].kick_evt.write(1)
            done = rig.wait(32)
            assert [r.status for r in done] == [VIRTIO_BLK_S_OK] * 32
            for kind, req, start, length in reqs:
                if kind == "r":
                    assert req.data == bytes(model[start:start + length])
        # discard the first 4 KiB (reads back as anything): the image stays consistent
        assert rig.do([header(VIRTIO_BLK_T_DISCARD), _range(0, 8)], [1]).status \
            == VIRTIO_BLK_S_OK
        assert rig.do([header(VIRTIO_BLK_T_FLUSH)], [1]).status == VIRTIO_BLK_S_OK
    finally:
        rig.close()
    if QEMU_IMG:
        qcheck(p)
        out = tmp_path / "out.raw"
        qimg("convert", "-O", "raw", p, out)
        assert out.read_bytes()[4096:] == bytes(model[4096:])
