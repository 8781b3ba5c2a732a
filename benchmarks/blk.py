"""virtio-blk throughput: the device model against raw preadv/pwritev on the same file.

    python3 -m benchmarks.blk [--size 256M] [--seconds 0.8] [--repeats 5] [--depth 32]
                              [--seq-depth 1] [--modes buffered,direct]
                              [--workloads randread-qd1,randread-qd32,seqread,seqwrite,
                                           randread-qd1-sleep,seqread-sleep,seqwrite-sleep,
                                           randread-qd1-polled,seqread-polled,seqwrite-polled]
                              [--dir DIR] [--device-options io_threads=8,...]
                              [--halt-poll-ns NS] [--in-process] [--profile WORKLOAD]

Four workloads (4 KiB random reads at depth 1 and 32, 1 MiB sequential reads and writes),
the depth-1 ones with three ways for the driver to wait, each measured twice in the same
run on the same image file:

- device: the virtio_blk plugin's device model, built as `vmm run` builds it (options
  validated by collect_devices from `--device virtio_blk:path=IMG,format=raw[,direct=true]`,
  then the plugin's factory create(options, ctx), which opens the image through the raw
  disk-format plugin), activated on guest memory by vmmcore.virtio.testing.DeviceHarness
  and driven by that tier-1 driver's split ring (VirtqueueDriver: descriptors, avail ring,
  EVENT_IDX kicks through the queue eventfd, MSI-X vector eventfd, used ring). By default
  the device runs in a forked process of its own, as in `vmm run` (a sandboxed device
  process; no jail or seccomp here), so the Python driver does not compete with it for a
  GIL; --in-process keeps it in this process. The driver keeps DEPTH requests in flight
  (closed loop), each in fixed descriptors and buffers, and copies no data: what is timed
  is the device's work plus the ring round trip. Ring indexes are accessed 16 bits at a
  time, as a guest does (the tier-1 driver's own publish() uses GuestMemory.write_u16,
  i.e. struct.pack_into, which zeroes the field before writing it: harmless under one
  GIL, but a device in another process then sees avail idx 0 now and then).
- raw: the same requests as os.preadv/os.pwritev on the same file into page-aligned
  buffers, at the same queue depth: one thread at depth 1, DEPTH Python threads (one
  request each in flight, closed loop) at depth DEPTH.

How the driver waits for a completion (the device is the same in every row; its adaptive
ring polling, poll_us = QEMU's poll-max-ns, is on by default):

- interrupt-driven (no suffix): interrupts on (used_event = the next entry, EVENT_IDX),
  and the driver waits for the MSI-X vector's eventfd as a guest vCPU halted in HLT
  waits for it on KVM: KVM polls for the interrupt for an adaptive window (halt polling,
  benchmarks.halt_poll, with this host's kvm module parameters: halt_poll_ns, 200 µs by
  default; polling stops early when other tasks wait for a CPU, as KVM's does) before
  the vCPU thread sleeps. The device raises an interrupt for every
  completion; the driver takes every one.
- `sleep`: the same, without halt polling (halt_poll_ns=0): every wait is a scheduler
  wake-up of the driver's thread, what a guest sees where the host disables halt polling.
- `polled`: as a Linux guest on virtio_blk's poll queues (module option poll_queues, used
  by io_uring IOPOLL): the driver turns the queue's interrupts off (used_event = 0, as
  virtqueue_disable_cb does with EVENT_IDX) and spins on the used index. No kick, no
  interrupt, no wake-up; the driver keeps a CPU busy while it waits.

Every device row reports kicks, interrupts and driver sleeps per request, so which
wake-ups a row paid for is printed, not assumed. The raw side is the same preadv/pwritev
in every row.

Modes: `buffered` (page cache on both sides: the file was just written, so a read is a
memcpy and the raw side is the fastest possible reference) and `direct` (O_DIRECT on both
sides: device option direct=true, raw fd opened with O_DIRECT; the storage under the file
is in the loop). Each cell runs for --seconds, device and raw alternating, --repeats
times; medians are printed with the ratio device/raw, CPU time per request on each side
(device = the device process + the driver; raw = this process), and whether the issue's
target is met: at least half the raw IOPS at depth 32 and 90% of the raw sequential MiB/s.
The device's request engine is the plugin's default (engine=auto: the native C engine
for raw images); --device-options engine=python measures the Python request path.
--profile runs one workload on the device alone with cProfile in every device thread
(wall clock per thread: at depth 1 a request runs inline in the device's worker thread,
so that is its CPU time; at depth > 1 waits for the GIL and the queue lock are included);
it profiles the Python engine (engine=python is added): the native engine's threads run
no Python.

Reads check a tag (the 4 KiB block's number, written into every block of the image) in
every completed request; writes write a known pattern and the benchmark checks it in the
file afterwards. The image is created in --dir (default: the system temp directory) and
removed at the end. Nothing here asserts speed; it prints numbers for people to read.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import mmap
import os
import pstats
import random
import select
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `vmmcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.halt_poll import HaltPoll, HaltPollParams, RunnableTasks  # noqa: E402
from vmmcore.errors import VmmError  # noqa: E402
from vmmcore.virtio.queue import vring_need_event  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4096                      # tag granularity of the image
TAG = struct.Struct("<Q")
WRITE_BYTE = 0x5A                 # what the write workloads write
REQ_HEADER = struct.Struct("<IIQ")   # virtio_blk_outhdr: type, reserved, sector
USED_ELEM = struct.Struct("<II")
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
QUEUE_SIZE = 256                  # the device's default (plugin option queue_size)
HDR_BASE = 1 * MiB                # request headers and status bytes: one 64-byte slot each
DATA_BASE = 2 * MiB               # data buffers, page aligned
WAIT_TIMEOUT = 10.0               # a request not completed by then is a hang

#: The write ends of the device processes' control pipes: a later device process closes
#: its inherited copies, so that each one sees EOF when the benchmark closes its pipe.
_CONTROL_FDS: list[int] = []


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    bs: int
    depth: int
    write: bool
    random: bool
    #: how the driver waits for completions: "irq" (interrupts on; waits as a KVM vCPU
    #: in HLT does, halt polling then sleep), "sleep" (interrupts on, no halt polling:
    #: every wait is a scheduler wake-up) or "polled" (interrupts off, spins on the ring)
    wait: str = "irq"

    @property
    def polled(self) -> bool:
        return self.wait == "polled"

    @property
    def label(self) -> str:
        kind = ("rand" if self.random else "seq") + ("write" if self.write else "read")
        size = f"{self.bs // KiB}K" if self.bs < MiB else f"{self.bs // MiB}M"
        return f"{kind} {size} QD{self.depth}" + ("" if self.wait == "irq" else f" {self.wait}")

    @property
    def iops(self) -> bool:
        return self.bs < MiB          # 4 KiB rows in IOPS, 1 MiB rows in MiB/s


def workloads(depth: int, seq_depth: int) -> dict[str, Workload]:
    return {
        "randread-qd1": Workload("randread-qd1", 4 * KiB, 1, False, True),
        "randread-qd32": Workload("randread-qd32", 4 * KiB, depth, False, True),
        "seqread": Workload("seqread", 1 * MiB, seq_depth, False, False),
        "seqwrite": Workload("seqwrite", 1 * MiB, seq_depth, True, False),
        "randread-qd1-sleep": Workload("randread-qd1-sleep", 4 * KiB, 1, False, True, "sleep"),
        "seqread-sleep": Workload("seqread-sleep", 1 * MiB, seq_depth, False, False, "sleep"),
        "seqwrite-sleep": Workload("seqwrite-sleep", 1 * MiB, seq_depth, True, False, "sleep"),
        "randread-qd1-polled": Workload("randread-qd1-polled", 4 * KiB, 1, False, True,
                                        "polled"),
        "seqread-polled": Workload("seqread-polled", 1 * MiB, seq_depth, False, False,
                                   "polled"),
        "seqwrite-polled": Workload("seqwrite-polled", 1 * MiB, seq_depth, True, False,
                                    "polled"),
    }


def target_for(wl: Workload, depth: int) -> float | None:
    """The issue's targets: device >= 0.5 x raw IOPS at QD32, >= 0.9 x raw sequential."""
    if wl.name == "randread-qd32" and depth == 32:
        return 0.5
    if not wl.random:
        return 0.9
    return None


