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

/* ---- ECAM (MMIO configuration space, base from the ACPI MCFG table) ---- */

int pci_ecam_init(struct pci_ecam *out)
{
	const struct acpi_info *a = acpi();
	memset(out, 0, sizeof(*out));
	if (!a->mcfg || !a->ecam_base)
		return -1;
	out->base = a->ecam_base;
	out->segment = a->ecam_segment;
	out->bus_start = a->ecam_bus_start;
	out->bus_end = a->ecam_bus_end;
	return 0;
}

static struct pci_ecam ecam_cached;
static int ecam_cached_valid;

const struct pci_ecam *pci_ecam(void)
{
	if (!ecam_cached_valid) {
		pci_ecam_init(&ecam_cached);
		ecam_cached_valid = 1;
	}
	return &ecam_cached;
}

/* The dword's address, or 0 if the bus is outside the MCFG range (reads all-ones). */
static u64 ecam_addr(u8 bus, u8 dev, u8 fn, u16 off)
{
	const struct pci_ecam *e = pci_ecam();
	if (!e->base || bus < e->bus_start || bus > e->bus_end || off >= 4096)
		return 0;
	return e->base + ((u64)bus << 20 | (u64)(dev & 31) << 15 | (u64)(fn & 7) << 12 |
			  (off & 0xffc));
}

u32 pci_ecam_read32(u8 bus, u8 dev, u8 fn, u16 off)
{
	u64 a = ecam_addr(bus, dev, fn, off);
	return a ? mmio_read32(a) : 0xffffffffu;
}

void pci_ecam_write32(u8 bus, u8 dev, u8 fn, u16 off, u32 v)
{
	u64 a = ecam_addr(bus, dev, fn, off);
	if (a)
		mmio_write32(a, v);
}

/* ---- one function, either mechanism ---- */

u32 pcif_read32(const struct pci_func *f, u16 off)
{
	if (f->method == PCI_ECAM)
		return pci_ecam_read32(f->bus, f->dev, f->fn, off);
	if (off >= 256)
		return 0xffffffffu;
	return pci_read32(f->bus, f->dev, f->fn, (u8)off);
}

u16 pcif_read16(const struct pci_func *f, u16 off)
{
	return (u16)(pcif_read32(f, off & ~3) >> (8 * (off & 2)));
}

u8 pcif_read8(const struct pci_func *f, u16 off)
{
	return (u8)(pcif_read32(f, off & ~3) >> (8 * (off & 3)));
}

void pcif_write32(const struct pci_func *f, u16 off, u32 v)
{
	if (f->method == PCI_ECAM)
		pci_ecam_write32(f->bus, f->dev, f->fn, off, v);
	else if (off < 256)
		pci_write32(f->bus, f->dev, f->fn, (u8)off, v);
}

void pcif_write16(const struct pci_func *f, u16 off, u16 v)
{
	if (f->method == PCI_ECAM) {
		u64 a = ecam_addr(f->bus, f->dev, f->fn, off);
		if (a)
			mmio_write16(a + (off & 2), v);
	} else if (off < 256) {
		pci_write16(f->bus, f->dev, f->fn, (u8)off, v);
	}
}

void pcif_write8(const struct pci_func *f, u16 off, u8 v)
{
	if (f->method == PCI_ECAM) {
		u64 a = ecam_addr(f->bus, f->dev, f->fn, off);
		if (a)
			mmio_write8(a + (off & 3), v);
	} else if (off < 256) {
		pci_write8(f->bus, f->dev, f->fn, (u8)off, v);
	}
}

/* ---- enumeration ---- */

static int probe_func(enum pci_method method, u8 dev, u8 fn, struct pci_func *f)
{
	memset(f, 0, sizeof(*f));
	f->bus = 0;
	f->dev = dev;
	f->fn = fn;
	f->method = (u8)method;
	u32 id = pcif_read32(f, 0x00);
	if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
		return 0;
	f->vendor = (u16)id;
	f->device = (u16)(id >> 16);
	u32 cls = pcif_read32(f, 0x08);
	f->revision = (u8)cls;
	f->prog_if = (u8)(cls >> 8);
	f->subclass = (u8)(cls >> 16);
	f->class_code = (u8)(cls >> 24);
	f->header_type = pcif_read8(f, 0x0e);
	return 1;
}

