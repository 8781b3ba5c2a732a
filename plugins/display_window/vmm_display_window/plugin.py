"""The window display's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

Select it with ``--gpu display=window``; ``window_keyboard`` / ``window_mouse`` (crosvm's
--display-window-keyboard / --display-window-mouse) turn the window's keyboard and
pointer into virtio-input events.

The window opens in the GPU's device process, after its jail closed. What it needs
there (the X11 socket and Xauthority bound in, pygame and SDL's X11 libraries loaded
beforehand) joins the jail of a GPU that opened this display, and only that one (API
1.6; see vmm_display_window.x11).
"""

from __future__ import annotations

import os
from typing import Any

from vmmcore.plugin_api import PluginSpec


def _sandbox_binds(options: dict[str, Any]) -> list[str | tuple[str, bool]]:
    """The X server's socket and the Xauthority file, read-only (the GPU's options do
    not matter: $DISPLAY says which server)."""
    from vmm_display_window.x11 import sandbox_binds

    return list(sandbox_binds(os.environ))


PLUGIN = PluginSpec(
    name="window",
    kind="display",
    api_version="1.6",                # a display's sandbox_binds/preload join the GPU's jail
    summary="an SDL2 window (pygame) showing scanout 0; keyboard and pointer to the guest",
    options=(),
    policy="window.policy",
    factory="vmm_display_window.window:WindowDisplay",
    sandbox_binds=_sandbox_binds,
    sandbox_preload=("vmm_display_window.preload",),
)
