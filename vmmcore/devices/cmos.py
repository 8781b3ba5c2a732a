"""CMOS RAM and the MC146818 real-time clock at ports 0x70 (index) and 0x71 (data).

128 bytes of CMOS. Index writes keep bits 0-6: bit 7 is the NMI-disable bit on a PC and
is masked off (NMIs are not ours to gate). RTC registers:

    0x00 seconds  0x02 minutes  0x04 hours  0x06 day of week (1 = Sunday)
    0x07 day of month  0x08 month  0x09 year (two digits)  0x32 century
    0x01/0x03/0x05 alarms (plain RAM)
    0x0A register A: UIP (bit 7) is never set, so a guest polling it never waits;
         bits 0-6 are kept
    0x0B register B: bit 2 binary (else BCD), bit 1 24-hour (else 12-hour with bit 7 of
         the hours as PM), bit 7 SET (freezes the clock registers for the guest to
         write; clearing it again makes the guest's time current, kept as an offset
         from the host clock). Default 0x02 (BCD, 24-hour), as crosvm
    0x0C register C: no interrupt flags (reads 0)
    0x0D register D: valid RAM and time (bit 7) always set

The time is the host's current UTC (plus the guest's offset, if it set the clock).
Memory size registers, as crosvm's cmos.rs fills them from the guest memory size:
0x34/0x35 RAM between 16 MiB and the MMIO hole in 64 KiB units (at most 0xffff),
0x5b-0x5d RAM above 4 GiB in 64 KiB units (at most 0xffffff).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import BusDevice
from vmmcore.devices import read_bytewise, write_bytewise

INDEX = 0
DATA = 1
LENGTH = 2
CMOS_SIZE = 128
INDEX_MASK = 0x7F           # bit 7 is NMI disable

RTC_SECONDS = 0x00
RTC_MINUTES = 0x02
RTC_HOURS = 0x04
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32
TIME_REGS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
             RTC_MONTH, RTC_YEAR, RTC_CENTURY)

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26        # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET = 0x80
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H
REG_D_VRT = 0x80
HOURS_PM = 0x80

MEM_EXT_LOW = 0x34          # 0x34/0x35: RAM above 16 MiB (below the hole), 64 KiB units
MEM_HIGH = 0x5B             # 0x5b-0x5d: RAM above 4 GiB, 64 KiB units

SIXTEEN_MIB = 16 * layout.MiB
UNIT = 64 * layout.KiB


def _now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def to_bcd(value: int) -> int:
    return ((value // 10) % 10) << 4 | (value % 10)


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class Cmos(BusDevice):
    """CMOS RAM and RTC; a BusDevice over 0x70..0x71.

    Cmos(mem_size, *, now=None)
      mem_size  guest RAM in bytes (split around the MMIO hole as layout.ram_ranges)
      now       returns the current time as an aware datetime (default: UTC now);
                for tests
    """

    def __init__(self, mem_size: int, *, now: Callable[[], dt.datetime] | None = None) -> None:
        self._now = now or _now_utc
        self._lock = threading.Lock()
        self.index = 0
        self.data = bytearray(CMOS_SIZE)
        self.data[RTC_REG_A] = REG_A_DEFAULT
        self.data[RTC_REG_B] = REG_B_DEFAULT
        self.data[RTC_REG_D] = REG_D_VRT
        self.offset = dt.timedelta(0)    # guest-set time minus host time

        mem_size = max(0, int(mem_size))
        below = min(mem_size, layout.MMIO_HOLE_START)
        above = mem_size - below
        ext = min(0xFFFF, max(0, below - SIXTEEN_MIB) // UNIT)
        self.data[MEM_EXT_LOW] = ext & 0xFF
        self.data[MEM_EXT_LOW + 1] = ext >> 8
        high = min(0xFFFFFF, above // UNIT)
        self.data[MEM_HIGH] = high & 0xFF
        self.data[MEM_HIGH + 1] = (high >> 8) & 0xFF
        self.data[MEM_HIGH + 2] = high >> 16

    def debug_label(self) -> str:
        return "cmos"

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return read_bytewise(self._read_reg, LENGTH, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            write_bytewise(self._write_reg, LENGTH, offset, data)

    # Internals -----------------------------------------------------------------------

    def _read_reg(self, off: int) -> int:
        if off == INDEX:
            return self.index
        return self._read_data(self.index)

    def _write_reg(self, off: int, value: int) -> None:
        if off == INDEX:
            self.index = value & INDEX_MASK
        else:
            self._write_data(self.index, value)

    def _binary(self) -> bool:
        return bool(self.data[RTC_REG_B] & REG_B_DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._binary() else from_bcd(value)

    def _clock(self) -> dt.datetime:
        return self._now() + self.offset

    def _read_data(self, index: int) -> int:
        if index in TIME_REGS and not self.data[RTC_REG_B] & REG_B_SET:
            return self._time_reg(index, self._clock())
        if index == RTC_REG_A:
            return self.data[RTC_REG_A] & ~REG_A_UIP
        if index == RTC_REG_C:
            return 0
        if index == RTC_REG_D:
            return REG_D_VRT
        return self.data[index]

    def _time_reg(self, index: int, t: dt.datetime) -> int:
        if index == RTC_SECONDS:
            return self._encode(t.second)
        if index == RTC_MINUTES:
            return self._encode(t.minute)
        if index == RTC_HOURS:
            if self.data[RTC_REG_B] & REG_B_24H:
                return self._encode(t.hour)
            hour12 = t.hour % 12 or 12
            return self._encode(hour12) | (HOURS_PM if t.hour >= 12 else 0)
        if index == RTC_DAY_OF_WEEK:
            return self._encode(t.isoweekday() % 7 + 1)   # Sunday = 1
        if index == RTC_DAY_OF_MONTH:
            return self._encode(t.day)
        if index == RTC_MONTH:
            return self._encode(t.month)
        if index == RTC_YEAR:
            return self._encode(t.year % 100)
        return self._encode(t.year // 100)               # RTC_CENTURY

    def _write_data(self, index: int, value: int) -> None:
        if index == RTC_REG_A:
            self.data[index] = value & ~REG_A_UIP
        elif index == RTC_REG_B:
            old = self.data[index]
            if value & REG_B_SET and not old & REG_B_SET:
                self._freeze()
            self.data[index] = value
            if old & REG_B_SET and not value & REG_B_SET:
                self._thaw()
        elif index in (RTC_REG_C, RTC_REG_D):
            pass                                          # read-only
        else:
            self.data[index] = value

    def _freeze(self) -> None:
        """SET was raised: latch the current time where the guest can rewrite it."""
        t = self._clock()
        for index in TIME_REGS:
            self.data[index] = self._time_reg(index, t)

    def _thaw(self) -> None:
        """SET was cleared: the time the guest wrote becomes the clock's time."""
        d = self.data
        now = self._now()
        try:
            hour_reg = d[RTC_HOURS]
            if d[RTC_REG_B] & REG_B_24H:
                hour = self._decode(hour_reg)
            else:
                hour = self._decode(hour_reg & ~HOURS_PM) % 12
                if hour_reg & HOURS_PM:
                    hour += 12
            year = self._decode(d[RTC_CENTURY]) * 100 + self._decode(d[RTC_YEAR])
            if year < 1970:     # a guest that never wrote the century
                year = 2000 + self._decode(d[RTC_YEAR])
            guest = dt.datetime(year, self._decode(d[RTC_MONTH]),
                                self._decode(d[RTC_DAY_OF_MONTH]), hour,
                                self._decode(d[RTC_MINUTES]), self._decode(d[RTC_SECONDS]),
                                tzinfo=now.tzinfo)
        except (ValueError, OverflowError):
            return              # garbage: keep the clock as it was
        self.offset = guest - now.replace(microsecond=0)
