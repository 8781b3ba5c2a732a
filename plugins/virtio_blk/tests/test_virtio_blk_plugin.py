"""The virtio-blk plugin's contract with the core, and crosvm's disk spellings."""

from __future__ import annotations

import pytest
from vmm_virtio_blk.plugin import PLUGIN

from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.errors import ConfigError
from vmmcore.registry import Registry


def test_registered():
    rec = Registry(fresh=True).get("device", "virtio_blk")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.policy_path.name == "virtio_blk.policy"
    assert rec.status == "ok" and PLUGIN.factory == "vmm_virtio_blk.device:create"


def _select(*items):
    return collect_devices(DeviceArgs(list(items)), registry=Registry(),
                           require_implemented=False)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(4096))
    return p


def test_spellings(img):
    block, disk, rwdisk, dev = _select(("--block", f"{img},ro,block_size=4K"),
                                       ("--disk", str(img)), ("--rwdisk", str(img)),
                                       ("--device", f"virtio_blk:path={img},id=serial1"))
    assert block.options["ro"] and block.options["block_size"] == 4096
    assert disk.options["ro"] and not rwdisk.options["ro"]
    assert dev.options["id"] == "serial1" and dev.options["format"] == "auto"
    assert dev.options["sparse"] is True and dev.options["num_queues"] == 1


@pytest.mark.parametrize("opts,message", [
    ("block_size=1536", "block_size=1536 is not a power of two"),
    ("block_size=256", "expected a size .* from 512 to 64K"),
    ("id=" + "x" * 21, "longer than 20 bytes"),
    ("format=vmdk", "format='vmdk' is not an installed disk format"),
    ("num_queues=0", "expected an int from 1 to 16"),
    ("queue_size=100", "queue_size=100 is not a power of two"),
    ("io_threads=0", "expected an int from 1 to 256"),
])
def test_bad_options(img, opts, message):
    with pytest.raises(ConfigError, match=message):
        _select(("--block", f"{img},{opts}"))


def _create(spelling, value, index=0):
    pytest.importorskip("vmm_raw")          # the factory opens the image with a format plugin
    from vmm_virtio_blk.device import create

    from vmmcore.plugin_api import DeviceContext

    [d] = collect_devices(DeviceArgs([(spelling, value)]), registry=Registry())
    ctx = DeviceContext(name=f"virtio_blk{index}", index=index, mem_size=1 << 30)
    return create(dict(d.options), ctx)


def test_factory_builds_the_device(img):
    from vmm_virtio_blk.device import VIRTIO_BLK_F_RO, VirtioBlock, default_id

    dev = _create("--device", f"virtio_blk:path={img},id=data,num_queues=2,block_size=4K")
    try:
        assert isinstance(dev, VirtioBlock) and dev.name == "virtio_blk0"
        assert dev.disk.format_name == "raw" and not dev.read_only
        assert dev.serial == b"data" and dev.queue_max_sizes == (256, 256)
        assert dev.block_size == 4096 and dev.capacity == 8
        assert dev.keep_fds() == dev.disk.fds() != []
    finally:
        dev.shutdown()
    dev = _create("--disk", str(img), index=1)
    try:
        assert dev.read_only and dev.disk.read_only and dev.features() >> VIRTIO_BLK_F_RO & 1
        assert dev.serial == default_id(img) and dev.name == "virtio_blk1"
    finally:
        dev.shutdown()


def test_factory_format_and_direct(img):
    dev = _create("--block", f"{img},format=raw,direct=true")
    try:
        assert dev.disk.direct
    finally:
        dev.shutdown()


def test_factory_errors_are_one_line(tmp_path):
    from vmmcore.errors import VmmError

    p = tmp_path / "ro.img"
    p.write_bytes(bytes(4096))
    p.chmod(0o444)
    import os
    if os.geteuid() == 0:
        pytest.skip("root can open a 0444 file read-write")
    with pytest.raises(VmmError, match="cannot open raw disk image"):
        _create("--rwdisk", str(p))
