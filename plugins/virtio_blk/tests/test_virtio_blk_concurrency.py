"""The virtio-blk device model, tier 1: concurrency, reset with requests in flight,
multiple queues, resize while running, and what is particular to each request engine
(the choice, interrupts the native engine must hand to Python, its polling)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import threading
import time

import pytest
from blk_rig import SECTORS, TIMEOUT, FileDisk, MiB, host, make_image, wait_fd
from vmm_virtio_blk.device import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VirtioBlock

from vmmcore.disk import Buffers
from vmmcore.virtio.queue import VIRTQ_USED_F_NO_NOTIFY

OK, IOERR = VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR
#: How long the polling tests keep trying to see what they look for. Polling needs the
#: device thread on a CPU while the driver publishes: on a loaded host (two suites at once
#: on 2 CPUs) 200-300 tries were sometimes not enough; an idle host needs a few.
PATIENCE = 30.0


def tries(seconds: float = PATIENCE):
    """0, 1, 2, ... until `seconds` have passed."""
    deadline = time.monotonic() + seconds
    for i in itertools.count():
        if time.monotonic() > deadline:
            return
        yield i


# -- choosing the engine; interrupts ------------------------------------------------------

class NoExtentDisk(FileDisk):
    """A format that cannot hand out a plain file (like qcow2)."""

    def file_extent(self):
        return None


def test_engine_choice(image):
    path, _ = image
    disk = NoExtentDisk(path)
    assert VirtioBlock(disk).engine == "python"                 # auto falls back
    with pytest.raises(ValueError, match=r"engine=native is not possible .*\(no file_extent\)"):
        VirtioBlock(disk, engine="native")
    assert VirtioBlock(FileDisk(path)).engine == "native"       # auto where it can
    assert VirtioBlock(FileDisk(path), engine="python").engine == "python"
    disk.close()


def test_native_interrupts_that_need_python(image, rig_factory, engine):
    """INTx (no MSI-X): the engine cannot just write an irqfd, so it asks Python, which
    sets the ISR bit and raises the line."""
    if engine == "python":
        pytest.skip("native engine only")
    from vmmcore.interrupts import CallbackInterrupt
    from vmmcore.virtio import VirtioInterrupt

    path, contents = image
    levels: list[bool] = []
    rig = rig_factory(FileDisk(path), activate=False)
    rig.interrupt = VirtioInterrupt(intx=CallbackInterrupt(levels.append),
                                    on_needs_reset=rig._on_reset)
    rig.activate()
    assert rig.do_read(4, 512).data == contents[2048:2560]
    for _ in range(int(TIMEOUT / 0.01)):
        if levels:
            break
        threading.Event().wait(0.01)
    assert levels == [True] and rig.interrupt.read_isr() == 1
    assert rig.device.engine_stats()["python_signals"] >= 1


# -- concurrency -------------------------------------------------------------------------------

def test_32_concurrent_requests_keep_data_intact(tmp_path, rig_factory):
    path = tmp_path / "big.img"
    size = 8 * MiB
    model = bytearray(make_image(path, size))
    rig = rig_factory(FileDisk(path))
    rng = random.Random(42)
    blocks = size // 4096
    for _round in range(20):
        chosen = rng.sample(range(blocks), 32)
        reqs = []
        for blk in chosen:       # distinct 4 KiB blocks: no two requests overlap
            length = 512 * rng.randrange(1, 9)
            sector = blk * 8 + rng.randrange(0, 9 - length // 512)
            if rng.random() < 0.5:
                data = os.urandom(length)
                model[sector * 512:sector * 512 + length] = data
                reqs.append(("w", rig.write(sector, data, kick=False), sector, length))
            else:
                reqs.append(("r", rig.read(sector, length, kick=False), sector, length))
        rig.drivers[0].kick_evt.write(1)
        done = rig.wait(len(reqs))
        assert all(r.status == OK for r in done)
        for kind, req, sector, length in reqs:
            if kind == "r":
                start = sector * 512
                assert req.data == bytes(model[start:start + length])
    assert path.read_bytes() == bytes(model)


class GatedDisk(FileDisk):
    """read_into waits until `width` reads are inside the disk at the same time."""

    def __init__(self, path, width: int) -> None:
        super().__init__(path)
        self.barrier = threading.Barrier(width, timeout=TIMEOUT)
        self.order: list[int] = []
        self.release_first = threading.Event()
        self._lock = threading.Lock()

    def read_into(self, offset: int, bufs: Buffers) -> int:
        self.barrier.wait()       # BrokenBarrierError (-> IOERR) unless `width` run at once
        if offset == 0:
            self.release_first.wait(TIMEOUT)   # the first request finishes last
        n = super().read_into(offset, bufs)
        with self._lock:
            self.order.append(offset)
        return n


def test_queue_depth_32_is_real_and_completions_come_out_of_order(image, rig_factory, engine):
    if engine == "native":
        pytest.skip("GatedDisk gates DiskFile.read_into, which the native engine never "
                    "calls: test_native_queue_depth_is_real covers it")
    path, contents = image
    disk = GatedDisk(path, 32)
    rig = rig_factory(disk, io_threads=32)
    reqs = [rig.read(i * 8, 4096, kick=False) for i in range(32)]
    rig.drivers[0].kick_evt.write(1)
    done = rig.wait(31)
    assert all(r.status == OK for r in done), "32 requests were not in the disk at once"
    assert reqs[0].head not in [r.head for r in done]     # held back: the others overtook it
    disk.release_first.set()
    [last] = rig.wait(1)
    assert last.head == reqs[0].head and last.status == OK
    for r in reqs:
        i = reqs.index(r)
        assert r.data == contents[i * 4096:(i + 1) * 4096]


def test_native_queue_depth_is_real(tmp_path, rig_factory, engine):
    """One 4 MiB read then 31 of 64 KiB in one kick, the file out of the page cache (so
    that none completes without blocking in the queue thread): the pool has several
    inside the disk at once and completions overtake each other (in some round: timing)."""
    if engine == "python":
        pytest.skip("native engine only (GatedDisk covers the Python engine)")
    path = tmp_path / "deep.img"
    contents = make_image(path, 8 * MiB)
    rig = rig_factory(FileDisk(path), engine="native", io_threads=32)
    overtaken = 0
    for _round in range(20):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        big = rig.read(0, 4 * MiB, kick=False)
        small = [rig.read(8192 + i * 128, 64 << 10, kick=False) for i in range(31)]
        rig.drivers[0].kick_evt.write(1)
        done = rig.wait(32)
        assert [r.status for r in done] == [OK] * 32
        assert big.data == contents[:4 * MiB]
        for i, r in enumerate(small):
            start = (8192 + i * 128) * 512
            assert r.data == contents[start:start + (64 << 10)]
        submitted = [big.head] + [r.head for r in small]
        overtaken += [r.head for r in done] != submitted
        if overtaken and rig.device.engine_stats()["peak_in_disk"] >= 2:
            break
    assert rig.device.engine_stats()["peak_in_disk"] >= 2
    assert overtaken, "completions always came back in submission order"


def _publish_read(rig, sector: int):
    """A read published on queue 0 without a kick: what the driver does when
    virtqueue_kick_prepare() says the device is not listening."""
    rig.drivers[0].num_added = 0          # the rig kicks without kick_prepare's reset
    return rig.read(sector, 512, kick=False)


def _served_within(rig, seconds: float) -> bool:
    d = rig.drivers[0]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if d.used_idx() != d.last_used:
            return True
        time.sleep(0.0005)
    return d.used_idx() != d.last_used


def _take_kick(fd: int) -> None:
    """Drain a kick eventfd without blocking (the queue thread may take it first; it
    reads with RWF_NOWAIT and polls, so O_NONBLOCK for a moment changes nothing there)."""
    os.set_blocking(fd, False)
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)


def _kicks_off(d) -> bool:
    """Has the device turned the driver's kicks off? With EVENT_IDX: avail_event left
    behind the avail index (a device that wants kicks keeps it at its next entry);
    without: VIRTQ_USED_F_NO_NOTIFY in used->flags."""
    if d.event_idx:
        return d.mem.read_u16(d.used + 4 + 8 * d.size) != d.avail_idx
    return bool(d.mem.read_u16(d.used) & VIRTQ_USED_F_NO_NOTIFY)


@pytest.mark.parametrize("event_idx", [True, False])
def test_native_polling_serves_without_a_kick(image, rig_factory, engine, event_idx):
    """poll_us: while kicked requests come close together the window opens, and the
    queue thread then watches the ring with kicks off (avail_event left behind, or
    VIRTQ_USED_F_NO_NOTIFY): the driver, asking as virtqueue_kick_prepare() does, is told
    not to kick, and the request it publishes is served all the same."""
    if engine == "python":
        pytest.skip("native engine only")
    path, contents = image
    rig = rig_factory(FileDisk(path), poll_us=1000, rig_kw={"event_idx": event_idx})
    d = rig.drivers[0]
    served_unkicked = 0
    for i in tries():
        assert rig.do_read(0, 512).status == OK               # kicked, back to back
        # the rig kicks unconditionally: take a kick the device did not need, so that
        # it cannot wake the thread for the next request (only polling may serve it)
        _take_kick(d.kick_evt.fileno())
        off = _kicks_off(d)
        polled = rig.device.engine_stats()["polled"]
        req = _publish_read(rig, i % 64)
        quiet = off and not d.kick_needed()
        if not (quiet and _served_within(rig, 0.05)):
            d.kick_evt.write(1)                               # missed the window
            quiet = False
        [done] = rig.wait(1)
        sector = i % 64
        assert done.head == req.head and done.data == contents[sector * 512:(sector + 1) * 512]
        if quiet:
            assert rig.device.engine_stats()["polled"] > polled
            served_unkicked += 1
        if served_unkicked >= 3:
            break
    assert served_unkicked >= 3, "no request was served by polling with kicks off"
    assert rig.device.engine_stats()["polled"] >= 3


@pytest.mark.parametrize("event_idx", [True, False])
def test_native_polling_stops_when_requests_come_far_apart(image, rig_factory, engine,
                                                          event_idx):
    """A kick that comes later than poll_us after the last service drops the window to
    0: the queue thread sleeps with kicks on again, so an unkicked request waits (the
    driver is told to kick, and the kick is served)."""
    if engine == "python":
        pytest.skip("native engine only")
    path, contents = image
    rig = rig_factory(FileDisk(path), poll_us=1000, rig_kw={"event_idx": event_idx})
    d = rig.drivers[0]
    for i in tries():                                         # open the window
        assert rig.do_read(i % 64, 512).status == OK
        if rig.device.engine_stats()["poll_ns"]:
            break
    assert 0 < rig.device.engine_stats()["poll_ns"] <= 1_000_000
    time.sleep(0.05)                                          # 50 x poll_us
    assert rig.do_read(0, 512).status == OK                   # window -> 0
    assert rig.device.engine_stats()["poll_ns"] == 0
    time.sleep(0.01)                                          # the thread is asleep
    assert not _kicks_off(d), "kicks are still off after the polling window closed"
    req = _publish_read(rig, 7)
    assert d.kick_needed()
    assert not _served_within(rig, 0.03), "served without a kick while not polling"
    d.kick_evt.write(1)
    [done] = rig.wait(1)
    assert done.head == req.head and done.data == contents[7 * 512:8 * 512]


def test_native_polling_window_ignores_stale_kicks(image, rig_factory, engine):
    """A kick for a request that polling already served wakes the thread later with
    nothing new: that wake-up neither widens nor closes the window (it would, measured
    as a request arriving one window after the last service)."""
    if engine == "python":
        pytest.skip("native engine only")
    path, _ = image
    rig = rig_factory(FileDisk(path), poll_us=1000)
    checked = 0
    for i in tries():
        polled = rig.device.engine_stats()["polled"]
        assert rig.do_read(i % 64, 512).status == OK          # always kicked
        stats = rig.device.engine_stats()
        if stats["polled"] == polled:
            continue                       # served on its kick: nothing stale
        window = stats["poll_ns"]          # polling served it; its kick is stale
        time.sleep(0.005)                  # 5 x poll_us: the window ends, the thread sleeps
        assert rig.device.engine_stats()["poll_ns"] == window
        checked += 1
        if checked == 5:
            break
    assert checked == 5, "polling never served a kicked request"


def test_native_polling_off(image, rig_factory, engine):
    """poll_us=0: never polls, kicks always on."""
    if engine == "python":
        pytest.skip("native engine only")
    path, _ = image
    rig = rig_factory(FileDisk(path), poll_us=0)
    for i in range(20):
        assert rig.do_read(i, 512).status == OK
    assert not _kicks_off(rig.drivers[0])
    _publish_read(rig, 1)
    assert rig.drivers[0].kick_needed()
    assert not _served_within(rig, 0.02)
    rig.drivers[0].kick_evt.write(1)
    rig.wait(1)
    assert rig.device.engine_stats()["polled"] == 0


def test_capacity_change_reaches_the_running_engine(image, rig_factory):
    """After `vmm disk resize` (the control command) the running engine serves the new
    sectors and refuses the ones past the new end, and the driver hears of it."""
    path, _ = image
    rig = rig_factory(FileDisk(path))
    assert rig.do_read(SECTORS, 512).status == IOERR
    assert rig.device.control("resize", {"size": 2 * MiB}) == {"size": 2 * MiB,
                                                               "sectors": 2 * SECTORS}
    assert wait_fd(rig.vectors[0], TIMEOUT)                   # config-change interrupt
    assert rig.do_read(SECTORS, 512).status == OK
    assert rig.do_write(2 * SECTORS - 1, b"\x42" * 512).status == OK
    assert host(path, 2 * MiB - 512, 512) == b"\x42" * 512
    rig.device.control("resize", {"size": MiB // 2})
    assert rig.do_read(SECTORS // 2, 512).status == IOERR
    assert rig.do_read(SECTORS // 2 - 1, 512).status == OK


def test_multiple_queues(tmp_path, rig_factory):
    path = tmp_path / "mq.img"
    contents = make_image(path, MiB)
    rig = rig_factory(FileDisk(path), num_queues=4, queue_size=64)
    for q in range(4):
        data = os.urandom(512)
        rig.write(q * 100, data, queue=q)
        [w] = rig.wait(1, queue=q)
        assert w.status == OK
        rig.read(q * 100, 512, queue=q)
        [r] = rig.wait(1, queue=q)
        assert r.data == data
    rig.read(1, 512, queue=3)
    assert rig.wait(1, queue=3)[0].data == contents[512:1024]


def test_native_reset_waits_for_requests_in_flight(tmp_path, rig_factory, engine):
    if engine == "python":
        pytest.skip("native engine only (SlowDisk covers the Python engine)")
    path = tmp_path / "reset.img"
    make_image(path, 8 * MiB)
    rig = rig_factory(FileDisk(path), engine="native", io_threads=4)
    for i in range(32):
        rig.read(i * 256, 128 << 10, kick=False)
    rig.drivers[0].kick_evt.write(1)
    for _ in range(int(TIMEOUT / 0.0005)):          # until the engine popped them
        if rig.device.in_flight() or rig.drivers[0].used_idx():
            break
        threading.Event().wait(0.0005)
    assert rig.device.reset()
    assert rig.device.in_flight() == 0
    assert rig.drivers[0].used_idx() == 32           # all completed before the queues went


def test_reset_waits_for_requests_in_flight(image, rig_factory, engine):
    if engine == "native":
        pytest.skip("SlowDisk slows DiskFile.write_from, which the native engine never "
                    "calls: test_native_reset_waits_for_requests_in_flight covers it")
    path, _ = image

    class SlowDisk(FileDisk):
        def write_from(self, offset, bufs):
            threading.Event().wait(0.2)
            return super().write_from(offset, bufs)

    rig = rig_factory(SlowDisk(path))
    data = os.urandom(512)
    rig.write(5, data)
    threading.Event().wait(0.05)
    assert rig.device.reset()
    assert rig.device.in_flight() == 0
    assert host(path, 5 * 512, 512) == data
    assert rig.drivers[0].used_idx() == 1        # completed before the queues were dropped


def test_intx_path_without_event_idx(image, rig_factory):
    path, contents = image
    rig = rig_factory(FileDisk(path), rig_kw={"event_idx": False})
    assert rig.do_read(2, 512).data == contents[1024:1536]


class _MaskableMsix:
    """MSI-X with one maskable queue vector whose "irqfd" is any fd the test gives,
    handled like MsixConfig: under a re-entrant lock, listeners told before the guest's
    mask write completes; a masked vector only sets a pending bit."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.enabled = True
        self.masked = False
        self.pending = False
        self._lock = threading.RLock()
        self._listeners: list = []

    def trigger(self, v: int) -> None:
        with self._lock:
            if self.masked:
                self.pending = True
            else:
                os.write(self.fd, (1).to_bytes(8, "little"))

    def direct_eventfd(self, v: int) -> int | None:
        with self._lock:
            return None if self.masked or v != 1 else self.fd

    def add_listener(self, cb) -> None:
        with self._lock:
            self._listeners.append(cb)

    def remove_listener(self, cb) -> None:
        with self._lock:
            self._listeners.remove(cb)

    def mask(self) -> None:
        with self._lock:
            self.masked = True
            for cb in self._listeners:
                cb()


