"""virtio-gpu with VIRTIO_GPU_F_VIRGL against the real virglrenderer (llvmpipe here).

The test plays Linux's virtio_gpu driver plus Mesa's virgl driver: it creates a context
and a render target, submits a virgl command stream encoded by hand from
virglrenderer's virgl_protocol.h (a surface, the framebuffer state, a CLEAR), reads the
result back with TRANSFER_FROM_HOST_3D, and shows it on the headless display. The
hostile part sends bad ids, boxes, backings and garbage command streams, and expects
error responses with the device still serving.

Skipped only where virglrenderer cannot initialise at all (the reason is printed).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtio_gpu_device import GpuDriver, needs_headless, png_pixels
from vmm_virtio_gpu import protocol as p
from vmm_virtio_gpu.device3d import VirglGpu
from vmm_virtio_gpu.testing import CCMD_CLEAR, CTX, RGBA, GpuClient, ccmd, clear_stream, hdr
from vmm_virtio_gpu.virgl import CAPSET_VIRGL, CAPSET_VIRGL2, VirglUnavailable

from vmmcore.display import Display, DisplayOptions
from vmmcore.virtio.testing import DeviceHarness

MiB = 1 << 20
W, H = GpuClient.width, GpuClient.height
HDR_SIZE = p.CTRL_HDR.size


def virgl_probe() -> None:
    """Skip (saying why) only where virglrenderer cannot initialise on this host."""
    from vmm_virtio_gpu.virgl import check_virglrenderer

    try:
        check_virglrenderer()
    except VirglUnavailable as e:
        pytest.skip(f"virglrenderer cannot initialise here: {e}")


@pytest.fixture
def display():
    return Display(DisplayOptions(width=W, height=H))


@pytest.fixture
def gpu(display):
    virgl_probe()
    harness = DeviceHarness(VirglGpu(display, W, H), mem_size=16 * MiB)
    harness.activate(1 << p.VIRTIO_GPU_F_VIRGL)
    yield GpuDriver(harness)
    harness.close()


def expected(w: int = W, h: int = H) -> np.ndarray:
    return np.tile(np.array(RGBA[:3], np.uint8), (h, w, 1))


# ------------------------------------------------------------------------------ basics


def test_offers_virgl_and_two_capsets(gpu):
    dev = gpu.h.device
    assert dev.features() & (1 << p.VIRTIO_GPU_F_VIRGL)
    assert p.CONFIG.unpack(dev.read_config(0, 16))[3] == 2


def test_capset_info_and_data(gpu):
    infos = []
    for index in (0, 1):
        code, data = gpu.send(hdr(p.CMD_GET_CAPSET_INFO), p.GET_CAPSET_INFO.pack(index),
                              resp=HDR_SIZE + p.RESP_CAPSET_INFO.size)
        assert code == p.RESP_OK_CAPSET_INFO
        infos.append(p.RESP_CAPSET_INFO.unpack_from(data, HDR_SIZE))
    assert [i[0] for i in infos] == [CAPSET_VIRGL, CAPSET_VIRGL2]
    assert all(ver >= 1 and size > 0 for _, ver, size in infos)
    for capset_id, ver, size in infos:
        code, data = gpu.send(hdr(p.CMD_GET_CAPSET), p.GET_CAPSET.pack(capset_id, ver),
                              resp=HDR_SIZE + size)
        assert code == p.RESP_OK_CAPSET and len(data) == HDR_SIZE + size
        # struct virgl_caps_v1 starts with max_version, then the format bitmasks:
        # a real renderer supports some sampler formats
        max_version = struct.unpack_from("<I", data, HDR_SIZE)[0]
        assert max_version == ver and any(data[HDR_SIZE + 4:HDR_SIZE + 64])
    assert gpu.send(hdr(p.CMD_GET_CAPSET_INFO), p.GET_CAPSET_INFO.pack(2))[0] == \
        p.RESP_ERR_INVALID_PARAMETER
    assert gpu.send(hdr(p.CMD_GET_CAPSET), p.GET_CAPSET.pack(3, 1))[0] == \
        p.RESP_ERR_INVALID_PARAMETER
    assert gpu.send(hdr(p.CMD_GET_CAPSET), p.GET_CAPSET.pack(1, 99))[0] == \
        p.RESP_ERR_INVALID_PARAMETER


def test_context_create_and_destroy(gpu):
    assert gpu.ctx_create(CTX) == p.RESP_OK_NODATA
    assert gpu.ctx_create(CTX) == p.RESP_ERR_INVALID_CONTEXT_ID        # in use
    assert gpu.ctx_create(0) == p.RESP_ERR_INVALID_CONTEXT_ID          # reserved
    assert gpu.send(hdr(p.CMD_CTX_DESTROY, ctx=CTX))[0] == p.RESP_OK_NODATA
    assert gpu.send(hdr(p.CMD_CTX_DESTROY, ctx=CTX))[0] == p.RESP_ERR_INVALID_CONTEXT_ID
    assert gpu.ctx_create(CTX) == p.RESP_OK_NODATA                     # the id is free


# ------------------------------------------------------------------------- rendering


def test_submit_3d_clear_then_transfer_from_host_gives_every_pixel(gpu):
    pixels = gpu.clear_and_read_back()
    bgra = np.array([RGBA[2], RGBA[1], RGBA[0], RGBA[3]], np.uint8)
    assert (pixels == bgra).all(), np.unique(pixels.reshape(-1, 4), axis=0)
    assert gpu.h.device.last_fence == (2, CTX)


def test_flushed_3d_render_target_is_the_screenshot_pixel_for_pixel(gpu, display):
    gpu.clear_and_read_back()
    assert gpu.set_scanout(0, 1, 0, 0, W, H) == p.RESP_OK_NODATA
    assert gpu.flush(1, 0, 0, W, H) == p.RESP_OK_NODATA
    assert np.array_equal(display.snapshot(0), expected())


def test_transfer_to_host_3d_round_trips_and_shows_a_pattern(gpu, display):
    """Guest pixels up (TRANSFER_TO_HOST_3D), back down into a second buffer, and onto
    the display: the same picture three times, the right way up."""
    entries = gpu.render_target()
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 4, y * 5, (x ^ y) * 3], axis=-1).astype(np.uint8)
    bgra = np.concatenate([rgb[..., ::-1], np.full((H, W, 1), 255, np.uint8)], axis=-1)
    gpu.fill_backing(entries, bgra.tobytes())
    assert gpu.transfer_3d(p.CMD_TRANSFER_TO_HOST_3D, CTX, 1, (0, 0, 0, W, H, 1)) == \
        p.RESP_OK_NODATA
    gpu.fill_backing(entries, bytes(W * H * 4))
    assert gpu.transfer_3d(p.CMD_TRANSFER_FROM_HOST_3D, CTX, 1, (0, 0, 0, W, H, 1),
                           fence=7) == p.RESP_OK_NODATA
    assert gpu.read_backing(entries) == bgra.tobytes()
    assert gpu.set_scanout(0, 1, 0, 0, W, H) == p.RESP_OK_NODATA
    assert np.array_equal(display.snapshot(0), rgb)


def test_dumb_buffer_path_2d_commands_go_through_virglrenderer(gpu, display):
    """fbcon in virgl mode: RESOURCE_CREATE_2D + TRANSFER_TO_HOST_2D + flush."""
    from test_virtio_gpu_device import draw, pattern

    rgb = pattern(W, H)
    draw(gpu, 9, p.FORMAT_B8G8R8X8_UNORM, rgb)
    assert np.array_equal(display.snapshot(0), rgb)
    assert gpu.unref(9) == p.RESP_OK_NODATA
    assert display.snapshot(0) is None and gpu.h.device.resources == {}


def test_headless_screenshot_file_of_a_3d_clear(tmp_path):
    needs_headless()
    virgl_probe()
    from vmm_virtio_gpu.factory import create

    shot = tmp_path / "screen.png"
    dev = create({"backend": "virglrenderer", "width": W, "height": H,
                  "display": "headless", "screenshot": shot}, None)
    harness = DeviceHarness(dev, mem_size=16 * MiB)
    harness.activate(1 << p.VIRTIO_GPU_F_VIRGL)
    gpu = GpuDriver(harness)
    gpu.clear_and_read_back()
    assert gpu.set_scanout(0, 1, 0, 0, W, H) == p.RESP_OK_NODATA
    assert gpu.flush(1, 0, 0, W, H) == p.RESP_OK_NODATA
    png = dev.control("screenshot", {})["png"]
    harness.close()
    assert np.array_equal(png_pixels(png), expected())
    assert np.array_equal(png_pixels(shot.read_bytes()), expected())


# ---------------------------------------------------------------------------- hostile


def test_hostile_3d_requests_get_errors_and_the_device_keeps_serving(gpu):
    entries = gpu.render_target()
    E = p
    X = p.CMD_TRANSFER_FROM_HOST_3D
    cases = [
        ("submit to no context", gpu.submit(99, clear_stream(1)), E.RESP_ERR_INVALID_CONTEXT_ID),
        ("submit size past the request", gpu.submit(CTX, clear_stream(1), size=4096),
         E.RESP_ERR_INVALID_PARAMETER),
        ("submit size not whole dwords", gpu.submit(CTX, b"\0" * 8, size=6),
         E.RESP_ERR_INVALID_PARAMETER),
        ("garbage command stream", gpu.submit(CTX, bytes(range(256)) * 4),
         E.RESP_ERR_INVALID_PARAMETER),
        ("unknown command", gpu.submit(CTX, ccmd(0xEE, 0, 1, 2, 3)),
         E.RESP_ERR_INVALID_PARAMETER),
        ("command longer than the stream", gpu.submit(CTX, ccmd(CCMD_CLEAR, 0)[:4]
                                                      + bytes(4) * 3 + ccmd(7, 0, 9)),
         E.RESP_ERR_INVALID_PARAMETER),
        ("surface on a missing resource", gpu.submit(CTX, clear_stream(77)),
         E.RESP_ERR_INVALID_PARAMETER),
        ("attach to no context", gpu.ctx_attach(42, 1), E.RESP_ERR_INVALID_CONTEXT_ID),
        ("attach a missing resource", gpu.ctx_attach(CTX, 42),
         E.RESP_ERR_INVALID_RESOURCE_ID),
        ("create 3d id 0", gpu.create_3d(0), E.RESP_ERR_INVALID_RESOURCE_ID),
        ("create 3d id in use", gpu.create_3d(1), E.RESP_ERR_INVALID_RESOURCE_ID),
        ("create 3d bad target", gpu.create_3d(2, target=9), E.RESP_ERR_INVALID_PARAMETER),
        ("create 3d huge", gpu.create_3d(2, w=1 << 20), E.RESP_ERR_INVALID_PARAMETER),
        ("create 3d over the memory cap", gpu.create_3d(2, w=16384, h=16384),
         E.RESP_ERR_OUT_OF_MEMORY),
        ("create 3d too many levels", gpu.create_3d(2, last_level=7),
         E.RESP_ERR_INVALID_PARAMETER),
        ("create 3d depth on 2D", gpu.create_3d(2, depth=4), E.RESP_ERR_INVALID_PARAMETER),
        ("create 3d format 0", gpu.create_3d(2, fmt=0), E.RESP_ERR_INVALID_PARAMETER),
        ("create 3d unknown format", gpu.create_3d(2, fmt=400),
         E.RESP_ERR_INVALID_PARAMETER),
        ("transfer missing resource", gpu.transfer_3d(X, CTX, 42, (0, 0, 0, 1, 1, 1)),
         E.RESP_ERR_INVALID_RESOURCE_ID),
        ("transfer bad context", gpu.transfer_3d(X, 42, 1, (0, 0, 0, 1, 1, 1)),
         E.RESP_ERR_INVALID_CONTEXT_ID),
        ("oversized box", gpu.transfer_3d(X, CTX, 1, (0, 0, 0, W + 1, H, 1)),
         E.RESP_ERR_INVALID_PARAMETER),
        ("box wraps u32", gpu.transfer_3d(X, CTX, 1, (0xFFFF_FFFF, 0, 0, 2, 1, 1)),
         E.RESP_ERR_INVALID_PARAMETER),
        ("box deeper than 2D", gpu.transfer_3d(X, CTX, 1, (0, 0, 0, W, H, 2)),
         E.RESP_ERR_INVALID_PARAMETER),
        ("missing mip level", gpu.transfer_3d(X, CTX, 1, (0, 0, 0, 1, 1, 1), level=1),
         E.RESP_ERR_INVALID_PARAMETER),
        ("offset past the backing", gpu.transfer_3d(X, CTX, 1, (0, 0, 0, 1, 1, 1),
                                                    offset=W * H * 4),
         E.RESP_ERR_INVALID_PARAMETER),
        ("rows past the backing", gpu.transfer_3d(X, CTX, 1, (0, 0, 0, W, H, 1),
                                                  stride=W * 4 + 4),
         E.RESP_ERR_INVALID_PARAMETER),
        ("backing outside guest RAM", gpu.attach(1, [(64 * MiB, 4096)]),
         E.RESP_ERR_UNSPEC),
        ("second backing", gpu.attach(1, entries), E.RESP_ERR_UNSPEC),
        ("detach from no context", gpu.send(hdr(p.CMD_CTX_DETACH_RESOURCE, ctx=42),
                                            p.CTX_RESOURCE.pack(1))[0],
         E.RESP_ERR_INVALID_CONTEXT_ID),
        ("short ctx_create", gpu.send(hdr(p.CMD_CTX_CREATE, ctx=8), b"\0" * 8)[0],
         E.RESP_ERR_UNSPEC),
        ("name longer than its field", gpu.send(hdr(p.CMD_CTX_CREATE, ctx=8),
                                                p.CTX_CREATE.pack(65, 0, b"x"))[0],
         E.RESP_ERR_INVALID_PARAMETER),
        ("blob commands", gpu.send(hdr(p.CMD_RESOURCE_MAP_BLOB), bytes(16))[0],
         E.RESP_ERR_UNSPEC),
    ]
    bad = [(name, hex(got), hex(want)) for name, got, want in cases if got != want]
    assert not bad
    # still serving: virglrenderer gave up on the context that sent garbage (as a real
    # GPU driver loses it), but a new one renders into the same resource
    assert gpu.ctx_create(CTX + 1) == p.RESP_OK_NODATA
    assert gpu.ctx_attach(CTX + 1, 1) == p.RESP_OK_NODATA
    assert gpu.submit(CTX + 1, clear_stream(1), fence=3) == p.RESP_OK_NODATA
    assert gpu.transfer_3d(X, CTX + 1, 1, (0, 0, 0, W, H, 1)) == p.RESP_OK_NODATA
    assert gpu.read_backing(entries)[:4] == bytes([RGBA[2], RGBA[1], RGBA[0], RGBA[3]])
    assert not gpu.h.reset_reasons


def test_reset_forgets_contexts_and_resources(gpu):
    """After a device reset virglrenderer has forgotten context CTX and resource 1 too
    (it would refuse to create them again otherwise)."""
    gpu.render_target()
    dev = gpu.h.device
    assert dev.reset()
    assert dev.resources == {} and dev.contexts == set() and dev.resource_bytes == 0
    harness = DeviceHarness(dev, mem_size=16 * MiB)        # a fresh driver, new rings
    try:
        harness.activate(1 << p.VIRTIO_GPU_F_VIRGL)
        pixels = GpuDriver(harness).clear_and_read_back()
        assert pixels[0, 0].tolist() == [RGBA[2], RGBA[1], RGBA[0], RGBA[3]]
    finally:
        harness.close()


def test_cursor_image_is_read_back_from_virglrenderer(gpu, display):
    from test_virtio_gpu_device import encode, pattern

    rgb = pattern(64, 64)
    assert gpu.create(5, p.FORMAT_B8G8R8A8_UNORM, 64, 64) == p.RESP_OK_NODATA
    entries = gpu.backing(64 * 64 * 4)
    gpu.fill_backing(entries, encode(rgb, p.FORMAT_B8G8R8A8_UNORM, alpha=0xFF))
    assert gpu.attach(5, entries) == p.RESP_OK_NODATA
    assert gpu.transfer(5, 0, 0, 64, 64, 0) == p.RESP_OK_NODATA
    code, _ = gpu.send(hdr(p.CMD_UPDATE_CURSOR), p.UPDATE_CURSOR.pack(0, 10, 20, 0, 5, 1, 2),
                       queue=1)
    assert code == p.RESP_OK_NODATA
    c = display.cursors[0]
    assert np.array_equal(c.image[..., :3], rgb) and (c.image[..., 3] == 255).all()
    # a buffer is no image: answered, not raised
    assert gpu.create_3d(6, w=4096, h=1, target=0, fmt=64) == p.RESP_OK_NODATA
    code, _ = gpu.send(hdr(p.CMD_UPDATE_CURSOR), p.UPDATE_CURSOR.pack(0, 0, 0, 0, 6, 0, 0),
                       queue=1)
    assert code == p.RESP_ERR_INVALID_PARAMETER and not gpu.h.reset_reasons


u32 = st.integers(0, 0xFFFF_FFFF)
# bodies of the commands whose every field this side checks before virglrenderer
FUZZED = {
    p.CMD_RESOURCE_CREATE_3D: st.tuples(*[st.sampled_from([0, 1, 2, 3, 7, 64, 65536,
                                                           0xFFFF_FFFF]) | u32] * 11)
    .map(lambda f: p.RESOURCE_CREATE_3D.pack(*f)),
    p.CMD_TRANSFER_TO_HOST_3D: st.tuples(*[st.integers(0, 80) | u32] * 6, st.integers(
        0, 1 << 16) | st.integers(0, (1 << 64) - 1), st.sampled_from([1, 2, 9]),
        st.integers(0, 3), st.sampled_from([0, W * 4, 1]), u32)
    .map(lambda f: p.TRANSFER_HOST_3D.pack(*f)),
    p.CMD_TRANSFER_FROM_HOST_3D: st.tuples(*[st.integers(0, 80) | u32] * 6, st.integers(
        0, 1 << 16), st.sampled_from([1, 2, 9]), st.integers(0, 3),
        st.sampled_from([0, W * 4, 7]), u32).map(lambda f: p.TRANSFER_HOST_3D.pack(*f)),
    p.CMD_TRANSFER_TO_HOST_2D: st.tuples(*[st.integers(0, 80) | u32] * 4,
                                         st.integers(0, 1 << 16), st.sampled_from([1, 2, 9]))
    .map(lambda f: p.TRANSFER_TO_HOST_2D.pack(*f)),
    p.CMD_CTX_ATTACH_RESOURCE: st.sampled_from([1, 2, 9]).map(p.CTX_RESOURCE.pack),
    p.CMD_CTX_DETACH_RESOURCE: st.sampled_from([1, 2, 9]).map(p.CTX_RESOURCE.pack),
    p.CMD_SET_SCANOUT: st.tuples(*[st.integers(0, 80)] * 4, st.integers(0, 2),
                                 st.sampled_from([0, 1, 2, 9]))
    .map(lambda f: p.SET_SCANOUT.pack(*f)),
    p.CMD_RESOURCE_FLUSH: st.tuples(*[st.integers(0, 80) | u32] * 4,
                                    st.sampled_from([1, 2, 9]))
    .map(lambda f: p.RESOURCE_FLUSH.pack(*f)),
}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(FUZZED)), st.data()), min_size=1,
                max_size=6), st.sampled_from([CTX, 0, 77]))
def test_fuzzed_3d_requests_are_answered_and_the_device_lives(gpu, commands, ctx):
    """Random boxes, offsets, levels, ids and sizes against a live render target: every
    request gets an OK or an error response, never NEEDS_RESET, and afterwards the
    device (in this same process as virglrenderer) still renders."""
    dev = gpu.h.device
    if 1 not in dev.resources:
        gpu.render_target()
    for ctype, data in commands:
        body = data.draw(FUZZED[ctype])
        code = gpu.send(hdr(ctype, ctx=ctx), body)[0]
        assert code == p.RESP_OK_NODATA or 0x1200 <= code <= 0x1205, hex(code)
    assert not gpu.h.reset_reasons
    assert not [e for e in dev.errors if "internal error" in e[2]], dev.errors[-3:]
    for rid in [r for r in dev.resources if r != 1]:
        assert gpu.unref(rid) == p.RESP_OK_NODATA
    fresh = max(dev.contexts | {CTX}) + 1       # the fuzzing may have detached resource 1
    assert gpu.ctx_create(fresh) == p.RESP_OK_NODATA
    assert gpu.ctx_attach(fresh, 1) == p.RESP_OK_NODATA
    assert gpu.submit(fresh, clear_stream(1)) == p.RESP_OK_NODATA
    assert gpu.send(hdr(p.CMD_CTX_DESTROY, ctx=fresh))[0] == p.RESP_OK_NODATA


# ------------------------------------------------------------------ the renderer thread


class _SlowFences:
    """A stand-in virglrenderer whose fences retire on the third poll after creation."""

    def __init__(self) -> None:
        self.pending: list[list[int]] = []
        self.retired: list[int] = []

    def virgl_renderer_create_fence(self, seq: int, ctx_id: int) -> int:
        self.pending.append([seq, 3])
        return 0

    def virgl_renderer_poll(self) -> None:
        from vmm_virtio_gpu.virgl import _on_write_fence

        for item in self.pending:
            item[1] -= 1
        while self.pending and self.pending[0][1] <= 0:
            seq = self.pending.pop(0)[0]
            self.retired.append(seq)
            _on_write_fence(None, seq)


def test_a_fence_waits_for_itself_across_the_sequence_wrap(monkeypatch):
    """Fence numbers wrap from FENCE_SEQ_MAX to 1; the first fence after the wrap must
    still wait until virglrenderer retires it (it once counted as done at once)."""
    from vmm_virtio_gpu import virgl

    fake = _SlowFences()
    r = virgl.Renderer()
    monkeypatch.setattr(r, "call", lambda fn, *args: fn(fake, *args))
    r._next_fence = virgl.FENCE_SEQ_MAX - 1        # and that fence has been retired
    monkeypatch.setattr(virgl._fences, "done", r._next_fence)
    assert r.fence(0) and fake.retired == [virgl.FENCE_SEQ_MAX]
    assert r.fence(0) and fake.retired == [virgl.FENCE_SEQ_MAX, 1]
    assert r.fence(0) and fake.retired == [virgl.FENCE_SEQ_MAX, 1, 2]
    assert virgl.fence_reached(5, 5) and virgl.fence_reached(6, 5)
    assert not virgl.fence_reached(4, 5) and not virgl.fence_reached(0, 1)
    assert virgl.fence_reached(1, virgl.FENCE_SEQ_MAX)
    assert not virgl.fence_reached(virgl.FENCE_SEQ_MAX, 1)


def test_an_unexpected_error_starting_virglrenderer_is_answered_not_hung(monkeypatch):
    """Anything _initialise raises (not only VirglUnavailable) reaches the caller as
    VirglUnavailable; the caller waited forever on the thread's `ready` before."""
    import threading

    from vmm_virtio_gpu import virgl

    def boom(cookie, cbs):
        raise RuntimeError("boom")

    monkeypatch.setattr(virgl, "_initialise", boom)
    r = virgl.Renderer()
    result: list[BaseException] = []

    def call() -> None:
        try:
            r.call(lambda lib: None)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            result.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "Renderer.call hung on a renderer that failed to start"
    assert isinstance(result[0], VirglUnavailable) and "RuntimeError: boom" in str(result[0])
    assert virgl.Renderer._active is None


