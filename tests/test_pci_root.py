"""PciRoot: mechanism 1 and ECAM decode, the host bridge, BAR programming moving bus
mappings, ioeventfds following BARs, interrupts wiring, and hostile guests."""

import logging

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus, BusDevice
from vmmcore.errors import AllocationError, VmmError
from vmmcore.eventfd import EventFd
from vmmcore.pci.config_space import (
    BarKind,
    BarRange,
    MassStorageSubclass,
    PciClass,
    PciConfiguration,
)
from vmmcore.pci.device import ConfiguredPciDevice, IoEventSpec, PciAddress
from vmmcore.pci.intx import intx_gsi
from vmmcore.pci.root import PciRoot
from vmmcore.pci.testing import ConfigEcam, ConfigMech1, FakeIoEvents, FakeIrqRouter

MiB = 1 << 20
ECAM = layout.PCIE_ECAM_START


class Dev(ConfiguredPciDevice):
    """BAR0 4 KiB mem32, BAR2 16 KiB mem64 prefetchable, BAR4 32 bytes IO."""

    def __init__(self, label="dev", ioevents=()):
        cfg = PciConfiguration(vendor_id=0x1AF4, device_id=0x1042,
                               class_code=PciClass.MASS_STORAGE,
                               subclass=MassStorageSubclass.SCSI)
        super().__init__(cfg, label)
        cfg.add_bar(0, 0x1000, BarKind.MEM32)
        cfg.add_bar(2, 0x4000, BarKind.MEM64, prefetchable=True)
        cfg.add_bar(4, 0x20, BarKind.IO)
        self.writes = []
        self._ioevents = list(ioevents)

    def bar_read(self, bar, offset, size):
        return ((bar << 24) | offset).to_bytes(4, "little")[:size].ljust(size, b"\0")

    def bar_write(self, bar, offset, data):
        self.writes.append((bar, offset, bytes(data)))

    def ioevents(self):
        return self._ioevents


class Blocker(BusDevice):
    def debug_label(self):
        return "blocker"


@pytest.fixture
def env():
    allocator = layout.system_allocator(512 * MiB)
    io_bus, mmio_bus = Bus("io"), Bus("mmio")
    router, ioev = FakeIrqRouter(), FakeIoEvents()
    root = PciRoot(io_bus, mmio_bus, allocator, irq_router=router, ioevents=ioev)
    root.install()

    class Env:
        pass
    e = Env()
    e.allocator, e.io_bus, e.mmio_bus, e.root = allocator, io_bus, mmio_bus, root
    e.router, e.ioev = router, ioev
    e.cf8, e.ecam = ConfigMech1(io_bus), ConfigEcam(mmio_bus, ECAM)
    return e


# -- mechanism 1 -------------------------------------------------------------------------

def test_linux_pci_check_type1_probe_passes(env):
    io = env.io_bus
    io.write(0xCFB, b"\x01")                       # outb(0x01, 0xCFB): not the address reg
    tmp = io.read(0xCF8, 4)
    io.write(0xCF8, (0x8000_0000).to_bytes(4, "little"))
    assert io.read(0xCF8, 4) == (0x8000_0000).to_bytes(4, "little")
    io.write(0xCF8, tmp)
    # pci_sanity_check: a host bridge (class 0x0600) on bus 0.
    assert env.cf8.read(0, 0, 0, 0x0A, 2) == 0x0600
    assert env.cf8.read(0, 0, 0, 0x00, 4) == 0x29C0_8086
    assert env.cf8.read(0, 0, 0, 0x0E, 1) == 0


def test_address_register_keeps_only_defined_bits_and_dword_accesses(env):
    io = env.io_bus
    io.write(0xCF8, (0xFFFF_FFFF).to_bytes(4, "little"))
    assert int.from_bytes(io.read(0xCF8, 4), "little") == 0x80FF_FFFC
    io.write(0xCF8, b"\x00\x00")                    # word write: ignored
    io.write(0xCFA, b"\x00")
    assert int.from_bytes(io.read(0xCF8, 4), "little") == 0x80FF_FFFC
    assert io.read(0xCF8, 2) == b"\xff\xff" and io.read(0xCF9, 1) == b"\xff"


