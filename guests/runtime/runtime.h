/*
 * The guest runtime: a few hundred lines of freestanding C for the vmm test guests.
 *
 * Boot contract (see guests/README.md): the VMM enters _start in 64-bit long mode with
 * paging on (first 4 GiB identity-mapped), interrupts off, RSI = boot_params ("zero
 * page").  Everything here runs in guest ring 0, which kvm-pvm emulates instruction by
 * instruction, so the code stays small and never uses SSE, popcnt, xsave or int3.
 */
#ifndef VMM_GUEST_RUNTIME_H
#define VMM_GUEST_RUNTIME_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define NORETURN __attribute__((noreturn))
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Fixed addresses and ports of the vmm machine (vmmcore/arch/x86_64/layout.py). */
#define COM1_PORT 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define CMOS_INDEX_PORT 0x70
#define CMOS_DATA_PORT 0x71
#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
#define ACPI_SCAN_START 0xe0000UL
#define ACPI_SCAN_END 0x100000UL

/* ---- port and MMIO access ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* One 32-bit access each, never split or merged by the compiler. */
static inline u32 mmio_read32(u64 addr)
{
	u32 v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}
static inline void mmio_write32(u64 addr, u32 v)
{
	__asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

static inline u16 mmio_read16(u64 addr)
{
	u16 v;
	__asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}
static inline u8 mmio_read8(u64 addr)
{
	u8 v;
	__asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(addr) : "memory");
	return v;
}
static inline void mmio_write16(u64 addr, u16 v)
{
	__asm__ volatile("movw %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}
static inline void mmio_write8(u64 addr, u8 v)
{
	__asm__ volatile("movb %0, (%1)" : : "q"(v), "r"(addr) : "memory");
}
/* A 64-bit register as two 32-bit accesses, low half first (virtio 1.2, 4.1.3.1). */
static inline u64 mmio_read64_split(u64 addr)
{
	u32 lo = mmio_read32(addr);
	return (u64)mmio_read32(addr + 4) << 32 | lo;
}
static inline void mmio_write64_split(u64 addr, u64 v)
{
	mmio_write32(addr, (u32)v);
	mmio_write32(addr + 4, (u32)(v >> 32));
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* Orders the guest's ring writes before the index update (x86: a compiler barrier). */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
/* A full fence for "publish the avail index, then read the device's flags/idx". */
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" ::: "memory", "cc"); }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (u64)hi << 32 | lo;
}

static inline void cpuid(u32 leaf, u32 subleaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(subleaf));
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* ---- string helpers (lib.c); gcc may also emit calls to the mem* ones ---- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strncmp(const char *a, const char *b, size_t n);

/* ---- serial console (COM1, polled) and printf ---- */
void serial_init(void);
void putc(char c);
int puts(const char *s);		/* writes s and a newline, like libc */
void print(const char *s);		/* writes s only */
int printf(const char *fmt, ...) PRINTF_LIKE(1, 2);
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) PRINTF_LIKE(3, 4);
/* printf serialised with a spinlock, for code that runs on several CPUs. */
int printf_locked(const char *fmt, ...) PRINTF_LIKE(1, 2);

/* ---- leaving the guest ---- */
/* outl(status) to the debug exit port 0xf4; `vmm run` exits with that status. */
NORETURN void exit(int status);
/* cli; hlt forever (the VMM sees HLT exits with interrupts disabled). */
NORETURN void halt_forever(void);
/* ACPI S5 through PM1a_CNT; returns only if the VMM did not power off. */
void power_off(void);

/* ---- boot_params (Linux "zero page") ---- */
#define BP_E820_ENTRIES 0x1e8	/* u8 */
#define BP_HDR_CMD_LINE_PTR 0x228	/* u32 */
#define BP_HDR_CMDLINE_SIZE 0x238	/* u32 */
#define BP_EXT_CMD_LINE_PTR 0x0c8	/* u32, bits 32..63 of the command line address */
#define BP_E820_TABLE 0x2d0	/* struct e820_entry[128] */
#define E820_MAX_ENTRIES 128

enum { E820_RAM = 1, E820_RESERVED = 2, E820_ACPI = 3, E820_NVS = 4, E820_UNUSABLE = 5 };

struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} __attribute__((packed));

