/*
 * tests/mmio: one 32-bit MMIO write and one 32-bit MMIO read, for a host test that
 * registers a BusDevice over 0xd0000000..0xd0000007 (inside the 32-bit PCI MMIO hole,
 * so no RAM backs it and both accesses exit to the VMM):
 *   write 0x12345678 to 0xd0000000, read 4 bytes from 0xd0000004,
 *   exit with the low byte of the value read.
 */
#include "runtime.h"

#define MMIO_WRITE_ADDR 0xd0000000UL
#define MMIO_READ_ADDR 0xd0000004UL
#define MMIO_PATTERN 0x12345678u

int main(const void *bp)
{
	(void)bp;
	mmio_write32(MMIO_WRITE_ADDR, MMIO_PATTERN);
	u32 v = mmio_read32(MMIO_READ_ADDR);
	printf("mmio: wrote 0x%08x to 0x%lx, read 0x%08x from 0x%lx\n",
	       MMIO_PATTERN, MMIO_WRITE_ADDR, v, MMIO_READ_ADDR);
	return (int)(v & 0xff);
}
