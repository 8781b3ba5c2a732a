"""vmm_virtio_balloon: the virtio memory balloon device (virtio 1.2, section 5.5).

Keep this package's import cheap: `vmm plugins list` imports vmm_virtio_balloon.plugin.
"""

__version__ = "0.1.0"
