"""The virtio-gpu device model, 2D mode (virtio 1.2, section 5.7); device3d adds virgl.

Two queues: controlq (0) carries the 2D command set, cursorq (1) UPDATE_CURSOR and
MOVE_CURSOR. Resources live on the host as numpy arrays in the guest's pixel format;
their backing store is a guest scatter list (RESOURCE_ATTACH_BACKING). TRANSFER_TO_HOST_2D
copies a rectangle from the backing into the resource; RESOURCE_FLUSH converts the part
shown by each scanout to RGB and hands it to the display backend (vmmcore.display).

The guest is hostile. Every rectangle, offset, stride, backing entry, id and count is
checked, and a bad one gets the error response the specification names
(ERR_INVALID_SCANOUT_ID, ERR_INVALID_RESOURCE_ID, ERR_INVALID_PARAMETER,
ERR_OUT_OF_MEMORY, or ERR_UNSPEC), never an exception: only a malformed ring (which the
virtqueue code reports) puts the device into NEEDS_RESET. Host memory for resources is
capped (MAX_RESOURCE_BYTES); a backing list is capped at MAX_BACKING_ENTRIES entries,
each of which must lie in guest RAM.

Every command completes before its response is written, so a fenced command
(VIRTIO_GPU_FLAG_FENCE) is signalled by echoing the fence in its response, as the
specification allows for a device without asynchronous work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.backing import Backing
from vmm_virtio_gpu.control import GpuControl
from vmm_virtio_gpu.edid import build_edid
from vmm_virtio_gpu.protocol import GpuError
from vmmcore.display import Display
from vmmcore.virtio import DeviceType, Reader, VirtioDevice, Writer

log = logging.getLogger(__name__)

#: host memory all 2D resources together may use
MAX_RESOURCE_BYTES = 512 << 20
#: largest width or height of a resource
MAX_DIMENSION = 16384
#: the cursor image is at most this many pixels square (Linux uses 64x64)
CURSOR_SIZE = 64
CONTROL_QUEUE_SIZE = 256
CURSOR_QUEUE_SIZE = 16


def _rgb_slice(r: int, g: int, b: int) -> slice | list[int]:
    if g == r + 1 and b == r + 2:
        return slice(r, r + 3)
    if g == r - 1 and b == r - 2:
        return slice(r, r - 3 if r >= 3 else None, -1)
    return [r, g, b]                                    # (no listed format needs this)


_RGB_SLICE = {fmt: _rgb_slice(r, g, b) for fmt, (_, r, g, b, _a) in p.FORMATS.items()}


@dataclass
class Resource:
    """A 2D resource: pixels[row, byte] in the guest's format, and its backing list."""

    id: int
    format: int
    width: int
    height: int
    pixels: np.ndarray
    backing: Backing | None = None

    @property
    def stride(self) -> int:
        return self.width * p.BYTES_PER_PIXEL

    @property
    def nbytes(self) -> int:
        return self.height * self.stride


@dataclass
class Scanout:
    """A display output: which resource (0: none) and which rectangle of it it shows."""

    width: int                 # the preferred mode (GET_DISPLAY_INFO, EDID)
    height: int
    resource_id: int = 0
    rect: tuple[int, int, int, int] = (0, 0, 0, 0)
    cursor_resource: int = 0


def _rect_inside(x: int, y: int, w: int, h: int, width: int, height: int) -> bool:
    return x + w <= width and y + h <= height


