/*
 * tests/crash: triple-faults on purpose, to test the VMM's shutdown handling.
 * A zero-limit IDT makes the #UD from ud2 undeliverable: #UD -> #GP -> #DF -> triple
 * fault, which KVM reports as KVM_EXIT_SHUTDOWN.  If the CPU somehow continues, the
 * guest exits with status 86 so the test can tell (3 is what `vmm run` reports for a
 * crash, so it must not be the survivor's status).
 */
#include "runtime.h"

int main(const void *bp)
{
	(void)bp;
	puts("crash: loading a zero-limit IDT and executing ud2 (expect a triple fault)");
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { 0, 0 };
	__asm__ volatile("lidt %0\n\tud2" : : "m"(idtr) : "memory");
	puts("crash: still running after ud2?!");
	return 86;
}
