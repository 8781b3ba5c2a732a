"""The browser display: an HTTP server on localhost with a canvas page and a WebSocket.

GET /    the viewer page (page.html): a canvas, the WebSocket, key and pointer handlers
GET /ws  the WebSocket: the server sends each new picture of scanout 0 as a binary
         message [u8 1, u16 scanout, u16 width, u16 height, PNG bytes] (at most
         MAX_FPS a second, only when it changed); the page sends JSON text messages:
           {"type": "key", "code": "KeyA", "down": true}          (KeyboardEvent.code)
           {"type": "pointer", "x": 10, "y": 20, "buttons": {"0": true}}
           {"type": "wheel", "dy": -1}
         which become evdev events on the virtio-input devices attached to the display.

The listening socket is bound when the display is built (``listen=HOST:PORT`` on the
GPU; default 127.0.0.1:6080, port 0 picks a free one: see .url). Only localhost is
meant: nothing is authenticated.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from vmm_display_web import ws
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

DEFAULT_LISTEN = "127.0.0.1:6080"
MAX_FPS = 30
FRAME = struct.Struct("!BHHH")
MSG_FRAME = 1

_DOM_BUTTONS = {"0": BTN_LEFT, "1": BTN_MIDDLE, "2": BTN_RIGHT}
_LETTERS = dict(zip("QWERTYUIOP", range(16, 26), strict=True)) | dict(
    zip("ASDFGHJKL", range(30, 39), strict=True)) | dict(zip("ZXCVBNM", range(44, 51),
                                                             strict=True))
#: KeyboardEvent.code -> Linux key code
DOM_TO_LINUX: dict[str, int] = {
    **{f"Key{c}": k for c, k in _LETTERS.items()},
    **{f"Digit{d}": 2 + (d - 1) % 10 for d in range(10)},
    "Escape": 1, "Minus": 12, "Equal": 13, "Backspace": 14, "Tab": 15,
    "BracketLeft": 26, "BracketRight": 27, "Enter": 28, "ControlLeft": 29,
    "Semicolon": 39, "Quote": 40, "Backquote": 41, "ShiftLeft": 42, "Backslash": 43,
    "Comma": 51, "Period": 52, "Slash": 53, "ShiftRight": 54, "NumpadMultiply": 55,
    "AltLeft": 56, "Space": 57, "CapsLock": 58,
    **{f"F{i}": 58 + i for i in range(1, 11)}, "F11": 87, "F12": 88,
    "NumLock": 69, "ScrollLock": 70, "Numpad7": 71, "Numpad8": 72, "Numpad9": 73,
    "NumpadSubtract": 74, "Numpad4": 75, "Numpad5": 76, "Numpad6": 77, "NumpadAdd": 78,
    "Numpad1": 79, "Numpad2": 80, "Numpad3": 81, "Numpad0": 82, "NumpadDecimal": 83,
    "IntlBackslash": 86, "NumpadEnter": 96, "ControlRight": 97, "NumpadDivide": 98,
    "PrintScreen": 99, "AltRight": 100, "Home": 102, "ArrowUp": 103, "PageUp": 104,
    "ArrowLeft": 105, "ArrowRight": 106, "End": 107, "ArrowDown": 108, "PageDown": 109,
    "Insert": 110, "Delete": 111, "Pause": 119, "MetaLeft": 125, "MetaRight": 126,
    "ContextMenu": 127,
}


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise DisplayError(f"listen={text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


class WebDisplay(Display):
    """Scanout 0 served to browsers; their keyboard and pointer go to the guest."""

    backend = "web"

    def __init__(self, options: DisplayOptions | None = None) -> None:
        super().__init__(options)
        host, port = parse_listen(self.options.extra.get("listen") or DEFAULT_LISTEN)
        self.version = 0
        self._changed = threading.Condition()
        self._clients: set[ws.WebSocket] = set()
        self.events_received = 0
        self._page = resources.files("vmm_display_web").joinpath("page.html").read_bytes()
        display = self

        class Handler(_Handler):
            owner = display

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise DisplayError(f"display web: cannot listen on {host}:{port}: "
                               f"{e.strerror}") from None
        self.server.daemon_threads = True
        self.address = self.server.server_address[:2]
        self.url = f"http://{self.address[0]}:{self.address[1]}/"
        self._serving_pid = 0
        self._thread: threading.Thread | None = None
        self._serve_lock = threading.Lock()
        # Serve from the process that draws: a sandboxed GPU runs in a forked device
        # process (threads do not survive fork), so the parent stops serving at fork and
        # the device process starts when the guest first draws (ensure_serving).
        os.register_at_fork(after_in_parent=self._stop_serving_here)
        self.ensure_serving()
        log.warning("display %s: browser viewer at %s", self.options.name, self.url)

    def ensure_serving(self) -> None:
        """Serve the viewer from this process (idempotent)."""
        with self._serve_lock:
            if self._serving_pid == os.getpid() and self._thread is not None \
                    and self._thread.is_alive():
                return
            self._serving_pid = os.getpid()
            self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                            name=f"web-{self.options.name}")
            self._thread.start()

    def _stop_serving_here(self) -> None:
        if self._serving_pid == os.getpid() and self._thread is not None:
            self.server.shutdown()
            self._thread = None
            self._serving_pid = 0

    # -- hooks called by the GPU --------------------------------------------------------

    def _bump(self) -> None:
        self.ensure_serving()
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def scanout_changed(self, index: int, width: int, height: int) -> None:
        if index == 0:
            self._bump()

    def present(self, index: int) -> None:
        if index == 0:
            self._bump()

    def cursor_changed(self, index: int) -> None:
        if index == 0:
            self._bump()

    # -- frames -----------------------------------------------------------------------------

    def frame_message(self) -> bytes | None:
        """The current picture as a viewer message, or None while scanout 0 is off."""
        from PIL import Image

        frame = self.snapshot(0, cursor=True)
        if frame is None:
            return None
        h, w = frame.shape[:2]
        buf = io.BytesIO()
        Image.fromarray(frame, "RGB").save(buf, "PNG", compress_level=1)
        return FRAME.pack(MSG_FRAME, 0, w, h) + buf.getvalue()

    def serve_frames(self, conn: ws.WebSocket) -> None:
        """Send each new picture to conn until it closes (its own thread)."""
        sent = -1
        while not conn.closed:
            with self._changed:
                if self.version == sent:
                    self._changed.wait(1.0)
                version = self.version
            if version == sent:
                continue
            msg = self.frame_message()
            sent = version
            if msg is not None:
                try:
                    conn.send(msg)
                except ws.WebSocketError:
                    return
            time.sleep(1.0 / MAX_FPS)

    # -- input ------------------------------------------------------------------------------

    def handle_message(self, text: str) -> None:
        """One JSON input message from a page (malformed ones are ignored)."""
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        self.events_received += 1
        kind = msg.get("type")
        if kind == "key":
            code = DOM_TO_LINUX.get(str(msg.get("code")))
            if code is not None:
                self.key(code, bool(msg.get("down")))
        elif kind == "pointer":
            x, y = _int(msg.get("x")), _int(msg.get("y"))
            buttons = msg.get("buttons") if isinstance(msg.get("buttons"), dict) else {}
            changes = {_DOM_BUTTONS[k]: bool(v) for k, v in buttons.items()
                       if k in _DOM_BUTTONS}
            if self.has_input("tablet"):
                self.pointer_absolute(0, x, y, changes)
            else:
                self.pointer_relative(_int(msg.get("dx")), _int(msg.get("dy")), changes)
        elif kind == "wheel":
            dy = max(-10, min(10, _int(msg.get("dy"))))
            if dy:
                kind = "tablet" if self.has_input("tablet") else "mouse"
                self.send_input(kind, [(EV_REL, REL_WHEEL, -dy)])

    # -- lifecycle ----------------------------------------------------------------------------

    def keep_fds(self) -> list[int]:
        return [*super().keep_fds(), self.server.fileno()]

    def close(self) -> None:
        if self._serving_pid == os.getpid() and self._thread is not None:
            self.server.shutdown()
        self._thread, self._serving_pid = None, 0
        self.server.server_close()
        for conn in list(self._clients):
            conn.close()
        with self._changed:
            self._changed.notify_all()
        super().close()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class _Handler(BaseHTTPRequestHandler):
    owner: WebDisplay
    server_version = "vmm-web"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("display web: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path in ("/", "/index.html"):
            body = self.owner._page
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/ws":
            self._websocket()
        else:
            self.send_error(404)

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self.send_error(400, "expected a WebSocket upgrade")
            return
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws.accept_key(key))
        self.end_headers()
        self.wfile.flush()
        sock: socket.socket = self.connection
        sock.settimeout(None)
        conn = ws.WebSocket(sock, max_message=64 * 1024)
        owner = self.owner
        owner._clients.add(conn)
        sender = threading.Thread(target=owner.serve_frames, args=(conn,), daemon=True,
                                  name="web-frames")
        sender.start()
        try:
            while True:
                msg = conn.receive()
                if msg is None:
                    break
                if isinstance(msg, str):
                    owner.handle_message(msg)
        except (ws.WebSocketError, OSError):
            pass
        finally:
            conn.closed = True
            owner._clients.discard(conn)
            self.close_connection = True
