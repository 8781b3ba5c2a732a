"""Fixtures for the virtio-blk tests; the rig itself is blk_rig.py (a uniquely named
module, so that test files can import its helpers without clashing with other conftests)."""

from __future__ import annotations

import pytest
from blk_rig import BlkRig, FileDisk, MiB, make_image
from vmm_virtio_blk.device import VirtioBlock

from vmmcore.disk import DiskFile


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    contents = make_image(p, 1 * MiB)
    return p, contents


@pytest.fixture(params=["python", "native"])
def engine(request) -> str:
    """Every device-model test runs on both request engines."""
    return request.param


@pytest.fixture
def rig_factory(engine):
    rigs = []

    def make(disk: DiskFile, activate: bool = True, rig_kw=None, **kw) -> BlkRig:
        kw.setdefault("engine", engine)
        rig = BlkRig(VirtioBlock(disk, **kw), **(rig_kw or {}))
        rigs.append(rig)
        if activate:
            rig.activate()
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def rig(image, rig_factory):
    path, _ = image
    return rig_factory(FileDisk(path), serial="test-serial")