def test_every_byte_word_dword_access_of_the_data_port(env):
    root_dev = env.root.devices()[0][1]
    for reg in (0x00, 0x08, 0x0C, 0x2C, 0x3C):
        dword = root_dev.config_register_read(reg // 4)
        for size in (1, 2, 4):
            for off in range(4):
                env.cf8.select(0, 0, 0, reg)
                data = env.io_bus.read(0xCFC + off, size)
                if off + size <= 4:
                    expect = (dword >> (8 * off)) & ((1 << (8 * size)) - 1)
                else:
                    expect = (1 << (8 * size)) - 1       # crosses the dword: master abort
                assert int.from_bytes(data, "little") == expect, (reg, off, size)


def test_data_port_writes_at_each_offset(env):
    env.root.add_device(Dev())
    for off in range(4):                               # cache line size / latency bytes
        env.cf8.write(0, 1, 0, 0x0C + off, 0x11 * (off + 1), 1)
    # Only cache line size (0x0C) and latency timer (0x0D) are writable.
    assert env.cf8.read(0, 1, 0, 0x0C) & 0xFFFF == 0x2211
    env.cf8.write(0, 1, 0, 0x3C, 0x0A0B, 2)            # line writable, pin read-only
    assert env.cf8.read(0, 1, 0, 0x3C, 2) == (1 << 8) | 0x0B
    env.cf8.select(0, 1, 0, 0x04)
    env.io_bus.write(0xCFE, (0x0003).to_bytes(2, "little"))   # word at the status half
    assert env.cf8.read(0, 1, 0, 0x04, 2) == 0
    env.io_bus.write(0xCFD, (0xFFFF_FFFF).to_bytes(4, "little"))   # crosses: dropped
    assert env.cf8.read(0, 1, 0, 0x04, 2) == 0


def test_disabled_address_or_missing_functions_read_all_ones(env):
    env.root.add_device(Dev())
    env.io_bus.write(0xCF8, (0x0000_0800).to_bytes(4, "little"))   # enable bit clear
    assert env.io_bus.read(0xCFC, 4) == b"\xff" * 4
    assert env.cf8.read(0, 1, 0, 0) == 0x1042_1AF4
    for bus, dev, fn in [(0, 2, 0), (0, 31, 0), (0, 1, 1), (0, 0, 7), (1, 1, 0), (255, 0, 0)]:
        assert env.cf8.read(bus, dev, fn, 0) == 0xFFFF_FFFF
        assert env.cf8.read(bus, dev, fn, 0x0E, 1) == 0xFF
        env.cf8.write(bus, dev, fn, 0x04, 0x7)          # ignored, nothing to write to
    assert env.cf8.read(0, 1, 0, 0x04, 2) == 0


# -- ECAM --------------------------------------------------------------------------------

def test_ecam_decode_matches_mechanism_1(env):
    env.root.add_device(Dev())
    for dev in (0, 1):
        for reg in range(0, 0x40, 4):
            assert env.ecam.read(0, dev, 0, reg) == env.cf8.read(0, dev, 0, reg)
    for off in range(4):
        for size in (1, 2):
            if off + size <= 4:
                assert env.ecam.read(0, 1, 0, 0x08 + off, size) == env.cf8.read(
                    0, 1, 0, 0x08 + off, size)
    env.ecam.write(0, 1, 0, 0x3C, 0x0E, 1)
    assert env.cf8.read(0, 1, 0, 0x3C, 1) == 0x0E


def test_ecam_extended_space_bus_numbers_and_odd_accesses(env):
    env.root.add_device(Dev())
    assert env.ecam.read(0, 1, 0, 0x100) == 0                 # no extended capabilities
    assert env.ecam.read(0, 1, 0, 0xFFC) == 0
    assert env.ecam.read(1, 1, 0, 0) == 0xFFFF_FFFF           # bus 1 does not exist
    assert env.ecam.read(255, 31, 7, 0xFFC) == 0xFFFF_FFFF    # last dword of the window
    assert env.mmio_bus.read(env.ecam.addr(0, 1, 0, 0), 8) == b"\xff" * 8
    assert env.mmio_bus.read(env.ecam.addr(0, 1, 0, 2), 4) == b"\xff" * 4   # crosses
    assert env.mmio_bus.read(env.ecam.addr(0, 1, 0, 3), 3) == b"\xff" * 3
    env.mmio_bus.write(env.ecam.addr(0, 1, 0, 4), b"\xff" * 8)
    env.mmio_bus.write(env.ecam.addr(0, 1, 0, 3), b"\xff\xff")
    assert env.ecam.read(0, 1, 0, 4, 2) == 0
    env.ecam.write(3, 1, 0, 0x04, 0x7)
    assert env.ecam.read(0, 1, 0, 4, 2) == 0


# -- BARs and bus mappings --------------------------------------------------------------

def test_devices_get_numbers_and_bars_from_the_allocator(env):
    a, b = Dev("a"), Dev("b")
    assert env.root.add_device(a) == PciAddress(0, 1)
    assert env.root.add_device(b) == PciAddress(0, 2)
    assert str(PciAddress(0, 2)) == "00:02.0"
    bar0 = a.config.bar_address(0)
    assert env.allocator.low_mmio.base <= bar0 < env.allocator.low_mmio.end
    assert a.config.bar_address(4) >= layout.PCI_IO_START
    assert len({a.config.bar_address(0), b.config.bar_address(0),
                a.config.bar_address(2), b.config.bar_address(2)}) == 4
    # Nothing decodes until the guest enables it.
    assert env.root.mapped_ranges(1) == []
    with pytest.raises(AllocationError):
        env.root.add_device(Dev("c"), dev_num=2)


def test_enabling_decode_maps_bars_and_accesses_reach_the_device(env):
    dev = Dev()
    env.root.add_device(dev)
    bar0, bar2, bar4 = (dev.config.bar_address(i) for i in (0, 2, 4))
    env.cf8.write(0, 1, 0, 0x04, 0x2, 2)                   # memory space
    assert [r.bar for r in env.root.mapped_ranges(1)] == [0, 2]
    assert env.mmio_bus.read(bar0 + 0x10, 4) == (0x10).to_bytes(4, "little")
    assert env.mmio_bus.read(bar2 + 0x3FFC, 4) == ((2 << 24) | 0x3FFC).to_bytes(4, "little")
    env.mmio_bus.write(bar0 + 0x20, b"\x01\x02")
    assert dev.writes == [(0, 0x20, b"\x01\x02")]
    assert env.io_bus.read(bar4, 1) is None
    env.cf8.write(0, 1, 0, 0x04, 0x3, 2)                   # and IO
    assert env.io_bus.read(bar4 + 4, 1) == b"\x04"
    env.cf8.write(0, 1, 0, 0x04, 0x1, 2)                   # memory off again
    assert env.mmio_bus.read(bar0, 4) is None and env.mmio_bus.read(bar2, 4) is None
    assert [r.bar for r in env.root.mapped_ranges(1)] == [4]


def linux_size_bar(cf8, dev, pos):
    """__pci_read_base's config traffic for one 32-bit BAR slot, decode disabled."""
    cmd = cf8.read(0, dev, 0, 0x04, 2)
    cf8.write(0, dev, 0, 0x04, cmd & ~0x3, 2)
    orig = cf8.read(0, dev, 0, pos)
    cf8.write(0, dev, 0, pos, 0xFFFF_FFFF)
    size = cf8.read(0, dev, 0, pos)
    cf8.write(0, dev, 0, pos, orig)
    cf8.write(0, dev, 0, 0x04, cmd, 2)
    return size


def test_linux_style_sizing_leaves_mappings_where_they_were(env, caplog):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x3, 2)
    before = env.root.mapped_ranges(1)
    with caplog.at_level(logging.WARNING):
        assert linux_size_bar(env.cf8, 1, 0x10) == 0xFFFF_F000
        assert linux_size_bar(env.cf8, 1, 0x18) == 0xFFFF_C00C
        assert linux_size_bar(env.cf8, 1, 0x1C) == 0xFFFF_FFFF
        assert linux_size_bar(env.cf8, 1, 0x20) == 0xFFFF_FFE1
    assert env.root.mapped_ranges(1) == before
    assert not caplog.records


