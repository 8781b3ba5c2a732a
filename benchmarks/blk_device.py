"""benchmarks/blk's device side: one virtio-blk device built as `vmm run` builds it, in a
forked process of its own (or in this one), driven through its split ring by a Python
driver that waits for completions in one of three ways (see benchmarks.blk)."""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import select
import struct
import sys
import threading
import time
from pathlib import Path

from benchmarks.blk_workload import (
    BLOCK,
    TAG,
    WRITE_BYTE,
    MiB,
    Offsets,
    Result,
    Workload,
    process_cpu,
    self_cpu,
)
from benchmarks.halt_poll import HaltPoll, HaltPollParams, RunnableTasks
from vmmcore.errors import VmmError
from vmmcore.virtio.queue import vring_need_event

REQ_HEADER = struct.Struct("<IIQ")   # virtio_blk_outhdr: type, reserved, sector
USED_ELEM = struct.Struct("<II")
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
HDR_BASE = 1 * MiB                # request headers and status bytes: one 64-byte slot each
DATA_BASE = 2 * MiB               # data buffers, page aligned
WAIT_TIMEOUT = 10.0               # a request not completed by then is a hang

#: The write ends of the device processes' control pipes: a later device process closes
#: its inherited copies, so that each one sees EOF when the benchmark closes its pipe.
_CONTROL_FDS: list[int] = []


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
                    dump_profiles(profs, profile_out)
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
                dump_profiles(self._profiled, self.profile_out)
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


def dump_profiles(profs: list[cProfile.Profile], out: Path) -> None:
    if not profs:
        return
    stats = pstats.Stats(profs[0])
    for p in profs[1:]:
        stats.add(p)
    stats.dump_stats(str(out))

