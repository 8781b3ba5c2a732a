"""The display-backend plugin API: what virtio-gpu sees of a display, and input channels.

A display plugin (entry-point group ``vmm.displays``) has a PluginSpec whose ``factory``
names a :class:`Display` subclass (or a callable returning one); :func:`open_display`
finds it by name (``--gpu display=NAME``) and builds it with the GPU's
:class:`DisplayOptions`.

The GPU device owns the resources and does the pixel work; it hands a display finished
RGB pixels per scanout: :meth:`Display.set_scanout` when a scanout is enabled, resized
or disabled, :meth:`Display.update` with the changed rectangle, :meth:`Display.flush`
when the guest asked for the picture to be shown, and the cursor calls. The base class
keeps every scanout's framebuffer in memory (numpy, imported lazily: the core does not
depend on it; display plugins do), so every backend can take PNG screenshots (Pillow).
A backend that shows the picture (a window, a browser) overrides :meth:`present`.

Input: a display that has a keyboard or pointer (a window, a browser page, or a test)
turns it into Linux evdev events and sends them through an :class:`InputChannel` to a
virtio-input device. A channel is a SOCK_SEQPACKET socket pair created in the main
process before any device process is forked, so the GPU (sender) and the input device
(receiver) may live in different jailed processes. :func:`input_channel` hands both
sides the same channel by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmcore.errors import VmmError

log = logging.getLogger(__name__)

# Linux evdev constants the displays need (linux/input-event-codes.h).
EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_MSC, EV_LED, EV_REP = 0x00, 0x01, 0x02, 0x03, 0x04, 0x11, 0x14
SYN_REPORT = 0
REL_X, REL_Y, REL_HWHEEL, REL_WHEEL = 0x00, 0x01, 0x06, 0x08
ABS_X, ABS_Y = 0x00, 0x01
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
#: the absolute range a tablet reports (its config space says the same)
ABS_MAX = 32767

#: struct virtio_input_event (virtio 1.2, 5.8.6): le16 type, le16 code, le32 value
INPUT_EVENT = struct.Struct("<HHi")
#: one channel message carries at most this many events (one report, normally)
MAX_EVENTS_PER_MESSAGE = 128

InputEvent = tuple[int, int, int]


class DisplayError(VmmError):
    """A display backend cannot be opened or used."""


class InputChannel:
    """A one-way pipe of evdev event batches from a display to a virtio-input device.

    Each message is one batch (normally ending in SYN_REPORT) of packed
    virtio_input_event structures. The sender never blocks: when the receiver is not
    keeping up (its socket buffer is full), the batch is dropped and counted.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.rx, self.tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.rx.setblocking(False)
        self.tx.setblocking(False)
        self.dropped = 0

    def send(self, events: Sequence[InputEvent]) -> bool:
        """Send one batch; False when it was dropped (receiver full or gone)."""
        events = list(events)[:MAX_EVENTS_PER_MESSAGE]
        if not events:
            return True
        data = b"".join(INPUT_EVENT.pack(t & 0xFFFF, c & 0xFFFF, v) for t, c, v in events)
        try:
            self.tx.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionError, OSError):
            self.dropped += 1
            return False
        return True

    def fileno(self) -> int:
        """The receiving side's fd (poll it for POLLIN)."""
        return self.rx.fileno()

    def receive(self) -> list[InputEvent]:
        """All events waiting on the receiving side (nonblocking; [] when none)."""
        out: list[InputEvent] = []
        while True:
            try:
                data = self.rx.recv(INPUT_EVENT.size * MAX_EVENTS_PER_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return out
            if not data:
                return out
            usable = len(data) - len(data) % INPUT_EVENT.size
            out.extend(INPUT_EVENT.iter_unpack(data[:usable]))

    def keep_fds(self) -> list[int]:
        return [self.rx.fileno(), self.tx.fileno()]

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


_channels: dict[str, InputChannel] = {}
_channels_lock = threading.Lock()


def input_channel(name: str) -> InputChannel:
    """The channel called name, created on first use (both ends ask for it by name).

    Names are chosen by the plugins that meet here, e.g. "virtio_gpu0/keyboard" for the
    keyboard fed from the first GPU's display.
    """
    with _channels_lock:
        chan = _channels.get(name)
        if chan is None:
            chan = _channels[name] = InputChannel(name)
        return chan


def close_input_channels() -> None:
    """Close and forget every channel (the VM is gone; tests)."""
    with _channels_lock:
        for chan in _channels.values():
            chan.close()
        _channels.clear()


@dataclass
class DisplayOptions:
    """What a GPU tells the display it opens."""

    name: str = "display"                 # the GPU instance label, for logs and titles
    width: int = 1280                     # the preferred mode of every scanout
    height: int = 1024
    num_scanouts: int = 1
    refresh_rate: int = 60
    screenshot: Path | None = None        # write PNGs here (see Display.write_screenshots)
    screenshot_interval: float = 0.5     # at most this often after flushes; 0: only at close
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cursor:
    """A scanout's cursor: RGBA image (or None: hidden), hot spot, position."""

    image: Any = None
    hot_x: int = 0
    hot_y: int = 0
    x: int = 0
    y: int = 0


class Display:
    """Base class of display backends: per-scanout RGB framebuffers, cursor, screenshots.

    Thread safety: the GPU calls set_scanout/update/flush/cursor methods from its worker
    thread; screenshot() and the input methods may be called from any thread. Every
    framebuffer access holds self.lock.
    """

    #: the backend's name (= its plugin name)
    backend = "base"

    def __init__(self, options: DisplayOptions | None = None) -> None:
        self.options = options or DisplayOptions()
        self.lock = threading.RLock()
        n = self.options.num_scanouts
        self.framebuffers: list[Any] = [None] * n     # numpy (height, width, 3) uint8
        self.cursors = [Cursor() for _ in range(n)]
        self.flushes = [0] * n
        self._flushed = threading.Condition(self.lock)
        self._inputs: dict[str, InputChannel] = {}
        self._last_shot = 0.0
        self._screenshot_dir_fd: int | None = None
        # Import what screenshots need now: a jailed device process cannot import later.
        with contextlib.suppress(ImportError):
            import numpy  # noqa: F401
            import PIL.Image
            import PIL.PngImagePlugin  # noqa: F401
        if self.options.screenshot is not None:
            self._open_screenshot_dir(Path(self.options.screenshot))

    # -- what the GPU calls ------------------------------------------------------------

    def set_scanout(self, index: int, width: int, height: int) -> None:
        """Scanout index now shows a width x height picture (0 x 0: disabled)."""
        np = _numpy()
        with self.lock:
            fb = self.framebuffers[index]
            if width <= 0 or height <= 0:
                if fb is not None:      # keep the last picture (a driver disables
                    self.write_screenshots([index])    # its outputs at shutdown)
                self.framebuffers[index] = None
            elif fb is None or fb.shape[:2] != (height, width):
                self.framebuffers[index] = np.zeros((height, width, 3), np.uint8)
        self.scanout_changed(index, width, height)

    def update(self, index: int, x: int, y: int, rgb: Any) -> None:
        """Copy rgb (an (h, w, 3) uint8 array) into scanout index at (x, y), clipped."""
        with self.lock:
            fb = self.framebuffers[index]
            if fb is None:
                return
            h, w = rgb.shape[:2]
            fh, fw = fb.shape[:2]
            if x < 0 or y < 0 or x >= fw or y >= fh:
                return
            h, w = min(h, fh - y), min(w, fw - x)
            fb[y:y + h, x:x + w] = rgb[:h, :w]

    def flush(self, index: int) -> None:
        """The guest asked for scanout index to be shown."""
        with self.lock:
            self.flushes[index] += 1
            self._flushed.notify_all()
        self.present(index)
        if self.options.screenshot is not None and self.options.screenshot_interval > 0:
            now = time.monotonic()
            if now - self._last_shot >= self.options.screenshot_interval:
                self._last_shot = now
                self.write_screenshots()

    def set_cursor(self, index: int, rgba: Any, hot_x: int, hot_y: int) -> None:
        """A new cursor image (an (h, w, 4) RGBA array), or None to hide it."""
        with self.lock:
            c = self.cursors[index]
            c.image, c.hot_x, c.hot_y = rgba, hot_x, hot_y
        self.cursor_changed(index)

    def move_cursor(self, index: int, x: int, y: int) -> None:
        with self.lock:
            c = self.cursors[index]
            c.x, c.y = x, y
        self.cursor_changed(index)

    # -- what a showing backend overrides ---------------------------------------------

    def scanout_changed(self, index: int, width: int, height: int) -> None:
        """Hook: a scanout was enabled, resized or disabled."""

    def present(self, index: int) -> None:
        """Hook: show scanout index's framebuffer (headless: nothing to do)."""

    def cursor_changed(self, index: int) -> None:
        """Hook: the cursor of scanout index changed."""

    # -- input ------------------------------------------------------------------------------

    def attach_input(self, kind: str, channel: InputChannel) -> None:
        """Send this display's input of `kind` (keyboard, mouse, tablet) to channel."""
        self._inputs[kind] = channel

    def has_input(self, kind: str) -> bool:
        return kind in self._inputs

    def send_input(self, kind: str, events: Sequence[InputEvent]) -> bool:
        """Send raw events (a SYN_REPORT is appended); False when nothing takes them."""
        chan = self._inputs.get(kind)
        if chan is None:
            return False
        return chan.send([*events, (EV_SYN, SYN_REPORT, 0)])

    def key(self, code: int, down: bool) -> bool:
        """A Linux key code (KEY_A = 30, ...) pressed or released."""
        return self.send_input("keyboard", [(EV_KEY, code, 1 if down else 0)])

    def pointer_absolute(self, index: int, x: int, y: int, buttons: Mapping[int, bool]
                         | None = None) -> bool:
        """The pointer at pixel (x, y) of scanout index, with button changes."""
        fb = self.framebuffers[index] if 0 <= index < len(self.framebuffers) else None
        h, w = (fb.shape[:2] if fb is not None else (self.options.height,
                                                        self.options.width))
        ax = min(max(x, 0), max(w - 1, 1)) * ABS_MAX // max(w - 1, 1)
        ay = min(max(y, 0), max(h - 1, 1)) * ABS_MAX // max(h - 1, 1)
        events = [(EV_ABS, ABS_X, ax), (EV_ABS, ABS_Y, ay)]
        events += [(EV_KEY, b, int(v)) for b, v in (buttons or {}).items()]
        kind = "tablet" if "tablet" in self._inputs else "mouse"
        return self.send_input(kind, events)

    def pointer_relative(self, dx: int, dy: int, buttons: Mapping[int, bool] | None = None,
                         wheel: int = 0) -> bool:
        events = [(EV_REL, REL_X, dx), (EV_REL, REL_Y, dy)]
        if wheel:
            events.append((EV_REL, REL_WHEEL, wheel))
        events += [(EV_KEY, b, int(v)) for b, v in (buttons or {}).items()]
        return self.send_input("mouse", events)

    # -- screenshots ---------------------------------------------------------------------

    def snapshot(self, index: int = 0, cursor: bool = False) -> Any:
        """A copy of scanout index's framebuffer ((h, w, 3) uint8), or None if disabled."""
        with self.lock:
            fb = self.framebuffers[index]
            if fb is None:
                return None
            out = fb.copy()
            c = self.cursors[index]
            if cursor and c.image is not None:
                _blend_cursor(out, c)
        return out

    def wait_flush(self, index: int = 0, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until scanout index has had at least count flushes (tests)."""
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self.flushes[index] < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._flushed.wait(left)
        return True

    def screenshot(self, index: int = 0, cursor: bool = False) -> bytes:
        """Scanout index as PNG bytes (a disabled scanout: a 1x1 black picture)."""
        from io import BytesIO

        from PIL import Image

        np = _numpy()
        frame = self.snapshot(index, cursor)
        if frame is None:
            frame = np.zeros((1, 1, 3), np.uint8)
        buf = BytesIO()
        Image.fromarray(frame, "RGB").save(buf, "PNG", compress_level=1)
        return buf.getvalue()

    def screenshot_paths(self) -> list[Path]:
        """Where write_screenshots() puts each scanout: PATH, then PATH-1.png, ..."""
        base = self.options.screenshot
        if base is None:
            return []
        base = Path(base)
        return [base if i == 0 else base.with_name(f"{base.stem}-{i}{base.suffix or '.png'}")
                for i in range(self.options.num_scanouts)]

    def _open_screenshot_dir(self, path: Path) -> None:
        """Open the screenshot directory now, so a jailed process can still write there."""
        try:
            self._screenshot_dir_fd = os.open(path.parent if str(path.parent) else ".",
                                              os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DisplayError(f"screenshot={path}: cannot open its directory: "
                               f"{e.strerror}") from None

    def write_screenshots(self, indexes: Sequence[int] | None = None) -> None:
        """Write the scanouts' PNGs (atomically: a temporary file, then rename).

        A disabled scanout is skipped: its file keeps the last picture it showed.
        """
        if self._screenshot_dir_fd is None:
            return
        for index, path in enumerate(self.screenshot_paths()):
            if indexes is not None and index not in indexes:
                continue
            if self.framebuffers[index] is None:
                continue
            try:
                data = self.screenshot(index)
                tmp = f".{path.name}.{os.getpid()}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
                             dir_fd=self._screenshot_dir_fd)
                try:                    # plain write(2)s: open() would ioctl (isatty),
                    view = memoryview(data)     # which a device's seccomp policy refuses
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, path.name, src_dir_fd=self._screenshot_dir_fd,
                           dst_dir_fd=self._screenshot_dir_fd)
            except Exception as e:  # a screenshot must never break the display
                log.warning("display %s: screenshot %s failed: %s", self.options.name, path, e)

    # -- lifecycle -------------------------------------------------------------------------

    def keep_fds(self) -> list[int]:
        """Fds a sandboxed GPU process must keep open for this display."""
        fds = [fd for chan in self._inputs.values() for fd in chan.keep_fds()]
        if self._screenshot_dir_fd is not None:
            fds.append(self._screenshot_dir_fd)
        return fds

    def close(self) -> None:
        """The VM is going away: write the last screenshots, release resources."""
        if self._screenshot_dir_fd is not None:
            self.write_screenshots()
            with contextlib.suppress(OSError):
                os.close(self._screenshot_dir_fd)
            self._screenshot_dir_fd = None


def _blend_cursor(frame: Any, c: Cursor) -> None:
    """Alpha-blend cursor c onto frame (in place), clipped to the frame."""
    np = _numpy()
    img = c.image
    fh, fw = frame.shape[:2]
    x0, y0 = c.x - c.hot_x, c.y - c.hot_y
    ch, cw = img.shape[:2]
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    w = min(cw - sx0, fw - dx0)
    h = min(ch - sy0, fh - dy0)
    if w <= 0 or h <= 0:
        return
    src = img[sy0:sy0 + h, sx0:sx0 + w].astype(np.uint16)
    dst = frame[dy0:dy0 + h, dx0:dx0 + w].astype(np.uint16)
    a = src[..., 3:4]
    frame[dy0:dy0 + h, dx0:dx0 + w] = ((src[..., :3] * a + dst * (255 - a)) // 255
                                       ).astype(np.uint8)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - display plugins depend on numpy
        raise DisplayError("display backends need numpy (pip install numpy)") from None
    return numpy


def open_display(name: str, options: DisplayOptions | None = None) -> Display:
    """Build the display backend plugin called name (``vmm.displays``)."""
    from vmmcore.plugin_api import load_factory
    from vmmcore.registry import get_registry, note_plugin_use

    registry = get_registry()
    record = registry.get("display", name)
    if record is None:
        known = ", ".join(registry.names("display")) or "none"
        raise DisplayError(f"display {name!r} is not installed (installed: {known})")
    if record.broken or record.spec is None:
        raise DisplayError(f"display {name} is broken: {record.error}")
    if not record.spec.implemented:
        raise DisplayError(f"display {name} is not implemented yet")
    note_plugin_use("display", name)          # its policy joins the device's jail
    factory: Callable[..., Display] = load_factory(record.spec)
    display = factory(options or DisplayOptions())
    if not isinstance(display, Display):
        raise DisplayError(f"display {name}: the plugin's factory returned "
                           f"{type(display).__name__}, not a vmmcore.display.Display")
    return display


__all__ = [
    "ABS_MAX", "Cursor", "Display", "DisplayError", "DisplayOptions", "InputChannel",
    "close_input_channels", "input_channel", "open_display",
]
