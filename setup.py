"""Build hook: compiles the cffi KVM bindings (API mode) against linux/kvm.h.

API mode lets the C compiler check every struct layout and ioctl number against the
installed kernel headers, so nothing about struct kvm_run is hand-computed.
"""

from setuptools import setup

setup(cffi_modules=["vmmcore/kvm/_build.py:ffibuilder"])
