"""INTx: the pin-to-GSI swizzle, level semantics over an irqfd with resample, the
Interrupt Status and Interrupt Disable bits; and (tier 2) KVM accepting the routes."""

import os

import pytest

from vmmcore.eventfd import EventFd
from vmmcore.pci.config_space import (
    COMMAND_INTX_DISABLE,
    STATUS_INTERRUPT,
    OtherSubclass,
    PciClass,
    PciConfiguration,
)
from vmmcore.pci.intx import PciIntx, intx_gsi, prt_entries


@pytest.fixture
def line():
    cfg = PciConfiguration(vendor_id=1, device_id=2, class_code=PciClass.OTHER,
                           subclass=OtherSubclass.OTHER)
    irq, resample = EventFd(nonblocking=True), EventFd()     # resample left blocking on purpose
    intx = PciIntx(17, 1, irq, resample)
    intx.bind_config(cfg)
    yield intx, cfg
    irq.close()
    resample.close()


def test_swizzle():
    assert [intx_gsi(1, pin) for pin in (1, 2, 3, 4)] == [17, 18, 19, 16]
    assert [intx_gsi(dev, 1) for dev in range(8)] == [16, 17, 18, 19, 16, 17, 18, 19]
    assert all(16 <= intx_gsi(d, p) <= 19 for d in range(32) for p in (1, 2, 3, 4))
    for bad in ((1, 0), (1, 5), (32, 1), (-1, 1)):
        with pytest.raises(ValueError):
            intx_gsi(*bad)


def test_prt_entries_match_the_swizzle():
    entries = prt_entries()
    assert len(entries) == 31 * 4
    assert entries[0] == (0x0001_FFFF, 0, 17)
    assert (0x001F_FFFF, 3, 16 + (31 + 3) % 4) in entries


def test_level_is_asserted_once_and_reasserted_on_resample_while_pending(line):
    intx, cfg = line
    intx.set_level(True)
    intx.set_level(True)                       # already high: no second edge
    assert intx.irq_evt.try_read() == 1
    assert cfg.status & STATUS_INTERRUPT
    intx.resample_evt.write(1)                 # guest EOI'd, KVM de-asserted
    intx.handle_resample()
    assert intx.irq_evt.try_read() == 1        # still pending: asserted again
    assert intx.resample_evt.try_read() == 0   # drained
    intx.set_level(False)
    assert not cfg.status & STATUS_INTERRUPT
    intx.resample_evt.write(1)
    intx.handle_resample()
    assert intx.irq_evt.try_read() == 0


def test_spurious_resample_does_not_block_or_assert(line):
    intx, _ = line
    intx.handle_resample()                     # nothing signalled: must not block
    assert intx.irq_evt.try_read() == 0


def test_interrupt_disable_holds_the_line_until_cleared(line):
    intx, cfg = line
    cfg.write_reg(1, 0, COMMAND_INTX_DISABLE.to_bytes(2, "little"))
    intx.set_level(True)
    assert intx.irq_evt.try_read() == 0
    assert cfg.status & STATUS_INTERRUPT       # status still reports the condition
    cfg.write_reg(1, 0, b"\x00\x00")
    intx.refresh()
    assert intx.irq_evt.try_read() == 1


def test_trigger_raises_the_level(line):
    intx, _ = line
    intx.trigger()
    assert intx.pending and intx.irq_evt.try_read() == 1


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_kvm_accepts_the_routing_table_and_irqfds():
    from vmmcore.kvm import Kvm
    from vmmcore.pci.irq import KvmIrqRouter

    kvm = Kvm()
    vm = kvm.create_vm()
    evts = [EventFd(nonblocking=True) for _ in range(3)]
    try:
        vm.create_irqchip()
        router = KvmIrqRouter(vm)
        router.set_msi_route(24, 0xFEE0_0000, 0x4041)
        router.set_msi_route(25, 0xFEE0_0000, 0x4042)
        router.register_irqfd(evts[0], 24)
        router.register_irqfd(evts[1], intx_gsi(1, 1), resample=evts[2])
        evts[0].write(1)                       # injects an MSI nobody is waiting for
        router.remove_route(25)
        router.unregister_irqfd(evts[0], 24)
        router.unregister_irqfd(evts[1], intx_gsi(1, 1))
    finally:
        for e in evts:
            e.close()
        vm.close()
        kvm.close()


def test_the_device_reasserts_a_pending_level_when_the_guest_clears_interrupt_disable():
    from vmmcore.pci.device import ConfiguredPciDevice

    cfg = PciConfiguration(vendor_id=1, device_id=2, class_code=PciClass.OTHER,
                           subclass=OtherSubclass.OTHER)
    dev = ConfiguredPciDevice(cfg, "dev")
    irq, resample = EventFd(nonblocking=True), EventFd()
    try:
        intx = PciIntx(17, 1, irq, resample)
        dev.assign_irq(intx)
        dev.config_register_write(1, 0, COMMAND_INTX_DISABLE.to_bytes(2, "little"))
        intx.set_level(True)
        assert irq.try_read() == 0                  # held while disabled
        dev.config_register_write(1, 0, b"\x00\x00")
        assert irq.try_read() == 1                  # asserted by the write itself
    finally:
        irq.close()
        resample.close()
