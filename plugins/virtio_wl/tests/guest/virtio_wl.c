/*
 * virtio_wl test guest (tier 2): drives the virtio-wl device (1af4:107f) with the guest
 * runtime's virtio-pci driver and talks Wayland, hand-encoded, to the host compositor:
 *
 *   1. finds the device, assigns every BAR (firmware style), MSI-X entry 0 -> vector 0x40
 *      for both queues, negotiates VIRTIO_WL_F_TRANS_FLAGS, queue 0 (in) and 1 (out)
 *   2. posts 8 in-queue buffers of 4096 bytes; VFD_NEW_CTX id 1
 *   3. VFD_SEND: wl_display.get_registry(2) + wl_display.sync(3); reads VFD_RECV
 *      messages until wl_callback 3 is done; wl_compositor and wl_shm must be there
 *   4. binds them, creates a surface; VFD_NEW id 2 (64x64 XRGB8888); maps the pfn it
 *      returns into its page tables (a PD for that GiB) and draws a pattern there
 *   5. wl_shm.create_pool with VFD 2 in the send, create_buffer, attach, damage, commit,
 *      sync; no wl_display.error may arrive
 *
 * Output lines the test looks for:
 *   global <name> <interface> <version>
 *   vfd_new id 2 pfn 0x... size 16384
 *   virtio-wl: OK
 *
 * Exit status (0 = success):
 *   2  no 1af4:107f on bus 0         3 BAR assignment failed      4 IDT/LAPIC set-up
 *   10+n  virtio bring-up failed with VIRTIO_ERR_n
 *   20 a command was never answered  21 VFD_NEW_CTX refused       22 VFD_SEND refused
 *   23 no wl_callback.done in time   24 wl_compositor or wl_shm missing
 *   25 VFD_NEW refused / bad size    26 the pfn's GiB is already mapped
 *   27 the buffer does not read back 28 wl_display.error (printed)
 *   29 the device hung up the context 30 DEVICE_NEEDS_RESET
 *   0xe0|v  CPU exception v
 */
#include "irq.h"
#include "runtime.h"
#include "virtio.h"

#define VIRTIO_ID_WL 63
#define WL_VECTOR IRQ_VECTOR_DEVICE0
#define VIRTIO_WL_F_TRANS_FLAGS 1

#define CMD_VFD_NEW 0x100
#define CMD_VFD_SEND 0x102
#define CMD_VFD_RECV 0x103
#define CMD_VFD_NEW_CTX 0x104
#define CMD_VFD_HUP 0x106
#define RESP_OK 0x1000
#define RESP_VFD_NEW 0x1001

#define IN_BUFS 8
#define IN_SIZE 4096
#define CTX 1
#define SHM_VFD 2
#define WIDTH 64
#define HEIGHT 64
#define BUF_SIZE (WIDTH * HEIGHT * 4)

struct ctrl_vfd_new {
	u32 type, flags, id, vfd_flags;
	u64 pfn;
	u32 size, pad;
} __attribute__((packed));

static u8 in_bufs[IN_BUFS][IN_SIZE] __attribute__((aligned(4096)));
static u8 cmd[4096] __attribute__((aligned(64)));
static u8 resp[64] __attribute__((aligned(64)));
static u8 stream[16384];
static unsigned stream_len;
static u64 pd[512] __attribute__((aligned(4096)));

static struct virtio_dev d;
static struct virtq *inq, *outq;

/* Waits (sti; hlt, bounded: about ms milliseconds) until q has a used element. */
static int wait_used(struct virtq *q, unsigned ms)
{
	for (unsigned t = 0; t < ms; t += 10) {
		if (virtq_has_used(q))
			return 0;
		u32 seen = irq_counts[WL_VECTOR];
		if (virtq_has_used(q))
			return 0;
		irq_wait_vector(WL_VECTOR, seen, 10);
	}
	return virtq_has_used(q) ? 0 : -1;
}

static void post_in(unsigned i)
{
	struct virtq_buf b = { (u64)(uintptr_t)in_bufs[i], IN_SIZE, 1 };
	virtq_submit(inq, &b, 1);
}

