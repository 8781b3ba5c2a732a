"""vmm_qcow2: the qcow2 disk-image format."""

__version__ = "0.1.0"
