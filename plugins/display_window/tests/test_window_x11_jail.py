"""The window display on a real X server (Debian's Xvfb) from a sandboxed GPU, built as
`vmm run --gpu display=window` builds it: the factory here, the device in a jailed
process under the policies, bind mounts and preloads the VM builder gives it
(vm_builder.jail_policies / jail_binds_and_preload). The 2D commands draw a known
picture, an X screenshot (Pillow's ImageGrab over xcb) must show it pixel for pixel,
and a click and a key sent with xdotool (XTEST) come out as evdev events."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vmmcore.display import ABS_MAX, BTN_LEFT, EV_ABS, EV_KEY, EV_SYN, input_channel

XVFB = shutil.which("Xvfb")
pytestmark = [
    pytest.mark.skipif(XVFB is None, reason="Xvfb is not installed (Debian's xvfb; "
                       "scripts/setup installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("vmm_virtio_gpu") is None,
                       reason="a GPU draws into the window: vmm-virtio-gpu is not installed"),
]
W, H = 64, 48


def _no_namespaces() -> str | None:
    """Why a device process cannot be jailed here, or None (the jail's namespaces)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    probe = subprocess.run(["unshare", *user, "--mount", "--pid", "--net", "--ipc",
                            "--fork", "true"], capture_output=True)
    return None if probe.returncode == 0 else "cannot create the jail's namespaces here"


def _write_xauthority(path: Path) -> None:
    """An Xauthority file (libXau's format) with one MIT-MAGIC-COOKIE-1 for any display
    (FamilyWild, no address, no number): Xvfb's -auth and the clients' $XAUTHORITY."""
    def counted(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    path.write_bytes(struct.pack(">H", 0xFFFF) + counted(b"") + counted(b"")
                     + counted(b"MIT-MAGIC-COOKIE-1") + counted(os.urandom(16)))


@pytest.fixture(scope="module")
def x_server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A fresh Xvfb that wants a cookie: (its DISPLAY, the Xauthority file). The display
    number is the one Xvfb picked itself (-displayfd)."""
    reason = shutil.which("unshare") and _no_namespaces()
    if reason:
        pytest.skip(reason)
    auth = tmp_path_factory.mktemp("x11") / "Xauthority"
    _write_xauthority(auth)
    read, write = os.pipe()
    server = subprocess.Popen([XVFB, "-displayfd", str(write), "-auth", str(auth),
                               "-screen", "0", "320x240x24", "-nolisten", "tcp"],
                              pass_fds=[write], stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read) as f:
            number = f.readline().strip()
        assert number, "Xvfb did not start"
        yield f":{number}", str(auth)
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def x_display(x_server, monkeypatch) -> str:
    """DISPLAY and XAUTHORITY of x_server in the environment (the GPU's process inherits
    them; the plugin binds what they name); SDL's driver left to choose (x11)."""
    display, auth = x_server
    monkeypatch.setenv("DISPLAY", display)
    monkeypatch.setenv("XAUTHORITY", auth)
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)
    return display


def _jailed_gpu(**given: object):
    """A virtio_gpu rig as the VM builder jails it: (rig, the model's GpuClient)."""
    from vmm_virtio_gpu.testing import GpuClient

    from vmmcore.plugin_api import load_factory
    from vmmcore.registry import get_registry, track_plugin_use
    from vmmcore.sandbox.jail import JailConfig
    from vmmcore.sandbox.testing import PciVirtioRig
    from vmmcore.virtio.pci_transport import VirtioPciDevice
    from vmmcore.vm_builder import jail_binds_and_preload, jail_policies

    gpu = get_registry().get("device", "virtio_gpu")
    if gpu is None or gpu.broken:
        pytest.skip("the virtio_gpu plugin is not installed")
    options = {o.name: o.default_value() for o in gpu.spec.options}
    options.update(given)
    ctx = SimpleNamespace(name="virtio_gpu0", index=0, mem_size=16 << 20)
    with track_plugin_use() as used:
        model = load_factory(gpu.spec)(options, ctx)
    binds, preload = jail_binds_and_preload(gpu, used, options)
    rig = PciVirtioRig(lambda mem: VirtioPciDevice(model, mem, label=ctx.name),
                       sandboxed=True, jail=JailConfig(binds=binds, preload=preload),
                       policies=[str(p) for p in jail_policies(gpu, used, options)],
                       keep_fds=model.keep_fds(), label=ctx.name, mem_size=16 << 20,
                       timeout=30)
    model.shutdown()                    # the device process has its own copy
    return rig, GpuClient.over_rig(rig), binds


