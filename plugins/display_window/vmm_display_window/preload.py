"""Imported in a sandboxed GPU's device process just before its jail closes (the
plugin's sandbox_preload), when the GPU uses display=window: after that the process
cannot open a file, so pygame (with its bundled SDL) and the X11 client libraries SDL
dlopen()s later are loaded now (see vmm_display_window.x11)."""

from __future__ import annotations

import importlib
import os

from vmm_display_window.x11 import load_client_libraries, set_sdl_environment


def _load() -> list[str]:
    """Import pygame and dlopen SDL's X11 libraries; the libraries' names."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    set_sdl_environment()
    importlib.import_module("pygame")
    return load_client_libraries()


#: The X11 libraries now loaded in this process.
LOADED = _load()
