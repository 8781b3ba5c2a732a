"""The CMOS/RTC model (tier 1: no KVM)."""

from __future__ import annotations

import datetime as dt

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus, BusDevice
from vmmcore.devices import cmos as c
from vmmcore.devices.cmos import Cmos, from_bcd, to_bcd

MiB = layout.MiB
GiB = layout.GiB
# A Thursday afternoon.
NOW = dt.datetime(2026, 11, 26, 14, 5, 9, 123456, tzinfo=dt.UTC)


class Clock:
    def __init__(self, t: dt.datetime = NOW) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def make(mem: int = 256 * MiB, clock: Clock | None = None) -> Cmos:
    return Cmos(mem, now=clock or Clock())


def get(dev: Cmos, index: int) -> int:
    dev.write(0, bytes([index]))
    return dev.read(1, 1)[0]


def put(dev: Cmos, index: int, value: int) -> None:
    dev.write(0, bytes([index]))
    dev.write(1, bytes([value]))


def test_bcd_helpers():
    assert to_bcd(59) == 0x59 and from_bcd(0x59) == 59
    assert to_bcd(0) == 0 and to_bcd(99) == 0x99


def test_default_is_bcd_24h():
    dev = make()
    assert isinstance(dev, BusDevice)
    assert get(dev, c.RTC_REG_B) == 0x02
    assert get(dev, c.RTC_SECONDS) == 0x09
    assert get(dev, c.RTC_MINUTES) == 0x05
    assert get(dev, c.RTC_HOURS) == 0x14
    assert get(dev, c.RTC_DAY_OF_WEEK) == 5          # Sunday = 1, Thursday = 5
    assert get(dev, c.RTC_DAY_OF_MONTH) == 0x26
    assert get(dev, c.RTC_MONTH) == 0x11
    assert get(dev, c.RTC_YEAR) == 0x26
    assert get(dev, c.RTC_CENTURY) == 0x20


def test_binary_mode():
    dev = make()
    put(dev, c.RTC_REG_B, c.REG_B_24H | c.REG_B_DM_BINARY)
    assert get(dev, c.RTC_SECONDS) == 9
    assert get(dev, c.RTC_HOURS) == 14
    assert get(dev, c.RTC_DAY_OF_MONTH) == 26
    assert get(dev, c.RTC_MONTH) == 11
    assert get(dev, c.RTC_YEAR) == 26
    assert get(dev, c.RTC_CENTURY) == 20


@pytest.mark.parametrize("hour, bcd12, bin12", [
    (0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11),
    (12, 0x80 | 0x12, 0x80 | 12), (14, 0x80 | 0x02, 0x80 | 2), (23, 0x80 | 0x11, 0x80 | 11),
])
def test_12_hour_mode(hour, bcd12, bin12):
    dev = make(clock=Clock(NOW.replace(hour=hour)))
    put(dev, c.RTC_REG_B, 0)
    assert get(dev, c.RTC_HOURS) == bcd12
    put(dev, c.RTC_REG_B, c.REG_B_DM_BINARY)
    assert get(dev, c.RTC_HOURS) == bin12


def test_time_follows_the_clock():
    clock = Clock()
    dev = make(clock=clock)
    assert get(dev, c.RTC_SECONDS) == 0x09
    clock.t = NOW + dt.timedelta(seconds=60)
    assert get(dev, c.RTC_MINUTES) == 0x06


def test_default_clock_is_host_utc():
    dev = Cmos(256 * MiB)
    put(dev, c.RTC_REG_B, c.REG_B_24H | c.REG_B_DM_BINARY)
    before = dt.datetime.now(dt.UTC)
    year = get(dev, c.RTC_CENTURY) * 100 + get(dev, c.RTC_YEAR)
    hour = get(dev, c.RTC_HOURS)
    after = dt.datetime.now(dt.UTC)
    assert year in (before.year, after.year)
    assert hour in (before.hour, after.hour)


def test_register_a_uip_never_set_and_d_valid():
    dev = make()
    for _ in range(1000):
        assert not get(dev, c.RTC_REG_A) & c.REG_A_UIP
    put(dev, c.RTC_REG_A, 0xFF)
    assert get(dev, c.RTC_REG_A) == 0x7F
    assert get(dev, c.RTC_REG_D) == c.REG_D_VRT
    put(dev, c.RTC_REG_D, 0)
    assert get(dev, c.RTC_REG_D) == c.REG_D_VRT
    assert get(dev, c.RTC_REG_C) == 0


def test_nmi_bit_is_masked_from_the_index():
    dev = make()
    dev.write(0, bytes([0x80 | c.RTC_CENTURY]))
    assert dev.read(0, 1)[0] == c.RTC_CENTURY
    assert dev.read(1, 1)[0] == 0x20
    put(dev, 0x80 | 0x40, 0xAB)
    assert get(dev, 0x40) == 0xAB


def test_ram_bytes_read_back():
    dev = make()
    for i in range(0x0E, 0x80):
        if i in (c.RTC_CENTURY,):
            continue
        put(dev, i, i ^ 0x5A)
    for i in range(0x0E, 0x80):
        if i in (c.RTC_CENTURY,):
            continue
        assert get(dev, i) == i ^ 0x5A


