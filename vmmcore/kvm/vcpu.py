"""Vcpu: one virtual CPU fd, its registers and its mmap'd struct kvm_run.

Registers are returned as cffi structs (struct kvm_regs, kvm_sregs, ...) that callers
modify in place and hand back; struct kvm_run is exposed as a memoryview over the
shared page plus offsets from the C compiler, which is the cheapest way for the Python
exit path to read exit data.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Mapping

from vmmcore.kvm.stats import KvmStats, StatsSlot
from vmmcore.kvm.sys import check, ffi, ioctl_ptr, lib


class Vcpu:
    """A vCPU fd; created by Vm.create_vcpu."""

    def __init__(self, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = fd
        self._run_map = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_view = memoryview(self._run_map)
        self._stats = StatsSlot(lambda: KvmStats(fd, f"vCPU {vcpu_id}"))

    # -- general registers --------------------------------------------------------

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def update_regs(self, values: Mapping[str, int]) -> None:
        """Set named general registers (rip, rsp, rsi, rflags, ...), keeping the rest."""
        regs = self.get_regs()
        for name, value in values.items():
            setattr(regs, name, value)
        self.set_regs(regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        ioctl_ptr(self.fd, lib.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    # -- MSRs, CPUID, LAPIC, events ---------------------------------------------------

    def set_msrs(self, msrs: Mapping[int, int]) -> int:
        """KVM_SET_MSRS; returns how many KVM accepted (it stops at the first it rejects)."""
        buf, kvm_msrs = self._msr_buffer(msrs.keys())
        for i, value in enumerate(msrs.values()):
            kvm_msrs.entries[i].data = value
        return check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_SET_MSRS, kvm_msrs), "KVM_SET_MSRS")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS for the given indices (those KVM cannot read are left out)."""
        buf, kvm_msrs = self._msr_buffer(indices)
        n = check(lib.vmm_ioctl_ptr(self.fd, lib.KVM_GET_MSRS, kvm_msrs), "KVM_GET_MSRS")
        return {kvm_msrs.entries[i].index: kvm_msrs.entries[i].data for i in range(n)}

    @staticmethod
    def _msr_buffer(indices: Iterable[int]):
        indices = list(indices)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs")
                      + len(indices) * ffi.sizeof("struct kvm_msr_entry"))
        kvm_msrs = ffi.cast("struct kvm_msrs *", buf)
        kvm_msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            kvm_msrs.entries[i].index = index
        return buf, kvm_msrs

    def set_cpuid(self, entries: Iterable[tuple[int, int, int, int, int, int, int]]) -> None:
        """KVM_SET_CPUID2 from (function, index, flags, eax, ebx, ecx, edx) tuples."""
        entries = list(entries)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                      + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
            e = cpuid.entries[i]
            e.function, e.index, e.flags = function, index, flags
            e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
        ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_lapic(self) -> bytearray:
        """The 1 KiB LAPIC register page (KVM_GET_LAPIC)."""
        state = ffi.new("struct kvm_lapic_state *")
        ioctl_ptr(self.fd, lib.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return bytearray(ffi.buffer(state.regs))

    def set_lapic(self, regs: bytes) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(state.regs, bytes(regs), len(state.regs))
        ioctl_ptr(self.fd, lib.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> bytes:
        """struct kvm_vcpu_events as opaque bytes (saved and restored whole)."""
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl_ptr(self.fd, lib.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return bytes(ffi.buffer(events))

    def set_vcpu_events(self, data: bytes) -> None:
        events = ffi.new("struct kvm_vcpu_events *")
        ffi.memmove(events, data, ffi.sizeof(events[0]))
        ioctl_ptr(self.fd, lib.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *")
        state.mp_state = mp_state
        ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    # -- running ---------------------------------------------------------------------

    def run(self) -> int:
        """One KVM_RUN (the GIL is released while the guest runs); 0 or -errno."""
        return lib.vmm_ioctl_val(self.fd, lib.KVM_RUN, 0)

    def set_immediate_exit(self, value: bool) -> None:
        """Make the next (or current, once kicked) KVM_RUN return EINTR at once."""
        self.run_view[lib.VMM_RUN_IMMEDIATE_EXIT] = int(value)

    def stats(self) -> KvmStats:
        """KVM's statistics for this vCPU (opened with it, closed with it: see StatsSlot)."""
        return self._stats.get()

    def close(self) -> None:
        self._stats.close()
        self.run_view.release()
        self._run_map.close()
        os.close(self.fd)
