"""The wire format between a ProxyDevice (main process) and its child_proc (device process).

One SOCK_SEQPACKET socket pair per device; every message is one packet: a type byte and a
payload. Hot paths use struct-packed payloads; set-up and rare operations use JSON. The
main process never unpickles anything from a child (a compromised device must not be able
to run code in the main process): what it parses is either a fixed struct or JSON whose
fields it checks.

main -> child                               child -> main
  INIT      json + [memfd]                    HELLO   json {pid}     (once, first)
  READ_BAR  <BQI bar, offset, size            REPLY   payload (per request)
  WRITE_BAR <BQ bar, offset + data (one-way)  ERROR   json {error}
  WRITE_SYNC  same, answered (MSI-X table)    CALL    json {op,...}  (child asks the main
  CFG_READ  <H reg                                    process during a request, e.g. an
  CFG_WRITE <HB reg, offset + data                    MSI route; answered with RESULT)
  OP        json {op, ...} [+ fds]            EVENT   json {op,...}  (one-way, e.g. a
  RESULT    json (answer to CALL)                     route change from a worker thread)
  SHUTDOWN  (one-way)
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct

INIT = b"I"
READ_BAR = b"r"
WRITE_BAR = b"w"
WRITE_SYNC = b"W"
CFG_READ = b"c"
CFG_WRITE = b"C"
OP = b"O"
RESULT = b"R"
SHUTDOWN = b"X"

HELLO = b"H"
REPLY = b"A"
ERROR = b"E"
CALL = b"K"
EVENT = b"V"

BAR_ACCESS = struct.Struct("<BQI")
BAR_WRITE = struct.Struct("<BQ")
CFG_REG = struct.Struct("<H")
CFG_WRITE_HDR = struct.Struct("<HB")
U32 = struct.Struct("<I")

#: Largest packet either side accepts (bus accesses are <= 8 bytes; JSON set-up is small).
MAX_MESSAGE = 64 * 1024
#: Most fds one message may carry (MSI-X vectors, queue eventfds...).
MAX_FDS = 64


def pack_json(kind: bytes, obj: object) -> bytes:
    return kind + json.dumps(obj, separators=(",", ":")).encode()


def unpack_json(payload: bytes) -> object:
    return json.loads(payload.decode())


def send(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = (),
         flags: int = 0) -> None:
    if fds:
        socket.send_fds(sock, [data], list(fds), flags)
    else:
        sock.send(data, flags)


def recv(sock: socket.socket, max_size: int = MAX_MESSAGE,
         max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """One packet and the fds it carried (closed-on-exec). b'' at EOF. A packet or fd
    list larger than the limits is refused whole (ProtocolError), its fds closed."""
    data, fds, flags, _ = socket.recv_fds(sock, max_size, max_fds, socket.MSG_CMSG_CLOEXEC)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            _close(fd)
        raise ProtocolError("truncated message")
    return data, fds


def _close(fd: int) -> None:
    import os

    with contextlib.suppress(OSError):
        os.close(fd)


def encode_value(value: object) -> object:
    """JSON-ready: bytes become {"__bytes__": hex} (see decode_value)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    return value


def decode_value(value: object, depth: int = 0) -> object:
    """Undo encode_value; nesting is bounded (the other side may be hostile)."""
    if depth > 32:
        raise ProtocolError("value nested too deeply")
    if isinstance(value, dict):
        if set(value) == {"__bytes__"} and isinstance(value["__bytes__"], str):
            return bytes.fromhex(value["__bytes__"])
        return {str(k): decode_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v, depth + 1) for v in value]
    return value


class ProtocolError(Exception):
    """The other side sent something that does not follow the protocol."""
