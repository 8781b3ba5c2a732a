"""The virtio-wl plugin's contract with the core."""

from __future__ import annotations

import pytest
from vmm_virtio_wl.plugin import PLUGIN

from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.errors import ConfigError
from vmmcore.registry import Registry


def test_registered():
    rec = Registry(fresh=True).get("device", "virtio_wl")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.policy_path.name == "virtio_wl.policy"


def _select(text):
    return collect_devices(DeviceArgs([("--device", text)]), registry=Registry(),
                           require_implemented=False)


def test_socket_positional_and_required(tmp_path):
    sock = tmp_path / "wayland-0"
    sock.touch()
    [d] = _select(f"virtio_wl:{sock},dmabuf=true")
    assert d.options["wayland_sock"] == sock and d.options["dmabuf"] is True
    with pytest.raises(ConfigError, match="missing required option 'wayland_sock'"):
        _select("virtio_wl")
    with pytest.raises(ConfigError, match="does not exist"):
        _select(f"virtio_wl:wayland_sock={tmp_path / 'nope'}")


def test_named_sockets(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    [d] = _select(f'virtio_wl:wayland_sock={a},name=main,named_socks="x={a};y={b}"')
    assert d.options["name"] == "main" and d.options["named_socks"] == f"x={a};y={b}"
    with pytest.raises(ConfigError, match="not NAME=PATH"):
        _select(f'virtio_wl:{a},named_socks="x"')
    with pytest.raises(ConfigError, match="given twice"):
        _select(f'virtio_wl:{a},named_socks="x={a};x={b}"')
    with pytest.raises(ConfigError, match="given twice"):
        _select(f'virtio_wl:{a},name=x,named_socks="x={b}"')
    with pytest.raises(ConfigError, match="does not exist"):
        _select(f'virtio_wl:{a},named_socks="x={tmp_path / "nope"}"')
    with pytest.raises(ConfigError, match="longer than 32 bytes"):
        _select(f'virtio_wl:{a},named_socks="{"n" * 33}={a}"')


def test_factory_builds_the_device(tmp_path):
    from vmm_virtio_wl.device import VirtioWl, create

    from vmmcore.plugin_api import DeviceContext, load_factory

    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    [d] = _select(f'virtio_wl:{a},named_socks="gpu={b}",transition_flags=false')
    assert load_factory(PLUGIN) is create
    dev = create(d.options, DeviceContext(name="virtio_wl0", index=0, mem_size=1 << 28))
    assert isinstance(dev, VirtioWl)
    assert dev.sockets == {"": a, "gpu": b} and dev.vm_memory is None
    assert dev.features() == 1 << 2              # SEND_FENCES only
    assert dev.host_paths() == [a, b]


def test_hooks_wire_vm_memory_only_for_virtio_wl(tmp_path):
    """vmm_virtio_wl.hooks: a VmMemoryController for VMs with a virtio_wl device, handed to
    the in-process models that have none."""
    import contextlib
    from types import SimpleNamespace

    from vmm_virtio_wl import hooks
    from vmm_virtio_wl.device import VirtioWl

    from vmmcore.allocator import SystemAllocator
    from vmmcore.registry import Registry

    rec = Registry(fresh=True).get("hooks", "virtio_wl")
    assert rec is not None and not rec.error, rec
    assert set(rec.hooks) == {"vmm_vm_created", "vmm_devices_created"}
    alloc = SystemAllocator(io=(0x1000, 0x1000), low_mmio=(0xC000_0000, 1 << 28),
                            high_mmio=(1 << 32, 1 << 30), gsi=(24, 63))
    with contextlib.ExitStack() as stack:
        other = SimpleNamespace(config=SimpleNamespace(devices=[SimpleNamespace(name="x")]),
                                vm=object(), stack=stack)
        hooks.vmm_vm_created(vm=other, allocator=alloc)
        assert not hasattr(other, "vm_memory")
        cfg = SimpleNamespace(name="virtio_wl")
        inst = SimpleNamespace(config=SimpleNamespace(devices=[cfg]), vm=object(), stack=stack)
        hooks.vmm_vm_created(vm=inst, allocator=alloc)
        dev = VirtioWl({"": tmp_path / "s"})
        preset = VirtioWl({"": tmp_path / "s"}, vm_memory="core's")
        hooks.vmm_devices_created(vm=inst, devices=[(cfg, SimpleNamespace(device=dev)),
                                                   (cfg, SimpleNamespace(device=preset))])
        assert dev.vm_memory is inst.vm_memory and preset.vm_memory == "core's"
