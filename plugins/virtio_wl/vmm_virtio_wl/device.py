"""The virtio-wl device model: crosvm's Wayland forwarding, host side.

Two queues. The driver sends commands on the out queue (index 1) and each chain's
writable part receives the response. The device sends its own commands on the in queue
(index 0), filling buffers the driver posted: VFD_NEW for each host fd that arrives,
VFD_RECV with the data (and the ids of those new VFDs), VFD_HUP when a host end closes.

A VFD (virtual file descriptor) is one of:

* a Wayland context: a Unix socket connected to a host compositor socket (NEW_CTX,
  NEW_CTX_NAMED); data and fds cross it with SCM_RIGHTS;
* shared memory: a memfd (VFD_NEW) or a seekable fd from the host, mapped into the guest
  through a VmMemoryRequest at an address from the SystemAllocator, reported as a pfn;
* a pipe end (NEW_PIPE, or a non-seekable fd from the host);
* a fence (a sync_file from the host, with SEND_FENCES).

Threads: everything runs in the device's VirtioWorker thread; host fds are watched with
one epoll fd that the worker polls next to the queue kicks. When the in queue has no
buffers and messages are waiting, the device stops watching host fds (so nothing is read
that could not be delivered, and the worker does not spin) until the driver posts more.

The guest is hostile: every command is copied out of guest memory before it is looked
at, short or malformed commands, unknown ids, bad flags, oversized sends, too many fds and
bad sizes get error responses, and none of them changes any state.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmm_virtio_wl import protocol as P
from vmm_virtio_wl.plugin import parse_named_socks
from vmmcore.virtio import DeviceType, Reader, VirtioDevice, Writer
from vmmcore.vm_control import Err, MemoryRegistered, RegisterMemory, UnregisterMemory

log = logging.getLogger(__name__)
# (vm_control is imported at the top, not lazily: a jailed device process cannot import
# once its jail has closed.)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Most bytes of data one VFD_SEND may carry (the guest driver sends at most a page).
MAX_SEND_DATA = 64 * 1024
#: SYNC_IOC_FILE_INFO = _IOWR('>', 4, struct sync_file_info) (56 bytes).
_SYNC_IOC_FILE_INFO = (3 << 30) | (56 << 16) | (0x3E << 8) | 4


def page_round(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class WlError(Exception):
    """A command failed: the response is `code` (RESP_ERR unless said otherwise)."""

    def __init__(self, message: str, code: int = P.RESP_ERR) -> None:
        super().__init__(message)
        self.code = code


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_fence(fd: int) -> bool:
    try:
        fcntl.ioctl(fd, _SYNC_IOC_FILE_INFO, bytearray(56))
        return True
    except OSError:
        return False


@dataclass
class Vfd:
    """One virtual fd and the host resources behind it."""

    sock: socket.socket | None = None           # a Wayland context
    shm_fd: int | None = None                   # shared memory
    size: int = 0
    slot: int | None = None                     # VmMemoryRequest mapping
    guest_addr: int = 0
    local_fd: int | None = None                 # our end of a pipe
    local_flags: int = 0                        # VFD_READ / VFD_WRITE of local_fd
    remote_fd: int | None = None                # the end that gets sent to the host
    fence_fd: int | None = None
    is_fence: bool = False
    hung_up: bool = False

    def send_fd(self) -> int | None:
        """The host fd that goes out when the guest sends this VFD."""
        for fd in (self.shm_fd, self.sock.fileno() if self.sock else None,
                   self.remote_fd, self.fence_fd):
            if fd is not None:
                return fd
        return None

    def wait_fd(self) -> int | None:
        """The fd watched for data and hang-up."""
        if self.sock is not None:
            return self.sock.fileno()
        if self.local_fd is not None:
            return self.local_fd
        return self.fence_fd

    def flags(self, transition: bool) -> int:
        f = 0
        if transition:
            if self.sock is not None:
                f |= P.VFD_WRITE | P.VFD_READ
            if self.local_fd is not None:
                f |= self.local_flags
            if self.is_fence:
                f |= P.VFD_FENCE
        else:
            if self.sock is not None:
                f |= P.VFD_CONTROL
            if self.slot is not None:
                f |= P.VFD_WRITE | P.VFD_MAP
        return f

    @property
    def pfn(self) -> int:
        return self.guest_addr >> P.PFN_SHIFT if self.slot is not None else 0

    def close_fds(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for name in ("shm_fd", "local_fd", "remote_fd", "fence_fd"):
            _close(getattr(self, name))
            setattr(self, name, None)


@dataclass
class InMessage:
    """One device -> driver message waiting for an in-queue buffer."""

    target: int                 # the VFD it concerns (dropped when the guest closes it)
    data: bytes
    new_ids: list[int] = field(default_factory=list)  # host VFDs it introduces


class VirtioWl(VirtioDevice):
    """virtio-wl: forwards guest Wayland connections to host compositor sockets."""

    device_type = DeviceType.WL

    def __init__(self, sockets: Mapping[str, str | os.PathLike], *,
                 vm_memory: Any = None, transition_flags: bool = True,
                 send_fences: bool = True, dmabuf: bool = False,
                 max_alloc: int = 128 << 20, max_vfds: int = 1024,
                 queue_size: int = P.QUEUE_SIZE) -> None:
        super().__init__()
        self.queue_max_sizes = (queue_size, queue_size)
        #: Socket name ("" is the default) -> host path of a Wayland compositor socket.
        self.sockets = {name: Path(path) for name, path in sockets.items()}
        #: A vmmcore.vm_control.VmMemoryClient; the builder sets it (see README).
        self.vm_memory = vm_memory
        self.offer_transition_flags = transition_flags
        self.offer_send_fences = send_fences
        self.dmabuf = dmabuf
        self.max_alloc = max_alloc
        self.max_vfds = max_vfds
        self.use_transition_flags = False
        self.use_send_vfd_v2 = False
        self.vfds: dict[int, Vfd] = {}
        self.next_vfd_id = P.NEXT_VFD_ID_BASE
        self.pending: deque[InMessage] = deque()
        self._epoll: select.epoll | None = None
        self._watched: dict[int, int] = {}     # fd -> vfd id
        self._armed = True
        if dmabuf:
            log.warning("virtio-wl: dmabuf=true, but no GBM allocator is built in; "
                        "VFD_NEW_DMABUF and VFD_DMABUF_SYNC answer INVALID_CMD")

    @property
    def name(self) -> str:
        return "virtio-wl"

    # -- negotiation ------------------------------------------------------------------------

    def features(self) -> int:
        f = 0
        if self.offer_transition_flags:
            f |= 1 << P.VIRTIO_WL_F_TRANS_FLAGS
        if self.offer_send_fences:
            f |= 1 << P.VIRTIO_WL_F_SEND_FENCES
        return f

    def ack_features(self, value: int) -> None:
        super().ack_features(value)
        self.use_transition_flags = bool(self.acked_features & (1 << P.VIRTIO_WL_F_TRANS_FLAGS))
        self.use_send_vfd_v2 = bool(self.acked_features & (1 << P.VIRTIO_WL_F_SEND_FENCES))

    # -- lifecycle ----------------------------------------------------------------------------

    def activate(self, mem, interrupt, queues, queue_evts) -> None:
        self.mem, self.interrupt = mem, interrupt
        self.queues, self.queue_evts = list(queues), list(queue_evts)
        self._epoll = select.epoll()
        self._armed = True
        self.start_worker({self._epoll.fileno(): self._on_host_events})

    def reset(self) -> bool:
        stopped = super().reset()
        self._drop_state()
        self.use_transition_flags = self.use_send_vfd_v2 = False
        return stopped

    def shutdown(self) -> None:
        super().shutdown()
        self._drop_state()

    def _drop_state(self) -> None:
        for vfd_id in list(self.vfds):
            self._destroy(vfd_id)
        self.pending.clear()
        self._watched.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self.next_vfd_id = P.NEXT_VFD_ID_BASE

    def host_paths(self) -> list[Path]:
        """Host paths the device connects to (the sandbox bind-mounts them into the jail)."""
        return sorted(set(self.sockets.values()))

    # -- queues -------------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        if index == P.OUT_QUEUE:
            self._process_out_queue()
        else:                       # new in-queue buffers: deliver, watch host fds again
            self._arm()
        self._flush_in_queue()

    def _process_out_queue(self) -> None:
        queue, mem = self.queues[P.OUT_QUEUE], self.mem
        used = False
        while (chain := queue.pop(mem)) is not None:
            reader, writer = Reader(mem, chain), Writer(mem, chain)
            try:
                resp = self._execute(reader)
            except WlError as e:
                log.debug("virtio-wl: command failed: %s", e)
                resp = P.code(e.code)
            written = writer.write(resp)
            if written < len(resp):
                log.warning("virtio-wl: response of %d bytes cut to the %d writable",
                            len(resp), written)
            queue.add_used(mem, chain, written)
            used = True
        if used:
            self.signal_used(P.OUT_QUEUE)

    def _flush_in_queue(self) -> None:
        """Put waiting messages into in-queue buffers; stop watching fds if it runs dry."""
        if not self.pending or not self.queues:
            return
        queue, mem = self.queues[P.IN_QUEUE], self.mem
        used = False
        while self.pending:
            chain = queue.pop(mem)
            if chain is None:
                break
            msg = self.pending.popleft()
            writer = Writer(mem, chain)
            if len(msg.data) > writer.available_bytes():
                log.warning("virtio-wl: in-queue buffer of %d bytes cannot hold a %d-byte "
                            "message; dropped", writer.available_bytes(), len(msg.data))
                queue.add_used(mem, chain, 0)
            else:
                writer.write(msg.data)
                queue.add_used(mem, chain, len(msg.data))
            used = True
        if used:
            self.signal_used(P.IN_QUEUE)
        if self.pending:
            self._disarm()

    # -- host fds -----------------------------------------------------------------------------

    def _watch(self, vfd_id: int, vfd: Vfd) -> None:
        fd = vfd.wait_fd()
        if fd is None:
            return
        self._watched[fd] = vfd_id
        if self._armed and self._epoll is not None:
            self._epoll.register(fd, self._event_mask(vfd))

    @staticmethod
    def _event_mask(vfd: Vfd) -> int:
        # A local write end is watched only for errors/hang-up (the reader went away).
        if vfd.local_fd is not None and vfd.local_flags == P.VFD_WRITE:
            return 0
        return select.EPOLLIN

    def _unwatch(self, vfd: Vfd) -> None:
        fd = vfd.wait_fd()
        if fd is None or fd not in self._watched:
            return
        del self._watched[fd]
        if self._armed and self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def _disarm(self) -> None:
        if not self._armed or self._epoll is None:
            return
        for fd in self._watched:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        self._armed = False

    def _arm(self) -> None:
        if self._armed or self._epoll is None:
            return
        self._armed = True
        for fd, vfd_id in self._watched.items():
            self._epoll.register(fd, self._event_mask(self.vfds[vfd_id]))

    def _on_host_events(self) -> None:
        """The epoll fd is readable: read what the host sent, queue it for the guest."""
        if self._epoll is None:
            return
        for fd, events in self._epoll.poll(0):
            vfd_id = self._watched.get(fd)
            vfd = self.vfds.get(vfd_id) if vfd_id is not None else None
            if vfd is None:
                continue
            if events & select.EPOLLIN:
                self._recv(vfd_id, vfd)
            elif events & (select.EPOLLHUP | select.EPOLLERR):
                self._hang_up(vfd_id, vfd)
        self._flush_in_queue()

    def _hang_up(self, vfd_id: int, vfd: Vfd) -> None:
        self._unwatch(vfd)
        vfd.hung_up = True
        self.pending.append(InMessage(vfd_id, P.vfd_hup(vfd_id)))

    def _recv(self, vfd_id: int, vfd: Vfd) -> None:
        if vfd.is_fence:        # a signalled fence: the guest sees a hang-up
            self._hang_up(vfd_id, vfd)
            return
        fds: list[int] = []
        try:
            if vfd.sock is not None:
                data, anc, _flags, _ = vfd.sock.recvmsg(
                    P.IN_DATA_MAX, socket.CMSG_SPACE(P.SEND_MAX_ALLOCS * 4),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        n = len(cdata) // 4
                        fds.extend(struct.unpack(f"<{n}i", cdata[:4 * n]))
            elif vfd.local_fd is not None:
                data = os.read(vfd.local_fd, P.IN_DATA_MAX)
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.info("virtio-wl: reading vfd %#x failed: %s", vfd_id, e)
            data = b""
        if not data and not fds:
            self._hang_up(vfd_id, vfd)
            return
        if len(fds) > P.SEND_MAX_ALLOCS:    # the control buffer bounds this; be sure
            for fd in fds[P.SEND_MAX_ALLOCS:]:
                _close(fd)
            fds = fds[:P.SEND_MAX_ALLOCS]
        new_ids = []
        for fd in fds:
            new_id = self._adopt_host_fd(fd)
            if new_id is not None:
                new_ids.append(new_id)
        for new_id in new_ids:
            new = self.vfds[new_id]
            # Memory the guest cannot map (mapping refused) is announced with size 0.
            size = new.size if new.slot is not None else 0
            self.pending.append(InMessage(vfd_id, P.vfd_new(
                False, new_id, new.flags(self.use_transition_flags), new.pfn, size),
                [new_id]))
        self.pending.append(InMessage(vfd_id, P.vfd_recv(vfd_id, new_ids, data)))

    def _adopt_host_fd(self, fd: int) -> int | None:
        """Turn an fd the host sent into a new host VFD; its id (None if dropped)."""
        if len(self.vfds) >= self.max_vfds:
            log.warning("virtio-wl: %d VFDs open; dropping an fd from the host", len(self.vfds))
            _close(fd)
            return None
        vfd = Vfd()
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            seekable = True
        except OSError:
            seekable = False
        if seekable:        # memory (memfd, file, dma-buf): crosvm's test, too
            vfd.shm_fd = fd
            vfd.size = page_round(size)
            if 0 < vfd.size <= self.max_alloc and self.vm_memory is not None:
                try:
                    self._map(vfd, "virtio-wl host shm")
                except WlError as e:
                    log.warning("virtio-wl: cannot map an fd from the host: %s", e)
        elif _is_fence(fd):
            vfd.fence_fd, vfd.is_fence = fd, True
        else:
            acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            vfd.local_fd = fd
            vfd.local_flags = {os.O_RDONLY: P.VFD_READ, os.O_WRONLY: P.VFD_WRITE,
                               os.O_RDWR: P.VFD_READ | P.VFD_WRITE}.get(acc, 0)
            os.set_blocking(fd, False)
        while self.next_vfd_id in self.vfds:
            self.next_vfd_id = P.NEXT_VFD_ID_BASE | ((self.next_vfd_id + 1) & 0x3FFF_FFFF)
        vfd_id = self.next_vfd_id
        self.next_vfd_id = P.NEXT_VFD_ID_BASE | ((vfd_id + 1) & 0x3FFF_FFFF)
        self.vfds[vfd_id] = vfd
        self._watch(vfd_id, vfd)
        return vfd_id

    # -- memory -------------------------------------------------------------------------------

    def _map(self, vfd: Vfd, tag: str) -> None:
        if self.vm_memory is None:
            raise WlError("no VmMemoryRequest channel: the device cannot map memory")
        resp = self.vm_memory.request(RegisterMemory(vfd.shm_fd, 0, vfd.size, False, tag))
        if not isinstance(resp, MemoryRegistered):
            msg = resp.message if isinstance(resp, Err) else repr(resp)
            raise WlError(f"mapping {vfd.size:#x} bytes failed: {msg}", P.RESP_OUT_OF_MEMORY)
        vfd.slot, vfd.guest_addr = resp.slot, resp.guest_addr

    def _unmap(self, vfd: Vfd) -> None:
        if vfd.slot is None or self.vm_memory is None:
            return
        resp = self.vm_memory.request(UnregisterMemory(vfd.slot))
        if isinstance(resp, Err):
            log.warning("virtio-wl: unmapping slot %d: %s", vfd.slot, resp.message)
        vfd.slot = None

    # -- commands -----------------------------------------------------------------------------

    def _execute(self, reader: Reader) -> bytes:
        head = reader.read(P.HDR.size)
        if len(head) < P.HDR.size:
            raise WlError(f"command of {len(head)} bytes has no header")
        cmd, _flags = P.HDR.unpack(head)

        def body(fmt: struct.Struct) -> tuple:
            rest = reader.read(fmt.size - P.HDR.size)
            if len(rest) < fmt.size - P.HDR.size:
                raise WlError(f"command {cmd:#x} is {P.HDR.size + len(rest)} bytes, "
                              f"needs {fmt.size}")
            return fmt.unpack(head + rest)

        if cmd == P.CMD_VFD_NEW:
            _, _, vfd_id, flags, _pfn, size = body(P.CTRL_VFD_NEW)
            return self._new_alloc(vfd_id, flags, size)
        if cmd == P.CMD_VFD_CLOSE:
            return self._close_vfd(body(P.CTRL_VFD)[2])
        if cmd in (P.CMD_VFD_SEND, P.CMD_VFD_SEND_FOREIGN_ID):
            _, _, vfd_id, count = body(P.CTRL_VFD_SEND)
            return self._send(vfd_id, count, cmd == P.CMD_VFD_SEND_FOREIGN_ID, reader)
        if cmd == P.CMD_VFD_NEW_CTX:
            return self._new_context(body(P.CTRL_VFD)[2], "")
        if cmd == P.CMD_VFD_NEW_CTX_NAMED:
            fields = body(P.CTRL_VFD_NEW_CTX_NAMED)
            raw = fields[6].split(b"\0", 1)[0]
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                raise WlError(f"socket name {raw!r} is not UTF-8") from None
            return self._new_context(fields[2], name)
        if cmd == P.CMD_VFD_NEW_PIPE:
            _, _, vfd_id, flags, _pfn, _size = body(P.CTRL_VFD_NEW)
            return self._new_pipe(vfd_id, flags)
        if cmd in (P.CMD_VFD_NEW_DMABUF, P.CMD_VFD_DMABUF_SYNC):
            # No GBM allocator / render node: answer as crosvm built without minigbm does.
            return P.code(P.RESP_INVALID_CMD)
        log.debug("virtio-wl: unknown command %#x", cmd)
        return P.code(P.RESP_INVALID_CMD)

    def _check_new_id(self, vfd_id: int) -> None:
        if vfd_id & P.VFD_ID_HOST_MASK:
            raise WlError(f"vfd id {vfd_id:#x} has the host bit", P.RESP_INVALID_ID)
        if vfd_id in self.vfds:
            raise WlError(f"vfd id {vfd_id:#x} is in use", P.RESP_INVALID_ID)
        if len(self.vfds) >= self.max_vfds:
            raise WlError(f"{len(self.vfds)} VFDs already open", P.RESP_OUT_OF_MEMORY)

    def _new_alloc(self, vfd_id: int, flags: int, size: int) -> bytes:
        if vfd_id & P.VFD_ID_HOST_MASK:
            return P.code(P.RESP_INVALID_ID)
        if self.use_transition_flags:
            if flags:
                return P.code(P.RESP_INVALID_FLAGS)
        elif flags & ~(P.VFD_WRITE | P.VFD_MAP):
            raise WlError(f"VFD_NEW flags {flags:#x}")
        self._check_new_id(vfd_id)
        if size == 0:
            raise WlError("VFD_NEW of 0 bytes")
        rounded = page_round(size)
        if rounded > self.max_alloc:
            raise WlError(f"VFD_NEW of {size:#x} bytes exceeds max_alloc {self.max_alloc:#x}",
                          P.RESP_OUT_OF_MEMORY)
        if self.vm_memory is None:
            raise WlError("VFD_NEW: no VmMemoryRequest channel to map memory into the guest")
        vfd = Vfd(size=rounded)
        vfd.shm_fd = os.memfd_create("virtwl_alloc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(vfd.shm_fd, rounded)
            # The compositor may map it; it must not be able to shrink it under the guest.
            fcntl.fcntl(vfd.shm_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            self._map(vfd, "virtio-wl VFD_NEW")
        except (OSError, WlError) as e:
            vfd.close_fds()
            if isinstance(e, WlError):
                raise
            raise WlError(f"VFD_NEW of {rounded:#x} bytes: {e}", P.RESP_OUT_OF_MEMORY) from e
        self.vfds[vfd_id] = vfd
        return P.vfd_new(True, vfd_id, flags, vfd.pfn, vfd.size)

    def _new_context(self, vfd_id: int, name: str) -> bytes:
        self._check_new_id(vfd_id)
        path = self.sockets.get(name)
        if path is None:
            raise WlError(f"no Wayland socket named {name!r}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Connecting (a full backlog) and sending block at most this long: a stuck
        # compositor must not hang the worker.
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise WlError(f"connecting to {path}: {e}") from e
        vfd = Vfd(sock=sock)
        self.vfds[vfd_id] = vfd
        self._watch(vfd_id, vfd)
        flags = P.VFD_WRITE | P.VFD_READ if self.use_transition_flags else P.VFD_CONTROL
        return P.vfd_new(True, vfd_id, flags, 0, 0)

    def _new_pipe(self, vfd_id: int, flags: int) -> bytes:
        if vfd_id & P.VFD_ID_HOST_MASK:
            return P.code(P.RESP_INVALID_ID)
        if flags & ~(P.VFD_WRITE | P.VFD_READ) or flags not in (P.VFD_WRITE, P.VFD_READ):
            return P.code(P.RESP_INVALID_FLAGS)
        self._check_new_id(vfd_id)
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if flags == P.VFD_WRITE:        # the guest writes; the host gets the read end
            vfd = Vfd(local_fd=w, local_flags=P.VFD_WRITE, remote_fd=r)
        else:                           # the guest reads; the host gets the write end
            vfd = Vfd(local_fd=r, local_flags=P.VFD_READ, remote_fd=w)
        self.vfds[vfd_id] = vfd
        self._watch(vfd_id, vfd)
        return P.vfd_new(True, vfd_id, 0, 0, 0)

    def _close_vfd(self, vfd_id: int) -> bytes:
        if vfd_id not in self.vfds:
            return P.code(P.RESP_INVALID_ID)
        # Messages for this VFD that the guest will now never see: drop them, and the
        # host VFDs they would have introduced.
        doomed = [m for m in self.pending if m.target == vfd_id]
        self.pending = deque(m for m in self.pending if m.target != vfd_id)
        for m in doomed:
            for new_id in m.new_ids:
                self._destroy(new_id)
        self._destroy(vfd_id)
        return P.code(P.RESP_OK)

    def _destroy(self, vfd_id: int) -> None:
        vfd = self.vfds.pop(vfd_id, None)
        if vfd is None:
            return
        self._unwatch(vfd)
        self._unmap(vfd)
        vfd.close_fds()

    def _send(self, vfd_id: int, count: int, foreign: bool, reader: Reader) -> bytes:
        if count > P.SEND_MAX_ALLOCS:
            raise WlError(f"VFD_SEND of {count} VFDs (at most {P.SEND_MAX_ALLOCS})")
        entry = (P.SEND_VFD_V2 if self.use_send_vfd_v2 else P.SEND_VFD) if foreign else P.U32
        raw = reader.read(entry.size * count)
        if len(raw) < entry.size * count:
            raise WlError(f"VFD_SEND: {count} ids do not fit in the command")
        ids = []
        for i in range(count):
            values = entry.unpack_from(raw, i * entry.size)
            if not foreign:
                ids.append(values[0])
                continue
            kind, ident = values
            if kind != P.SEND_KIND_LOCAL:   # virtio-gpu resources/fences: no resource bridge
                log.debug("virtio-wl: send of foreign kind %d refused", kind)
                return P.code(P.RESP_INVALID_ID)
            ids.append(ident & 0xFFFF_FFFF)
        fds = []
        for i in ids:
            vfd = self.vfds.get(i)
            if vfd is None:
                return P.code(P.RESP_INVALID_ID)
            fd = vfd.send_fd()
            if fd is None:
                return P.code(P.RESP_INVALID_TYPE)
            fds.append(fd)
        target = self.vfds.get(vfd_id)
        if target is None:
            return P.code(P.RESP_INVALID_ID)
        if reader.available_bytes() > MAX_SEND_DATA:
            raise WlError(f"VFD_SEND of {reader.available_bytes()} bytes "
                          f"(at most {MAX_SEND_DATA})")
        data = reader.read()
        if target.sock is not None:
            if fds and not data:    # a stream socket would drop the fds without a byte
                raise WlError("VFD_SEND of fds without data cannot cross a stream socket")
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"<{len(fds)}i", *fds))]
            try:
                sent = target.sock.sendmsg([data], anc if fds else [])
                if sent < len(data):
                    target.sock.sendall(data[sent:])
            except OSError as e:
                raise WlError(f"sending on vfd {vfd_id:#x}: {e}") from e
        elif target.local_fd is not None and target.local_flags & P.VFD_WRITE:
            if fds:
                return P.code(P.RESP_INVALID_TYPE)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(target.local_fd, view):]
            except BlockingIOError as e:
                raise WlError(f"pipe vfd {vfd_id:#x} is full") from e
            except OSError as e:
                raise WlError(f"writing pipe vfd {vfd_id:#x}: {e}") from e
        else:
            return P.code(P.RESP_INVALID_TYPE)
        # Our copies of sent remote pipe ends go, so the local ends see the hang-up.
        for i in ids:
            vfd = self.vfds.get(i)
            if vfd is not None and vfd.remote_fd is not None:
                _close(vfd.remote_fd)
                vfd.remote_fd = None
        return P.code(P.RESP_OK)

    def keep_fds(self) -> list[int]:
        fileno = getattr(self.vm_memory, "fileno", None)
        return [fileno()] if callable(fileno) else []


def create(options: Mapping[str, Any], ctx: object) -> VirtioWl:
    """The PluginSpec factory. The VmMemoryRequest channel comes from ctx.vm_memory when
    the core's DeviceContext has it; otherwise the builder sets device.vm_memory."""
    sockets = {options.get("name") or "": str(options["wayland_sock"])}
    for name, path in parse_named_socks(options.get("named_socks") or "").items():
        if name in sockets:
            raise ValueError(f"socket name {name!r} given twice")
        sockets[name] = path
    return VirtioWl(sockets, vm_memory=getattr(ctx, "vm_memory", None),
                    transition_flags=options["transition_flags"],
                    send_fences=options["send_fences"], dmabuf=options["dmabuf"],
                    max_alloc=options["max_alloc"], max_vfds=options["max_vfds"])
