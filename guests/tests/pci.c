/*
 * tests/pci: scans PCI bus 0 through configuration mechanism 1 and prints one
 * machine-readable line per function, then exits with the number of functions found:
 *
 *   pci 00:03.0 id 1af4:1042 class 010000 hdr 00 irq 11 pin 1 bar0 0xc0000000 bar1 ...
 *   pci functions: N
 *
 * BARs are printed as read (type bits included), without size probing, so the scan
 * changes nothing in config space apart from the CONFIG_ADDRESS register.
 */
#include "runtime.h"

int main(const void *bp)
{
	(void)bp;
	unsigned found = 0;
	for (u8 dev = 0; dev < 32; dev++) {
		u8 nfn = 1;
		for (u8 fn = 0; fn < nfn; fn++) {
			u32 id = pci_read32(0, dev, fn, 0x00);
			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
				continue;
			u32 cls = pci_read32(0, dev, fn, 0x08);
			u32 misc = pci_read32(0, dev, fn, 0x0c);	/* BIST, header type, ... */
			u8 hdr = (u8)(misc >> 16);
			if (fn == 0 && (hdr & 0x80))
				nfn = 8;
			u32 intr = pci_read32(0, dev, fn, 0x3c);
			printf("pci 00:%02x.%u id %04x:%04x class %06x hdr %02x irq %u pin %u", dev, fn,
			       id & 0xffff, id >> 16, cls >> 8, hdr, intr & 0xff, (intr >> 8) & 0xff);
			unsigned nbars = (hdr & 0x7f) == 0 ? 6 : (hdr & 0x7f) == 1 ? 2 : 0;
			for (unsigned b = 0; b < nbars; b++) {
				u32 bar = pci_read32(0, dev, fn, (u8)(0x10 + 4 * b));
				if (bar)
					printf(" bar%u %#x", b, bar);
			}
			putc('\n');
			found++;
		}
	}
	printf("pci functions: %u\n", found);
	return (int)found;
}
