"""A small RFC 6455 WebSocket implementation over a plain socket (server and client side).

Enough for the viewer: the opening handshake, text and binary messages (unfragmented
from us; fragmented ones from the peer are reassembled), ping/pong and close. Frames
from a peer are bounded (MAX_MESSAGE) so a hostile page cannot make us allocate much.
The client side exists for tests and tools (and speaks Chromium's DevTools protocol in
the browser test).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 1 << 20


class WebSocketError(Exception):
    """The peer broke the protocol or went away."""


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WebSocketError("connection closed")
        buf += chunk
    return bytes(buf)


class WebSocket:
    """One WebSocket connection on a connected socket (after the handshake)."""

    def __init__(self, sock: socket.socket, client: bool = False,
                 max_message: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self.client = client            # a client masks what it sends
        self.max_message = max_message
        self.closed = False
        self._send_lock = threading.Lock()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            self._send_frame(OP_TEXT, data.encode())
        else:
            self._send_frame(OP_BINARY, bytes(data))

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        mask_bit = 0x80 if self.client else 0
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, mask_bit | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, n)
        if self.client:
            mask = os.urandom(4)
            payload = _mask(payload, mask)
            head += mask
        with self._send_lock:
            try:
                self.sock.sendall(head + payload)
            except OSError as e:
                self.closed = True
                raise WebSocketError(f"send failed: {e}") from None

    def receive(self) -> bytes | str | None:
        """The next message (str for text, bytes for binary); None when closed."""
        message = bytearray()
        first_op = None
        while True:
            b0, b1 = _recv_exact(self.sock, 2)
            fin, opcode = b0 & 0x80, b0 & 0x0F
            masked, n = b1 & 0x80, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", _recv_exact(self.sock, 2))
            elif n == 127:
                (n,) = struct.unpack("!Q", _recv_exact(self.sock, 8))
            if not self.client and not masked:
                raise WebSocketError("a client frame is not masked")
            if n > self.max_message or len(message) + n > self.max_message:
                raise WebSocketError(f"message of more than {self.max_message} bytes")
            mask = _recv_exact(self.sock, 4) if masked else b""
            payload = _recv_exact(self.sock, n)
            if masked:
                payload = _mask(payload, mask)
            if opcode == OP_CLOSE:
                self.closed = True
                with contextlib.suppress(WebSocketError):
                    self._send_frame(OP_CLOSE, payload[:2])
                return None
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload[:125])
                continue
            if opcode == OP_PONG:
                continue
            if opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
                raise WebSocketError(f"unknown opcode {opcode}")
            if first_op is None:
                if opcode == OP_CONT:
                    raise WebSocketError("continuation frame without a message")
                first_op = opcode
            message += payload
            if fin:
                break
        if first_op == OP_TEXT:
            return message.decode("utf-8", "replace")
        return bytes(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(WebSocketError):
                self._send_frame(OP_CLOSE, struct.pack("!H", 1000))
        with contextlib.suppress(OSError):
            self.sock.close()


def _mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    reps = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(reps, "little")).to_bytes(
        n, "little")


def connect(url: str, timeout: float = 10.0) -> WebSocket:
    """A client connection to ws://host:port/path (tests and tools)."""
    if not url.startswith("ws://"):
        raise ValueError(f"{url}: only ws:// URLs")
    hostport, _, path = url[5:].partition("/")
    host, _, port = hostport.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise WebSocketError("closed during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status or accept_key(key).encode() not in head:
        raise WebSocketError(f"handshake refused: {status!r}")
    return WebSocket(sock, client=True)