def drain(fd: int) -> int:
    n = 0
    while True:
        try:
            n += len(os.read(fd, 1 << 16))
        except BlockingIOError:
            return n


def _full_pipe() -> tuple[int, int]:
    """A pipe whose (blocking) write end is full: an engine writing it as an irqfd
    stalls there, holding its queue's lock, until the test reads."""
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    try:
        while True:
            os.write(wfd, bytes(4096))
    except BlockingIOError:
        pass
    os.set_blocking(wfd, True)
    return rfd, wfd


def _rig_with_maskable_irqfd(rig_factory, path, wfd: int, **kw):
    """(rig, msix): a rig whose queue vector is a _MaskableMsix writing fd wfd."""
    from vmmcore.virtio import VirtioInterrupt

    msix = _MaskableMsix(wfd)
    rig = rig_factory(FileDisk(path), activate=False, **kw)
    rig.interrupt = VirtioInterrupt(msix=msix, on_needs_reset=rig._on_reset)
    rig.activate()
    return rig, msix


def test_native_no_irqfd_write_after_the_mask_listener_returns(image, rig_factory, engine):
    """Once the MSI-X listener returned from a mask, the engine must not write the
    vector's irqfd any more: the guest may now rewrite the route, and the interrupt
    belongs in the pending bit. The irqfd here is a full pipe, so the engine's write
    stalls between "which fd?" and the write itself; the mask must wait for it (before,
    it returned at once and the write landed after it)."""
    if engine == "python":
        pytest.skip("native engine only")
    path, contents = image
    rfd, wfd = _full_pipe()
    try:
        rig, msix = _rig_with_maskable_irqfd(rig_factory, path, wfd)
        rig.read(3, 512)
        d = rig.drivers[0]
        deadline = time.monotonic() + TIMEOUT
        while d.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert d.used_idx() == 1
        time.sleep(0.05)                       # the engine is now stuck in the write
        masked = threading.Event()
        t = threading.Thread(target=lambda: (msix.mask(), masked.set()))
        t.start()
        waited = not masked.wait(0.2)           # the mask must wait for that write
        os.set_blocking(rfd, False)
        drained = 0
        while not masked.is_set() or drained == 0:
            try:
                drained += len(os.read(rfd, 1 << 16))
            except BlockingIOError:
                time.sleep(0.001)
        t.join(TIMEOUT)
        assert waited, "the mask returned while the engine was still writing the irqfd"
        drain(rfd)                              # everything written before it returned
        done = rig._reap(0)                     # (re-arms used_event)
        rig.read(5, 512)                        # masked now: the pending bit, no irqfd
        deadline = time.monotonic() + TIMEOUT
        while msix.pending is False and time.monotonic() < deadline:
            time.sleep(0.001)
        assert msix.pending and drain(rfd) == 0
        done += rig._reap(0)
        assert [r.data for r in done] == [contents[1536:2048], contents[2560:3072]]
    finally:
        os.close(rfd)
        os.close(wfd)


