"""virtio-gpu with VIRTIO_GPU_F_VIRGL: the 3D command set, rendered by virglrenderer.

Linux's virtio_gpu driver, once it sees the VIRGL feature, creates a context per DRM
client (CTX_CREATE), its resources with RESOURCE_CREATE_3D, moves pixels with
TRANSFER_TO/FROM_HOST_3D and sends Mesa's virgl command streams with SUBMIT_3D. Dumb
buffers (fbcon, plain KMS clients) still use RESOURCE_CREATE_2D and TRANSFER_TO_HOST_2D,
which here become virglrenderer textures and writes too. The GPU's own state (which
resources and contexts exist, their sizes and backings) is mirrored on this side, so
every id, box, offset and backing is checked before virglrenderer sees it; a bad request
gets the specification's error response. Command streams are virglrenderer's to decode
(it is written for hostile guests); one that it rejects is answered
ERR_INVALID_PARAMETER.

Scanouts: SET_SCANOUT and RESOURCE_FLUSH read the shown rectangle back from
virglrenderer (virgl_renderer_transfer_read_iov into a host array) and hand it to the
display backend exactly as 2D does, so headless screenshots work. Fences: a fenced
command waits for a virglrenderer fence (all work submitted so far done) before its
response, which then signals the fence.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.backing import Backing
from vmm_virtio_gpu.device import MAX_DIMENSION, MAX_RESOURCE_BYTES, Resource, VirtioGpu
from vmm_virtio_gpu.limits3d import (
    PIPE_TEXTURE_2D,
    PIPE_TEXTURE_RECT,
    Limits,
    box_checked,
    create_3d_checked,
)
from vmm_virtio_gpu.protocol import GpuError
from vmm_virtio_gpu.virgl import (
    CAPSET_VIRGL,
    CAPSET_VIRGL2,
    Renderer,
    VirglUnavailable,
    capset_info,
    ffi,
    require_virgl_capset,
)
from vmmcore.display import Display
from vmmcore.virtio import Reader

log = logging.getLogger(__name__)

#: contexts one guest may hold (Linux: one per DRM client that renders)
MAX_CONTEXTS = 1024
#: largest SUBMIT_3D command stream
MAX_SUBMIT_BYTES = 16 << 20
CAPSETS = (CAPSET_VIRGL, CAPSET_VIRGL2)
#: largest resource and context id: virglrenderer takes them as C int in places
#: (virgl_renderer_ctx_attach_resource, _resource_attach_iov, _submit_cmd); Linux
#: numbers both from 1 up
MAX_ID = 0x7FFF_FFFF
VIRGL_BIND_RENDER_TARGET = 1 << 1
RESOURCE_FLAG_Y_0_TOP = 1 << 0


@dataclass
class Resource3D(Resource):
    """A virglrenderer resource as this side knows it (for checks and scanout)."""

    limits: Limits | None = None
    host_bytes: int = 0
    iov: Any = None                          # struct iovec[] virglrenderer points into
    contexts: set[int] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return self.host_bytes


class VirglGpu(VirtioGpu):
    """virtio-gpu offering VIRTIO_GPU_F_VIRGL; see the module docstring."""

    def __init__(self, display: Display, *args: Any, **kwargs: Any) -> None:
        super().__init__(display, *args, **kwargs)
        self.device_features |= 1 << p.VIRTIO_GPU_F_VIRGL
        self.num_capsets = len(CAPSETS)
        self._update_config()
        self.renderer = Renderer()
        self.contexts: set[int] = set()
        self._said_unavailable = False           # log the reason once, answer every time
        self._stopping = threading.Event()       # reset/shutdown: fence waits give up

    def on_device_sandboxed(self) -> None:
        """Initialise virglrenderer now, on its own thread, where the device runs (its
        jail, or this process with --disable-sandbox): a library, driver or bind the
        jail lacks, a forbidden system call or a second virgl GPU in one process stops
        `vmm run` at start-up with the reason, not the guest's first 3D command."""
        self.renderer.start()
        self.renderer.call(require_virgl_capset)

    # -- talking to virglrenderer --------------------------------------------------------

    def _virgl(self, fn: Any, *args: Any) -> Any:
        """fn(lib, *args) on the renderer thread; a renderer that cannot start is an
        ERR_UNSPEC answer (and the reason in `status`), not a device failure."""
        try:
            return self.renderer.call(fn, *args)
        except VirglUnavailable as e:
            if not self._said_unavailable:
                self._said_unavailable = True
                log.error("virtio-gpu %s: %s", self.label, e)
            raise GpuError(p.RESP_ERR_UNSPEC, str(e)) from None

    def _complete_fence(self, fence_id: int, ctx_id: int) -> None:
        """Answer a fenced command only once the host GPU finished the work so far."""
        if self.renderer.lib is not None and not self.renderer.fence(ctx_id,
                                                                     self._stopping):
            self._note("fence", p.RESP_ERR_UNSPEC, f"fence {fence_id} did not complete")
        super()._complete_fence(fence_id, ctx_id)

    def _context(self, ctx_id: int) -> int:
        if ctx_id not in self.contexts:
            raise GpuError(p.RESP_ERR_INVALID_CONTEXT_ID, f"no context {ctx_id}")
        return ctx_id

    def _resource3d(self, rid: int) -> Resource3D:
        res = self._resource(rid)
        assert isinstance(res, Resource3D)
        return res

    # -- capsets ----------------------------------------------------------------------------

    def _get_capset_info(self, reader: Reader) -> tuple[int, bytes]:
        (index,) = self._body(reader, p.GET_CAPSET_INFO)
        if index >= len(CAPSETS):
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"capset index {index} (this device has {len(CAPSETS)})")
        max_ver, max_size = self._virgl(capset_info, CAPSETS[index])
        return p.RESP_OK_CAPSET_INFO, p.RESP_CAPSET_INFO.pack(CAPSETS[index], max_ver,
                                                              max_size)

    def _get_capset(self, reader: Reader) -> tuple[int, bytes]:
        capset_id, version = self._body(reader, p.GET_CAPSET)
        if capset_id not in CAPSETS:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, f"no capset {capset_id}")
        max_ver, max_size = self._virgl(capset_info, capset_id)
        if version > max_ver or max_size == 0:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"capset {capset_id} version {version} (max {max_ver})")

        def fill(lib: Any) -> bytes:
            buf = ffi.new("char[]", max_size)
            lib.virgl_renderer_fill_caps(capset_id, version, buf)
            return bytes(ffi.buffer(buf))

        return p.RESP_OK_CAPSET, self._virgl(fill)

    # -- contexts -------------------------------------------------------------------------

    def _ctx_create(self, reader: Reader) -> tuple[int, bytes]:
        nlen, context_init, name = self._body(reader, p.CTX_CREATE)
        ctx_id = self.cmd_ctx_id
        if not 0 < ctx_id <= MAX_ID or ctx_id in self.contexts:
            raise GpuError(p.RESP_ERR_INVALID_CONTEXT_ID,
                           f"context id {ctx_id} is "
                           f"{'in use' if ctx_id in self.contexts else 'out of range'}")
        if len(self.contexts) >= MAX_CONTEXTS:
            raise GpuError(p.RESP_ERR_OUT_OF_MEMORY, f"{MAX_CONTEXTS} contexts exist")
        if nlen > len(name) or context_init:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"debug name length {nlen}, context_init {context_init:#x}")
        ret = self._virgl(lambda lib: lib.virgl_renderer_context_create(
            ctx_id, nlen, ffi.from_buffer(name)))
        if ret != 0:
            raise GpuError(p.RESP_ERR_UNSPEC, f"virglrenderer: context create {ret}")
        self.contexts.add(ctx_id)
        return p.RESP_OK_NODATA, b""

    def _ctx_destroy(self, reader: Reader) -> tuple[int, bytes]:
        ctx_id = self._context(self.cmd_ctx_id)
        self._virgl(_destroy_context, ctx_id)
        self.contexts.discard(ctx_id)
        for res in self.resources.values():
            res.contexts.discard(ctx_id)
        return p.RESP_OK_NODATA, b""

    def _ctx_resource(self, reader: Reader, attach: bool) -> tuple[int, bytes]:
        """CTX_ATTACH_RESOURCE / CTX_DETACH_RESOURCE: which resources a context sees."""
        (rid,) = self._body(reader, p.CTX_RESOURCE)
        ctx_id = self._context(self.cmd_ctx_id)
        res = self._resource3d(rid)
        if not attach and ctx_id not in res.contexts:
            raise GpuError(p.RESP_ERR_INVALID_RESOURCE_ID,
                           f"resource {rid} is not attached to context {ctx_id}")
        self._virgl(_attach_to_ctx if attach else _detach_from_ctx, ctx_id, rid)
        (res.contexts.add if attach else res.contexts.discard)(ctx_id)
        return p.RESP_OK_NODATA, b""

    def _submit_3d(self, reader: Reader) -> tuple[int, bytes]:
        (size,) = self._body(reader, p.SUBMIT_3D)
        ctx_id = self._context(self.cmd_ctx_id)
        if size % 4 or size > MAX_SUBMIT_BYTES or size > reader.available_bytes():
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"command stream of {size} bytes ({reader.available_bytes()} "
                           f"present, at most {MAX_SUBMIT_BYTES}, whole dwords)")
        if size == 0:
            return p.RESP_OK_NODATA, b""
        stream = bytearray(reader.read(size))
        _check_framing(stream)
        ret = self._virgl(lambda lib: lib.virgl_renderer_submit_cmd(
            ffi.from_buffer(stream), ctx_id, size // 4))
        if ret != 0:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"virglrenderer rejected the command stream ({ret})")
        return p.RESP_OK_NODATA, b""

    # -- resources ------------------------------------------------------------------------

    def _create(self, limits: Limits, flags: int) -> None:
        """Create resource limits.id in virglrenderer and mirror it here."""
        if not 0 < limits.id <= MAX_ID or limits.id in self.resources:
            raise GpuError(p.RESP_ERR_INVALID_RESOURCE_ID,
                           f"resource id {limits.id} is "
                           f"{'in use' if limits.id in self.resources else 'out of range'}")
        nbytes = limits.host_bytes()
        if self.resource_bytes + nbytes > MAX_RESOURCE_BYTES:
            raise GpuError(p.RESP_ERR_OUT_OF_MEMORY,
                           f"{nbytes} bytes more would exceed {MAX_RESOURCE_BYTES}")

        def create(lib: Any) -> int:
            args = ffi.new("struct virgl_renderer_resource_create_args *", {
                "handle": limits.id, "target": limits.target, "format": limits.format,
                "bind": limits.bind, "width": limits.width, "height": limits.height,
                "depth": limits.depth, "array_size": limits.array_size,
                "last_level": limits.last_level, "nr_samples": limits.nr_samples,
                "flags": flags})
            return lib.virgl_renderer_resource_create(args, ffi.NULL, 0)

        ret = self._virgl(create)
        if ret != 0:
            raise GpuError(p.RESP_ERR_OUT_OF_MEMORY if ret == -12 else
                           p.RESP_ERR_INVALID_PARAMETER,
                           f"virglrenderer refused the resource ({ret})")
        self.resources[limits.id] = Resource3D(
            limits.id, limits.format, limits.width, limits.height,
            np.empty((0, 0), np.uint8), limits=limits, host_bytes=nbytes)
        self.resource_bytes += nbytes

    def _resource_create_2d(self, reader: Reader) -> tuple[int, bytes]:
        rid, fmt, width, height = self._body(reader, p.RESOURCE_CREATE_2D)
        if fmt not in p.FORMATS:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, f"unknown format {fmt}")
        if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, f"size {width}x{height}")
        self._create(Limits(rid, PIPE_TEXTURE_2D, fmt, VIRGL_BIND_RENDER_TARGET, width,
                            height), RESOURCE_FLAG_Y_0_TOP)
        return p.RESP_OK_NODATA, b""

    def _resource_create_3d(self, reader: Reader) -> tuple[int, bytes]:
        fields = self._body(reader, p.RESOURCE_CREATE_3D)
        limits, flags = create_3d_checked(fields)
        self._create(limits, flags)
        return p.RESP_OK_NODATA, b""

    def _release(self, res: Resource) -> None:
        self._virgl(_unref, res.id)

    def _attach(self, res: Resource, backing: Backing) -> None:
        """virglrenderer keeps pointers into the iovec array: it lives on res.iov."""
        assert self.mem is not None and isinstance(res, Resource3D)
        pieces = backing.host_pieces(self.mem)
        iov = ffi.new("struct iovec[]", len(pieces))
        for i, (addr, length) in enumerate(pieces):
            iov[i].iov_base, iov[i].iov_len = ffi.cast("void *", addr), length
        ret = self._virgl(lambda lib: lib.virgl_renderer_resource_attach_iov(
            res.id, iov, len(pieces)))
        if ret != 0:
            raise GpuError(p.RESP_ERR_UNSPEC, f"virglrenderer: attach backing {ret}")
        res.iov = iov

    def _detach(self, res: Resource) -> None:
        assert isinstance(res, Resource3D)
        self._virgl(_detach_iov, res.id)
        res.iov = None

    # -- transfers ----------------------------------------------------------------------------

    def _transfer_3d(self, reader: Reader, write: bool) -> tuple[int, bytes]:
        x, y, z, w, h, d, offset, rid, level, stride, layer_stride = self._body(
            reader, p.TRANSFER_HOST_3D)
        ctx_id = self.cmd_ctx_id
        if ctx_id:
            self._context(ctx_id)
        res = self._resource3d(rid)
        if res.backing is None:
            raise GpuError(p.RESP_ERR_UNSPEC, f"resource {rid} has no backing")
        assert res.limits is not None
        box_checked(res.limits, res.backing.length, (x, y, z, w, h, d), offset, level,
                    stride, layer_stride)
        return self._transfer(rid, ctx_id, level, stride, layer_stride,
                              (x, y, z, w, h, d), offset, write)

    def _transfer(self, rid: int, ctx_id: int, level: int, stride: int,
                  layer_stride: int, box: tuple[int, ...], offset: int,
                  write: bool) -> tuple[int, bytes]:
        def run(lib: Any) -> int:
            vbox = ffi.new("struct virgl_box *", dict(zip("xyzwhd", box, strict=True)))
            fn = (lib.virgl_renderer_transfer_write_iov if write
                  else lib.virgl_renderer_transfer_read_iov)
            return fn(rid, ctx_id, level, stride, layer_stride, vbox, offset, ffi.NULL, 0)

        ret = self._virgl(run)
        if ret != 0:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, f"virglrenderer: transfer {ret}")
        return p.RESP_OK_NODATA, b""

    def _transfer_to_host_2d(self, reader: Reader) -> tuple[int, bytes]:
        x, y, w, h, offset, rid = self._body(reader, p.TRANSFER_TO_HOST_2D)
        res = self._resource3d(rid)
        if res.backing is None:
            raise GpuError(p.RESP_ERR_UNSPEC, f"resource {rid} has no backing")
        assert res.limits is not None
        box_checked(res.limits, res.backing.length, (x, y, 0, w, h, 1), offset, 0, 0, 0)
        if w == 0 or h == 0:
            return p.RESP_OK_NODATA, b""
        return self._transfer(rid, 0, 0, 0, 0, (x, y, 0, w, h, 1), offset, write=True)

    # -- scanout ----------------------------------------------------------------------------

    def _set_scanout(self, reader: Reader) -> tuple[int, bytes]:
        fields = self._body(reader, p.SET_SCANOUT)
        rid = fields[5]
        if rid:
            res = self._resource3d(rid)
            limits = res.limits
            assert limits is not None
            if res.format not in p.FORMATS or limits.target not in (PIPE_TEXTURE_2D, PIPE_TEXTURE_RECT):
                raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                               f"resource {rid} (format {res.format}, target "
                               f"{limits.target}) is not a displayable 2D image")
        return self._apply_scanout(*fields)

    def _fetch(self, res: Resource, x: int, y: int, w: int, h: int) -> None:
        """Read a rectangle back from virglrenderer into res.pixels (in its format), for
        the display or the cursor."""
        if res.pixels.shape != (res.height, res.stride):
            res.pixels = np.zeros((res.height, res.stride), np.uint8)
        pixels, stride = res.pixels, res.stride

        def read(lib: Any) -> int:
            iov = ffi.new("struct iovec *", {"iov_base": ffi.from_buffer(pixels),
                                             "iov_len": pixels.nbytes})
            box = ffi.new("struct virgl_box *", {"x": x, "y": y, "z": 0, "w": w, "h": h,
                                                 "d": 1})
            return lib.virgl_renderer_transfer_read_iov(
                res.id, 0, 0, stride, 0, box, y * stride + x * p.BYTES_PER_PIXEL, iov, 1)

        ret = self._virgl(read)
        if ret != 0:
            self._note("readback", p.RESP_ERR_UNSPEC, f"virglrenderer: read {ret}")

    def _cursor_image(self, res: Resource, w: int, h: int) -> np.ndarray:
        """The cursor image lives in virglrenderer too: read it back first."""
        if res.format not in p.FORMATS:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"cursor resource {res.id} has format {res.format}")
        self._fetch(res, 0, 0, w, h)
        return super()._cursor_image(res, w, h)

    # -- lifecycle ------------------------------------------------------------------------

    def _drop_state(self) -> None:
        """Device reset: virglrenderer forgets every context and resource too."""
        if self.renderer.lib is not None and (self.resources or self.contexts):
            for rid in list(self.resources):
                self.renderer.call(_unref, rid)
            for ctx_id in self.contexts:
                self.renderer.call(_destroy_context, ctx_id)
        self.contexts.clear()
        super()._drop_state()

    def reset(self) -> bool:
        """A fenced command still waiting for the host GPU gives up first, so that the
        worker stops (its stop timeout is shorter than FENCE_TIMEOUT) before _drop_state
        unrefs what it may be using and the rings it would answer on are gone."""
        self._stopping.set()
        try:
            return super().reset()
        finally:
            self._stopping.clear()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()
        self.renderer.close()

    _handlers = {
        **VirtioGpu._handlers,
        p.CMD_GET_CAPSET_INFO: _get_capset_info,
        p.CMD_GET_CAPSET: _get_capset,
        p.CMD_RESOURCE_CREATE_2D: _resource_create_2d,
        p.CMD_SET_SCANOUT: _set_scanout,
        p.CMD_TRANSFER_TO_HOST_2D: _transfer_to_host_2d,
        p.CMD_CTX_CREATE: _ctx_create,
        p.CMD_CTX_DESTROY: _ctx_destroy,
        p.CMD_CTX_ATTACH_RESOURCE: partial(_ctx_resource, attach=True),
        p.CMD_CTX_DETACH_RESOURCE: partial(_ctx_resource, attach=False),
        p.CMD_RESOURCE_CREATE_3D: _resource_create_3d,
        p.CMD_TRANSFER_TO_HOST_3D: partial(_transfer_3d, write=True),
        p.CMD_TRANSFER_FROM_HOST_3D: partial(_transfer_3d, write=False),
        p.CMD_SUBMIT_3D: _submit_3d,
    }


