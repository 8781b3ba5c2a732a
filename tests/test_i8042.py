"""The i8042 controller model (tier 1: no KVM)."""

from __future__ import annotations

import pytest

from vmmcore.bus import Bus, BusDevice
from vmmcore.devices import i8042 as k
from vmmcore.devices.i8042 import I8042
from vmmcore.vm_events import VmEvent, VmEventSink

DATA, STATUS = 0, 4


def make() -> tuple[I8042, VmEventSink]:
    events = VmEventSink()
    return I8042(events), events


def cmd(dev: I8042, value: int) -> None:
    dev.write(STATUS, bytes([value]))


def data(dev: I8042) -> int:
    return dev.read(DATA, 1)[0]


def status(dev: I8042) -> int:
    return dev.read(STATUS, 1)[0]


def test_status_is_sane_at_reset():
    dev, events = make()
    assert isinstance(dev, BusDevice)
    st = status(dev)
    assert not st & k.STS_IBF            # the reboot path waits for this to clear
    assert not st & k.STS_OBF            # nothing to flush
    assert st & k.STS_SYS
    assert st != 0xFF
    assert not events.is_set()


def test_fe_pulses_reset():
    dev, events = make()
    cmd(dev, 0xFE)
    assert events.exit.event is VmEvent.RESET
    assert events.exit.status == 0
    assert events.exit.message == "guest reset through the i8042"
    assert dev.reset_count == 1


def test_linux_reboot_sequence_through_the_bus():
    # kb_wait() polls 0x64 for IBF clear, then outb(0xfe, 0x64).
    dev, events = make()
    bus = Bus("io")
    bus.insert(dev, 0x60, 5)
    for _ in range(0x10000):
        if not bus.read(0x64, 1)[0] & k.STS_IBF:
            break
    else:
        pytest.fail("IBF never cleared")
    bus.write(0x64, b"\xfe")
    assert events.exit.event is VmEvent.RESET


@pytest.mark.parametrize("value", [0xF0, 0xF2, 0xFC, 0xFE])
def test_pulse_commands_with_bit0_clear_reset(value):
    dev, events = make()
    cmd(dev, value)
    assert events.exit is not None and events.exit.event is VmEvent.RESET


@pytest.mark.parametrize("value", [0xF1, 0xFF, 0xFD])
def test_pulse_commands_with_bit0_set_do_not_reset(value):
    dev, events = make()
    cmd(dev, value)
    assert events.exit is None


def test_fe_on_the_data_port_does_not_reset():
    dev, events = make()
    dev.write(DATA, b"\xfe")
    assert events.exit is None


def test_output_port_write_with_reset_bit_clear_resets():
    dev, events = make()
    cmd(dev, 0xD0)
    assert data(dev) == k.OUTPORT_DEFAULT
    cmd(dev, 0xD1)
    dev.write(DATA, bytes([k.OUTPORT_RESET | k.OUTPORT_A20]))
    assert events.exit is None
    cmd(dev, 0xD1)
    dev.write(DATA, bytes([k.OUTPORT_A20]))
    assert events.exit.event is VmEvent.RESET


def test_command_byte_read_write():
    dev, _ = make()
    cmd(dev, 0x20)
    st = status(dev)
    assert st & k.STS_OBF and not st & k.STS_AUXDATA
    assert data(dev) == k.CTR_DEFAULT
    assert not status(dev) & k.STS_OBF
    cmd(dev, 0x60)
    dev.write(DATA, b"\x74")
    cmd(dev, 0x20)
    assert data(dev) == 0x74
    assert dev.command_byte == 0x74
    cmd(dev, 0xA8)
    cmd(dev, 0x20)
    assert not data(dev) & k.CTR_AUXDIS
    cmd(dev, 0xA7)
    cmd(dev, 0xAE)
    cmd(dev, 0x20)
    ctr = data(dev)
    assert ctr & k.CTR_AUXDIS and not ctr & k.CTR_KBDDIS


def test_self_test_and_interface_tests():
    dev, _ = make()
    cmd(dev, 0xAA)
    assert data(dev) == 0x55
    cmd(dev, 0xAB)
    assert data(dev) == 0x00
    cmd(dev, 0xA9)
    assert data(dev) == 0x02          # no aux device


def test_aux_loop_echoes_as_keyboard_data():
    # Linux's i8042_check_aux: the echo lacks AUXDATA, so it concludes "no aux" fast.
    dev, _ = make()
    cmd(dev, 0xD3)
    dev.write(DATA, b"\x5a")
    st = status(dev)
    assert st & k.STS_OBF and not st & k.STS_AUXDATA
    assert data(dev) == 0x5A


def test_keyboard_bytes_are_dropped():
    dev, _ = make()
    dev.write(DATA, b"\xf2")         # GETID to a keyboard that is not there
    assert not status(dev) & k.STS_OBF
    cmd(dev, 0xD4)
    dev.write(DATA, b"\xff")
    assert not status(dev) & k.STS_OBF


def test_cmd_bit_tracks_last_write():
    dev, _ = make()
    cmd(dev, 0xAE)
    assert status(dev) & k.STS_CMD
    dev.write(DATA, b"\x00")
    assert not status(dev) & k.STS_CMD


def test_output_queue_is_bounded_and_empty_read_is_zero():
    dev, _ = make()
    for _ in range(100):
        cmd(dev, 0xAA)
    got = []
    while status(dev) & k.STS_OBF:
        got.append(data(dev))
    assert got == [0x55] * k.OUTPUT_QUEUE_MAX
    assert data(dev) == 0


def test_port_61_and_unused_offsets():
    dev, _ = make()
    a, b = dev.read(1, 1)[0], dev.read(1, 1)[0]
    assert (a ^ b) == 0x10
    dev.write(1, b"\x03")
    assert dev.read(1, 1)[0] & 0x0F == 0x03
    assert dev.read(2, 1) == b"\xff" and dev.read(3, 1) == b"\xff"
    dev.write(2, b"\xfe")
    dev.write(3, b"\xfe")


@pytest.mark.parametrize("offset", [-3, -1, 5, 6, 100, 2**40])
@pytest.mark.parametrize("size", [0, 1, 2, 4, 8, 64, -2])
def test_hostile_offsets_and_sizes(offset, size):
    dev, events = make()
    got = dev.read(offset, size)
    assert len(got) == max(0, min(size, 8))
    dev.write(offset, b"\xfe" * max(0, min(size, 64)))
    if offset >= 5 or offset + max(size, 0) <= 0:
        assert set(got) <= {0xFF}


def test_wide_write_at_offset_3_reaches_the_command_port():
    # A 16-bit OUT at 0x63 is byte cycles at 0x63 and 0x64.
    dev, events = make()
    dev.write(3, b"\x00\xfe")
    assert events.exit.event is VmEvent.RESET



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
    dev, events = make()
    for kind, offset, arg in ops:
        if kind == "r":
            assert len(dev.read(offset, arg)) == max(0, min(arg, 8))
        else:
            dev.write(offset, arg)
    assert not status(dev) & k.STS_IBF
