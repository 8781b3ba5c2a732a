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


def test_factory_takes_the_vm_memory_channel_from_the_context(tmp_path):
    """Plugin API 1.1: the core hands VmMemoryRequest in through DeviceContext.vm_memory."""
    from vmm_virtio_wl.device import create

    from vmmcore.plugin_api import DeviceContext

    a = tmp_path / "wayland-0"
    a.touch()
    [d] = _select(f"virtio_wl:{a}")
    channel = object()
    dev = create(d.options, DeviceContext(name="virtio_wl0", index=0, mem_size=1 << 28,
                                          vm_memory=channel))
    assert dev.vm_memory is channel
