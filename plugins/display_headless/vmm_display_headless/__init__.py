"""vmm_display_headless: a display backend with no window (scanouts kept in memory)."""

__version__ = "0.1.0"