def test_native_mask_during_reset_still_reaches_the_engine(image, rig_factory, engine):
    """Reset waits for requests in flight; a mask while it waits must still stop their
    completions from writing the irqfd (before, stop() removed the MSI-X listener first:
    the mask returned at once and the next completion wrote the old route anyway)."""
    if engine == "python":
        pytest.skip("native engine only")
    path, _ = image
    rfd, wfd = _full_pipe()
    try:
        rig, msix = _rig_with_maskable_irqfd(rig_factory, path, wfd, io_threads=2,
                                             rig_kw={"event_idx": False})
        rig.read(3, 512, kick=False)
        rig.read(5, 512)                        # a batch: both go to the pool
        d = rig.drivers[0]
        deadline = time.monotonic() + TIMEOUT
        while d.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)                        # one completion stuck in the irqfd write
        reset = threading.Thread(target=rig.device.reset)
        reset.start()
        time.sleep(0.05)                        # reset now waits for it
        masked = threading.Event()
        t = threading.Thread(target=lambda: (msix.mask(), masked.set()))
        t.start()
        waited = not masked.wait(0.2)
        os.set_blocking(rfd, False)
        while not masked.is_set():
            drain(rfd)
            time.sleep(0.001)
        t.join(TIMEOUT)
        drain(rfd)                              # everything written before it returned
        reset.join(TIMEOUT)
        assert not reset.is_alive()
        assert waited, "the mask returned while a completion was writing the irqfd"
        assert drain(rfd) == 0, "a completion wrote the irqfd after the mask returned"
        assert d.used_idx() == 2
    finally:
        os.close(rfd)
        os.close(wfd)


