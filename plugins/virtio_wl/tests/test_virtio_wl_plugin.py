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
    assert d.options["socket"] == sock and d.options["dmabuf"] is True
    with pytest.raises(ConfigError, match="missing required option 'socket'"):
        _select("virtio_wl")
    with pytest.raises(ConfigError, match="does not exist"):
        _select(f"virtio_wl:socket={tmp_path / 'nope'}")
