"""adjust_cpuid: per-vCPU APIC ids, topology, hypervisor bit and KVM's paravirt leaves."""

from __future__ import annotations

import copy
import struct

import pytest

from vmmcore.arch.x86_64.cpuid import CpuidEntry, adjust_cpuid

SIG = 1   # KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def supported() -> list[CpuidEntry]:
    """A trimmed KVM_GET_SUPPORTED_CPUID of an Intel-like host."""
    return [
        CpuidEntry(0x0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),
        CpuidEntry(0x1, 0, 0, 0x000906EA, 0x00FF0800, 0x7FFAFBFF, 0xBFEBFBFF),
        CpuidEntry(0x4, 0, SIG, 0x1C004121, 0x01C0003F, 0x3F, 0),
        CpuidEntry(0x4, 1, SIG, 0x1C004122, 0x01C0003F, 0x3F, 0),
        CpuidEntry(0x4, 2, SIG, 0x1C004143, 0x00C0003F, 0x3FF, 0),
        CpuidEntry(0x4, 3, SIG, 0x1C03C163, 0x03C0003F, 0x2FFF, 6),
        CpuidEntry(0x4, 4, SIG, 0, 0, 0, 0),
        CpuidEntry(0xB, 0, SIG, 1, 2, 0x100, 7),
        CpuidEntry(0xB, 1, SIG, 4, 12, 0x201, 7),
        CpuidEntry(0xB, 2, SIG, 0, 0, 2, 7),
        CpuidEntry(0x4000_0000, 0, 0, 0x4000_0001, 0, 0, 0),
        CpuidEntry(0x4000_0001, 0, 0, 0x0100_7AFB, 0, 0, 0),
        CpuidEntry(0x8000_0008, 0, 0, 0x3027, 0, 0x0000_4007, 0),
    ]


def leaf(entries: list[CpuidEntry], fn: int, index: int = 0) -> CpuidEntry:
    (e,) = [e for e in entries if e.function == fn and e.index == index]
    return e


@pytest.mark.parametrize("vcpu,ncpus", [(0, 1), (0, 4), (2, 4), (6, 7)])
def test_leaf1_apic_id_count_and_hypervisor_bit(vcpu, ncpus):
    e = leaf(adjust_cpuid(supported(), vcpu, ncpus), 1)
    assert e.ebx >> 24 == vcpu
    assert (e.ebx >> 8) & 0xFF == 8                      # CLFLUSH 64 bytes
    assert e.ecx & (1 << 31)
    assert e.eax == 0x000906EA
    if ncpus > 1:
        assert (e.ebx >> 16) & 0xFF == ncpus and e.edx & (1 << 28)
    else:
        assert not e.edx & (1 << 28)


def test_leaf_0xb_topology_one_thread_per_core():
    for vcpu in range(4):
        out = adjust_cpuid(supported(), vcpu, 4)
        smt, core, end = (leaf(out, 0xB, i) for i in range(3))
        assert (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xFF, smt.ecx & 0xFF) == (0, 1, 1, 0)
        assert (core.eax, core.ebx, (core.ecx >> 8) & 0xFF, core.ecx & 0xFF) == (2, 4, 2, 1)
        assert (end.ebx, (end.ecx >> 8) & 0xFF) == (0, 0)
        assert smt.edx == core.edx == end.edx == vcpu    # x2APIC id
        assert all(e.flags & SIG for e in (smt, core, end))


def test_leaf_0xb_shift_covers_non_power_of_two_counts():
    core = leaf(adjust_cpuid(supported(), 4, 5), 0xB, 1)
    assert core.eax == 3 and 1 << core.eax >= 5


def test_leaf4_cores_per_package_and_cache_sharing():
    out = adjust_cpuid(supported(), 1, 4)
    for i in range(4):
        e = leaf(out, 4, i)
        assert e.eax >> 26 == 3                          # 4 cores
        level = (e.eax >> 5) & 7
        sharing = (e.eax >> 14) & 0xFFF
        assert sharing == (3 if level == 3 else 0)
        assert e.eax & 0x3FFF == supported()[2 + i].eax & 0x3FFF
    assert leaf(out, 4, 4).eax == 0                      # the terminating null entry


def test_kvm_signature_and_features_leaf_kept():
    out = adjust_cpuid(supported(), 0, 2)
    sig = leaf(out, 0x4000_0000)
    assert sig.eax == 0x4000_0001
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"
    assert leaf(out, 0x4000_0001).eax == 0x0100_7AFB


def test_kvm_leaves_added_when_absent():
    base = [e for e in supported() if not 0x4000_0000 <= e.function <= 0x4000_00FF]
    out = adjust_cpuid(base, 0, 1)
    assert leaf(out, 0x4000_0000).eax == 0x4000_0001
    assert leaf(out, 0x4000_0001).eax == 0


def test_amd_core_count_leaf():
    e = leaf(adjust_cpuid(supported(), 0, 6), 0x8000_0008)
    assert e.ecx & 0xFF == 5 and (e.ecx >> 12) & 0xF == 3
    assert e.eax == 0x3027


def test_input_is_not_modified_and_unknown_leaves_pass_through():
    entries = supported()
    before = copy.deepcopy(entries)
    out = adjust_cpuid(entries, 1, 2)
    assert entries == before
    assert leaf(out, 0) == before[0]
    assert len(out) == len(before)


@pytest.mark.parametrize("vcpu,ncpus", [(1, 1), (-1, 2), (0, 0), (0, 256)])
def test_bad_ids(vcpu, ncpus):
    with pytest.raises(ValueError):
        adjust_cpuid(supported(), vcpu, ncpus)
