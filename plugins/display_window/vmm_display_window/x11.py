"""What the window display needs inside a sandboxed GPU's jail to reach an X11 server.

The window opens in the GPU's device process after its jail closed: an empty root, its
own network and IPC namespaces, and a seccomp filter under which every open() fails.
So, declared through the plugin's spec (vmm_display_window.plugin):

- the X server's Unix socket is bind-mounted at its own path. libxcb connects to the
  abstract name ``@/tmp/.X11-unix/XN`` first, which a private network namespace cannot
  reach (abstract sockets belong to a network namespace), then to the path, which it can;
- the Xauthority file, read-only, when there is one (libXau reads it when connecting);
- the X11 client libraries SDL dlopen()s when its x11 driver starts are loaded before
  the jail closes (vmm_display_window.preload): dlopen() of a name already loaded
  returns it without touching the file system, so no library directory is bound.

MIT-SHM cannot work across IPC namespaces (the server would look the segment id up in
its own namespace); window.policy makes shmget() fail, and SDL then draws with plain
XPutImage requests over the socket.

This module imports only the standard library: plugin.py calls it in the main process.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping, MutableMapping

#: Where X servers put their Unix sockets (XN for display :N).
X11_SOCKET_DIR = "/tmp/.X11-unix"

#: The X11 libraries SDL 2 (pygame's bundled build) dlopen()s for its x11 video driver,
#: by the soname it asks for (its strings; LD_DEBUG=libs shows the same). libX11 is also
#: linked by pygame.scrap; libXcursor pulls in libXrender. A missing one is skipped:
#: SDL treats all but libX11 as optional.
SDL_X11_LIBRARIES = ("libX11.so.6", "libXext.so.6", "libXcursor.so.1", "libXfixes.so.3",
                     "libXi.so.6", "libXrandr.so.2")

#: Environment for SDL in the jail, set unless the user chose otherwise.
#: SDL_FRAMEBUFFER_ACCELERATION=0: SDL on Linux otherwise opens a hidden OpenGL window
#: to decide whether to draw through OpenGL, which would dlopen libGL and Mesa (and
#: need executable mappings); the window draws in software either way.
SDL_ENVIRONMENT = {"SDL_FRAMEBUFFER_ACCELERATION": "0"}

_DISPLAY_RE = re.compile(r"^(?:unix)?:(\d+)(?:\.\d+)?$")


def x11_socket(display: str | None) -> str | None:
    """The Unix socket path of a local X display (":1", ":1.0", "unix:1"), or None for
    none or a remote one ("host:0" is TCP, which the jail's network namespace lacks)."""
    m = _DISPLAY_RE.match(display or "")
    return f"{X11_SOCKET_DIR}/X{m.group(1)}" if m else None


def xauthority_file(environ: Mapping[str, str]) -> str | None:
    """The Xauthority file libXau would read ($XAUTHORITY, else ~/.Xauthority), if it
    exists; an X server started without -auth needs none."""
    path = environ.get("XAUTHORITY") or (
        os.path.join(environ["HOME"], ".Xauthority") if environ.get("HOME") else None)
    return path if path and os.path.isfile(path) else None


def sandbox_binds(environ: Mapping[str, str]) -> list[tuple[str, bool]]:
    """The bind mounts (path, writable) that let SDL in the jail reach $DISPLAY; none
    when there is no local X display to reach. Both are read-only: connecting to a
    socket needs write permission on the socket inode, which a read-only mount keeps."""
    socket = x11_socket(environ.get("DISPLAY"))
    if socket is None or not os.path.exists(socket):
        return []
    binds = [(socket, False)]
    auth = xauthority_file(environ)
    if auth is not None:
        binds.append((auth, False))
    return binds


def load_client_libraries() -> list[str]:
    """dlopen() SDL's X11 libraries now (before the jail closes); the names loaded."""
    loaded = []
    for name in SDL_X11_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        loaded.append(name)
    return loaded


def set_sdl_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set SDL_ENVIRONMENT in environ where the user has not set the variable."""
    for key, value in SDL_ENVIRONMENT.items():
        environ.setdefault(key, value)