class VirtioGpu(GpuControl, VirtioDevice):
    """virtio-gpu in 2D mode, showing its scanouts on a Display."""

    device_type = DeviceType.GPU
    queue_max_sizes = (CONTROL_QUEUE_SIZE, CURSOR_QUEUE_SIZE)

    def __init__(self, display: Display, width: int = 1280, height: int = 1024,
                 num_scanouts: int = 1, refresh_rate: int = 60, edid: bool = True,
                 label: str = "virtio-gpu") -> None:
        super().__init__()
        if not 1 <= num_scanouts <= p.VIRTIO_GPU_MAX_SCANOUTS:
            raise ValueError(f"num_scanouts={num_scanouts} is not in 1..16")
        self.display = display
        self.refresh_rate = refresh_rate
        self.label = label
        self.device_features = (1 << p.VIRTIO_GPU_F_EDID) if edid else 0
        self.scanouts = [Scanout(width, height) for _ in range(num_scanouts)]
        self.resources: dict[int, Resource] = {}
        self.resource_bytes = 0
        self.events_read = 0
        self.num_capsets = 0
        self.last_fence: tuple[int, int] | None = None      # (fence_id, ctx_id)
        self.cmd_ctx_id = 0                                  # of the command being run
        self.errors: list[tuple[str, int, str]] = []         # (command, code, why), recent
        self._update_config()

    @property
    def name(self) -> str:
        return "gpu"

    # -- config space ---------------------------------------------------------------------

    def _update_config(self) -> None:
        self.config = bytearray(p.CONFIG.pack(self.events_read, 0, len(self.scanouts),
                                              self.num_capsets))

    def write_config(self, offset: int, data: bytes) -> None:
        """events_clear (offset 4) is the only writable field: it clears events_read bits."""
        mask = bytearray(4)
        for i, b in enumerate(data):
            if 4 <= offset + i < 8:
                mask[offset + i - 4] = b
        if any(mask):
            self.events_read &= ~int.from_bytes(mask, "little")
            self._update_config()

    def display_changed(self) -> None:
        """Tell the driver the displays changed (it re-reads GET_DISPLAY_INFO)."""
        self.events_read |= p.VIRTIO_GPU_EVENT_DISPLAY
        self._update_config()
        self.config_changed()

    # -- queues -------------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        queue, mem = self.queues[index], self.mem
        while (chain := queue.pop(mem)) is not None:
            written = self.process(Reader(mem, chain), Writer(mem, chain), cursor=index == 1)
            queue.add_used(mem, chain, written)
        self.signal_used(index)

    def process(self, reader: Reader, writer: Writer, cursor: bool = False) -> int:
        """Run one command; write its response; return the bytes written."""
        if reader.available_bytes() < p.CTRL_HDR.size:
            self._note("short", p.RESP_ERR_UNSPEC, "request shorter than its header")
            return writer.write(p.CTRL_HDR.pack(p.RESP_ERR_UNSPEC, 0, 0, 0, 0))
        ctype, flags, fence_id, ctx_id, ring_idx = reader.read_obj(p.CTRL_HDR)
        self.cmd_ctx_id = ctx_id               # the 3D commands address a context by it
        name = p.COMMAND_NAMES.get(ctype, f"{ctype:#x}")
        try:
            if cursor:
                if ctype not in (p.CMD_UPDATE_CURSOR, p.CMD_MOVE_CURSOR):
                    raise GpuError(p.RESP_ERR_UNSPEC, "not a cursor command")
                rtype, payload = self._cursor(ctype, reader)
            else:
                handler = self._handlers.get(ctype)
                if handler is None:
                    raise GpuError(p.RESP_ERR_UNSPEC, "unsupported command")
                rtype, payload = handler(self, reader)
        except GpuError as e:
            self._note(name, e.code, str(e))
            rtype, payload = e.code, b""
        except Exception as e:  # a device bug: answer ERR_UNSPEC, keep serving
            log.exception("virtio-gpu %s: %s failed", self.label, name)
            self._note(name, p.RESP_ERR_UNSPEC, f"internal error: {e!r}")
            rtype, payload = p.RESP_ERR_UNSPEC, b""
        out_flags = 0
        if flags & p.FLAG_FENCE:
            out_flags = p.FLAG_FENCE | (flags & p.FLAG_INFO_RING_IDX)
            self._complete_fence(fence_id, ctx_id)
        else:
            fence_id = 0
        hdr = p.CTRL_HDR.pack(rtype, out_flags, fence_id, ctx_id,
                              ring_idx if out_flags & p.FLAG_INFO_RING_IDX else 0)
        if cursor and not writer.available_bytes():
            return 0        # cursor commands normally carry no response buffer
        return writer.write(hdr + payload)

    def _complete_fence(self, fence_id: int, ctx_id: int) -> None:
        """Called before a fenced command's response: in 2D the command's work is done
        already, so the response itself signals the fence."""
        self.last_fence = (fence_id, ctx_id)

    def _note(self, command: str, code: int, why: str) -> None:
        log.debug("virtio-gpu %s: %s -> %#x (%s)", self.label, command, code, why)
        self.errors.append((command, code, why))
        del self.errors[:-64]

    @staticmethod
    def _body(reader: Reader, fmt: Any) -> tuple:
        if reader.available_bytes() < fmt.size:
            raise GpuError(p.RESP_ERR_UNSPEC,
                           f"request body is {reader.available_bytes()} bytes, "
                           f"needs {fmt.size}")
        return reader.read_obj(fmt)

    def _scanout_index(self, scanout_id: int) -> int:
        if not 0 <= scanout_id < len(self.scanouts):
            raise GpuError(p.RESP_ERR_INVALID_SCANOUT_ID,
                           f"scanout {scanout_id} (have {len(self.scanouts)})")
        return scanout_id

    def _resource(self, resource_id: int) -> Resource:
        res = self.resources.get(resource_id)
        if res is None:
            raise GpuError(p.RESP_ERR_INVALID_RESOURCE_ID, f"no resource {resource_id}")
        return res

    # -- 2D commands -------------------------------------------------------------------------

    def _get_display_info(self, reader: Reader) -> tuple[int, bytes]:
        body = b"".join(p.DISPLAY_ONE.pack(0, 0, s.width, s.height, 1, 0)
                        for s in self.scanouts)
        body += bytes(p.DISPLAY_ONE.size * (p.VIRTIO_GPU_MAX_SCANOUTS - len(self.scanouts)))
        return p.RESP_OK_DISPLAY_INFO, body

    def _get_edid(self, reader: Reader) -> tuple[int, bytes]:
        (scanout_id,) = self._body(reader, p.GET_EDID)
        s = self.scanouts[self._scanout_index(scanout_id)]
        edid = build_edid(s.width, s.height, self.refresh_rate, serial=scanout_id)
        return p.RESP_OK_EDID, (p.RESP_EDID_HEAD.pack(len(edid))
                                + edid + bytes(p.EDID_MAX - len(edid)))

    def _resource_create_2d(self, reader: Reader) -> tuple[int, bytes]:
        rid, fmt, width, height = self._body(reader, p.RESOURCE_CREATE_2D)
        if rid == 0 or rid in self.resources:
            raise GpuError(p.RESP_ERR_INVALID_RESOURCE_ID,
                           f"resource id {rid} is {'0' if rid == 0 else 'in use'}")
        if fmt not in p.FORMATS:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, f"unknown format {fmt}")
        if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER, f"size {width}x{height}")
        nbytes = width * height * p.BYTES_PER_PIXEL
        if self.resource_bytes + nbytes > MAX_RESOURCE_BYTES:
            raise GpuError(p.RESP_ERR_OUT_OF_MEMORY,
                           f"{nbytes} bytes more would exceed {MAX_RESOURCE_BYTES}")
        try:
            pixels = np.zeros((height, width * p.BYTES_PER_PIXEL), np.uint8)
        except MemoryError:
            raise GpuError(p.RESP_ERR_OUT_OF_MEMORY, f"{nbytes} bytes") from None
        self.resources[rid] = Resource(rid, fmt, width, height, pixels)
        self.resource_bytes += nbytes
        return p.RESP_OK_NODATA, b""

    def _resource_unref(self, reader: Reader) -> tuple[int, bytes]:
        (rid,) = self._body(reader, p.RESOURCE_ID_PAD)
        res = self._resource(rid)
        for index, s in enumerate(self.scanouts):
            if s.resource_id == rid:
                self._disable_scanout(index)
            if s.cursor_resource == rid:
                s.cursor_resource = 0
        self._release(res)
        del self.resources[rid]
        self.resource_bytes -= res.nbytes
        return p.RESP_OK_NODATA, b""

    def _release(self, res: Resource) -> None:
        """A resource is being unreferenced (2D: its pixels are simply dropped)."""

    def _disable_scanout(self, index: int) -> None:
        s = self.scanouts[index]
        s.resource_id, s.rect = 0, (0, 0, 0, 0)
        self.display.set_scanout(index, 0, 0)

    def _set_scanout(self, reader: Reader) -> tuple[int, bytes]:
        return self._apply_scanout(*self._body(reader, p.SET_SCANOUT))

    def _apply_scanout(self, x: int, y: int, w: int, h: int, scanout_id: int,
                       rid: int) -> tuple[int, bytes]:
        index = self._scanout_index(scanout_id)
        if rid == 0:
            self._disable_scanout(index)
            return p.RESP_OK_NODATA, b""
        res = self._resource(rid)
        if w == 0 or h == 0 or not _rect_inside(x, y, w, h, res.width, res.height):
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"scanout rect {w}x{h}+{x}+{y} outside resource "
                           f"{res.width}x{res.height}")
        s = self.scanouts[index]
        s.resource_id, s.rect = rid, (x, y, w, h)
        self.display.set_scanout(index, w, h)
        self._show(index, res, x, y, w, h)
        return p.RESP_OK_NODATA, b""

    def _resource_flush(self, reader: Reader) -> tuple[int, bytes]:
        x, y, w, h, rid = self._body(reader, p.RESOURCE_FLUSH)
        res = self._resource(rid)
        if not _rect_inside(x, y, w, h, res.width, res.height):
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"flush rect {w}x{h}+{x}+{y} outside resource "
                           f"{res.width}x{res.height}")
        for index, s in enumerate(self.scanouts):
            if s.resource_id == rid and self._show(index, res, x, y, w, h):
                self.display.flush(index)
        return p.RESP_OK_NODATA, b""

    def _show(self, index: int, res: Resource, x: int, y: int, w: int, h: int) -> bool:
        """Copy the part of rect (resource coordinates) that scanout index shows."""
        sx, sy, sw, sh = self.scanouts[index].rect
        x0, y0 = max(x, sx), max(y, sy)
        x1, y1 = min(x + w, sx + sw), min(y + h, sy + sh)
        if x1 <= x0 or y1 <= y0:
            return False
        self._fetch(res, x0, y0, x1 - x0, y1 - y0)
        self.display.update(index, x0 - sx, y0 - sy, self._rgb(res, x0, y0, x1 - x0, y1 - y0))
        return True

    def _fetch(self, res: Resource, x: int, y: int, w: int, h: int) -> None:
        """Bring res.pixels of a rectangle up to date before it is shown (2D: they are;
        TRANSFER_TO_HOST_2D wrote them)."""

    @staticmethod
    def _rgb(res: Resource, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The rectangle as an (h, w, 3) RGB view (no copy: every format's R, G, B bytes
        are adjacent, in order or reversed, so a strided slice picks them)."""
        block = res.pixels[y:y + h, x * 4:(x + w) * 4].reshape(h, w, 4)
        return block[..., _RGB_SLICE[res.format]]

    @staticmethod
    def _rgba(res: Resource, x: int, y: int, w: int, h: int) -> np.ndarray:
        _, r, g, b, a = p.FORMATS[res.format]
        block = res.pixels[y:y + h, x * 4:(x + w) * 4].reshape(h, w, 4)
        if a is None:
            out = np.empty((h, w, 4), np.uint8)
            out[..., :3] = block[..., [r, g, b]]
            out[..., 3] = 255
            return out
        return block[..., [r, g, b, a]]

    def _transfer_to_host_2d(self, reader: Reader) -> tuple[int, bytes]:
        x, y, w, h, offset, rid = self._body(reader, p.TRANSFER_TO_HOST_2D)
        res = self._resource(rid)
        if not _rect_inside(x, y, w, h, res.width, res.height):
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"transfer rect {w}x{h}+{x}+{y} outside resource "
                           f"{res.width}x{res.height}")
        if res.backing is None:
            raise GpuError(p.RESP_ERR_UNSPEC, f"resource {rid} has no backing")
        if w == 0 or h == 0:
            return p.RESP_OK_NODATA, b""
        stride, row = res.stride, w * p.BYTES_PER_PIXEL
        end = offset + (h - 1) * stride + row
        if end > res.backing.length:
            raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                           f"transfer reads backing bytes {offset}..{end}, backing has "
                           f"{res.backing.length}")
        assert self.mem is not None
        flat = res.backing.gather(self.mem, offset, end)
        rows = as_strided(flat, shape=(h, row), strides=(stride, 1),
                                               writeable=False)
        res.pixels[y:y + h, x * 4:x * 4 + row] = rows
        return p.RESP_OK_NODATA, b""

    def _attach_backing(self, reader: Reader) -> tuple[int, bytes]:
        rid, count = self._body(reader, p.ATTACH_BACKING)
        res = self._resource(rid)
        if res.backing is not None:
            raise GpuError(p.RESP_ERR_UNSPEC, f"resource {rid} already has a backing")
        assert self.mem is not None
        backing = Backing.read(reader, count, self.mem)
        self._attach(res, backing)
        res.backing = backing
        return p.RESP_OK_NODATA, b""

    def _detach_backing(self, reader: Reader) -> tuple[int, bytes]:
        (rid,) = self._body(reader, p.RESOURCE_ID_PAD)
        res = self._resource(rid)
        if res.backing is None:
            raise GpuError(p.RESP_ERR_UNSPEC, f"resource {rid} has no backing")
        self._detach(res)
        res.backing = None
        return p.RESP_OK_NODATA, b""

    def _attach(self, res: Resource, backing: Backing) -> None:
        """A checked backing is being attached (2D reads it at TRANSFER_TO_HOST_2D)."""

    def _detach(self, res: Resource) -> None:
        """res.backing is being detached (2D: nothing holds on to it)."""

    def _get_capset_info(self, reader: Reader) -> tuple[int, bytes]:
        (index,) = self._body(reader, p.GET_CAPSET_INFO)
        raise GpuError(p.RESP_ERR_INVALID_PARAMETER,
                       f"capset {index}: this device has {self.num_capsets} capsets")

    def _unsupported_3d(self, reader: Reader) -> tuple[int, bytes]:
        raise GpuError(p.RESP_ERR_UNSPEC, "3D commands need backend=virglrenderer")

    _handlers = {
        p.CMD_GET_DISPLAY_INFO: _get_display_info,
        p.CMD_GET_EDID: _get_edid,
        p.CMD_RESOURCE_CREATE_2D: _resource_create_2d,
        p.CMD_RESOURCE_UNREF: _resource_unref,
        p.CMD_SET_SCANOUT: _set_scanout,
        p.CMD_RESOURCE_FLUSH: _resource_flush,
        p.CMD_TRANSFER_TO_HOST_2D: _transfer_to_host_2d,
        p.CMD_RESOURCE_ATTACH_BACKING: _attach_backing,
        p.CMD_RESOURCE_DETACH_BACKING: _detach_backing,
        p.CMD_GET_CAPSET_INFO: _get_capset_info,
        p.CMD_GET_CAPSET: _get_capset_info,
        **dict.fromkeys(range(p.CMD_CTX_CREATE, p.CMD_RESOURCE_UNMAP_BLOB + 1), _unsupported_3d),
    }

    # -- cursor queue --------------------------------------------------------------------------

    def _cursor(self, ctype: int, reader: Reader) -> tuple[int, bytes]:
        scanout_id, x, y, rid, hot_x, hot_y = (
            lambda t: (t[0], t[1], t[2], t[4], t[5], t[6]))(self._body(reader, p.UPDATE_CURSOR))
        index = self._scanout_index(scanout_id)
        if ctype == p.CMD_MOVE_CURSOR:
            self.display.move_cursor(index, x, y)
            return p.RESP_OK_NODATA, b""
        s = self.scanouts[index]
        if rid == 0:
            s.cursor_resource = 0
            self.display.set_cursor(index, None, 0, 0)
        else:
            res = self._resource(rid)
            w, h = min(res.width, CURSOR_SIZE), min(res.height, CURSOR_SIZE)
            hot_x, hot_y = min(hot_x, w - 1), min(hot_y, h - 1)
            s.cursor_resource = rid
            self.display.set_cursor(index, self._cursor_image(res, w, h), hot_x, hot_y)
        self.display.move_cursor(index, x, y)
        return p.RESP_OK_NODATA, b""

    def _cursor_image(self, res: Resource, w: int, h: int) -> np.ndarray:
        """The top-left w x h of a resource as RGBA (a copy the display may keep)."""
        return self._rgba(res, 0, 0, w, h).copy()

    # -- lifecycle ------------------------------------------------------------------------------

    def _drop_state(self) -> None:
        self.resources.clear()
        self.resource_bytes = 0
        for index, s in enumerate(self.scanouts):
            if s.resource_id:
                self._disable_scanout(index)
            if s.cursor_resource:
                s.cursor_resource = 0
                self.display.set_cursor(index, None, 0, 0)
        self.events_read = 0
        self._update_config()

    def reset(self) -> bool:
        """Device reset: stop the worker, then forget every resource and scanout."""
        stopped = super().reset()
        self._drop_state()
        return stopped

    def keep_fds(self) -> list[int]:
        return self.display.keep_fds()

    def shutdown(self) -> None:
        super().shutdown()
        self.display.close()
