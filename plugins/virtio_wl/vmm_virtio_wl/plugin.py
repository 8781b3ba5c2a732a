"""The virtio-wl plugin's PluginSpec (see vmm_virtio_rng.plugin for the commented template)."""

from __future__ import annotations

from vmmcore.plugin_api import Bool, Path, PluginSpec, Str

PLUGIN = PluginSpec(
    name="virtio_wl",
    kind="device",
    api_version="1.0",
    summary="virtio-wl: forwards the guest's Wayland clients to a host compositor socket",
    options=(
        Path("socket", required=True, must_exist=True,
             help="The host Wayland compositor's socket, e.g. $XDG_RUNTIME_DIR/wayland-0."),
        Str("name", default="", help="Name the guest uses for this socket (\"\": default)."),
        Bool("dmabuf", default=False, help="Allow guest dma-buf allocation (needs a GPU)."),
        Bool("transition_flags", default=True, help="Use the newer VFD transition flags."),
    ),
    positional="socket",
    policy="virtio_wl.policy",
    factory=None,   # the device model comes with the virtio-wl issue
)