def test_sizing_with_decode_enabled_unmaps_quietly_then_restores(env, caplog):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x2, 2)
    bar0 = dev.config.bar_address(0)
    with caplog.at_level(logging.WARNING):
        env.cf8.write(0, 1, 0, 0x10, 0xFFFF_FFFF)
        assert env.mmio_bus.read(bar0, 4) is None
        env.cf8.write(0, 1, 0, 0x10, bar0)
    assert env.mmio_bus.read(bar0, 4) is not None
    assert not caplog.records


def test_reprogramming_a_bar_moves_its_mapping(env):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x3, 2)
    old = dev.config.bar_address(0)
    new = env.allocator.low_mmio.base + 0x1000_0000
    env.cf8.write(0, 1, 0, 0x10, new)
    assert env.mmio_bus.read(old, 4) is None
    assert env.mmio_bus.read(new + 8, 4) == (8).to_bytes(4, "little")
    assert env.root.mapped_ranges(1)[0] == BarRange(0, new, 0x1000, BarKind.MEM32)
    # IO BAR too, with a byte-sized write to its second byte.
    io_old = dev.config.bar_address(4)
    env.cf8.write(0, 1, 0, 0x21, 0x80, 1)
    io_new = (io_old & 0xFF) | 0x8000
    assert env.io_bus.read(io_old, 1) is None
    assert env.io_bus.read(io_new + 1, 1) == b"\x01"


