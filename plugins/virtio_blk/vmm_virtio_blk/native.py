"""The native engine's Python side: set up _engine.c for a VirtioBlock and serve its calls.

With the native engine the hot path (kick -> pop -> preadv/pwritev -> used ring -> irqfd)
runs in C threads without the GIL. Python keeps what needs Python:

* interrupts that are not a plain irqfd write (INTx, a masked MSI-X vector, MSI-X off):
  the engine writes the queue's "call" eventfd and a VirtioWorker thread here calls
  VirtioInterrupt.signal_used_queue(vector). Which fd the engine writes is recomputed on
  every MSI-X change (VirtioInterrupt.add_route_listener), under the MSI-X lock.
* failures: a protocol violation puts the device into NEEDS_RESET (the engine's reason,
  the same wording as vmmcore.virtio.queue), disk errors are logged; both arrive
  through the engine's event eventfd.
* configuration: capacity changes (resize) are passed on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmm_virtio_blk.protocol import VIRTIO_BLK_ID_BYTES
from vmmcore.disk import FileExtent
from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.virtio import Queue, VirtioInterrupt, VirtioWorker

if TYPE_CHECKING:
    from vmm_virtio_blk.device import VirtioBlock

log = logging.getLogger(__name__)

_MSG_BYTES = 256

try:
    from vmm_virtio_blk._engine_cffi import ffi, lib
    IMPORT_ERROR: str | None = None
except ImportError as _e:  # not built (a source tree without `pip install`)
    ffi = lib = None
    IMPORT_ERROR = str(_e)


def unavailable_reason(disk_extent: FileExtent | None) -> str | None:
    """Why the native engine cannot serve this disk, or None when it can."""
    if IMPORT_ERROR is not None:
        return f"the native engine is not built ({IMPORT_ERROR})"
    if disk_extent is None:
        return "the disk format does not map the disk onto one file (no file_extent)"
    return None


class NativeEngine:
    """One activation of the C engine: created in activate(), stopped in reset()."""

    def __init__(self, dev: VirtioBlock, extent: FileExtent) -> None:
        if lib is None:
            raise RuntimeError(unavailable_reason(extent))
        self.dev = dev
        self.extent = extent
        self._engine: Any = None
        #: held by calls into the engine from other threads (resize, stats) and by
        #: stop() while it takes the engine away, so none of them uses a freed engine
        self._engine_lock = threading.Lock()
        #: the engine the MSI-X route listener keeps up to date; unlike _engine it stays
        #: set while stop() waits for requests in flight, whose completions still choose
        #: between irqfd and call eventfd, and goes only with the listener
        self._routed: Any = None
        self._worker: VirtioWorker | None = None
        self._event = EventFd(nonblocking=True)
        self._calls: list[EventFd] = []
        self._queues: list[Queue] = []
        self._interrupt: VirtioInterrupt | None = None
        self._failure_reported = False

    # -- start ---------------------------------------------------------------------

    def start(self, mem: GuestMemory, interrupt: VirtioInterrupt, queues: Sequence[Queue],
              queue_evts: Sequence[EventFd]) -> None:
        """Build the engine over guest memory and the queues, start its threads, then
        the Python helper thread (call eventfds, engine events, INTx resample)."""
        self._interrupt, self._queues = interrupt, list(queues)
        self._calls = [EventFd(nonblocking=True) for _ in queues]
        regions = ffi.new("struct blk_region[]", len(mem.regions))
        for r, region in zip(regions, mem.regions, strict=True):
            r.gpa, r.size, r.host = region.guest_addr, region.size, mem.host_address(region)
        engine = lib.blk_engine_new(self._config(), regions, len(mem.regions),
                                    len(queues), self.dev.capacity)
        if engine == ffi.NULL:
            raise MemoryError("the native virtio-blk engine could not be created")
        with self._engine_lock:
            self._engine = engine
        for i, (q, evt) in enumerate(zip(queues, queue_evts, strict=True)):
            if q.ready:
                self._set_queue(i, q, evt)
        err = lib.blk_engine_start(engine)
        if err:
            raise OSError(-err, f"starting the native engine's threads failed (errno {-err})")
        self._routed = engine
        interrupt.add_route_listener(self._routes_changed)
        self._routes_changed()
        extra = {self._event.fileno(): self._on_event, **interrupt.poll_fds()}
        self._worker = VirtioWorker(f"{self.dev.name}-native", self._calls, self._signal,
                                    interrupt, extra)
        self._worker.start()

    def _config(self) -> Any:
        dev, ext = self.dev, self.extent
        cfg = ffi.new("struct blk_config *")
        cfg.fd, cfg.direct_fd, cfg.file_offset = ext.fd, ext.direct_fd, ext.offset
        cfg.direct_align = 512
        cfg.read_only = dev.read_only
        cfg.writethrough = dev.writethrough
        cfg.flush_syncs = not dev.disk.read_only
        cfg.can_discard, cfg.can_write_zeroes = dev.can_discard, dev.can_write_zeroes
        cfg.may_unmap, cfg.block_device = dev.may_unmap, ext.block_device
        cfg.serial = dev.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        cfg.io_threads = dev.io_threads
        cfg.poll_us = dev.poll_us
        cfg.event_fd = self._event.fileno()
        return cfg

    def _set_queue(self, index: int, q: Queue, kick: EventFd) -> None:
        c = ffi.new("struct blk_queue_config *")
        c.size, c.desc, c.avail, c.used = q.size, q.desc_table, q.avail_ring, q.used_ring
        c.event_idx, c.indirect = q.event_idx, q.indirect
        c.next_avail, c.next_used = q.next_avail, q.next_used
        c.kick_fd, c.call_fd, c.irq_fd = kick.fileno(), self._calls[index].fileno(), -1
        err = lib.blk_engine_set_queue(self._engine, index, c)
        if err:   # prepare_queues validated these rings: this is a bug, not the guest
            raise ValueError(f"queue {index}: the native engine refused its rings ({err})")

    # -- interrupts and events --------------------------------------------------------------

    def _routes_changed(self) -> None:
        """MSI-X changed: let the engine write each queue's irqfd itself where it may."""
        interrupt, engine = self._interrupt, self._routed
        if interrupt is None or engine is None:
            return
        for i, q in enumerate(self._queues):
            fd = interrupt.queue_irqfd(q.vector)
            lib.blk_engine_set_irq_fd(engine, i, -1 if fd is None else fd)

    def _signal(self, index: int) -> None:
        """The engine asked Python to signal queue `index` (INTx, masked vector...)."""
        if self._interrupt is not None:
            self._interrupt.signal_used_queue(self._queues[index].vector)

    def _on_event(self, engine: Any = None, stopping: bool = False) -> None:
        """The engine failed (NEEDS_RESET, once) or met disk errors (logged). While
        stopping (reset, shutdown) a failure is only logged: the device is going away."""
        self._event.try_read()
        engine = self._engine if engine is None else engine
        if engine is None:
            return
        reason = ffi.new("char[]", _MSG_BYTES)
        last_error = ffi.new("char[]", _MSG_BYTES)
        errors = ffi.new("uint32_t *")
        failed = lib.blk_engine_messages(engine, reason, last_error, _MSG_BYTES, errors)
        error = ffi.string(last_error).decode(errors="replace")
        if errors[0]:
            more = f" (and {errors[0] - 1} more disk errors)" if errors[0] > 1 else ""
            log.warning("virtio %s: request failed: %s%s", self.dev.name, error, more)
        if failed and not self._failure_reported:
            self._failure_reported = True
            why = "malformed request from the driver: " + ffi.string(reason).decode(
                errors="replace")
            if stopping:
                log.warning("virtio %s: %s (while stopping)", self.dev.name, why)
            else:
                self.dev._fail(why)

    # -- state ----------------------------------------------------------------------------

    def set_capacity(self, sectors: int) -> None:
        with self._engine_lock:
            if self._engine is not None:
                lib.blk_engine_set_capacity(self._engine, sectors)

    def stats(self) -> dict[str, int]:
        """The engine's counters (requests, flushes, peak_in_disk, ...)."""
        s = ffi.new("struct blk_stats *")
        with self._engine_lock:
            if self._engine is None:
                return {}
            lib.blk_engine_stats(self._engine, s)
        return {name: getattr(s, name) for name, _ in ffi.typeof("struct blk_stats").fields}

    def in_flight(self) -> int:
        return self.stats().get("inflight", 0)

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> bool:
        """Stop the engine (waiting for requests in flight), deliver what it signalled,
        write the ring cursors back into the Queues, and free everything."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        stopped = True
        if engine is not None:
            lib.blk_engine_stop(engine)              # releases the GIL while it waits
        self._stop_routing()
        if engine is not None:
            self._sync_queues(engine)
            self._on_event(engine, stopping=True)    # its last messages
        if self._worker is not None:
            stopped = self._worker.stop()
            self._worker = None
        for i, evt in enumerate(self._calls):
            if evt.try_read():
                self._signal(i)
            evt.close()
        self._calls = []
        self._event.close()
        if engine is not None:
            lib.blk_engine_free(engine)
        return stopped

    def _stop_routing(self) -> None:
        """Remove the MSI-X listener, only once the engine completes nothing more: until
        then a mask must still reach the engine, or a completion would write the irqfd
        after the guest's mask write returned (and the route may be rewritten)."""
        if self._interrupt is not None:
            self._interrupt.remove_route_listener(self._routes_changed)
        self._routed = None

    def _sync_queues(self, engine: Any) -> None:
        avail, used = ffi.new("uint16_t *"), ffi.new("uint16_t *")
        for i, q in enumerate(self._queues):
            if q.ready:
                lib.blk_engine_queue_state(engine, i, avail, used)
                q.restore_indices(avail[0], used[0])
