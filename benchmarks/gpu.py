"""virtio-gpu frame rate: full-screen TRANSFER_TO_HOST_2D + RESOURCE_FLUSH, against a
plain copy of the same bytes, measured side by side in one run.

    python -m benchmarks.gpu [--width 1920 --height 1080]
        [--seconds 3] [--pieces 1] [--backend 2d|virglrenderer]

The guest side is the tier-1 test driver (vmmcore.virtio.testing.DeviceHarness): the
backing is a scatter list of `--pieces` entries (1: contiguous; Linux's fbdev shmem is
page-scattered, e.g. 2025 pieces for 1920x1080), and the display is headless (the
frame is converted to RGB and copied into its framebuffer). With
--backend virglrenderer the same 2D commands go through virglrenderer (a texture
write, then a readback for the display), as Linux's fbcon does in virgl mode. The
baseline copies the same number of bytes from one numpy buffer to another.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.device import VirtioGpu

from vmmcore.display import Display, DisplayOptions
from vmmcore.virtio.testing import DeviceHarness


def _cmd(h: DeviceHarness, *out: bytes) -> int:
    d = h.drivers[0]
    d.add(out=list(out), in_sizes=[p.CTRL_HDR.size])
    [used] = h.wait_used(0)
    return p.CTRL_HDR.unpack_from(used.data)[0]


def hdr(t: int) -> bytes:
    return p.CTRL_HDR.pack(t, 0, 0, 0, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--pieces", type=int, default=1)
    ap.add_argument("--backend", choices=("2d", "virglrenderer"), default="2d")
    a = ap.parse_args()
    w, h = a.width, a.height
    nbytes = w * h * 4
    mem_size = ((nbytes * 2 + (8 << 20)) + 0xFFFFF) & ~0xFFFFF
    disp = Display(DisplayOptions(width=w, height=h))
    if a.backend == "virglrenderer":
        from vmm_virtio_gpu.device3d import VirglGpu

        harness = DeviceHarness(VirglGpu(disp, w, h), mem_size=mem_size)
        harness.activate(1 << p.VIRTIO_GPU_F_VIRGL)
    else:
        harness = DeviceHarness(VirtioGpu(disp, w, h), mem_size=mem_size)
        harness.activate()
    try:
        base = mem_size // 2
        each = -(-nbytes // a.pieces)
        entries, pos = [], 0
        while pos < nbytes:
            n = min(each, nbytes - pos)
            entries.append((base + pos + 16 * len(entries), n))     # gaps between pieces
            pos += n
        harness.mem.write(base, np.random.default_rng(0).integers(
            0, 256, min(nbytes, mem_size - base), dtype=np.uint8).tobytes())
        assert _cmd(harness, hdr(p.CMD_RESOURCE_CREATE_2D), p.RESOURCE_CREATE_2D.pack(
            1, p.FORMAT_B8G8R8X8_UNORM, w, h)) == p.RESP_OK_NODATA
        ents = b"".join(p.MEM_ENTRY.pack(addr, n) for addr, n in entries)
        assert _cmd(harness, hdr(p.CMD_RESOURCE_ATTACH_BACKING),
                    p.ATTACH_BACKING.pack(1, len(entries)), ents) == p.RESP_OK_NODATA
        assert _cmd(harness, hdr(p.CMD_SET_SCANOUT),
                    p.SET_SCANOUT.pack(0, 0, w, h, 0, 1)) == p.RESP_OK_NODATA
        transfer = p.TRANSFER_TO_HOST_2D.pack(0, 0, w, h, 0, 1)
        flush = p.RESOURCE_FLUSH.pack(0, 0, w, h, 1)
        frames, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            _cmd(harness, hdr(p.CMD_TRANSFER_TO_HOST_2D), transfer)
            _cmd(harness, hdr(p.CMD_RESOURCE_FLUSH), flush)
            frames += 1
        gpu_fps = frames / (time.perf_counter() - t0)
    finally:
        harness.close()
    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    copies, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        np.copyto(dst, src)
        copies += 1
    copy_fps = copies / (time.perf_counter() - t0)
    print(f"virtio-gpu ({a.backend}) {w}x{h}, {len(entries)} backing piece(s): "
          f"{gpu_fps:.1f} frames/s (transfer + flush)")
    print(f"plain copy of {nbytes} bytes: {copy_fps:.1f} copies/s")
    print(f"ratio gpu/copy: {gpu_fps / copy_fps:.3f}")


if __name__ == "__main__":
    main()
