"""Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID as crosvm's cpuid.rs does.

KVM reports what it can virtualise; the VMM must still say who each vCPU is (its APIC id),
what the topology is, and that this is a hypervisor. Without the hypervisor bit and KVM's
paravirt leaves Linux assumes bare metal: it distrusts the TSC and has no kvm-clock
(measured: see DESIGN.md). The topology we present is one package, num_cpus cores, one
thread per core, APIC ids 0..num_cpus-1 (matching the MADT).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1      # (sic) the name in linux/kvm.h

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXT_TOPOLOGY = 0xB
LEAF_EXT_TOPOLOGY_V2 = 0x1F
LEAF_KVM_SIGNATURE = 0x4000_0000
LEAF_KVM_FEATURES = 0x4000_0001
LEAF_AMD_SIZES = 0x8000_0008

EBX_CLFLUSH_LINE_SHIFT = 8
EBX_CLFLUSH_CACHELINE = 8                # in 8-byte units: 64 bytes
EBX_CPU_COUNT_SHIFT = 16
EBX_APIC_ID_SHIFT = 24
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28
EAX_CACHE_LEVEL_SHIFT = 5
EAX_CACHE_SHARING_SHIFT = 14             # bits 25-14: logical CPUs sharing this cache - 1
EAX_CORES_SHIFT = 26                     # bits 31-26: cores per package - 1
TOPO_TYPE_SMT = 1
TOPO_TYPE_CORE = 2
TOPO_TYPE_SHIFT = 8

# "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x0000004D)


@dataclass
class CpuidEntry:
    """One struct kvm_cpuid_entry2."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _bits_for(n: int) -> int:
    """Bits needed to number n things (the APIC-id field width of a topology level)."""
    return max(0, (n - 1).bit_length())


def _adjust_features(e: CpuidEntry, vcpu_id: int, num_cpus: int) -> CpuidEntry:
    """Leaf 1: initial APIC id, logical CPU count (with HTT), CLFLUSH size, hypervisor."""
    ebx = (e.ebx & 0xFF) | (EBX_CLFLUSH_CACHELINE << EBX_CLFLUSH_LINE_SHIFT)
    ebx |= (vcpu_id & 0xFF) << EBX_APIC_ID_SHIFT
    edx = e.edx
    if num_cpus > 1:
        # The count field is only meaningful when HTT says the package has several CPUs.
        ebx |= (min(num_cpus, 0xFF)) << EBX_CPU_COUNT_SHIFT
        edx |= EDX_HTT
    else:
        edx &= ~EDX_HTT
    return replace(e, ebx=ebx, ecx=e.ecx | ECX_HYPERVISOR, edx=edx)


def _adjust_cache_params(e: CpuidEntry, num_cpus: int) -> CpuidEntry:
    """Leaf 4: num_cpus cores per package; L1/L2 private per core, L3 shared by all."""
    if e.eax & 0x1F == 0:            # cache type "null": the end of the list, leave it
        return e
    level = (e.eax >> EAX_CACHE_LEVEL_SHIFT) & 0x7
    sharing = (1 << _bits_for(num_cpus)) - 1 if level >= 3 else 0
    eax = e.eax & 0x3FFF                 # keep type, level, and the other low bits
    eax |= (sharing & 0xFFF) << EAX_CACHE_SHARING_SHIFT
    eax |= ((min(num_cpus, 64) - 1) & 0x3F) << EAX_CORES_SHIFT
    return replace(e, eax=eax)


def _adjust_topology(e: CpuidEntry, vcpu_id: int, num_cpus: int) -> CpuidEntry:
    """Leaves 0xB/0x1F: level 0 = SMT (1 thread), level 1 = core (num_cpus), then end.

    EAX is how far to shift the x2APIC id to get the next level's id, EBX the number of
    logical CPUs at this level, ECX the level number and type, EDX the x2APIC id.
    """
    if e.index == 0:
        eax, ebx, ecx = 0, 1, (TOPO_TYPE_SMT << TOPO_TYPE_SHIFT)
    elif e.index == 1:
        eax, ebx, ecx = _bits_for(num_cpus), num_cpus, (TOPO_TYPE_CORE << TOPO_TYPE_SHIFT) | 1
    else:
        eax, ebx, ecx = 0, 0, e.index & 0xFF
    return replace(e, eax=eax, ebx=ebx, ecx=ecx, edx=vcpu_id,
                   flags=e.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX)


def _adjust_amd_sizes(e: CpuidEntry, num_cpus: int) -> CpuidEntry:
    """AMD leaf 0x80000008 ECX: NC = cores - 1, ApicIdCoreIdSize for num_cpus cores."""
    ecx = e.ecx & ~0xF0FF
    ecx |= ((min(num_cpus, 256) - 1) & 0xFF) | ((_bits_for(num_cpus) & 0xF) << 12)
    return replace(e, ecx=ecx)


def adjust_cpuid(entries: list[CpuidEntry], vcpu_id: int, num_cpus: int) -> list[CpuidEntry]:
    """The CPUID table for vCPU vcpu_id of num_cpus, from KVM's supported entries.

    Returns new entries; the input list is not modified. Leaves we do not know pass
    through unchanged. KVM's paravirt signature leaf is (re)written so the guest finds
    KVM, and its feature leaf 0x40000001 is kept when KVM offers one.
    """
    if not 0 <= vcpu_id < num_cpus or num_cpus > 255:
        raise ValueError(f"vCPU {vcpu_id} of {num_cpus}: APIC ids must be 0..254")
    out: list[CpuidEntry] = []
    for e in entries:
        if e.function == LEAF_FEATURES:
            e = _adjust_features(e, vcpu_id, num_cpus)
        elif e.function == LEAF_CACHE_PARAMS:
            e = _adjust_cache_params(e, num_cpus)
        elif e.function in (LEAF_EXT_TOPOLOGY, LEAF_EXT_TOPOLOGY_V2):
            e = _adjust_topology(e, vcpu_id, num_cpus)
        elif e.function == LEAF_AMD_SIZES:
            e = _adjust_amd_sizes(e, num_cpus)
        elif e.function == LEAF_KVM_SIGNATURE:
            continue                      # re-added below, always in the same shape
        else:
            e = replace(e)
        out.append(e)
    if not any(e.function == LEAF_KVM_FEATURES for e in out):
        # Announce the leaf we promise in 0x40000000 with no paravirt features.
        out.append(CpuidEntry(LEAF_KVM_FEATURES, 0, 0, 0, 0, 0, 0))
    out.append(CpuidEntry(LEAF_KVM_SIGNATURE, 0, 0, LEAF_KVM_FEATURES, *KVM_SIGNATURE))
    return out
