"""The vCPU run loop: one thread per vCPU, KVM_RUN, and exit dispatch to the buses.

This is the hot path of every port-IO and MMIO access the guest makes, so it reads
struct kvm_run straight from the mmap'd page with precompiled struct formats and keeps
the per-exit work to a dict-free bus lookup. Any end of the VM (power-off, reset, triple
fault, KVM error, a device raising) is reported once to the VmEventSink, which kicks
every other vCPU out of KVM_RUN with immediate_exit plus a signal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import struct
import threading

from vmmcore.bus import Bus
from vmmcore.kvm.sys import lib
from vmmcore.kvm.vcpu import Vcpu
from vmmcore.vm_events import VmEvent, VmEventSink

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN    # like crosvm: a realtime signal that only interrupts KVM_RUN

_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")         # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")       # phys_addr, data[8], len, is_write
_EXIT_NAMES = {
    value: name for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
    for value in [getattr(lib, name)]
}
_INTERNAL_ERRORS = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
}


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a handler (from the main thread) so it interrupts KVM_RUN.

    An ignored signal would not interrupt the ioctl and the default action would kill
    the process; a no-op handler makes KVM_RUN return EINTR and nothing else.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, _ignore_kick)
    elif signal.getsignal(KICK_SIGNAL) is not _ignore_kick:
        raise RuntimeError("install_kick_handler() must first run on the main thread")


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick signal's handler: its only job is to interrupt KVM_RUN."""


