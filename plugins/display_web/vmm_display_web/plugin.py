"""The browser display's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

Select it with ``--gpu display=web`` (``listen=HOST:PORT`` on the GPU says where; the
default is 127.0.0.1:6080) and open http://127.0.0.1:6080/ in any browser.
"""

from __future__ import annotations

from vmmcore.plugin_api import PluginSpec

PLUGIN = PluginSpec(
    name="web",
    kind="display",
    api_version="1.0",
    summary="a browser viewer on localhost: the framebuffer over a WebSocket to a canvas, "
            "keyboard and mouse back to the guest",
    options=(),
    policy="web.policy",
    factory="vmm_display_web.web:WebDisplay",
)
