"""KVM bindings (cffi, API mode against linux/kvm.h): Kvm, Vm, Vcpu."""
