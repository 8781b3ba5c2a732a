"""Tier 2: the Vcpu state calls the VMM exposes (for snapshot/restore and debugging)
round-trip through the real /dev/kvm."""

import os

import pytest

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)


@pytest.fixture
def vcpu():
    from vmmcore.kvm import Kvm

    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    cpu = vm.create_vcpu(0)
    yield kvm, cpu
    cpu.close()
    vm.close()
    kvm.close()


def test_vcpu_events_mp_state_and_msrs_round_trip(vcpu):
    from vmmcore.arch.x86_64.vcpu_init import MSR_IA32_SYSENTER_CS
    from vmmcore.kvm.sys import lib

    kvm, cpu = vcpu
    events = cpu.get_vcpu_events()
    assert len(events) > 0
    cpu.set_vcpu_events(events)
    assert cpu.get_vcpu_events() == events
    assert cpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE        # vCPU 0 is the BSP
    cpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
    assert cpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10}) == 1
    assert cpu.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}
    assert MSR_IA32_SYSENTER_CS in kvm.msr_index_list()
