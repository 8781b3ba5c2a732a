"""KVM bindings: Kvm (the system fd), Vm and Vcpu, over a cffi module built from
<linux/kvm.h> at install time (see _build.py)."""

from vmmcore.kvm.kvm import Kvm
from vmmcore.kvm.vcpu import Vcpu
from vmmcore.kvm.vm import IrqRoute, Vm

__all__ = ["Kvm", "Vm", "Vcpu", "IrqRoute"]
