"""ProxyDevice: a PCI device running in a jailed child process (crosvm's devices/src/proxy.rs).

Process tree, created when the ProxyDevice is constructed::

    main process ── keeper (new session; unshare user?/mount/pid/net/ipc)
                      └── device process (PID 1 of its namespace): maps guest memory
                          from the memfd, builds the device, jails itself, serves

The keeper exists because a new PID namespace only applies to children; it waits for the
device process and dies the same way (killed by SIGSYS -> the keeper kills itself with
SIGSYS), so the main process's waitpid sees how the device died. Both have
PR_SET_PDEATHSIG(SIGKILL): they die with the main process.

**Fork constraint.** ProxyDevice() forks. Python cannot fork safely once other threads
run (a lock held by another thread stays locked forever in the child), so every
ProxyDevice must be created before any vCPU, serial-input or other worker thread starts
(in build_vm, before run()); SandboxSupervisor.start() (a thread) comes after the last
ProxyDevice. Device factories must not start threads before activate(). The fork also
happens from the thread that will outlive the VM (PR_SET_PDEATHSIG fires when the
forking *thread* exits): build the VM in the main thread.

What crosses the socket (vmmcore.sandbox.protocol): bus reads (request/reply), bus
writes (one-way, except writes into the MSI-X table, which wait so that the route update
they cause reaches KVM before the guest goes on), configuration reads and writes (the
answer carries the BAR ranges added/removed), and the set-up calls of the PciDevice
interface. The guest-memory memfd, irqfds and INTx eventfds go to the child as SCM_RIGHTS
fds; the queue eventfds come back the same way (ioevents()), so kick -> device ->
interrupt never involves the main process.

MSI-X: the table lives in the child with the device (masking and pending bits are the
device's business). Routes go to KVM through the main process: the child's MsixConfig
has a ChildIrqRouter whose calls arrive here as CALLs while the main process waits for
the table or configuration write that caused them; only GSIs given to this device are
accepted.

Death: a child that dies (seccomp's SIGSYS, an exception, SIGKILL) or stops answering
(RequestTimeout) is reaped and reported once, with its name and, for SIGSYS, the system
call; the report goes to the VmEventSink as VmEvent.ERROR with status 1 so the VM stops
cleanly. From then on bus reads return all-ones and writes are dropped: nothing waits
on a dead device. Which system call killed it: seccomp's KILL_PROCESS writes an audit
record (type=1326 ... pid=N ... syscall=NR) to the kernel log; the main process reads
/dev/kmsg for the record of the device's pid. Where the kernel log is not readable
(unprivileged, dmesg_restrict) the report says so and points to
``--seccomp-log-failures``. (A SIGSYS handler in the child with SECCOMP_RET_TRAP was
rejected: a Python handler cannot see si_syscall and runs only after the interrupted C
code carried on with a bogus return value.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmmcore.allocator import SystemAllocator
from vmmcore.errors import VmmError
from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.pci.config_space import BarKind, BarRange, PciConfiguration
from vmmcore.pci.device import (
    ConfiguredPciDevice,
    ConfigWriteResult,
    IoEventSpec,
    PciDevice,
    start_failure,
)
from vmmcore.pci.intx import PciIntx
from vmmcore.pci.irq import IrqRouter
from vmmcore.sandbox import protocol as P
from vmmcore.sandbox.jail import JailConfig, fork_frozen
from vmmcore.sandbox.policy import syscall_name
from vmmcore.virtio.status import DeviceType

log = logging.getLogger(__name__)

#: How long the main process waits for one answer before declaring the device hung.
DEFAULT_TIMEOUT = 10.0


class DeviceDied(VmmError):
    """The device process is gone (or was killed for not answering)."""


class RequestTimeout(DeviceDied):
    """The device process did not answer in time."""


class DeviceRequestError(VmmError):
    """The device process answered a request with an error (a device bug)."""


def _check_int(value: object, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise P.ProtocolError(f"bad integer {value!r}")
    return value


def _virtio_type(value: int) -> DeviceType | int:
    try:
        return DeviceType(value)
    except ValueError:
        return value


def _bar_range(item: object) -> BarRange:
    if not isinstance(item, list) or len(item) != 5:
        raise P.ProtocolError(f"bad BAR range {item!r}")
    bar, base, size, kind, prefetch = item
    return BarRange(_check_int(bar, 0, 5), _check_int(base), _check_int(size, 1),
                    BarKind(kind), bool(prefetch))


class ProxyDevice(PciDevice):
    """A PciDevice whose model runs in a jailed child. See the module docstring.

    build(mem) runs in the child and returns the real device (e.g.
    ``lambda mem: VirtioPciDevice(factory(options, ctx), mem, label)``). Construction
    raises VmmError (with the child's message) when the child fails to build or jail,
    or when the device's on_device_sandboxed() refuses to start (ConfigError if it said
    so); DeviceDied naming the signal or system call when the child dies doing it.
    """

    def __init__(self, build: Callable[[GuestMemory], PciDevice], mem: GuestMemory, *,
                 label: str, jail: JailConfig | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 on_death: Callable[[str], None] | None = None,
                 keep_fds: Sequence[int] = ()) -> None:
        self._label = label
        self._jail = jail if jail is not None else JailConfig()
        self._timeout = timeout
        self._on_death = on_death
        self._lock = threading.RLock()         # one request at a time
        self._death_lock = threading.Lock()
        self._dead = False
        self._death_reason: str | None = None
        self._shutting_down = False
        self._reaped_status: int | None = None
        self._router: IrqRouter | None = None
        self._gsis: set[int] = set()
        self._sync_ranges: list[tuple[int, int, int]] = []
        self._ioevents: list[IoEventSpec] | None = None
        self._owned: list[EventFd] = []
        self._msix_vectors = 0
        self._violation: int | None = None     # syscall nr the keeper's listener saw
        self._has_control = False
        self._control_commands: tuple[str, ...] | None = None
        self.device_pid: int | None = None     # the device process (for audit records)
        # The virtio device type the child built (`vmm status`); None if not virtio.
        self.virtio_type: DeviceType | int | None = None
        if threading.active_count() > 1:
            log.warning("device %s: forking with %d threads running (%s); a lock one of "
                        "them holds stays locked in the device process. Create every "
                        "ProxyDevice before starting threads.", label,
                        threading.active_count(),
                        ", ".join(t.name for t in threading.enumerate()))
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        pid = fork_frozen()
        if pid == 0:   # the keeper; never returns
            parent.close()
            from vmmcore.sandbox.child_proc import keeper_main

            with contextlib.suppress(BaseException):
                _forget_parent_memory(mem)
            keeper_main(child, build, self._jail, tuple(keep_fds))
        self.pid = pid
        child.close()
        self.pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.pidfd = os.pidfd_open(pid)
        try:
            self._start(mem)
        except DeviceDied as e:
            reason = self._death_at_start(e)
            self._abandon()
            raise DeviceDied(reason) from None
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """After a failed start: no process, no socket, no pidfd left behind."""
        self._kill_and_reap()
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def _death_at_start(self, e: DeviceDied) -> str:
        """Why the device process went away before answering INIT (a crash in its
        on_device_sandboxed, a forbidden system call): reaped, so that the line names
        the signal or the call rather than a closed socket."""
        exiting = self.pidfd is None or select.select([self.pidfd], [], [], 2.0)[0]
        if isinstance(e, RequestTimeout) or not exiting:   # alive: not a death to name
            return str(e)
        status = self._reap(wait=2.0)
        self._read_leftover_events()
        return describe_death(self._label, status, self.device_pid,
                              "while starting in its process", self._violation)

    # -- start-up ----------------------------------------------------------------------

    def _start(self, mem: GuestMemory) -> None:
        hello = self._recv_expect(P.HELLO, "HELLO")
        self.device_pid = _check_int(hello.get("pid"), 1, 1 << 22)
        ranges = [[r.guest_addr, r.size] for r in mem.regions]
        info = self._request(P.pack_json(P.INIT, {"ranges": ranges, "label": self._label}),
                             fds=[mem.fd], json_reply=True, startup=True)
        if not isinstance(info, dict):
            raise DeviceDied(f"device {self._label}: bad INIT answer")
        self._msix_vectors = _check_int(info.get("msix_vectors", 0), 0, 2048)
        if info.get("virtio_type") is not None:
            self.virtio_type = _virtio_type(_check_int(info["virtio_type"], 1, 255))
        control = self._op({"op": "control_commands"})
        if isinstance(control, dict) and control.get("control"):
            cmds = control.get("commands")
            self._control_commands = (None if cmds is None else
                                      tuple(str(c) for c in cmds if isinstance(c, str)))
            self._has_control = True
        table = self._op({"op": "msix_table"})
        if table is not None:
            bar, offset, size = (_check_int(v) for v in table)
            self._sync_ranges.append((bar, offset, size))

    def _recv_expect(self, kind: bytes, what: str) -> Any:
        data, fds = self._recv_packet(startup=True)
        for fd in fds:
            os.close(fd)
        if data[:1] == P.ERROR:
            raise VmmError(f"device {self._label}: {self._error_text(data)}")
        if data[:1] != kind:
            raise DeviceDied(f"device {self._label}: expected {what}, got {data[:1]!r}")
        return P.unpack_json(data[1:])

    # -- the request loop ---------------------------------------------------------------

    def _deadline(self, startup: bool = False) -> float:
        return time.monotonic() + (max(self._timeout, 30.0) if startup else self._timeout)

    def _send(self, message: bytes, fds: Sequence[int] = (), startup: bool = False) -> None:
        """Send within the request timeout: a device process that is alive but no longer
        reads (a deadlocked worker) fills its socket, and a blocking send would hold the
        vCPU, and every other caller behind the lock, forever."""
        deadline = self._deadline(startup)
        while True:
            try:
                P.send(self.sock, message, fds, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeout(f"device {self._label} stopped taking requests "
                                         f"for {self._timeout:g} s") from None
                select.select([], [self.sock], [], remaining)

    def _recv_packet(self, startup: bool = False,
                     deadline: float | None = None) -> tuple[bytes, list[int]]:
        if deadline is None:
            deadline = self._deadline(startup)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"device {self._label} did not answer within "
                                     f"{self._timeout:g} s")
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                continue
            try:
                data, fds = P.recv(self.sock)
            except (ConnectionError, OSError) as e:
                raise DeviceDied(f"device {self._label}: {e}") from None
            if not data:
                raise DeviceDied(f"device {self._label} closed its socket")
            return data, fds

    def _error_text(self, data: bytes) -> str:
        try:
            err = P.unpack_json(data[1:])
            return str(err.get("error"))[:500] if isinstance(err, dict) else "error"
        except ValueError:
            return "unreadable error"

    def _error(self, data: bytes, startup: bool) -> VmmError:
        """The exception for an ERROR answer: at start-up, one marked "start" is the
        device refusing to start (its on_device_sandboxed raised)."""
        text = self._error_text(data)
        try:
            err = P.unpack_json(data[1:])
        except ValueError:
            err = None
        if startup and isinstance(err, dict) and err.get("start") is True:
            return start_failure(self._label, text, err.get("config") is True)
        return DeviceRequestError(f"device {self._label}: {text}")

    def _request(self, message: bytes, fds: Sequence[int] = (), *, reply: bool = True,
                 json_reply: bool = False, startup: bool = False) -> Any:
        """Send one request; handle CALLs/EVENTs until its reply. Raises DeviceDied."""
        with self._lock:
            if self._dead:
                raise DeviceDied(self._death_reason or f"device {self._label} is dead")
            try:
                try:
                    self._send(message, fds, startup)
                except RequestTimeout:
                    raise
                except OSError as e:
                    raise DeviceDied(f"device {self._label}: {e}") from None
                if not reply:
                    return None
                # One deadline for the whole request: a child that keeps sending CALLs
                # or EVENTs instead of its answer cannot hold the caller forever.
                deadline = self._deadline(startup)
                while True:
                    data, got = self._recv_packet(startup, deadline)
                    kind = data[:1]
                    if kind == P.REPLY:
                        if json_reply:
                            for fd in got:
                                os.close(fd)
                            return P.unpack_json(data[1:]) if len(data) > 1 else None
                        return (data[1:], got) if got else data[1:]
                    for fd in got:
                        os.close(fd)
                    if kind == P.ERROR:
                        raise self._error(data, startup)
                    if kind == P.CALL:
                        self._answer_call(data[1:])
                    elif kind == P.EVENT:
                        self._handle_event(data[1:])
                    else:
                        raise P.ProtocolError(f"unexpected message {kind!r}")
            except (DeviceDied, P.ProtocolError, ValueError) as e:
                if startup and not isinstance(e, RequestTimeout):
                    raise
                # A hung or lying child is killed at once; a closed socket means the
                # child is already on its way out.
                alive = isinstance(e, (RequestTimeout, P.ProtocolError, ValueError))
                self._died(str(e), kill=alive)
                raise DeviceDied(self._death_reason or str(e)) from None

    def _op(self, req: dict, fds: Sequence[int] = ()) -> Any:
        return self._request(P.pack_json(P.OP, req), fds, json_reply=True)

    def _answer_call(self, payload: bytes) -> None:
        try:
            self._apply_route(P.unpack_json(payload))
            answer: dict = {"ok": True}
        except (P.ProtocolError, VmmError, ValueError, TypeError) as e:
            answer = {"error": str(e)[:200]}
        try:
            self._send(P.pack_json(P.RESULT, answer))
        except RequestTimeout:
            raise
        except OSError as e:
            raise DeviceDied(f"device {self._label}: {e}") from None

    def _handle_event(self, payload: bytes) -> None:
        try:
            event = P.unpack_json(payload)
            if isinstance(event, dict) and event.get("op") == "seccomp_violation":
                self._violation = _check_int(event.get("nr"), 0, 1 << 20)
                return
            self._apply_route(event)
        except (P.ProtocolError, VmmError, ValueError, TypeError) as e:
            log.warning("device %s: refused event: %s", self._label, e)

    def _apply_route(self, req: object) -> None:
        if not isinstance(req, dict):
            raise P.ProtocolError("bad call")
        gsi = _check_int(req.get("gsi"), 0, 1 << 20)
        if gsi not in self._gsis or self._router is None:
            raise P.ProtocolError(f"GSI {gsi} is not one of this device's MSI-X GSIs")
        if req.get("op") == "set_msi_route":
            self._router.set_msi_route(gsi, _check_int(req.get("address")),
                                       _check_int(req.get("data"), 0, 0xFFFF_FFFF))
        elif req.get("op") == "remove_route":
            self._router.remove_route(gsi)
        else:
            raise P.ProtocolError(f"unknown call {req.get('op')!r}")

    def drain_events(self) -> None:
        """Apply EVENTs the child sent while no request was running (supervisor thread)."""
        if not self._lock.acquire(timeout=0.05):
            return
        try:
            for _ in range(64):           # bounded: a flooding child cannot starve requests
                if self._dead:
                    return
                r, _, _ = select.select([self.sock], [], [], 0)
                if not r:
                    return
                try:
                    data, fds = P.recv(self.sock)
                except OSError:
                    data, fds = b"", []
                for fd in fds:
                    os.close(fd)
                if not data:
                    self._died(f"device {self._label} closed its socket")
                    return
                if data[:1] != P.EVENT:       # only EVENTs may come unasked: a lying child
                    self._died(f"device {self._label}: unexpected message {data[:1]!r} "
                               "outside a request", kill=True)
                    return
                self._handle_event(data[1:])
        finally:
            self._lock.release()

    # -- death ----------------------------------------------------------------------------

    @property
    def dead(self) -> bool:
        return self._dead

    @property
    def death_reason(self) -> str | None:
        return self._death_reason

    def _died(self, why: str, kill: bool = False) -> None:
        """Mark the device dead, reap the child (killing it first if kill), report once."""
        with self._death_lock:
            if self._dead:
                return
            self._dead = True
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            status = self._reap(wait=2.0)
            if self._violation is None:
                self._read_leftover_events()
            reason = describe_death(self._label, status, self.device_pid, why,
                                    self._violation)
            self._death_reason = reason
        if self._shutting_down:
            log.info("%s", reason)
            return
        log.error("%s", reason)
        if self._on_death is not None:
            try:
                self._on_death(reason)
            except Exception:
                log.exception("device %s: death report failed", self._label)

    def _read_leftover_events(self) -> None:
        """After death: the keeper's seccomp_violation EVENT may still be queued."""
        with contextlib.suppress(OSError, ValueError, P.ProtocolError):
            while select.select([self.sock], [], [], 0)[0]:
                data, fds = P.recv(self.sock)
                for fd in fds:
                    os.close(fd)
                if not data:
                    return
                if data[:1] == P.EVENT:
                    self._handle_event(data[1:])

    def _reap(self, wait: float) -> int | None:
        if self._reaped_status is not None:
            return self._reaped_status
        deadline = time.monotonic() + wait
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                self._reaped_status = status
                return status
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                try:
                    _, status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    return None
                self._reaped_status = status
                return status
            time.sleep(0.005)

    def _kill_and_reap(self) -> None:
        if self._reaped_status is not None:     # reaped: the pid may be another's now
            self._dead = True
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(self.pid, 0)
            self._reaped_status = status
        self._dead = True

    def check_exited(self) -> bool:
        """Called when the child's pidfd is readable: report its death. True if dead."""
        if self._dead:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, None
        if not pid:
            return False
        if status is not None:
            self._reaped_status = status
        self._died(f"device {self._label} exited")
        return True

    # -- PciDevice: configuration space -------------------------------------------------

    def debug_label(self) -> str:
        return self._label

    def config_register_read(self, reg_idx: int) -> int:
        try:
            data = self._request(P.CFG_READ + P.CFG_REG.pack(reg_idx & 0xFFFF))
        except DeviceDied:
            return 0xFFFF_FFFF
        except DeviceRequestError as e:
            log.warning("%s", e)
            return 0xFFFF_FFFF
        if not isinstance(data, bytes) or len(data) != 4:
            return 0xFFFF_FFFF
        return P.U32.unpack(data)[0]

    def config_register_write(self, reg_idx: int, offset: int, data: bytes) -> ConfigWriteResult:
        msg = P.CFG_WRITE + P.CFG_WRITE_HDR.pack(reg_idx & 0xFFFF, offset & 0xFF) + bytes(data)
        try:
            answer = self._request(msg, json_reply=True)
            return ConfigWriteResult(removed=[_bar_range(r) for r in answer["removed"]],
                                     added=[self._checked_range(r) for r in answer["added"]])
        except DeviceDied:
            return ConfigWriteResult()
        except (DeviceRequestError, P.ProtocolError, KeyError, TypeError, ValueError) as e:
            log.warning("device %s: configuration write: %s", self._label, e)
            return ConfigWriteResult()

    def _checked_range(self, item: object) -> BarRange:
        r = _bar_range(item)
        declared = self._declared.get(r.bar) if hasattr(self, "_declared") else None
        if declared is not None and (declared[0] != r.size or declared[1] is not r.kind):
            raise P.ProtocolError(f"BAR{r.bar} range {r} does not match its declaration")
        return r

    def read_config_register(self, reg_idx: int) -> int:
        return self.config_register_read(reg_idx)

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        self.config_register_write(reg_idx, offset, data)

    def bar_ranges(self) -> list[BarRange]:
        try:
            return [self._checked_range(r) for r in self._op({"op": "bar_ranges"})]
        except (DeviceDied, DeviceRequestError, P.ProtocolError, TypeError, ValueError):
            return []

    # -- PciDevice: BARs ------------------------------------------------------------------

    def allocate_io_bars(self, allocator: SystemAllocator) -> list[BarRange]:
        """Place the child's BARs with the same rules as ConfiguredPciDevice, here."""
        bars = self._op({"op": "bars"})
        shadow = PciConfiguration(vendor_id=0, device_id=0, class_code=0, subclass=0)
        self._declared: dict[int, tuple[int, BarKind]] = {}
        for index, size, kind, prefetchable in bars:
            bar = shadow.add_bar(_check_int(index, 0, 5), _check_int(size, 1),
                                 BarKind(kind), bool(prefetchable))
            self._declared[bar.index] = (bar.size, bar.kind)
        ranges = ConfiguredPciDevice(shadow, self._label).allocate_io_bars(allocator)
        try:
            self._op({"op": "set_bar_addresses", "bars": [[r.bar, r.base] for r in ranges]})
        except BaseException:
            for r in ranges:
                pool = allocator.io if r.is_io else (
                    allocator.high_mmio if r.base >= allocator.high_mmio.base
                    else allocator.low_mmio)
                with contextlib.suppress(Exception):
                    pool.release(r.base)
            raise
        return ranges

    def _needs_sync(self, bar: int, offset: int, size: int) -> bool:
        return any(b == bar and offset < o + s and o < offset + size
                   for b, o, s in self._sync_ranges)

    def read_bar(self, bar: int, offset: int, size: int) -> bytes:
        if self._dead or size <= 0 or size > 4096:
            return b"\xff" * max(size, 0)
        try:
            data = self._request(P.READ_BAR + P.BAR_ACCESS.pack(bar & 0xFF, offset, size))
        except DeviceDied:
            return b"\xff" * size
        except DeviceRequestError as e:
            log.warning("%s", e)
            return b"\xff" * size
        if not isinstance(data, bytes) or len(data) != size:
            return b"\xff" * size
        return data

    def write_bar(self, bar: int, offset: int, data: bytes) -> None:
        if self._dead or not data or len(data) > 4096:
            return
        sync = self._needs_sync(bar, offset, len(data))
        msg = (P.WRITE_SYNC if sync else P.WRITE_BAR) + P.BAR_WRITE.pack(bar & 0xFF, offset)
        try:
            self._request(msg + bytes(data), reply=sync)
        except DeviceDied:
            pass
        except DeviceRequestError as e:
            log.warning("%s", e)

    def ioevents(self) -> list[IoEventSpec]:
        if self._ioevents is None:
            answer = self._request(P.pack_json(P.OP, {"op": "ioevents"}))
            payload, fds = answer if isinstance(answer, tuple) else (answer, [])
            specs = P.unpack_json(payload) if payload else []
            if not isinstance(specs, list) or len(specs) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise P.ProtocolError(f"device {self._label}: ioevents without their fds")
            result = []
            for (bar, offset, length, datamatch), fd in zip(specs, fds, strict=True):
                evt = EventFd(fd)
                self._owned.append(evt)
                result.append(IoEventSpec(_check_int(bar, 0, 5), _check_int(offset),
                                          evt, _check_int(length, 0, 8),
                                          None if datamatch is None else _check_int(datamatch)))
            self._ioevents = result
        return list(self._ioevents)

    # -- PciDevice: interrupts ---------------------------------------------------------

    def assign_irq(self, intx: PciIntx) -> bool:
        return bool(self._op({"op": "assign_irq", "gsi": intx.gsi, "pin": intx.pin},
                             [intx.irq_evt.fileno(), intx.resample_evt.fileno()]))

    def msix_vectors(self) -> int:
        return self._msix_vectors

    def assign_msix(self, router: IrqRouter, vectors: list[tuple[int, EventFd]]) -> None:
        self._router = router
        self._gsis = {gsi for gsi, _ in vectors}
        self._op({"op": "assign_msix", "gsis": [gsi for gsi, _ in vectors]},
                 [evt.fileno() for _, evt in vectors])

    # -- device control (vmmcore.control_socket's contract) ---------------------------------

    @property
    def control(self) -> Callable[[str, dict], dict | None] | None:
        """The device model's control(command, args), run in the device process; None
        when the model has none (so the control socket says it supports nothing)."""
        return self._control if self._has_control else None

    @property
    def control_commands(self) -> tuple[str, ...] | None:
        return self._control_commands

    def _control(self, command: str, args: dict) -> dict | None:
        try:
            answer = self._op({"op": "control", "command": command,
                               "args": P.encode_value(args)})
        except DeviceRequestError as e:
            # The child's "Type: message"; the control socket reports ValueErrors cleanly.
            raise ValueError(str(e).split(": ", 1)[-1]) from None
        try:
            result = P.decode_value(answer)
        except (P.ProtocolError, ValueError) as e:
            raise ValueError(f"unreadable answer: {e}") from None
        if result is not None and not isinstance(result, dict):
            raise ValueError(f"the device answered {type(result).__name__}, not a dict")
        return result

    # -- state, as `vmm status` reads it (vmmcore.control_socket.device_state) -------------

    def _state(self) -> dict:
        if self._dead:
            return {"needs_reset": True, "reason": self._death_reason or "dead"}
        try:
            state = self._op({"op": "state"})
        except (DeviceDied, DeviceRequestError):
            return {"needs_reset": True, "reason": self._death_reason or "no answer"}
        return state if isinstance(state, dict) else {}

    @property
    def interrupt(self) -> Any:
        """needs_reset/needs_reset_reason of the model's interrupt (a dead device needs
        reset, with its death as the reason)."""
        from types import SimpleNamespace

        state = self._state()
        return SimpleNamespace(needs_reset=bool(state.get("needs_reset")),
                               needs_reset_reason=str(state.get("reason") or ""))

    @property
    def active(self) -> bool:
        value = self._state().get("active")
        if value is None:
            raise AttributeError("active")      # not a virtio transport: hasattr() False
        return bool(value)

    @property
    def status(self) -> int:
        value = self._state().get("status")
        if not isinstance(value, int) or isinstance(value, bool):
            raise AttributeError("status")
        return value

    # -- lifecycle -------------------------------------------------------------------------

    def ping(self) -> dict:
        return self._op({"op": "ping"})

    def destroy(self, timeout: float = 5.0) -> None:
        """Ask the child to stop (device.destroy() there), wait, then kill if needed."""
        self._shutting_down = True
        if not self._dead:
            # Bounded: a caller wedged on this device must not keep the VMM from exiting
            # (_reap kills the child when it does not go by itself).
            if self._lock.acquire(timeout=timeout):
                try:
                    with contextlib.suppress(OSError):
                        P.send(self.sock, P.SHUTDOWN, (), socket.MSG_DONTWAIT)
                finally:
                    self._lock.release()
            with self._death_lock:
                self._dead = True
                self._death_reason = f"device {self._label} shut down"
                self._reap(wait=timeout)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
        for evt in self._owned:
            evt.close()
        self._owned.clear()

    def keep_fds(self) -> list[int]:
        return []


