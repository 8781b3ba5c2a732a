"""Test rig for virtio-wl: a headless weston, the Wayland wire format, and a test driver
that plays the guest's virtio_wl kernel driver over a DeviceHarness."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmm_virtio_wl import protocol as P
from vmm_virtio_wl.device import VirtioWl

from vmmcore.arch.x86_64 import layout
from vmmcore.virtio.testing import DeviceHarness
from vmmcore.vm_control import VmMemoryController

WESTON = shutil.which("weston")


# -- weston ----------------------------------------------------------------------------------

class Weston:
    """A headless weston on its own XDG_RUNTIME_DIR; stop() ends it (and only it)."""

    def __init__(self, name: str = "wl-vmm-test", base_dir: str | None = None) -> None:
        if WESTON is None:
            raise RuntimeError("weston is not installed (apt-get install -y weston)")
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="vmm-weston-", dir=base_dir))
        os.chmod(self.runtime_dir, 0o700)
        self.socket = self.runtime_dir / name
        self.log = self.runtime_dir / "weston.log"
        env = {**os.environ, "XDG_RUNTIME_DIR": str(self.runtime_dir)}
        env.pop("WAYLAND_DISPLAY", None)
        env.pop("DISPLAY", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [WESTON, "--backend=headless-backend.so", f"--socket={name}",
                 "--idle-time=0", "--no-config", "--shell=fullscreen-shell.so"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"weston did not start:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


# -- the Wayland wire format -----------------------------------------------------------------------

def wl_string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<I", len(b)) + b + bytes(-len(b) % 4)


def wl_msg(obj: int, opcode: int, *args: int | str) -> bytes:
    """A request: header (object, size << 16 | opcode) then uint/int/string arguments."""
    body = b""
    for a in args:
        body += wl_string(a) if isinstance(a, str) else struct.pack("<i" if a < 0 else "<I", a)
    return struct.pack("<II", obj, ((8 + len(body)) << 16) | opcode) + body


@dataclass
class WlEvent:
    obj: int
    opcode: int
    payload: bytes

    def string_at(self, offset: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<I", self.payload, offset)
        s = self.payload[offset + 4:offset + 4 + n - 1].decode()
        return s, offset + 4 + n + (-n % 4)


def wl_parse(stream: bytearray) -> list[WlEvent]:
    """Cut complete events off the front of stream."""
    events = []
    while len(stream) >= 8:
        obj, word = struct.unpack_from("<II", stream)
        size = word >> 16
        if size < 8 or len(stream) < size:
            break
        events.append(WlEvent(obj, word & 0xFFFF, bytes(stream[8:size])))
        del stream[:size]
    return events


# -- the fake VM behind VmMemoryRequests -------------------------------------------------------------

class RecordingVm:
    """Stands in for vmmcore.kvm.Vm: records KVM_SET_USER_MEMORY_REGION calls."""

    def __init__(self) -> None:
        self.next_slot = 4
        self.regions: dict[int, tuple[int, int, int]] = {}

    def add_memory_region(self, guest_addr, size, host_addr, readonly=False):
        slot = self.next_slot
        self.next_slot += 1
        self.set_user_memory_region(slot, guest_addr, size, host_addr, readonly)
        return slot

    def set_user_memory_region(self, slot, guest_addr, size, host_addr, readonly=False):
        if size:
            self.regions[slot] = (guest_addr, size, host_addr)
        else:
            self.regions.pop(slot, None)


def vm_memory(mem_size: int = 256 << 20) -> VmMemoryController:
    return VmMemoryController(RecordingVm(), layout.system_allocator(mem_size))


# -- the guest driver ----------------------------------------------------------------------------

@dataclass
class InMsg:
    """One message the device put on the in queue."""

    type: int
    vfd_id: int
    raw: bytes
    ids: list[int]
    data: bytes
    flags: int = 0
    pfn: int = 0
    size: int = 0


def parse_in(raw: bytes) -> InMsg:
    typ = struct.unpack_from("<I", raw)[0]
    if typ == P.CMD_VFD_RECV:
        _, _, vfd_id, n = P.CTRL_VFD_RECV.unpack_from(raw)
        ids = list(struct.unpack_from(f"<{n}I", raw, 16))
        return InMsg(typ, vfd_id, raw, ids, raw[16 + 4 * n:])
    if typ == P.CMD_VFD_NEW:
        _, _, vfd_id, flags, pfn, size, _ = P.CTRL_VFD_NEW_RESP.unpack_from(raw)
        return InMsg(typ, vfd_id, raw, [], b"", flags, pfn, size)
    _, _, vfd_id = P.CTRL_VFD.unpack_from(raw)
    return InMsg(typ, vfd_id, raw, [], b"")


class WlGuest:
    """The guest's virtio_wl driver, over a DeviceHarness (queue 0 in, queue 1 out)."""

    IN_BUFFERS = 32

    def __init__(self, device: VirtioWl, features: int | None = None) -> None:
        self.device = device
        self.h = DeviceHarness(device, mem_size=8 << 20, queue_size=64)
        if features is None:
            features = (1 << P.VIRTIO_WL_F_TRANS_FLAGS) | (1 << P.VIRTIO_WL_F_SEND_FENCES)
        self.h.activate(features)
        self.inbox: list[InMsg] = []
        for _ in range(self.IN_BUFFERS):
            self.h.drivers[P.IN_QUEUE].add(in_sizes=[P.IN_BUFFER_SIZE])
        self.h.drivers[P.IN_QUEUE].kick()

    def close(self) -> None:
        self.h.close()

    def command(self, data: bytes, reply: int = 64) -> bytes:
        """Send one command on the out queue; its response bytes."""
        self.h.drivers[P.OUT_QUEUE].add(out=[data], in_sizes=[reply] if reply else [])
        [used] = self.h.wait_used(P.OUT_QUEUE, 1)
        return used.data[:used.length]

    def code(self, data: bytes) -> int:
        return struct.unpack_from("<I", self.command(data))[0]

    # commands
    def new_ctx(self, vfd_id: int) -> bytes:
        return self.command(P.CTRL_VFD.pack(P.CMD_VFD_NEW_CTX, 0, vfd_id))

    def new_ctx_named(self, vfd_id: int, name: bytes) -> bytes:
        return self.command(P.CTRL_VFD_NEW_CTX_NAMED.pack(P.CMD_VFD_NEW_CTX_NAMED, 0, vfd_id,
                                                          0, 0, 0, name))

    def new_alloc(self, vfd_id: int, size: int, flags: int = 0) -> bytes:
        return self.command(P.CTRL_VFD_NEW.pack(P.CMD_VFD_NEW, 0, vfd_id, flags, 0, size))

    def new_pipe(self, vfd_id: int, flags: int) -> bytes:
        return self.command(P.CTRL_VFD_NEW.pack(P.CMD_VFD_NEW_PIPE, 0, vfd_id, flags, 0, 0))

    def close_vfd(self, vfd_id: int) -> int:
        return self.code(P.CTRL_VFD.pack(P.CMD_VFD_CLOSE, 0, vfd_id))

    def send(self, vfd_id: int, data: bytes, ids: list[int] = (), count: int | None = None) -> int:
        n = len(ids) if count is None else count
        msg = P.CTRL_VFD_SEND.pack(P.CMD_VFD_SEND, 0, vfd_id, n)
        msg += b"".join(struct.pack("<I", i) for i in ids) + data
        return self.code(msg)

    # the in queue
    def recv(self, timeout: float = 5.0) -> list[InMsg]:
        """Reap in-queue messages (waiting up to timeout for at least one); re-post buffers."""
        d = self.h.drivers[P.IN_QUEUE]
        deadline = time.monotonic() + timeout
        got = []
        while not got and time.monotonic() < deadline:
            got = self.h.wait_used(P.IN_QUEUE, 1, timeout=max(0.01, deadline - time.monotonic()))
        msgs = [parse_in(u.data[:u.length]) for u in got]
        for _ in got:
            d.add(in_sizes=[P.IN_BUFFER_SIZE])
        if got:
            d.kick()
        self.inbox.extend(msgs)
        return msgs


