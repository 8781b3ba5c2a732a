"""MSI-X: capability registers, table and PBA in a BAR, per-vector and function
masking with pending bits, lazy route pushes, and the KVM routing table."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus
from vmmcore.eventfd import EventFd
from vmmcore.kvm.vm import IrqRoute, default_irq_routes
from vmmcore.pci.config_space import BarKind, NetworkSubclass, PciClass, PciConfiguration
from vmmcore.pci.device import ConfiguredPciDevice
from vmmcore.pci.irq import KvmIrqRouter
from vmmcore.pci.msix import MSIX_CAP_ID, MsixConfig
from vmmcore.pci.root import PciRoot
from vmmcore.pci.testing import ConfigEcam, FakeIrqRouter

NV = 4
TABLE, PBA = 0x0, 0x800
ENABLE, FMASK = 1 << 15, 1 << 14


class MsixDev(ConfiguredPciDevice):
    def __init__(self, nv=NV):
        cfg = PciConfiguration(vendor_id=0x1AF4, device_id=0x1041, class_code=PciClass.NETWORK,
                               subclass=NetworkSubclass.ETHERNET)
        super().__init__(cfg, "msixdev")
        cfg.add_bar(0, 0x1000, BarKind.MEM32)
        cfg.add_capability(0x09, bytes(6))          # something before MSI-X in the list
        self.msix = MsixConfig(nv, table_bar=0, table_offset=TABLE, pba_bar=0,
                               pba_offset=PBA, label="msixdev")
        self.cap = self.msix.add_capability(cfg)


@pytest.fixture
def env():
    allocator = layout.system_allocator(256 << 20)
    io_bus, mmio_bus = Bus("io"), Bus("mmio")
    router = FakeIrqRouter()
    root = PciRoot(io_bus, mmio_bus, allocator, irq_router=router)
    root.install()
    dev = MsixDev()
    root.add_device(dev)
    ecam = ConfigEcam(mmio_bus, layout.PCIE_ECAM_START)
    ecam.write(0, 1, 0, 0x04, 0x2, 2)
    bar = dev.config.bar_address(0)

    class Env:
        pass
    e = Env()
    e.dev, e.router, e.ecam, e.mmio, e.bar, e.msix = dev, router, ecam, mmio_bus, bar, dev.msix
    e.evts = dev.msix.events()
    e.gsis = dev.msix.gsis()
    return e


def control(e, value=None):
    if value is not None:
        e.ecam.write(0, 1, 0, e.dev.cap + 2, value, 2)
    return e.ecam.read(0, 1, 0, e.dev.cap + 2, 2)


def program(e, v, address=0xFEE0_0000, data=0x4041, masked=False):
    base = e.bar + TABLE + 16 * v
    e.mmio.write(base, (address & 0xFFFF_FFFF).to_bytes(4, "little"))
    e.mmio.write(base + 4, (address >> 32).to_bytes(4, "little"))
    e.mmio.write(base + 8, data.to_bytes(4, "little"))
    e.mmio.write(base + 12, int(masked).to_bytes(4, "little"))


def set_mask(e, v, masked):
    e.mmio.write(e.bar + TABLE + 16 * v + 12, int(masked).to_bytes(4, "little"))


def pba(e):
    return int.from_bytes(e.mmio.read(e.bar + PBA, 8), "little")


def fired(e, v):
    return e.evts[v].try_read()


def test_capability_registers(env):
    caps, pos = [], env.ecam.read(0, 1, 0, 0x34, 1)
    while pos:
        caps.append((pos, env.ecam.read(0, 1, 0, pos, 1)))
        pos = env.ecam.read(0, 1, 0, pos + 1, 1)
    assert caps[-1] == (env.dev.cap, MSIX_CAP_ID)
    assert control(env) == NV - 1
    assert env.ecam.read(0, 1, 0, env.dev.cap + 4) == TABLE | 0
    assert env.ecam.read(0, 1, 0, env.dev.cap + 8) == PBA | 0
    control(env, 0xFFFF)                       # only enable and function mask stick
    assert control(env) == ENABLE | FMASK | (NV - 1)
    env.ecam.write(0, 1, 0, env.dev.cap + 4, 0xFFFF_FFFF)
    assert env.ecam.read(0, 1, 0, env.dev.cap + 4) == TABLE


def test_reset_state_all_masked_nothing_pending(env):
    for v in range(NV):
        ctrl = int.from_bytes(env.mmio.read(env.bar + 16 * v + 12, 4), "little")
        assert ctrl == 1
        assert env.msix.is_masked(v)
    assert pba(env) == 0
    assert all(g is not None and g >= 24 for g in env.gsis)
    assert len(set(env.gsis)) == NV
    assert {g: [e for e, _ in fds] for g, fds in env.router.irqfds.items()
            if g in env.gsis} == {g: [e] for g, e in zip(env.gsis, env.evts, strict=True)}


def test_msix_disabled_delivers_nothing(env):
    program(env, 0)
    assert env.msix.trigger(0) is False
    assert fired(env, 0) == 0 and pba(env) == 0


def test_route_is_pushed_once_when_the_vector_becomes_deliverable(env):
    program(env, 1, address=0xFEE0_1000, data=0x31, masked=True)
    control(env, ENABLE)
    assert env.router.pushes == []             # still masked: nothing pushed
    set_mask(env, 1, False)
    assert env.router.pushes == [(env.gsis[1], 0xFEE0_1000, 0x31)]
    set_mask(env, 1, True)
    set_mask(env, 1, False)
    assert len(env.router.pushes) == 1         # unchanged message: no second push
    assert env.msix.trigger(1) and fired(env, 1) == 1
    # Linux's rewrite: mask, three dwords, unmask -> exactly one new route.
    set_mask(env, 1, True)
    program(env, 1, address=0xFEE0_2000, data=0x32, masked=True)
    set_mask(env, 1, False)
    assert env.router.pushes[1:] == [(env.gsis[1], 0xFEE0_2000, 0x32)]
    # A change while unmasked is pushed right away.
    env.mmio.write(env.bar + 16 + 8, (0x33).to_bytes(4, "little"))
    assert env.router.pushes[-1] == (env.gsis[1], 0xFEE0_2000, 0x33)
    assert env.router.routes[env.gsis[1]] == (0xFEE0_2000, 0x33)


def test_masked_vector_sets_pending_and_unmask_delivers(env):
    program(env, 2, masked=True)
    control(env, ENABLE)
    assert env.msix.trigger(2) is False
    assert env.msix.trigger(2) is False
    assert fired(env, 2) == 0
    assert pba(env) == 1 << 2 and env.msix.is_pending(2)
    set_mask(env, 2, False)
    assert fired(env, 2) == 1                  # one message for any number of triggers
    assert pba(env) == 0
    assert env.router.routes[env.gsis[2]] == (0xFEE0_0000, 0x4041)


def test_function_mask_holds_every_vector(env):
    for v in range(NV):
        program(env, v, data=0x40 + v)
    control(env, ENABLE | FMASK)
    assert env.router.pushes == []
    for v in (0, 3):
        assert env.msix.trigger(v) is False
    assert pba(env) == 0b1001
    assert env.msix.is_masked(1)
    control(env, ENABLE)
    assert [fired(env, v) for v in range(NV)] == [1, 0, 0, 1]
    assert pba(env) == 0
    assert {g for g, _, _ in env.router.pushes} == set(env.gsis)


def test_pending_survives_disable_until_delivered(env):
    program(env, 0, masked=True)
    control(env, ENABLE)
    env.msix.trigger(0)
    control(env, 0)                            # MSI-X off: nothing delivered
    set_mask(env, 0, False)
    assert fired(env, 0) == 0 and env.msix.is_pending(0)
    control(env, ENABLE)
    assert fired(env, 0) == 1 and not env.msix.is_pending(0)


def test_table_access_shapes(env):
    base = env.bar + 16 * 3
    env.mmio.write(base, (0x0000_0001_FEE0_0003).to_bytes(8, "little"))   # qword addr
    assert env.mmio.read(base, 8) == (0x0000_0001_FEE0_0000).to_bytes(8, "little")
    env.mmio.write(base + 8, (0xFFFF_FFFF_0000_1234).to_bytes(8, "little"))  # data + ctrl
    assert env.msix.vector(3).data == 0x1234
    assert int.from_bytes(env.mmio.read(base + 12, 4), "little") == 1  # reserved bits 0
    env.mmio.write(base + 9, b"\x56")                                  # odd byte write
    assert env.msix.vector(3).data == 0x5634
    assert env.mmio.read(base + 10, 2) == b"\x00\x00"
    env.mmio.write(env.bar + PBA, b"\xff" * 8)                         # PBA is read-only
    assert pba(env) == 0
    assert env.mmio.read(env.bar + 16 * NV, 4) == b"\x00" * 4          # past the table


def test_out_of_range_vectors_are_ignored(env):
    control(env, ENABLE)
    assert env.msix.trigger(NV) is False and env.msix.trigger(-1) is False
    assert pba(env) == 0


def test_reset_masks_everything_and_clears_enable(env):
    program(env, 0)
    control(env, ENABLE)
    env.msix.reset()
    assert control(env) == NV - 1 and not env.msix.enabled
    assert env.msix.vector(0).masked and env.msix.vector(0).address == 0


@pytest.mark.parametrize("kw", [
    dict(num_vectors=0), dict(num_vectors=2049), dict(table_offset=4),
    dict(pba_offset=0x10), dict(table_bar=6),
])
def test_bad_layouts_are_refused(kw):
    args = dict(num_vectors=4, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    args.update(kw)
    nv = args.pop("num_vectors")
    with pytest.raises(ValueError):
        MsixConfig(nv, **args)


def test_pba_layout_for_many_vectors():
    m = MsixConfig(100, table_bar=0, table_offset=0, pba_bar=1, pba_offset=0)
    assert m.pba_size == 16
    m.assign(FakeIrqRouter(), [(100 + i, EventFd(nonblocking=True)) for i in range(100)])
    m._control = ENABLE                         # no config space in this unit test
    m.trigger(70)
    assert m.pba_read(8, 8) == (1 << 6).to_bytes(8, "little")
    for evt in m.events():
        evt.close()


class FakeVm:
    def __init__(self):
        self.tables = []
        self.irqfds = []

    def set_gsi_routing(self, routes):
        self.tables.append(list(routes))

    def register_irqfd(self, evt, gsi, resample=None):
        self.irqfds.append((evt, gsi, resample))

    def unregister_irqfd(self, evt, gsi):
        self.irqfds.remove((evt, gsi, None))


def test_kvm_router_pushes_defaults_plus_every_msi_route():
    vm = FakeVm()
    router = KvmIrqRouter(vm)
    router.set_msi_route(25, 0xFEE0_0000, 0x41)
    router.set_msi_route(24, 0xFEE0_1000, 0x42)
    router.set_msi_route(24, 0xFEE0_1000, 0x42)          # unchanged: not pushed
    assert len(vm.tables) == 2
    defaults = default_irq_routes()
    assert vm.tables[-1] == defaults + [IrqRoute.msi(24, 0xFEE0_1000, 0x42),
                                        IrqRoute.msi(25, 0xFEE0_0000, 0x41)]
    router.remove_route(25)
    assert vm.tables[-1] == defaults + [IrqRoute.msi(24, 0xFEE0_1000, 0x42)]
    router.remove_route(99)
    assert len(vm.tables) == 3
    with pytest.raises(ValueError):
        router.set_msi_route(17, 0xFEE0_0000, 0x41)      # an IOAPIC GSI
    evt = EventFd()
    router.register_irqfd(evt, 24)
    router.unregister_irqfd(evt, 24)
    assert vm.irqfds == []
    evt.close()

_access = st.tuples(st.sampled_from(["cfg", "bar"]), st.integers(0, 0xFFF),
                    st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, (1 << 64) - 1))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_access, max_size=80))
def test_hostile_config_and_bar_traffic_never_raises(env, accesses):
    """Random ECAM and BAR accesses of any size: the VMM neither raises nor maps a BAR
    outside its windows, and MSI-X state stays self-consistent."""
    for where, offset, size, value in accesses:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if where == "cfg":
            addr = env.ecam.addr(0, 1, 0, offset)
            env.mmio.write(addr, data)
            assert len(env.mmio.read(addr, size)) == size
        else:
            for base in {env.dev.config.bar_address(0), env.bar}:
                env.mmio.write(base + offset % 0x1000, data)
                env.mmio.read(base + offset % 0x1000, size)
        for v in range(NV):
            env.msix.trigger(v)
    low = (0xC000_0000, 0xE000_0000)
    for r in env.mmio.ranges():
        label = r.device.debug_label()
        assert label == "pci-ecam" or low[0] <= r.base < low[1] or r.base >= 1 << 32
    for v in range(NV):
        assert not (env.msix.is_pending(v) and not env.msix.is_masked(v) and env.msix.enabled)


def test_direct_eventfd_follows_enable_and_masks_and_listeners_hear_every_change(env):
    """What a device's native data plane relies on (plugin API 1.2): direct_eventfd(v) is
    the vector's irqfd exactly while trigger(v) would just write it, and a listener is
    called on each change, before the guest's write completes."""
    e = env
    calls = []
    e.msix.add_listener(lambda: calls.append(e.msix.direct_eventfd(1)))
    program(e, 1)
    assert e.msix.direct_eventfd(1) is None                      # MSI-X still disabled
    control(e, ENABLE)
    assert calls[-1] == e.msix.direct_eventfd(1) == e.evts[1].fileno()
    assert e.router.routes[e.gsis[1]] == (0xFEE0_0000, 0x4041)   # its route was pushed
    set_mask(e, 1, True)
    assert calls[-1] is None and e.msix.direct_eventfd(1) is None
    set_mask(e, 1, False)
    assert calls[-1] == e.evts[1].fileno()
    control(e, ENABLE | FMASK)
    assert calls[-1] is None
    n = len(calls)
    e.msix.remove_listener(e.msix._listeners[0])
    control(e, ENABLE)
    assert len(calls) == n and e.msix.direct_eventfd(1) == e.evts[1].fileno()
    assert e.msix.direct_eventfd(NV) is None and e.msix.direct_eventfd(-1) is None