class VcpuRunLoop:
    """Runs one vCPU in its own thread until the VM ends."""

    def __init__(self, vcpu: Vcpu, io_bus: Bus, mmio_bus: Bus, events: VmEventSink) -> None:
        self.vcpu = vcpu
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.events = events
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{vcpu.id}",
                                       daemon=True)
        self.exits = 0
        self._warned: set[tuple[str, int]] = set()
        self._may_run = threading.Event()    # cleared by pause()
        self._may_run.set()
        self.parked = threading.Event()      # set while paused outside KVM_RUN

    def start(self) -> None:
        self.thread.start()

    def pause(self) -> None:
        """Take the vCPU out of the guest and hold it (suspend); see wait_parked()."""
        self._may_run.clear()
        self.kick()

    def resume(self) -> None:
        self._may_run.set()

    @property
    def paused(self) -> bool:
        return not self._may_run.is_set()

    def wait_parked(self, timeout: float) -> bool:
        """True once a paused vCPU is really out of KVM_RUN (or has ended)."""
        return self.parked.wait(timeout) or not self.thread.is_alive()

    def _park(self) -> None:
        """Wait, outside KVM_RUN, until resumed or the VM ends."""
        self.parked.set()
        try:
            while not self._may_run.wait(0.1):
                if self.events.is_set():
                    return
        finally:
            self.parked.clear()

    def kick(self) -> None:
        """Force the vCPU out of KVM_RUN; it then sees the VM has ended and returns."""
        self.vcpu.set_immediate_exit(True)
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(ident, KICK_SIGNAL)

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _thread_main(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a device or VMM bug: stop the VM cleanly, say where
            log.exception("vcpu%d: unexpected error", self.vcpu.id)
            self.events.report(VmEvent.ERROR, 1, f"vcpu{self.vcpu.id}: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        vcpu, run, events = self.vcpu, self.vcpu.run_view, self.events
        io_off, mmio_off = lib.VMM_RUN_IO_DIRECTION, lib.VMM_RUN_MMIO_PHYS_ADDR
        reason_off = lib.VMM_RUN_EXIT_REASON
        exit_io, exit_mmio = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO
        while not events.is_set():
            ret = vcpu.run()
            if ret < 0:
                if ret in (-errno.EINTR, -errno.EAGAIN):
                    vcpu.set_immediate_exit(False)
                    if not self._may_run.is_set():
                        self._park()
                    continue
                events.report(VmEvent.ERROR, 1,
                              f"vcpu{vcpu.id}: KVM_RUN failed: {os.strerror(-ret)}")
                return
            self.exits += 1
            reason = _U32.unpack_from(run, reason_off)[0]
            if reason == exit_io:
                self._handle_io(run, io_off)
            elif reason == exit_mmio:
                self._handle_mmio(run, mmio_off)
            elif not self._handle_other(reason):
                return

    def _handle_io(self, run: memoryview, io_off: int) -> None:
        direction, size, port, count, data_offset = _IO.unpack_from(run, io_off)
        end = data_offset + size * count
        if size not in (1, 2, 4) or end > len(run):
            raise RuntimeError(f"malformed IO exit: size {size} count {count}")
        bus = self.io_bus
        if direction == lib.KVM_EXIT_IO_OUT:
            for off in range(data_offset, end, size):
                if not bus.write(port, bytes(run[off:off + size])):
                    self._unhandled("io write", port)
        else:
            for off in range(data_offset, end, size):
                data = bus.read(port, size)
                if data is None:
                    self._unhandled("io read", port)
                    data = b"\xff" * size
                run[off:off + size] = data[:size].ljust(size, b"\xff")

    def _handle_mmio(self, run: memoryview, mmio_off: int) -> None:
        addr, data, length, is_write = _MMIO.unpack_from(run, mmio_off)
        if not 1 <= length <= 8:
            raise RuntimeError(f"malformed MMIO exit: length {length}")
        if is_write:
            if not self.mmio_bus.write(addr, data[:length]):
                self._unhandled("mmio write", addr)
        else:
            value = self.mmio_bus.read(addr, length)
            if value is None:
                self._unhandled("mmio read", addr)
                value = b"\xff" * length
            start = mmio_off + 8
            run[start:start + length] = value[:length].ljust(length, b"\xff")

    def _unhandled(self, kind: str, addr: int) -> None:
        """Unclaimed accesses read as all-ones and are ignored, logged once per address."""
        if (kind, addr) not in self._warned and len(self._warned) < 256:
            self._warned.add((kind, addr))
            log.debug("vcpu%d: unhandled %s at %#x", self.vcpu.id, kind, addr)

    def _handle_other(self, reason: int) -> bool:
        """Every exit but IO and MMIO; returns False when this vCPU must stop."""
        run, vid, events = self.vcpu.run_view, self.vcpu.id, self.events
        if reason in (lib.KVM_EXIT_INTR, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
            return True
        if reason == lib.KVM_EXIT_HLT:
            events.report(VmEvent.POWEROFF, 0, f"guest halted (vcpu{vid} executed HLT)")
        elif reason == lib.KVM_EXIT_SHUTDOWN:
            events.report(VmEvent.CRASH, 3,
                          f"guest triple-faulted on vcpu{vid} at rip {self.rip()}")
        elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = _U32.unpack_from(run, lib.VMM_RUN_SYSTEM_EVENT_TYPE)[0]
            if kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                events.report(VmEvent.POWEROFF, 0, "guest powered off")
            elif kind == lib.KVM_SYSTEM_EVENT_RESET:
                events.report(VmEvent.RESET, 0, "guest reset")
            else:
                events.report(VmEvent.CRASH, 3, f"guest crashed (system event {kind})")
        elif reason == lib.KVM_EXIT_FAIL_ENTRY:
            why = struct.unpack_from("<Q", run, lib.VMM_RUN_FAIL_ENTRY_REASON)[0]
            events.report(VmEvent.CRASH, 3,
                          f"vcpu{vid}: KVM could not enter the guest "
                          f"(hardware entry failure reason {why:#x})")
        elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
            sub = _U32.unpack_from(run, lib.VMM_RUN_INTERNAL_SUBERROR)[0]
            what = _INTERNAL_ERRORS.get(sub, f"suberror {sub}")
            events.report(VmEvent.CRASH, 3,
                          f"vcpu{vid}: KVM internal error: {what} at rip {self.rip()}")
        else:
            name = _EXIT_NAMES.get(reason, str(reason))
            events.report(VmEvent.ERROR, 1, f"vcpu{vid}: unexpected exit {name}")
        return False

    def rip(self) -> str:
        """The vCPU's instruction pointer, for messages (only while it is not running)."""
        try:
            return f"{self.vcpu.get_regs().rip:#x}"
        except Exception:
            return "unknown"
