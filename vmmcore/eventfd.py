"""EventFd: the kernel object that carries queue kicks and interrupts.

KVM wires eventfds straight into the guest (KVM_IOEVENTFD for guest writes, KVM_IRQFD
for interrupts), and the sandbox hands them to device processes, so the hot path of a
device never goes through the main process. This thin wrapper owns one fd.
"""

from __future__ import annotations

import os


class EventFd:
    """A non-semaphore eventfd; write() adds to the counter, read() drains it."""

    def __init__(self, fd: int | None = None, *, nonblocking: bool = False) -> None:
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self.fd = os.eventfd(0, flags) if fd is None else fd

    def write(self, value: int = 1) -> None:
        """Signal the eventfd (add value to its counter)."""
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Wait for and return the counter, resetting it to zero."""
        return os.eventfd_read(self.fd)

    def try_read(self) -> int:
        """Return the counter without blocking (0 when not signalled); needs nonblocking."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