def mem_regs(dev: Cmos) -> tuple[int, int]:
    ext = get(dev, 0x34) | get(dev, 0x35) << 8
    high = get(dev, 0x5B) | get(dev, 0x5C) << 8 | get(dev, 0x5D) << 16
    return ext, high


@pytest.mark.parametrize("mem, ext, high", [
    (16 * MiB, 0, 0),
    (8 * MiB, 0, 0),
    (256 * MiB, (240 * MiB) >> 16, 0),
    (3 * GiB, (3 * GiB - 16 * MiB) >> 16, 0),                 # exactly up to the hole
    (4 * GiB, (3 * GiB - 16 * MiB) >> 16, (1 * GiB) >> 16),   # 1 GiB moved above 4 GiB
    (16 * GiB, (3 * GiB - 16 * MiB) >> 16, (13 * GiB) >> 16),
    (2**50, (3 * GiB - 16 * MiB) >> 16, 0xFFFFFF),             # clamped to 24 bits
])
def test_memory_size_registers(mem, ext, high):
    assert layout.MMIO_HOLE_START == 3 << 30
    assert mem_regs(make(mem)) == (ext, high)


def test_guest_can_set_the_clock_with_set_bit():
    clock = Clock()
    dev = make(clock=clock)
    put(dev, c.RTC_REG_B, c.REG_B_SET | c.REG_B_24H)
    # Frozen while SET: the registers hold what the guest writes.
    clock.t = NOW + dt.timedelta(seconds=5)
    assert get(dev, c.RTC_SECONDS) == 0x09
    for reg, value in ((c.RTC_SECONDS, 0x30), (c.RTC_MINUTES, 0x45), (c.RTC_HOURS, 0x08),
                       (c.RTC_DAY_OF_MONTH, 0x01), (c.RTC_MONTH, 0x02), (c.RTC_YEAR, 0x27),
                       (c.RTC_CENTURY, 0x20)):
        put(dev, reg, value)
    put(dev, c.RTC_REG_B, c.REG_B_24H)
    assert (get(dev, c.RTC_HOURS), get(dev, c.RTC_MINUTES), get(dev, c.RTC_SECONDS)) == \
        (0x08, 0x45, 0x30)
    assert (get(dev, c.RTC_YEAR), get(dev, c.RTC_MONTH), get(dev, c.RTC_DAY_OF_MONTH)) == \
        (0x27, 0x02, 0x01)
    clock.t += dt.timedelta(seconds=10)
    assert get(dev, c.RTC_SECONDS) == 0x40


def test_garbage_time_under_set_keeps_the_clock():
    dev = make()
    put(dev, c.RTC_REG_B, c.REG_B_SET | c.REG_B_24H)
    put(dev, c.RTC_MONTH, 0x99)
    put(dev, c.RTC_DAY_OF_MONTH, 0xFF)
    put(dev, c.RTC_REG_B, c.REG_B_24H)
    assert get(dev, c.RTC_MONTH) == 0x11
    assert dev.offset == dt.timedelta(0)


def test_on_the_bus():
    bus = Bus("io")
    dev = make()
    bus.insert(dev, layout.CMOS_PORT, 2)
    bus.write(0x70, bytes([c.RTC_YEAR]))
    assert bus.read(0x71, 1) == b"\x26"
    # A 16-bit IN at 0x70 reads the index, then the data.
    assert bus.read(0x70, 2) == bytes([c.RTC_YEAR, 0x26])


@pytest.mark.parametrize("offset", [-1, 2, 3, 0x100, 2**40])
@pytest.mark.parametrize("size", [0, 1, 2, 4, 8, 100, -1])
def test_hostile_offsets_and_sizes(offset, size):
    dev = make()
    got = dev.read(offset, size)
    assert len(got) == max(0, min(size, 8))
    dev.write(offset, b"\xff" * max(0, min(size, 100)))
    if offset >= 2:
        assert set(got) <= {0xFF}


def test_every_index_and_value_is_safe():
    dev = make()
    for index in range(256):
        for value in (0x00, 0x7F, 0x80, 0xFF):
            put(dev, index, value)
            get(dev, index)
    # Whatever the guest did to B, the time registers still read.
    for reg in c.TIME_REGS:
        get(dev, reg)



# Fuzzing: any sequence of guest accesses, no exception ---------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ops = st.lists(st.one_of(
    st.tuples(st.just("r"), st.integers(-2, 10), st.integers(-1, 9)),
    st.tuples(st.just("w"), st.integers(-2, 10), st.binary(max_size=9)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_fuzz_any_access_sequence(ops):
    dev = make()
    for kind, offset, arg in ops:
        if kind == "r":
            assert len(dev.read(offset, arg)) == max(0, min(arg, 8))
        else:
            dev.write(offset, arg)
    assert not get(dev, c.RTC_REG_A) & c.REG_A_UIP
    assert get(dev, c.RTC_REG_D) == c.REG_D_VRT