def test_tiny_resources_count_against_the_memory_cap(gpu, monkeypatch):
    """Every resource is charged at least MIN_RESOURCE_BYTES: a flood of 1-byte buffers
    (host bookkeeping each) hits ERR_OUT_OF_MEMORY like big textures do."""
    from vmm_virtio_gpu import device3d
    from vmm_virtio_gpu.limits3d import MIN_RESOURCE_BYTES

    monkeypatch.setattr(device3d, "MAX_RESOURCE_BYTES", 16 * MIN_RESOURCE_BYTES)
    codes = [gpu.create_3d(rid, w=1, h=1, target=0, fmt=64) for rid in range(1, 18)]
    assert codes == [p.RESP_OK_NODATA] * 16 + [p.RESP_ERR_OUT_OF_MEMORY]
    assert gpu.unref(1) == p.RESP_OK_NODATA
    assert gpu.create_3d(1, w=1, h=1, target=0, fmt=64) == p.RESP_OK_NODATA
    assert gpu.h.device.resource_bytes == 16 * MIN_RESOURCE_BYTES


def test_reset_does_not_wait_out_a_fence_the_host_gpu_has_not_signalled(gpu, monkeypatch):
    """A fenced command waits up to FENCE_TIMEOUT for the host GPU, longer than a reset
    waits for the worker (5 s): reset once gave up on the worker and dropped every
    resource under it, and the worker answered on the old rings afterwards. Now the
    fence wait gives up and the worker stops in time."""
    import time

    from vmm_virtio_gpu import virgl

    gpu.render_target()
    monkeypatch.setattr(virgl, "FENCE_TIMEOUT", 60.0)
    monkeypatch.setattr(virgl, "fence_reached", lambda done, seq: False)   # never done
    gpu.ctrl.add(out=[hdr(p.CMD_SUBMIT_3D, p.FLAG_FENCE, 9, CTX),
                      p.SUBMIT_3D.pack(len(clear_stream(1))), clear_stream(1)],
                 in_sizes=[HDR_SIZE])
    gpu.ctrl.kick()
    time.sleep(0.5)
    assert gpu.ctrl.get_used() == []                 # the worker is in the fence wait
    start = time.monotonic()
    assert gpu.h.device.reset()                      # True: the worker stopped
    assert time.monotonic() - start < 4
    assert gpu.h.device.resources == {} and gpu.h.device.contexts == set()


