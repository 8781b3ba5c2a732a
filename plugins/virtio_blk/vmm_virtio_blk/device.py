"""The virtio block device (virtio 1.2, section 5.2) over a vmmcore.disk.DiskFile.

A request is a descriptor chain: a 16-byte device-readable header (type, reserved,
sector), then data (device-readable for OUT, device-writable for IN and GET_ID; 16-byte
segments for DISCARD and WRITE_ZEROES), then one device-writable status byte, the last
writable byte of the chain. Sectors are always 512 bytes, whatever blk_size says.

Concurrency: the VirtioWorker thread pops chains (under the queue's lock) and hands each
to a thread pool, so up to `io_threads` requests are in the disk at once; each request,
when done, writes its status byte and, under the same per-queue lock, adds its used
element and signals the queue. Completions therefore come back out of order, which the
spec allows. Reset and shutdown wait for requests in flight before the queues (and guest
memory) are dropped.

Errors: every guest-supplied number is checked. A request that has a writable status
byte always gets one (IOERR for bad headers, lengths, sectors past the end, writes to a
read-only disk, data in the wrong direction; UNSUPP for unknown types and flags); a
chain without any writable byte cannot be answered and is a protocol violation
(VirtqueueError -> DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vmmcore.disk import DiskFile
from vmmcore.errors import VmmError
from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.virtio import (
    DescriptorChain,
    DeviceType,
    Queue,
    Reader,
    VirtioDevice,
    VirtioInterrupt,
    VirtqueueError,
    Writer,
)

log = logging.getLogger(__name__)

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# Feature bits (virtio 1.2, 5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status values
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

REQ_HEADER = struct.Struct("<IIQ")          # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")             # sector, num_sectors, flags

#: struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes):
#: capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
#: topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
#: writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
#: discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
#: write_zeroes_may_unmap, unused1[3].
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert CONFIG.size == 60

DEFAULT_QUEUE_SIZE = 256
#: Largest single data segment the guest may use (SIZE_MAX).
SIZE_MAX = 1 << 20
#: DISCARD / WRITE_ZEROES limits: sectors per segment and segments per request.
MAX_DISCARD_SECTORS = (1 << 22) - 8           # just under 2 GiB, 4 KiB aligned
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = (1 << 22) - 8
MAX_WRITE_ZEROES_SEG = 32
#: Discard granularity reported to the guest, in bytes (host file-system blocks).
DISCARD_GRANULARITY = 4096


def default_id(path: str | os.PathLike[str]) -> bytes:
    """A stable 20-byte serial for a disk without id=: derived from its absolute path."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()
    return digest[:VIRTIO_BLK_ID_BYTES].encode()