unsigned pci_scan(enum pci_method method, struct pci_func *out, unsigned max)
{
	unsigned found = 0;
	struct pci_func f;
	for (u8 dev = 0; dev < 32; dev++) {
		u8 nfn = 1;
		for (u8 fn = 0; fn < nfn; fn++) {
			if (!probe_func(method, dev, fn, &f))
				continue;
			if (fn == 0 && (f.header_type & 0x80))
				nfn = 8;
			f.header_type &= 0x7f;
			if (found < max)
				out[found] = f;
			found++;
		}
	}
	return found;
}

int pci_find(enum pci_method method, u16 vendor, u16 device, struct pci_func *out)
{
	struct pci_func f;
	for (u8 dev = 0; dev < 32; dev++) {
		u8 nfn = 1;
		for (u8 fn = 0; fn < nfn; fn++) {
			if (!probe_func(method, dev, fn, &f))
				continue;
			if (fn == 0 && (f.header_type & 0x80))
				nfn = 8;
			f.header_type &= 0x7f;
			if (f.vendor == vendor && f.device == device) {
				*out = f;
				return 0;
			}
		}
	}
	return -1;
}

/* ---- BAR sizing and assignment (there is no BIOS) ---- */

static int window_take(struct pci_window *w, u64 size, u64 *addr)
{
	u64 a = (w->next + size - 1) & ~(size - 1);
	if (a < w->next || a + size > w->end || a + size < a)
		return -1;
	*addr = a;
	w->next = a + size;
	return 0;
}