def test_native_resize_racing_reset_never_uses_a_freed_engine(image, rig_factory, engine,
                                                              monkeypatch):
    """A resize (control thread) that read the engine pointer just before a reset
    (vCPU thread) stopped and freed the engine must not call into it afterwards."""
    if engine == "python":
        pytest.skip("native engine only")
    from vmm_virtio_blk import native

    real = native.lib
    freed: set[int] = set()
    used_after_free: list[str] = []
    entered = threading.Event()

    class SlowLib:
        def __getattr__(self, name):
            return getattr(real, name)

        def blk_engine_set_capacity(self, e, sectors):
            entered.set()
            time.sleep(0.3)                     # a GIL switch at the worst moment
            if int(native.ffi.cast("uintptr_t", e)) in freed:
                used_after_free.append("set_capacity")
                return None
            return real.blk_engine_set_capacity(e, sectors)

        def blk_engine_free(self, e):
            freed.add(int(native.ffi.cast("uintptr_t", e)))
            return real.blk_engine_free(e)

    monkeypatch.setattr(native, "lib", SlowLib())
    path, _ = image
    rig = rig_factory(FileDisk(path))
    t = threading.Thread(target=rig.device.set_capacity, args=(2 * MiB,))
    t.start()
    assert entered.wait(TIMEOUT)
    assert rig.device.reset()
    t.join(TIMEOUT)
    assert freed and not used_after_free


