"""backend=virglrenderer: the start-up checks that explain why 3D cannot run here.

virglrenderer needs the library (Debian's libvirglrenderer1) and a DRM render node
(/dev/dri/renderD128...) that it can open for EGL/GBM. Where either is missing the GPU
refuses to start with one line saying which; where both exist, this version still stops
(3D command support is not built yet) rather than pretending.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

from vmmcore.errors import VmmError


class VirglUnavailable(VmmError):
    """backend=virglrenderer cannot initialise on this host."""


def find_render_node() -> tuple[str | None, str]:
    """The first DRM render node we can open read-write, or (None, why)."""
    nodes = sorted(glob.glob("/dev/dri/renderD*"))
    if not nodes:
        return None, "no DRM render node (/dev/dri/renderD*) exists on this host"
    errors = []
    for node in nodes:
        try:
            fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            errors.append(f"{node}: {e.strerror}")
            continue
        os.close(fd)
        return node, ""
    return None, "no DRM render node can be opened (" + "; ".join(errors) + ")"


def check_virglrenderer() -> None:
    """Raise VirglUnavailable saying why backend=virglrenderer cannot start."""
    lib = ctypes.util.find_library("virglrenderer")
    if lib is None:
        raise VirglUnavailable(
            "virtio-gpu backend=virglrenderer: libvirglrenderer is not installed "
            "(Debian: apt install libvirglrenderer1); use backend=2d")
    try:
        ctypes.CDLL(lib)
    except OSError as e:
        raise VirglUnavailable(
            f"virtio-gpu backend=virglrenderer: cannot load {lib}: {e}; use backend=2d"
        ) from None
    node, why = find_render_node()
    if node is None:
        raise VirglUnavailable(
            f"virtio-gpu backend=virglrenderer: virglrenderer cannot initialise: {why}; "
            "use backend=2d")
    raise VirglUnavailable(
        f"virtio-gpu backend=virglrenderer: {lib} and {node} are present, but this "
        "version of vmm-virtio-gpu implements only 2D; use backend=2d")
