"""The debug exit port (tier 1: no KVM)."""

from __future__ import annotations

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus, BusDevice
from vmmcore.devices.debug_exit import DebugExit
from vmmcore.vm_events import VmEvent, VmEventSink


def make() -> tuple[DebugExit, VmEventSink]:
    events = VmEventSink()
    return DebugExit(events), events


@pytest.mark.parametrize("data, value", [
    (b"\x00", 0), (b"\x01", 1), (b"\x2a", 42), (b"\xff", 255),
    (b"\x34\x12", 0x1234), (b"\x01\x00\x00\x00", 1), (b"\xff\xff\xff\xff", 0xFFFFFFFF),
])
def test_write_reports_guest_exit(data, value):
    dev, events = make()
    assert isinstance(dev, BusDevice)
    dev.write(0, data)
    assert events.exit.event is VmEvent.GUEST_EXIT
    assert events.exit.status == min(value, 255)     # a process status is one byte
    assert events.exit.message == f"guest exit status {value}"


def test_first_report_wins():
    dev, events = make()
    dev.write(0, b"\x03")
    dev.write(0, b"\x00")
    assert events.exit.status == 3


def test_through_the_bus_as_the_builder_maps_it():
    dev, events = make()
    bus = Bus("io")
    bus.insert(dev, layout.DEBUG_EXIT_PORT, 4)
    assert bus.read(layout.DEBUG_EXIT_PORT, 1) == b"\xff"
    bus.write(layout.DEBUG_EXIT_PORT, (7).to_bytes(4, "little"))
    assert events.exit.status == 7


@pytest.mark.parametrize("size", [0, 1, 2, 4, 8, 100, -1])
def test_reads_are_ff(size):
    dev, _ = make()
    assert dev.read(0, size) == b"\xff" * max(0, min(size, 8))


@pytest.mark.parametrize("offset, data", [
    (0, b""), (0, b"\x01\x02\x03"), (0, b"\x01" * 8), (1, b"\x01"), (3, b"\x01"),
    (-1, b"\x01"), (2**40, b"\x01"),
])
def test_other_sizes_and_offsets_are_ignored(offset, data):
    dev, events = make()
    dev.write(offset, data)
    assert not events.is_set()