def test_64bit_bar_moves_above_4g_like_linux_rewrites_it(env):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x2, 2)
    high = env.allocator.high_mmio.base + 0x4000
    # pci_std_update_resource: decode off, low dword, high dword, decode back on.
    env.cf8.write(0, 1, 0, 0x04, 0x0, 2)
    env.cf8.write(0, 1, 0, 0x18, (high & 0xFFFF_FFFF) | 0xC)
    env.cf8.write(0, 1, 0, 0x1C, high >> 32)
    env.cf8.write(0, 1, 0, 0x04, 0x2, 2)
    assert dev.config.bar_address(2) == high
    assert env.mmio_bus.read(high, 4) == (2 << 24).to_bytes(4, "little")


@pytest.mark.parametrize("where", ["ram", "ram_high", "ecam", "ioapic", "above_window"])
def test_bars_outside_the_pci_windows_are_refused_and_logged(env, caplog, where):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x2, 2)
    old = dev.config.bar_address(0)
    target = {"ram": 0x10_0000, "ram_high": 0x1000_0000, "ecam": ECAM,
              "ioapic": layout.IOAPIC_ADDR, "above_window": 0xF000_0000}[where]
    with caplog.at_level(logging.WARNING):
        env.cf8.write(0, 1, 0, 0x10, target)
    assert "outside the PCI MMIO windows" in caplog.text
    assert env.mmio_bus.read(old, 4) is None
    hit = env.mmio_bus.lookup(target)
    assert hit is None or hit[0].device.debug_label() == "pci-ecam"
    assert [r.bar for r in env.root.mapped_ranges(1)] == [2]
    # The guest can still put it somewhere valid afterwards.
    env.cf8.write(0, 1, 0, 0x10, old)
    assert env.mmio_bus.read(old, 4) is not None


def test_io_bar_over_legacy_ports_is_refused(env, caplog):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x1, 2)
    with caplog.at_level(logging.WARNING):
        env.cf8.write(0, 1, 0, 0x20, 0xCE0)       # 0xce0-0xcff would cover CF8/CFC
    assert "outside the PCI IO windows" in caplog.text
    assert env.io_bus.lookup(0xCF8)[0].device.debug_label() == "pci-config-io"


