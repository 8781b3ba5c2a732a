"""vmm_display_web: a display backend served to a browser (canvas + WebSocket)."""

__version__ = "0.1.0"
