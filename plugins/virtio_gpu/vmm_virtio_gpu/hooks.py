"""Lifecycle hooks of the virtio-gpu plugin (entry-point group ``vmm``).

``window_keyboard`` / ``window_mouse`` (crosvm's --display-window-keyboard/-mouse) ask
for virtio-input devices fed from the GPU's display. The core creates one PCI device per
DeviceConfig, so vmm_configure appends a ``virtio_input`` DeviceConfig per requested
input, after every other device; its ``source`` names the input channel
("display:virtio_gpu0/keyboard", vmmcore.display.input_channel) that the GPU's factory
attaches to its display.
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import hookimpl

VMM_API_VERSION = "1.0"

GPU = "virtio_gpu"
INPUT = "virtio_input"


def _canonical(name: str) -> str:
    return name.replace("-", "_").lower()


@hookimpl
def vmm_configure(config: Any) -> None:
    from vmmcore.config import DeviceConfig
    from vmmcore.errors import ConfigError
    from vmmcore.registry import get_registry

    gpus = [d for d in config.devices if _canonical(d.name) == GPU]
    wanted = []
    for index, gpu in enumerate(gpus):
        for option, kind in (("window_keyboard", "keyboard"), ("window_mouse", "tablet")):
            if gpu.options.get(option):
                wanted.append((index, gpu, kind))
    if not wanted:
        return
    record = get_registry().get("device", INPUT)
    if record is None or record.spec is None or not record.implemented:
        why = "is not installed" if record is None else (record.error or "is not usable")
        raise ConfigError(f"--gpu window_keyboard/window_mouse need the {INPUT} device "
                          f"plugin (vmm-virtio-input), which {why}")
    already = {d.options.get("source") for d in config.devices
               if _canonical(d.name) == INPUT}
    for index, _gpu, kind in wanted:
        source = f"display:{GPU}{index}/{kind}"
        if source in already:
            continue        # vmm_configure ran twice on this config
        options = {o.name: o.default_value() for o in record.spec.options}
        options.update(kind=kind, source=source)
        config.devices.append(DeviceConfig(INPUT, options))
