"""Per-vCPU x86-64 state at power-on: CPUID, MSRs, FPU, LAPIC LINTs, boot registers.

Only the boot vCPU gets long-mode registers; the others stay in KVM's wait-for-SIPI
state and are started by the guest (Linux's INIT-SIPI-SIPI), as on real hardware.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from vmmcore.arch.x86_64.cpuid import CpuidEntry, adjust_cpuid
from vmmcore.arch.x86_64.regs import LongModeState, Segment, lapic_lint_setup
from vmmcore.kvm import Vcpu

log = logging.getLogger(__name__)

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6

# What crosvm's setup_msrs gives a fresh vCPU: syscall/sysenter state cleared, fast
# strings on, and write-back as the default memory type so RAM is cacheable.
BOOT_MSRS: Mapping[int, int] = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
}

FPU_CONTROL_WORD = 0x37F     # the x87 power-on default: all exceptions masked
MXCSR_DEFAULT = 0x1F80


def set_msrs(vcpu: Vcpu, msrs: Mapping[int, int]) -> None:
    """Set each MSR on its own: KVM stops a batch at the first one it refuses, and some
    KVMs (kvm-pvm here) refuse a few that a stock kernel does not need."""
    for index, value in msrs.items():
        if vcpu.set_msrs({index: value}) != 1:
            log.debug("vcpu%d: KVM refused MSR %#x", vcpu.id, index)


def set_fpu(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


CPUID_TSC_DEADLINE = 1 << 24     # leaf 1 ECX


def set_cpuid(vcpu: Vcpu, supported: Sequence[tuple[int, ...]], num_cpus: int,
              tsc_deadline: bool = False) -> None:
    """KVM's supported CPUID, adjusted for this vCPU's APIC id and the topology.

    KVM_GET_SUPPORTED_CPUID never lists the TSC-deadline timer, because the in-kernel
    LAPIC emulates it; like crosvm we add it when KVM_CAP_TSC_DEADLINE_TIMER says so.
    Without it Linux calibrates the LAPIC timer against the PIT, which fails when the
    host is slow or nested ("APIC timer disabled due to verification failure").
    """
    entries = adjust_cpuid([CpuidEntry(*e) for e in supported], vcpu.id, num_cpus)
    vcpu.set_cpuid((e.function, e.index, e.flags, e.eax, e.ebx,
                    e.ecx | (CPUID_TSC_DEADLINE if tsc_deadline and e.function == 1 else 0),
                    e.edx)
                   for e in entries)


def set_lapic_lints(vcpu: Vcpu) -> None:
    regs = vcpu.get_lapic()
    lapic_lint_setup(regs)
    vcpu.set_lapic(regs)


def _copy_segment(dst, seg: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l",
                 "g", "avl"):
        setattr(dst, name, getattr(seg, name))
    dst.unusable = 0 if seg.present else 1


def set_long_mode(vcpu: Vcpu, state: LongModeState, regs: Mapping[str, int]) -> None:
    """Put the vCPU straight into 64-bit long mode at the kernel's entry point."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _copy_segment(getattr(sregs, name), getattr(state, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt_base, state.gdt_limit
    sregs.idt.base, sregs.idt.limit = state.idt_base, state.idt_limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    vcpu.update_regs(regs)


def configure_vcpu(vcpu: Vcpu, supported_cpuid: Sequence[tuple[int, ...]], num_cpus: int,
                   boot: tuple[LongModeState, Mapping[str, int]] | None,
                   tsc_deadline: bool = False) -> None:
    """Everything a vCPU needs before its first KVM_RUN; boot is for the BSP only."""
    set_cpuid(vcpu, supported_cpuid, num_cpus, tsc_deadline)
    set_msrs(vcpu, BOOT_MSRS)
    set_fpu(vcpu)
    set_lapic_lints(vcpu)
    if boot is not None:
        set_long_mode(vcpu, *boot)
