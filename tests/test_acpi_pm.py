"""The ACPI PM1a event/control block model (tier 1: no KVM)."""

from __future__ import annotations

import threading

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus, BusDevice
from vmmcore.devices import acpi_pm as a
from vmmcore.devices.acpi_pm import AcpiPmDevice
from vmmcore.interrupts import CallbackInterrupt
from vmmcore.vm_events import VmEvent, VmEventSink

STS, EN, CNT = 0, 2, 4


def make() -> tuple[AcpiPmDevice, VmEventSink, list[bool], CallbackInterrupt]:
    events = VmEventSink()
    lines: list[bool] = []
    sci = CallbackInterrupt(lines.append)
    return AcpiPmDevice(events, sci), events, lines, sci


def r16(dev: AcpiPmDevice, off: int) -> int:
    return int.from_bytes(dev.read(off, 2), "little")


def w16(dev: AcpiPmDevice, off: int, value: int) -> None:
    dev.write(off, value.to_bytes(2, "little"))


def slp(typ: int, enable: bool = True) -> int:
    return (typ << 10) | (a.CNT_SLP_EN if enable else 0)


def test_layout_offsets():
    assert (a.STS, a.EN, a.CNT) == (STS, EN, CNT)
    assert a.LENGTH == layout.ACPI_PM_SIZE


def test_reset_state_and_sci_en_reads_one():
    dev, events, lines, _ = make()
    assert isinstance(dev, BusDevice)
    assert r16(dev, STS) == 0 and r16(dev, EN) == 0
    assert r16(dev, CNT) & a.CNT_SCI_EN
    w16(dev, CNT, 0)
    assert r16(dev, CNT) & a.CNT_SCI_EN        # always in ACPI mode
    assert dev.read(CNT, 1)[0] & 1
    assert not events.is_set() and lines == []


def test_s5_powers_off():
    dev, events, _, _ = make()
    # Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
    w16(dev, CNT, slp(layout.S5_SLP_TYP, enable=False) | a.CNT_SCI_EN)
    assert not events.is_set()
    w16(dev, CNT, slp(layout.S5_SLP_TYP) | a.CNT_SCI_EN)
    assert events.exit.event is VmEvent.POWEROFF
    assert events.exit.status == 0
    assert events.exit.message == "guest powered off (ACPI S5)"
    assert dev.poweroff_count == 1


def test_s5_through_the_bus_at_pm1a_cnt_blk():
    dev, events, _, _ = make()
    bus = Bus("io")
    bus.insert(dev, layout.ACPI_PM_BASE, layout.ACPI_PM_SIZE)
    bus.write(layout.PM1A_CNT_BLK, slp(layout.S5_SLP_TYP).to_bytes(2, "little"))
    assert events.exit.event is VmEvent.POWEROFF


def test_s5_as_a_32bit_write_and_as_a_high_byte_write():
    dev, events, _, _ = make()
    dev.write(CNT, (slp(layout.S5_SLP_TYP)).to_bytes(4, "little"))   # covers 4..7
    assert events.exit.event is VmEvent.POWEROFF
    dev, events, _, _ = make()
    dev.write(CNT + 1, bytes([slp(layout.S5_SLP_TYP) >> 8]))
    assert events.exit.event is VmEvent.POWEROFF


@pytest.mark.parametrize("typ", [t for t in range(8) if t != layout.S5_SLP_TYP])
def test_other_sleep_types_do_nothing(typ):
    dev, events, lines, _ = make()
    w16(dev, CNT, slp(typ))
    assert not events.is_set() and dev.poweroff_count == 0
    assert lines == []


def test_s5_without_slp_en_and_slp_en_reads_zero():
    dev, events, _, _ = make()
    w16(dev, CNT, slp(layout.S5_SLP_TYP, enable=False))
    assert not events.is_set()
    assert (r16(dev, CNT) >> 10) & 7 == layout.S5_SLP_TYP   # SLP_TYP reads back
    w16(dev, CNT, slp(1))
    assert not r16(dev, CNT) & a.CNT_SLP_EN                  # SLP_EN is write-only


def test_low_byte_write_does_not_fire_a_stale_slp_en():
    dev, events, _, _ = make()
    w16(dev, CNT, slp(layout.S5_SLP_TYP, enable=False))
    dev.write(CNT, b"\x01")               # touches only the low byte
    assert not events.is_set()


def test_enable_register_and_status_write_one_to_clear():
    dev, _, lines, sci = make()
    w16(dev, EN, 0xFFFF)
    assert r16(dev, EN) == a.EN_MASK
    dev.press_power_button()
    assert r16(dev, STS) & a.STS_PWRBTN
    assert lines == [True] and dev.sci_asserted and sci.count == 1
    w16(dev, STS, 0)                      # writing 0 clears nothing
    assert r16(dev, STS) & a.STS_PWRBTN
    w16(dev, STS, a.STS_PWRBTN)
    assert r16(dev, STS) == 0
    assert lines == [True, False] and not dev.sci_asserted


def test_power_button_without_enable_raises_no_sci_until_enabled():
    dev, _, lines, _ = make()
    dev.press_power_button()
    assert r16(dev, STS) & a.STS_PWRBTN
    assert lines == []
    w16(dev, EN, a.EN_PWRBTN)
    assert lines == [True]
    w16(dev, EN, 0)
    assert lines == [True, False]


def test_power_button_from_another_thread():
    dev, _, lines, _ = make()
    w16(dev, EN, a.EN_PWRBTN)
    t = threading.Thread(target=dev.press_power_button)
    t.start()
    t.join()
    assert lines == [True]


def test_no_sci_interrupt_is_fine():
    dev = AcpiPmDevice(VmEventSink())
    w16(dev, EN, a.EN_PWRBTN)
    dev.press_power_button()
    assert dev.sci_asserted


def test_reserved_bytes_read_zero():
    dev, _, _, _ = make()
    assert dev.read(6, 2) == b"\x00\x00"
    dev.write(6, b"\xff\xff")
    assert dev.read(6, 2) == b"\x00\x00"


@pytest.mark.parametrize("offset", [-4, -1, 8, 9, 0x1000, 2**40])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 8, 32, -1])
def test_hostile_offsets_and_sizes(offset, size):
    dev, events, _, _ = make()
    got = dev.read(offset, size)
    assert len(got) == max(0, min(size, 8))
    dev.write(offset, b"\xff" * max(0, min(size, 32)))
    if offset >= 8 or offset + max(size, 0) <= 0:
        assert set(got) <= {0xFF}
        assert not events.is_set()


def test_all_ones_write_is_s7_not_s5():
    dev, events, _, _ = make()
    dev.write(0, b"\xff" * 8)
    assert not events.is_set()             # SLP_TYP = 7



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
    dev, events, lines, _ = make()
    for kind, offset, arg in ops:
        if kind == "r":
            assert len(dev.read(offset, arg)) == max(0, min(arg, 8))
        else:
            dev.write(offset, arg)
    assert r16(dev, CNT) & a.CNT_SCI_EN
    assert lines == [] or lines[-1] == dev.sci_asserted
    if events.is_set():
        assert events.exit.event is VmEvent.POWEROFF
