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
    assert rec.status == "not implemented yet"


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
])
def test_bad_options(img, opts, message):
    with pytest.raises(ConfigError, match=message):
        _select(("--block", f"{img},{opts}"))


def test_not_implemented_yet(img):
    with pytest.raises(ConfigError, match="device virtio_blk .* is not implemented yet"):
        collect_devices(DeviceArgs([("--rwdisk", str(img))]), registry=Registry())
