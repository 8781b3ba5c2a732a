"""What vmm needs to know about the virtio-rng plugin: its PluginSpec.

The entry point ``virtio_rng = "vmm_virtio_rng.plugin:PLUGIN"`` (group ``vmm.devices``,
see ../pyproject.toml) names the object below.  This module is imported by
`vmm plugins list`, `vmm plugins info` and every `vmm run --device virtio_rng:...`, so it
imports only vmmcore.plugin_api; the device model (vmm_virtio_rng.entropy today, a
VirtioDevice once the core's virtio transport exists) is named by ``factory`` and
imported only when a VM is built.
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import Int, Path, PluginSpec


def _validate(options: dict[str, Any]) -> None:
    """Checks across keys, or beyond what a type can say: raise ValueError(one line)."""
    q = options["queue_size"]
    if q & (q - 1):
        raise ValueError(f"queue_size={q} is not a power of two")


PLUGIN = PluginSpec(
    name="virtio_rng",
    kind="device",
    api_version="1.0",
    summary="virtio entropy device: feeds the guest's hw_random from a host source",
    options=(
        Path("source", default="/dev/urandom", must_exist=True,
             help="Host file or device the random bytes are read from."),
        Int("rate", default=0, min=0, max=1 << 30,
            help="Most bytes per second handed to the guest; 0 means no limit."),
        Int("queue_size", default=256, min=2, max=32768,
            help="Entries in the request virtqueue (a power of two)."),
    ),
    policy="virtio_rng.policy",
    # The device model, imported only when a VM is built.
    factory="vmm_virtio_rng.device:create",
    validate=_validate,
)
