"""VirtioDevice, its worker thread and VirtioInterrupt, driven by the test driver."""

from __future__ import annotations

import logging
import os
import select
import threading

import pytest

from vmmcore.eventfd import EventFd
from vmmcore.interrupts import CallbackInterrupt, IrqFdInterrupt
from vmmcore.memory import GuestMemory
from vmmcore.virtio import (
    DeviceType,
    EventFdMsix,
    Queue,
    VirtioDevice,
    VirtioInterrupt,
    prepare_queues,
)
from vmmcore.virtio.queue import VIRTQ_DESC_F_NEXT
from vmmcore.virtio.status import (
    ISR_CONFIG,
    ISR_QUEUE,
    TRANSPORT_FEATURES,
    VIRTIO_MSI_NO_VECTOR,
    modern_pci_device_id,
)
from vmmcore.virtio.testing import VirtqueueDriver

MiB = 1024 * 1024
TIMEOUT = 5.0


class Echo(VirtioDevice):
    """Queue 0: copy each chain's readable bytes into its writable buffers."""

    device_type = DeviceType.CONSOLE
    queue_max_sizes = (16,)
    device_features = 1 << 0 | 1 << 3

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")

    def handle_queue(self, index: int) -> None:
        q, mem = self.queues[index], self.mem
        while (chain := q.pop(mem)) is not None:
            chain.require_device_order()
            q.add_used(mem, chain, chain.write(mem, chain.read(mem)))
        self.signal_used(index)


class Rng(VirtioDevice):
    """virtio-rng shaped: fill every writable buffer with random bytes."""

    device_type = DeviceType.RNG
    queue_max_sizes = (8,)

    def handle_queue(self, index: int) -> None:
        q, mem = self.queues[index], self.mem
        while (chain := q.pop(mem)) is not None:
            q.add_used(mem, chain, chain.write(mem, os.urandom(chain.writable_len)))
        self.signal_used(index)


class Buggy(Echo):
    def handle_queue(self, index: int) -> None:
        raise KeyError("device bug")


def wait_fd(evt: EventFd, timeout: float = TIMEOUT) -> bool:
    """Wait until evt is signalled; consume it."""
    ready, _, _ = select.select([evt.fileno()], [], [], timeout)
    if ready:
        evt.read()
    return bool(ready)


class Rig:
    """Guest memory, one driven queue, MSI-X vectors 0 (config) and 1 (queue)."""

    def __init__(self, device: VirtioDevice, *, msix: bool = True, event_idx: bool = True):
        self.mem = GuestMemory([(0, 2 * MiB)])
        self.kick = EventFd()
        self.vectors = [EventFd(), EventFd()]
        self.intx_levels: list[bool] = []
        self.reset_reasons: list[str] = []
        self.reset_seen = threading.Event()
        self.interrupt = VirtioInterrupt(
            intx=CallbackInterrupt(self.intx_levels.append),
            msix=EventFdMsix([IrqFdInterrupt(e) for e in self.vectors], enabled=msix),
            on_needs_reset=self._on_reset)
        self.interrupt.config_vector = 0
        self.device = device
        self.driver = VirtqueueDriver(self.mem, device.queue_max_sizes[0], 0x1000, 0x10000,
                                      0x10000, event_idx=event_idx, indirect=True,
                                      kick_evt=self.kick)

    def _on_reset(self, reason: str) -> None:
        self.reset_reasons.append(reason)
        self.reset_seen.set()

    def activate(self) -> Queue:
        q = self.driver.make_queue(self.device.queue_max_sizes[0])
        q.vector = 1
        features = TRANSPORT_FEATURES if self.driver.event_idx else 0
        prepare_queues(self.mem, features | self.driver.features, [q])
        self.device.activate(self.mem, self.interrupt, [q], [self.kick])
        return q

    def close(self) -> None:
        self.device.shutdown()
        for e in (self.kick, *self.vectors):
            e.close()
        self.mem.close()


@pytest.fixture
def echo():
    rig = Rig(Echo())
    yield rig
    rig.close()


def test_echo_through_the_worker_thread(echo):
    echo.activate()
    d = echo.driver
    d.add([b"ping"], [4])
    assert d.kick()
    assert wait_fd(echo.vectors[1]), "no queue interrupt on MSI-X vector 1"
    [used] = d.get_used()
    assert used.data == b"ping"
    d.add([b"ab", b"cd"], [1, 3], indirect=True)
    d.add([b"xyz"], [8])
    d.kick()
    got = []
    while len(got) < 2 and wait_fd(echo.vectors[1]):
        got += d.get_used()
    assert [u.data for u in got] == [b"abcd", b"xyz"]
    assert echo.device.worker.is_alive()
    assert echo.interrupt.isr_status == 0  # MSI-X: ISR untouched for queue interrupts


def test_rng_like_device_over_intx():
    rig = Rig(Rng(), msix=False, event_idx=False)
    try:
        rig.activate()
        rig.driver.add([], [32])
        rig.driver.kick()
        for _ in range(500):  # the INTx line is raised after the used entry is published
            if rig.intx_levels:
                break
            threading.Event().wait(0.01)
        [used] = rig.driver.get_used()
        assert used.length == 32 and used.data != b"\xaa" * 32
        # INTx path: ISR bit 0 set, line raised; the ISR read clears and lowers it
        assert rig.interrupt.isr_status & ISR_QUEUE
        assert rig.intx_levels[-1] is True
        assert rig.interrupt.read_isr() == ISR_QUEUE
        assert rig.intx_levels[-1] is False and rig.interrupt.isr_status == 0
    finally:
        rig.close()


