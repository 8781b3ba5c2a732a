"""The virtio-input plugin's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

Usually added for you: ``--gpu ...,window_keyboard=true,window_mouse=true`` (crosvm's
--display-window-keyboard / --display-window-mouse) add a keyboard and a tablet fed from
that GPU's display. Standalone: ``--device virtio_input:kind=keyboard``.
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import Enum, Int, PluginSpec, Str


def _validate(options: dict[str, Any]) -> None:
    source = options["source"]
    if source and not source.startswith("display:"):
        raise ValueError(f"source={source!r} is not valid: expected '' (none) or "
                         "'display:CHANNEL' (e.g. display:virtio_gpu0/keyboard)")
    q = options["queue_size"]
    if q & (q - 1):
        raise ValueError(f"queue_size={q} is not a power of two")


PLUGIN = PluginSpec(
    name="virtio_input",
    kind="device",
    api_version="1.0",
    summary="virtio-input: a keyboard, mouse or tablet for the guest (fed by a display)",
    options=(
        Enum("kind", ("keyboard", "mouse", "tablet"), default="keyboard",
             help="What the guest sees: a keyboard, a relative mouse, or an absolute "
                  "tablet (pointer position = host pointer position)."),
        Str("source", default="",
            help="Where events come from: '' (none), or display:CHANNEL, an input "
                 "channel of a display backend (set by --gpu window_keyboard/window_mouse)."),
        Str("name", default="", help="Device name the guest sees (default: by kind)."),
        Str("serial", default="", help="Serial string the guest sees."),
        Int("queue_size", default=64, min=2, max=1024,
            help="Entries in each virtqueue (a power of two)."),
    ),
    policy="virtio_input.policy",
    factory="vmm_virtio_input.device:create",
    validate=_validate,
)
