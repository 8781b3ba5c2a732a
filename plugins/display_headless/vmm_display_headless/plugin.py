"""The headless display's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

Select it with ``--gpu display=headless`` (the default display of virtio_gpu).
"""

from __future__ import annotations

from vmmcore.plugin_api import PluginSpec

PLUGIN = PluginSpec(
    name="headless",
    kind="display",
    api_version="1.0",
    summary="no window: scanouts are kept in memory (tests, servers, screenshots)",
    options=(),
    policy="headless.policy",
    factory="vmm_display_headless.headless:HeadlessDisplay",
)
