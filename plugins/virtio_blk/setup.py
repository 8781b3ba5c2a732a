"""Build hook: the native virtio-blk engine (cffi API mode, see vmm_virtio_blk/_engine_build.py)."""

from setuptools import setup

setup(cffi_modules=["vmm_virtio_blk/_engine_build.py:ffibuilder"])
