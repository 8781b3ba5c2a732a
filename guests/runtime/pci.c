/* PCI configuration mechanism 1: address to 0xcf8, data through 0xcfc..0xcff. */
#include "runtime.h"

static u32 pci_address(u8 bus, u8 dev, u8 fn, u8 off)
{
	return 0x80000000u | (u32)bus << 16 | (u32)(dev & 31) << 11 | (u32)(fn & 7) << 8 | (off & 0xfc);
}

u32 pci_read32(u8 bus, u8 dev, u8 fn, u8 off)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, off));
	return inl(PCI_CONFIG_DATA);
}

u16 pci_read16(u8 bus, u8 dev, u8 fn, u8 off)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, off));
	return inw(PCI_CONFIG_DATA + (off & 2));
}

u8 pci_read8(u8 bus, u8 dev, u8 fn, u8 off)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, off));
	return inb(PCI_CONFIG_DATA + (off & 3));
}

void pci_write32(u8 bus, u8 dev, u8 fn, u8 off, u32 v)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, off));
	outl(PCI_CONFIG_DATA, v);
}

void pci_write16(u8 bus, u8 dev, u8 fn, u8 off, u16 v)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, off));
	outw(PCI_CONFIG_DATA + (off & 2), v);
}

void pci_write8(u8 bus, u8 dev, u8 fn, u8 off, u8 v)
{
	outl(PCI_CONFIG_ADDRESS, pci_address(bus, dev, fn, off));
	outb(PCI_CONFIG_DATA + (off & 3), v);
}

const char *pci_class_name(u8 class_code, u8 subclass)
{
	switch (class_code) {
	case 0x00: return "unclassified";
	case 0x01:
		switch (subclass) {
		case 0x00: return "SCSI storage";
		case 0x01: return "IDE storage";
		case 0x06: return "SATA storage";
		case 0x08: return "NVMe storage";
		default: return "mass storage";
		}
	case 0x02: return subclass == 0 ? "Ethernet" : "network";
	case 0x03: return subclass == 0 ? "VGA display" : "display";
	case 0x04: return "multimedia";
	case 0x05: return "memory";
	case 0x06:
		switch (subclass) {
		case 0x00: return "host bridge";
		case 0x01: return "ISA bridge";
		case 0x04: return "PCI bridge";
		default: return "bridge";
		}
	case 0x07: return "communication";
	case 0x08: return "system peripheral";
	case 0x09: return "input";
	case 0x0c: return "serial bus";
	case 0xff: return "vendor-specific";
	default: return "other";
	}
}
