"""Legacy INTx: a PCI interrupt pin wired to an IOAPIC input, level-triggered.

INTx is level-triggered and shared, which an eventfd cannot express by itself. KVM's
answer (KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE) is used here as crosvm and QEMU's VFIO
do: writing the irq eventfd asserts the GSI; when the guest EOIs the interrupt KVM
de-asserts it and signals the resample eventfd; the device then re-asserts if its
condition still holds. So the line is "high while pending" without the main process
taking part.

Pins are routed to IOAPIC GSIs 16-19 by the usual swizzle, GSI = 16 + (dev + pin) % 4
(pin 0 = INTA), which the ACPI _PRT (and the MP table, without ACPI) must repeat.
"""

from __future__ import annotations

import os
import threading

from vmmcore.eventfd import EventFd
from vmmcore.pci.config_space import COMMAND_INTX_DISABLE, STATUS_INTERRUPT, PciConfiguration

INTX_FIRST_GSI = 16
INTX_NUM_GSIS = 4            # GSIs 16-19; 20-23 stay free IOAPIC inputs
PIN_NAMES = {1: "INTA", 2: "INTB", 3: "INTC", 4: "INTD"}


def intx_gsi(device: int, pin: int) -> int:
    """The IOAPIC GSI of device's pin (1=INTA..4=INTD, as in the Interrupt Pin register)."""
    if pin not in PIN_NAMES:
        raise ValueError(f"INTx pin {pin} is not 1-4 (INTA-INTD)")
    if not 0 <= device <= 31:
        raise ValueError(f"PCI device number {device} is not 0-31")
    return INTX_FIRST_GSI + (device + pin - 1) % INTX_NUM_GSIS


def prt_entries(devices: range = range(1, 32)) -> list[tuple[int, int, int]]:
    """(_PRT Address, Pin 0-3, GSI) for each device and pin: what the DSDT must say.

    Address is (device << 16) | 0xFFFF (any function), Pin 0 = INTA.
    """
    return [((dev << 16) | 0xFFFF, pin - 1, intx_gsi(dev, pin))
            for dev in devices for pin in PIN_NAMES]


class PciIntx:
    """One function's INTx line; implements vmmcore.interrupts.Interrupt.

    set_level(True) when the device's interrupt condition arises, set_level(False)
    when the guest acknowledged it (e.g. virtio's ISR read). The owner of the device's
    event loop waits on resample_evt and calls handle_resample().
    """

    def __init__(self, gsi: int, pin: int, irq_evt: EventFd, resample_evt: EventFd,
                 config: PciConfiguration | None = None) -> None:
        self.gsi = gsi
        self.pin = pin
        self.irq_evt = irq_evt
        self.resample_evt = resample_evt
        self._config = config
        self._lock = threading.Lock()
        self._pending = False
        # handle_resample() drains it without blocking, whatever flags its creator used.
        os.set_blocking(resample_evt.fd, False)

    def bind_config(self, config: PciConfiguration) -> None:
        """The device's config space: Interrupt Status and Interrupt Disable live there."""
        self._config = config

    @property
    def pending(self) -> bool:
        return self._pending

    def _disabled(self) -> bool:
        return self._config is not None and bool(self._config.command & COMMAND_INTX_DISABLE)

    def _assert(self) -> None:
        if self._pending and not self._disabled():
            self.irq_evt.write(1)

    def set_level(self, high: bool) -> None:
        """Raise or lower the line; the status register's Interrupt Status follows it."""
        with self._lock:
            was = self._pending
            self._pending = high
            if self._config is not None:
                self._config.set_status_bits(STATUS_INTERRUPT, high)
            if high and not was:
                self._assert()

    def trigger(self) -> None:
        """An edge has no meaning on INTx: it raises the level until set_level(False)."""
        self.set_level(True)

    def handle_resample(self) -> None:
        """KVM de-asserted the line at EOI: assert it again while still pending."""
        self.resample_evt.try_read()
        with self._lock:
            self._assert()

    def refresh(self) -> None:
        """Call after the guest cleared Interrupt Disable, to assert a pending level."""
        with self._lock:
            self._assert()
