"""What a 3D resource is, and the checks a guest's 3D requests pass before virglrenderer.

virglrenderer validates too, but the guest is hostile and the library is C: sizes,
targets, mip levels, boxes and backing offsets are checked here first, against this
side's record of each resource (Limits), and refused with the specification's errors.
Targets are Gallium's (enum pipe_texture_target), which the virgl protocol uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.protocol import GpuError

PIPE_BUFFER, PIPE_TEXTURE_1D, PIPE_TEXTURE_2D, PIPE_TEXTURE_3D = 0, 1, 2, 3
PIPE_TEXTURE_CUBE, PIPE_TEXTURE_RECT, PIPE_TEXTURE_1D_ARRAY = 4, 5, 6
PIPE_TEXTURE_2D_ARRAY, PIPE_TEXTURE_CUBE_ARRAY = 7, 8
#: largest texture dimension, 3D texture depth and array size (GL 4.5 on llvmpipe)
MAX_TEXTURE = 16384
MAX_DEPTH = 2048
MAX_LAYERS = 2048
#: largest buffer resource
MAX_BUFFER_BYTES = 256 << 20
MAX_SAMPLES = 32
#: virgl formats are < 512 (enum virgl_formats); which ones exist is the library's call
MAX_FORMAT = 512
#: the host-side size estimate assumes this many bytes per texel (RGBA8)
ESTIMATE_TEXEL_BYTES = 4
#: what every resource counts at least against the memory cap: virglrenderer's, GL's and
#: this side's bookkeeping, so that a flood of 1-byte buffers is capped too (at 128Ki
#: resources under the 512 MiB cap instead of half a billion)
MIN_RESOURCE_BYTES = 4096


@dataclass(frozen=True)
class Limits:
    """A resource's shape as the guest created it."""

    id: int
    target: int
    format: int
    bind: int
    width: int
    height: int
    depth: int = 1
    array_size: int = 1
    last_level: int = 0
    nr_samples: int = 0

    def host_bytes(self) -> int:
        """An estimate of the host memory it takes (for the all-resources cap)."""
        if self.target == PIPE_BUFFER:
            return max(self.width, MIN_RESOURCE_BYTES)
        base = (self.width * self.height * self.depth * self.array_size
                * max(self.nr_samples, 1) * ESTIMATE_TEXEL_BYTES)
        return max(base * 4 // 3 if self.last_level else base, MIN_RESOURCE_BYTES)

    def extent(self, level: int) -> tuple[int, int, int]:
        """(width, height, depth-or-layers) of mip level `level` in box units."""
        w = max(1, self.width >> level)
        if self.target == PIPE_TEXTURE_1D_ARRAY:
            return w, self.array_size, 1
        h = max(1, self.height >> level)
        if self.target == PIPE_TEXTURE_3D:
            return w, h, max(1, self.depth >> level)
        if self.target == PIPE_TEXTURE_CUBE:
            return w, h, 6
        if self.target in (PIPE_TEXTURE_2D_ARRAY, PIPE_TEXTURE_CUBE_ARRAY):
            return w, h, self.array_size
        return w, h, 1

    def texel_bytes(self) -> int | None:
        """Bytes per texel where this side knows the format (buffers, the 2D formats)."""
        if self.target == PIPE_BUFFER:
            return 1
        return p.BYTES_PER_PIXEL if self.format in p.FORMATS else None


def _bad(why: str) -> GpuError:
    return GpuError(p.RESP_ERR_INVALID_PARAMETER, why)


def create_3d_checked(fields: tuple[int, ...]) -> tuple[Limits, int]:
    """RESOURCE_CREATE_3D's body as (Limits, flags), or GpuError."""
    (rid, target, fmt, bind, width, height, depth, array_size, last_level, nr_samples,
     flags) = fields
    limits = Limits(rid, target, fmt, bind, width, height, depth, array_size, last_level,
                    nr_samples)
    if target > PIPE_TEXTURE_CUBE_ARRAY:
        raise _bad(f"target {target}")
    if not 0 < fmt < MAX_FORMAT:
        raise _bad(f"format {fmt}")
    if nr_samples > MAX_SAMPLES:
        raise _bad(f"{nr_samples} samples")
    if target == PIPE_BUFFER:
        if not 0 < width <= MAX_BUFFER_BYTES or (height, depth, array_size) != (1, 1, 1) \
                or last_level:
            raise _bad(f"buffer {width}x{height}x{depth}x{array_size} "
                       f"(at most {MAX_BUFFER_BYTES} bytes, 1 high, deep and layered)")
        return limits, flags
    if not (0 < width <= MAX_TEXTURE and 0 < height <= MAX_TEXTURE
            and 0 < depth <= MAX_DEPTH and 0 < array_size <= MAX_LAYERS):
        raise _bad(f"texture {width}x{height}x{depth}, {array_size} layers")
    if target != PIPE_TEXTURE_3D and depth != 1:
        raise _bad(f"depth {depth} for target {target}")
    if last_level >= max(width, height, depth).bit_length():
        raise _bad(f"last_level {last_level} for {width}x{height}x{depth}")
    return limits, flags


def box_checked(limits: Limits, backing_len: int, box: tuple[int, int, int, int, int, int],
                offset: int, level: int, stride: int, layer_stride: int) -> None:
    """A transfer of `box` at mip `level` between the resource and its backing (from
    byte `offset`, rows `stride` and layers `layer_stride` apart, 0: packed) must lie
    inside both; GpuError otherwise."""
    x, y, z, w, h, d = box
    if level > limits.last_level:
        raise _bad(f"level {level} (resource has {limits.last_level + 1})")
    ew, eh, ed = limits.extent(level)
    if x + w > ew or y + h > eh or z + d > ed:
        raise _bad(f"box {w}x{h}x{d}+{x}+{y}+{z} outside level {level} ({ew}x{eh}x{ed})")
    if offset >= backing_len:
        raise _bad(f"offset {offset} past the {backing_len}-byte backing")
    bpp = limits.texel_bytes()
    if bpp is None or 0 in (w, h, d):
        return                      # virglrenderer checks the bytes of unknown formats
    row = w * bpp
    # 0 means packed, as virglrenderer reads it: rows of the level's width, layers of
    # the level's height (not the box's)
    stride = stride or (ew * bpp if limits.target != PIPE_BUFFER else row)
    layer_stride = layer_stride or stride * max(1, limits.height >> level)
    end = offset + (d - 1) * layer_stride + (h - 1) * stride + row
    if end > backing_len:
        raise _bad(f"transfer spans backing bytes {offset}..{end}, backing has "
                   f"{backing_len}")
