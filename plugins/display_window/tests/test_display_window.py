"""The window display under SDL's dummy video driver: frames reach the window, and SDL
keyboard and pointer events come out as evdev events on the attached input channels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from vmm_display_window.plugin import PLUGIN

from vmmcore.display import (
    ABS_MAX,
    BTN_LEFT,
    EV_ABS,
    EV_KEY,
    EV_SYN,
    DisplayOptions,
    InputChannel,
    open_display,
)
from vmmcore.registry import Registry

pygame = pytest.importorskip("pygame")


def test_registered():
    rec = Registry(fresh=True).get("display", "window")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.policy_path.name == "window.policy"


@pytest.fixture
def window(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    d = open_display("window", DisplayOptions(name="t", width=64, height=32))
    assert d.window_size is None            # opened when the guest first draws ...
    d.start()                               # ... or when asked
    yield d
    d.close()


def _until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def _receive(chan, n, timeout=5.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += chan.receive()
        time.sleep(0.01)
    return got


def test_a_flushed_frame_is_shown_and_the_window_follows_the_scanout_size(window):
    assert window.backend == "window" and window.window_size == (64, 32)
    window.set_scanout(0, 40, 20)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    window.update(0, 0, 0, rgb)
    window.flush(0)
    assert _until(lambda: window.shown is not None and window.shown.shape == (20, 40, 3))
    assert np.array_equal(window.shown, rgb) and window.window_size == (40, 20)
    surface = pygame.surfarray.array3d(pygame.display.get_surface()).swapaxes(0, 1)
    assert np.array_equal(surface, rgb)


def test_keyboard_and_pointer_become_evdev_events(window):
    kbd, tab = InputChannel("k"), InputChannel("t")
    window.attach_input("keyboard", kbd)
    window.attach_input("tablet", tab)
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, scancode=4, key=pygame.K_a,
                                         mod=0, unicode="a"))
    pygame.event.post(pygame.event.Event(pygame.KEYUP, scancode=4, key=pygame.K_a, mod=0))
    assert _receive(kbd, 4) == [(EV_KEY, 30, 1), (EV_SYN, 0, 0),
                                (EV_KEY, 30, 0), (EV_SYN, 0, 0)]
    pygame.event.post(pygame.event.Event(pygame.MOUSEBUTTONDOWN, pos=(63, 0), button=1))
    events = _receive(tab, 4)
    assert events == [(EV_ABS, 0, ABS_MAX), (EV_ABS, 1, 0), (EV_KEY, BTN_LEFT, 1),
                      (EV_SYN, 0, 0)]


def test_no_video_device_is_a_clear_start_up_error(monkeypatch):
    from vmmcore.display import DisplayError

    monkeypatch.setenv("SDL_VIDEODRIVER", "no-such-driver")
    d = open_display("window", DisplayOptions(width=8, height=8))
    with pytest.raises(DisplayError, match="cannot open an SDL window"):
        d.start()
    d.set_scanout(0, 8, 8)                  # the GPU's calls log, never raise
    d.close()
    for var in ("SDL_VIDEODRIVER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DisplayError, match="no display server"):
        open_display("window", DisplayOptions(width=8, height=8))


def test_the_window_opens_when_the_guest_first_draws(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    d = open_display("window", DisplayOptions(width=8, height=8))
    try:
        d.set_scanout(0, 8, 8)
        d.flush(0)
        assert _until(lambda: d.frames_shown > 0) and d.window_size == (8, 8)
    finally:
        d.close()
