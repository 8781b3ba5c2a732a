"""benchmarks/blk's workloads and what both of its sides share: the workload table and
the issue's targets, results, the tagged image and the offsets requests go to, CPU
accounting. The sides themselves: benchmarks.blk_device (the device model and its
driver) and benchmarks.blk (the raw side, the command line, the table)."""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import sys
import threading
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4096                      # tag granularity of the image
TAG = struct.Struct("<Q")
WRITE_BYTE = 0x5A                 # what the write workloads write
QUEUE_SIZE = 256                  # the device's default (plugin option queue_size)


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

