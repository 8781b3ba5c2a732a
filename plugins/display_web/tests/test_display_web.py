"""The browser display: the page, frames over the WebSocket, input back; then a real
headless Chromium driven over the DevTools protocol shows the pattern drawn through the
virtio-gpu command set and sends a click and a key press to the guest's input devices."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from vmm_display_web import ws
from vmm_display_web.plugin import PLUGIN
from vmm_display_web.web import FRAME, WebDisplay

from vmmcore.display import (
    ABS_MAX,
    BTN_LEFT,
    EV_ABS,
    EV_KEY,
    EV_SYN,
    DisplayError,
    DisplayOptions,
    InputChannel,
    open_display,
)
from vmmcore.registry import Registry


def test_registered():
    rec = Registry(fresh=True).get("display", "web")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.policy_path.name == "web.policy"


@pytest.fixture
def web():
    d = open_display("web", DisplayOptions(name="t", width=64, height=48,
                                           extra={"listen": "127.0.0.1:0"}))
    assert isinstance(d, WebDisplay)
    yield d
    d.close()


def _pattern(w, h):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def _show(d, rgb):
    h, w = rgb.shape[:2]
    d.set_scanout(0, w, h)
    d.update(0, 0, 0, rgb)
    d.flush(0)


def _receive(chan, n, timeout=5.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += chan.receive()
        time.sleep(0.01)
    return got


def test_page_is_served(web):
    with urllib.request.urlopen(web.url, timeout=5) as r:
        page = r.read().decode()
    assert "<canvas" in page and "/ws" in page
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(web.url + "nothing", timeout=5)


def test_frames_and_input_over_the_websocket(web):
    kbd, tab = InputChannel("k"), InputChannel("t")
    web.attach_input("keyboard", kbd)
    web.attach_input("tablet", tab)
    rgb = _pattern(64, 48)
    _show(web, rgb)
    conn = ws.connect(f"ws://{web.address[0]}:{web.address[1]}/ws")
    try:
        msg = conn.receive()
        kind, scanout, w, h = FRAME.unpack_from(msg)
        assert (kind, scanout, w, h) == (1, 0, 64, 48)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(msg[FRAME.size:]))), rgb)
        # a new picture is pushed when the guest flushes again
        rgb2 = 255 - rgb
        _show(web, rgb2)
        msg = conn.receive()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(msg[FRAME.size:]))), rgb2)
        conn.send(json.dumps({"type": "key", "code": "KeyA", "down": True}))
        conn.send(json.dumps({"type": "pointer", "x": 63, "y": 0, "buttons": {"0": True}}))
        conn.send("not json")
        conn.send(json.dumps({"type": "key", "code": "NoSuchKey", "down": True}))
        conn.send(json.dumps([1, 2]))
        assert _receive(kbd, 2) == [(EV_KEY, 30, 1), (EV_SYN, 0, 0)]
        assert _receive(tab, 4) == [(EV_ABS, 0, ABS_MAX), (EV_ABS, 1, 0),
                                    (EV_KEY, BTN_LEFT, 1), (EV_SYN, 0, 0)]
    finally:
        conn.close()


def test_a_huge_client_message_closes_only_that_connection(web):
    conn = ws.connect(f"ws://{web.address[0]}:{web.address[1]}/ws")
    conn.send("x" * (128 * 1024))
    deadline = time.monotonic() + 5
    while web._clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not web._clients
    conn.close()
    with urllib.request.urlopen(web.url, timeout=5) as r:     # still serving
        assert r.status == 200


def test_a_busy_port_is_a_clear_error(web):
    with pytest.raises(DisplayError, match="cannot listen on 127.0.0.1"):
        open_display("web", DisplayOptions(extra={"listen": f"127.0.0.1:{web.address[1]}"}))
    with pytest.raises(DisplayError, match="expected HOST:PORT"):
        open_display("web", DisplayOptions(extra={"listen": "nonsense"}))


# --------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Cdp:
    """Just enough of the Chrome DevTools Protocol over our WebSocket client."""

    def __init__(self, url: str) -> None:
        self.conn = ws.connect(url)
        self.conn.max_message = 64 << 20
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.conn.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.conn.receive())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, awaitPromise=True,
                      returnByValue=True)
        return r["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium installed (Debian: apt install chromium)")
    profile = tempfile.mkdtemp(dir=tmp_path)
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=800,600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(port_file):
            pytest.skip("chromium did not start its DevTools server")
        time.sleep(0.1)
        with open(port_file) as f:
            port = int(f.read().split()[0])
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_headless_chromium_shows_the_pattern_and_a_click_reaches_the_guest(browser):
    """virtio-gpu commands draw a pattern; Chromium shows it pixel for pixel; a click on
    the canvas and a key press arrive at virtio-input devices as evdev events."""
    pytest.importorskip("vmm_virtio_gpu", reason="vmm-virtio-gpu is not installed")
    pytest.importorskip("vmm_virtio_input", reason="vmm-virtio-input is not installed")
    from vmm_virtio_gpu import protocol as p
    from vmm_virtio_gpu.factory import create as create_gpu
    from vmm_virtio_input.device import create as create_input

    from vmmcore.display import close_input_channels
    from vmmcore.plugin_api import DeviceContext
    from vmmcore.virtio.testing import DeviceHarness

    close_input_channels()
    MiB = 1 << 20  # noqa: N806
    gpu = create_gpu({"width": 96, "height": 64, "display": "web", "listen": "127.0.0.1:0",
                      "window_keyboard": True, "window_mouse": True},
                     DeviceContext("virtio_gpu0", 0, 16 * MiB))
    tablet = create_input({"kind": "tablet", "source": "display:virtio_gpu0/tablet",
                           "queue_size": 16}, None)
    keyboard = create_input({"kind": "keyboard", "source": "display:virtio_gpu0/keyboard",
                             "queue_size": 16}, None)
    hg = DeviceHarness(gpu, mem_size=16 * MiB)
    ht, hk = DeviceHarness(tablet), DeviceHarness(keyboard)
    for h in (hg, ht, hk):
        h.activate()
    try:
        # the guest draws the pattern (B8G8R8X8, Linux's XRGB8888) through the command set
        rgb = _pattern(96, 64)
        raw = np.concatenate([rgb[..., ::-1], np.zeros((64, 96, 1), np.uint8)], axis=-1)
        d = hg.drivers[0]
        backing = d.alloc(raw.nbytes)
        hg.mem.write(backing, raw.tobytes())

        def cmd(*out):
            d.add(out=list(out), in_sizes=[24])
            [u] = hg.wait_used(0)
            assert p.CTRL_HDR.unpack_from(u.data)[0] == p.RESP_OK_NODATA

        def hdr(t):
            return p.CTRL_HDR.pack(t, 0, 0, 0, 0)

        cmd(hdr(p.CMD_RESOURCE_CREATE_2D), p.RESOURCE_CREATE_2D.pack(1, 2, 96, 64))
        cmd(hdr(p.CMD_RESOURCE_ATTACH_BACKING), p.ATTACH_BACKING.pack(1, 1),
            p.MEM_ENTRY.pack(backing, raw.nbytes))
        cmd(hdr(p.CMD_TRANSFER_TO_HOST_2D), p.TRANSFER_TO_HOST_2D.pack(0, 0, 96, 64, 0, 1))
        cmd(hdr(p.CMD_SET_SCANOUT), p.SET_SCANOUT.pack(0, 0, 96, 64, 0, 1))
        cmd(hdr(p.CMD_RESOURCE_FLUSH), p.RESOURCE_FLUSH.pack(0, 0, 96, 64, 1))
        # the guest's drivers post event buffers
        for h in (ht, hk):
            for _ in range(16):         # move + press + release: 11 events
                h.drivers[0].add(in_sizes=[8])
            h.drivers[0].kick()

        with urllib.request.urlopen(f"http://127.0.0.1:{browser}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        cdp = Cdp(page["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=gpu.display.url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not cdp.eval("window.vmmFrames > 0"):
            time.sleep(0.1)
        assert cdp.eval("window.vmmFrames > 0"), "the page drew no frame"
        data_url = cdp.eval("document.getElementById('screen').toDataURL('image/png')")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",")[1])))
                           .convert("RGB"))
        assert np.array_equal(shown, rgb), "the canvas differs from the guest's pattern"

        # click the canvas at framebuffer pixel (48, 32), then press and release 'A'
        box = cdp.eval("(() => { const r = document.getElementById('screen')"
                       ".getBoundingClientRect(); return [r.left, r.top]; })()")
        x, y = box[0] + 48, box[1] + 32
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                     clickCount=1)
        for kind in ("keyDown", "keyUp"):
            cdp.call("Input.dispatchKeyEvent", type=kind, code="KeyA", key="a",
                     windowsVirtualKeyCode=65)
        events = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (EV_KEY, BTN_LEFT, 0) not in events:
            events += [tuple(int.from_bytes(u.data[i:i + n], "little", signed=True)
                             for i, n in ((0, 2), (2, 2), (4, 4)))
                       for u in ht.wait_used(0, count=1, timeout=0.5)]
        assert (EV_KEY, BTN_LEFT, 1) in events and (EV_KEY, BTN_LEFT, 0) in events, events
        ax = ABS_MAX * 48 // 95
        ay = ABS_MAX * 32 // 63
        assert (EV_ABS, 0, ax) in events and (EV_ABS, 1, ay) in events, events
        keys = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(keys) < 4:
            keys += [tuple(int.from_bytes(u.data[i:i + n], "little", signed=True)
                           for i, n in ((0, 2), (2, 2), (4, 4)))
                     for u in hk.wait_used(0, count=1, timeout=0.5)]
        assert keys[:4] == [(EV_KEY, 30, 1), (EV_SYN, 0, 0), (EV_KEY, 30, 0), (EV_SYN, 0, 0)]
        cdp.conn.close()
    finally:
        for h in (hg, ht, hk):
            h.close()
        close_input_channels()


def test_sandboxed_gpu_serves_the_viewer_from_its_device_process():
    """vm_builder's way: factory here, device forked and jailed under the GPU's and the
    web display's policies; the page's frames come from the device process."""
    from pathlib import Path

    pytest.importorskip("vmm_virtio_gpu", reason="vmm-virtio-gpu is not installed")
    import vmm_display_web
    import vmm_virtio_gpu
    from vmm_virtio_gpu import protocol as p
    from vmm_virtio_gpu.factory import create as create_gpu

    try:
        from vmmcore.sandbox.testing import PciVirtioRig
    except ImportError:
        pytest.skip("this core has no sandbox")
    from vmmcore.virtio.pci_transport import VirtioPciDevice

    model = create_gpu({"width": 16, "height": 8, "display": "web", "listen": "127.0.0.1:0"},
                       None)
    policies = [str(Path(vmm_virtio_gpu.__file__).parent / "virtio_gpu.policy"),
                str(Path(vmm_display_web.__file__).parent / "web.policy")]
    try:
        rig = PciVirtioRig(lambda mem: VirtioPciDevice(model, mem, label="virtio_gpu0"),
                           sandboxed=True, policies=policies, keep_fds=model.keep_fds())
    except (OSError, PermissionError) as e:
        pytest.skip(f"no sandbox here: {e}")
    try:
        with rig:
            rgb = _pattern(16, 8)
            raw = np.concatenate([rgb[..., ::-1], np.zeros((8, 16, 1), np.uint8)], -1)
            rig.mem.write(4 << 20, raw.tobytes())

            def cmd(t, *body):
                u = rig.request(0, out=[p.CTRL_HDR.pack(t, 0, 0, 0, 0), *body], in_sizes=[24])
                assert p.CTRL_HDR.unpack_from(u.data)[0] == p.RESP_OK_NODATA

            cmd(p.CMD_RESOURCE_CREATE_2D, p.RESOURCE_CREATE_2D.pack(1, 2, 16, 8))
            cmd(p.CMD_RESOURCE_ATTACH_BACKING, p.ATTACH_BACKING.pack(1, 1),
                p.MEM_ENTRY.pack(4 << 20, raw.nbytes))
            cmd(p.CMD_TRANSFER_TO_HOST_2D, p.TRANSFER_TO_HOST_2D.pack(0, 0, 16, 8, 0, 1))
            cmd(p.CMD_SET_SCANOUT, p.SET_SCANOUT.pack(0, 0, 16, 8, 0, 1))
            cmd(p.CMD_RESOURCE_FLUSH, p.RESOURCE_FLUSH.pack(0, 0, 16, 8, 1))
            host, port = model.display.address
            conn = ws.connect(f"ws://{host}:{port}/ws")
            try:
                msg = conn.receive()
                shown = np.asarray(Image.open(io.BytesIO(msg[FRAME.size:])))
                assert np.array_equal(shown, rgb)
            finally:
                conn.close()
            assert not rig.device.dead, rig.device.death_reason
    finally:
        model.display.close()