int pci_assign_bars(struct pci_func *f, struct pci_window *mem, struct pci_window *io)
{
	if ((f->header_type & 0x7f) != 0)
		return -1;
	u16 cmd = pcif_read16(f, PCI_COMMAND);
	/* decode off while the BARs hold sizing patterns and half-written addresses */
	pcif_write16(f, PCI_COMMAND, cmd & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
	int uses_io = 0, uses_mem = 0, rc = 0;
	for (unsigned b = 0; b < 6; b++) {
		u16 reg = (u16)(0x10 + 4 * b);
		f->bar_addr[b] = f->bar_size[b] = 0;
		f->bar_flags[b] = 0;
		u32 orig = pcif_read32(f, reg);
		pcif_write32(f, reg, 0xffffffffu);
		u32 mask = pcif_read32(f, reg);
		if (orig & 1) {			/* IO BAR */
			pcif_write32(f, reg, orig);
			u32 m = mask & ~3u;
			if (!m)
				continue;
			u64 size = (u64)(~m & 0xffff) + 1;	/* 16-bit IO space */
			f->bar_flags[b] = PCI_BAR_IO;
			f->bar_size[b] = size;
			u64 a;
			if (!io || window_take(io, size, &a)) {
				rc = -1;
				continue;
			}
			pcif_write32(f, reg, (u32)a);
			if ((pcif_read32(f, reg) & ~3u) != (u32)a) {
				rc = -1;
				continue;
			}
			f->bar_addr[b] = a;
			uses_io = 1;
			continue;
		}
		int is64 = ((orig >> 1) & 3) == 2 && b < 5;
		u64 m = mask & ~0xfu;
		u32 orig_hi = 0;
		if (is64) {
			orig_hi = pcif_read32(f, reg + 4);
			pcif_write32(f, reg + 4, 0xffffffffu);
			m |= (u64)pcif_read32(f, reg + 4) << 32;
		} else if (m) {
			m |= 0xffffffff00000000ULL;
		}
		if (!(m & 0xffffffffu) && !(m >> 32 && is64)) {	/* unimplemented BAR */
			pcif_write32(f, reg, orig);
			if (is64)
				pcif_write32(f, reg + 4, orig_hi);
			continue;
		}
		u64 size = ~m + 1;
		f->bar_flags[b] = (u8)((is64 ? PCI_BAR_MEM64 : 0) | (orig & 8 ? PCI_BAR_PREFETCH : 0));
		f->bar_size[b] = size;
		u64 a;
		if (size < 16 || (size & (size - 1)) || !mem || window_take(mem, size, &a)) {
			pcif_write32(f, reg, orig);
			if (is64)
				pcif_write32(f, reg + 4, orig_hi);
			rc = -1;
			if (is64)
				b++;
			continue;
		}
		pcif_write32(f, reg, (u32)a | (orig & 0xf));
		if (is64)
			pcif_write32(f, reg + 4, (u32)(a >> 32));
		u64 back = pcif_read32(f, reg) & ~0xfu;
		if (is64)
			back |= (u64)pcif_read32(f, reg + 4) << 32;
		if (back != a)
			rc = -1;
		else
			uses_mem = 1;
		f->bar_addr[b] = back == a ? a : 0;
		if (is64) {
			b++;
			f->bar_flags[b] = PCI_BAR_UPPER;
		}
	}
	cmd &= ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
	cmd |= PCI_COMMAND_MASTER | (uses_mem ? PCI_COMMAND_MEMORY : 0) | (uses_io ? PCI_COMMAND_IO : 0);
	pcif_write16(f, PCI_COMMAND, cmd);
	return rc;
}

int pci_assign_all(struct pci_func *funcs, unsigned n, struct pci_window *mem,
		   struct pci_window *io)
{
	int rc = 0;
	for (unsigned i = 0; i < n; i++)
		if ((funcs[i].header_type & 0x7f) == 0 && pci_assign_bars(&funcs[i], mem, io))
			rc = -1;
	return rc;
}

u8 pci_find_cap(const struct pci_func *f, u8 id, u8 from)
{
	if (!(pcif_read16(f, 0x06) & PCI_STATUS_CAP_LIST))
		return 0;
	u8 p = from ? pcif_read8(f, from + 1) : pcif_read8(f, PCI_CAP_PTR);
	for (unsigned n = 0; n < 48 && p >= 0x40; n++) {	/* bounded: a loop in the list ends */
		p &= 0xfc;
		if (pcif_read8(f, p) == id)
			return p;
		p = pcif_read8(f, p + 1);
	}
	return 0;
}

static int same_functions(const struct pci_func *a, unsigned na, const struct pci_func *b,
			  unsigned nb)
{
	if (na != nb)
		return 0;
	for (unsigned i = 0; i < na; i++)
		if (a[i].dev != b[i].dev || a[i].fn != b[i].fn || a[i].vendor != b[i].vendor ||
		    a[i].device != b[i].device || a[i].class_code != b[i].class_code)
			return 0;
	return 1;
}

int pci_bring_up(u16 vendor, u16 device, const char *name, struct pci_func *out)
{
	static struct pci_func cf8[32], ecam[32];
	unsigned ncf8 = pci_scan(PCI_CF8, cf8, ARRAY_SIZE(cf8));
	const struct pci_ecam *e = pci_ecam();
	printf("pci: %u functions through 0xcf8\n", ncf8);
	if (pci_find(PCI_CF8, vendor, device, out)) {
		printf("%s: no %04x:%04x on bus 0 (0xcf8 scan)\n", name, vendor, device);
		return 2;
	}
	if (!e->base) {
		printf("%s: no MCFG table\n", name);
		return 3;
	}
	unsigned necam = pci_scan(PCI_ECAM, ecam, ARRAY_SIZE(ecam));
	printf("pci: %u functions through ECAM at %#lx (buses %u-%u)\n", necam, e->base,
	       e->bus_start, e->bus_end);
	if (!same_functions(cf8, ncf8, ecam, necam) || pci_find(PCI_ECAM, vendor, device, out)) {
		printf("%s: the ECAM scan differs from the 0xcf8 scan\n", name);
		return 4;
	}
	struct pci_window mem = { PCI_LOW_MMIO_START, PCI_LOW_MMIO_END };
	struct pci_window io = { PCI_IO_START, PCI_IO_END };
	/* every function gets its BARs, in bus order, like firmware would do */
	unsigned n = necam < ARRAY_SIZE(ecam) ? necam : ARRAY_SIZE(ecam);
	if (pci_assign_all(ecam, n, &mem, &io)) {
		printf("%s: BAR assignment failed\n", name);
		return 5;
	}
	for (unsigned i = 0; i < n; i++) {
		if (ecam[i].dev == out->dev && ecam[i].fn == out->fn)
			*out = ecam[i];
		for (unsigned b = 0; b < 6; b++)
			if (ecam[i].bar_addr[b])
				printf("pci 00:%02x.%u bar%u %#lx size %#lx\n", ecam[i].dev, ecam[i].fn,
				       b, ecam[i].bar_addr[b], ecam[i].bar_size[b]);
	}
	return 0;
}
