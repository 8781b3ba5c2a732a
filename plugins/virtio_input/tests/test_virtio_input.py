"""The virtio-input plugin: its contract with the core, the config space Linux reads,
the event and status queues, the display input channel, and the GPU's window_* hook."""

from __future__ import annotations

import struct
import time

import pytest
from vmm_virtio_input.device import (
    ABS_MAX,
    CFG_ABS_INFO,
    CFG_EV_BITS,
    CFG_ID_DEVIDS,
    CFG_ID_NAME,
    CFG_ID_SERIAL,
    CFG_PROP_BITS,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_REL,
    EV_REP,
    EV_SYN,
    MAX_PENDING,
    VirtioInput,
    create,
)
from vmm_virtio_input.plugin import PLUGIN

from vmmcore.config import DeviceConfig, VmConfig
from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.display import InputChannel, close_input_channels, input_channel
from vmmcore.errors import ConfigError
from vmmcore.plugin_api import DeviceContext
from vmmcore.registry import Registry
from vmmcore.virtio.testing import DeviceHarness

EVENT = struct.Struct("<HHi")


def test_registered():
    rec = Registry(fresh=True).get("device", "virtio_input")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.policy_path.name == "virtio_input.policy"
    assert "@include common_device.policy" in rec.policy_path.read_text()


def test_options():
    [d] = collect_devices(DeviceArgs([("--device", "virtio-input:kind=tablet")]),
                          registry=Registry())
    assert d.options["kind"] == "tablet" and d.options["source"] == ""
    with pytest.raises(ConfigError, match="source='x' is not valid"):
        collect_devices(DeviceArgs([("--device", "virtio_input:source=x")]),
                        registry=Registry())


def cfg(dev: VirtioInput, select: int, subsel: int = 0) -> bytes:
    """What Linux's virtinput_cfg_select() does: write select/subsel, read size + union."""
    dev.write_config(0, bytes([select]))
    dev.write_config(1, bytes([subsel]))
    size = dev.read_config(2, 1)[0]
    return dev.read_config(8, size) if size else b""


