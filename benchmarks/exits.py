"""Exit round trip: vmm's Python run loop against a minimal C KVM loop, side by side.

    python3 -m benchmarks.exits [--exits N] [--repeats R] [--kinds pio-out,mmio-read,...]
                                [--profile KIND]

For each kind of exit (port-IO OUT and IN, MMIO write and read) the same 16-bit
real-mode guest bytes run twice on this machine's /dev/kvm:

- C: benchmarks/exits_loop.c, compiled with gcc into a temporary directory on the spot,
  a bare KVM_RUN loop that handles each exit as a device minimally would (reads the data
  of a write, fills in the data of a read).
- vmm: vmmcore.kvm Kvm/Vm/Vcpu and VcpuRunLoop in its own vCPU thread, as `vmm run` uses
  them, with a trivial BusDevice on an io Bus or mmio Bus; the guest's HLT ends the loop
  (it reports POWEROFF to the VmEventSink).

- py floor: a bare Python loop making the same cffi KVM_RUN call and reading only the
  exit reason: what any Python VMM pays per exit before it does anything.

The guest gets N in ECX, does N accesses in a tight loop and halts. Each run is timed
from inside the thread that runs it, from the first KVM_RUN to the HLT exit, by wall
clock and by that thread's CPU time (which time spent preempted by other processes does
not inflate); C, floor and vmm runs alternate within each repeat and the medians are
printed, with the ratio vmm/C and the difference vmm - C (what the Python path adds per
exit). The "no-exit" row runs the same loop writing RAM instead, in one KVM_RUN: what the
guest's own instructions cost per iteration (on kvm-pvm, real-mode and ring-0 code is
emulated), which every other row includes once per exit.

Nothing here asserts speed; it prints numbers and ratios for people to read.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `vmmcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmmcore.bus import Bus, BusDevice  # noqa: E402
from vmmcore.errors import VmmError  # noqa: E402
from vmmcore.kvm import Kvm  # noqa: E402
from vmmcore.kvm.run_loop import VcpuRunLoop  # noqa: E402
from vmmcore.kvm.sys import lib  # noqa: E402
from vmmcore.memory import GuestMemory  # noqa: E402
from vmmcore.vm_events import VmEvent, VmEventSink  # noqa: E402

C_SOURCE = Path(__file__).resolve().parent / "exits_loop.c"

MEM_SIZE = 0x10000        # RAM at guest-physical 0, as in exits_loop.c
CODE_ADDR = 0x1000        # where the guest code goes and RIP starts (CS base 0)
PORT = 0xE9               # the port the PIO guests use
MMIO_ADDR = 0xD0000       # unmapped guest-physical address the MMIO guests use (DS=0xd000)


@dataclass(frozen=True)
class Guest:
    kind: str
    code: bytes
    exits_per_iteration: int   # IO/MMIO exits per loop iteration (0: RAM only)
    what: str


# 16-bit real-mode code; ECX holds the iteration count on entry.
#   loop: <access>; dec ecx (66 49); jnz loop; hlt (f4)
GUESTS = [
    Guest("pio-out", bytes.fromhex(
        "bae900"        # mov dx, 0xe9
        "b042"          # mov al, 0x42
        "ee"            # loop: out dx, al
        "6649"          # dec ecx
        "75fb"          # jnz loop
        "f4"),          # hlt
        1, "out dx, al (1 byte)"),
    Guest("pio-in", bytes.fromhex(
        "bae900"        # mov dx, 0xe9
        "ec"            # loop: in al, dx
        "6649"          # dec ecx
        "75fb"          # jnz loop
        "f4"),          # hlt
        1, "in al, dx (1 byte)"),
    Guest("mmio-write", bytes.fromhex(
        "b800d0"        # mov ax, 0xd000
        "8ed8"          # mov ds, ax          (DS base 0xd0000: unmapped)
        "b042"          # mov al, 0x42
        "a20000"        # loop: mov [0], al
        "6649"          # dec ecx
        "75f9"          # jnz loop
        "f4"),          # hlt
        1, "mov [0xd0000], al (1 byte)"),
    Guest("mmio-read", bytes.fromhex(
        "b800d0"        # mov ax, 0xd000
        "8ed8"          # mov ds, ax
        "a00000"        # loop: mov al, [0]
        "6649"          # dec ecx
        "75f9"          # jnz loop
        "f4"),          # hlt
        1, "mov al, [0xd0000] (1 byte)"),
    Guest("no-exit", bytes.fromhex(
        "b80008"        # mov ax, 0x0800
        "8ed8"          # mov ds, ax          (DS base 0x8000: RAM)
        "b042"          # mov al, 0x42
        "a20000"        # loop: mov [0], al
        "6649"          # dec ecx
        "75f9"          # jnz loop
        "f4"),          # hlt
        0, "same loop writing RAM: guest cost only"),
]
KINDS = [g.kind for g in GUESTS]


class CountingDevice(BusDevice):
    """The trivial device: keeps what it is written, answers reads with a constant."""

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0
        self.last = b""

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return b"\xa5" * size


# -- timing -------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One timed run, per exit (per iteration for no-exit): wall and thread CPU ns."""

    wall: float
    cpu: float


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.wall for s in samples),
                  statistics.median(s.cpu for s in samples))


