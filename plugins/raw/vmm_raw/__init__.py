"""vmm_raw: the raw disk-image format (the file is the disk, byte for byte)."""

__version__ = "0.1.0"
