/*
 * tests/hello: prints "hello from guest" and exits through port 0xf4 with status 0, or
 * with N if the kernel command line (boot_params.hdr.cmd_line_ptr) contains exit=N.
 * With spin=1 it prints "spinning" and then reads port 0x80 forever (one VM exit per
 * read), for tests that suspend, resume and stop a running guest.
 */
#include "runtime.h"

int main(const void *bp)
{
	puts("hello from guest");
	const char *cmdline = boot_cmdline(bp);
	char value[24];
	u64 status;
	if (cmdline_get(cmdline, "spin", value, sizeof(value))) {
		puts("spinning");
		for (;;)
			inb(0x80);
	}
	if (cmdline_get(cmdline, "exit", value, sizeof(value))) {
		if (parse_u64(value, &status)) {
			printf("hello: exit=%s from the command line\n", value);
			return (int)status;
		}
		printf("hello: ignoring malformed exit=%s\n", value);
	}
	return 0;
}
