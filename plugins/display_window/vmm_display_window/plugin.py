"""The window display's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

Select it with ``--gpu display=window``; ``window_keyboard`` / ``window_mouse`` (crosvm's
--display-window-keyboard / --display-window-mouse) turn the window's keyboard and
pointer into virtio-input events.
"""

from __future__ import annotations

from vmmcore.plugin_api import PluginSpec

PLUGIN = PluginSpec(
    name="window",
    kind="display",
    api_version="1.0",
    summary="an SDL2 window (pygame) showing scanout 0; keyboard and pointer to the guest",
    options=(),
    policy="window.policy",
    factory="vmm_display_window.window:WindowDisplay",
)