def _forget_parent_memory(mem: GuestMemory) -> None:
    """In the keeper: unmap the main process's guest-memory mapping inherited by fork
    (the device process maps the memfd it is sent); before fds are closed and reused."""
    mem._view.release()      # noqa: SLF001 (views handed out keep it mapped: fine)
    mem._mmap.close()        # noqa: SLF001


# -- reporting ------------------------------------------------------------------------

def audit_syscall(pid: int | None, attempts: int = 20) -> int | None:
    """The syscall number in the kernel's seccomp audit record for pid, if readable."""
    if pid is None:
        return None
    needle = f" pid={pid} "
    for _ in range(attempts):
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        found = None
        try:
            while True:
                try:
                    rec = os.read(fd, 8192).decode(errors="replace")
                except BlockingIOError:
                    break
                except OSError:          # EPIPE: overwritten records; keep reading
                    continue
                if "type=1326" in rec and needle in rec and " syscall=" in rec:
                    with contextlib.suppress(ValueError, IndexError):
                        found = int(rec.split(" syscall=", 1)[1].split()[0])
        finally:
            os.close(fd)
        if found is not None:
            return found
        time.sleep(0.01)
    return None


def describe_death(label: str, status: int | None, device_pid: int | None, why: str,
                   violation: int | None = None) -> str:
    """One line: which device died, how, and for SIGSYS which system call.

    The call comes from the keeper's seccomp listener (violation), else from the
    kernel's audit record in /dev/kmsg.
    """
    if status is None:
        return f"device {label} died ({why})"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSYS:
            nr = violation if violation is not None else audit_syscall(device_pid)
            if nr is not None:
                return (f"device {label} was killed by seccomp: system call {nr} "
                        f"({syscall_name(nr)}) is not allowed by its policy")
            return (f"device {label} was killed by seccomp (SIGSYS): it made a system call "
                    "its policy does not allow; the kernel log did not name it (not "
                    "readable, or rate-limited: see dmesg for type=1326, or run with "
                    "--seccomp-log-failures)")
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"device {label} was killed by {name} ({why})"
    code = os.waitstatus_to_exitcode(status)
    return f"device {label} exited with status {code} ({why})"


