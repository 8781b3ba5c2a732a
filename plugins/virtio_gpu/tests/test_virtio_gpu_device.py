"""The virtio-gpu 2D device model, driven the way Linux's virtio_gpu drives it.

A test driver (vmmcore.virtio.testing.DeviceHarness) puts commands on the control and
cursor queues; the GPU draws into the headless display; screenshots are compared pixel
for pixel with the pattern the driver drew. The hostile suite sends every kind of bad
rectangle, offset, id and backing entry and expects the specification's error responses,
with the device still serving afterwards (never NEEDS_RESET).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.backing import MAX_BACKING_ENTRIES
from vmm_virtio_gpu.device import VirtioGpu
from vmm_virtio_gpu.edid import build_edid, parse_preferred_mode
from vmm_virtio_gpu.factory import create
from vmm_virtio_gpu.testing import GpuClient, hdr

from vmmcore.display import Display, DisplayOptions
from vmmcore.plugin_api import DeviceContext
from vmmcore.virtio.testing import DeviceHarness

MiB = 1 << 20
HDR = p.CTRL_HDR


def needs_headless() -> None:
    """Skip where the headless display plugin is not installed (tox: core + this one)."""
    from vmmcore.registry import Registry

    if "headless" not in Registry().names("display"):
        pytest.skip("the headless display plugin (vmm-display-headless) is not installed")


class GpuDriver(GpuClient):
    """GpuClient over a DeviceHarness (the model driven directly)."""

    def __init__(self, harness: DeviceHarness) -> None:
        client = GpuClient.over_harness(harness)
        super().__init__(client.request, client.drivers, client.mem)
        self.h = harness
        self.cursorq = harness.drivers[1]

    def ok(self, *out: bytes, resp: int = HDR.size) -> bytes:
        code, data = self.send(*out, resp=resp)
        assert code in (p.RESP_OK_NODATA, p.RESP_OK_DISPLAY_INFO, p.RESP_OK_EDID), hex(code)
        return data


@pytest.fixture
def display():
    return Display(DisplayOptions(width=800, height=600, num_scanouts=2))


@pytest.fixture
def gpu(display):
    harness = DeviceHarness(VirtioGpu(display, 800, 600, num_scanouts=2), mem_size=16 * MiB)
    harness.activate(1 << p.VIRTIO_GPU_F_EDID)
    yield GpuDriver(harness)
    harness.close()


def pattern(w: int, h: int) -> np.ndarray:
    """A (h, w, 3) RGB test picture with distinct values in every channel."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7 + y) % 256, (y * 5 + 3 * x) % 256, (x ^ y) % 256],
                    axis=-1).astype(np.uint8)


# byte order of each format, written independently of protocol.FORMATS
LAYOUT = {
    p.FORMAT_B8G8R8A8_UNORM: "BGRA", p.FORMAT_B8G8R8X8_UNORM: "BGRX",
    p.FORMAT_A8R8G8B8_UNORM: "ARGB", p.FORMAT_X8R8G8B8_UNORM: "XRGB",
    p.FORMAT_R8G8B8A8_UNORM: "RGBA", p.FORMAT_X8B8G8R8_UNORM: "XBGR",
    p.FORMAT_A8B8G8R8_UNORM: "ABGR", p.FORMAT_R8G8B8X8_UNORM: "RGBX",
}


def encode(rgb: np.ndarray, fmt: int, alpha: int = 0x80) -> bytes:
    h, w, _ = rgb.shape
    out = np.empty((h, w, 4), np.uint8)
    for i, ch in enumerate(LAYOUT[fmt]):
        out[..., i] = rgb[..., "RGB".index(ch)] if ch in "RGB" else alpha
    return out.tobytes()


def draw(gpu: GpuDriver, rid: int, fmt: int, rgb: np.ndarray, scanout: int = 0,
         pieces: int = 3) -> None:
    h, w, _ = rgb.shape
    assert gpu.create(rid, fmt, w, h) == p.RESP_OK_NODATA
    entries = gpu.backing(w * h * 4, pieces)
    gpu.fill_backing(entries, encode(rgb, fmt))
    assert gpu.attach(rid, entries) == p.RESP_OK_NODATA
    assert gpu.transfer(rid, 0, 0, w, h, 0) == p.RESP_OK_NODATA
    assert gpu.set_scanout(scanout, rid, 0, 0, w, h) == p.RESP_OK_NODATA
    assert gpu.flush(rid, 0, 0, w, h) == p.RESP_OK_NODATA


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------ basics