def _check_framing(stream: bytearray) -> None:
    """Every command's header (cmd | object << 8 | length << 16) must announce a length
    that ends inside the stream; what the commands say is virglrenderer's to check."""
    dwords = memoryview(stream).cast("I")
    pos, end = 0, len(dwords)
    while pos < end:
        pos += 1 + (dwords[pos] >> 16)
    if pos != end:
        raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                       f"a command runs {pos - end} dwords past the {end}-dword stream")


def _attach_to_ctx(lib: Any, ctx_id: int, rid: int) -> None:
    lib.virgl_renderer_ctx_attach_resource(ctx_id, rid)


def _detach_from_ctx(lib: Any, ctx_id: int, rid: int) -> None:
    lib.virgl_renderer_ctx_detach_resource(ctx_id, rid)


def _destroy_context(lib: Any, ctx_id: int) -> None:
    lib.virgl_renderer_context_destroy(ctx_id)


def _detach_iov(lib: Any, rid: int) -> None:
    iov, count = ffi.new("struct iovec **"), ffi.new("int *")
    lib.virgl_renderer_resource_detach_iov(rid, iov, count)


def _unref(lib: Any, rid: int) -> None:
    """Detach the backing (virglrenderer only points into it) and drop the resource."""
    _detach_iov(lib, rid)
    lib.virgl_renderer_resource_unref(rid)