/* Number of valid e820 entries (clamped to 128); 0 if bp is NULL. */
unsigned e820_count(const void *bp);
const struct e820_entry *e820_entry(const void *bp, unsigned i);
const char *e820_type_name(u32 type);
/* Sum of the E820_RAM entries, in bytes. */
u64 e820_total_ram(const void *bp);
/* The kernel command line, or "" if there is none. */
const char *boot_cmdline(const void *bp);
/* Finds "key=value" in the command line; copies value into buf, returns 1 if found. */
int cmdline_get(const char *cmdline, const char *key, char *buf, size_t size);
/* Parses a decimal or 0x-prefixed hex number; returns 1 on success. */
int parse_u64(const char *s, u64 *out);

/* ---- PCI configuration mechanism 1 (0xcf8/0xcfc) ---- */
u32 pci_read32(u8 bus, u8 dev, u8 fn, u8 off);
u16 pci_read16(u8 bus, u8 dev, u8 fn, u8 off);
u8 pci_read8(u8 bus, u8 dev, u8 fn, u8 off);
void pci_write32(u8 bus, u8 dev, u8 fn, u8 off, u32 v);
void pci_write16(u8 bus, u8 dev, u8 fn, u8 off, u16 v);
void pci_write8(u8 bus, u8 dev, u8 fn, u8 off, u8 v);
const char *pci_class_name(u8 class_code, u8 subclass);

/*
 * PCI through either mechanism: a function is (bus, dev, fn) plus the access method.
 * ECAM (PCIe enhanced configuration, 4 KiB per function, MMIO) needs the MCFG base,
 * which pci_ecam_init() takes from ACPI.  Every config access in the helpers below
 * goes through the method stored in the struct, so a test can run the same code over
 * both and compare.
 */
enum pci_method { PCI_CF8 = 0, PCI_ECAM = 1 };

struct pci_ecam {
	u64 base;		/* 0 if there is no MCFG */
	u8 bus_start, bus_end;
	u16 segment;
};
/* Finds the MCFG through acpi() and fills *out; returns 0 if an ECAM window exists. */
int pci_ecam_init(struct pci_ecam *out);
/* The cached ECAM window (pci_ecam_init on first use); base 0 if absent. */
const struct pci_ecam *pci_ecam(void);

u32 pci_ecam_read32(u8 bus, u8 dev, u8 fn, u16 off);
void pci_ecam_write32(u8 bus, u8 dev, u8 fn, u16 off, u32 v);

struct pci_func {
	u8 bus, dev, fn;
	u8 method;		/* enum pci_method */
	u16 vendor, device;
	u8 class_code, subclass, prog_if, revision;
	u8 header_type;		/* without the multi-function bit */
	u64 bar_addr[6];	/* assigned addresses (0: none; the upper half of a 64-bit BAR is 0) */
	u64 bar_size[6];
	u8 bar_flags[6];	/* PCI_BAR_* below */
};
#define PCI_BAR_IO 0x01
#define PCI_BAR_MEM64 0x02
#define PCI_BAR_PREFETCH 0x04
#define PCI_BAR_UPPER 0x08	/* the upper dword of the 64-bit BAR before it */

#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_DISABLE 0x400
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_PTR 0x34
#define PCI_CAP_ID_MSIX 0x11
#define PCI_CAP_ID_VNDR 0x09

u32 pcif_read32(const struct pci_func *f, u16 off);
u16 pcif_read16(const struct pci_func *f, u16 off);
u8 pcif_read8(const struct pci_func *f, u16 off);
/* Sub-dword writes are done as read-modify-write of the dword over ECAM too. */
void pcif_write32(const struct pci_func *f, u16 off, u32 v);
void pcif_write16(const struct pci_func *f, u16 off, u16 v);
void pcif_write8(const struct pci_func *f, u16 off, u8 v);

/*
 * Scans bus 0 (every device, functions 1-7 of multi-function ones) with the given
 * method; fills up to max entries (ids, class, header type; no BARs) and returns the
 * number of functions found (which may exceed max).
 */
