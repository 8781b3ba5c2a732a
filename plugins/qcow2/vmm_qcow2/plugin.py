"""The qcow2 disk format's PluginSpec (see vmm_virtio_rng.plugin for the commented template)."""

from __future__ import annotations

from vmmcore.plugin_api import PluginSpec

PLUGIN = PluginSpec(
    name="qcow2",
    kind="disk_format",
    api_version="1.0",
    summary="qcow2 images (version 2 and 3): sparse, copy-on-write, backing files",
    options=(),
    policy="qcow2.policy",
    magic=b"QFI\xfb",
    factory="vmm_qcow2.image:Qcow2Format",
)
