"""The virtio-balloon device model (virtio 1.2, section 5.5; Linux's virtio_balloon.h).

Queues: 0 inflateq, 1 deflateq, 2 statsq (only with VIRTIO_BALLOON_F_STATS_VQ).
Config space (little endian): num_pages (u32, the host's target, in 4 KiB pages) and
actual (u32, written by the driver: how many pages the balloon holds).

- `vmm balloon PATH SIZE` reaches control("set_size", {"size": SIZE}): num_pages =
  SIZE // 4096 and a configuration-change interrupt; the guest driver then inflates
  (gives pages) or deflates (takes them back) until actual == num_pages.
- An inflate buffer is an array of u32 page frame numbers (PFN << 12 is the guest
  address). With discard=true the pages' backing in the guest-RAM memfd is released
  (fallocate PUNCH_HOLE), so the host gets the memory back; the guest reading such a
  page later sees zeroes. PFNs outside guest RAM are counted and skipped (the guest is
  hostile); at most MAX_PFNS_PER_BUFFER entries of one buffer are looked at.
- A deflate buffer needs no action: a punched page comes back on the next touch.
- The stats queue: the driver posts one buffer of (u16 tag, u64 value) entries; the
  device keeps it and returns it (used, length 0) when it wants fresh numbers, which
  the driver answers with a new buffer. control("stats") asks for fresh numbers, waits
  up to STATS_WAIT seconds for them and answers the latest it has.

control() (the vmm device-control contract, docs/control.md): "set_size" {"size"},
"stats" {}, "query" {}.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

from vmmcore.virtio import DeviceType, VirtioDevice
from vmmcore.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2

PFN_SHIFT = 12
PAGE_SIZE = 1 << PFN_SHIFT
INFLATE_Q, DEFLATE_Q, STATS_Q = 0, 1, 2
#: Linux sends at most 256 PFNs per buffer; we look at no more than this many.
MAX_PFNS_PER_BUFFER = 4096
STAT = struct.Struct("<HQ")
MAX_STATS = 64
STATS_WAIT = 1.0

#: Statistic tags (VIRTIO_BALLOON_S_*) and their names in answers.
STAT_NAMES = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
    4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
    8: "hugetlb_allocations", 9: "hugetlb_failures",
}

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Release [offset, offset+length) of a shmem/memfd file back to the host."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {__import__('os').strerror(err)}")


class VirtioBalloon(VirtioDevice):
    """virtio-balloon: inflate/deflate queues, num_pages/actual config, optional stats."""

    device_type = DeviceType.BALLOON
    control_commands = ("set_size", "stats", "query")

    def __init__(self, mem_size: int, *, deflate_on_oom: bool = True, stats: bool = True,
                 discard: bool = True, queue_size: int = 128, label: str = "virtio_balloon"
                 ) -> None:
        super().__init__()
        self.mem_size = mem_size
        self.discard = discard
        self.label = label
        self.device_features = (deflate_on_oom << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                                | stats << VIRTIO_BALLOON_F_STATS_VQ)
        self.queue_max_sizes = (queue_size,) * (3 if stats else 2)
        self.config = bytearray(8)
        self._lock = threading.Lock()
        self._stats_cond = threading.Condition(self._lock)
        self.num_pages = 0
        self.actual = 0
        self.inflated_pages = 0          # pages the driver put in (minus taken out)
        self.discarded_bytes = 0
        self.invalid_pfns = 0
        self.stats: dict[str, int] = {}
        self.stats_updated: float | None = None
        self._stats_chain: DescriptorChain | None = None
        self._stats_generation = 0

    @property
    def name(self) -> str:
        return self.label

    # -- config space ----------------------------------------------------------------------

    def _pack_config(self) -> None:
        struct.pack_into("<II", self.config, 0, self.num_pages, self.actual)

    def read_config(self, offset: int, size: int) -> bytes:
        with self._lock:
            return super().read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        """Only `actual` (bytes 4..7) is driver-writable; the rest is ignored."""
        if offset < 0:
            return
        with self._lock:
            image = bytearray(self.config)
            for i, byte in enumerate(bytes(data)):
                if 4 <= offset + i < 8:
                    image[offset + i] = byte
            self.actual = struct.unpack_from("<I", image, 4)[0]
            self._pack_config()

    # -- host side (control) -------------------------------------------------------------------

    def set_size(self, size: int) -> dict:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"balloon size must be a non-negative integer, not {size!r}")
        if size > self.mem_size:
            raise ValueError(f"balloon size {size} is larger than guest memory "
                             f"({self.mem_size} bytes)")
        with self._lock:
            self.num_pages = size >> PFN_SHIFT
            self._pack_config()
        self.config_changed()
        return self.query()

    def query(self) -> dict:
        with self._lock:
            return {"num_pages": self.num_pages, "target_bytes": self.num_pages * PAGE_SIZE,
                    "actual": self.actual, "actual_bytes": self.actual * PAGE_SIZE,
                    "inflated_pages": self.inflated_pages,
                    "discarded_bytes": self.discarded_bytes,
                    "invalid_pfns": self.invalid_pfns,
                    "driver": self.mem is not None}

    def request_stats(self, wait: float = STATS_WAIT) -> dict:
        """Return the held stats buffer to the driver and wait briefly for fresh numbers."""
        with self._lock:
            generation = self._stats_generation
            chain, self._stats_chain = self._stats_chain, None
            if chain is not None and self.mem is not None and len(self.queues) > STATS_Q:
                self.queues[STATS_Q].add_used(self.mem, chain, 0)
                self.signal_used(STATS_Q)
                deadline = time.monotonic() + wait
                while self._stats_generation == generation:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stats_cond.wait(left)
            fresh = self._stats_generation != generation
            age = None if self.stats_updated is None else round(
                time.monotonic() - self.stats_updated, 3)
            stats = dict(self.stats)
        return {**self.query(), "stats": stats, "stats_fresh": fresh, "stats_age": age}

    def control(self, command: str, args: dict) -> dict:
        if command == "set_size":
            if "size" not in args:
                raise ValueError("set_size needs 'size' (bytes)")
            return self.set_size(args["size"])
        if command == "stats":
            return self.request_stats()
        if command == "query":
            return self.query()
        raise NotImplementedError(f"unknown balloon command {command!r}")

    # -- queues ----------------------------------------------------------------------------

    def handle_queue(self, index: int) -> None:
        queue, mem = self.queues[index], self.mem
        if index == STATS_Q:
            self._handle_stats()
            return
        while (chain := queue.pop(mem)) is not None:
            pfns = self._pfns(chain)
            if index == INFLATE_Q:
                self._inflate(pfns)
            else:
                with self._lock:
                    self.inflated_pages = max(0, self.inflated_pages - len(pfns))
            queue.add_used(mem, chain, 0)
            self.signal_used(index)

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        n = min(chain.readable_len // 4, MAX_PFNS_PER_BUFFER)
        data = chain.read(self.mem, n * 4)
        return list(struct.unpack(f"<{len(data) // 4}I", data[:len(data) // 4 * 4]))

    def _inflate(self, pfns: list[int]) -> None:
        mem = self.mem
        valid = []
        for pfn in pfns:
            addr = pfn << PFN_SHIFT
            if mem.is_valid_range(addr, PAGE_SIZE):
                valid.append(pfn)
            else:
                self.invalid_pfns += 1
        with self._lock:
            self.inflated_pages += len(valid)
        if not self.discard:
            return
        discarded = 0
        for start, count in _runs(sorted(set(valid))):
            addr = start << PFN_SHIFT
            length = count * PAGE_SIZE
            region = mem.region_of(addr)
            if region is None or addr + length > region.end:   # split at region ends
                for pfn in range(start, start + count):
                    discarded += self._discard(pfn << PFN_SHIFT, PAGE_SIZE)
            else:
                discarded += self._discard(addr, length)
        with self._lock:
            self.discarded_bytes += discarded

    def _discard(self, addr: int, length: int) -> int:
        region = self.mem.region_of(addr)
        if region is None:
            return 0
        try:
            punch_hole(self.mem.fd, region.file_offset + addr - region.guest_addr, length)
        except OSError as e:
            log.warning("%s: cannot release %#x+%#x: %s; keeping the pages", self.label,
                        addr, length, e)
            self.discard = False        # do not log it for every page
            return 0
        return length

    def _handle_stats(self) -> None:
        queue, mem = self.queues[STATS_Q], self.mem
        with self._lock:
            while (chain := queue.pop(mem)) is not None:
                if self._stats_chain is not None:          # a driver posting twice
                    queue.add_used(mem, self._stats_chain, 0)
                n = min(chain.readable_len // STAT.size, MAX_STATS)
                data = chain.read(mem, n * STAT.size)
                stats = {}
                for i in range(n):
                    tag, value = STAT.unpack_from(data, i * STAT.size)
                    stats[STAT_NAMES.get(tag, f"tag{tag}")] = value
                self.stats = stats
                self.stats_updated = time.monotonic()
                self._stats_generation += 1
                self._stats_chain = chain
                self._stats_cond.notify_all()

    def reset(self) -> bool:
        with self._lock:
            self._stats_chain = None
            self.actual = 0
            self._pack_config()
        return super().reset()


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Sorted PFNs -> (first, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def create(options: Mapping[str, Any], ctx: Any) -> VirtioBalloon:
    """The PluginSpec factory: options are already validated against the schema."""
    return VirtioBalloon(ctx.mem_size, deflate_on_oom=options["deflate_on_oom"],
                         stats=options["stats"], discard=options["discard"],
                         queue_size=options["queue_size"],
                         label=getattr(ctx, "name", "virtio_balloon"))