def test_overlapping_bars_leave_the_first_mapping_intact(env, caplog):
    a, b = Dev("a"), Dev("b")
    env.root.add_device(a)
    env.root.add_device(b)
    env.cf8.write(0, 1, 0, 0x04, 0x3, 2)
    env.cf8.write(0, 2, 0, 0x04, 0x3, 2)
    a0 = a.config.bar_address(0)
    with caplog.at_level(logging.WARNING):
        env.cf8.write(0, 2, 0, 0x10, a0)          # b's BAR0 onto a's
        env.cf8.write(0, 2, 0, 0x20, a.config.bar_address(4))
    assert "overlaps" in caplog.text
    assert env.mmio_bus.lookup(a0)[0].device.debug_label() == "a BAR0"
    assert [r.bar for r in env.root.mapped_ranges(2)] == [2]
    # A device-level blocker elsewhere on the bus is respected too.
    blocker_at = env.allocator.low_mmio.base + 0x1800_0000
    env.mmio_bus.insert(Blocker(), blocker_at, 0x1000)
    env.cf8.write(0, 1, 0, 0x10, blocker_at)
    assert env.mmio_bus.lookup(blocker_at)[0].device.debug_label() == "blocker"
    assert env.mmio_bus.read(a0, 4) is None


def test_ioevents_follow_their_bar(env):
    evt = EventFd()
    dev = Dev(ioevents=[IoEventSpec(bar=0, offset=0x100, evt=evt, length=2, datamatch=3),
                        IoEventSpec(bar=4, offset=0x10, evt=evt)])
    env.root.add_device(dev)
    assert env.ioev.active == {}
    env.cf8.write(0, 1, 0, 0x04, 0x3, 2)
    bar0, bar4 = dev.config.bar_address(0), dev.config.bar_address(4)
    assert set(env.ioev.active) == {(bar0 + 0x100, 2, 3, False), (bar4 + 0x10, 0, None, True)}
    new = env.allocator.low_mmio.base + 0x0100_0000
    env.cf8.write(0, 1, 0, 0x10, new)
    assert set(env.ioev.active) == {(new + 0x100, 2, 3, False), (bar4 + 0x10, 0, None, True)}
    env.cf8.write(0, 1, 0, 0x04, 0, 2)
    assert env.ioev.active == {}
    evt.close()


def test_interrupts_are_wired_at_add_time(env):
    dev = Dev()
    addr = env.root.add_device(dev)
    gsi = intx_gsi(addr.device, 1)
    assert dev.intx is not None and dev.intx.gsi == gsi
    assert env.cf8.read(0, 1, 0, 0x3C, 2) == (1 << 8) | gsi
    [(evt, resample)] = env.router.irqfds[gsi]
    assert evt is dev.intx.irq_evt and resample is dev.intx.resample_evt
    # INTx GSIs never come out of the allocator for MSI.
    assert all(g in env.allocator.gsi.in_use() for g in range(16, 24))


def test_remove_device_releases_everything(env):
    dev = Dev()
    env.root.add_device(dev)
    env.cf8.write(0, 1, 0, 0x04, 0x3, 2)
    bar0 = dev.config.bar_address(0)
    env.root.remove_device(1)
    assert env.cf8.read(0, 1, 0, 0) == 0xFFFF_FFFF
    assert env.mmio_bus.read(bar0, 4) is None
    assert env.router.irqfds == {}
    assert env.allocator.low_mmio.allocations() == []
    assert env.root.add_device(Dev()) == PciAddress(0, 1)
    with pytest.raises(VmmError):
        env.root.remove_device(0)


def test_a_lying_device_cannot_map_outside_the_windows(env, caplog):
    class Liar(Dev):
        def config_register_write(self, reg_idx, offset, data):
            from vmmcore.pci.device import ConfigWriteResult
            return ConfigWriteResult(added=[BarRange(0, 0, 0x1000_0000, BarKind.MEM32),
                                            BarRange(1, 0xC000_0800, 0x1000, BarKind.MEM32),
                                            BarRange(9, 0xC000_0000, 0x1000, BarKind.MEM32)])
    env.root.add_device(Liar())
    with caplog.at_level(logging.WARNING):
        env.cf8.write(0, 1, 0, 0x04, 0x2, 2)
    assert env.root.mapped_ranges(1) == []
    assert env.mmio_bus.read(0, 4) is None