def test_ids_virglrenderer_takes_as_int_are_refused_and_reset_still_works(gpu):
    """Resource and context ids above 2**31-1 do not fit virglrenderer's int parameters:
    they once became internal errors on every later use, a resource that could not be
    unreferenced, and a device reset that raised OverflowError."""
    big = 0x8000_0001
    entries = gpu.render_target()
    assert gpu.create_3d(big) == p.RESP_ERR_INVALID_RESOURCE_ID
    assert gpu.create(big, p.FORMAT_B8G8R8X8_UNORM, 8, 8) == p.RESP_ERR_INVALID_RESOURCE_ID
    assert gpu.ctx_create(big) == p.RESP_ERR_INVALID_CONTEXT_ID
    assert gpu.create_3d(0x7FFF_FFFF) == p.RESP_OK_NODATA            # the largest
    assert gpu.attach(0x7FFF_FFFF, gpu.backing(W * H * 4)) == p.RESP_OK_NODATA
    assert gpu.ctx_attach(CTX, 0x7FFF_FFFF) == p.RESP_OK_NODATA
    assert gpu.submit(CTX, clear_stream(0x7FFF_FFFF)) == p.RESP_OK_NODATA
    assert entries and not [e for e in gpu.h.device.errors if "internal error" in e[2]]
    assert gpu.h.device.reset()
    assert gpu.h.device.resources == {}
