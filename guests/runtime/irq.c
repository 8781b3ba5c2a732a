/*
 * The interrupt path of the test guests: IDT, handlers (assembly, below), LAPIC,
 * MSI-X table programming.  See irq.h.  Ring 0 is emulated on kvm-pvm, so the
 * handlers are a handful of instructions each.
 */
#include "irq.h"

volatile u32 irq_counts[256];
volatile u32 irq_halts;

/*
 * Handlers.  A device/timer handler saves the one register it uses, counts the
 * interrupt (the flag the waiting code looks at), writes 0 to the LAPIC EOI register
 * at 0xfee000b0 and returns with iretq.  The spurious vector gets no EOI.  Exceptions
 * push their vector and go to irq_exception() in C, which does not return.
 * (0xfee000b0 does not fit a sign-extended imm32, so it goes through %eax.)
 */
__asm__(
	"	.pushsection .text\n"
	"	.macro IRQ_STUB vec, eoi\n"
	"	.globl irq_stub_\\vec\n"
	"irq_stub_\\vec:\n"
	"	pushq %rax\n"
	"	lock incl irq_counts + 4 * \\vec\n"
	"	.if \\eoi\n"
	"	movl $0xfee000b0, %eax\n"
	"	movl $0, (%rax)\n"
	"	.endif\n"
	"	popq %rax\n"
	"	iretq\n"
	"	.endm\n"
	"	.macro EXC_STUB vec\n"
	"exc_stub_\\vec:\n"
	"	pushq $\\vec\n"
	"	jmp exc_common\n"
	"	.endm\n"
	"	.irp v, 0x40,0x41,0x42,0x43,0x44,0x45,0x46,0x47,0x50\n"
	"	IRQ_STUB \\v, 1\n"
	"	.endr\n"
	"	IRQ_STUB 0xff, 0\n"
	"	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
	"	EXC_STUB \\v\n"
	"	.endr\n"
	"exc_common:\n"
	"	movq (%rsp), %rdi\n"		/* vector */
	"	leaq 8(%rsp), %rsi\n"		/* [error code,] rip, cs, rflags, rsp, ss */
	"	andq $-16, %rsp\n"
	"	call irq_exception\n"
	"1:	cli\n"
	"	hlt\n"
	"	jmp 1b\n"
	"	.pushsection .rodata\n"
	"	.balign 8\n"
	"	.globl exc_stubs, dev_stubs\n"
	"exc_stubs:\n"
	"	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
	"	.quad exc_stub_\\v\n"
	"	.endr\n"
	"dev_stubs:\n"
	"	.quad irq_stub_0x40, irq_stub_0x41, irq_stub_0x42, irq_stub_0x43\n"
	"	.quad irq_stub_0x44, irq_stub_0x45, irq_stub_0x46, irq_stub_0x47\n"
	"	.quad irq_stub_0x50, irq_stub_0xff\n"
	"	.popsection\n"
	"	.popsection\n");

extern const u64 exc_stubs[32];
extern const u64 dev_stubs[10];

void irq_exception(u64 vector, const u64 *frame);

void irq_exception(u64 vector, const u64 *frame)
{
	/* vectors that push an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX */
	int has_err = vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 ||
		      vector == 21 || vector == 29 || vector == 30;
	u64 err = has_err ? frame[0] : 0;
	u64 rip = has_err ? frame[1] : frame[0];
	u64 cr2;
	__asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
	printf("\nguest exception %lu at rip %#lx error %#lx cr2 %#lx\n", vector, rip, err, cr2);
	exit(IRQ_EXIT_EXCEPTION | (int)(vector & 0x1f));
}

struct idt_gate {
	u16 off_lo;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 off_mid;
	u32 off_hi;
	u32 reserved;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static int timer_works;

static void set_gate(unsigned vec, u64 handler, u16 cs)
{
	struct idt_gate *g = &idt[vec];
	g->off_lo = (u16)handler;
	g->selector = cs;
	g->ist = 0;
	g->type_attr = 0x8e;		/* present, DPL 0, 64-bit interrupt gate (clears IF) */
	g->off_mid = (u16)(handler >> 16);
	g->off_hi = (u32)(handler >> 32);
	g->reserved = 0;
}

u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
u8 lapic_id(void) { return (u8)(lapic_read(LAPIC_REG_ID) >> 24); }
int irq_timer_works(void) { return timer_works; }

int irq_init(void)
{
	u16 cs;
	__asm__ volatile("movw %%cs, %0" : "=r"(cs));
	memset(idt, 0, sizeof(idt));
	for (unsigned v = 0; v < 32; v++)
		set_gate(v, exc_stubs[v], cs);
	for (unsigned v = 0; v < IRQ_DEVICE_VECTORS; v++)
		set_gate(IRQ_VECTOR_DEVICE0 + v, dev_stubs[v], cs);
	set_gate(IRQ_VECTOR_TIMER, dev_stubs[8], cs);
	set_gate(IRQ_VECTOR_SPURIOUS, dev_stubs[9], cs);
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)(uintptr_t)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");

