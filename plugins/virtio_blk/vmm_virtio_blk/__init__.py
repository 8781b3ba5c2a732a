"""vmm_virtio_blk: the virtio block device (disk images in any installed disk format)."""

__version__ = "0.1.0"
