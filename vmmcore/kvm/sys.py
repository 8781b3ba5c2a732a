"""The compiled cffi module and the error convention shared by Kvm, Vm and Vcpu.

Every helper returns -errno; check() turns that into a KvmError whose message names the
ioctl and the errno, so a failing ioctl never surfaces as a bare OSError traceback.
"""

from __future__ import annotations

import errno
import os

from vmmcore.errors import KvmError

try:
    from vmmcore.kvm._kvm_cffi import ffi, lib
except ImportError as e:  # pragma: no cover - only on a broken install
    raise KvmError(
        f"the KVM bindings are not built ({e}); reinstall vmm with `pip install -e .`"
    ) from None

__all__ = ["ffi", "lib", "check", "ioctl_ptr", "ioctl_val"]


def check(ret: int, what: str) -> int:
    """Raise KvmError for a negative (-errno) return value; return it otherwise."""
    if ret < 0:
        code = -ret
        name = errno.errorcode.get(code, str(code))
        raise KvmError(f"{what} failed: {os.strerror(code)} ({name})")
    return ret


def ioctl_ptr(fd: int, request: int, arg: object, what: str) -> int:
    """ioctl with a pointer argument (a cffi cdata); raises KvmError on failure."""
    return check(lib.vmm_ioctl_ptr(fd, request, arg), what)


def ioctl_val(fd: int, request: int, arg: int, what: str) -> int:
    """ioctl with an integer argument; raises KvmError on failure."""
    return check(lib.vmm_ioctl_val(fd, request, arg), what)
