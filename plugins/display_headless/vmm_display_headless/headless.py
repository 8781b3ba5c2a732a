"""The headless display: no window; each scanout's framebuffer stays in memory.

Everything is the vmmcore.display.Display base: per-scanout RGB framebuffers, the
cursor, PNG screenshots (Display.screenshot(), or the GPU's ``screenshot=PATH`` option,
written at most twice a second while the guest draws and when the VM stops), and input
injection (Display.key / pointer_absolute) for tests and tools.
"""

from __future__ import annotations

from vmmcore.display import Display, DisplayOptions


class HeadlessDisplay(Display):
    """A display that shows nothing and remembers everything."""

    backend = "headless"

    def __init__(self, options: DisplayOptions | None = None) -> None:
        super().__init__(options)