def test_build_pci_root_wires_kvm_through_the_vm():
    class FakeVm:
        def __init__(self):
            self.calls = []

        def set_gsi_routing(self, routes):
            self.calls.append(("routing", len(routes)))

        def register_irqfd(self, evt, gsi, resample=None):
            self.calls.append(("irqfd", gsi, resample is not None))

        def unregister_irqfd(self, evt, gsi):
            self.calls.append(("unirqfd", gsi))

        def register_ioeventfd(self, evt, addr, length=0, *, datamatch=None, pio=False):
            self.calls.append(("ioeventfd", addr, length, datamatch, pio))

        def unregister_ioeventfd(self, evt, addr, length=0, *, datamatch=None, pio=False):
            self.calls.append(("unioeventfd", addr))

    from vmmcore.pci.root import build_pci_root

    vm, io_bus, mmio_bus = FakeVm(), Bus("io"), Bus("mmio")
    root = build_pci_root(vm, io_bus, mmio_bus, layout.system_allocator(256 * MiB))
    evt = EventFd()
    dev = Dev(ioevents=[IoEventSpec(bar=0, offset=0, evt=evt, length=4)])
    root.add_device(dev)
    ConfigMech1(io_bus).write(0, 1, 0, 0x04, 0x2, 2)
    assert ("irqfd", 17, True) in vm.calls
    assert ("ioeventfd", dev.config.bar_address(0), 4, None, False) in vm.calls
    root.close()
    assert ("unirqfd", 17) in vm.calls and ("unioeventfd", dev.config.bar_address(0)) in vm.calls
    evt.close()


def test_a_device_that_does_not_fit_takes_nothing():
    allocator = layout.system_allocator(256 * MiB)
    root = PciRoot(Bus("io"), Bus("mmio"), allocator, irq_router=FakeIrqRouter())

    class Huge(Dev):
        def __init__(self):
            super().__init__("huge")
            self.config.add_bar(1, 1 << 31, BarKind.MEM32)     # larger than the 32-bit pool

    with pytest.raises(AllocationError):
        root.add_device(Huge())
    assert allocator.low_mmio.allocations() == [] and allocator.io.allocations() == []
    assert 1 not in allocator.pci_devices.in_use()
    assert root.add_device(Dev()) == PciAddress(0, 1)


def test_a_device_that_raises_reads_as_absent_and_the_vcpu_path_survives(caplog):
    """--disable-sandbox: a plugin bug on a BAR or config access must not stop the VM
    (a sandboxed device's failure does not either); it is logged once."""
    from vmmcore.pci.root import _BarWindow

    class Broken(ConfiguredPciDevice):
        def __init__(self):
            cfg = PciConfiguration(vendor_id=1, device_id=2, class_code=0xFF, subclass=0)
            cfg.add_bar(0, 0x1000, BarKind.MEM32)
            super().__init__(cfg, "broken")

        def read_bar(self, bar, offset, size):
            raise KeyError("bug")

        def write_bar(self, bar, offset, data):
            raise KeyError("bug")

        def config_register_read(self, reg_idx):
            raise KeyError("bug")

    io, mmio = Bus("io"), Bus("mmio")
    root = PciRoot(io, mmio, layout.system_allocator(1 << 28))
    root.install()
    addr = root.add_device(Broken())
    assert root.config_read(0, addr.device, 0, 0, 4) == 0xFFFFFFFF
    slot = root._slots[addr.device]                      # noqa: SLF001
    window = _BarWindow(slot, 0)
    assert window.read(0, 4) == b"\xff" * 4
    window.write(0, b"\0\0\0\0")
    assert sum("failed" in r.message for r in caplog.records) == 1
