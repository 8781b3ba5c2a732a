"""vmm_virtio_gpu: the virtio GPU (2D; virgl 3D when libvirglrenderer works)."""

__version__ = "0.1.0"
