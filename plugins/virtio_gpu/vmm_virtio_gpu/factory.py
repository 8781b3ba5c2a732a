"""The PluginSpec factory: a virtio-gpu (2D, or virgl 3D) with its display backend.

It runs in the main process before the device processes fork: it opens the display and
the window inputs there, and for backend=virglrenderer it only checks (in a child
process) that virglrenderer initialises on this host, so that a host where it cannot (or
where Mesa crashes) stops at start-up with the reason. The device initialises it for
real where it runs, still before the guest starts (VirglGpu.on_device_sandboxed: its
jail, or this process once every device exists with --disable-sandbox).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmm_virtio_gpu.device import VirtioGpu


def create(options: Mapping[str, Any], ctx: Any) -> VirtioGpu:
    """The PluginSpec factory: a GPU with its display backend (and window inputs)."""
    from vmmcore.display import DisplayOptions, input_channel, open_display

    name = getattr(ctx, "name", "virtio_gpu0")
    gpu_class = VirtioGpu
    if options.get("backend", "2d") == "virglrenderer":
        from vmm_virtio_gpu.device3d import VirglGpu

        _check_host(name)
        gpu_class = VirglGpu
    if options.get("hostmem"):
        from vmmcore.errors import ConfigError

        raise ConfigError("virtio-gpu hostmem: blob resources (the host-visible memory "
                          "region) are not implemented yet; leave hostmem=0")
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


def _check_host(name: str) -> None:
    """virglrenderer initialises on this host (a probe process), or one line naming
    the device and why not."""
    from vmm_virtio_gpu.virgl import VirglUnavailable, check_virglrenderer

    try:
        check_virglrenderer()
    except VirglUnavailable as e:
        raise VirglUnavailable(f"device {name}: {e}") from None
