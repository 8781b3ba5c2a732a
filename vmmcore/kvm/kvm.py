"""Kvm: the /dev/kvm system fd (API version, capabilities, supported CPUID and MSRs)."""

from __future__ import annotations

import errno
import os

from vmmcore.errors import KvmError
from vmmcore.kvm.sys import ffi, ioctl_ptr, ioctl_val, lib
from vmmcore.kvm.vm import Vm

KVM_PATH = "/dev/kvm"
CpuidTuple = tuple[int, int, int, int, int, int, int]   # function, index, flags, eax..edx


def _open_error(path: str, err: OSError) -> KvmError:
    """One clear line for the ways opening /dev/kvm fails."""
    if err.errno == errno.ENOENT:
        return KvmError(f"{path} does not exist: KVM is not available on this host "
                        "(load kvm-intel/kvm-amd, or enable virtualization)")
    if err.errno in (errno.EACCES, errno.EPERM):
        return KvmError(f"permission denied opening {path}: run as a member of its group "
                        f"(ls -l {path}) or as root")
    return KvmError(f"cannot open {path}: {err.strerror}")


class Kvm:
    """An open /dev/kvm with a checked API version."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _open_error(path, e) from None
        version = ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"{path} speaks KVM API {version}, vmm needs {lib.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a capability-specific value."""
        return max(lib.vmm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap), 0)

    def require(self, cap: int, name: str) -> None:
        """Fail with a clear message when a capability the VMM relies on is missing."""
        if not self.check_extension(cap):
            raise KvmError(f"this KVM lacks {name}, which vmm needs")

    def vcpu_mmap_size(self) -> int:
        return ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(
            lib.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidTuple]:
        """KVM_GET_SUPPORTED_CPUID, retried with a larger buffer while it says E2BIG."""
        n = 128
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                          + n * ffi.sizeof("struct kvm_cpuid_entry2"))
            cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
            cpuid.nent = n
            ret = lib.vmm_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            if ret == -errno.E2BIG and n < 4096:
                n *= 2
                continue
            if ret < 0:
                ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
            return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in (cpuid.entries[i] for i in range(cpuid.nent))]

    def msr_index_list(self) -> list[int]:
        """The MSRs this KVM can save and restore."""
        n = 256
        while True:
            buf = ffi.new("char[]", 4 + 4 * n)
            lst = ffi.cast("struct kvm_msr_list *", buf)
            lst.nmsrs = n
            ret = lib.vmm_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, lst)
            if ret == -errno.E2BIG and n < 65536:
                n = max(n * 2, lst.nmsrs)
                continue
            if ret < 0:
                return []
            return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> Vm:
        """A new, empty VM."""
        fd = ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(fd, self.vcpu_mmap_size())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