class SandboxSupervisor:
    """Watches device processes; reports the first death to the VmEventSink.

    add() every ProxyDevice, then start() once all of them exist (start() runs a
    thread: no fork may follow it). A death is reported as
    VmEvent.ERROR, status 1, with describe_death()'s message; the VM then stops.
    """

    def __init__(self, events: Any = None) -> None:
        self.events = events
        self.proxies: list[ProxyDevice] = []
        self.deaths: list[str] = []
        self._stop = EventFd(nonblocking=True)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, proxy: ProxyDevice) -> ProxyDevice:
        proxy._on_death = self.report      # noqa: SLF001
        self.proxies.append(proxy)
        return proxy

    def report(self, message: str) -> None:
        with self._lock:
            self.deaths.append(message)
        if self.events is not None:
            from vmmcore.vm_events import VmEvent

            self.events.report(VmEvent.ERROR, 1, message)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sandbox-supervisor",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._stop.fileno(), select.POLLIN)
        by_fd: dict[int, tuple[str, ProxyDevice]] = {}
        for p in self.proxies:
            if p.pidfd is not None:
                by_fd[p.pidfd] = ("pid", p)
                poller.register(p.pidfd, select.POLLIN)
            by_fd[p.sock.fileno()] = ("sock", p)
            poller.register(p.sock.fileno(), select.POLLIN)
        while by_fd:
            for fd, _events in poller.poll(1000):
                if fd == self._stop.fileno():
                    return
                what, p = by_fd[fd]
                if what == "pid":
                    if p.check_exited():
                        with contextlib.suppress(KeyError):
                            poller.unregister(fd)
                        by_fd.pop(fd, None)
                else:
                    if p.dead:
                        with contextlib.suppress(KeyError):
                            poller.unregister(fd)
                        by_fd.pop(fd, None)
                    else:
                        p.drain_events()

    def stop(self) -> None:
        """Stop watching; from now on a device's death is not an error (the VM is going
        away). The devices themselves are destroyed by whoever owns them (PciRoot.close
        calls destroy() on each), after their ioeventfds were unregistered."""
        for p in self.proxies:
            p._shutting_down = True        # noqa: SLF001
        if self._thread is not None:
            self._stop.write(1)
            self._thread.join(5.0)
            if self._thread.is_alive():
                return                      # keep the fd it may still poll
            self._thread = None
        if self._stop.fd >= 0:
            self._stop.close()

    def shutdown(self) -> None:
        """stop(), then destroy every device (tests, or devices not on a PciRoot)."""
        self.stop()
        for p in self.proxies:
            p.destroy()
