"""vmm_virtio_wl: crosvm's virtio-wl device, forwarding Wayland to the host compositor."""

__version__ = "0.1.0"
