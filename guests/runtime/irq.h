/*
 * A minimal interrupt path for the test guests (runtime/irq.c): an IDT, the local
 * APIC (software enable, EOI, a one-shot timer used only to bound waits) and MSI-X
 * table programming.  Not part of the runtime every guest links: a guest that uses it
 * lists runtime/irq.c among its sources in vmmcore/guests.py's GUESTS.
 *
 * Vectors:
 *   0x00-0x1f  exceptions: print the vector, RIP and error code, exit(0xe0 | vector)
 *   0x40-0x47  device interrupts (MSI/MSI-X): count, EOI, iretq
 *   0x50       the LAPIC timer (wake-up for bounded waits): count, EOI, iretq
 *   0xff       the spurious vector: count, iretq (no EOI, as the SDM says)
 * Anything else is not present: #NP (vector 11) reports it.
 */
#ifndef VMM_GUEST_IRQ_H
#define VMM_GUEST_IRQ_H

#include "runtime.h"

#define IRQ_VECTOR_DEVICE0 0x40		/* 0x40 + n for n < IRQ_DEVICE_VECTORS */
#define IRQ_DEVICE_VECTORS 8
#define IRQ_VECTOR_TIMER 0x50
#define IRQ_VECTOR_SPURIOUS 0xff
#define IRQ_EXIT_EXCEPTION 0xe0		/* exit status 0xe0 | vector on an exception */

#define LAPIC_REG_ID 0x020
#define LAPIC_REG_TPR 0x080
#define LAPIC_REG_EOI 0x0b0
#define LAPIC_REG_SVR 0x0f0
#define LAPIC_REG_LVT_TIMER 0x320
#define LAPIC_REG_TIMER_INIT 0x380
#define LAPIC_REG_TIMER_CUR 0x390
#define LAPIC_REG_TIMER_DIV 0x3e0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_LVT_MASKED 0x10000
#define MSR_APIC_BASE 0x1b

/* Per-vector interrupt counts, incremented (lock incl) by the handlers. */
extern volatile u32 irq_counts[256];
/* HLT instructions irq_wait_vector() executed: each is a halt the host's KVM counts
 * (its halt_exits statistic), so a test can compare the two. */
extern volatile u32 irq_halts;

/*
 * Loads the IDT, software-enables the LAPIC (SVR |= 0x100, spurious vector 0xff), sets
 * TPR 0 and checks whether the LAPIC timer counts (irq_timer_works()).  Interrupts stay
 * disabled (IF = 0) until a wait enables them.  Returns 0, or -1 if the LAPIC is
 * globally disabled in IA32_APIC_BASE.
 */
int irq_init(void);
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
u8 lapic_id(void);
/* 1 if the LAPIC timer's current count moved during irq_init(). */
int irq_timer_works(void);

/*
 * Waits until irq_counts[vector] differs from `seen`, for at most about timeout_ms:
 * `sti; hlt` with the LAPIC timer armed (10 ms one-shot) so a lost interrupt cannot
 * hang the guest; if the timer does not count, `sti` and a bounded pause loop instead.
 * Returns with interrupts disabled; 1 if the vector fired, 0 on timeout.
 */
int irq_wait_vector(u8 vector, u32 seen, unsigned timeout_ms);

/* ---- MSI-X ---- */
struct msix_info {
	u8 cap;			/* capability offset in config space, 0 if none */
	u16 table_size;		/* entries */
	u8 table_bar, pba_bar;
	u32 table_offset, pba_offset;
	u64 table;		/* guest-physical address of the table (needs the BAR assigned) */
};
/* Finds the MSI-X capability and locates the table in its (assigned) BAR; 0 on success. */
int msix_probe(const struct pci_func *f, struct msix_info *m);
/* Enables MSI-X with the function masked (so entries can be written safely). */
void msix_enable_masked(const struct pci_func *f, const struct msix_info *m);
/* Entry n: address 0xfee00000 | apic_id << 12, data = vector (fixed, edge), unmasked. */
void msix_set_entry(const struct msix_info *m, unsigned n, u8 apic_id, u8 vector);
/* Clears the function mask (MSI-X stays enabled). */
void msix_unmask_function(const struct pci_func *f, const struct msix_info *m);

#endif
