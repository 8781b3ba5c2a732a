"""How a KVM vCPU waits for an interrupt: halt polling, then sleep.

A guest that waits for a device's interrupt executes HLT. With the interrupt controller
in the kernel, KVM does not put the vCPU thread to sleep at once: it first polls for a
wake-up (an interrupt made pending, e.g. by an irqfd written by a device) for up to a
per-vCPU window, and only then calls the scheduler (virt/kvm/kvm_main.c, kvm_vcpu_halt;
Documentation/virt/kvm/halt-polling.rst). The window adapts to how long halts last:

- a wake-up inside the window leaves it as it is;
- a halt longer than the window but shorter than the module's halt_poll_ns grows it
  (times halt_poll_ns_grow, starting from halt_poll_ns_grow_start, capped at
  halt_poll_ns);
- a halt longer than halt_poll_ns shrinks it (divided by halt_poll_ns_shrink; below
  halt_poll_ns_grow_start it drops to 0).

KVM also stops polling as soon as another task is runnable on the CPU
(kvm_vcpu_can_poll: single_task_running()), so a polling vCPU never keeps the CPU from
other work; the model approximates that with the kernel's count of runnable tasks
(/proc/loadavg): polling stops once there are more than the online CPUs. That is a
system-wide count where KVM looks at one CPU's run queue, so it stops polling at least
as often as KVM would.

So the interrupt a guest sees is not one scheduler wake-up per completion when
completions come quickly: that is what a benchmark's driver must model to stand for a
guest on KVM. `HaltPoll.wait` does it for an eventfd (the device's MSI-X vector, which
KVM would take as an irqfd), with the parameters of this host's kvm module when it is
loaded, and KVM's x86 defaults otherwise.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PARAMS = Path("/sys/module/kvm/parameters")
LOADAVG = "/proc/loadavg"
CONTENTION_EVERY = 8              # polling spins between two looks at the run queues


@dataclass(frozen=True)
class HaltPollParams:
    """The kvm module's halt-polling parameters (nanoseconds and factors)."""

    max_ns: int = 200_000          # halt_poll_ns: KVM_HALT_POLL_NS_DEFAULT on x86
    grow: int = 2                  # halt_poll_ns_grow
    grow_start: int = 10_000       # halt_poll_ns_grow_start
    shrink: int = 2                # halt_poll_ns_shrink

    @classmethod
    def from_host(cls, params: Path = PARAMS) -> tuple[HaltPollParams, str]:
        """This host's kvm module parameters, and where they came from."""
        names = {"max_ns": "halt_poll_ns", "grow": "halt_poll_ns_grow",
                 "grow_start": "halt_poll_ns_grow_start", "shrink": "halt_poll_ns_shrink"}
        try:
            values = {k: int((params / name).read_text()) for k, name in names.items()}
        except (OSError, ValueError):
            return cls(), "KVM's x86 defaults (no kvm module parameters here)"
        return cls(**values), f"this host's kvm module ({params})"


class RunnableTasks:
    """Whether tasks wait for a CPU: more runnable tasks (the 4th field of /proc/loadavg,
    nr_running, system-wide, this thread included) than online CPUs. ~1.5 µs a call."""

    def __init__(self, path: str = LOADAVG) -> None:
        self.cpus = os.cpu_count() or 1
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1              # no procfs: never seen as contended

    def __call__(self) -> bool:
        if self.fd < 0:
            return False
        fields = os.pread(self.fd, 128, 0).split()
        return int(fields[3].split(b"/")[0]) > self.cpus

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HaltPoll:
    """One vCPU's halt-polling window, adapted after every halt as KVM adapts it.

    `contended` says whether another task wants this CPU (KVM: !single_task_running());
    polling stops as soon as it does."""

    def __init__(self, params: HaltPollParams,
                 contended: Callable[[], bool] = lambda: False) -> None:
        self.params = params
        self.contended = contended
        self.window_ns = 0            # a vCPU starts without polling
        self.polled_wakeups = 0       # halts that ended inside the window
        self.sleeps = 0               # halts that went to the scheduler

    def wait(self, poller: select.poll, timeout_s: float) -> bool:
        """Halt until `poller` (the vector's eventfd) is ready; False after timeout_s."""
        if self.window_ns and poller.poll(0):     # already pending: no halt to time
            self.polled_wakeups += 1
            return True
        start = time.perf_counter_ns()
        if self.window_ns and self._poll(poller, start + self.window_ns):
            self.polled_wakeups += 1
            self._adapt(time.perf_counter_ns() - start)
            return True
        self.sleeps += 1
        if not poller.poll(int(timeout_s * 1000)):
            return False
        self._adapt(time.perf_counter_ns() - start)
        return True

    def _poll(self, poller: select.poll, end: int) -> bool:
        """Spin until the interrupt is pending (True), the window ends at `end` or another
        task wants the CPU; KVM looks once more before it schedules."""
        spins = 0
        while not poller.poll(0):                   # ~0.4 µs
            spins += 1
            # KVM's contention check is a memory read; this one costs ~1.5 µs, so it is
            # made every CONTENTION_EVERY spins (a few µs) to keep the wake-up prompt
            if time.perf_counter_ns() >= end or (
                    not spins % CONTENTION_EVERY and self.contended()):
                return bool(poller.poll(0))
        return True

    def _adapt(self, halt_ns: int) -> None:
        p, window = self.params, self.window_ns
        if not p.max_ns:
            self.window_ns = 0
        elif halt_ns <= window:
            pass                                            # the poll worked
        elif window and halt_ns > p.max_ns:
            self._shrink()                                  # a long halt
        elif window < p.max_ns and halt_ns < p.max_ns:
            self._grow()                                    # short, but missed

    def _grow(self) -> None:
        p = self.params
        if p.grow:
            self.window_ns = min(max(self.window_ns * p.grow, p.grow_start), p.max_ns)

    def _shrink(self) -> None:
        p = self.params
        window = self.window_ns // p.shrink if p.shrink else 0
        self.window_ns = window if window >= p.grow_start else 0
