"""The checks limits3d makes before virglrenderer sees a 3D request, on their own.

The device tests cannot tell them apart from virglrenderer's own checks (both answer
ERR_INVALID_PARAMETER), so with every check here removed they still passed: these
call create_3d_checked and box_checked directly. No virglrenderer needed.
"""

from __future__ import annotations

import pytest
from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.limits3d import (
    PIPE_BUFFER,
    PIPE_TEXTURE_2D,
    PIPE_TEXTURE_2D_ARRAY,
    PIPE_TEXTURE_3D,
    Limits,
    box_checked,
    create_3d_checked,
)
from vmm_virtio_gpu.protocol import GpuError

BGRA = p.FORMAT_B8G8R8A8_UNORM
TEX = Limits(1, PIPE_TEXTURE_2D, BGRA, 2, 64, 48, last_level=2)
ARRAY = Limits(2, PIPE_TEXTURE_2D_ARRAY, BGRA, 2, 16, 8, array_size=4)
BUF = Limits(3, PIPE_BUFFER, 64, 16, 4096, 1)
FULL = 64 * 48 * 4


@pytest.mark.parametrize("limits, backing, box, offset, level, stride, layer", [
    (TEX, FULL, (0, 0, 0, 65, 48, 1), 0, 0, 0, 0),                  # wider than the level
    (TEX, FULL, (0xFFFF_FFFF, 0, 0, 2, 1, 1), 0, 0, 0, 0),          # x + w wraps u32
    (TEX, FULL, (0, 0xFFFF_FFFF, 0, 1, 2, 1), 0, 0, 0, 0),          # y + h wraps u32
    (TEX, FULL, (0, 0, 0, 1, 1, 2), 0, 0, 0, 0),                    # deeper than 2D
    (TEX, FULL, (0, 0, 0, 33, 1, 1), 0, 1, 0, 0),                   # level 1 is 32 wide
    (TEX, FULL, (0, 0, 0, 1, 1, 1), 0, 3, 0, 0),                    # no level 3
    (TEX, FULL, (0, 0, 0, 1, 1, 1), FULL, 0, 0, 0),                 # offset past it
    (TEX, FULL, (0, 0, 0, 64, 48, 1), 0, 0, 64 * 4 + 4, 0),         # rows past it
    (TEX, FULL, (0, 0, 0, 64, 48, 1), 4, 0, 0, 0),                  # offset + all rows
    (TEX, FULL, (0, 0, 0, 64, 48, 1), 0, 0, 0xFFFF_FFFF, 0),        # huge stride
    (ARRAY, 16 * 8 * 4 * 4, (0, 0, 0, 16, 8, 5), 0, 0, 0, 0),       # 5 of 4 layers
    # packed layers are the level's height apart: 2 layers of a 1-row box need
    # 8 rows + 1 row, not 2 rows
    (ARRAY, 16 * 4 * 8, (0, 0, 0, 16, 1, 2), 0, 0, 0, 0),
    (ARRAY, 16 * 8 * 4 * 4, (0, 0, 0, 16, 8, 4), 0, 0, 0, 16 * 8 * 4 + 4),
    (BUF, 4096, (4000, 0, 0, 97, 1, 1), 0, 0, 0, 0),                # past the buffer
    (BUF, 1024, (0, 0, 0, 2048, 1, 1), 0, 0, 0, 0),                 # past the backing
])
def test_box_checked_refuses(limits, backing, box, offset, level, stride, layer):
    with pytest.raises(GpuError) as info:
        box_checked(limits, backing, box, offset, level, stride, layer)
    assert info.value.code == p.RESP_ERR_INVALID_PARAMETER


@pytest.mark.parametrize("limits, backing, box, offset, level, stride, layer", [
    (TEX, FULL, (0, 0, 0, 64, 48, 1), 0, 0, 0, 0),
    (TEX, FULL, (0, 0, 0, 64, 48, 1), 0, 0, 64 * 4, 0),
    (TEX, FULL, (10, 20, 0, 5, 5, 1), 20 * 256 + 40, 0, 0, 0),
    (TEX, FULL, (0, 0, 0, 32, 24, 1), 0, 1, 0, 0),
    (TEX, FULL, (0, 0, 0, 0, 0, 0), 0, 0, 0, 0),                    # empty box
    (ARRAY, 16 * 8 * 4 * 4, (0, 0, 0, 16, 8, 4), 0, 0, 0, 0),
    (ARRAY, 16 * 4 * 9, (0, 0, 0, 16, 1, 2), 0, 0, 0, 0),
    (BUF, 4096, (0, 0, 0, 4096, 1, 1), 0, 0, 0, 0),
])
def test_box_checked_accepts(limits, backing, box, offset, level, stride, layer):
    box_checked(limits, backing, box, offset, level, stride, layer)


def fields(**kw) -> tuple[int, ...]:
    base = dict(rid=1, target=PIPE_TEXTURE_2D, fmt=BGRA, bind=2, width=64, height=48,
                depth=1, array_size=1, last_level=0, nr_samples=0, flags=0)
    base.update(kw)
    return tuple(base.values())


@pytest.mark.parametrize("kw", [
    dict(target=9), dict(fmt=0), dict(fmt=512), dict(nr_samples=33),
    dict(width=0), dict(height=0), dict(width=16385), dict(depth=0),
    dict(array_size=0), dict(array_size=2049), dict(depth=2),
    dict(target=PIPE_TEXTURE_3D, depth=2049), dict(last_level=7),
    dict(target=PIPE_BUFFER, width=(256 << 20) + 1, height=1),
    dict(target=PIPE_BUFFER, width=16, height=2), dict(target=PIPE_BUFFER, last_level=1),
    dict(target=PIPE_BUFFER, width=0, height=1),
])
def test_create_3d_checked_refuses(kw):
    with pytest.raises(GpuError) as info:
        create_3d_checked(fields(**kw))
    assert info.value.code == p.RESP_ERR_INVALID_PARAMETER


@pytest.mark.parametrize("kw", [
    {}, dict(last_level=6), dict(target=PIPE_TEXTURE_3D, depth=16, last_level=6),
    dict(target=PIPE_TEXTURE_2D_ARRAY, array_size=2048), dict(nr_samples=4),
    dict(target=PIPE_BUFFER, width=256 << 20, height=1),
])
def test_create_3d_checked_accepts(kw):
    limits, flags = create_3d_checked(fields(**kw))
    assert limits.id == 1 and flags == 0