/* One command on the out queue; returns the response type (or 0 on timeout). */
static u32 command(unsigned len)
{
	struct virtq_buf b[2] = {
		{ (u64)(uintptr_t)cmd, len, 0 },
		{ (u64)(uintptr_t)resp, sizeof(resp), 1 },
	};
	memset(resp, 0, sizeof(resp));
	virtq_submit(outq, b, 2);
	virtq_kick(outq);
	if (wait_used(outq, 5000))
		return 0;
	u32 id, n;
	virtq_get_used(outq, &id, &n);
	return n >= 4 ? *(u32 *)resp : 0;
}

/* ---- Wayland requests, appended to a VFD_SEND command ---- */
static unsigned wl_len;

static void wl_begin(void)
{
	wl_len = 16;	/* struct virtio_wl_ctrl_vfd_send, filled in by wl_send() */
}

static void put32(u32 v)
{
	memcpy(cmd + wl_len, &v, 4);
	wl_len += 4;
}

static void put_str(const char *s)
{
	u32 n = (u32)strlen(s) + 1;
	put32(n);
	memset(cmd + wl_len, 0, (n + 3) & ~3u);
	memcpy(cmd + wl_len, s, n);
	wl_len += (n + 3) & ~3u;
}

/* Starts a request; wl_end() patches its size. */
static unsigned req_start;
static void req(u32 obj, u16 opcode)
{
	req_start = wl_len;
	put32(obj);
	put32(opcode);
}
static void req_end(void)
{
	u32 size = wl_len - req_start;
	u32 *w = (u32 *)(cmd + req_start + 4);
	*w |= size << 16;
}

/* Sends the collected requests (and vfd ids) on the context; 0 if RESP_OK. */
static int wl_send(const u32 *vfds, unsigned nvfds)
{
	/* the ids go between the header and the data: move the data up */
	unsigned data_len = wl_len - 16;
	memmove(cmd + 16 + 4 * nvfds, cmd + 16, data_len);
	u32 hdr[4] = { CMD_VFD_SEND, 0, CTX, nvfds };
	memcpy(cmd, hdr, sizeof(hdr));
	memcpy(cmd + 16, vfds, 4 * nvfds);
	u32 r = command(16 + 4 * nvfds + data_len);
	if (r != RESP_OK)
		printf("virtio-wl: VFD_SEND answered %#x\n", r);
	return r == RESP_OK ? 0 : -1;
}

/* ---- events ---- */
static u32 compositor_name, shm_name, compositor_ver;
static int display_error;

static void on_event(u32 obj, u16 opcode, const u8 *p, unsigned len, u32 registry)
{
	if (obj == 1 && opcode == 0) {
		u32 eobj, code, n;
		memcpy(&eobj, p, 4);
		memcpy(&code, p + 4, 4);
		memcpy(&n, p + 8, 4);
		printf("wl_display.error: object %u code %u: %s\n", eobj, code,
		       n && n <= len - 12 ? (const char *)p + 12 : "");
		display_error = 1;
	} else if (obj == registry && opcode == 0 && len >= 12) {
		u32 name, n, ver;
		memcpy(&name, p, 4);
		memcpy(&n, p + 4, 4);
		if (n == 0 || 8 + ((n + 3) & ~3u) + 4 > len)
			return;
		const char *iface = (const char *)p + 8;
		memcpy(&ver, p + 8 + ((n + 3) & ~3u), 4);
		printf("global %u %s %u\n", name, iface, ver);
		if (!strncmp(iface, "wl_compositor", n))
			compositor_name = name, compositor_ver = ver;
		if (!strncmp(iface, "wl_shm", n))
			shm_name = name;
	}
}

