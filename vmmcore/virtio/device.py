"""VirtioDevice (what a device plugin implements), VirtioInterrupt and the queue worker.

Modelled on crosvm's VirtioDevice trait. The transport (virtio-pci) owns feature
negotiation, queue set-up and device status; a device only says what it offers
(device_type, queue_max_sizes, features, config space) and, at DRIVER_OK, receives guest
memory, its queues, their kick eventfds and a VirtioInterrupt in activate().

Threads and processes: a device's queue handling runs in its own worker thread that
waits on the queue eventfds (KVM_IOEVENTFDs) and signals interrupts through Interrupt
objects, normally irqfd EventFds. Nothing on that path needs the main process, so the
same code runs inside a jailed device process that holds only eventfds and the memfd.

Errors: a hostile driver makes pop() raise VirtqueueError. The worker catches it (and
any other device exception), logs why, puts the device into DEVICE_NEEDS_RESET through
VirtioInterrupt.set_needs_reset() (the transport's hook sets the status bit; a
configuration-change interrupt tells the driver) and stops serving queues. It never
lets the exception take the process down.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol

from vmmcore.errors import GuestMemoryError
from vmmcore.eventfd import EventFd
from vmmcore.interrupts import Interrupt
from vmmcore.memory import GuestMemory
from vmmcore.virtio.queue import Queue, VirtqueueError
from vmmcore.virtio.status import ISR_CONFIG, ISR_QUEUE, VIRTIO_MSI_NO_VECTOR

log = logging.getLogger(__name__)


class MsixVectors(Protocol):
    """The transport's MSI-X table as the interrupt path needs it.

    The PCI MSI-X capability implementation (masking, pending bits) satisfies this; in a
    device process it can be as simple as EventFdMsix over irqfd-backed Interrupts.
    """

    @property
    def enabled(self) -> bool:
        """True when the guest has enabled MSI-X (and not function-masked it)."""

    def trigger(self, vector: int) -> None:
        """Deliver (or, if masked, mark pending) MSI-X table entry `vector`."""


class EventFdMsix:
    """MSI-X vectors as a list of Interrupts (irqfds), without masking support."""

    def __init__(self, vectors: Sequence[Interrupt], enabled: bool = True) -> None:
        self.vectors = list(vectors)
        self.enabled = enabled

    def trigger(self, vector: int) -> None:
        """Fire vector; a guest-chosen vector outside the table is ignored (and logged)."""
        if 0 <= vector < len(self.vectors):
            self.vectors[vector].trigger()
        else:
            log.debug("MSI-X vector %d outside the %d-entry table", vector, len(self.vectors))

    def direct_eventfd(self, vector: int) -> int | None:
        """The eventfd trigger(vector) writes, when it is an irqfd (IrqFdInterrupt)."""
        if not self.enabled or not 0 <= vector < len(self.vectors):
            return None
        evt = getattr(self.vectors[vector], "evt", None)
        return evt.fileno() if evt is not None else None

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Nothing here ever changes which fd a vector uses: no call is ever made."""

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """See add_listener."""


