"""vmm_display_window: a display backend that shows the scanout in an SDL2 window."""

__version__ = "0.1.0"
