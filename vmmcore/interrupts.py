"""Interrupt lines as devices see them.

A device model only ever calls trigger() (edge) or set_level() (level); whether that
becomes a KVM_IRQFD write, a KVM_IRQ_LINE ioctl, an MSI or a test's callback is decided
by whoever wired the device. That keeps device models free of KVM and testable alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vmmcore.eventfd import EventFd


class Interrupt(Protocol):
    """What a device holds to raise its interrupt."""

    def trigger(self) -> None:
        """Signal an edge (or a level-triggered pulse) to the interrupt controller."""

    def set_level(self, high: bool) -> None:
        """Drive a level-triggered line high or low."""


class IrqFdInterrupt:
    """An edge interrupt delivered by writing an eventfd registered with KVM_IRQFD."""

    def __init__(self, evt: EventFd) -> None:
        self.evt = evt

    def trigger(self) -> None:
        self.evt.write(1)

    def set_level(self, high: bool) -> None:
        if high:
            self.evt.write(1)


class CallbackInterrupt:
    """An interrupt that calls back into Python: for KVM_IRQ_LINE and for tests."""

    def __init__(self, set_line: Callable[[bool], None]) -> None:
        self._set_line = set_line
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        self._set_line(True)
        self._set_line(False)

    def set_level(self, high: bool) -> None:
        if high:
            self.count += 1
        self._set_line(high)