def _blocked_in_read(fd: int) -> bool:
    """Some thread of this process sits in read(fd) (/proc's syscall file: nr 0, fd)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if fields[:2] == ["0", hex(fd)]:
            return True
    return False


_DRAINER = """
import os, sys
fd, buf = int(sys.argv[1]), bytearray(8)
while True:
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        pass
"""


def _race_for_the_kick(kick: int, seconds: float) -> None:
    """Kick while another process keeps draining the eventfd (a second reader), until
    the engine was woken by poll() but found the counter drained: stuck in read() before
    the fix; never after it, so the race then runs for `seconds`."""
    drainer = subprocess.Popen([sys.executable, "-c", _DRAINER, str(kick)], pass_fds=[kick])
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(50):
                os.eventfd_write(kick, 1)
            if _blocked_in_read(kick):
                break
    finally:
        drainer.kill()
        drainer.wait()


def test_native_kick_drained_by_someone_else_does_not_hang_the_queue(image, rig_factory,
                                                                     engine):
    """The kick eventfd stays blocking for its other users; when one of them drains it
    between the engine's poll() and read(), the queue thread must find nothing to do,
    not sleep in read() forever (and reset, which joins it, with it)."""
    if engine == "python":
        pytest.skip("native engine only")
    path, contents = image
    rig = rig_factory(FileDisk(path), poll_us=0)
    kick = rig.kicks[0].fileno()
    assert os.get_blocking(kick)
    _race_for_the_kick(kick, 2.0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (rig.device.reset(), done.set()))
    t.start()
    hung = not done.wait(2.0)
    while not done.is_set():                    # free a stuck thread before failing
        os.eventfd_write(kick, 1)
        done.wait(0.05)
    t.join(TIMEOUT)
    assert not hung, "the queue thread blocked in read() on a drained kick eventfd"
    assert os.get_blocking(kick)                # what other users see is unchanged