class RequestError(Exception):
    """A request the device answers with a status other than OK (not a protocol error)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class VirtioBlock(VirtioDevice):
    """virtio-blk (device type 2) over a DiskFile, with a pool of I/O threads."""

    device_type = DeviceType.BLOCK

    def __init__(self, disk: DiskFile, *, read_only: bool | None = None,
                 block_size: int = SECTOR_SIZE, serial: bytes | str | None = None,
                 num_queues: int = 1, queue_size: int = DEFAULT_QUEUE_SIZE,
                 sparse: bool = True, io_threads: int = 32, label: str = "virtio_blk") -> None:
        super().__init__()
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size} is not a power of two >= 512")
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} out of range")
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue_size {queue_size} is not a power of two in 2..32768")
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
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
        self._qlocks: list[threading.Lock] = []
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        #: run a lone request in the worker thread itself (see handle_queue)
        self.inline_single = True
        self._writethrough = False
        self._failed = False

    @property
    def name(self) -> str:
        return self._label

    # -- negotiation and config ---------------------------------------------------------

    def _features(self) -> int:
        bits = [VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ]
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        if self.can_discard:
            bits.append(VIRTIO_BLK_F_DISCARD)
        if self.can_write_zeroes:
            bits.append(VIRTIO_BLK_F_WRITE_ZEROES)
        out = 0
        for b in bits:
            out |= 1 << b
        return out

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
        self.config_changed()

    # -- lifecycle --------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, interrupt: VirtioInterrupt, queues: list[Queue],
                 queue_evts: list[EventFd]) -> None:
        self._qlocks = [threading.Lock() for _ in queues]
        self._failed = False
        # Without FLUSH negotiated the device must behave write-through.
        self._writethrough = not self.acked_features >> VIRTIO_BLK_F_FLUSH & 1
        self._pool = ThreadPoolExecutor(max_workers=self.io_threads,
                                        thread_name_prefix=f"{self._label}-io")
        super().activate(mem, interrupt, queues, queue_evts)

    def _drain(self) -> None:
        """Wait for every request in flight, then drop the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def reset(self) -> bool:
        stopped = True
        if self.worker is not None:
            stopped = self.worker.stop()
            self.worker = None
        self._drain()
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
        with self._inflight_lock:
            return self._inflight

    def _serve(self, index: int, chain: DescriptorChain) -> None:
        """Run one request in a pool thread, write its status and complete it."""
        mem = self.mem
        if mem is None:
            return
        try:
            try:
                written = self.execute(mem, chain)
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

    # -- requests ------------------------------------------------------------------------------

    def execute(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """Carry out one request; return the data bytes written to the guest.

        Raises RequestError for a request answered with IOERR or UNSUPP. The chain has at
        least one writable byte (its status), checked by handle_queue.
        """
        if chain.readable_after_writable:
            raise RequestError(VIRTIO_BLK_S_IOERR,
                               "device-readable descriptor after a device-writable one")
        if chain.readable_len < REQ_HEADER.size:
            raise RequestError(VIRTIO_BLK_S_IOERR,
                               f"request header is {chain.readable_len} bytes, not 16")
        reader = Reader(mem, chain)
        rtype, _reserved, sector = reader.read_obj(REQ_HEADER)
        writer = Writer(mem, chain)
        writer.split_at(chain.writable_len - 1)       # writer now covers the data only
        in_len = writer.available_bytes()
        out_len = reader.available_bytes()

        if rtype == VIRTIO_BLK_T_IN:
            if out_len:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"read request with {out_len} bytes "
                                   "of device-readable data")
            offset = self._data_range(sector, in_len)
            views = writer.views(in_len)
            try:
                self.disk.read_into(offset, views)
            finally:
                _release(views)
            return in_len

        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            if in_len:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"write request with {in_len} bytes "
                                   "of device-writable data")
            offset = self._data_range(sector, out_len)
            views = reader.views(out_len)
            try:
                self.disk.write_from(offset, views)
            finally:
                _release(views)
            if self._writethrough:
                self.disk.flush()
            return 0

        if rtype == VIRTIO_BLK_T_FLUSH:
            self.disk.flush()
            return 0

        if rtype == VIRTIO_BLK_T_GET_ID:
            if in_len < VIRTIO_BLK_ID_BYTES:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"GET_ID buffer of {in_len} bytes, "
                                   f"needs {VIRTIO_BLK_ID_BYTES}")
            writer.write_all(self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
            return VIRTIO_BLK_ID_BYTES

        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            discard = rtype == VIRTIO_BLK_T_DISCARD
            supported = self.can_discard if discard else self.can_write_zeroes
            if self.read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes to a read-only disk")
            if not supported:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard/write-zeroes not offered")
            segments = self._segments(reader, out_len, discard)
            for offset, length, unmap in segments:
                if discard:
                    self.disk.discard(offset, length)
                else:
                    self.disk.write_zeroes(offset, length, may_unmap=unmap and self.may_unmap)
            if self._writethrough and not discard:
                self.disk.flush()
            return 0

        raise RequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")

    def _data_range(self, sector: int, length: int) -> int:
        """The byte offset of an IN/OUT request, after checking it lies on the disk."""
        if length % SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR,
                               f"data length {length} is not a multiple of 512")
        nsectors = length >> SECTOR_SHIFT
        if sector > self.capacity or nsectors > self.capacity - sector:
            raise RequestError(VIRTIO_BLK_S_IOERR,
                               f"sectors {sector}+{nsectors} are past the end of the "
                               f"{self.capacity}-sector disk")
        return sector << SECTOR_SHIFT

    def _segments(self, reader: Reader, out_len: int,
                  discard: bool) -> list[tuple[int, int, bool]]:
        """Parse and check every DISCARD/WRITE_ZEROES segment before doing any of them."""
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        what = "discard" if discard else "write-zeroes"
        if out_len == 0 or out_len % SEGMENT.size:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{what} payload of {out_len} bytes is "
                               "not a non-zero multiple of 16")
        count = out_len // SEGMENT.size
        if count > max_seg:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{what} with {count} segments "
                               f"(max {max_seg})")
        out = []
        for _ in range(count):
            sector, nsectors, flags = reader.read_obj(SEGMENT)
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, f"{what}: unknown flags {flags:#x}")
            unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            if discard and unmap:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard with the unmap flag")
            if nsectors > max_sectors:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"{what} of {nsectors} sectors "
                                   f"(max {max_sectors})")
            if sector > self.capacity or nsectors > self.capacity - sector:
                raise RequestError(VIRTIO_BLK_S_IOERR,
                                   f"{what} of sectors {sector}+{nsectors} past the end "
                                   f"of the {self.capacity}-sector disk")
            out.append((sector << SECTOR_SHIFT, nsectors << SECTOR_SHIFT, unmap))
        return out


def _release(views: Sequence[memoryview]) -> None:
    for v in views:
        v.release()


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
                           label=str(label))
    except BaseException:
        disk.close()
        raise
