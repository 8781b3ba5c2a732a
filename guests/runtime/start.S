/*
 * Guest entry point.  The VMM enters here in 64-bit long mode (paging on, first 4 GiB
 * identity-mapped with 2 MiB pages, CS = a 64-bit code segment of the GDT at 0x500,
 * interrupts disabled) with RSI = guest-physical address of boot_params.
 *
 * _start: set our own stack, clear .bss, main(boot_params), exit(main's return value).
 */
	.section .text.start, "ax", @progbits
	.code64
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	movq	%rsi, %r12		/* boot_params; r12 survives the rep stos below */
	movq	$__stack_top, %rsp	/* linked below 2 GiB: a sign-extended imm32 is exact */
	xorl	%ebp, %ebp

	/* Clear .bss: __bss_start and __bss_end are 16-byte aligned by guest.ld. */
	movq	$__bss_start, %rdi
	movq	$__bss_end, %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq

	movq	%r12, %rdi
	call	main			/* rsp is 16-byte aligned here, as the ABI wants */
	movl	%eax, %edi
	call	exit			/* does not return */
1:	cli
	hlt
	jmp	1b
	.size _start, . - _start

/* The boot CPU's stack: NOBITS, not cleared (nothing needs it zeroed). */
	.section .stack, "aw", @nobits
	.balign 4096
	.globl __stack_bottom
__stack_bottom:
	.skip 16384
	.globl __stack_top
__stack_top:

	.section .note.GNU-stack, "", @progbits