	if (!(rdmsr(MSR_APIC_BASE) & (1u << 11)))
		return -1;
	lapic_write(LAPIC_REG_TPR, 0);
	lapic_write(LAPIC_REG_SVR, lapic_read(LAPIC_REG_SVR) | LAPIC_SVR_ENABLE | IRQ_VECTOR_SPURIOUS);

	/* Does the timer count?  Masked, divide by 1, a large count; look twice. */
	lapic_write(LAPIC_REG_TIMER_DIV, 0xb);
	lapic_write(LAPIC_REG_LVT_TIMER, LAPIC_LVT_MASKED | IRQ_VECTOR_TIMER);
	lapic_write(LAPIC_REG_TIMER_INIT, 0xffffffffu);
	u32 a = lapic_read(LAPIC_REG_TIMER_CUR);
	for (unsigned i = 0; i < 2000; i++)
		cpu_relax();
	u32 b = lapic_read(LAPIC_REG_TIMER_CUR);
	timer_works = b < a;
	lapic_write(LAPIC_REG_TIMER_INIT, 0);
	lapic_write(LAPIC_REG_LVT_TIMER, IRQ_VECTOR_TIMER);	/* unmasked, one-shot, idle */
	return 0;
}

int irq_wait_vector(u8 vector, u32 seen, unsigned timeout_ms)
{
	const unsigned tick_ms = 10;
	for (unsigned waited = 0; waited <= timeout_ms; waited += tick_ms) {
		cli();
		if (irq_counts[vector] != seen)
			break;
		if (timer_works) {
			/* KVM's LAPIC timer runs at 1 GHz (divide by 1): 10 ms = 10^7 counts */
			lapic_write(LAPIC_REG_TIMER_INIT, tick_ms * 1000000u);
			/* sti's one-instruction shadow: nothing is delivered before hlt starts */
			irq_halts++;
			__asm__ volatile("sti; hlt; cli" ::: "memory");
		} else {
			sti();
			for (unsigned i = 0; i < 20000 && irq_counts[vector] == seen; i++)
				cpu_relax();
			cli();
		}
	}
	lapic_write(LAPIC_REG_TIMER_INIT, 0);
	return irq_counts[vector] != seen;
}

/* ---- MSI-X ---- */

#define MSIX_CTRL_ENABLE 0x8000
#define MSIX_CTRL_FUNCTION_MASK 0x4000

int msix_probe(const struct pci_func *f, struct msix_info *m)
{
	memset(m, 0, sizeof(*m));
	u8 cap = pci_find_cap(f, PCI_CAP_ID_MSIX, 0);
	if (!cap)
		return -1;
	u16 ctrl = pcif_read16(f, cap + 2);
	u32 table = pcif_read32(f, cap + 4), pba = pcif_read32(f, cap + 8);
	m->cap = cap;
	m->table_size = (u16)((ctrl & 0x7ff) + 1);
	m->table_bar = (u8)(table & 7);
	m->table_offset = table & ~7u;
	m->pba_bar = (u8)(pba & 7);
	m->pba_offset = pba & ~7u;
	if (m->table_bar > 5 || !f->bar_addr[m->table_bar] ||
	    (u64)m->table_offset + 16u * m->table_size > f->bar_size[m->table_bar])
		return -1;
	m->table = f->bar_addr[m->table_bar] + m->table_offset;
	return 0;
}

void msix_enable_masked(const struct pci_func *f, const struct msix_info *m)
{
	u16 ctrl = pcif_read16(f, m->cap + 2);
	pcif_write16(f, m->cap + 2, ctrl | MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
}

void msix_set_entry(const struct msix_info *m, unsigned n, u8 apic_id, u8 vector)
{
	u64 e = m->table + 16u * n;
	mmio_write32(e + 12, 1);				/* masked while it changes */
	mmio_write32(e + 0, 0xfee00000u | (u32)apic_id << 12);
	mmio_write32(e + 4, 0);
	mmio_write32(e + 8, vector);				/* fixed delivery, edge */
	mmio_write32(e + 12, 0);				/* unmasked */
}

void msix_unmask_function(const struct pci_func *f, const struct msix_info *m)
{
	u16 ctrl = pcif_read16(f, m->cap + 2);
	pcif_write16(f, m->cap + 2, (u16)((ctrl | MSIX_CTRL_ENABLE) & ~MSIX_CTRL_FUNCTION_MASK));
}
