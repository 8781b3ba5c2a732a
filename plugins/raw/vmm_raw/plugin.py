"""The raw disk format's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

A disk format is a library used inside the block device's process; its policy lists the
extra syscalls it needs there.  Raw has no magic: it is what `format=auto` falls back to.
"""

from __future__ import annotations

from vmmcore.plugin_api import PluginSpec

PLUGIN = PluginSpec(
    name="raw",
    kind="disk_format",
    api_version="1.2",
    summary="raw disk images: the file is the disk, byte for byte",
    options=(),
    policy="raw.policy",
    magic=None,
    factory="vmm_raw.raw:RawFormat",
)
