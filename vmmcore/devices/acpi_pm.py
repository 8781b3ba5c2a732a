"""ACPI fixed hardware: the PM1a event block and PM1a control block (see the FADT).

One BusDevice over layout.ACPI_PM_BASE, layout.ACPI_PM_SIZE (8 ports):

    offset 0  PM1a_STS (u16)  write 1 to clear; bit 8 PWRBTN_STS, bit 15 WAK_STS
    offset 2  PM1a_EN  (u16)  bit 8 PWRBTN_EN
    offset 4  PM1a_CNT (u16)  bit 0 SCI_EN (always reads 1: we are always in ACPI
                              mode), SLP_TYP bits 10-12, SLP_EN bit 13 (write-only)
    offset 6,7                reserved: read 0, writes ignored

Registers are byte-addressable: an access of any size at any offset touches the bytes
it covers, and a control write is acted on once all its bytes are in. Writing SLP_EN
with SLP_TYP == layout.S5_SLP_TYP (the DSDT's \\_S5) powers the VM off
(VmEvent.POWEROFF); any other sleep type is ignored (no S1-S4 here). The SCI is a level:
it is asserted (Interrupt.set_level(True)) while an enabled status bit is set, and
dropped when the guest clears it.
"""

from __future__ import annotations

import threading

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import BusDevice
from vmmcore.devices import read_bytewise, write_bytewise
from vmmcore.interrupts import Interrupt
from vmmcore.vm_events import VmEvent, VmEventSink

STS = layout.PM1A_EVT_BLK - layout.ACPI_PM_BASE     # 0
EN = STS + 2                                          # 2
CNT = layout.PM1A_CNT_BLK - layout.ACPI_PM_BASE     # 4
LENGTH = layout.ACPI_PM_SIZE

STS_TMR = 1 << 0
STS_BM = 1 << 4
STS_GBL = 1 << 5
STS_PWRBTN = 1 << 8
STS_SLPBTN = 1 << 9
STS_RTC = 1 << 10
STS_WAK = 1 << 15
STS_MASK = STS_TMR | STS_BM | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC | STS_WAK

EN_TMR = 1 << 0
EN_GBL = 1 << 5
EN_PWRBTN = 1 << 8
EN_SLPBTN = 1 << 9
EN_RTC = 1 << 10
EN_MASK = EN_TMR | EN_GBL | EN_PWRBTN | EN_SLPBTN | EN_RTC

CNT_SCI_EN = 1 << 0
CNT_BM_RLD = 1 << 1
CNT_GBL_RLS = 1 << 2        # write-only
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP_MASK = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13        # write-only
CNT_KEEP = CNT_BM_RLD | CNT_SLP_TYP_MASK   # bits that read back as written

POWEROFF_MESSAGE = "guest powered off (ACPI S5)"


class AcpiPmDevice(BusDevice):
    """PM1a event and control blocks; a BusDevice over ACPI_PM_BASE..+ACPI_PM_SIZE.

    AcpiPmDevice(events, sci=None)
      events  the VmEventSink that gets VmEvent.POWEROFF (status 0) on S5
      sci     the SCI Interrupt (layout.SCI_IRQ); None: no SCI
    """

    def __init__(self, events: VmEventSink, sci: Interrupt | None = None) -> None:
        self.events = events
        self.sci = sci
        self._lock = threading.Lock()   # press_power_button() comes from other threads
        self.status = 0
        self.enable = 0
        self.control = CNT_SCI_EN
        self._sci_level = False
        self._wrote_control = False
        self._pending_slp_en = False
        self.poweroff_count = 0

    def debug_label(self) -> str:
        return "acpi-pm"

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return read_bytewise(self._read_byte, LENGTH, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._wrote_control = False
            write_bytewise(self._write_byte, LENGTH, offset, data)
            sleep = self._wrote_control and self._pending_slp_en
            self._pending_slp_en = False
            self._update_sci()
        if sleep:
            self._sleep(self._slp_typ())

    def press_power_button(self) -> None:
        """Set PWRBTN_STS; the SCI rises if the guest enabled PWRBTN_EN (the guest's
        ACPI driver then shuts down, ending in an S5 write)."""
        with self._lock:
            self.status |= STS_PWRBTN
            self._update_sci()

    @property
    def sci_asserted(self) -> bool:
        return self._sci_level

    # Internals -----------------------------------------------------------------------

    def _slp_typ(self) -> int:
        return (self.control & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT

    def _read_byte(self, off: int) -> int:
        if off < EN:
            reg = self.status
        elif off < CNT:
            reg = self.enable
        elif off < CNT + 2:
            reg = (self.control & CNT_KEEP) | CNT_SCI_EN
        else:
            return 0
        return (reg >> (8 * (off & 1))) & 0xFF

    def _write_byte(self, off: int, value: int) -> None:
        shift = 8 * (off & 1)
        bits = value << shift
        if off < EN:
            self.status &= ~(bits & STS_MASK)          # write 1 to clear
        elif off < CNT:
            self.enable = (self.enable & ~(0xFF << shift)) | (bits & EN_MASK)
        elif off < CNT + 2:
            self.control = (self.control & ~(0xFF << shift)) | (bits & CNT_KEEP) | CNT_SCI_EN
            self._wrote_control = True
            if off & 1:                                 # the byte holding SLP_EN
                self._pending_slp_en = bool(bits & CNT_SLP_EN)

    def _update_sci(self) -> None:
        level = bool(self.status & self.enable & EN_MASK)
        if level != self._sci_level:
            self._sci_level = level
            if self.sci is not None:
                self.sci.set_level(level)

    def _sleep(self, slp_typ: int) -> None:
        if slp_typ == layout.S5_SLP_TYP:
            self.poweroff_count += 1
            self.events.report(VmEvent.POWEROFF, 0, POWEROFF_MESSAGE)
