"""vmm_virtio_input: virtio-input keyboard, mouse and tablet devices."""

__version__ = "0.1.0"
