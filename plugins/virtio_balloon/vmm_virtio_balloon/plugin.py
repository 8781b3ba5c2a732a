"""What vmm needs to know about the virtio-balloon plugin: its PluginSpec.

Imported by `vmm plugins list/info` and `vmm run --device virtio_balloon`, so it imports
only vmmcore.plugin_api; the device model is named by ``factory``.
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import Bool, Int, PluginSpec


def _validate(options: dict[str, Any]) -> None:
    q = options["queue_size"]
    if q & (q - 1):
        raise ValueError(f"queue_size={q} is not a power of two")


PLUGIN = PluginSpec(
    name="virtio_balloon",
    kind="device",
    api_version="1.0",
    summary="virtio memory balloon: `vmm balloon PATH SIZE` takes memory back from the guest",
    options=(
        Bool("deflate_on_oom", default=True,
             help="Let the guest deflate the balloon when it runs out of memory "
                  "(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)."),
        Bool("stats", default=True,
             help="Offer the statistics queue (VIRTIO_BALLOON_F_STATS_VQ) for "
                  "`vmm balloon_stats`."),
        Bool("discard", default=True,
             help="Give inflated pages back to the host (punch holes in guest RAM)."),
        Int("queue_size", default=128, min=2, max=32768,
            help="Entries in each virtqueue (a power of two)."),
    ),
    policy="virtio_balloon.policy",
    factory="vmm_virtio_balloon.device:create",
    validate=_validate,
)
