"""The virtio-gpu plugin's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

crosvm's ``--gpu key=value,...`` maps here, and ``--display-window-keyboard`` /
``--display-window-mouse`` set window_keyboard / window_mouse on every GPU.
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import Bool, Enum, Int, Path, PluginSpec, Size, Str


def _sandbox_binds(options: dict[str, Any]) -> list[str | tuple[str, bool]]:
    """backend=virglrenderer: Mesa loads its EGL vendor, DRI driver and LLVM, and reads
    their configuration, when it initialises in the jail (read-only bind mounts)."""
    if options.get("backend") != "virglrenderer":
        return []
    from vmm_virtio_gpu.virgl import sandbox_paths

    return list(sandbox_paths())


def _sandbox_policies(options: dict[str, Any]) -> list[str]:
    """backend=virglrenderer: Mesa's executable mappings, opens and directory listings;
    the 2D device does without them."""
    return ["virtio_gpu_virgl.policy"] if options.get("backend") == "virglrenderer" else []


def _validate(options: dict[str, Any]) -> None:
    display = options["display"]
    from vmmcore.registry import get_registry

    displays = get_registry().names("display")
    if display not in displays:
        raise ValueError(f"display={display!r} is not an installed display backend "
                         f"(installed: {', '.join(displays) or 'none'})")


PLUGIN = PluginSpec(
    name="virtio_gpu",
    kind="device",
    api_version="1.5",                # sandbox_policies; on_device_sandboxed (1.5)
    summary="virtio GPU: 2D scanout (virgl 3D where libvirglrenderer works)",
    options=(
        Int("width", default=1280, min=1, max=16384, help="Display width in pixels."),
        Int("height", default=1024, min=1, max=16384, help="Display height in pixels."),
        Enum("backend", ("2d", "virglrenderer"), default="2d",
             help="Rendering: 2d (software scanout) or virglrenderer (OpenGL for the guest)."),
        Str("display", default="headless",
            help="Display backend plugin that shows the scanout "
                 "(see `vmm plugins list --kind display`)."),
        Int("refresh_rate", default=60, min=1, max=240, help="Vertical refresh rate (Hz)."),
        Int("num_scanouts", default=1, min=1, max=16,
            help="Number of displays (scanouts) the guest sees, each width x height."),
        Path("screenshot", default=None,
             help="Write each scanout as a PNG here (scanout N>0: NAME-N.png): at most "
                  "twice a second while the guest draws, and when the VM stops."),
        Str("listen", default="",
            help="display=web: HOST:PORT the browser viewer listens on (default "
                 "127.0.0.1:6080; port 0 picks a free one)."),
        Size("hostmem", default=0, min=0, max=4 << 30,
             help="Host-visible memory region for blob resources (0: none)."),
        Bool("window_keyboard", default=False,
             help="Add a virtio-input keyboard fed from the display window "
                  "(crosvm's --display-window-keyboard)."),
        Bool("window_mouse", default=False,
             help="Add a virtio-input mouse fed from the display window "
                  "(crosvm's --display-window-mouse)."),
    ),
    policy="virtio_gpu.policy",
    factory="vmm_virtio_gpu.factory:create",
    policy_with=("display",),                 # the display backend runs in its process
    sandbox_binds=_sandbox_binds,
    sandbox_policies=_sandbox_policies,
    # imported lazily by the 3D device (cffi's backend among them), so before the jail
    sandbox_preload=("_cffi_backend", "cffi", "vmm_virtio_gpu.virgl",
                     "vmm_virtio_gpu.device3d", "vmm_virtio_gpu.limits3d"),
    validate=_validate,
)
