/* The CMOS RTC through index port 0x70 and data port 0x71. */
#include "runtime.h"

u8 cmos_read(u8 reg)
{
	outb(CMOS_INDEX_PORT, reg & 0x7f);
	return inb(CMOS_DATA_PORT);
}

static unsigned bcd(u8 v) { return (v >> 4) * 10u + (v & 0x0f); }

int rtc_read(struct rtc_time *t)
{
	/* Status A bit 7: update in progress.  Bounded wait (a missing RTC reads 0xff). */
	for (int i = 0; i < 1000 && (cmos_read(0x0a) & 0x80); i++)
		cpu_relax();
	u8 sec = cmos_read(0x00), min = cmos_read(0x02), hour = cmos_read(0x04);
	u8 day = cmos_read(0x07), mon = cmos_read(0x08), year = cmos_read(0x09);
	u8 century = cmos_read(0x32), status_b = cmos_read(0x0b);
	if (sec == 0xff && min == 0xff && hour == 0xff)
		return -1;
	int pm = 0;
	if (!(status_b & 0x02)) {	/* 12-hour clock: bit 7 of the hour is PM */
		pm = hour & 0x80;
		hour &= 0x7f;
	}
	if (!(status_b & 0x04)) {	/* BCD */
		sec = (u8)bcd(sec);
		min = (u8)bcd(min);
		hour = (u8)bcd(hour);
		day = (u8)bcd(day);
		mon = (u8)bcd(mon);
		year = (u8)bcd(year);
		century = (u8)bcd(century);
	}
	if (!(status_b & 0x02))
		hour = (u8)(hour % 12 + (pm ? 12 : 0));
	if (century < 19 || century > 99)
		century = 20;
	t->second = sec;
	t->minute = min;
	t->hour = hour;
	t->day = day;
	t->month = mon;
	t->year = century * 100u + year;
	if (sec > 59 || min > 59 || hour > 23 || day < 1 || day > 31 || mon < 1 || mon > 12)
		return -1;
	return 0;
}
