"""How the VM ends: the one place that decides `vmm run`'s exit status.

Any thread (a vCPU seeing SHUTDOWN, the ACPI power-off register, the i8042 reset line,
a test guest's exit port, a dying device) reports here; the first report wins, every
vCPU is then kicked out of KVM_RUN and the VMM shuts down cleanly.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass


class VmEvent(enum.Enum):
    """Why the VM stopped."""

    POWEROFF = "poweroff"      # guest powered off (ACPI S5, exit port with status 0)
    RESET = "reset"            # guest asked for a reset; like crosvm we exit instead
    GUEST_EXIT = "guest-exit"  # a test guest wrote its result to the exit port
    CRASH = "crash"            # triple fault, internal error, failed entry
    ERROR = "error"            # the VMM itself failed (a device died, a bug)
    STOPPED = "stopped"        # stopped from outside (signal, control socket)


@dataclass(frozen=True)
class VmExit:
    """The first reported end of the VM."""

    event: VmEvent
    status: int
    message: str


class VmEventSink:
    """Collects the first end-of-VM report and wakes whoever waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._exit: VmExit | None = None
        self._listeners: list = []

    def report(self, event: VmEvent, status: int = 0, message: str = "") -> bool:
        """Record how the VM ended; returns False if an earlier report already won."""
        with self._lock:
            if self._exit is not None:
                return False
            self._exit = VmExit(event, status, message or event.value)
            listeners = list(self._listeners)
        self._done.set()
        for listener in listeners:
            listener(self._exit)
        return True

    def add_listener(self, fn) -> None:
        """Call fn(VmExit) once when the VM ends (e.g. to kick the vCPUs)."""
        with self._lock:
            if self._exit is None:
                self._listeners.append(fn)
                return
        fn(self._exit)

    @property
    def exit(self) -> VmExit | None:
        return self._exit

    def is_set(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> VmExit | None:
        self._done.wait(timeout)
        return self._exit
