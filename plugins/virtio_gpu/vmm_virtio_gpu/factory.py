"""The PluginSpec factory: a virtio-gpu (2D, or virgl 3D) with its display backend.

It runs in the main process before the device processes fork: it opens the display and
the window inputs there, and for backend=virglrenderer it only checks (in a child
process) that virglrenderer initialises, so that a host where it cannot stops at
start-up with the reason; the device initialises it later, in its own process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmm_virtio_gpu.device import VirtioGpu


def create(options: Mapping[str, Any], ctx: Any) -> VirtioGpu:
    """The PluginSpec factory: a GPU with its display backend (and window inputs)."""
    from vmmcore.display import DisplayOptions, input_channel, open_display

    gpu_class = VirtioGpu
    if options.get("backend", "2d") == "virglrenderer":
        from vmm_virtio_gpu.device3d import VirglGpu
        from vmm_virtio_gpu.virgl import check_virglrenderer

        check_virglrenderer()
        gpu_class = VirglGpu
    if options.get("hostmem"):
        from vmmcore.errors import ConfigError

        raise ConfigError("virtio-gpu hostmem: blob resources (the host-visible memory "
                          "region) are not implemented yet; leave hostmem=0")
    name = getattr(ctx, "name", "virtio_gpu0")
    display = open_display(options.get("display", "headless"), DisplayOptions(
        name=name, width=options["width"], height=options["height"],
        num_scanouts=options.get("num_scanouts", 1),
        refresh_rate=options.get("refresh_rate", 60),
        screenshot=options.get("screenshot"),
        extra={"listen": options.get("listen") or ""}))
    if options.get("window_keyboard"):
        display.attach_input("keyboard", input_channel(f"{name}/keyboard"))
    if options.get("window_mouse"):
        display.attach_input("tablet", input_channel(f"{name}/tablet"))
    return gpu_class(display, options["width"], options["height"],
                     num_scanouts=options.get("num_scanouts", 1),
                     refresh_rate=options.get("refresh_rate", 60), label=name)