def test_config_space(gpu):
    dev = gpu.h.device
    events_read, events_clear, num_scanouts, num_capsets = p.CONFIG.unpack(
        dev.read_config(0, 16))
    assert (events_read, events_clear, num_scanouts, num_capsets) == (0, 0, 2, 0)
    dev.display_changed()
    assert dev.read_config(0, 4) == struct.pack("<I", p.VIRTIO_GPU_EVENT_DISPLAY)
    dev.write_config(4, struct.pack("<I", p.VIRTIO_GPU_EVENT_DISPLAY))
    assert dev.read_config(0, 4) == bytes(4)
    dev.display_changed()
    dev.write_config(0, bytes(4))                   # events_read is read-only
    dev.write_config(12, b"\xff" * 4)               # so is num_capsets
    assert dev.read_config(0, 16) == p.CONFIG.pack(1, 0, 2, 0)
    dev.write_config(4, b"\x01")                    # a 1-byte write to events_clear
    assert dev.read_config(0, 4) == bytes(4)
    assert dev.features() == 1 << p.VIRTIO_GPU_F_EDID


def test_get_display_info(gpu):
    data = gpu.ok(hdr(p.CMD_GET_DISPLAY_INFO), resp=HDR.size + 16 * p.DISPLAY_ONE.size)
    assert HDR.unpack_from(data)[0] == p.RESP_OK_DISPLAY_INFO
    modes = [p.DISPLAY_ONE.unpack_from(data, HDR.size + 24 * i) for i in range(16)]
    assert modes[0] == (0, 0, 800, 600, 1, 0) and modes[1] == (0, 0, 800, 600, 1, 0)
    assert all(m == (0,) * 6 for m in modes[2:])


def test_get_edid_is_a_valid_block_for_the_mode(gpu):
    data = gpu.ok(hdr(p.CMD_GET_EDID), p.GET_EDID.pack(1), resp=HDR.size + 8 + 1024)
    assert HDR.unpack_from(data)[0] == p.RESP_OK_EDID
    (size,) = struct.unpack_from("<I", data, HDR.size)
    edid = data[HDR.size + 8:HDR.size + 8 + size]
    assert size == 128 and edid[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
    assert sum(edid) % 256 == 0
    assert parse_preferred_mode(edid) == (800, 600)
    assert (edid[18], edid[19]) == (1, 4)           # EDID 1.4
    assert b"vmm virtio\n" in edid


@pytest.mark.parametrize("w,h,hz", [(640, 480, 60), (1920, 1080, 60), (3840, 2160, 30),
                                    (16384, 16384, 240), (1, 1, 1)])
def test_edid_checksum_and_mode_for_any_size(w, h, hz):
    edid = build_edid(w, h, hz)
    assert len(edid) == 128 and sum(edid) % 256 == 0
    if w <= 4095 and h <= 4095:
        assert parse_preferred_mode(edid) == (w, h)


# --------------------------------------------------------------------------- drawing


def test_a_drawn_pattern_reaches_the_headless_screenshot_pixel_for_pixel(tmp_path):
    needs_headless()
    from vmm_display_headless.headless import HeadlessDisplay

    disp = HeadlessDisplay(DisplayOptions(width=64, height=48))
    harness = DeviceHarness(VirtioGpu(disp, 64, 48), mem_size=16 * MiB)
    harness.activate()
    try:
        gpu = GpuDriver(harness)
        rgb = pattern(64, 48)
        draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, rgb, pieces=5)   # Linux's XRGB8888
        assert disp.wait_flush(0, 1)
        assert np.array_equal(png_pixels(disp.screenshot(0)), rgb)
    finally:
        harness.close()


@pytest.mark.parametrize("fmt", sorted(LAYOUT), ids=lambda f: p.FORMATS[f][0])
def test_every_format(gpu, display, fmt):
    rgb = pattern(40, 30)
    draw(gpu, 7, fmt, rgb)
    assert np.array_equal(display.snapshot(0), rgb)


def test_partial_transfer_uses_offset_and_resource_stride(gpu, display):
    w, h = 32, 20
    rgb = pattern(w, h)
    fmt = p.FORMAT_R8G8B8X8_UNORM
    assert gpu.create(3, fmt, w, h) == p.RESP_OK_NODATA
    entries = gpu.backing(w * h * 4, 4)
    gpu.fill_backing(entries, encode(rgb, fmt))
    assert gpu.attach(3, entries) == p.RESP_OK_NODATA
    assert gpu.set_scanout(0, 3, 0, 0, w, h) == p.RESP_OK_NODATA
    # only the rectangle 10x5 at (7, 4): offset = y * stride + x * bpp, as Linux sends it
    x, y, rw, rh = 7, 4, 10, 5
    assert gpu.transfer(3, x, y, rw, rh, y * w * 4 + x * 4) == p.RESP_OK_NODATA
    assert gpu.flush(3, 0, 0, w, h) == p.RESP_OK_NODATA
    want = np.zeros_like(rgb)
    want[y:y + rh, x:x + rw] = rgb[y:y + rh, x:x + rw]
    assert np.array_equal(display.snapshot(0), want)


def test_scanout_shows_a_sub_rectangle_and_flush_is_clipped(gpu, display):
    rgb = pattern(50, 40)
    draw(gpu, 1, p.FORMAT_B8G8R8A8_UNORM, rgb)
    # scanout 1 shows the 20x10 rectangle at (5, 6) of the same resource
    assert gpu.set_scanout(1, 1, 5, 6, 20, 10) == p.RESP_OK_NODATA
    assert gpu.flush(1, 0, 0, 50, 40) == p.RESP_OK_NODATA
    assert np.array_equal(display.snapshot(1), rgb[6:16, 5:25])
    assert np.array_equal(display.snapshot(0), rgb)
    assert display.flushes[1] >= 1


