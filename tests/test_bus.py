"""Bus: range registration, overlap rejection, lookup and dispatch."""

import threading

import pytest

from vmmcore.bus import Bus, BusDevice
from vmmcore.errors import BusConflictError


class Recorder(BusDevice):
    def __init__(self, name="rec"):
        self.name = name
        self.writes = []

    def debug_label(self):
        return self.name

    def read(self, offset, size):
        return offset.to_bytes(8, "little")[:size]

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_dispatch_uses_offsets_relative_to_the_base():
    bus, dev = Bus("mmio"), Recorder()
    bus.insert(dev, 0x1000, 0x100)
    assert bus.read(0x1010, 2) == b"\x10\x00"
    assert bus.write(0x10FF, b"x")
    assert dev.writes == [(0xFF, b"x")]
    assert bus.read(0x1100, 1) is None
    assert bus.read(0xFFF, 1) is None
    assert not bus.write(0x1100, b"x")


@pytest.mark.parametrize("base,length", [(0x1000, 1), (0xFFF, 2), (0x10FF, 1), (0, 0x2000)])
def test_overlaps_are_rejected_naming_both_devices(base, length):
    bus = Bus("io")
    bus.insert(Recorder("serial"), 0x1000, 0x100)
    with pytest.raises(BusConflictError, match="overlaps serial"):
        bus.insert(Recorder("other"), base, length)


def test_adjacent_ranges_and_removal():
    bus = Bus("io")
    a, b = Recorder("a"), Recorder("b")
    bus.insert(a, 0x10, 0x10)
    bus.insert(b, 0x20, 0x10)
    assert bus.lookup(0x1F)[0].device is a and bus.lookup(0x20)[0].device is b
    assert bus.remove(0x10) is a
    assert bus.lookup(0x10) is None
    with pytest.raises(BusConflictError):
        bus.remove(0x10)
    bus.remove_device(b)
    assert bus.ranges() == ()


@pytest.mark.parametrize("base,length", [(-1, 4), (0, 0), (0, -4)])
def test_invalid_ranges(base, length):
    with pytest.raises(BusConflictError):
        Bus("io").insert(Recorder(), base, length)


def test_lookup_over_many_ranges():
    bus = Bus("mmio")
    devs = [Recorder(str(i)) for i in range(200)]
    for i, d in enumerate(devs):
        bus.insert(d, i * 0x1000, 0x800)
    for i in range(len(devs)):
        assert bus.lookup(i * 0x1000 + 0x7FF) == (bus.lookup(i * 0x1000)[0], 0x7FF)
        assert bus.lookup(i * 0x1000 + 0x800) is None


def test_a_device_never_sees_two_threads_at_once():
    class Slow(BusDevice):
        inside = 0
        max_inside = 0

        def write(self, offset, data):
            Slow.inside += 1
            Slow.max_inside = max(Slow.max_inside, Slow.inside)
            for _ in range(100):
                pass
            Slow.inside -= 1

    bus = Bus("io")
    bus.insert(Slow(), 0, 1)
    threads = [threading.Thread(target=lambda: [bus.write(0, b"x") for _ in range(500)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Slow.max_inside == 1