@dataclasses.dataclass(frozen=True)
class Result:
    ops: int
    seconds: float
    cpu: float                    # CPU seconds: raw = this process; device = its process
    driver_cpu: float = 0.0       # device side: the Python driver's CPU seconds (this process)
    kicks: int = 0                # device side: queue notifications the driver sent
    irqs: int = 0                 # device side: interrupts the device raised (vector signals)
    sleeps: int = 0               # device side: waits in which the driver went to sleep

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu / self.ops * 1e6 if self.ops else 0.0

    @property
    def driver_us_per_op(self) -> float:
        return self.driver_cpu / self.ops * 1e6 if self.ops else 0.0


def median_result(results: list[Result]) -> Result:
    """The run with the median rate (keeps its CPU time consistent with it)."""
    ordered = sorted(results, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


# -- the image ----------------------------------------------------------------------------

def make_image(path: Path, size: int) -> None:
    """A file of `size` bytes whose every 4 KiB block starts with its block number."""
    chunk = bytearray(MiB)
    with open(path, "wb") as f:
        for base in range(0, size, MiB):
            n = min(MiB, size - base)
            for off in range(0, n, BLOCK):
                TAG.pack_into(chunk, off, (base + off) // BLOCK)
            f.write(memoryview(chunk)[:n])
        f.flush()
        os.fsync(f.fileno())


def check_write_pattern(path: Path, offsets: list[int], bs: int) -> None:
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            if f.read(bs) != bytes([WRITE_BYTE]) * bs:
                sys.exit(f"benchmarks.blk: the file at {off} does not hold what was written")


class Offsets:
    """Request offsets: uniform random bs-aligned blocks, or sequential wrapping around."""

    def __init__(self, wl: Workload, size: int, seed: int, start: int = 0) -> None:
        self.bs = wl.bs
        self.blocks = size // wl.bs
        self.rng = random.Random(seed) if wl.random else None
        self.next_block = start % self.blocks
        self.lock = threading.Lock()

    def next(self) -> int:
        if self.rng is not None:
            return self.rng.randrange(self.blocks) * self.bs
        with self.lock:
            b = self.next_block
            self.next_block = (b + 1) % self.blocks
        return b * self.bs


_FENCE_LOCK = threading.Lock()


def fence() -> None:
    """A full memory barrier between the driver's used_event store and its next load of
    the used index (Linux: virtio_store_mb). x86 may let a load pass an earlier store;
    only a locked instruction (or mfence) stops that, and Python can issue one only
    through a lock: an uncontended acquire is an atomic compare-and-swap."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def spin_until_used(u16: memoryview, used_idx_i: int, last_used: int, inflight: int) -> None:
    """Busy-wait for the used index to move (a polled driver: blk_mq_poll spinning on
    virtqueue_get_buf); a request not completed in WAIT_TIMEOUT is a hang."""
    spins = 0
    deadline = 0.0
    while u16[used_idx_i] == last_used:
        spins += 1
        if spins & 0xFFFF == 0:
            now = time.perf_counter()
            if not deadline:
                deadline = now + WAIT_TIMEOUT
            elif now > deadline:
                sys.exit(f"benchmarks.blk: {inflight} polled device request(s) not "
                         f"completed in {WAIT_TIMEOUT:g} s")


# -- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the device side ----------------------------------------------------------------------------

class DeviceSide:
    """One virtio-blk device built as `vmm run` builds it, driven through its split ring."""

    def __init__(self, path: Path, direct: bool, max_depth: int, max_bs: int,
                 in_process: bool, profile_out: Path | None = None,
                 extra_options: str = "", halt_params: HaltPollParams | None = None) -> None:
        from vmmcore.device_options import DeviceArgs, collect_devices
        from vmmcore.plugin_api import DeviceContext, load_factory
        from vmmcore.registry import get_registry
        from vmmcore.virtio.testing import DeviceHarness

        spec = f"virtio_blk:path={path},format=raw" + (",direct=true" if direct else "")
        if extra_options:
            spec += "," + extra_options
        [config] = collect_devices(DeviceArgs([("--device", spec)]))
        record = get_registry().get("device", "virtio_blk")
        mem_size = DATA_BASE + ((max_depth * max_bs + MiB - 1) // MiB) * MiB
        ctx = DeviceContext(name="virtio_blk0", index=0, mem_size=mem_size)
        self.device = load_factory(record.spec)(dict(config.options), ctx)
        self.options = dict(config.options)
        self.harness = DeviceHarness(self.device, mem_size=mem_size, event_idx=True)
        self.mem = self.harness.mem
        self.driver = self.harness.drivers[0]
        self.vector = self.harness.vectors[1]
        if 3 * max_depth > self.driver.size:
            raise VmmError(f"queue depth {max_depth} needs {3 * max_depth} descriptors; the "
                           f"queue has {self.driver.size}")
        self.features = self.device.features()    # a driver acks what it knows: all of it
        self.pid = os.getpid()
        self.in_process = in_process
        self.halt_params = halt_params or HaltPollParams()
        self.runnable = RunnableTasks()
        self._ctl = -1
        if in_process:
            self._profiled = _profile_device(self.device) if profile_out else None
            self.harness.activate(self.features)
            self.profile_out = profile_out
        else:
            self._fork(profile_out)

    def _fork(self, profile_out: Path | None) -> None:
        """Fork the device process (before this process starts any thread)."""
        ready_r, ready_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the device process
            code = 0
            try:
                os.close(ready_r)
                os.close(ctl_w)
                for fd in _CONTROL_FDS:
                    os.close(fd)
                profs = _profile_device(self.device) if profile_out else None
                self.harness.activate(self.features)
                os.write(ready_w, b"1")
                os.read(ctl_r, 1)                      # EOF: the benchmark is done
                self.device.shutdown()
                if profs is not None:
                    _dump_profiles(profs, profile_out)
            except BaseException as e:  # noqa: BLE001 - report and leave, never return
                print(f"benchmarks.blk: device process: {e!r}", file=sys.stderr)
                code = 1
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(ctl_r)
        self.pid, self._ctl = pid, ctl_w
        _CONTROL_FDS.append(ctl_w)
        if os.read(ready_r, 1) != b"1":
            os.waitpid(pid, 0)
            sys.exit("benchmarks.blk: the device process failed to start")
        os.close(ready_r)

    def cpu(self) -> float:
        """CPU seconds of the device process (in-process: all of this process)."""
        return process_cpu(self.pid) if not self.in_process else self_cpu()

    # -- the request slots ----------------------------------------------------------------

    def _layout(self, wl: Workload) -> None:
        """Slot i: descriptors 3i (header), 3i+1 (data), 3i+2 (status), fixed buffers."""
        d = self.driver
        data_flags = 0 if wl.write else VIRTQ_DESC_F_WRITE
        self.hdr = [HDR_BASE + 64 * i for i in range(wl.depth)]
        self.status = [h + 32 for h in self.hdr]
        self.data = [DATA_BASE + wl.bs * i for i in range(wl.depth)]
        for i in range(wl.depth):
            h = 3 * i
            d.write_desc(h, self.hdr[i], REQ_HEADER.size, VIRTQ_DESC_F_NEXT, h + 1)
            d.write_desc(h + 1, self.data[i], wl.bs, data_flags | VIRTQ_DESC_F_NEXT, h + 2)
            d.write_desc(h + 2, self.status[i], 1, VIRTQ_DESC_F_WRITE, 0)
            if wl.write:
                self.mem.fill(self.data[i], wl.bs, WRITE_BYTE)

    def run(self, wl: Workload, seconds: float, offsets: Offsets) -> tuple[Result, list[int]]:
        """DEPTH requests in flight for `seconds` (closed loop); returns the result and the
        offsets of the last few writes (for the check in the file)."""
        self._layout(wl)
        d, mem = self.driver, self.mem
        rtype = VIRTIO_BLK_T_OUT if wl.write else VIRTIO_BLK_T_IN
        pack_hdr, hdr, status, data = REQ_HEADER.pack_into, self.hdr, self.status, self.data
        used_ring, size = d.used + 4, d.size
        read_tag = TAG.unpack_from
        view = mem.slice(0, mem.size)
        # Ring indexes are read and written with native 16-bit accesses (a u16 view of
        # guest memory), as a guest's driver does: the device runs in another process
        # and GuestMemory.write_u16 (struct.pack_into, which VirtqueueDriver.publish and
        # set_used_event use) clears the field before writing it.
        u16 = view.cast("H")
        avail_idx_i, avail_ring_i = (d.avail + 2) // 2, (d.avail + 4) // 2
        used_event_i = (d.avail + 4 + 2 * size) // 2
        used_idx_i, avail_event_i = (d.used + 2) // 2, (d.used + 4 + 8 * size) // 2
        kick_evt = d.kick_evt
        where = [0] * wl.depth
        written: list[int] = []
        poller = select.poll()
        poller.register(self.vector.fileno(), select.POLLIN)
        # a halted vCPU: KVM's halt polling, or none for the "sleep" rows
        halt = HaltPoll(self.halt_params if wl.wait == "irq" else HaltPollParams(max_ns=0),
                        self.runnable)
        # The ring state lives in locals while the loop runs (attribute accesses are a
        # noticeable part of a Python driver's ~2 µs per request); the driver object gets
        # it back at the end.
        added, avail_idx, last_used = 0, d.avail_idx, d.last_used
        next_offset, perf_counter = offsets.next, time.perf_counter
        polled, write = wl.polled, wl.write
        read_vector, signal_kick = self.vector.read, kick_evt.write

        def submit(slot: int) -> None:
            nonlocal added, avail_idx
            off = next_offset()
            where[slot] = off
            pack_hdr(view, hdr[slot], rtype, 0, off >> 9)
            view[status[slot]] = 0xFF
            u16[avail_ring_i + avail_idx % size] = 3 * slot
            avail_idx = (avail_idx + 1) & 0xFFFF
            u16[avail_idx_i] = avail_idx                # publish (x86: stores in order)
            added += 1

        def kick() -> None:                            # virtqueue_kick_prepare + notify
            nonlocal added, kicks
            old = (avail_idx - added) & 0xFFFF
            added = 0
            if vring_need_event(u16[avail_event_i], avail_idx, old):
                signal_kick(1)
                kicks += 1

        ops = kicks = irqs = 0
        ack = False
        cpu0, dcpu0 = self_cpu(), self.cpu()
        t0 = perf_counter()
        deadline = t0 + seconds
        for slot in range(wl.depth):
            submit(slot)
        # Polled: interrupts off the way Linux's virtqueue_disable_cb does it with
        # EVENT_IDX (used_event = 0, "a hack" in its own words: signal only when the used
        # index crosses 0); its poll queues are created without a callback, so this is how
        # io_uring IOPOLL requests run on them. The vector's eventfd is drained at the end.
        u16[used_event_i] = 0 if polled else last_used
        kick()
        inflight = wl.depth
        stopping = False
        try:
            while inflight:
                used_idx = u16[used_idx_i]
                if (used_idx - last_used) & 0xFFFF > inflight:
                    sys.exit(f"benchmarks.blk: used idx {used_idx} is more than {inflight} "
                             f"ahead of {last_used}")
                got = used_idx != last_used
                while last_used != used_idx:
                    head, _length = USED_ELEM.unpack_from(view,
                                                          used_ring + 8 * (last_used % size))
                    last_used = (last_used + 1) & 0xFFFF
                    slot = head // 3
                    if view[status[slot]] != 0:
                        sys.exit(f"benchmarks.blk: device request at {where[slot]} got "
                                 f"status {view[status[slot]]}")
                    if not write:
                        tag = read_tag(view, data[slot])[0]
                        if tag != where[slot] // BLOCK:
                            sys.exit(f"benchmarks.blk: device read at {where[slot]} returned "
                                     f"block {tag}'s data")
                    elif len(written) < 64:
                        written.append(where[slot])
                    ops += 1
                    inflight -= 1
                    if not stopping:
                        if perf_counter() >= deadline:
                            stopping = True
                        else:
                            submit(slot)
                            inflight += 1
                if polled:
                    if got:
                        kick()
                    elif inflight:
                        spin_until_used(u16, used_idx_i, last_used, inflight)
                    continue
                u16[used_event_i] = last_used          # interrupt me at the next one
                if got:
                    kick()
                if ack:
                    # the interrupt is acknowledged (its eventfd reset) once the next
                    # request is out, as a guest's EOI ends its handler; a signal this
                    # swallows is seen in the used index just below
                    irqs += read_vector()
                    ack = False
                fence()                                # used_event store, then used idx load
                if not inflight or u16[used_idx_i] != last_used:
                    continue                           # done, or completed while re-arming
                if not halt.wait(poller, WAIT_TIMEOUT):
                    sys.exit(f"benchmarks.blk: {inflight} device request(s) not completed "
                             f"in {WAIT_TIMEOUT:g} s")
                ack = True
        finally:
            d.avail_idx, d.last_used = avail_idx, last_used
            d.kicks += kicks
            u16.release()
            view.release()
        elapsed = perf_counter() - t0
        if poller.poll(0):             # the last completions' signal, if nobody waited for it
            irqs += self.vector.read()
        driver_cpu = self_cpu() - cpu0
        counts = {"kicks": kicks, "irqs": irqs, "sleeps": halt.sleeps}
        if self.in_process:         # one process: device and driver CPU cannot be told apart
            return Result(ops, elapsed, driver_cpu, 0.0, **counts), written
        return Result(ops, elapsed, self.cpu() - dcpu0, driver_cpu, **counts), written

    def close(self) -> None:
        self.runnable.close()
        if self.in_process:
            self.harness.close()
            if self._profiled is not None and self.profile_out is not None:
                _dump_profiles(self._profiled, self.profile_out)
            return
        os.close(self._ctl)
        _CONTROL_FDS.remove(self._ctl)
        _, status = os.waitpid(self.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            print("benchmarks.blk: the device process failed at shutdown", file=sys.stderr)
        with contextlib.suppress(Exception):
            self.harness.mem.close()


# -- profiling the device's threads -------------------------------------------------------------

def _profile_device(device) -> list[cProfile.Profile]:
    """cProfile every device thread: the worker's handle_queue and each request's _run
    (instance attributes wrap the methods; the device's code is unchanged)."""
    profs: list[cProfile.Profile] = []
    local = threading.local()
    lock = threading.Lock()

    def wrap(fn):
        def profiled(*args):
            if getattr(local, "depth", 0):
                return fn(*args)
            prof = getattr(local, "prof", None)
            if prof is None:
                prof = local.prof = cProfile.Profile()
                with lock:
                    profs.append(prof)
            local.depth = 1
            prof.enable()
            try:
                return fn(*args)
            finally:
                prof.disable()
                local.depth = 0
        return profiled

    device.handle_queue = wrap(device.handle_queue)
    device._run = wrap(device._run)
    return profs


def _dump_profiles(profs: list[cProfile.Profile], out: Path) -> None:
    if not profs:
        return
    stats = pstats.Stats(profs[0])
    for p in profs[1:]:
        stats.add(p)
    stats.dump_stats(str(out))


# -- the raw side ----------------------------------------------------------------------------

class RawSide:
    """os.preadv/os.pwritev on the same file, at the same queue depth."""

    def __init__(self, path: Path, direct: bool, max_depth: int, max_bs: int) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        self.fd = os.open(path, flags)
        self.buf = mmap.mmap(-1, max_depth * max_bs)       # page aligned (O_DIRECT)

    def run(self, wl: Workload, seconds: float, offsets: Offsets) -> tuple[Result, list[int]]:
        whole = memoryview(self.buf)
        bufs = [whole[i * wl.bs:(i + 1) * wl.bs] for i in range(wl.depth)]
        if wl.write:
            for b in bufs:
                b[:] = bytes([WRITE_BYTE]) * wl.bs
        counts = [0] * wl.depth
        written: list[list[int]] = [[] for _ in range(wl.depth)]
        errors: list[str] = []
        fd, write = self.fd, wl.write
        start = threading.Barrier(wl.depth + 1) if wl.depth > 1 else None
        times = [0.0, 0.0]

        def loop(i: int) -> None:
            buf, n, mine = bufs[i], 0, written[i]
            io_one = os.pwritev if write else os.preadv
            if start is not None:
                start.wait()
            deadline = time.perf_counter() + seconds
            try:
                while True:
                    off = offsets.next()
                    if io_one(fd, [buf], off) != wl.bs:
                        errors.append(f"short transfer at {off}")
                        return
                    if not write:
                        if TAG.unpack_from(buf)[0] != off // BLOCK:
                            errors.append(f"read at {off} returned other data")
                            return
                    elif len(mine) < 8:
                        mine.append(off)
                    n += 1
                    if time.perf_counter() >= deadline:
                        break
            except OSError as e:
                errors.append(f"{e}")
            finally:
                counts[i] = n

        cpu0 = self_cpu()
        if wl.depth == 1:
            times[0] = time.perf_counter()
            loop(0)
        else:
            threads = [threading.Thread(target=loop, args=(i,), daemon=True)
                       for i in range(wl.depth)]
            for t in threads:
                t.start()
            start.wait()
            times[0] = time.perf_counter()
            for t in threads:
                t.join()
        elapsed = time.perf_counter() - times[0]
        cpu = self_cpu() - cpu0
        for b in bufs:
            b.release()
        whole.release()
        if errors:
            sys.exit(f"benchmarks.blk: raw {wl.label}: {errors[0]}")
        return Result(sum(counts), elapsed, cpu), [o for w in written for o in w]

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


# -- main ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def fmt_rate(wl: Workload, r: Result) -> str:
    if wl.iops:
        return f"{r.rate:,.0f} IOPS"
    return f"{r.rate * wl.bs / MiB:,.0f} MiB/s"


def baseline_name(wl: Workload, mode: str) -> str:
    call = "pwritev" if wl.write else "preadv"
    who = "1 thread" if wl.depth == 1 else f"{wl.depth} threads"
    return f"{call}, {who}, {'O_DIRECT' if mode == 'direct' else 'page cache'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.blk",
        description="virtio-blk device model (tier-1 driver) against raw preadv/pwritev "
                    "on the same file, same queue depth.")
    parser.add_argument("--size", default="256M",
                        help="image size (default 256M; K/M/G suffixes)")
    parser.add_argument("--seconds", type=float, default=0.8,
                        help="length of each timed run (default 0.8)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per cell and side, median shown (default 5)")
    parser.add_argument("--depth", type=int, default=32,
                        help="queue depth of the randread-qd32 row (default 32)")
    parser.add_argument("--seq-depth", type=int, default=1,
                        help="queue depth of the sequential rows (default 1)")
    parser.add_argument("--modes", default="buffered,direct",
                        help="buffered (page cache), direct (O_DIRECT), or both")
    parser.add_argument("--workloads", default=",".join(workloads(32, 1)),
                        help="comma-separated subset (default: all)")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the image file goes (default: the temp directory)")
    parser.add_argument("--device-options", default="", metavar="KEY=VALUE,...",
                        help="more virtio_blk options for the device (e.g. io_threads=8)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the device in this process (it then shares the GIL with "
                             "the Python driver) instead of a forked device process")
    parser.add_argument("--halt-poll-ns", type=int, metavar="NS",
                        help="the interrupt-driven driver's halt_poll_ns (default: this "
                             "host's kvm module parameter, else KVM's 200000)")
    parser.add_argument("--profile", metavar="WORKLOAD",
                        help="only that workload (first mode), device side, with cProfile "
                             "on the device's threads; prints the top functions")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if size < 4 * MiB or size % MiB:
        parser.error("--size must be a whole number of MiB, at least 4M")
    halt_params, halt_from = HaltPollParams.from_host()
    if args.halt_poll_ns is not None:
        if args.halt_poll_ns < 0:
            parser.error("--halt-poll-ns must be 0 or more")
        halt_params = dataclasses.replace(halt_params, max_ns=args.halt_poll_ns)
        halt_from = "--halt-poll-ns"
    if args.in_process and halt_params.max_ns:
        # a spinning driver holds the GIL between its polls: a device thread in this
        # process that needs it would wait for the switch interval (5 ms) each time
        halt_params = dataclasses.replace(halt_params, max_ns=0)
        halt_from = "off: --in-process, where the spin would hold the device's GIL"
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds must be positive and --repeats at least 1")
    if not (1 <= args.depth <= QUEUE_SIZE // 3 and 1 <= args.seq_depth <= QUEUE_SIZE // 3):
        parser.error(f"--depth and --seq-depth must be in 1..{QUEUE_SIZE // 3}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("buffered", "direct") for m in modes):
        parser.error("--modes takes buffered, direct or both")
    table = workloads(args.depth, args.seq_depth)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.profile:
        chosen = [args.profile]
        if "engine=" not in args.device_options:
            args.device_options = ",".join(filter(None, [args.device_options,
                                                         "engine=python"]))
    for w in chosen:
        if w not in table:
            parser.error(f"unknown workload {w!r}; valid: {', '.join(table)}")
    # reads first: the write rows overwrite the tags that reads check
    order = [w for w in table if w in chosen]
    order.sort(key=lambda w: table[w].write)
    max_depth = max(table[w].depth for w in order)
    max_bs = max(table[w].bs for w in order)

    workdir = Path(tempfile.mkdtemp(prefix="vmm-bench-blk-", dir=args.dir))
    path = workdir / "disk.img"
    devices: dict[str, DeviceSide] = {}
    raws: dict[str, RawSide] = {}
    try:
        t_setup = time.perf_counter()
        make_image(path, size)
        profile_out = workdir / "device.prof" if args.profile else None
        try:
            # every device process is forked before this process starts a thread
            for mode in modes[:1] if args.profile else modes:
                devices[mode] = DeviceSide(path, mode == "direct", max_depth, max_bs,
                                           args.in_process, profile_out,
                                           args.device_options, halt_params)
                raws[mode] = RawSide(path, mode == "direct", max_depth, max_bs)
        except (VmmError, OSError, ValueError) as e:
            print(f"benchmarks.blk: {e}", file=sys.stderr)
            return 2
        dev0 = next(iter(devices.values()))
        print(f"virtio-blk vs raw: {size // MiB} MiB image in {args.dir}, {args.seconds:g} s "
              f"per run, median of {args.repeats}; python {sys.version.split()[0]}, kernel "
              f"{os.uname().release}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"device: virtio_blk plugin factory, format=raw, engine {dev0.device.engine}, "
              f"io_threads={dev0.options['io_threads']}, poll_us="
              f"{dev0.options['poll_us']}, queue_size "
              f"{dev0.options['queue_size']}, "
              f"{'in this process' if args.in_process else 'in a forked device process'}; "
              f"image created in {time.perf_counter() - t_setup:.1f} s")

        if args.profile:
            return run_profile(devices, table[args.profile], size, args, profile_out)

        rows = []
        for name in order:
            wl = table[name]
            for mode in modes:
                dev, raw = devices[mode], raws[mode]
                dev.run(wl, min(0.2, args.seconds), Offsets(wl, size, 1))   # warm-up
                raw.run(wl, min(0.2, args.seconds), Offsets(wl, size, 2))
                dres, rres = [], []
                for rep in range(args.repeats):
                    r, written = raw.run(wl, args.seconds, Offsets(wl, size, 100 + rep))
                    rres.append(r)
                    if wl.write:
                        check_write_pattern(path, written[:16], wl.bs)
                    r, written = dev.run(wl, args.seconds, Offsets(wl, size, 200 + rep,
                                                                   start=size // 2 // wl.bs))
                    dres.append(r)
                    if wl.write:
                        check_write_pattern(path, written[:16], wl.bs)
                rows.append((wl, mode, median_result(rres), median_result(dres)))
                print(f"  measured {wl.label:<18} {mode}", file=sys.stderr)
        print()
        print_table(rows, args.depth, args.in_process, halt_params, halt_from)
    finally:
        for side in (*devices.values(), *raws.values()):
            side.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def per_request(r: Result) -> str:
    """Kicks, interrupts and driver sleeps per request: which wake-ups the row paid for."""
    if not r.ops:
        return "-"
    return f"{r.kicks / r.ops:.2f}/{r.irqs / r.ops:.2f}/{r.sleeps / r.ops:.2f}"


def print_table(rows, depth: int, in_process: bool, halt_params: HaltPollParams,
                halt_from: str) -> None:
    header = (f"{'workload':<22} {'mode':<8} {'raw':>15} {'device':>15} {'ratio':>6}  "
              f"{'target':<15}  {'CPU us/req: raw':>15} {'device':>6} {'driver':>6}  "
              f"{'kick/irq/sleep':>14}  baseline (raw side)")
    print(header)
    print("-" * (len(header) + 12))
    for wl, mode, raw, dev in rows:
        ratio = dev.rate / raw.rate
        target = target_for(wl, depth)
        verdict = "-" if target is None else (
            f">={target:.2f} {'met' if ratio >= target else 'NOT met'}")
        driver = "-" if in_process else f"{dev.driver_us_per_op:.1f}"
        print(f"{wl.label:<22} {mode:<8} {fmt_rate(wl, raw):>15} {fmt_rate(wl, dev):>15} "
              f"{ratio:>6.2f}  {verdict:<15}  {raw.cpu_us_per_op:>15.1f} "
              f"{dev.cpu_us_per_op:>6.1f} {driver:>6}  {per_request(dev):>14}  "
              f"{baseline_name(wl, mode)}")
    print()
    print("ratio = device / raw, medians. Targets (issue 5): >= 0.50 of the raw IOPS at QD32 "
          "and >= 0.90 of the raw\nsequential MiB/s. buffered = page cache on both sides (a "
          "read is a memcpy); direct = O_DIRECT on both.\nCPU us/req (clock-tick resolution): "
          "raw = this process; device = the device process"
          + (" and the driver (one process)" if in_process else
             "; driver = the Python\ntier-1 driver in this process") + ".\n"
          "kick/irq/sleep = per device request: queue kicks sent, interrupts raised, driver "
          "waits that slept.\nInterrupt-driven rows wait as a halted KVM vCPU does: halt "
          f"polling up to halt_poll_ns={halt_params.max_ns} (grow x{halt_params.grow}\nfrom "
          f"{halt_params.grow_start}, shrink /{halt_params.shrink}: {halt_from}), then sleep. "
          "`sleep` rows never poll (halt_poll_ns=0).\n`polled` rows turn interrupts off and "
          "spin on the used ring (virtio_blk poll queues).")


def run_profile(devices, wl: Workload, size: int, args, profile_out: Path) -> int:
    mode, dev = next(iter(devices.items()))
    dev.run(wl, min(0.2, args.seconds), Offsets(wl, size, 1))
    res, _ = dev.run(wl, args.seconds * args.repeats, Offsets(wl, size, 2))
    print(f"profiled: {wl.label}, {mode}: {fmt_rate(wl, res)} ({res.ops} requests) under "
          f"cProfile, which slows the device several times: read where, not how much.\n"
          f"Wall clock per device thread (at QD > 1 it includes waits for the GIL and locks).")
    dev.close()
    devices.clear()
    if not profile_out.exists():
        print("benchmarks.blk: no profile was written", file=sys.stderr)
        return 1
    buf = io.StringIO()
    pstats.Stats(str(profile_out), stream=buf).sort_stats("tottime").print_stats(30)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
