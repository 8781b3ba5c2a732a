"""cffi API-mode builder for the KVM bindings (run by setup.py at install time).

The cdef declares structs with `...;` so that the C compiler, not this file, decides
their layout from the installed <linux/kvm.h>; constants (ioctl numbers, exit reasons,
offsets into the anonymous unions of struct kvm_run) are read from the header too.
ioctl is wrapped in fixed-signature helpers that return -errno, and cffi releases the
GIL around every call, so a vCPU blocked in KVM_RUN never stalls the other threads.
"""

from cffi import FFI

ffibuilder = FFI()

_IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IRQFD KVM_IOEVENTFD
KVM_SET_GSI_ROUTING KVM_SIGNAL_MSI KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_SET_CLOCK KVM_GET_CLOCK
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_MP_STATE KVM_SET_MP_STATE
KVM_SET_SIGNAL_MASK KVM_INTERRUPT KVM_NMI
""".split()

_CONSTANTS = """
KVM_API_VERSION
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY
KVM_EXIT_INTR KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IOAPIC_EOI KVM_EXIT_NOTIFY KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID KVM_CAP_PIT2
KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_IRQ_ROUTING KVM_CAP_SET_IDENTITY_MAP_ADDR
KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_NR_MEMSLOTS KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_SIGNAL_MSI KVM_CAP_IRQFD_RESAMPLE KVM_CAP_VCPU_EVENTS KVM_CAP_MP_STATE
KVM_CAP_TSC_DEADLINE_TIMER KVM_CAP_ADJUST_CLOCK KVM_CAP_IOEVENTFD_ANY_LENGTH
KVM_PIT_SPEAKER_DUMMY KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED
KVM_MP_STATE_HALTED KVM_MP_STATE_SIPI_RECEIVED
KVM_MEM_READONLY
""".split()

# Offsets into struct kvm_run, whose exit data sits in anonymous unions that cffi cannot
# name; the C compiler computes them (offsetof) so Python reads the mmap'd page directly.
_RUN_OFFSETS = {
    "RUN_REQUEST_INTERRUPT_WINDOW": "request_interrupt_window",
    "RUN_IMMEDIATE_EXIT": "immediate_exit",
    "RUN_EXIT_REASON": "exit_reason",
    "RUN_READY_FOR_INTERRUPT_INJECTION": "ready_for_interrupt_injection",
    "RUN_IF_FLAG": "if_flag",
    "RUN_HW_EXIT_REASON": "hw.hardware_exit_reason",
    "RUN_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
    "RUN_FAIL_ENTRY_CPU": "fail_entry.cpu",
    "RUN_EX_EXCEPTION": "ex.exception",
    "RUN_EX_ERROR_CODE": "ex.error_code",
    "RUN_IO_DIRECTION": "io.direction",
    "RUN_IO_SIZE": "io.size",
    "RUN_IO_PORT": "io.port",
    "RUN_IO_COUNT": "io.count",
    "RUN_IO_DATA_OFFSET": "io.data_offset",
    "RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "RUN_MMIO_DATA": "mmio.data",
    "RUN_MMIO_LEN": "mmio.len",
    "RUN_MMIO_IS_WRITE": "mmio.is_write",
    "RUN_INTERNAL_SUBERROR": "internal.suberror",
    "RUN_INTERNAL_NDATA": "internal.ndata",
    "RUN_INTERNAL_DATA": "internal.data",
    "RUN_SYSTEM_EVENT_TYPE": "system_event.type",
    "RUN_SYSTEM_EVENT_NDATA": "system_event.ndata",
    "RUN_SYSTEM_EVENT_DATA": "system_event.data",
}

_STRUCTS = """
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type; uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable; ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8; uint64_t efer; uint64_t apic_base;
    unsigned long long interrupt_bitmap[...];
};
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint16_t last_opcode;
    uint64_t last_ip; uint64_t last_dp; uint8_t xmm[16][16]; uint32_t mxcsr; ...;
};
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_irqfd {
    uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...;
};
struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...;
};
struct kvm_msi {
    uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t flags; ...;
};
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
struct kvm_irq_routing_msi { uint32_t address_lo; uint32_t address_hi; uint32_t data; ...; };
struct kvm_vcpu_events { ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };
"""

_HELPERS_DECL = """
int vmm_ioctl_ptr(int fd, unsigned long request, void *arg);
int vmm_ioctl_val(int fd, unsigned long request, unsigned long arg);
int vmm_set_irq_routing(int vm_fd, int n, uint32_t *gsi, uint32_t *type,
                        uint32_t *a, uint32_t *b, uint32_t *c);
"""

_HELPERS_SRC = """
/* ioctl with a fixed signature; -errno on failure so callers need no errno dance. */
int vmm_ioctl_ptr(int fd, unsigned long request, void *arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
int vmm_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
/* KVM_SET_GSI_ROUTING with the entry union filled in C: type IRQCHIP uses (a=irqchip,
   b=pin), type MSI uses (a=address_lo, b=address_hi, c=data). */
int vmm_set_irq_routing(int vm_fd, int n, uint32_t *gsi, uint32_t *type,
                        uint32_t *a, uint32_t *b, uint32_t *c) {
    size_t size = sizeof(struct kvm_irq_routing) + n * sizeof(struct kvm_irq_routing_entry);
    struct kvm_irq_routing *r = calloc(1, size);
    if (!r) return -ENOMEM;
    r->nr = n;
    for (int i = 0; i < n; i++) {
        struct kvm_irq_routing_entry *e = &r->entries[i];
        e->gsi = gsi[i];
        e->type = type[i];
        if (type[i] == KVM_IRQ_ROUTING_IRQCHIP) {
            e->u.irqchip.irqchip = a[i];
            e->u.irqchip.pin = b[i];
        } else {
            e->u.msi.address_lo = a[i];
            e->u.msi.address_hi = b[i];
            e->u.msi.data = c[i];
        }
    }
    int ret = ioctl(vm_fd, KVM_SET_GSI_ROUTING, r);
    int err = errno;
    free(r);
    return ret < 0 ? -err : ret;
}
"""

ffibuilder.cdef(
    "\n".join(f"#define {name} ..." for name in _IOCTLS + _CONSTANTS)
    + "\n"
    + "\n".join(f"#define VMM_{name} ..." for name in _RUN_OFFSETS)
    + "\n#define VMM_KVM_RUN_SIZE ...\n"
    + _STRUCTS
    + _HELPERS_DECL
)

ffibuilder.set_source(
    "vmmcore.kvm._kvm_cffi",
    "#include <errno.h>\n#include <stddef.h>\n#include <stdlib.h>\n"
    "#include <sys/ioctl.h>\n#include <linux/kvm.h>\n"
    + "\n".join(
        f"#define VMM_{name} offsetof(struct kvm_run, {field})"
        for name, field in _RUN_OFFSETS.items()
    )
    + "\n#define VMM_KVM_RUN_SIZE sizeof(struct kvm_run)\n"
    + _HELPERS_SRC,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
