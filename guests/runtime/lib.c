/* String helpers, the polled COM1 console, printf, exit and power_off. */
#include "runtime.h"

/* ---- mem* and str*: rep movs/stos are single instructions for the ring-0 emulator ---- */

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;
	while (n < max && s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (a[i] != b[i])
			return (u8)a[i] < (u8)b[i] ? -1 : 1;
		if (!a[i])
			return 0;
	}
	return 0;
}

/* ---- COM1 16550, polled ---- */

#define UART_THR 0
#define UART_IER 1
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20

static int serial_ready;

void serial_init(void)
{
	outb(COM1_PORT + UART_IER, 0x00);	/* no interrupts: we poll */
	outb(COM1_PORT + UART_LCR, 0x03);	/* 8N1, DLAB off */
	outb(COM1_PORT + UART_MCR, 0x03);	/* DTR | RTS */
	serial_ready = 1;
}

static void serial_raw(char c)
{
	/* Bounded: a missing or stuck UART must not hang the guest. */
	for (int i = 0; i < 10000; i++)
		if (inb(COM1_PORT + UART_LSR) & LSR_THRE)
			break;
	outb(COM1_PORT + UART_THR, (u8)c);
}

void putc(char c)
{
	if (!serial_ready)
		serial_init();
	if (c == '\n')
		serial_raw('\r');
	serial_raw(c);
}

void print(const char *s)
{
	while (*s)
		putc(*s++);
}

int puts(const char *s)
{
	print(s);
	putc('\n');
	return 0;
}

/* ---- printf: %s %c %d %i %u %x %X %o %p %%, flags '-' '0' '#', width, length l ll z ---- */

struct sink {
	char *buf;		/* NULL: write to the serial port */
	size_t size;
	size_t len;
};

static void sink_put(struct sink *s, char c)
{
	if (s->buf) {
		if (s->len + 1 < s->size)
			s->buf[s->len] = c;
	} else {
		putc(c);
	}
	s->len++;
}

static void sink_pad(struct sink *s, char c, int n)
{
	while (n-- > 0)
		sink_put(s, c);
}

static void format(struct sink *s, const char *fmt, va_list ap)
{
	static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			sink_put(s, *fmt);
			continue;
		}
		fmt++;
		int left = 0, zero = 0, alt = 0, width = 0, lng = 0;
		for (;; fmt++) {
			if (*fmt == '-')
				left = 1;
			else if (*fmt == '#')
				alt = 1;
			else if (*fmt == '0')
				zero = 1;
			else
				break;
		}
		if (*fmt == '*') {
			width = va_arg(ap, int);
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}

		char tmp[24];
		const char *str = tmp;
		int n = 0, neg = 0;
		u64 v;
		unsigned base = 10;
		const char *digits = lower;

		switch (*fmt) {
		case '\0':
			return;
		case '%':
			sink_put(s, '%');
			continue;
		case 'c':
			tmp[0] = (char)va_arg(ap, int);
			n = 1;
			break;
		case 's':
			str = va_arg(ap, const char *);
			if (!str)
				str = "(null)";
			n = (int)strlen(str);
			break;
		case 'd':
		case 'i': {
			long long sv = lng ? va_arg(ap, long) : va_arg(ap, int);
			neg = sv < 0;
			v = neg ? -(u64)sv : (u64)sv;
			goto number;
		}
		case 'p':
			v = (u64)(uintptr_t)va_arg(ap, void *);
			base = 16;
			sink_put(s, '0');
			sink_put(s, 'x');
			width -= 2;
			goto number;
		case 'X':
			digits = upper;
			/* fall through */
		case 'x':
			base = 16;
			/* fall through */
		case 'o':
			if (*fmt == 'o')
				base = 8;
			/* fall through */
		case 'u':
			v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
			if (alt && base == 16) {	/* "0x" prefix; counted in the width */
				sink_put(s, '0');
				sink_put(s, 'x');
				width -= 2;
			}
		number: {
			char *p = tmp + sizeof(tmp);
			do {
				*--p = digits[v % base];
				v /= base;
			} while (v);
			if (neg)
				*--p = '-';
			str = p;
			n = (int)(tmp + sizeof(tmp) - p);
			if (neg && zero && !left && width > n) {
				/* "-0042": the sign goes before the zero padding */
				sink_put(s, '-');
				str++;
				n--;
				width--;
			}
			break;
		}
		default:	/* unknown conversion: print it as is */
			sink_put(s, '%');
			sink_put(s, *fmt);
			continue;
		}
		if (!left)
			sink_pad(s, zero && *fmt != 's' && *fmt != 'c' ? '0' : ' ', width - n);
		for (int i = 0; i < n; i++)
			sink_put(s, str[i]);
		if (left)
			sink_pad(s, ' ', width - n);
	}
}

int vprintf(const char *fmt, va_list ap)
{
	struct sink s = { 0, 0, 0 };
	format(&s, fmt, ap);
	return (int)s.len;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

static spinlock_t print_lock;

int printf_locked(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	spin_lock(&print_lock);
	int n = vprintf(fmt, ap);
	spin_unlock(&print_lock);
	va_end(ap);
	return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	struct sink s = { buf, size, 0 };
	va_list ap;
	va_start(ap, fmt);
	format(&s, fmt, ap);
	va_end(ap);
	if (size)
		buf[s.len < size ? s.len : size - 1] = '\0';
	return (int)s.len;
}

/* ---- leaving ---- */

NORETURN void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" ::: "memory");
}

NORETURN void exit(int status)
{
	outl(DEBUG_EXIT_PORT, (u32)status);
	halt_forever();
}

void power_off(void)
{
	const struct acpi_info *a = acpi();
	if (!a->pm1a_cnt)
		return;
	outw(a->pm1a_cnt, (u16)((a->s5_slp_typ & 7) << 10 | 1 << 13));	/* SLP_TYP | SLP_EN */
}