unsigned pci_scan(enum pci_method method, struct pci_func *out, unsigned max);
/* The first function with this vendor:device in a scan by method; 0 if found. */
int pci_find(enum pci_method method, u16 vendor, u16 device, struct pci_func *out);

/* A bump allocator over an address window, naturally aligning each BAR. */
struct pci_window {
	u64 next, end;
};
#define PCI_LOW_MMIO_START 0xc0000000UL
#define PCI_LOW_MMIO_END 0xe0000000UL	/* ECAM starts here */
#define PCI_IO_START 0x1000UL
#define PCI_IO_END 0x10000UL
/*
 * What the firmware would do, for one type-0 function: decode off, size each BAR
 * (write all-ones, read the mask back, restore), give it a naturally aligned address
 * from mem (or io for IO BARs; 64-bit BARs get both halves, the upper one 0), write it,
 * read it back, then enable memory (and IO if used) decode and bus mastering.
 * Fills f->bar_*; returns 0, or -1 if a BAR did not fit or did not read back.
 */
int pci_assign_bars(struct pci_func *f, struct pci_window *mem, struct pci_window *io);
/* pci_assign_bars for every type-0 function of a scan, in bus order (what firmware does
 * before any driver runs, so no two devices decode the same addresses); -1 if any failed. */
int pci_assign_all(struct pci_func *funcs, unsigned n, struct pci_window *mem,
		   struct pci_window *io);
/* What a test guest does first (there is no firmware): find vendor:device on bus 0
 * through 0xcf8, check that the ECAM (MCFG) scan agrees, and give every function its
 * BARs over ECAM. Returns 0 with *out the device (ECAM access, BARs assigned), else the
 * failed step as an exit status: 2 not found, 3 no MCFG, 4 scans differ, 5 BARs. */
int pci_bring_up(u16 vendor, u16 device, const char *name, struct pci_func *out);
/* Walks the capability list (bounded); returns the offset of the first capability with
 * this id after the one at `from` (0: from the start of the list), 0 if none. */
u8 pci_find_cap(const struct pci_func *f, u8 id, u8 from);

/* ---- ACPI ---- */
struct acpi_info {
	u64 rsdp;		/* 0 if no RSDP was found */
	u8 revision;		/* RSDP revision: 0 = ACPI 1.0 (RSDT), 2+ = XSDT */
	char oem_id[7];
	u64 sdt;		/* XSDT or RSDT address */
	u64 madt;		/* 0 if absent */
	u64 fadt;		/* 0 if absent */
	unsigned cpus;		/* enabled Local APIC / x2APIC entries in the MADT */
	u8 apic_ids[64];	/* their APIC ids, first 64 */
	u32 lapic_addr;		/* from the MADT */
	u16 pm1a_cnt;		/* PM1a control port from the FADT, 0 if none */
	u8 s5_slp_typ;		/* SLP_TYP for S5 (from the DSDT's \_S5, default 5) */
	int s5_from_dsdt;	/* 1 if s5_slp_typ was read from the DSDT */
	/* "MCFG": the first ECAM allocation (PCIe enhanced configuration); 0 if absent */
	u64 mcfg;
	u64 ecam_base;
	u16 ecam_segment;
	u8 ecam_bus_start, ecam_bus_end;
};

/* Scans 0xE0000..0xFFFFF for the RSDP and reads the MADT and FADT; returns 0 if found. */
int acpi_init(struct acpi_info *info);
/* The cached result of the first acpi_init() (runs it if needed). */
const struct acpi_info *acpi(void);

/* ---- CMOS / RTC ---- */
u8 cmos_read(u8 reg);
struct rtc_time {
	unsigned year, month, day, hour, minute, second;
};
/* Reads the RTC (waiting, bounded, for an update to finish); returns 0 if it looks sane. */
int rtc_read(struct rtc_time *t);

/* ---- spinlock ---- */
typedef struct { volatile u32 locked; } spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
	while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
		while (l->locked)
			cpu_relax();
}
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* Every guest defines this; its return value is the exit status. */
int main(const void *boot_params);

#endif
