"""The virtio block device (virtio 1.2, section 5.2) over a vmmcore.disk.DiskFile.

A request is a descriptor chain: a 16-byte device-readable header (type, reserved,
sector), then data (device-readable for OUT, device-writable for IN and GET_ID; 16-byte
segments for DISCARD and WRITE_ZEROES), then one device-writable status byte, the last
writable byte of the chain. Sectors are always 512 bytes, whatever blk_size says.

Two engines serve the queues, chosen by the `engine` option:

* native (the default where the disk format hands out a plain file, i.e. raw): the C
  data plane in _engine.c, set up by native.py. Its threads pop chains straight from
  guest memory and do preadv/pwritev into it without the GIL (see native.py).
* python (qcow2 and every other format, or engine=python): the VirtioWorker thread pops
  chains (under the queue's lock) and hands each to a thread pool, so up to
  `io_threads` requests are in the disk at once; each request (pyengine.execute), when
  done, writes its status byte and, under the same per-queue lock, adds its used
  element and signals the queue.

Both complete out of order (the spec allows it), answer the same statuses for the same
chains, and wait for requests in flight before reset and shutdown drop the queues.
A chain without any writable byte cannot be answered and is a protocol violation
(DEVICE_NEEDS_RESET), as is whatever the virtqueue itself refuses.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vmm_virtio_blk import native, pyengine
from vmm_virtio_blk.protocol import *  # noqa: F403 - re-exported: the tests and tools import from here
from vmm_virtio_blk.protocol import (
    CONFIG,
    DEFAULT_POLL_US,
    DEFAULT_QUEUE_SIZE,
    DISCARD_GRANULARITY,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SIZE_MAX,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    RequestError,
    default_id,
    feature_bits,
)
from vmmcore.disk import DiskFile
from vmmcore.errors import VmmError
from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.virtio import (
    DescriptorChain,
    DeviceType,
    Queue,
    VirtioDevice,
    VirtioInterrupt,
    VirtqueueError,
    Writer,
)

log = logging.getLogger(__name__)

#: The `engine` option's values.
ENGINES = ("auto", "native", "python")

class VirtioBlock(VirtioDevice):
    """virtio-blk (device type 2) over a DiskFile, served by the native or Python engine."""

    device_type = DeviceType.BLOCK

    def __init__(self, disk: DiskFile, *, read_only: bool | None = None,
                 block_size: int = SECTOR_SIZE, serial: bytes | str | None = None,
                 num_queues: int = 1, queue_size: int = DEFAULT_QUEUE_SIZE,
                 sparse: bool = True, io_threads: int = 32, label: str = "virtio_blk",
                 engine: str = "auto", poll_us: int = DEFAULT_POLL_US) -> None:
        super().__init__()
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size} is not a power of two >= 512")
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} out of range")
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue_size {queue_size} is not a power of two in 2..32768")
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
        if not 0 <= poll_us <= 1000:
            raise ValueError(f"poll_us={poll_us}: expected 0..1000")
        #: the native engine's queue threads poll the ring this long after a kick
        self.poll_us = poll_us
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        self.disk = disk
        self.read_only = disk.read_only if read_only is None else (read_only or disk.read_only)
        self.block_size = block_size
        if serial is None:
            serial = default_id(disk.path)
        if isinstance(serial, str):
            serial = serial.encode()
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"id {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.serial = serial
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.queue_max_sizes = (queue_size,) * num_queues
        self.io_threads = io_threads
        self._label = label
        caps = disk.capabilities()
        writable = not self.read_only
        self.can_discard = writable and sparse and caps.discard
        self.can_write_zeroes = writable and caps.write_zeroes
        self.may_unmap = self.can_write_zeroes and sparse and caps.discard
        # seg_max: data segments per request (the chain also holds header and status);
        # the raw format splits at IOV_MAX itself, so this only bounds the ring use.
        self.seg_max = max(1, queue_size - 2)
        self.device_features = self._features()
        self.capacity = disk.size >> SECTOR_SHIFT
        self.config = bytearray(CONFIG.size)
        self._build_config()
        self.engine = self._choose_engine(engine)
        self._native: native.NativeEngine | None = None
        self._qlocks: list[threading.Lock] = []
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        #: run a lone request in the worker thread itself (see handle_queue)
        self.inline_single = True
        #: FLUSH not negotiated: the device is write-through (flush after every write)
        self.writethrough = False
        self._failed = False

    def _choose_engine(self, wanted: str) -> str:
        """"native" where the disk is a plain file range and the C engine is built."""
        if wanted == "python":
            return "python"
        why_not = native.unavailable_reason(self.disk.file_extent())
        if why_not is None:
            return "native"
        if wanted == "native":
            raise ValueError(f"engine=native is not possible for {self.disk.path} "
                             f"({self.disk.format_name}): {why_not}")
        return "python"

    @property
    def name(self) -> str:
        return self._label

    # -- negotiation and config ---------------------------------------------------------

    def _features(self) -> int:
        return feature_bits(read_only=self.read_only, discard=self.can_discard,
                            write_zeroes=self.can_write_zeroes)

    def _build_config(self) -> None:
        granularity = max(self.block_size, DISCARD_GRANULARITY)
        CONFIG.pack_into(
            self.config, 0,
            self.capacity,
            SIZE_MAX,
            self.seg_max,
            0, 0, 0,                                   # geometry: not offered
            self.block_size,
            0,                                         # physical_block_exp
            0,                                         # alignment_offset
            1,                                         # min_io_size (logical blocks)
            0,                                         # opt_io_size: none
            0,                                         # writeback (CONFIG_WCE not offered)
            0,                                         # unused0
            self.num_queues,
            MAX_DISCARD_SECTORS if self.can_discard else 0,
            MAX_DISCARD_SEG if self.can_discard else 0,
            granularity >> SECTOR_SHIFT if self.can_discard else 0,
            MAX_WRITE_ZEROES_SECTORS if self.can_write_zeroes else 0,
            MAX_WRITE_ZEROES_SEG if self.can_write_zeroes else 0,
            1 if self.may_unmap else 0,
        )

    #: Commands `vmm disk resize` sends through the control socket (docs/control.md).
    control_commands = ("resize",)

    def control(self, command: str, args: dict) -> dict:
        """The control socket's `resize {"size": BYTES}`: grow (or shrink) the image,
        then tell the driver through a config-change interrupt."""
        if command != "resize":
            raise NotImplementedError(command)
        size = args.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"resize needs a positive size in bytes, not {size!r}")
        if size % SECTOR_SIZE:
            raise ValueError(f"size {size} is not a multiple of {SECTOR_SIZE} bytes")
        if self.disk.read_only:
            raise ValueError(f"{self.disk.path} is read-only")
        try:
            self.disk.resize(size)
        except VmmError as e:            # e.g. DiskUnsupported, naming the format
            raise ValueError(str(e)) from None
        self.set_capacity(size)
        return {"size": size, "sectors": self.capacity}

    def set_capacity(self, size_bytes: int) -> None:
        """The disk was resized: update capacity and tell the driver."""
        self.capacity = size_bytes >> SECTOR_SHIFT
        struct.pack_into("<Q", self.config, 0, self.capacity)
        if self._native is not None:
            self._native.set_capacity(self.capacity)
        self.config_changed()

    # -- lifecycle --------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, interrupt: VirtioInterrupt, queues: list[Queue],
                 queue_evts: list[EventFd]) -> None:
        self._failed = False
        # Without FLUSH negotiated the device must behave write-through.
        self.writethrough = not self.acked_features >> VIRTIO_BLK_F_FLUSH & 1
        if self.engine == "native":
            self.mem, self.interrupt = mem, interrupt
            self.queues, self.queue_evts = list(queues), list(queue_evts)
            extent = self.disk.file_extent()
            assert extent is not None         # _choose_engine checked it
            self._native = native.NativeEngine(self, extent)
            try:
                self._native.start(mem, interrupt, queues, queue_evts)
            except BaseException:
                self._stop_native()
                raise
            return
        self._qlocks = [threading.Lock() for _ in queues]
        self._pool = ThreadPoolExecutor(max_workers=self.io_threads,
                                        thread_name_prefix=f"{self._label}-io")
        super().activate(mem, interrupt, queues, queue_evts)

    def _drain(self) -> bool:
        """Wait for every request in flight, then drop the pool (or the native engine)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        return self._stop_native()

    def _stop_native(self) -> bool:
        engine, self._native = self._native, None
        return engine.stop() if engine is not None else True

    def engine_stats(self) -> dict[str, int]:
        """The native engine's counters while it runs ({} for the Python engine)."""
        engine = self._native
        return engine.stats() if engine is not None else {}

    def reset(self) -> bool:
        stopped = True
        if self.worker is not None:
            stopped = self.worker.stop()
            self.worker = None
        stopped = self._drain() and stopped
        return super().reset() and stopped

    def shutdown(self) -> None:
        super().shutdown()
        self._drain()
        try:
            self.disk.close()
        except Exception as e:  # closing must not take the VMM down
            log.warning("virtio %s: closing %s failed: %s", self._label, self.disk.path, e)

    def keep_fds(self) -> list[int]:
        return list(self.disk.fds())

    # -- the queue ---------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        """Pop every available chain and dispatch them (runs in the worker thread).

        A lone request while nothing else is in flight runs right here in the worker
        (no thread hand-off: the queue-depth-1 latency path); any batch goes to the pool,
        so every request of a deep queue is in the disk at once.
        """
        if self._failed or self._pool is None:
            return
        mem, q, lock = self.mem, self.queues[index], self._qlocks[index]
        assert mem is not None
        chains: list[DescriptorChain] = []
        try:
            while True:
                with lock:
                    chain = q.pop(mem)
                if chain is None:
                    break
                if chain.writable_len == 0:
                    raise VirtqueueError(
                        f"virtio-blk request {chain.head} has no device-writable status byte")
                chains.append(chain)
        finally:
            self._dispatch(index, chains)

    def _dispatch(self, index: int, chains: list[DescriptorChain]) -> None:
        if not chains or self._pool is None:
            return
        with self._inflight_lock:
            inline = len(chains) == 1 and self._inflight == 0 and self.inline_single
            self._inflight += len(chains)
        if inline:
            self._run(index, chains[0])
            return
        for chain in chains:
            self._pool.submit(self._run, index, chain)

    def _run(self, index: int, chain: DescriptorChain) -> None:
        try:
            self._serve(index, chain)
        finally:
            with self._inflight_lock:
                self._inflight -= 1

    def in_flight(self) -> int:
        """Requests dispatched and not yet completed."""
        if self._native is not None:
            return self._native.in_flight()
        with self._inflight_lock:
            return self._inflight

    def _serve(self, index: int, chain: DescriptorChain) -> None:
        """Run one request in a pool thread, write its status and complete it."""
        mem = self.mem
        if mem is None:
            return
        try:
            try:
                written = pyengine.execute(self, mem, chain)
                status = VIRTIO_BLK_S_OK
            except RequestError as e:
                status, written = e.status, 0
                log.debug("virtio %s: request %d: %s", self._label, chain.head, e)
            except Exception as e:  # a disk error: the guest sees IOERR, the VMM lives
                status, written = VIRTIO_BLK_S_IOERR, 0
                log.warning("virtio %s: request %d failed: %s", self._label, chain.head, e)
            status_writer = Writer(mem, chain).split_at(chain.writable_len - 1)
            status_writer.write_all(bytes((status,)))
            q, lock = self.queues[index], self._qlocks[index]
            with lock:
                q.add_used(mem, chain, written + 1)
                if self.interrupt is not None:
                    q.trigger_interrupt(mem, self.interrupt)
        except Exception as e:  # only a broken ring gets here
            self._fail(f"completing request {chain.head} failed: {e}")

    def _fail(self, reason: str) -> None:
        self._failed = True
        log.warning("virtio %s: %s; device needs reset", self._label, reason)
        if self.interrupt is not None:
            try:
                self.interrupt.set_needs_reset(reason)
            except Exception:
                log.exception("virtio %s: signalling NEEDS_RESET failed", self._label)

def create(options: dict[str, Any], ctx: Any = None) -> VirtioBlock:
    """The plugin factory: open the disk image and build the device.

    options are the validated `--device virtio_blk:...` options (every schema key
    present); ctx carries at least .name (the instance label) and .index.
    """
    from vmmcore.disk import open_disk

    if not isinstance(options, Mapping) and hasattr(options, "options"):
        options = options.options          # a DeviceConfig(name, options)
    path = Path(options["path"])
    ro = bool(options.get("ro", False))
    fmt = options.get("format") or "auto"
    disk = open_disk(path, None if fmt == "auto" else fmt, read_only=ro,
                     direct=bool(options.get("direct", False)))
    try:
        serial = options.get("id") or None
        label = getattr(ctx, "name", None) or "virtio_blk"
        return VirtioBlock(disk, read_only=ro,
                           block_size=int(options.get("block_size") or SECTOR_SIZE),
                           serial=serial if serial is not None else default_id(path),
                           num_queues=int(options.get("num_queues") or 1),
                           queue_size=int(options.get("queue_size") or DEFAULT_QUEUE_SIZE),
                           sparse=bool(options.get("sparse", True)),
                           io_threads=int(options.get("io_threads") or 32),
                           label=str(label), engine=str(options.get("engine") or "auto"),
                           poll_us=int(options.get("poll_us", DEFAULT_POLL_US)))
    except BaseException:
        disk.close()
        raise