def test_fence_is_echoed(gpu):
    gpu.create(1, p.FORMAT_B8G8R8X8_UNORM, 4, 4)
    code, data = gpu.send(hdr(p.CMD_RESOURCE_FLUSH, p.FLAG_FENCE, 0x1234567890, 5),
                          p.RESOURCE_FLUSH.pack(0, 0, 4, 4, 1))
    rtype, flags, fence, ctx, _ = HDR.unpack_from(data)
    assert (rtype, flags & p.FLAG_FENCE, fence, ctx) == (p.RESP_OK_NODATA, 1,
                                                        0x1234567890, 5)
    # an error response is fenced too (the driver waits for it)
    code, data = gpu.send(hdr(p.CMD_RESOURCE_FLUSH, p.FLAG_FENCE, 99),
                          p.RESOURCE_FLUSH.pack(0, 0, 4, 4, 42))
    assert HDR.unpack_from(data)[:3] == (p.RESP_ERR_INVALID_RESOURCE_ID, 1, 99)
    assert gpu.h.device.last_fence == (99, 0)


def test_unref_disables_scanout_and_frees(gpu, display):
    draw(gpu, 9, p.FORMAT_B8G8R8X8_UNORM, pattern(16, 16))
    assert gpu.h.device.resource_bytes == 16 * 16 * 4
    assert gpu.unref(9) == p.RESP_OK_NODATA
    assert display.snapshot(0) is None and gpu.h.device.resource_bytes == 0
    assert gpu.unref(9) == p.RESP_ERR_INVALID_RESOURCE_ID


def test_detach_then_transfer_fails_and_reattach_works(gpu):
    draw(gpu, 2, p.FORMAT_B8G8R8X8_UNORM, pattern(8, 8))
    assert gpu.detach(2) == p.RESP_OK_NODATA
    assert gpu.transfer(2, 0, 0, 8, 8, 0) == p.RESP_ERR_UNSPEC
    assert gpu.attach(2, gpu.backing(256)) == p.RESP_OK_NODATA
    assert gpu.transfer(2, 0, 0, 8, 8, 0) == p.RESP_OK_NODATA


def test_disable_scanout_with_resource_zero(gpu, display):
    draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, pattern(8, 8))
    assert gpu.set_scanout(0, 0, 0, 0, 0, 0) == p.RESP_OK_NODATA
    assert display.snapshot(0) is None


def test_cursor_queue(gpu, display):
    rgb = pattern(64, 64)
    assert gpu.create(5, p.FORMAT_B8G8R8A8_UNORM, 64, 64) == p.RESP_OK_NODATA
    entries = gpu.backing(64 * 64 * 4)
    gpu.fill_backing(entries, encode(rgb, p.FORMAT_B8G8R8A8_UNORM, alpha=0xFF))
    gpu.attach(5, entries)
    gpu.transfer(5, 0, 0, 64, 64, 0)
    # Linux sends cursor commands without a response buffer
    n, _ = gpu.send(hdr(p.CMD_UPDATE_CURSOR), p.UPDATE_CURSOR.pack(0, 100, 50, 0, 5, 3, 4),
                    resp=0, queue=1)
    assert n == 0
    c = display.cursors[0]
    assert (c.x, c.y, c.hot_x, c.hot_y) == (100, 50, 3, 4)
    assert np.array_equal(c.image[..., :3], rgb) and (c.image[..., 3] == 255).all()
    gpu.send(hdr(p.CMD_MOVE_CURSOR), p.UPDATE_CURSOR.pack(0, -5, 7, 0, 0, 0, 0),
             resp=0, queue=1)
    assert (c.x, c.y) == (-5, 7) and c.image is not None
    # with a response buffer the answer is OK_NODATA; resource 0 hides the cursor
    code, _ = gpu.send(hdr(p.CMD_UPDATE_CURSOR), p.UPDATE_CURSOR.pack(0, 1, 1, 0, 0, 0, 0),
                       queue=1)
    assert code == p.RESP_OK_NODATA and c.image is None
    # hostile: bad scanout and unknown resource are answered, not raised
    for body, want in ((p.UPDATE_CURSOR.pack(9, 0, 0, 0, 5, 0, 0),
                        p.RESP_ERR_INVALID_SCANOUT_ID),
                       (p.UPDATE_CURSOR.pack(0, 0, 0, 0, 77, 0, 0),
                        p.RESP_ERR_INVALID_RESOURCE_ID)):
        assert gpu.send(hdr(p.CMD_UPDATE_CURSOR), body, queue=1)[0] == want
    assert gpu.send(hdr(p.CMD_GET_DISPLAY_INFO), queue=1)[0] == p.RESP_ERR_UNSPEC
    assert gpu.h.reset_reasons == []


