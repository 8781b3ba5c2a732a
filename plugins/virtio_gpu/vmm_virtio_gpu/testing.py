"""A test-side virtio-gpu client (public: this plugin's tests, the core's sandbox tests).

GpuClient sends the 2D and 3D commands the way Linux's virtio_gpu driver does; for 3D
it plays Mesa's virgl driver too, for one render (clear_and_read_back): a context,
a render target, a command stream encoded from virglrenderer's virgl_protocol.h (a
surface, the framebuffer state, a CLEAR), and TRANSFER_FROM_HOST_3D into guest memory.
The transport is a test driver's: DeviceHarness (the model directly) or PciVirtioRig
(behind virtio-pci, in-process or in a jailed device process).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from vmm_virtio_gpu import protocol as p
from vmmcore.memory import GuestMemory
from vmmcore.virtio.testing import DeviceHarness, Used, VirtqueueDriver

if TYPE_CHECKING:
    from vmmcore.sandbox.testing import PciVirtioRig

CTX = 5
BGRA = p.FORMAT_B8G8R8A8_UNORM
PIPE_TEXTURE_2D = 2
BIND_RENDER_TARGET, BIND_SAMPLER_VIEW = 1 << 1, 1 << 3
# virgl_protocol.h: a command header is cmd | object << 8 | length (dwords after it) << 16
CCMD_CREATE_OBJECT, CCMD_SET_FRAMEBUFFER_STATE, CCMD_CLEAR = 1, 5, 7
OBJECT_SURFACE = 8          # enum virgl_object_type (after the single SHADER type)
PIPE_CLEAR_COLOR0 = 1 << 2
#: the clear colour, chosen so that float -> unorm8 is exact: RGBA bytes 51 102 153 255
RGBA = (51, 102, 153, 255)


def hdr(ctype: int, flags: int = 0, fence: int = 0, ctx: int = 0, ring: int = 0) -> bytes:
    return p.CTRL_HDR.pack(ctype, flags, fence, ctx, ring)


def ccmd(cmd: int, obj: int, *dwords: int) -> bytes:
    """One virgl command: its header, then its dwords."""
    return struct.pack(f"<{1 + len(dwords)}I", cmd | obj << 8 | len(dwords) << 16, *dwords)


def f32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def clear_stream(res_id: int, surface: int = 1, rgba: tuple[int, ...] = RGBA) -> bytes:
    """A surface on res_id as colour buffer 0, then CLEAR to rgba (bytes 0..255)."""
    depth = struct.unpack("<II", struct.pack("<d", 1.0))
    return (ccmd(CCMD_CREATE_OBJECT, OBJECT_SURFACE, surface, res_id, BGRA, 0, 0)
            + ccmd(CCMD_SET_FRAMEBUFFER_STATE, 0, 1, 0, surface)
            + ccmd(CCMD_CLEAR, 0, PIPE_CLEAR_COLOR0, *(f32(c / 255) for c in rgba),
                   *depth, 0))


class GpuClient:
    """The virtio-gpu commands as Linux's virtio_gpu sends them, over a test transport:
    request(queue, out, in_sizes) -> the used entry (vmmcore.virtio.testing.Used), and
    the queue drivers and guest memory it runs on (backings are allocated there)."""

    width, height = 64, 48

    def __init__(self, request: Callable[[int, list[bytes], list[int]], Used],
                 drivers: Sequence[VirtqueueDriver], mem: GuestMemory) -> None:
        self.request, self.drivers, self.mem = request, drivers, mem
        self.ctrl = drivers[0]

    @classmethod
    def over_harness(cls, harness: DeviceHarness) -> GpuClient:
        """A device model driven directly (vmmcore.virtio.testing.DeviceHarness)."""
        def request(queue: int, out: list[bytes], in_sizes: list[int]) -> Used:
            harness.drivers[queue].add(out=out, in_sizes=in_sizes)
            [used] = harness.wait_used(queue)
            return used

        return cls(request, harness.drivers, harness.mem)

    @classmethod
    def over_rig(cls, rig: PciVirtioRig) -> GpuClient:
        """A device behind virtio-pci, in-process or sandboxed (PciVirtioRig)."""
        return cls(lambda q, out, in_sizes: rig.request(q, out, in_sizes), rig.drivers,
                   rig.mem)

    def send(self, *out: bytes, resp: int = p.CTRL_HDR.size, queue: int = 0
             ) -> tuple[int, bytes]:
        """One request; (response type, response bytes), or (written length, b"") when
        resp is 0 (the cursor queue's requests carry no response buffer)."""
        used = self.request(queue, [b for b in out if b], [resp] if resp else [])
        if not resp:
            return used.length, b""
        assert used.length >= p.CTRL_HDR.size, used
        return p.CTRL_HDR.unpack_from(used.data)[0], used.data

    # -- 2D ---------------------------------------------------------------------------------

    def create(self, rid: int, fmt: int, w: int, h: int) -> int:
        return self.send(hdr(p.CMD_RESOURCE_CREATE_2D),
                         p.RESOURCE_CREATE_2D.pack(rid, fmt, w, h))[0]

    def attach(self, rid: int, entries: list[tuple[int, int]], count: int | None = None) -> int:
        body = p.ATTACH_BACKING.pack(rid, len(entries) if count is None else count)
        ents = b"".join(p.MEM_ENTRY.pack(a, n) for a, n in entries)
        return self.send(hdr(p.CMD_RESOURCE_ATTACH_BACKING), body, ents)[0]

    def transfer(self, rid: int, x: int, y: int, w: int, h: int, offset: int,
                 flags: int = 0, fence: int = 0) -> int:
        return self.send(hdr(p.CMD_TRANSFER_TO_HOST_2D, flags, fence),
                         p.TRANSFER_TO_HOST_2D.pack(x, y, w, h, offset, rid))[0]

    def set_scanout(self, scanout: int, rid: int, x: int, y: int, w: int, h: int) -> int:
        return self.send(hdr(p.CMD_SET_SCANOUT),
                         p.SET_SCANOUT.pack(x, y, w, h, scanout, rid))[0]

    def flush(self, rid: int, x: int, y: int, w: int, h: int) -> int:
        return self.send(hdr(p.CMD_RESOURCE_FLUSH), p.RESOURCE_FLUSH.pack(x, y, w, h, rid))[0]

    def unref(self, rid: int) -> int:
        return self.send(hdr(p.CMD_RESOURCE_UNREF), p.RESOURCE_ID_PAD.pack(rid))[0]

    def detach(self, rid: int) -> int:
        return self.send(hdr(p.CMD_RESOURCE_DETACH_BACKING), p.RESOURCE_ID_PAD.pack(rid))[0]

    def backing(self, nbytes: int, pieces: int = 1) -> list[tuple[int, int]]:
        """Guest buffers for nbytes, split into `pieces` non-adjacent entries."""
        out, left = [], nbytes
        each = -(-nbytes // pieces)
        while left > 0:
            n = min(each, left)
            addr = self.ctrl.alloc(n + 64)     # +64: a gap so the pieces are not adjacent
            out.append((addr, n))
            left -= n
        return out

    def fill_backing(self, entries: list[tuple[int, int]], data: bytes) -> None:
        pos = 0
        for addr, n in entries:
            self.mem.write(addr, data[pos:pos + n])
            pos += n

    def read_backing(self, entries: list[tuple[int, int]]) -> bytes:
        return b"".join(self.mem.read(a, n) for a, n in entries)

    # -- 3D ---------------------------------------------------------------------------------

    def ctx_create(self, ctx: int, name: bytes = b"test") -> int:
        return self.send(hdr(p.CMD_CTX_CREATE, ctx=ctx),
                         p.CTX_CREATE.pack(len(name), 0, name))[0]

    def ctx_attach(self, ctx: int, rid: int) -> int:
        return self.send(hdr(p.CMD_CTX_ATTACH_RESOURCE, ctx=ctx), p.CTX_RESOURCE.pack(rid))[0]

    def create_3d(self, rid: int, w: int | None = None, h: int | None = None,
                  target: int = PIPE_TEXTURE_2D, fmt: int = BGRA, depth: int = 1,
                  array_size: int = 1, last_level: int = 0) -> int:
        return self.send(hdr(p.CMD_RESOURCE_CREATE_3D), p.RESOURCE_CREATE_3D.pack(
            rid, target, fmt, BIND_RENDER_TARGET | BIND_SAMPLER_VIEW, w or self.width,
            h or self.height, depth, array_size, last_level, 0, 0))[0]

    def submit(self, ctx: int, stream: bytes, size: int | None = None,
               fence: int = 0) -> int:
        flags = p.FLAG_FENCE if fence else 0
        return self.send(hdr(p.CMD_SUBMIT_3D, flags, fence, ctx),
                         p.SUBMIT_3D.pack(len(stream) if size is None else size), stream)[0]

    def transfer_3d(self, cmd: int, ctx: int, rid: int, box: tuple[int, ...],
                    offset: int = 0, level: int = 0, stride: int | None = None,
                    fence: int = 0) -> int:
        flags = p.FLAG_FENCE if fence else 0
        return self.send(hdr(cmd, flags, fence, ctx), p.TRANSFER_HOST_3D.pack(
            *box, offset, rid, level, self.width * 4 if stride is None else stride, 0))[0]

    def render_target(self, rid: int = 1, ctx: int = CTX) -> list[tuple[int, int]]:
        """Context ctx; a BGRA render target attached to it with a guest backing."""
        assert self.ctx_create(ctx) == p.RESP_OK_NODATA
        assert self.create_3d(rid) == p.RESP_OK_NODATA
        entries = self.backing(self.width * self.height * 4, pieces=3)
        assert self.attach(rid, entries) == p.RESP_OK_NODATA
        assert self.ctx_attach(ctx, rid) == p.RESP_OK_NODATA
        return entries

    def clear_and_read_back(self, rid: int = 1) -> np.ndarray:
        """Clear the render target on the host GPU, TRANSFER_FROM_HOST_3D it into its
        backing, and return that as (height, width, 4) BGRA bytes."""
        w, h = self.width, self.height
        entries = self.render_target(rid)
        assert self.submit(CTX, clear_stream(rid), fence=1) == p.RESP_OK_NODATA
        assert self.transfer_3d(p.CMD_TRANSFER_FROM_HOST_3D, CTX, rid, (0, 0, 0, w, h, 1),
                                fence=2) == p.RESP_OK_NODATA
        return np.frombuffer(self.read_backing(entries), np.uint8).reshape(h, w, 4)
