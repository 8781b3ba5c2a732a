/* Reading the Linux boot_params "zero page" the VMM passes in RSI. */
#include "runtime.h"

static inline u8 bp_u8(const void *bp, unsigned off) { return ((const u8 *)bp)[off]; }
static inline u32 bp_u32(const void *bp, unsigned off)
{
	u32 v;
	__builtin_memcpy(&v, (const u8 *)bp + off, sizeof(v));
	return v;
}

unsigned e820_count(const void *bp)
{
	if (!bp)
		return 0;
	unsigned n = bp_u8(bp, BP_E820_ENTRIES);
	return n > E820_MAX_ENTRIES ? E820_MAX_ENTRIES : n;
}

const struct e820_entry *e820_entry(const void *bp, unsigned i)
{
	return (const struct e820_entry *)((const u8 *)bp + BP_E820_TABLE) + i;
}

const char *e820_type_name(u32 type)
{
	switch (type) {
	case E820_RAM: return "usable";
	case E820_RESERVED: return "reserved";
	case E820_ACPI: return "ACPI data";
	case E820_NVS: return "ACPI NVS";
	case E820_UNUSABLE: return "unusable";
	default: return "unknown";
	}
}

u64 e820_total_ram(const void *bp)
{
	u64 total = 0;
	for (unsigned i = 0; i < e820_count(bp); i++) {
		const struct e820_entry *e = e820_entry(bp, i);
		if (e->type == E820_RAM)
			total += e->size;
	}
	return total;
}

const char *boot_cmdline(const void *bp)
{
	if (!bp)
		return "";
	u64 addr = bp_u32(bp, BP_HDR_CMD_LINE_PTR) | (u64)bp_u32(bp, BP_EXT_CMD_LINE_PTR) << 32;
	/* Only trust an address inside the identity-mapped first 4 GiB. */
	if (addr == 0 || addr >= 0x100000000ULL)
		return "";
	return (const char *)(uintptr_t)addr;
}

int cmdline_get(const char *cmdline, const char *key, char *buf, size_t size)
{
	size_t klen = strlen(key);
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		const char *word = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		size_t wlen = (size_t)(p - word);
		if (wlen > klen && word[klen] == '=' && !strncmp(word, key, klen)) {
			size_t vlen = wlen - klen - 1;
			if (size == 0)
				return 1;
			if (vlen >= size)
				vlen = size - 1;
			memcpy(buf, word + klen + 1, vlen);
			buf[vlen] = '\0';
			return 1;
		}
	}
	return 0;
}

int parse_u64(const char *s, u64 *out)
{
	u64 v = 0;
	unsigned base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return 0;
	for (; *s; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = (unsigned)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned)(*s - 'A' + 10);
		else
			return 0;
		v = v * base + d;
	}
	*out = v;
	return 1;
}
