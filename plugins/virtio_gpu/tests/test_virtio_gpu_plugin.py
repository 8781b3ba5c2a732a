"""The virtio-gpu plugin's contract with the core, and crosvm's --gpu spellings."""

from __future__ import annotations

import pytest
from vmm_virtio_gpu.plugin import PLUGIN

from vmmcore.device_options import DeviceArgs, collect_devices
from vmmcore.errors import ConfigError
from vmmcore.registry import Registry


def test_registered():
    rec = Registry(fresh=True).get("device", "virtio_gpu")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.policy_path.name == "virtio_gpu.policy"


def _select(items, keyboard=False, mouse=False):
    return collect_devices(DeviceArgs(items, keyboard, mouse), registry=Registry(),
                           require_implemented=False)


def _headless_installed():
    return "headless" in Registry().names("display")


def test_gpu_spelling_and_window_inputs():
    if not _headless_installed():
        pytest.skip("the headless display plugin (vmm-display-headless) is not installed")
    [g] = _select([("--gpu", "width=800,height=600,backend=virglrenderer")], True, True)
    assert (g.options["width"], g.options["height"]) == (800, 600)
    assert g.options["backend"] == "virglrenderer" and g.options["display"] == "headless"
    assert g.options["window_keyboard"] and g.options["window_mouse"]


@pytest.mark.parametrize("opts,message", [
    ("width=0", "expected an int from 1 to 16384"),
    ("backend=vulkan", "expected one of 2d, virglrenderer"),
    ("display=nowhere", "display='nowhere' is not an installed display backend"),
    ("hostmem=5G", "expected a size .* from 0 to 4G"),
])
def test_bad_options(opts, message):
    with pytest.raises(ConfigError, match=message):
        _select([("--gpu", opts)])
