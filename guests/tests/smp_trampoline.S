/*
 * tests/smp: the AP start-up trampoline and the APs' 64-bit entry.
 *
 * smp.c copies smp_trampoline_start..smp_trampoline_end to TRAMPOLINE_BASE (0x6000, a
 * free page below 1 MiB: layout.py has the GDT at 0x500, the IDT at 0x520, boot_params
 * at 0x7000, the boot stack below 0x8ff0 and the page tables at 0x9000..0xefff) and
 * fills in tramp_cr3 and tramp_efer.  A SIPI with vector 0x06 starts each AP in real mode
 * at CS:IP = 0x0600:0000, i.e. physical 0x6000:
 *
 *   real mode -> lgdt, CR0.PE -> 32-bit protected mode -> CR4.PAE, CR3, EFER.LME,
 *   CR0.PG -> 64-bit long mode (CS = 0x18) -> ap_entry64 (linked code, in place)
 *
 * ap_entry64 takes a 4 KiB stack from ap_stacks with lock xadd and calls ap_main().
 */
#define TRAMPOLINE_BASE 0x6000
#define REL(sym) (TRAMPOLINE_BASE + ((sym) - smp_trampoline_start))
#define AP_MAX 63
#define AP_STACK_SIZE 4096

	.section .text.trampoline, "ax", @progbits
	.globl smp_trampoline_start, smp_trampoline_end, tramp_cr3, tramp_efer

	.code16
smp_trampoline_start:
	cli
	cld
	xorw	%ax, %ax
	movw	%ax, %ds		/* DS base 0: REL() addresses are absolute */
	lgdtl	REL(tramp_gdtr)
	movl	%cr0, %eax
	orl	$1, %eax		/* PE */
	movl	%eax, %cr0
	ljmpl	$0x08, $REL(tramp32)

	.code32
tramp32:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	REL(tramp_cr3), %eax	/* the BSP's CR3 (0x9000 under the boot contract) */
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx	/* IA32_EFER */
	rdmsr
	orl	REL(tramp_efer), %eax	/* LME, plus the BSP's NXE/SCE */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE: long mode becomes active */
	movl	%eax, %cr0
	ljmpl	$0x18, $REL(tramp64)

	.code64
tramp64:
	movq	$ap_entry64, %rax	/* leave the copy: jump to the linked code */
	jmpq	*%rax

	.balign 8
tramp_gdt:
	.quad	0			/* 0x00 null */
	.quad	0x00cf9a000000ffff	/* 0x08 32-bit code, base 0, 4 GiB */
	.quad	0x00cf92000000ffff	/* 0x10 data, base 0, 4 GiB */
	.quad	0x00af9a000000ffff	/* 0x18 64-bit code */
tramp_gdt_end:
tramp_gdtr:
	.word	tramp_gdt_end - tramp_gdt - 1
	.long	REL(tramp_gdt)
	.balign 4
tramp_cr3:
	.long	0x9000
tramp_efer:
	.long	0x100
smp_trampoline_end:

/* ---- 64-bit AP entry, run in place ---- */
	.text
	.globl ap_entry64
	.type ap_entry64, @function
ap_entry64:
	cld
	movl	$1, %eax
	lock xaddl %eax, ap_stack_next	/* eax = this AP's stack index */
	cmpl	$AP_MAX, %eax
	jae	2f			/* more APs than stacks: park this one */
	incl	%eax
	shll	$12, %eax		/* (index + 1) * AP_STACK_SIZE, zero-extended */
	movq	$ap_stacks, %rsp
	addq	%rax, %rsp
	xorl	%ebp, %ebp
	call	ap_main
2:	cli
	hlt
	jmp	2b
	.size ap_entry64, . - ap_entry64

	.data
	.balign 4
ap_stack_next:
	.long	0

	.section .stack, "aw", @nobits
	.balign 4096
ap_stacks:
	.skip	AP_MAX * AP_STACK_SIZE

	.section .note.GNU-stack, "", @progbits