/* Reads in-queue messages until wl_callback `cb` is done; 0, or an exit status. */
static int pump_until_done(u32 cb, u32 registry)
{
	for (unsigned rounds = 0; rounds < 400; rounds++) {
		if (virtio_status(&d) & VIRTIO_STATUS_NEEDS_RESET)
			return 30;
		if (wait_used(inq, 50))
			continue;
		u32 id, n;
		while (!virtq_get_used(inq, &id, &n)) {
			const u8 *m = (const u8 *)(uintptr_t)inq->desc[id].addr;
			unsigned slot = (unsigned)((m - in_bufs[0]) / IN_SIZE);
			u32 type, vfd, count;
			memcpy(&type, m, 4);
			memcpy(&vfd, m + 8, 4);
			if (type == CMD_VFD_HUP && vfd == CTX) {
				puts("virtio-wl: the compositor hung up");
				return 29;
			}
			if (type == CMD_VFD_RECV && vfd == CTX && n >= 16) {
				memcpy(&count, m + 12, 4);
				unsigned off = 16 + 4 * count;
				if (off <= n && stream_len + (n - off) <= sizeof(stream)) {
					memcpy(stream + stream_len, m + off, n - off);
					stream_len += n - off;
				}
			}
			post_in(slot < IN_BUFS ? slot : 0);
			virtq_kick(inq);
		}
		int done = 0;
		while (stream_len >= 8) {
			u32 obj, word;
			memcpy(&obj, stream, 4);
			memcpy(&word, stream + 4, 4);
			unsigned size = word >> 16;
			if (size < 8 || size > stream_len)
				break;
			on_event(obj, (u16)(word & 0xffff), stream + 8, size - 8, registry);
			if (obj == cb && (word & 0xffff) == 0)
				done = 1;
			memmove(stream, stream + size, stream_len - size);
			stream_len -= size;
		}
		if (display_error)
			return 28;
		if (done)
			return 0;
	}
	return 23;
}

/* Maps [addr, addr+len) (above 4 GiB) with 2 MiB pages through a PD of our own. */
static int map_high(u64 addr, u64 len)
{
	volatile u64 *pdpt = (volatile u64 *)(uintptr_t)0xA000;	/* layout.PDPT_ADDR */
	unsigned gib = (unsigned)(addr >> 30);
	if (gib >= 512 || (addr + len - 1) >> 30 != gib)
		return -1;
	if (pdpt[gib] & 1)
		return -1;
	for (u64 a = addr & ~0x1fffffULL; a < addr + len; a += 0x200000)
		pd[(a >> 21) & 511] = a | 0x83;	/* present, writable, 2 MiB */
	pdpt[gib] = (u64)(uintptr_t)pd | 3;
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
	return 0;
}