class WaylandClient:
    """A Wayland client whose connection is a virtio-wl context VFD."""

    def __init__(self, guest: WlGuest, ctx_id: int = 1) -> None:
        self.g = guest
        self.ctx = ctx_id
        self.stream = bytearray()
        self.events: list[WlEvent] = []
        self.received_vfds: list[InMsg] = []
        self.next_id = 2
        resp = guest.new_ctx(ctx_id)
        typ, _, vfd_id, flags, _pfn, _size, _ = P.CTRL_VFD_NEW_RESP.unpack(resp)
        assert typ == P.RESP_VFD_NEW and vfd_id == ctx_id, resp
        self.flags = flags

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def request(self, data: bytes, vfds: list[int] = ()) -> None:
        code = self.g.send(self.ctx, data, list(vfds))
        assert code == P.RESP_OK, P.RESP_NAMES.get(code, hex(code))

    def pump(self, timeout: float = 5.0) -> None:
        for m in self.g.recv(timeout):
            if m.type == P.CMD_VFD_NEW:
                self.received_vfds.append(m)
            elif m.type == P.CMD_VFD_RECV and m.vfd_id == self.ctx:
                self.stream += m.data
                self.events.extend(wl_parse(self.stream))
            elif m.type == P.CMD_VFD_HUP and m.vfd_id == self.ctx:
                raise AssertionError("the compositor hung up: " + repr(self.errors()))

    def roundtrip(self, timeout: float = 10.0) -> None:
        """wl_display.sync and wait for its done event."""
        cb = self.new_id()
        self.request(wl_msg(1, 0, cb))
        deadline = time.monotonic() + timeout
        while not any(e.obj == cb and e.opcode == 0 for e in self.events):
            if time.monotonic() > deadline:
                raise AssertionError(f"no wl_callback.done within {timeout}s: {self.events}")
            self.pump(max(0.05, deadline - time.monotonic()))

    def errors(self) -> list[tuple[int, int, str]]:
        """wl_display.error events: (object, code, message)."""
        out = []
        for e in self.events:
            if e.obj == 1 and e.opcode == 0:
                obj, code = struct.unpack_from("<II", e.payload)
                msg, _ = e.string_at(8)
                out.append((obj, code, msg))
        return out

    def globals(self, registry: int) -> dict[str, tuple[int, int]]:
        """interface -> (name, version) from wl_registry.global events."""
        out = {}
        for e in self.events:
            if e.obj == registry and e.opcode == 0:
                (name,) = struct.unpack_from("<I", e.payload)
                iface, off = e.string_at(4)
                (version,) = struct.unpack_from("<I", e.payload, off)
                out[iface] = (name, version)
        return out


@contextlib.contextmanager
def listening_socket(path: Path):
    """A Unix listening socket standing in for a compositor (for fd-passing tests)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    try:
        yield srv
    finally:
        srv.close()
