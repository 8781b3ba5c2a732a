/*
 * Minimal ACPI reader: RSDP (scan of 0xE0000..0xFFFFF) -> XSDT (or RSDT) -> MADT
 * (CPU count, APIC ids) and FADT (PM1a control port, DSDT's \_S5 sleep type).
 * Everything the tables say is bounds-checked: a bad table is ignored, never followed.
 */
#include "runtime.h"

#define SDT_HEADER_LEN 36
#define MAX_TABLE_LEN (1u << 20)

static inline u32 rd32(u64 addr)
{
	u32 v;
	__builtin_memcpy(&v, (const void *)(uintptr_t)addr, 4);
	return v;
}
static inline u64 rd64(u64 addr)
{
	u64 v;
	__builtin_memcpy(&v, (const void *)(uintptr_t)addr, 8);
	return v;
}
static inline u8 rd8(u64 addr) { return *(const volatile u8 *)(uintptr_t)addr; }

static u8 checksum(u64 addr, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum = (u8)(sum + rd8(addr + i));
	return sum;
}

/* A table address we are willing to read: inside the identity map, sane length. */
static u32 table_len(u64 addr)
{
	if (addr == 0 || addr >= 0xfffff000ULL)
		return 0;
	u32 len = rd32(addr + 4);
	if (len < SDT_HEADER_LEN || len > MAX_TABLE_LEN || addr + len > 0x100000000ULL)
		return 0;
	return len;
}

static int sig_is(u64 addr, const char *sig)
{
	u32 want;
	__builtin_memcpy(&want, sig, 4);
	return rd32(addr) == want;
}

static u64 find_rsdp(void)
{
	/* "RSD PTR " as a little-endian u64 */
	const u64 sig = 0x2052545020445352ULL;
	for (u64 p = ACPI_SCAN_START; p < ACPI_SCAN_END; p += 16)
		if (rd64(p) == sig && checksum(p, 20) == 0)
			return p;
	return 0;
}

static void parse_madt(struct acpi_info *info, u64 madt, u32 len)
{
	info->lapic_addr = rd32(madt + 36);
	for (u64 p = madt + 44; p + 2 <= madt + len;) {
		u8 type = rd8(p), elen = rd8(p + 1);
		if (elen < 2 || p + elen > madt + len)
			break;
		u32 apic_id = 0, flags = 0;
		int is_cpu = 0;
		if (type == 0 && elen >= 8) {		/* Processor Local APIC */
			apic_id = rd8(p + 3);
			flags = rd32(p + 4);
			is_cpu = 1;
		} else if (type == 9 && elen >= 16) {	/* Processor Local x2APIC */
			apic_id = rd32(p + 4);
			flags = rd32(p + 8);
			is_cpu = 1;
		}
		if (is_cpu && (flags & 1)) {
			if (info->cpus < ARRAY_SIZE(info->apic_ids))
				info->apic_ids[info->cpus] = (u8)apic_id;
			info->cpus++;
		}
		p += elen;
	}
}

/* Finds Name(\_S5, Package() { SLP_TYPa, ... }) in the DSDT's AML. */
static int dsdt_s5(u64 dsdt, u32 len, u8 *slp_typ)
{
	for (u64 p = dsdt + SDT_HEADER_LEN; p + 8 < dsdt + len; p++) {
		if (!sig_is(p, "_S5_") || rd8(p + 4) != 0x12)	/* PackageOp */
			continue;
		u64 q = p + 5;
		q += 1 + (rd8(q) >> 6);		/* PkgLength: lead byte + 0..3 more bytes */
		q += 1;				/* NumElements */
		if (q + 2 > dsdt + len)
			return 0;
		u8 op = rd8(q);
		if (op == 0x0a)			/* BytePrefix */
			*slp_typ = rd8(q + 1);
		else if (op == 0x00 || op == 0x01)	/* ZeroOp, OneOp */
			*slp_typ = op;
		else
			return 0;
		return 1;
	}
	return 0;
}

static void parse_fadt(struct acpi_info *info, u64 fadt, u32 len)
{
	if (len >= 68)
		info->pm1a_cnt = (u16)rd32(fadt + 64);
	/* X_PM1a_CNT_BLK (generic address, system I/O space) if the 32-bit field is empty */
	if (!info->pm1a_cnt && len >= 184 && rd8(fadt + 172) == 1)
		info->pm1a_cnt = (u16)rd64(fadt + 176);

	u64 dsdt = len >= 44 ? rd32(fadt + 40) : 0;
	if (len >= 148 && rd64(fadt + 140))
		dsdt = rd64(fadt + 140);
	u32 dlen = table_len(dsdt);
	if (dlen && sig_is(dsdt, "DSDT") && dsdt_s5(dsdt, dlen, &info->s5_slp_typ))
		info->s5_from_dsdt = 1;
}

int acpi_init(struct acpi_info *info)
{
	memset(info, 0, sizeof(*info));
	info->s5_slp_typ = 5;	/* layout.S5_SLP_TYP, used if the DSDT does not say */

	u64 rsdp = find_rsdp();
	if (!rsdp)
		return -1;
	info->rsdp = rsdp;
	info->revision = rd8(rsdp + 15);
	memcpy(info->oem_id, (const void *)(uintptr_t)(rsdp + 9), 6);
	for (int i = 0; i < 6; i++)
		if (info->oem_id[i] < 0x20 || info->oem_id[i] > 0x7e)
			info->oem_id[i] = '?';

	int xsdt = 0;
	u64 sdt = rd32(rsdp + 16);
	if (info->revision >= 2 && rd32(rsdp + 20) >= 36 && rd64(rsdp + 24)) {
		sdt = rd64(rsdp + 24);
		xsdt = 1;
	}
	u32 len = table_len(sdt);
	if (!len || !sig_is(sdt, xsdt ? "XSDT" : "RSDT"))
		return -1;
	info->sdt = sdt;

	unsigned entry = xsdt ? 8 : 4;
	for (u64 p = sdt + SDT_HEADER_LEN; p + entry <= sdt + len; p += entry) {
		u64 t = xsdt ? rd64(p) : rd32(p);
		u32 tlen = table_len(t);
		if (!tlen)
			continue;
		if (sig_is(t, "APIC") && !info->madt && tlen >= 44) {
			info->madt = t;
			parse_madt(info, t, tlen);
		} else if (sig_is(t, "FACP") && !info->fadt) {
			info->fadt = t;
			parse_fadt(info, t, tlen);
		} else if (sig_is(t, "MCFG") && !info->mcfg && tlen >= 44 + 16) {
			/* header, 8 reserved bytes, then 16-byte allocations: base u64,
			 * segment u16, start bus u8, end bus u8, 4 reserved */
			u64 base = rd64(t + 44);
			u8 start = rd8(t + 54), end = rd8(t + 55);
			if (base && !(base & 0xfffff) && start <= end &&
			    base + ((u64)(end + 1) << 20) <= 0x100000000ULL) {
				info->mcfg = t;
				info->ecam_base = base;
				info->ecam_segment = (u16)(rd32(t + 52) & 0xffff);
				info->ecam_bus_start = start;
				info->ecam_bus_end = end;
			}
		}
	}
	return 0;
}

static struct acpi_info cached;
static int cached_valid;

const struct acpi_info *acpi(void)
{
	if (!cached_valid) {
		acpi_init(&cached);
		cached_valid = 1;
	}
	return &cached;
}