@pytest.mark.parametrize("malformed", ["loop", "head", "order"])
def test_malformed_chain_sets_needs_reset_and_process_survives(echo, caplog, malformed):
    echo.activate()
    d = echo.driver
    if malformed == "loop":
        d.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1)
        d.write_desc(1, 0x10000, 4, VIRTQ_DESC_F_NEXT, 0)
        d.publish(0)
    elif malformed == "head":
        d.publish(200)
    else:
        d.write_desc(0, 0x10000, 4, 2 | VIRTQ_DESC_F_NEXT, 1)  # writable, then readable
        d.write_desc(1, 0x10100, 4, 0, 0)
        d.publish(0)
    with caplog.at_level(logging.WARNING):
        d.kick_evt.write(1)
        assert echo.reset_seen.wait(TIMEOUT)
        assert wait_fd(echo.vectors[0]), "no config interrupt on the config vector"
        echo.device.worker._thread.join(TIMEOUT)
    assert not echo.device.worker.is_alive()  # stopped serving queues
    assert echo.interrupt.needs_reset
    assert echo.interrupt.isr_status & ISR_CONFIG
    assert "malformed request" in echo.reset_reasons[0]
    assert "device needs reset" in caplog.text
    # the driver resets the device; it can be activated and used again
    assert echo.device.reset()
    echo.interrupt.reset()
    assert not echo.interrupt.needs_reset
    echo.driver = VirtqueueDriver(echo.mem, 16, 0x1000, 0x10000, 0x10000, event_idx=True,
                                  indirect=True, kick_evt=echo.kick)
    echo.activate()
    echo.driver.add([b"again"], [5])
    echo.driver.kick()
    assert wait_fd(echo.vectors[1])
    assert echo.driver.get_used()[0].data == b"again"


def test_device_exception_is_contained(caplog):
    rig = Rig(Buggy())
    try:
        rig.activate()
        with caplog.at_level(logging.WARNING):
            rig.kick.write(1)
            assert rig.reset_seen.wait(TIMEOUT)
        assert "device error: KeyError('device bug')" in rig.reset_reasons[0]
        assert "Traceback" in caplog.text or caplog.records[-1].exc_info
    finally:
        rig.close()


def test_needs_reset_is_signalled_once():
    calls = []
    irq = VirtioInterrupt(intx=CallbackInterrupt(lambda level: None),
                          on_needs_reset=calls.append)
    irq.set_needs_reset("first")
    irq.set_needs_reset("second")
    assert calls == ["first"] and irq.needs_reset_reason == "first"
    assert irq.read_isr() == ISR_CONFIG


def test_msix_vector_selection():
    fired = []

    class Vec:
        def __init__(self, n: int) -> None:
            self.n = n

        def trigger(self) -> None:
            fired.append(self.n)

        def set_level(self, high: bool) -> None:
            pass

    msix = EventFdMsix([Vec(0), Vec(1), Vec(2)])
    intx = CallbackInterrupt(lambda level: None)
    irq = VirtioInterrupt(intx=intx, msix=msix)
    irq.signal_used_queue(2)
    irq.signal_used_queue(VIRTIO_MSI_NO_VECTOR)  # no vector: no interrupt at all
    irq.signal_used_queue(7)  # beyond the table: ignored
    irq.config_vector = 1
    irq.signal_config_changed()
    assert fired == [2, 1]
    assert intx.count == 0
    assert irq.isr_status == ISR_CONFIG  # config changes always set ISR bit 1
    msix.enabled = False  # back to INTx
    irq.signal_used_queue(2)
    assert intx.count == 1 and irq.read_isr() == ISR_QUEUE | ISR_CONFIG


def test_config_space_is_bounds_checked():
    dev = Echo()
    assert dev.read_config(0, 4) == b"\x01\x02\x03\x04"
    assert dev.read_config(6, 4) == b"\x07\x08\x00\x00"
    assert dev.read_config(100, 2) == b"\x00\x00"
    assert dev.read_config(-1, 4) == b""
    dev.write_config(0, b"\xff")  # read-only by default: ignored
    assert dev.read_config(0, 1) == b"\x01"


def test_feature_negotiation_keeps_offered_bits_only():
    dev = Echo()
    assert dev.features() == 0b1001
    dev.ack_features(0b1111 | 1 << 32)
    assert dev.acked_features == 0b1001
    assert dev.reset() and dev.acked_features == 0


def test_reset_stops_the_worker_promptly(echo):
    echo.activate()
    worker = echo.device.worker
    assert worker.is_alive()
    assert echo.device.reset()
    assert not worker.is_alive()
    assert echo.device.worker is None


def test_device_type_ids():
    assert (DeviceType.NET, DeviceType.BLOCK, DeviceType.RNG, DeviceType.GPU,
            DeviceType.INPUT, DeviceType.WL) == (1, 2, 4, 16, 18, 63)
    assert modern_pci_device_id(DeviceType.RNG) == 0x1044


def test_config_change_bumps_generation_and_interrupts(echo):
    echo.activate()
    echo.device.config[0] = 0x42
    echo.device.config_changed()
    assert echo.device.config_generation == 1
    assert wait_fd(echo.vectors[0])
    assert echo.interrupt.isr_status & ISR_CONFIG