def test_cursor_composited_into_screenshot(gpu, display):
    draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, np.zeros((32, 32, 3), np.uint8))
    gpu.create(2, p.FORMAT_B8G8R8A8_UNORM, 64, 64)
    entries = gpu.backing(64 * 64 * 4)
    gpu.fill_backing(entries, encode(np.full((64, 64, 3), 200, np.uint8),
                                     p.FORMAT_B8G8R8A8_UNORM, alpha=255))
    gpu.attach(2, entries)
    gpu.transfer(2, 0, 0, 64, 64, 0)
    gpu.send(hdr(p.CMD_UPDATE_CURSOR), p.UPDATE_CURSOR.pack(0, 10, 10, 0, 2, 0, 0),
             resp=0, queue=1)
    shot = display.snapshot(0, cursor=True)
    assert (shot[10:, 10:] == 200).all() and (shot[:10, :] == 0).all()


def test_reset_forgets_everything(gpu, display):
    draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, pattern(8, 8))
    dev = gpu.h.device
    assert dev.reset()
    assert dev.resources == {} and dev.resource_bytes == 0 and display.snapshot(0) is None


# --------------------------------------------------------------------------- hostile guest

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1
BX = p.FORMAT_B8G8R8X8_UNORM


def _hostile_cases():
    """(name, set-up, request pieces, expected response)."""
    c = p.RESOURCE_CREATE_2D.pack
    t = p.TRANSFER_TO_HOST_2D.pack
    s = p.SET_SCANOUT.pack
    f = p.RESOURCE_FLUSH.pack
    a = p.ATTACH_BACKING.pack
    e = p.MEM_ENTRY.pack
    H = hdr  # noqa: N806
    return [
        ("short header", False, [b"\x01\x01\x00"], p.RESP_ERR_UNSPEC),
        ("short body", False, [H(p.CMD_RESOURCE_CREATE_2D), b"\x01\x00"], p.RESP_ERR_UNSPEC),
        ("unknown command", False, [H(0xDEAD)], p.RESP_ERR_UNSPEC),
        ("3d without virgl", False, [H(p.CMD_SUBMIT_3D), bytes(8)], p.RESP_ERR_UNSPEC),
        ("blob not offered", False, [H(p.CMD_RESOURCE_CREATE_BLOB), bytes(40)],
         p.RESP_ERR_UNSPEC),
        ("create id 0", False, [H(p.CMD_RESOURCE_CREATE_2D), c(0, BX, 8, 8)],
         p.RESP_ERR_INVALID_RESOURCE_ID),
        ("create duplicate", True, [H(p.CMD_RESOURCE_CREATE_2D), c(1, BX, 8, 8)],
         p.RESP_ERR_INVALID_RESOURCE_ID),
        ("create bad format", False, [H(p.CMD_RESOURCE_CREATE_2D), c(2, 5, 8, 8)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("create width 0", False, [H(p.CMD_RESOURCE_CREATE_2D), c(2, BX, 0, 8)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("create 4G x 4G", False, [H(p.CMD_RESOURCE_CREATE_2D), c(2, BX, U32, U32)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("create beyond memory cap", False, [H(p.CMD_RESOURCE_CREATE_2D),
                                             c(2, BX, 16384, 16384)],
         p.RESP_ERR_OUT_OF_MEMORY),
        ("unref unknown", False, [H(p.CMD_RESOURCE_UNREF), p.RESOURCE_ID_PAD.pack(77)],
         p.RESP_ERR_INVALID_RESOURCE_ID),
        ("scanout id", True, [H(p.CMD_SET_SCANOUT), s(0, 0, 8, 8, 2, 1)],
         p.RESP_ERR_INVALID_SCANOUT_ID),
        ("scanout id huge", True, [H(p.CMD_SET_SCANOUT), s(0, 0, 8, 8, U32, 1)],
         p.RESP_ERR_INVALID_SCANOUT_ID),
        ("scanout unknown resource", False, [H(p.CMD_SET_SCANOUT), s(0, 0, 8, 8, 0, 9)],
         p.RESP_ERR_INVALID_RESOURCE_ID),
        ("scanout rect outside", True, [H(p.CMD_SET_SCANOUT), s(4, 0, 8, 8, 0, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("scanout rect wraps u32", True, [H(p.CMD_SET_SCANOUT), s(U32, U32, 2, 2, 0, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("scanout empty rect", True, [H(p.CMD_SET_SCANOUT), s(0, 0, 0, 8, 0, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("flush unknown", False, [H(p.CMD_RESOURCE_FLUSH), f(0, 0, 1, 1, 3)],
         p.RESP_ERR_INVALID_RESOURCE_ID),
        ("flush rect outside", True, [H(p.CMD_RESOURCE_FLUSH), f(0, 7, 8, 2, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("flush rect wraps", True, [H(p.CMD_RESOURCE_FLUSH), f(U32, 0, 2, 1, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("transfer unknown", False, [H(p.CMD_TRANSFER_TO_HOST_2D), t(0, 0, 1, 1, 0, 4)],
         p.RESP_ERR_INVALID_RESOURCE_ID),
        ("transfer without backing", True, [H(p.CMD_TRANSFER_TO_HOST_2D),
                                            t(0, 0, 8, 8, 0, 1)], p.RESP_ERR_UNSPEC),
        ("transfer rect outside", "backed", [H(p.CMD_TRANSFER_TO_HOST_2D),
                                             t(1, 1, 8, 8, 0, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("transfer rect wraps", "backed", [H(p.CMD_TRANSFER_TO_HOST_2D),
                                           t(0, U32, 8, 2, 0, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("transfer offset past backing", "backed", [H(p.CMD_TRANSFER_TO_HOST_2D),
                                                    t(0, 0, 8, 8, 4, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("transfer offset u64 max", "backed", [H(p.CMD_TRANSFER_TO_HOST_2D),
                                               t(0, 0, 1, 1, U64, 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("attach unknown", False, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(5, 1),
                                   e(0x200000, 4096)], p.RESP_ERR_INVALID_RESOURCE_ID),
        ("attach twice", "backed", [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 1),
                                    e(0x200000, 4096)], p.RESP_ERR_UNSPEC),
        ("attach outside RAM", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 1),
                                      e(64 * MiB, 4096)], p.RESP_ERR_UNSPEC),
        ("attach straddling RAM end", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 1),
                                             e(16 * MiB - 100, 4096)], p.RESP_ERR_UNSPEC),
        ("attach addr wraps", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 1),
                                     e(U64 - 10, U32)], p.RESP_ERR_UNSPEC),
        ("attach zero entries", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 0)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("attach too many entries", True, [H(p.CMD_RESOURCE_ATTACH_BACKING),
                                           a(1, MAX_BACKING_ENTRIES + 1)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("attach entries missing", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 10),
                                          e(0x200000, 4096)], p.RESP_ERR_INVALID_PARAMETER),
        ("attach u32 max entries", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, U32)],
         p.RESP_ERR_INVALID_PARAMETER),
        ("attach all empty", True, [H(p.CMD_RESOURCE_ATTACH_BACKING), a(1, 1),
                                    e(0x200000, 0)], p.RESP_ERR_INVALID_PARAMETER),
        ("detach without backing", True, [H(p.CMD_RESOURCE_DETACH_BACKING),
                                          p.RESOURCE_ID_PAD.pack(1)], p.RESP_ERR_UNSPEC),
        ("edid scanout", False, [H(p.CMD_GET_EDID), p.GET_EDID.pack(16)],
         p.RESP_ERR_INVALID_SCANOUT_ID),
        ("capset info", False, [H(p.CMD_GET_CAPSET_INFO), p.GET_CAPSET_INFO.pack(0)],
         p.RESP_ERR_INVALID_PARAMETER),
    ]


@pytest.mark.parametrize("name,setup,request_,want", _hostile_cases(),
                         ids=[c[0] for c in _hostile_cases()])
def test_hostile_request_gets_the_spec_error(gpu, name, setup, request_, want):
    if setup:
        assert gpu.create(1, BX, 8, 8) == p.RESP_OK_NODATA
    if setup == "backed":
        assert gpu.attach(1, gpu.backing(8 * 8 * 4)) == p.RESP_OK_NODATA
    code, _ = gpu.send(*request_)
    assert code == want, f"{name}: {code:#x} != {want:#x}"
    # the device keeps serving, and no exception escaped
    assert gpu.send(hdr(p.CMD_GET_DISPLAY_INFO), resp=408)[0] == p.RESP_OK_DISPLAY_INFO
    assert gpu.h.reset_reasons == []
    assert not any("internal error" in why for _, _, why in gpu.h.device.errors)


def test_response_buffer_too_small_is_not_an_error(gpu):
    n, _ = gpu.send(hdr(p.CMD_GET_DISPLAY_INFO), resp=0)   # no writable buffer at all
    assert n == 0
    d = gpu.ctrl
    d.add(out=[hdr(p.CMD_GET_DISPLAY_INFO)], in_sizes=[10])
    [used] = gpu.h.wait_used()
    assert used.length == 10 and gpu.h.reset_reasons == []


def test_random_garbage_never_escapes(gpu):
    rng = np.random.default_rng(1)
    gpu.create(1, BX, 8, 8)
    for _ in range(300):
        ctype = int(rng.choice([0x100 + i for i in range(14)] + [0x200, 0x300, 0x301, 7]))
        body = rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes()
        gpu.send(hdr(ctype), body, resp=HDR.size + 1032)
    assert gpu.h.reset_reasons == []
    assert not any("internal error" in why for _, _, why in gpu.h.device.errors)
    assert gpu.send(hdr(p.CMD_GET_DISPLAY_INFO), resp=408)[0] == p.RESP_OK_DISPLAY_INFO


def test_a_malformed_ring_still_means_needs_reset(gpu):
    from vmmcore.virtio.queue import VIRTQ_DESC_F_NEXT

    d = gpu.ctrl
    d.write_desc(0, 0x200000, 24, VIRTQ_DESC_F_NEXT, 0)     # a loop
    d.publish(0)
    d.kick()
    import time
    deadline = time.monotonic() + 5
    while not gpu.h.reset_reasons and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gpu.h.reset_reasons and "malformed request" in gpu.h.reset_reasons[0]


# --------------------------------------------------------------------------- factory


def test_factory_with_headless_and_screenshot_file(tmp_path):
    needs_headless()
    shot = tmp_path / "screen.png"
    opts = {"width": 32, "height": 24, "display": "headless", "num_scanouts": 2,
            "refresh_rate": 60, "screenshot": shot, "backend": "2d",
            "window_keyboard": False, "window_mouse": False}
    dev = create(opts, DeviceContext("virtio_gpu0", 0, 16 * MiB))
    assert dev.display.backend == "headless" and len(dev.scanouts) == 2
    harness = DeviceHarness(dev, mem_size=16 * MiB)
    harness.activate()
    rgb = pattern(32, 24)
    draw(GpuDriver(harness), 1, p.FORMAT_X8R8G8B8_UNORM, rgb)
    harness.close()                     # shutdown writes the final screenshots
    assert np.array_equal(png_pixels(shot.read_bytes()), rgb)
    assert not (tmp_path / "screen-1.png").exists()     # scanout 1 was never enabled


def test_screenshot_keeps_the_last_picture_when_the_driver_disables_the_scanout(tmp_path):
    needs_headless()
    shot = tmp_path / "screen.png"
    dev = create({"width": 16, "height": 16, "display": "headless", "screenshot": shot},
                 DeviceContext("virtio_gpu0", 0, 16 * MiB))
    harness = DeviceHarness(dev, mem_size=16 * MiB)
    harness.activate()
    gpu = GpuDriver(harness)
    rgb = pattern(16, 16)
    draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, rgb)
    assert gpu.set_scanout(0, 0, 0, 0, 0, 0) == p.RESP_OK_NODATA    # as Linux at shutdown
    harness.close()
    assert np.array_equal(png_pixels(shot.read_bytes()), rgb)


def test_virglrenderer_gives_a_clear_start_up_error(monkeypatch):
    """Where virglrenderer cannot initialise, backend=virglrenderer stops at start-up with
    one line saying why (the probe runs in a child: here glvnd finds no EGL vendor, which
    made virglrenderer crash before EGL was checked first)."""
    import os

    from vmm_virtio_gpu import virgl

    env = dict(os.environ, __EGL_VENDOR_LIBRARY_FILENAMES="/nonexistent/egl_vendor.json")
    with pytest.raises(virgl.VirglUnavailable, match="backend=virglrenderer: EGL has no "
                       "surfaceless display .*use backend=2d") as info:
        virgl.check_virglrenderer(env=env)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(virgl, "LIBRARY", "libvirglrenderer-absent.so.1")
    with pytest.raises(virgl.VirglUnavailable, match="cannot load libvirglrenderer-absent"):
        virgl._load()
    monkeypatch.setattr(virgl, "check_virglrenderer", lambda: virgl._load())
    with pytest.raises(virgl.VirglUnavailable, match="install Debian's libvirglrenderer1"):
        create({"backend": "virglrenderer", "width": 8, "height": 8}, None)


def test_behind_the_pci_transport_it_is_a_display_controller():
    from vmmcore.memory import GuestMemory
    from vmmcore.virtio.pci_transport import BAR, DEVICE_CFG_OFFSET, VirtioPciDevice

    mem = GuestMemory([(0, 1 << 20)])
    try:
        dev = VirtioGpu(Display(DisplayOptions(width=8, height=8, num_scanouts=3)), 8, 8,
                        num_scanouts=3)
        pci = VirtioPciDevice(dev, mem)
        cfg = pci.config
        assert (cfg.get_u16(0), cfg.get_u16(2)) == (0x1AF4, 0x1050)    # virtio 1.x GPU
        # class 0x03 (display controller), subclass 0x80 (other): QEMU's virtio-gpu-pci;
        # Linux's virtio_gpu binds by virtio id, and Xorg's modesetting driver by DRM
        assert (cfg.get_u8(0x0B), cfg.get_u8(0x0A)) == (0x03, 0x80)
        num_scanouts = struct.unpack("<I", pci.read_bar(BAR, DEVICE_CFG_OFFSET + 8, 4))[0]
        assert num_scanouts == 3
    finally:
        mem.close()


def test_gpu_spelling_builds_an_implemented_device():
    needs_headless()
    from vmmcore.device_options import DeviceArgs, collect_devices
    from vmmcore.registry import Registry

    [g] = collect_devices(DeviceArgs([("--gpu", "width=800,height=600,num_scanouts=2")]),
                          registry=Registry())
    assert g.options["num_scanouts"] == 2 and g.options["screenshot"] is None


# --------------------------------------------------------------------------- control socket


def test_control_screenshot_key_pointer_status(gpu, display):
    from vmmcore.display import InputChannel

    dev = gpu.h.device
    with pytest.raises(ValueError, match="not enabled"):
        dev.control("screenshot", {})
    rgb = pattern(20, 10)
    draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, rgb)
    answer = dev.control("screenshot", {"scanout": 0})
    assert (answer["width"], answer["height"]) == (20, 10)
    assert np.array_equal(png_pixels(answer["png"]), rgb)
    with pytest.raises(ValueError, match="scanout 5 does not exist"):
        dev.control("screenshot", {"scanout": 5})
    with pytest.raises(ValueError, match="no keyboard"):
        dev.control("key", {"code": 30})
    kbd, tab = InputChannel("k"), InputChannel("t")
    display.attach_input("keyboard", kbd)
    display.attach_input("tablet", tab)
    dev.control("key", {"code": 30, "down": True})
    assert kbd.receive() == [(1, 30, 1), (0, 0, 0)]
    dev.control("pointer", {"x": 19, "y": 0, "buttons": {"left": True}})
    assert tab.receive()[2] == (1, 0x110, 1)
    with pytest.raises(ValueError):
        dev.control("pointer", {"x": 1, "y": 1, "buttons": {"thumb": True}})
    status = dev.control("status", {})
    assert status["scanouts"][0]["resource"] == 1 and status["resources"] == 1


def test_sandboxed_under_its_policies_draws_and_writes_screenshots(tmp_path):
    """As vm_builder does it: the factory in this process, the device in a jailed,
    seccomp'd process under the GPU's and the displays' policies."""
    needs_headless()
    import vmm_display_headless
    import vmm_virtio_gpu

    try:
        from vmmcore.sandbox.testing import PciVirtioRig
    except ImportError:
        pytest.skip("this core has no sandbox")
    from vmmcore.virtio.pci_transport import VirtioPciDevice

    shot = tmp_path / "s.png"
    model = create({"width": 16, "height": 16, "display": "headless", "screenshot": shot},
                   DeviceContext("virtio_gpu0", 0, 16 * MiB))
    policies = [str(Path(vmm_virtio_gpu.__file__).parent / "virtio_gpu.policy"),
                str(Path(vmm_display_headless.__file__).parent / "headless.policy")]
    try:
        rig = PciVirtioRig(lambda mem: VirtioPciDevice(model, mem, label="virtio_gpu0"),
                           sandboxed=True, policies=policies, keep_fds=model.keep_fds(),
                           mem_size=16 * MiB)
    except (OSError, PermissionError) as e:
        pytest.skip(f"no sandbox here: {e}")
    with rig:
        rgb = pattern(16, 16)
        raw = encode(rgb, p.FORMAT_B8G8R8X8_UNORM)
        backing = 8 * MiB
        rig.mem.write(backing, raw)

        def cmd(*out):
            u = rig.request(0, out=list(out), in_sizes=[HDR.size])
            return HDR.unpack_from(u.data)[0]

        assert cmd(hdr(p.CMD_RESOURCE_CREATE_2D), p.RESOURCE_CREATE_2D.pack(1, BX, 16, 16)) \
            == p.RESP_OK_NODATA
        assert cmd(hdr(p.CMD_RESOURCE_ATTACH_BACKING), p.ATTACH_BACKING.pack(1, 1),
                   p.MEM_ENTRY.pack(backing, len(raw))) == p.RESP_OK_NODATA
        assert cmd(hdr(p.CMD_TRANSFER_TO_HOST_2D),
                   p.TRANSFER_TO_HOST_2D.pack(0, 0, 16, 16, 0, 1)) == p.RESP_OK_NODATA
        assert cmd(hdr(p.CMD_SET_SCANOUT), p.SET_SCANOUT.pack(0, 0, 16, 16, 0, 1)) \
            == p.RESP_OK_NODATA
        assert cmd(hdr(p.CMD_RESOURCE_FLUSH), p.RESOURCE_FLUSH.pack(0, 0, 16, 16, 1)) \
            == p.RESP_OK_NODATA
        assert cmd(hdr(0xBEEF)) == p.RESP_ERR_UNSPEC
        # the control socket's path into the device process
        control = rig.device.control
        assert control is not None
        answer = control("screenshot", {})
        assert np.array_equal(png_pixels(bytes(answer["png"])), rgb)
        assert not rig.device.dead, rig.device.death_reason
    assert np.array_equal(png_pixels(shot.read_bytes()), rgb)


def test_hostmem_is_refused_not_ignored():
    from vmmcore.errors import ConfigError

    with pytest.raises(ConfigError, match="blob resources .* not implemented"):
        create({"width": 8, "height": 8, "hostmem": 1 << 20}, None)


# --------------------------------------------------------------------- random sequences

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ids = st.integers(0, 4)
_small = st.sampled_from([0, 1, 3, 8, 16, 17, 0xFFFFFFFF])
_commands = st.one_of(
    st.tuples(st.just("create"), _ids, st.sampled_from(sorted(LAYOUT) + [0, 5]),
              st.integers(0, 20), st.integers(0, 20)),
    st.tuples(st.just("unref"), _ids),
    st.tuples(st.just("attach"), _ids, st.integers(0, 3), st.integers(0, 3000)),
    st.tuples(st.just("detach"), _ids),
    st.tuples(st.just("transfer"), _ids, _small, _small, _small, _small,
              st.sampled_from([0, 4, 64, 1 << 40])),
    st.tuples(st.just("scanout"), st.integers(0, 2), _ids, _small, _small, _small, _small),
    st.tuples(st.just("flush"), _ids, _small, _small, _small, _small),
    st.tuples(st.just("cursor"), st.integers(0, 2), _ids, st.integers(-100, 100)),
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_commands, max_size=25))
def test_random_command_sequences_keep_the_invariants(gpu, sequence):
    """Any sequence of (often invalid) commands: an answer for each, no internal error,
    no reset, and the resource accounting and scanouts stay consistent."""
    dev = gpu.h.device
    dev.reset()                     # a fresh device for each example, driven directly
    dev.mem = gpu.h.mem
    for c in sequence:
        kind = c[0]
        if kind == "create":
            body = hdr(p.CMD_RESOURCE_CREATE_2D) + p.RESOURCE_CREATE_2D.pack(*c[1:])
        elif kind == "unref":
            body = hdr(p.CMD_RESOURCE_UNREF) + p.RESOURCE_ID_PAD.pack(c[1])
        elif kind == "attach":
            entries = [(0x200000 + 0x1000 * i, c[3]) for i in range(c[2])]
            body = (hdr(p.CMD_RESOURCE_ATTACH_BACKING) + p.ATTACH_BACKING.pack(c[1], c[2])
                    + b"".join(p.MEM_ENTRY.pack(a, n) for a, n in entries))
        elif kind == "detach":
            body = hdr(p.CMD_RESOURCE_DETACH_BACKING) + p.RESOURCE_ID_PAD.pack(c[1])
        elif kind == "transfer":
            body = hdr(p.CMD_TRANSFER_TO_HOST_2D) + p.TRANSFER_TO_HOST_2D.pack(
                c[2], c[3], c[4], c[5], c[6], c[1])
        elif kind == "scanout":
            body = hdr(p.CMD_SET_SCANOUT) + p.SET_SCANOUT.pack(c[3], c[4], c[5], c[6], c[1],
                                                              c[2])
        elif kind == "flush":
            body = hdr(p.CMD_RESOURCE_FLUSH) + p.RESOURCE_FLUSH.pack(c[2], c[3], c[4], c[5],
                                                                    c[1])
        else:
            body = hdr(p.CMD_UPDATE_CURSOR) + p.UPDATE_CURSOR.pack(c[1], c[3], c[3], 0, c[2],
                                                                  0, 0)
        code = _run(dev, gpu.h.mem, body, cursor=kind == "cursor")
        assert code in (p.RESP_OK_NODATA, *range(0x1200, 0x1206)), hex(code)
    assert not any("internal error" in why for _, _, why in dev.errors), dev.errors
    assert dev.resource_bytes == sum(r.nbytes for r in dev.resources.values())
    for index, s in enumerate(dev.scanouts):
        if s.resource_id:
            res = dev.resources[s.resource_id]
            x, y, w, h = s.rect
            assert w and h and x + w <= res.width and y + h <= res.height
            assert dev.display.snapshot(index).shape == (h, w, 3)
        else:
            assert dev.display.snapshot(index) is None


def _run(dev, mem, request: bytes, cursor: bool = False) -> int:
    """One command through process() with the request and response in guest memory."""
    from vmmcore.virtio import Reader, Writer
    from vmmcore.virtio.queue import DescriptorChain

    req, resp = 0x300000, 0x380000
    mem.write(req, request)
    chain = DescriptorChain(0, [(req, len(request))], [(resp, 64)], len(request), 64, 2,
                            False, False)
    mem.write(resp, bytes(64))
    dev.process(Reader(mem, chain), Writer(mem, chain), cursor=cursor)
    return HDR.unpack_from(mem.read(resp, HDR.size))[0]


def test_the_control_socket_contract(gpu):
    """vmmcore.control_socket.device_control against the device behind its transport."""
    try:
        from vmmcore.control_socket import ControlError, ControlledDevice, device_control
    except ImportError:
        pytest.skip("this core has no control socket")
    from vmmcore.virtio.pci_transport import VirtioPciDevice

    draw(gpu, 1, p.FORMAT_B8G8R8X8_UNORM, pattern(12, 6))
    pci = VirtioPciDevice(gpu.h.device, gpu.h.mem, label="virtio_gpu0")
    dev = ControlledDevice("virtio_gpu0", "virtio_gpu", 0, "00:01.0", pci)
    answer = device_control(dev, "screenshot", {"path": "/tmp/x.png"})
    assert answer["width"] == 12 and png_pixels(answer["png"]).shape == (6, 12, 3)
    with pytest.raises(ControlError, match="does not support 'resize'"):
        device_control(dev, "resize", {})
    with pytest.raises(ControlError, match="no keyboard"):
        device_control(dev, "key", {"code": 30})