class VirtioInterrupt:
    """How a device signals the driver: used-buffer and config-change notifications.

    With MSI-X enabled, a queue notification goes to the queue's vector (none for
    VIRTIO_MSI_NO_VECTOR). Otherwise the ISR status bit is set and the INTx line raised;
    the transport's ISR read (read_isr) clears the bits and lowers the line. A config
    change always sets ISR bit 1 (virtio 1.2, 4.1.4.5.1), then uses config_vector or
    INTx the same way.
    """

    def __init__(self, intx: Interrupt | None = None, msix: MsixVectors | None = None,
                 on_needs_reset: Callable[[str], None] | None = None) -> None:
        self.intx = intx
        self.msix = msix
        self.on_needs_reset = on_needs_reset
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.needs_reset = False
        self.needs_reset_reason = ""
        #: INTx resample (fd, handler): KVM signals fd at EOI; the device worker polls it
        #: and calls handler, which re-asserts the line while the ISR is still pending.
        self.resample: tuple[int, Callable[[], None]] | None = None
        self._isr = 0
        self._lock = threading.Lock()

    def signal_used_queue(self, vector: int) -> None:
        """Tell the driver a queue using MSI-X `vector` has new used buffers."""
        self._signal(vector, ISR_QUEUE)

    def signal_config_changed(self) -> None:
        """Tell the driver the device configuration (or status) changed."""
        with self._lock:
            self._isr |= ISR_CONFIG
        self._signal(self.config_vector, ISR_CONFIG)

    def _signal(self, vector: int, isr_bit: int) -> None:
        if self.msix is not None and self.msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(vector)
            return
        with self._lock:
            self._isr |= isr_bit
        if self.intx is not None:
            self.intx.set_level(True)

    @property
    def isr_status(self) -> int:
        """The ISR status bits without clearing them."""
        return self._isr

    def read_isr(self) -> int:
        """The ISR register read: return the bits, clear them, lower INTx."""
        with self._lock:
            value, self._isr = self._isr, 0
        if value and self.intx is not None:
            self.intx.set_level(False)
        return value

    def queue_irqfd(self, vector: int) -> int | None:
        """The fd whose write is all signal_used_queue(vector) would do now, or None.

        With MSI-X enabled and the vector deliverable that is the vector's irqfd (a
        native data plane may write it without Python); with INTx, masking or no MSI-X
        support, None: call signal_used_queue. Ask again after each add_route_listener
        callback. Plugin API 1.2.
        """
        direct = getattr(self.msix, "direct_eventfd", None)
        if direct is None or vector == VIRTIO_MSI_NO_VECTOR:
            return None
        return direct(vector)

    def add_route_listener(self, callback: Callable[[], None]) -> None:
        """Call callback whenever queue_irqfd() answers may have changed (MSI-X enable,
        mask and table writes). It runs under the MSI-X lock: keep it short."""
        add = getattr(self.msix, "add_listener", None)
        if add is not None:
            add(callback)

    def remove_route_listener(self, callback: Callable[[], None]) -> None:
        remove = getattr(self.msix, "remove_listener", None)
        if remove is not None:
            remove(callback)

    def poll_fds(self) -> dict[int, Callable[[], None]]:
        """Fds the device's worker must also wait on for the interrupt path to work."""
        return dict([self.resample]) if self.resample is not None else {}

    def set_needs_reset(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET: call the transport's hook, then a config interrupt.

        Idempotent: only the first reason is kept and signalled.
        """
        with self._lock:
            if self.needs_reset:
                return
            self.needs_reset = True
            self.needs_reset_reason = reason
        if self.on_needs_reset is not None:
            self.on_needs_reset(reason)
        self.signal_config_changed()

    def reset(self) -> None:
        """Device reset: forget ISR bits, NEEDS_RESET and the config vector."""
        with self._lock:
            had_isr, self._isr = self._isr, 0
            self.needs_reset = False
            self.needs_reset_reason = ""
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        if had_isr and self.intx is not None:
            self.intx.set_level(False)


class VirtioWorker:
    """A thread that waits on queue eventfds (and a kill eventfd) and dispatches kicks.

    handle_queue(index) is called after the kick on queue_evts[index] is consumed. extra
    maps further fds (a backend socket, a timer) to callbacks run when they are readable.
    On VirtqueueError / GuestMemoryError, or any exception from the device, the worker
    logs the reason, calls interrupt.set_needs_reset(reason) and stops serving queues.
    """

    def __init__(self, name: str, queue_evts: Sequence[EventFd],
                 handle_queue: Callable[[int], None], interrupt: VirtioInterrupt,
                 extra: Mapping[int, Callable[[], None]] | None = None) -> None:
        self.name = name
        self.queue_evts = list(queue_evts)
        self.handle_queue = handle_queue
        self.interrupt = interrupt
        self.extra = dict(extra or {})
        self.kill_evt = EventFd()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"virtio-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to exit and wait; True if it did within timeout."""
        if self.kill_evt.fd >= 0:
            self.kill_evt.write(1)
        if self._thread.ident is not None:
            self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            self.kill_evt.close()
        else:
            log.error("virtio %s: worker did not stop within %.1fs", self.name, timeout)
        return stopped

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # the loop itself failed (bad fd...): contain it too
            self._fail(f"worker error: {e!r}", exc_info=True)

    def _loop(self) -> None:
        poller = select.poll()
        kill_fd = self.kill_evt.fileno()
        poller.register(kill_fd, select.POLLIN)
        queue_of = {}
        for index, evt in enumerate(self.queue_evts):
            queue_of[evt.fileno()] = index
            poller.register(evt.fileno(), select.POLLIN)
        for fd in self.extra:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == kill_fd:
                    return
                if events & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                    log.error("virtio %s: fd %d failed (poll events %#x); worker exits",
                              self.name, fd, events)
                    return
                if not self._dispatch(fd, queue_of):
                    return

    def _dispatch(self, fd: int, queue_of: dict[int, int]) -> bool:
        """Run the handler for one readable fd; False when the device is now broken."""
        try:
            if fd in queue_of:
                index = queue_of[fd]
                with contextlib.suppress(BlockingIOError):  # a nonblocking fd drained
                    self.queue_evts[index].read()
                self.handle_queue(index)
            else:
                self.extra[fd]()
        except (VirtqueueError, GuestMemoryError) as e:
            self._fail(f"malformed request from the driver: {e}", exc_info=False)
            return False
        except Exception as e:  # a device bug must not take the VMM down
            self._fail(f"device error: {e!r}", exc_info=True)
            return False
        return True

    def _fail(self, reason: str, exc_info: bool) -> None:
        self.error = reason
        log.warning("virtio %s: %s; device needs reset", self.name, reason, exc_info=exc_info)
        try:
            self.interrupt.set_needs_reset(reason)
        except Exception:
            log.exception("virtio %s: signalling NEEDS_RESET failed", self.name)


class VirtioDevice:
    """Base class of virtio device models (crosvm's VirtioDevice trait).

    A plugin sets device_type and queue_max_sizes, overrides features() and the config
    space, and implements handle_queue(index); the default activate() stores memory,
    queues and interrupt and starts a VirtioWorker that calls handle_queue on each kick.
    Devices with other needs override activate() and reset().
    """

    device_type: ClassVar[int]
    queue_max_sizes: ClassVar[tuple[int, ...]] = ()
    #: Device-specific feature bits (the transport adds VERSION_1 and the ring features).
    device_features: int = 0
    #: Bump (mod 256) whenever the config space changes, so the driver re-reads it.
    config_generation: int = 0

    def __init__(self) -> None:
        self.acked_features = 0
        self.config = bytearray()
        self.mem: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.queues: list[Queue] = []
        self.queue_evts: list[EventFd] = []
        self.worker: VirtioWorker | None = None

    @property
    def name(self) -> str:
        """Short name for logs and thread names."""
        return type(self).__name__

    # -- negotiation and configuration ------------------------------------------------

    def features(self) -> int:
        """The device-specific feature bits this device offers."""
        return self.device_features

    def ack_features(self, value: int) -> None:
        """Record the driver's accepted device bits; bits never offered are dropped."""
        unknown = value & ~self.features()
        if unknown:
            log.debug("virtio %s: driver acked unoffered bits %#x (ignored)", self.name, unknown)
        self.acked_features |= value & self.features()

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the config space; reads beyond it return 0s."""
        if offset < 0 or size <= 0:
            return b""
        data = bytes(self.config[offset:offset + size])
        if len(data) < size:
            log.debug("virtio %s: config read %#x+%d beyond %d bytes", self.name, offset,
                      size, len(self.config))
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Config space write. Default: config is read-only, the write is ignored."""
        log.debug("virtio %s: ignored config write %#x+%d", self.name, offset, len(data))

    # -- lifecycle -----------------------------------------------------------------------

    def activate(self, mem: GuestMemory, interrupt: VirtioInterrupt, queues: list[Queue],
                 queue_evts: list[EventFd]) -> None:
        """The driver set DRIVER_OK: start serving the queues (default: a worker)."""
        self.mem, self.interrupt = mem, interrupt
        self.queues, self.queue_evts = list(queues), list(queue_evts)
        self.start_worker()

    def start_worker(self, extra: Mapping[int, Callable[[], None]] | None = None) -> None:
        """Start a VirtioWorker calling self.handle_queue for this device's queues."""
        assert self.interrupt is not None, "activate() first"
        fds = {**self.interrupt.poll_fds(), **(extra or {})}
        self.worker = VirtioWorker(self.name, self.queue_evts, self.handle_queue,
                                   self.interrupt, fds)
        self.worker.start()

    def handle_queue(self, index: int) -> None:
        """Process queue `index` after a kick (runs in the worker thread)."""
        raise NotImplementedError(f"{self.name} does not handle queue {index}")

    def signal_used(self, index: int) -> bool:
        """Interrupt the driver for queue `index` if the ring's suppression allows."""
        assert self.mem is not None and self.interrupt is not None
        return self.queues[index].trigger_interrupt(self.mem, self.interrupt)

    def config_changed(self) -> None:
        """The device changed its config space: bump the generation, interrupt the driver."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.interrupt is not None:
            self.interrupt.signal_config_changed()

    def reset(self) -> bool:
        """The driver wrote 0 to device status: stop the worker, drop the queues.

        Returns True when the device can be activated again (crosvm's convention).
        """
        stopped = True
        if self.worker is not None:
            stopped = self.worker.stop()
            self.worker = None
        self.mem, self.interrupt = None, None
        self.queues, self.queue_evts = [], []
        self.acked_features = 0
        return stopped

    def keep_fds(self) -> list[int]:
        """File descriptors the sandbox must keep open in the device process."""
        return []

    def on_device_sandboxed(self) -> None:
        """Start what must start where the device runs, before the guest does (plugin
        API 1.5; crosvm's on_device_sandboxed): a backend that brings up threads or
        loads libraries (virtio-gpu's virglrenderer) does it here rather than on the
        guest's first request, so that what the jail lacks stops `vmm run` at start-up.

        Called once: sandboxed, in the device process after the jail closed (seccomp
        on, no file system but the plugin's binds) and before the device is placed;
        with --disable-sandbox, in the main process after every device exists (no fork
        follows). Raise to refuse to start: the message becomes one line naming the
        device (a ConfigError exits with status 2, anything else 1); a crash of the
        device process here is reported with its signal or forbidden system call.
        Default: nothing.
        """

    def shutdown(self) -> None:
        """The VM is going away: stop the worker."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
