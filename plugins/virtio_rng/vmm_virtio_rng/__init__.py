"""vmm_virtio_rng: the virtio entropy device, and the template for a device plugin.

Keep this package's import cheap: `vmm plugins list` imports vmm_virtio_rng.plugin (and
so this file) to read the plugin's metadata.
"""

__version__ = "0.1.0"