def bits(data: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


def test_keyboard_config_space():
    dev = VirtioInput("keyboard", serial="kbd0")
    assert cfg(dev, CFG_ID_NAME) == b"vmm virtio keyboard"
    assert cfg(dev, CFG_ID_SERIAL) == b"kbd0"
    assert struct.unpack("<HHHH", cfg(dev, CFG_ID_DEVIDS))[0] == 0x06   # BUS_VIRTUAL
    assert cfg(dev, CFG_PROP_BITS) == b""
    keys = bits(cfg(dev, CFG_EV_BITS, EV_KEY))
    assert {1, 28, 30, 57, 248} <= keys and 0 not in keys           # ESC, ENTER, A, SPACE
    assert cfg(dev, CFG_EV_BITS, EV_REP)                           # autorepeat
    assert bits(cfg(dev, CFG_EV_BITS, EV_LED)) == {0, 1, 2}
    assert cfg(dev, CFG_EV_BITS, EV_REL) == b"" and cfg(dev, CFG_EV_BITS, EV_ABS) == b""
    assert cfg(dev, 0x77) == b""                                    # unknown select: size 0
    # a 16-bit write of select+subsel works too
    dev.write_config(0, bytes([CFG_EV_BITS, EV_LED]))
    assert dev.read_config(2, 1) == b"\x01"


def test_tablet_and_mouse_config_space():
    tab = VirtioInput("tablet")
    assert bits(cfg(tab, CFG_EV_BITS, EV_ABS)) == {0, 1}
    assert {0x110, 0x111, 0x112} <= bits(cfg(tab, CFG_EV_BITS, EV_KEY))
    assert struct.unpack("<iiiii", cfg(tab, CFG_ABS_INFO, 0)) == (0, ABS_MAX, 0, 0, 0)
    assert struct.unpack("<iiiii", cfg(tab, CFG_ABS_INFO, 1))[1] == ABS_MAX
    assert cfg(tab, CFG_ABS_INFO, 5) == b""
    mouse = VirtioInput("mouse")
    assert {0, 1, 8} <= bits(cfg(mouse, CFG_EV_BITS, EV_REL))
    assert cfg(mouse, CFG_EV_BITS, EV_ABS) == b""
    assert bits(cfg(mouse, CFG_PROP_BITS)) == {0}                   # INPUT_PROP_POINTER


@pytest.fixture
def kbd():
    chan = InputChannel("test")
    h = DeviceHarness(VirtioInput("keyboard", channel=chan, queue_size=16))
    h.activate()
    yield h, chan
    h.close()
    chan.close()


def _events(used) -> list[tuple[int, int, int]]:
    return [EVENT.unpack(u.data[:8]) for u in used]


def test_events_from_the_channel_fill_posted_buffers(kbd):
    h, chan = kbd
    d = h.drivers[0]
    for _ in range(4):
        d.add(in_sizes=[8])
    d.kick()
    chan.send([(EV_KEY, 30, 1), (EV_SYN, 0, 0)])
    used = h.wait_used(0, count=2)
    assert _events(used) == [(EV_KEY, 30, 1), (EV_SYN, 0, 0)]
    assert all(u.length == 8 for u in used)


def test_events_wait_for_buffers(kbd):
    h, _ = kbd
    dev = h.device
    dev.inject([(EV_KEY, 31, 1), (EV_SYN, 0, 0), (EV_KEY, 31, 0), (EV_SYN, 0, 0)])
    assert len(dev.pending) == 4
    d = h.drivers[0]
    for _ in range(3):
        d.add(in_sizes=[8])
    used = h.wait_used(0, count=3)
    assert _events(used) == [(EV_KEY, 31, 1), (EV_SYN, 0, 0), (EV_KEY, 31, 0)]
    d.add(in_sizes=[8])
    assert _events(h.wait_used(0)) == [(EV_SYN, 0, 0)]


def test_pending_is_bounded(kbd):
    h, _ = kbd
    h.device.inject([(EV_KEY, 30, 1)] * (MAX_PENDING + 10))
    assert len(h.device.pending) == MAX_PENDING and h.device.dropped == 10


def test_hostile_buffers_do_not_break_it(kbd):
    h, _ = kbd
    d = h.drivers[0]
    d.add(in_sizes=[3])                 # too small for an event: returned with length 0
    d.add(out=[b"x" * 8])               # not writable at all
    d.add(in_sizes=[8])
    h.device.inject([(EV_KEY, 2, 1), (EV_KEY, 3, 1), (EV_KEY, 4, 1)])
    used = h.wait_used(0, count=3)
    assert [u.length for u in used] == [0, 0, 8]
    assert h.reset_reasons == []


def test_status_queue_records_leds(kbd):
    h, _ = kbd
    s = h.drivers[1]
    s.add(out=[EVENT.pack(EV_LED, 1, 1) + EVENT.pack(EV_SYN, 0, 0)])
    s.add(out=[b"\x01\x02"])            # a short, meaningless status buffer
    [a, b] = h.wait_used(1, count=2)
    assert a.length == 0 and b.length == 0
    assert h.device.leds == {1: True} and h.reset_reasons == []


def test_display_to_input_through_named_channels():
    from vmmcore.display import Display, DisplayOptions

    close_input_channels()
    try:
        dev = create({"kind": "tablet", "source": "display:virtio_gpu0/tablet",
                      "queue_size": 8}, DeviceContext("virtio_input0", 0, 1 << 22))
        disp = Display(DisplayOptions(width=200, height=100))
        disp.attach_input("tablet", input_channel("virtio_gpu0/tablet"))
        h = DeviceHarness(dev)
        h.activate()
        try:
            d = h.drivers[0]
            for _ in range(4):
                d.add(in_sizes=[8])
            d.kick()
            assert disp.pointer_absolute(0, 199, 0, {0x110: True})
            used = h.wait_used(0, count=4)
            assert _events(used) == [(EV_ABS, 0, ABS_MAX), (EV_ABS, 1, 0),
                                     (EV_KEY, 0x110, 1), (EV_SYN, 0, 0)]
        finally:
            h.close()
    finally:
        close_input_channels()


# ----------------------------------------------------------------- the GPU's window_* hook


def _gpu_hook():
    try:
        from vmm_virtio_gpu import hooks
    except ImportError:
        pytest.skip("vmm-virtio-gpu is not installed")
    return hooks


def test_gpu_window_options_add_input_devices():
    hooks = _gpu_hook()
    args = DeviceArgs([("--gpu", "width=800,height=600,display=headless,"
                                 "window_keyboard=true,window_mouse=true"),
                       ("--device", "virtio_rng")])
    config = VmConfig(devices=collect_devices(args, registry=Registry()))
    hooks.vmm_configure(config)
    hooks.vmm_configure(config)                     # idempotent
    names = [(d.name, d.options.get("kind"), d.options.get("source")) for d in config.devices]
    assert names[2:] == [("virtio_input", "keyboard", "display:virtio_gpu0/keyboard"),
                         ("virtio_input", "tablet", "display:virtio_gpu0/tablet")]
    assert set(config.devices[2].options) == {o.name for o in PLUGIN.options}


def test_gpu_without_window_options_adds_nothing():
    hooks = _gpu_hook()
    config = VmConfig(devices=[DeviceConfig("virtio_gpu", {"width": 8, "height": 8})])
    hooks.vmm_configure(config)
    assert len(config.devices) == 1


def test_the_hook_is_registered_with_the_core():
    _gpu_hook()
    from vmmcore.registry import get_registry

    impls = get_registry().hook_manager().hook.vmm_configure.get_hookimpls()
    assert any(i.plugin_name.endswith("virtio_gpu") or "vmm_virtio_gpu" in repr(i.plugin)
               for i in impls), impls


def test_keyboard_through_a_whole_gpu_factory():
    """--gpu window_keyboard: the GPU's display feeds the hook-added keyboard."""
    _gpu_hook()
    from vmm_virtio_gpu.factory import create as create_gpu

    close_input_channels()
    try:
        gpu = create_gpu({"width": 16, "height": 16, "display": "headless",
                          "window_keyboard": True, "window_mouse": False},
                         DeviceContext("virtio_gpu0", 0, 1 << 22))
        kbd = create({"kind": "keyboard", "source": "display:virtio_gpu0/keyboard",
                      "queue_size": 8}, None)
        h = DeviceHarness(kbd)
        h.activate()
        try:
            d = h.drivers[0]
            d.add(in_sizes=[8])
            d.add(in_sizes=[8])
            d.kick()
            assert gpu.display.key(30, True)
            deadline = time.monotonic() + 5
            used = []
            while len(used) < 2 and time.monotonic() < deadline:
                used += h.wait_used(0, count=2 - len(used), timeout=0.5)
            assert _events(used) == [(EV_KEY, 30, 1), (EV_SYN, 0, 0)]
        finally:
            h.close()
            gpu.shutdown()
    finally:
        close_input_channels()


def test_sandboxed_under_its_policy_events_cross_the_channel():
    """As vm_builder does it: the factory here, the device in a jailed, seccomp'd
    process; the display side (this process) sends through the channel."""
    from pathlib import Path

    import vmm_virtio_input

    try:
        from vmmcore.sandbox.testing import PciVirtioRig
    except ImportError:
        pytest.skip("this core has no sandbox")
    from vmmcore.virtio.pci_transport import VirtioPciDevice

    close_input_channels()
    model = create({"kind": "keyboard", "source": "display:virtio_gpu0/keyboard",
                    "queue_size": 16}, None)
    policy = str(Path(vmm_virtio_input.__file__).parent / "virtio_input.policy")
    try:
        rig = PciVirtioRig(lambda mem: VirtioPciDevice(model, mem, label="virtio_input0"),
                           sandboxed=True, policies=[policy], keep_fds=model.keep_fds())
    except (OSError, PermissionError) as e:
        pytest.skip(f"no sandbox here: {e}")
    try:
        with rig:
            assert rig.read_device_config(0, 1) == b"\0"
            input_channel("virtio_gpu0/keyboard").send([(EV_KEY, 30, 1), (EV_SYN, 0, 0)])
            first = rig.request(0, in_sizes=[8])
            second = rig.request(0, in_sizes=[8])
            assert [EVENT.unpack(u.data[:8]) for u in (first, second)] == [
                (EV_KEY, 30, 1), (EV_SYN, 0, 0)]
            assert not rig.device.dead, rig.device.death_reason
    finally:
        close_input_channels()
