"""VmMemoryRequest: a device asks the main process to map host memory into the guest.

Only the main process owns the VM fd and the SystemAllocator, so a device that wants
guest-visible shared memory (virtio-wl's VFD_NEW, later virtio-gpu blobs) sends a
request and gets back where the memory now lives in guest-physical space:

    RegisterMemory(fd, offset, size)  ->  MemoryRegistered(slot, guest_addr, size)
    UnregisterMemory(slot)            ->  Ok()
    anything that fails               ->  Err(message)

VmMemoryController is the main-process side: it takes an address from the allocator's
MMIO pool, mmaps the file (MAP_SHARED) and installs it in a new KVM memory slot
(KVM_SET_USER_MEMORY_REGION); unregistering deletes the slot, unmaps and gives the
address back. It never raises for a bad request: a device in a jailed process is
untrusted, so every problem is an Err response.

A device holds a VmMemoryClient, i.e. anything with ``request(req) -> response``:

* in process (``--disable-sandbox``) the VmMemoryController itself;
* in a sandboxed device process, SocketVmMemoryClient, which sends the request over the
  device's SOCK_SEQPACKET socket (the fd as SCM_RIGHTS) and waits for the reply; the
  main process answers with serve_request(sock, controller). encode_request /
  decode_request / encode_response / decode_response are the wire format, for a
  sandbox that multiplexes these messages with its own (bus access) messages.

The controller does not take ownership of a request's fd: the mapping keeps the file
alive, and the caller closes its descriptor whenever it likes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from vmmcore.errors import VmmError
from vmmcore.sandbox import protocol as P

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


class VmMemoryError(VmmError):
    """A VmMemoryRequest failed (the Err response's message)."""


# -- requests and responses ----------------------------------------------------------------

@dataclass(frozen=True)
class RegisterMemory:
    """Map size bytes of fd, from offset, into the guest at an allocator address."""

    fd: int
    offset: int
    size: int
    readonly: bool = False
    tag: str = "device memory"


@dataclass(frozen=True)
class UnregisterMemory:
    """Remove the mapping in `slot` and give its guest address back."""

    slot: int


@dataclass(frozen=True)
class MemoryRegistered:
    """The memory is visible to the guest at guest_addr (KVM slot `slot`)."""

    slot: int
    guest_addr: int
    size: int

    @property
    def pfn(self) -> int:
        """The guest page frame number of guest_addr."""
        return self.guest_addr >> PAGE_SHIFT


@dataclass(frozen=True)
class Ok:
    """The request succeeded and has nothing to return."""


@dataclass(frozen=True)
class Err:
    """The request failed; nothing changed in the guest."""

    message: str


VmMemoryRequest = RegisterMemory | UnregisterMemory
VmMemoryResponse = MemoryRegistered | Ok | Err


class VmMemoryClient(Protocol):
    """What a device needs: send one request, get its response."""

    def request(self, req: VmMemoryRequest) -> VmMemoryResponse:
        """Execute req in the main process and return the response."""


def register_memory(client: VmMemoryClient, fd: int, offset: int, size: int, *,
                    readonly: bool = False, tag: str = "device memory") -> MemoryRegistered:
    """RegisterMemory through client; raises VmMemoryError on an Err response."""
    resp = client.request(RegisterMemory(fd, offset, size, readonly, tag))
    if isinstance(resp, MemoryRegistered):
        return resp
    raise VmMemoryError(resp.message if isinstance(resp, Err) else f"unexpected {resp!r}")


def unregister_memory(client: VmMemoryClient, slot: int) -> None:
    """UnregisterMemory through client; raises VmMemoryError on an Err response."""
    resp = client.request(UnregisterMemory(slot))
    if isinstance(resp, Err):
        raise VmMemoryError(resp.message)


# -- the main-process side -----------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _host_mmap(fd: int, offset: int, size: int, readonly: bool) -> int:
    prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
    addr = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of fd {fd} ({offset:#x}+{size:#x}): {os.strerror(err)}")
    return addr


def _host_munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) != 0:
        err = ctypes.get_errno()
        log.error("munmap %#x+%#x: %s", addr, size, os.strerror(err))


class VmLike(Protocol):
    """The Vm operations the controller uses (vmmcore.kvm.Vm has them)."""

    def add_memory_region(self, guest_addr: int, size: int, host_addr: int,
                          readonly: bool = False) -> int: ...

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int,
                               readonly: bool = False) -> None: ...


@dataclass
class _Mapping:
    slot: int
    guest_addr: int
    size: int
    host_addr: int
    tag: str


class VmMemoryController:
    """Executes VmMemoryRequests against a Vm and a SystemAllocator (main process).

    Addresses come from the allocator's 64-bit MMIO pool (prefer_high=True, the
    default) or its 32-bit pool; KVM slots freed by UnregisterMemory are reused, new ones
    come from Vm.add_memory_region so they never collide with the RAM slots.
    max_total caps the bytes mapped at once (a hostile device cannot exhaust the host).
    """

    def __init__(self, vm: VmLike, allocator, *, prefer_high: bool = True,
                 max_total: int = 4 << 30) -> None:
        self.vm = vm
        self.allocator = allocator
        self.prefer_high = prefer_high
        self.max_total = max_total
        self._lock = threading.Lock()
        self._maps: dict[int, _Mapping] = {}
        self._free_slots: list[int] = []
        self._total = 0

    @property
    def mappings(self) -> list[MemoryRegistered]:
        """The current mappings (for tests and `vmm` diagnostics)."""
        with self._lock:
            return [MemoryRegistered(m.slot, m.guest_addr, m.size)
                    for m in sorted(self._maps.values(), key=lambda m: m.slot)]

    def read(self, slot: int, offset: int, size: int) -> bytes:
        """Bytes of the mapping in `slot` as the guest sees them (diagnostics, tests)."""
        with self._lock:
            m = self._maps.get(slot)
            if m is None or offset < 0 or size < 0 or offset + size > m.size:
                raise VmMemoryError(f"read: slot {slot} does not hold {offset:#x}+{size:#x}")
            return ctypes.string_at(m.host_addr + offset, size)

    def request(self, req: VmMemoryRequest) -> VmMemoryResponse:
        """Execute one request; every failure is an Err, never an exception."""
        try:
            if isinstance(req, RegisterMemory):
                return self._register(req)
            if isinstance(req, UnregisterMemory):
                self._unregister(req.slot)
                return Ok()
            return Err(f"unknown VmMemoryRequest {type(req).__name__}")
        except (VmmError, OSError, ValueError) as e:
            return Err(str(e))

    execute = request

    def _register(self, req: RegisterMemory) -> MemoryRegistered:
        size, offset = req.size, req.offset
        if size <= 0 or size % PAGE_SIZE or offset < 0 or offset % PAGE_SIZE:
            raise VmMemoryError(f"register memory: offset {offset:#x} and size {size:#x} "
                                "must be page aligned and size > 0")
        st = os.fstat(req.fd)
        # Pages wholly past the end of a file would fault (SIGBUS / EFAULT) when touched;
        # the partial page at the end is fine.
        file_pages = (st.st_size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if stat.S_ISREG(st.st_mode) and file_pages < offset + size:
            raise VmMemoryError(f"register memory: the file holds {st.st_size:#x} bytes, "
                                f"less than {offset:#x}+{size:#x}")
        with self._lock:
            if self._total + size > self.max_total:
                raise VmMemoryError(f"register memory: {size:#x} more bytes would exceed "
                                    f"the {self.max_total:#x}-byte limit")
            guest_addr = self.allocator.allocate_mmio(size, req.tag or "device memory",
                                                      align=PAGE_SIZE,
                                                      prefer_high=self.prefer_high)
            host_addr = 0
            try:
                host_addr = _host_mmap(req.fd, offset, size, req.readonly)
                if self._free_slots:
                    slot = self._free_slots.pop()
                    try:
                        self.vm.set_user_memory_region(slot, guest_addr, size, host_addr,
                                                       req.readonly)
                    except BaseException:
                        self._free_slots.append(slot)
                        raise
                else:
                    slot = self.vm.add_memory_region(guest_addr, size, host_addr,
                                                     req.readonly)
            except BaseException:
                if host_addr:
                    _host_munmap(host_addr, size)
                self.allocator.release_mmio(guest_addr)
                raise
            self._maps[slot] = _Mapping(slot, guest_addr, size, host_addr, req.tag)
            self._total += size
        log.debug("vm_control: %s fd %d mapped at %#x+%#x (slot %d)", req.tag, req.fd,
                  guest_addr, size, slot)
        return MemoryRegistered(slot, guest_addr, size)

    def _unregister(self, slot: int) -> None:
        with self._lock:
            m = self._maps.get(slot)
            if m is None:
                raise VmMemoryError(f"unregister memory: slot {slot} is not a device mapping")
            self.vm.set_user_memory_region(slot, m.guest_addr, 0, 0)
            del self._maps[slot]
            self._total -= m.size
            self._free_slots.append(slot)
        _host_munmap(m.host_addr, m.size)
        self.allocator.release_mmio(m.guest_addr)

    def close(self) -> None:
        """Remove every mapping (the VM is going away)."""
        for slot in list(self._maps):
            try:
                self._unregister(slot)
            except (VmmError, OSError) as e:
                log.warning("vm_control: removing slot %d: %s", slot, e)


# -- the wire format (for the sandbox's socket) -----------------------------------------------

_KIND = struct.Struct("<I")
_REQ_REGISTER = 1
_REQ_UNREGISTER = 2
_RESP_REGISTERED = 0x101
_RESP_OK = 0x102
_RESP_ERR = 0x103
_REGISTER = struct.Struct("<IQQB")     # kind, offset, size, readonly; then the tag (utf-8)
_UNREGISTER = struct.Struct("<II")     # kind, slot
_REGISTERED = struct.Struct("<IIQQ")   # kind, slot, guest_addr, size
MAX_MESSAGE = 4096


def encode_request(req: VmMemoryRequest) -> tuple[bytes, list[int]]:
    """The request as (bytes, fds to pass with SCM_RIGHTS)."""
    if isinstance(req, RegisterMemory):
        tag = req.tag.encode()[:256]
        return _REGISTER.pack(_REQ_REGISTER, req.offset, req.size, req.readonly) + tag, [req.fd]
    if isinstance(req, UnregisterMemory):
        return _UNREGISTER.pack(_REQ_UNREGISTER, req.slot), []
    raise TypeError(f"not a VmMemoryRequest: {req!r}")


def decode_request(data: bytes, fds: list[int]) -> VmMemoryRequest:
    """Parse a request from an untrusted peer (ValueError when malformed)."""
    if len(data) < _KIND.size:
        raise ValueError("VmMemoryRequest: short message")
    (kind,) = _KIND.unpack_from(data)
    if kind == _REQ_REGISTER and len(data) >= _REGISTER.size and len(fds) == 1:
        _, offset, size, readonly = _REGISTER.unpack_from(data)
        tag = data[_REGISTER.size:].decode(errors="replace")
        return RegisterMemory(fds[0], offset, size, bool(readonly), tag)
    if kind == _REQ_UNREGISTER and len(data) == _UNREGISTER.size and not fds:
        return UnregisterMemory(_UNREGISTER.unpack(data)[1])
    raise ValueError(f"VmMemoryRequest: malformed message (kind {kind:#x}, "
                     f"{len(data)} bytes, {len(fds)} fds)")


def encode_response(resp: VmMemoryResponse) -> bytes:
    if isinstance(resp, MemoryRegistered):
        return _REGISTERED.pack(_RESP_REGISTERED, resp.slot, resp.guest_addr, resp.size)
    if isinstance(resp, Ok):
        return _KIND.pack(_RESP_OK)
    if isinstance(resp, Err):
        return _KIND.pack(_RESP_ERR) + resp.message.encode()[:MAX_MESSAGE - 4]
    raise TypeError(f"not a VmMemoryResponse: {resp!r}")


def decode_response(data: bytes) -> VmMemoryResponse:
    if len(data) < _KIND.size:
        raise ValueError("VmMemoryResponse: short message")
    (kind,) = _KIND.unpack_from(data)
    if kind == _RESP_REGISTERED and len(data) == _REGISTERED.size:
        _, slot, guest_addr, size = _REGISTERED.unpack(data)
        return MemoryRegistered(slot, guest_addr, size)
    if kind == _RESP_OK:
        return Ok()
    if kind == _RESP_ERR:
        return Err(data[4:].decode(errors="replace"))
    raise ValueError(f"VmMemoryResponse: unknown kind {kind:#x}")


class SocketVmMemoryClient:
    """A VmMemoryClient in a device process: requests cross a SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def request(self, req: VmMemoryRequest) -> VmMemoryResponse:
        data, fds = encode_request(req)
        try:
            with self._lock:
                P.send(self.sock, data, fds)
                reply, stray = P.recv(self.sock, MAX_MESSAGE, 1)
        except P.ProtocolError as e:
            return Err(f"VmMemoryRequest reply: {e}")
        for fd in stray:
            os.close(fd)
        try:
            return decode_response(reply)
        except ValueError as e:
            return Err(str(e))

    def fileno(self) -> int:
        return self.sock.fileno()


def serve_request(sock: socket.socket, controller: VmMemoryController) -> bool:
    """Main process: answer one request from sock; False when the peer has gone (or
    sent a packet too large to be a request: that peer is dropped)."""
    try:
        data, fds = P.recv(sock, MAX_MESSAGE, 4)
    except P.ProtocolError as e:
        log.info("vm_control: dropping a device connection: %s", e)
        return False
    if not data and not fds:
        return False
    try:
        try:
            resp = controller.request(decode_request(data, fds))
        except ValueError as e:
            resp = Err(str(e))
        # Never block: one device that does not read its replies must not stall the
        # server that every device shares (BlockingIOError drops that connection).
        sock.send(encode_response(resp), socket.MSG_DONTWAIT)
    finally:
        for fd in fds:      # the mapping holds the file; our copy of the fd goes
            os.close(fd)
    return True


class ConnectingVmMemoryClient:
    """A VmMemoryClient that connects to a VmMemoryServer's socket path on first use.

    For a jailed device process that cannot inherit the socket: the jail bind-mounts the
    server's path, and the device connects after the jail has closed (AF_UNIX socket and
    connect must be in its seccomp policy).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._client: SocketVmMemoryClient | None = None
        self._lock = threading.Lock()

    def request(self, req: VmMemoryRequest) -> VmMemoryResponse:
        with self._lock:
            if self._client is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                try:
                    sock.connect(self.path)
                except OSError as e:
                    sock.close()
                    return Err(f"cannot reach the VmMemoryRequest socket {self.path}: {e}")
                self._client = SocketVmMemoryClient(sock)
            client = self._client
        try:
            return client.request(req)
        except OSError as e:
            return Err(f"VmMemoryRequest socket: {e}")


class VmMemoryServer:
    """Main process: serves VmMemoryRequests from device processes, one thread for all.

    Device processes reach it through socketpairs made before their fork
    (channel(), the VM builder's way) and/or, given a path, a listening SOCK_SEQPACKET
    socket there (mode 0600) for a jailed process that connects by path.
    start() makes a thread: call it only after every device process has been forked.
    """

    def __init__(self, controller: VmMemoryController,
                 path: str | os.PathLike[str] | None = None) -> None:
        self.controller = controller
        self.path = os.fspath(path) if path is not None else None
        self.listener: socket.socket | None = None
        if self.path is not None:
            self.listener = socket.socket(socket.AF_UNIX,
                                          socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                self.listener.bind(self.path)
            finally:
                os.umask(old)
            self.listener.listen(16)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._conns: dict[int, socket.socket] = {}

    def channel(self) -> SocketVmMemoryClient:
        """A client for one device process (keep its fileno() across the fork); the
        server keeps the other end. Call before start()."""
        if self._thread is not None:
            raise VmMemoryError("VmMemoryServer.channel() after start()")
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._conns[ours.fileno()] = ours
        return SocketVmMemoryClient(theirs)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vm-memory", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import select

        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        listen_fd = -1
        if self.listener is not None:
            listen_fd = self.listener.fileno()
            poller.register(listen_fd, select.POLLIN)
        for fd in self._conns:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _events in poller.poll():
                if fd == self._wake_r:
                    return
                if fd == listen_fd:
                    conn, _ = self.listener.accept()  # type: ignore[union-attr]
                    self._conns[conn.fileno()] = conn
                    poller.register(conn.fileno(), select.POLLIN)
                    continue
                conn = self._conns.get(fd)
                if conn is None:
                    continue
                try:
                    alive = serve_request(conn, self.controller)
                except OSError as e:
                    log.info("vm_control: a device connection failed: %s", e)
                    alive = False
                if not alive:
                    poller.unregister(fd)
                    del self._conns[fd]
                    conn.close()

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # type: ignore[arg-type]


__all__ = [
    "ConnectingVmMemoryClient", "Err", "MemoryRegistered", "Ok", "PAGE_SHIFT", "PAGE_SIZE", "RegisterMemory",
    "SocketVmMemoryClient", "UnregisterMemory", "VmMemoryClient", "VmMemoryController",
    "VmMemoryError", "VmMemoryRequest", "VmMemoryResponse", "VmMemoryServer", "decode_request",
    "decode_response", "encode_request", "encode_response", "register_memory",
    "serve_request", "unregister_memory",
]
