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

So the interrupt a guest sees is not one scheduler wake-up per completion when
completions come quickly: that is what a benchmark's driver must model to stand for a
guest on KVM. `HaltPoll.wait` does it for an eventfd (the device's MSI-X vector, which
KVM would take as an irqfd), with the parameters of this host's kvm module when it is
loaded, and KVM's x86 defaults otherwise.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from pathlib import Path

PARAMS = Path("/sys/module/kvm/parameters")


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


class HaltPoll:
    """One vCPU's halt-polling window, adapted after every halt as KVM adapts it."""

    def __init__(self, params: HaltPollParams) -> None:
        self.params = params
        self.window_ns = 0            # a vCPU starts without polling
        self.polled_wakeups = 0       # halts that ended inside the window
        self.sleeps = 0               # halts that went to the scheduler

    def wait(self, poller: select.poll, timeout_s: float) -> bool:
        """Halt until `poller` (the vector's eventfd) is ready; False after timeout_s."""
        start = time.perf_counter_ns()
        if self.window_ns:
            end = start + self.window_ns
            while True:
                if poller.poll(0):
                    self.polled_wakeups += 1
                    self._adapt(time.perf_counter_ns() - start)
                    return True
                if time.perf_counter_ns() >= end:
                    break
        self.sleeps += 1
        if not poller.poll(int(timeout_s * 1000)):
            return False
        self._adapt(time.perf_counter_ns() - start)
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
