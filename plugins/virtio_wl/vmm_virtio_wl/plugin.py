"""The virtio-wl plugin's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

crosvm's `--wayland-sock PATH[,name=N]` is spelled here
`--device virtio_wl:wayland_sock=PATH[,name=N][,named_socks="N1=PATH1;N2=PATH2"]`.
"""

from __future__ import annotations

import os
from typing import Any

from vmmcore.plugin_api import Bool, Int, Path, PluginSpec, Size, Str


def parse_named_socks(text: str) -> dict[str, str]:
    """`NAME=PATH;NAME=PATH` -> {name: path}; ValueError with a one-line reason."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"named_socks entry {item!r} is not NAME=PATH")
        if len(name.encode()) > 32:
            raise ValueError(f"socket name {name!r} is longer than 32 bytes")
        if name in out:
            raise ValueError(f"socket name {name!r} given twice")
        out[name] = os.path.expanduser(path)
    return out


def _validate(options: dict[str, Any]) -> None:
    """Named sockets parse, names are unique and fit the protocol's 32 bytes."""
    if len((options["name"] or "").encode()) > 32:
        raise ValueError(f"name={options['name']!r} is longer than 32 bytes")
    named = parse_named_socks(options["named_socks"] or "")
    if (options["name"] or "") in named:
        raise ValueError(f"socket name {options['name']!r} given twice")
    for name, path in named.items():
        if not os.path.exists(path):
            raise ValueError(f"named_socks: {name}={path} does not exist")


def _sockets(options: dict[str, Any]) -> list[str]:
    """The compositor sockets, which the device connects to from inside its jail."""
    return sorted({str(options["wayland_sock"]),
                   *parse_named_socks(options.get("named_socks") or "").values()})


PLUGIN = PluginSpec(
    name="virtio_wl",
    kind="device",
    api_version="1.1",
    summary="virtio-wl: forwards the guest's Wayland clients to a host compositor socket",
    options=(
        Path("wayland_sock", required=True, must_exist=True,
             help="The host Wayland compositor's socket, e.g. $XDG_RUNTIME_DIR/wayland-0."),
        Str("name", default="",
            help="Name the guest uses for wayland_sock (\"\": the default context)."),
        Str("named_socks", default="",
            help="More sockets the guest opens by name: \"NAME=PATH;NAME=PATH\" (quoted)."),
        Bool("dmabuf", default=False,
             help="Allow guest dma-buf allocation (needs GBM and a render node)."),
        Bool("transition_flags", default=True,
             help="Offer VIRTIO_WL_F_TRANS_FLAGS (the newer VFD flag semantics)."),
        Bool("send_fences", default=True,
             help="Offer VIRTIO_WL_F_SEND_FENCES (v2 foreign-id send entries)."),
        Size("max_alloc", default=128 << 20, min=4096, max=0xFFFF_F000,
             help="Largest shared-memory VFD the guest may allocate."),
        Int("max_vfds", default=1024, min=1, max=1 << 20,
            help="Most VFDs open at once."),
    ),
    positional="wayland_sock",
    policy="virtio_wl.policy",
    factory="vmm_virtio_wl.device:create",
    sandbox_binds=_sockets,                   # connected after the jail closes
    validate=_validate,
)
