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

The code: benchmarks.blk_workload (workloads, targets, the image, results),
benchmarks.blk_device (the device side and its driver), benchmarks.halt_poll (the
halted-vCPU model), and this module (the raw side, the command line, the table).

Reads check a tag (the 4 KiB block's number, written into every block of the image) in
every completed request; writes write a known pattern and the benchmark checks it in the
file afterwards. The image is created in --dir (default: the system temp directory) and
removed at the end. Nothing here asserts speed; it prints numbers for people to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import mmap
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `vmmcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.blk_device import DeviceSide  # noqa: E402
from benchmarks.blk_workload import (  # noqa: E402
    BLOCK,
    QUEUE_SIZE,
    TAG,
    WRITE_BYTE,
    KiB,
    MiB,
    Offsets,
    Result,
    Workload,
    check_write_pattern,
    make_image,
    median_result,
    self_cpu,
    target_for,
    workloads,
)
from benchmarks.halt_poll import HaltPollParams  # noqa: E402
from vmmcore.errors import VmmError  # noqa: E402

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