def run_timed_thread(name: str, fn) -> tuple[int, int]:
    """Run fn in a new thread (as the vCPU thread of `vmm run` is) and time it from
    inside that thread, as exits_loop.c times its loop: (wall ns, thread CPU ns)."""
    out: list[int] = []

    def body() -> None:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
        out.extend((t1 - t0, c1 - c0))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if not out:
        sys.exit(f"benchmarks.exits: {name} thread failed")
    return out[0], out[1]


# -- the C baseline ---------------------------------------------------------------------

def build_c_loop(workdir: str, cc: str) -> str:
    exe = os.path.join(workdir, "exits_loop")
    cmd = [cc, "-O2", "-Wall", "-o", exe, str(C_SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmarks.exits: compiling {C_SOURCE.name} failed:\n{result.stderr}")
    return exe


def run_c(exe: str, guest: Guest, n: int) -> Sample:
    """One timed run of the C loop (it does its own untimed warm-up first)."""
    out = subprocess.run([exe, str(n), guest.code.hex(), "1"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmarks.exits: C loop failed on {guest.kind}: {out.stderr.strip()}")
    fields = out.stdout.split()
    exits, ns, cpu_ns = int(fields[1]), int(fields[3]), int(fields[5])
    expect = n * guest.exits_per_iteration
    if exits != expect:
        sys.exit(f"benchmarks.exits: C loop saw {exits} exits on {guest.kind}, "
                 f"expected {expect}")
    return Sample(ns / (exits or n), cpu_ns / (exits or n))


# -- the vmm path -----------------------------------------------------------------------

class VmmHarness:
    """One VM built with the project's own classes: Kvm, Vm, Vcpu, GuestMemory, Bus."""

    def __init__(self) -> None:
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.mem = GuestMemory([(0, MEM_SIZE)])
        region = self.mem.regions[0]
        self.vm.add_memory_region(region.guest_addr, region.size,
                                  self.mem.host_address(region))
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        self.device = CountingDevice()
        self.io_bus = Bus("io")
        self.io_bus.insert(self.device, PORT, 1)
        self.mmio_bus = Bus("mmio")
        self.mmio_bus.insert(self.device, MMIO_ADDR, 0x1000)

    def load(self, guest: Guest, n: int) -> None:
        """Guest code at CODE_ADDR (rest of RAM HLT), RIP there, ECX = n, as the C loop."""
        self.mem.fill(CODE_ADDR, MEM_SIZE - CODE_ADDR, 0xF4)
        self.mem.write(CODE_ADDR, guest.code)
        regs = self.vcpu.get_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
            setattr(regs, name, 0)
        regs.rip, regs.rflags, regs.rcx = CODE_ADDR, 2, n
        self.vcpu.set_regs(regs)

    def run_vmm(self, guest: Guest, n: int) -> Sample:
        """One run through VcpuRunLoop (its own _thread_main, in a thread of its own)."""
        self.load(guest, n)
        events = VmEventSink()
        loop = VcpuRunLoop(self.vcpu, self.io_bus, self.mmio_bus, events)
        before = self.device.writes + self.device.reads
        ns, cpu_ns = run_timed_thread("vcpu0", loop._thread_main)
        end = events.exit
        if end is None or end.event is not VmEvent.POWEROFF:
            sys.exit(f"benchmarks.exits: vmm run of {guest.kind} ended with {end}")
        accesses = self.device.writes + self.device.reads - before
        expect = n * guest.exits_per_iteration
        if accesses != expect or loop.exits != expect + 1:   # + the HLT exit
            sys.exit(f"benchmarks.exits: vmm run of {guest.kind}: device saw {accesses} "
                     f"accesses and the loop {loop.exits} exits, expected {expect} (+1 HLT)")
        return Sample(ns / (expect or n), cpu_ns / (expect or n))

    def run_floor(self, guest: Guest, n: int) -> Sample:
        """The least any Python VMM can do per exit: the same cffi KVM_RUN call in a bare
        loop that only reads the exit reason (no dispatch, no bus, no device)."""
        self.load(guest, n)
        fd, kvm_run, ioctl = self.vcpu.fd, lib.KVM_RUN, lib.vmm_ioctl_val
        run, reason_off, exit_hlt = self.vcpu.run_view, lib.VMM_RUN_EXIT_REASON, lib.KVM_EXIT_HLT
        unpack = struct.Struct("<I").unpack_from
        exits = [0]

        def bare() -> None:
            count = 0
            while True:
                if ioctl(fd, kvm_run, 0) < 0:
                    continue
                if unpack(run, reason_off)[0] == exit_hlt:
                    break
                count += 1
            exits[0] = count

        ns, cpu_ns = run_timed_thread("floor", bare)
        expect = n * guest.exits_per_iteration
        if exits[0] != expect:
            sys.exit(f"benchmarks.exits: bare loop saw {exits[0]} exits on {guest.kind}")
        return Sample(ns / (expect or n), cpu_ns / (expect or n))

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.mem.close()


def measure(harness: VmmHarness, exe: str, guest: Guest, n: int,
            repeats: int) -> tuple[Sample, Sample, Sample]:
    """Median (C, floor, vmm) samples; the three alternate within each repeat so that
    load from other processes falls on all of them alike."""
    harness.run_vmm(guest, min(n, 1000))          # warm-up (the C loop does its own)
    harness.run_floor(guest, min(n, 1000))
    c, floor, vmm = [], [], []
    for _ in range(repeats):
        c.append(run_c(exe, guest, n))
        floor.append(harness.run_floor(guest, n))
        vmm.append(harness.run_vmm(guest, n))
    return median_sample(c), median_sample(floor), median_sample(vmm)


def profile(harness: VmmHarness, guest: Guest, n: int, top: int) -> str:
    """cProfile of one VcpuRunLoop run (in the calling thread: cProfile only sees the
    thread it is enabled in). The profiler inflates the Python side several times over;
    read it for where the time goes, not for how much."""
    harness.run_vmm(guest, min(n, 1000))
    harness.load(guest, n)
    loop = VcpuRunLoop(harness.vcpu, harness.io_bus, harness.mmio_bus, VmEventSink())
    prof = cProfile.Profile()
    prof.enable()
    loop._thread_main()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def print_table(title: str, rows: list[tuple[Guest, Sample, Sample, Sample]], attr: str) -> None:
    print(title)
    header = (f"{'kind':<11} {'C ns/exit':>10} {'vmm ns/exit':>12} {'ratio vmm/C':>12} "
              f"{'vmm - C':>8} {'py floor':>9}  guest access")
    print(header)
    print("-" * (len(header) + 16))
    for guest, c, floor, vmm in rows:
        cv, fv, vv = getattr(c, attr), getattr(floor, attr), getattr(vmm, attr)
        print(f"{guest.kind:<11} {cv:>10.0f} {vv:>12.0f} {vv / cv:>12.2f} {vv - cv:>8.0f} "
              f"{fv:>9.0f}  {guest.what}")


@contextlib.contextmanager
def busy_thread(enabled: bool):
    """A pure-Python spinning thread for the duration, when enabled: it takes the GIL
    whenever the vCPU thread drops it for KVM_RUN, and the vCPU thread must then wait for
    the interpreter's switch interval to get it back after every exit."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=spin, name="busy", daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if enabled:
            thread.join()


# -- main -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.exits",
        description="PIO/MMIO exit round trip: vmm's VcpuRunLoop against a minimal C loop.")
    parser.add_argument("--exits", type=int, default=20000,
                        help="exits per timed run (default 20000: ~13 s in all on kvm-pvm)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per kind and side; the median is shown (default 5)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--cc", default=os.environ.get("CC", "gcc"), help="C compiler")
    parser.add_argument("--busy-thread", action="store_true",
                        help="keep a CPU-bound Python thread running in this process during "
                             "the runs (GIL contention, as a busy in-process device thread "
                             "would cause); use a small --exits, each exit then costs ~ms")
    parser.add_argument("--profile", metavar="KIND",
                        help="instead of the table, cProfile the vmm path for one kind")
    args = parser.parse_args(argv)
    if args.exits < 1 or args.repeats < 1:
        parser.error("--exits and --repeats must be at least 1")
    by_kind = {g.kind: g for g in GUESTS}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds + ([args.profile] if args.profile else []):
        if k not in by_kind:
            parser.error(f"unknown kind {k!r}; valid: {', '.join(KINDS)}")
    if shutil.which(args.cc) is None:
        parser.error(f"C compiler {args.cc!r} not found (set --cc or CC)")

    try:
        harness = VmmHarness()
    except VmmError as e:
        print(f"benchmarks.exits: {e}", file=sys.stderr)
        return 2
    try:
        if args.profile:
            print(profile(harness, by_kind[args.profile], args.exits, 25))
            return 0
        with tempfile.TemporaryDirectory(prefix="vmm-bench-exits-") as tmp:
            exe = build_c_loop(tmp, args.cc)
            print(f"exit round trip: {args.exits} exits per run, median of {args.repeats} "
                  f"runs; python {sys.version.split()[0]}, kernel {os.uname().release}")
            if args.busy_thread:
                print("with a CPU-bound Python thread running beside the vCPU thread "
                      f"(sys.getswitchinterval() = {sys.getswitchinterval() * 1e3:g} ms)")
            rows = []
            with busy_thread(args.busy_thread):
                for kind in kinds:
                    guest = by_kind[kind]
                    rows.append((guest, *measure(harness, exe, guest, args.exits,
                                                 args.repeats)))
            print()
            print_table("wall clock per exit (CLOCK_MONOTONIC, first KVM_RUN to HLT), ns",
                        rows, "wall")
            print()
            print_table("vCPU thread CPU time per exit (CLOCK_THREAD_CPUTIME_ID: not "
                        "inflated by other processes' load), ns", rows, "cpu")
            print()
            print("C: benchmarks/exits_loop.c; vmm: VcpuRunLoop + Bus + a trivial BusDevice; "
                  "py floor: a bare Python loop\nof the same cffi KVM_RUN call that only "
                  "reads the exit reason.")
            if "no-exit" in kinds:
                print("no-exit: per loop iteration, one KVM_RUN for the whole loop: what the "
                      "guest's own instructions cost\n(emulated on kvm-pvm); the other rows "
                      "include it once per exit.")
    finally:
        harness.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