int main(const void *bp)
{
	(void)bp;
	static struct pci_func funcs[32];
	unsigned n = pci_scan(PCI_CF8, funcs, ARRAY_SIZE(funcs));
	struct pci_func f;
	if (pci_find(PCI_CF8, VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_ID(VIRTIO_ID_WL), &f)) {
		puts("virtio-wl: no 1af4:107f on bus 0");
		return 2;
	}
	struct pci_window mem = { PCI_LOW_MMIO_START, PCI_LOW_MMIO_END };
	struct pci_window io = { PCI_IO_START, PCI_IO_END };
	if (pci_assign_all(funcs, n, &mem, &io)) {
		puts("virtio-wl: BAR assignment failed");
		return 3;
	}
	for (unsigned i = 0; i < n; i++)
		if (funcs[i].dev == f.dev && funcs[i].fn == f.fn)
			f = funcs[i];
	printf("virtio-wl at 00:%02x.%u, BAR0 %#lx\n", f.dev, f.fn, f.bar_addr[0]);
	if (irq_init())
		return 4;

	int rc = virtio_probe(&d, &f);
	if (!rc)
		rc = virtio_negotiate(&d, 1ULL << VIRTIO_WL_F_TRANS_FLAGS);
	if (!rc)
		rc = virtio_setup_msix(&d, lapic_id(), WL_VECTOR);
	if (!rc)
		rc = virtio_setup_queue(&d, 0, 16, 0);
	if (!rc)
		rc = virtio_setup_queue(&d, 1, 16, 0);
	if (!rc)
		rc = virtio_driver_ok(&d);
	if (rc) {
		printf("virtio-wl: bring-up failed: %s\n", d.error);
		return 10 + rc;
	}
	inq = &d.vq[0];
	outq = &d.vq[1];
	printf("virtio-wl: features %#lx\n", d.driver_features);
	for (unsigned i = 0; i < IN_BUFS; i++)
		post_in(i);
	virtq_kick(inq);

	/* VFD_NEW_CTX */
	u32 ctx[3] = { CMD_VFD_NEW_CTX, 0, CTX };
	memcpy(cmd, ctx, sizeof(ctx));
	u32 r = command(sizeof(ctx));
	if (r == 0)
		return 20;
	struct ctrl_vfd_new *nv = (struct ctrl_vfd_new *)resp;
	printf("vfd_new_ctx: type %#x id %u flags %#x\n", r, nv->id, nv->vfd_flags);
	if (r != RESP_VFD_NEW || nv->id != CTX)
		return 21;

	/* get_registry + sync */
	const u32 registry = 2, cb1 = 3;
	wl_begin();
	req(1, 1); put32(registry); req_end();
	req(1, 0); put32(cb1); req_end();
	if (wl_send(0, 0))
		return 22;
	if ((rc = pump_until_done(cb1, registry)))
		return rc;
	if (!compositor_name || !shm_name) {
		puts("virtio-wl: wl_compositor or wl_shm missing");
		return 24;
	}

	/* bind, surface */
	const u32 compositor = 4, shm = 5, surface = 6, pool = 7, buffer = 8, cb2 = 9;
	wl_begin();
	req(registry, 0); put32(compositor_name); put_str("wl_compositor");
	put32(compositor_ver < 4 ? compositor_ver : 4); put32(compositor); req_end();
	req(registry, 0); put32(shm_name); put_str("wl_shm"); put32(1); put32(shm); req_end();
	req(compositor, 0); put32(surface); req_end();
	if (wl_send(0, 0))
		return 22;

	/* VFD_NEW: shared memory at a pfn */
	struct ctrl_vfd_new vn = { CMD_VFD_NEW, 0, SHM_VFD, 0, 0, BUF_SIZE, 0 };
	memcpy(cmd, &vn, sizeof(vn));
	r = command(sizeof(vn));
	printf("vfd_new id %u pfn %#lx size %u\n", nv->id, nv->pfn, nv->size);
	if (r != RESP_VFD_NEW || nv->id != SHM_VFD || nv->size != BUF_SIZE || !nv->pfn)
		return 25;
	u64 addr = nv->pfn << 12;
	if (addr >= (1ULL << 32) && map_high(addr, BUF_SIZE))
		return 26;
	volatile u32 *px = (volatile u32 *)(uintptr_t)addr;
	for (unsigned i = 0; i < WIDTH * HEIGHT; i++)
		px[i] = 0xff000000u | (i * 2654435761u >> 8);
	if (px[0] != 0xff000000u || px[WIDTH * HEIGHT - 1] !=
	    (0xff000000u | ((WIDTH * HEIGHT - 1) * 2654435761u >> 8)))
		return 27;

	/* pool, buffer, attach, damage, commit, sync */
	wl_begin();
	req(shm, 0); put32(pool); put32(BUF_SIZE); req_end();
	u32 vfds[1] = { SHM_VFD };
	if (wl_send(vfds, 1))
		return 22;
	wl_begin();
	req(pool, 0); put32(buffer); put32(0); put32(WIDTH); put32(HEIGHT); put32(WIDTH * 4);
	put32(1); req_end();
	req(surface, 1); put32(buffer); put32(0); put32(0); req_end();
	req(surface, 2); put32(0); put32(0); put32(WIDTH); put32(HEIGHT); req_end();
	req(surface, 6); req_end();
	req(1, 0); put32(cb2); req_end();
	if (wl_send(0, 0))
		return 22;
	if ((rc = pump_until_done(cb2, registry)))
		return rc;
	puts("virtio-wl: OK");
	return 0;
}