def _draw(client, rgb: np.ndarray) -> None:
    """Resource 1 (B8G8R8X8) holding rgb, on scanout 0, flushed: what a guest does."""
    from vmm_virtio_gpu import protocol as p

    h, w = rgb.shape[:2]
    bgrx = np.zeros((h, w, 4), np.uint8)
    bgrx[..., :3] = rgb[..., ::-1]
    backing = client.backing(w * h * 4, pieces=2)
    client.fill_backing(backing, bgrx.tobytes())
    for status in (client.create(1, p.FORMAT_B8G8R8X8_UNORM, w, h),
                   client.attach(1, backing), client.transfer(1, 0, 0, w, h, 0),
                   client.set_scanout(0, 1, 0, 0, w, h), client.flush(1, 0, 0, w, h)):
        assert status == p.RESP_OK_NODATA


def _find_on_screen(display: str, rgb: np.ndarray, timeout: float = 15.0
                    ) -> tuple[int, int] | None:
    """Where the X screen shows rgb exactly (its top-left corner), waiting for it."""
    from PIL import ImageGrab

    h, w = rgb.shape[:2]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = np.asarray(ImageGrab.grab(xdisplay=display).convert("RGB"))
        for y, x in zip(*np.nonzero((screen == rgb[0, 0]).all(-1)), strict=True):
            if np.array_equal(screen[y:y + h, x:x + w], rgb):
                return int(x), int(y)
        time.sleep(0.1)
    return None


def _events(channel, until: tuple[int, int, int], timeout: float = 10.0) -> list:
    """Events from an input channel until one equals `until` (or the time is up)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while until not in got and time.monotonic() < deadline:
        got += channel.receive()
        time.sleep(0.02)
    return got


def test_a_jailed_gpu_draws_into_an_x11_window_pixel_for_pixel(x_display):
    rig, client, binds = _jailed_gpu(width=W, height=H, display="window")
    socket, auth = f"/tmp/.X11-unix/X{x_display.lstrip(':')}", os.environ["XAUTHORITY"]
    assert binds == [(socket, socket, False), (auth, auth, False)]      # read-only
    with rig:
        picture = np.random.default_rng(7).integers(0, 256, (H, W, 3), dtype=np.uint8)
        _draw(client, picture)
        assert _find_on_screen(x_display, picture) is not None
        assert not rig.device.dead, rig.device.death_reason
        assert rig.device.ping()["pid"] == 1


def test_window_keyboard_and_mouse_reach_the_guest_from_the_jail(x_display):
    xdotool = shutil.which("xdotool")
    if xdotool is None:
        pytest.skip("xdotool is not installed")
    from vmmcore.display import close_input_channels

    rig, client, _ = _jailed_gpu(width=W, height=H, display="window",
                                 window_keyboard=True, window_mouse=True)
    try:
        with rig:
            picture = np.full((H, W, 3), (10, 200, 30), np.uint8)
            picture[0, 0] = (1, 2, 3)              # a corner to find the window by
            _draw(client, picture)
            corner = _find_on_screen(x_display, picture)
            assert corner is not None
            x, y = corner[0] + 40, corner[1] + 20
            subprocess.run([xdotool, "mousemove", str(x), str(y), "click", "1", "key", "a"],
                           check=True, timeout=10)
            tablet = _events(input_channel("virtio_gpu0/tablet"), (EV_KEY, BTN_LEFT, 0))
            keys = _events(input_channel("virtio_gpu0/keyboard"), (EV_KEY, 30, 0))
            assert not rig.device.dead, rig.device.death_reason
    finally:
        close_input_channels()
    press = tablet.index((EV_KEY, BTN_LEFT, 1))
    assert tablet[press - 2:press] == [(EV_ABS, 0, 40 * ABS_MAX // (W - 1)),
                                       (EV_ABS, 1, 20 * ABS_MAX // (H - 1))]
    assert keys == [(EV_KEY, 30, 1), (EV_SYN, 0, 0), (EV_KEY, 30, 0), (EV_SYN, 0, 0)]
