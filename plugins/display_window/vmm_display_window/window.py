"""The window display: scanout 0 in an SDL2 window (pygame), input back to the guest.

SDL runs in a thread of its own (created by the display, started when the GPU builds
it), which owns every pygame call: it opens the window, redraws when the GPU flushed
(present() only sets a flag), resizes the window to the scanout, and turns keyboard and
pointer events into Linux evdev events sent to the virtio-input devices attached to
this display (vmmcore.display.Display.key / pointer_absolute / pointer_relative).

Keys go by SDL scancode (USB HID usage ids), so the guest sees the physical key and
applies its own keymap, as a real keyboard would.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from vmm_display_window.x11 import set_sdl_environment
from vmmcore.display import (
    BTN_LEFT,
    BTN_MIDDLE,
    BTN_RIGHT,
    EV_REL,
    REL_WHEEL,
    Display,
    DisplayError,
    DisplayOptions,
)

log = logging.getLogger(__name__)

FPS = 60

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_LINUX_LETTERS = [30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19,
                  31, 20, 22, 47, 17, 45, 21, 44]
#: USB HID usage id (SDL scancode) -> Linux key code (input-event-codes.h)
HID_TO_LINUX: dict[int, int] = {
    **{4 + i: code for i, code in enumerate(_LINUX_LETTERS)},
    **{30 + i: 2 + i for i in range(10)},                          # 1..9, 0
    40: 28, 41: 1, 42: 14, 43: 15, 44: 57, 45: 12, 46: 13, 47: 26, 48: 27, 49: 43,
    50: 43, 51: 39, 52: 40, 53: 41, 54: 51, 55: 52, 56: 53, 57: 58,
    **{58 + i: 59 + i for i in range(10)}, 68: 87, 69: 88,          # F1..F12
    70: 99, 71: 70, 72: 119, 73: 110, 74: 102, 75: 104, 76: 111, 77: 107, 78: 109,
    79: 106, 80: 105, 81: 108, 82: 103,                            # arrows
    83: 69, 84: 98, 85: 55, 86: 74, 87: 78, 88: 96,
    89: 79, 90: 80, 91: 81, 92: 75, 93: 76, 94: 77, 95: 71, 96: 72, 97: 73, 98: 82, 99: 83,
    100: 86, 101: 127,
    224: 29, 225: 42, 226: 56, 227: 125, 228: 97, 229: 54, 230: 100, 231: 126,
}
assert len(_LETTERS) == len(_LINUX_LETTERS)
#: SDL mouse button -> Linux button code
BUTTONS = {1: BTN_LEFT, 2: BTN_MIDDLE, 3: BTN_RIGHT}


class WindowDisplay(Display):
    """Scanout 0 in an SDL2 window; keyboard and pointer to the attached inputs."""

    backend = "window"

    def __init__(self, options: DisplayOptions | None = None, start: bool = False) -> None:
        super().__init__(options)
        if not any(os.environ.get(v) for v in ("SDL_VIDEODRIVER", "DISPLAY",
                                                 "WAYLAND_DISPLAY")):
            raise DisplayError("display window: no display server (DISPLAY and "
                               "WAYLAND_DISPLAY are unset); use display=headless or web")
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: str | None = None
        self.shown: Any = None          # the last frame put on the window (tests)
        self.frames_shown = 0
        self.window_size: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()
        if start:
            self.start()

    def start(self, timeout: float = 10.0) -> None:
        """Open the window (SDL thread) in this process; DisplayError if SDL cannot.

        The GPU starts it when the guest first draws, so a sandboxed GPU opens it in its
        own device process (threads do not survive the fork that creates it).
        """
        with self._start_lock:
            if self._pid == os.getpid():
                if self._error is not None:
                    raise DisplayError(f"display window: {self._error}")
                return
            self._pid = os.getpid()
            self._ready.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"window-{self.options.name}")
            self._thread.start()
        if not self._ready.wait(timeout):
            raise DisplayError("display window: SDL did not start within "
                               f"{timeout:.0f} s")
        if self._error is not None:
            raise DisplayError(f"display window: {self._error}")

    def _ensure_started(self) -> None:
        if self._pid != os.getpid():
            try:
                self.start()
            except DisplayError as e:
                log.error("%s", e)

    # -- hooks called by the GPU's worker -------------------------------------------------

    def scanout_changed(self, index: int, width: int, height: int) -> None:
        if index == 0:
            self._ensure_started()
            self._dirty.set()

    def present(self, index: int) -> None:
        if index == 0:
            self._ensure_started()
            self._dirty.set()

    # -- the SDL thread --------------------------------------------------------------------

    def _run(self) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        set_sdl_environment()
        try:
            import pygame

            pygame.display.init()
            self._pygame = pygame
            self._screen = pygame.display.set_mode((self.options.width, self.options.height))
            self.window_size = (self.options.width, self.options.height)
            pygame.display.set_caption(f"vmm {self.options.name}")
        except Exception as e:  # no display server, no SDL: say why, at start-up
            self._error = (f"cannot open an SDL window ({type(e).__name__}: {e}); "
                           "is DISPLAY or WAYLAND_DISPLAY set? (display=headless needs none)")
            self._ready.set()
            return
        self._ready.set()
        clock = pygame.time.Clock()
        try:
            while not self._stop.is_set():
                for event in pygame.event.get():
                    try:
                        self.handle_event(event)
                    except Exception:
                        log.exception("display window: event %r", event)
                if self._dirty.is_set():
                    self._dirty.clear()
                    self._redraw()
                clock.tick(FPS)
        finally:
            pygame.display.quit()

    def _redraw(self) -> None:
        pygame = self._pygame
        frame = self.snapshot(0)
        if frame is None:
            self._screen.fill((0, 0, 0))
        else:
            h, w = frame.shape[:2]
            if self.window_size != (w, h):
                self._screen = pygame.display.set_mode((w, h))
                self.window_size = (w, h)
            surface = pygame.image.frombuffer(frame.tobytes(), (w, h), "RGB")
            self._screen.blit(surface, (0, 0))
        pygame.display.flip()
        self.shown = frame
        self.frames_shown += 1

    def handle_event(self, event: Any) -> None:
        """One SDL event -> evdev events for the guest (runs in the SDL thread)."""
        pygame = self._pygame
        if event.type in (pygame.KEYDOWN, pygame.KEYUP):
            code = HID_TO_LINUX.get(getattr(event, "scancode", -1))
            if code is not None:
                self.key(code, event.type == pygame.KEYDOWN)
        elif event.type == pygame.MOUSEMOTION:
            if self.has_input("tablet"):
                self.pointer_absolute(0, *event.pos)
            else:
                self.pointer_relative(*event.rel)
        elif event.type in (pygame.MOUSEBUTTONDOWN, pygame.MOUSEBUTTONUP):
            button = BUTTONS.get(event.button)
            if button is not None:
                down = {button: event.type == pygame.MOUSEBUTTONDOWN}
                if self.has_input("tablet"):
                    self.pointer_absolute(0, *event.pos, down)
                else:
                    self.pointer_relative(0, 0, down)
        elif event.type == pygame.MOUSEWHEEL and event.y:
            kind = "tablet" if self.has_input("tablet") else "mouse"
            self.send_input(kind, [(EV_REL, REL_WHEEL, int(event.y))])
        elif event.type == pygame.QUIT:
            log.info("display window: the window was closed (the VM keeps running)")

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(5.0)
        super().close()
