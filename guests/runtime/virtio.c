/*
 * Modern virtio-pci driver for the test guests.  See virtio.h for the sequence.  The
 * register accesses follow virtio 1.2 section 4.1: common configuration fields are
 * accessed with their natural width, 64-bit fields as two 32-bit halves.
 */
#include "virtio.h"
#include "irq.h"

/* Ring memory: per queue one page each for the descriptor table, the driver (avail)
 * ring and the device (used) ring.  In .bss, so zeroed at start; page aligned. */
static u8 ring_pool[VIRTIO_RING_POOL][3][4096] __attribute__((aligned(4096)));
static unsigned ring_pool_used;

static int fail(struct virtio_dev *d, int code, const char *why)
{
	d->error = why;
	return code;
}

/* ---- common configuration ---- */

static u8 c_r8(const struct virtio_dev *d, u32 off) { return mmio_read8(d->common + off); }
static u16 c_r16(const struct virtio_dev *d, u32 off) { return mmio_read16(d->common + off); }
static u32 c_r32(const struct virtio_dev *d, u32 off) { return mmio_read32(d->common + off); }
static void c_w8(const struct virtio_dev *d, u32 off, u8 v) { mmio_write8(d->common + off, v); }
static void c_w16(const struct virtio_dev *d, u32 off, u16 v) { mmio_write16(d->common + off, v); }
static void c_w32(const struct virtio_dev *d, u32 off, u32 v) { mmio_write32(d->common + off, v); }

u8 virtio_status(const struct virtio_dev *d) { return c_r8(d, VIRTIO_COMMON_STATUS); }

static void set_status(struct virtio_dev *d, u8 bits)
{
	c_w8(d, VIRTIO_COMMON_STATUS, (u8)(virtio_status(d) | bits));
}

void virtio_reset(struct virtio_dev *d)
{
	c_w8(d, VIRTIO_COMMON_STATUS, 0);
	for (unsigned i = 0; i < 1000 && virtio_status(d) != 0; i++)
		cpu_relax();
}

/* ---- capability walk ---- */

int virtio_probe(struct virtio_dev *d, struct pci_func *f)
{
	memset(d, 0, sizeof(*d));
	d->pci = f;
	for (u8 cap = pci_find_cap(f, PCI_CAP_ID_VNDR, 0); cap;
	     cap = pci_find_cap(f, PCI_CAP_ID_VNDR, cap)) {
		u8 cap_len = pcif_read8(f, cap + 2);
		u8 type = pcif_read8(f, cap + 3);
		u8 bar = pcif_read8(f, cap + 4);
		u32 offset = pcif_read32(f, cap + 8);
		u32 length = pcif_read32(f, cap + 12);
		if (cap_len < 16)
			continue;
		if (type == VIRTIO_PCI_CAP_PCI_CFG) {	/* a window in config space, no BAR */
			if (!d->cap_pci_cfg && cap_len >= 20)
				d->cap_pci_cfg = cap;
			continue;
		}
		/* a structure we can reach: an assigned memory BAR that contains it */
		if (bar > 5 || !f->bar_addr[bar] || (f->bar_flags[bar] & PCI_BAR_IO) ||
		    (u64)offset + length > f->bar_size[bar])
			continue;
		u64 addr = f->bar_addr[bar] + offset;
		switch (type) {
		case VIRTIO_PCI_CAP_COMMON_CFG:
			if (!d->cap_common && length >= 0x38) {
				d->cap_common = cap;
				d->common = addr;
			}
			break;
		case VIRTIO_PCI_CAP_NOTIFY_CFG:
			if (!d->cap_notify && cap_len >= 20) {
				d->cap_notify = cap;
				d->notify_base = addr;
				d->notify_len = length;
				d->notify_mult = pcif_read32(f, cap + 16);
			}
			break;
		case VIRTIO_PCI_CAP_ISR_CFG:
			if (!d->cap_isr && length >= 1) {
				d->cap_isr = cap;
				d->isr = addr;
			}
			break;
		case VIRTIO_PCI_CAP_DEVICE_CFG:
			if (!d->cap_device) {
				d->cap_device = cap;
				d->device_cfg = addr;
				d->device_cfg_len = length;
			}
			break;
		}
	}
	if (!d->cap_common)
		return fail(d, VIRTIO_ERR_CAPS, "no common configuration capability");
	if (!d->cap_notify)
		return fail(d, VIRTIO_ERR_CAPS, "no notification capability");
	if (!d->cap_isr)
		return fail(d, VIRTIO_ERR_CAPS, "no ISR capability");
	d->num_queues = c_r16(d, VIRTIO_COMMON_NUMQ);
	return VIRTIO_OK;
}

/* ---- initialisation (virtio 1.2, 3.1.1) ---- */

int virtio_negotiate(struct virtio_dev *d, u64 wanted)
{
	virtio_reset(d);
	if (virtio_status(d) != 0)
		return fail(d, VIRTIO_ERR_RESET, "device_status is not 0 after reset");
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);

	c_w32(d, VIRTIO_COMMON_DFSELECT, 0);
	u64 feat = c_r32(d, VIRTIO_COMMON_DF);
	c_w32(d, VIRTIO_COMMON_DFSELECT, 1);
	feat |= (u64)c_r32(d, VIRTIO_COMMON_DF) << 32;
	d->device_features = feat;
	if (!(feat >> VIRTIO_F_VERSION_1 & 1)) {
		set_status(d, VIRTIO_STATUS_FAILED);
		return fail(d, VIRTIO_ERR_VERSION_1, "device does not offer VIRTIO_F_VERSION_1");
	}
	u64 drv = (wanted & feat) | 1ULL << VIRTIO_F_VERSION_1;
	d->driver_features = drv;
	c_w32(d, VIRTIO_COMMON_GFSELECT, 0);
	c_w32(d, VIRTIO_COMMON_GF, (u32)drv);
	c_w32(d, VIRTIO_COMMON_GFSELECT, 1);
	c_w32(d, VIRTIO_COMMON_GF, (u32)(drv >> 32));
	set_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
		set_status(d, VIRTIO_STATUS_FAILED);
		return fail(d, VIRTIO_ERR_FEATURES_OK, "FEATURES_OK did not stick");
	}
	return VIRTIO_OK;
}

int virtio_setup_msix(struct virtio_dev *d, u8 apic_id, u8 vector)
{
	struct msix_info m;
	if (msix_probe(d->pci, &m))
		return fail(d, VIRTIO_ERR_MSIX, "no MSI-X capability, or its table is outside the BAR");
	d->msix_cap = m.cap;
	d->msix_table_size = m.table_size;
	d->msix_table = m.table;
	msix_enable_masked(d->pci, &m);
	msix_set_entry(&m, 0, apic_id, vector);
	msix_unmask_function(d->pci, &m);
	/* no configuration-change interrupts: we never wait for one */
	c_w16(d, VIRTIO_COMMON_MSIX, VIRTIO_MSI_NO_VECTOR);
	return VIRTIO_OK;
}

int virtio_setup_queue(struct virtio_dev *d, u16 index, u16 size, u16 msix_entry)
{
	if (index >= VIRTIO_MAX_QUEUES || index >= d->num_queues)
		return fail(d, VIRTIO_ERR_QUEUE, "no such queue");
	if (ring_pool_used >= VIRTIO_RING_POOL)
		return fail(d, VIRTIO_ERR_QUEUE, "ring pool exhausted");
	struct virtq *q = &d->vq[index];
	c_w16(d, VIRTIO_COMMON_Q_SELECT, index);
	u16 max = c_r16(d, VIRTIO_COMMON_Q_SIZE);
	if (max == 0)
		return fail(d, VIRTIO_ERR_QUEUE, "queue size 0 (queue not available)");
	if (c_r16(d, VIRTIO_COMMON_Q_ENABLE))
		return fail(d, VIRTIO_ERR_QUEUE, "queue already enabled after reset");
	u16 n = size < max ? size : max;
	if (n > VIRTQ_MAX_SIZE)
		n = VIRTQ_MAX_SIZE;
	while (n & (n - 1))
		n &= (u16)(n - 1);		/* round down to a power of 2 */

	u8 (*mem)[4096] = ring_pool[ring_pool_used++];
	memset(mem, 0, 3 * 4096);
	memset(q, 0, sizeof(*q));
	q->index = index;
	q->size = n;
	q->desc = (struct virtq_desc *)mem[0];
	q->avail = (struct virtq_avail *)mem[1];
	q->used = (volatile struct virtq_used *)mem[2];

	c_w16(d, VIRTIO_COMMON_Q_SIZE, n);
	mmio_write64_split(d->common + VIRTIO_COMMON_Q_DESCLO, (u64)(uintptr_t)q->desc);
	mmio_write64_split(d->common + VIRTIO_COMMON_Q_AVAILLO, (u64)(uintptr_t)q->avail);
	mmio_write64_split(d->common + VIRTIO_COMMON_Q_USEDLO, (u64)(uintptr_t)q->used);
	if (c_r16(d, VIRTIO_COMMON_Q_SIZE) != n ||
	    mmio_read64_split(d->common + VIRTIO_COMMON_Q_DESCLO) != (u64)(uintptr_t)q->desc ||
	    mmio_read64_split(d->common + VIRTIO_COMMON_Q_AVAILLO) != (u64)(uintptr_t)q->avail ||
	    mmio_read64_split(d->common + VIRTIO_COMMON_Q_USEDLO) != (u64)(uintptr_t)q->used)
		return fail(d, VIRTIO_ERR_QUEUE, "queue size or ring address did not read back");

	c_w16(d, VIRTIO_COMMON_Q_MSIX, msix_entry);
	q->msix_vector = c_r16(d, VIRTIO_COMMON_Q_MSIX);
	if (msix_entry != VIRTIO_MSI_NO_VECTOR && q->msix_vector != msix_entry)
		return fail(d, VIRTIO_ERR_VECTOR, "queue_msix_vector was refused");

	u16 noff = c_r16(d, VIRTIO_COMMON_Q_NOFF);
	u64 off = (u64)noff * d->notify_mult;
	if (off + 2 > d->notify_len)
		return fail(d, VIRTIO_ERR_QUEUE, "queue_notify_off points outside the notify area");
	q->notify = d->notify_base + off;

	c_w16(d, VIRTIO_COMMON_Q_ENABLE, 1);
	if (c_r16(d, VIRTIO_COMMON_Q_ENABLE) != 1)
		return fail(d, VIRTIO_ERR_QUEUE, "queue_enable did not read back 1");
	return VIRTIO_OK;
}

int virtio_driver_ok(struct virtio_dev *d)
{
	set_status(d, VIRTIO_STATUS_DRIVER_OK);
	u8 s = virtio_status(d);
	if (s & VIRTIO_STATUS_NEEDS_RESET)
		return fail(d, VIRTIO_ERR_NEEDS_RESET, "DEVICE_NEEDS_RESET after DRIVER_OK");
	if (!(s & VIRTIO_STATUS_DRIVER_OK))
		return fail(d, VIRTIO_ERR_NEEDS_RESET, "DRIVER_OK did not stick");
	return VIRTIO_OK;
}

/* ---- device configuration ---- */

static int cfg_ok(const struct virtio_dev *d, u32 off, u32 size)
{
	return d->device_cfg && (u64)off + size <= d->device_cfg_len;
}

u8 virtio_cfg_read8(const struct virtio_dev *d, u32 off)
{
	return cfg_ok(d, off, 1) ? mmio_read8(d->device_cfg + off) : 0;
}

u16 virtio_cfg_read16(const struct virtio_dev *d, u32 off)
{
	return cfg_ok(d, off, 2) ? mmio_read16(d->device_cfg + off) : 0;
}

u32 virtio_cfg_read32(const struct virtio_dev *d, u32 off)
{
	return cfg_ok(d, off, 4) ? mmio_read32(d->device_cfg + off) : 0;
}

u64 virtio_cfg_read64(const struct virtio_dev *d, u32 off)
{
	if (!cfg_ok(d, off, 8))
		return 0;
	u64 v = 0;
	for (unsigned tries = 0; tries < 8; tries++) {
		u8 gen = c_r8(d, VIRTIO_COMMON_CFGGENERATION);
		v = mmio_read64_split(d->device_cfg + off);
		if (c_r8(d, VIRTIO_COMMON_CFGGENERATION) == gen)
			break;
	}
	return v;
}

u32 virtio_pci_cfg_read(const struct virtio_dev *d, u8 bar, u32 offset, u8 length)
{
	u8 cap = d->cap_pci_cfg;
	if (!cap || (length != 1 && length != 2 && length != 4))
		return 0xffffffffu;
	pcif_write8(d->pci, cap + 4, bar);
	pcif_write32(d->pci, cap + 8, offset);
	pcif_write32(d->pci, cap + 12, length);
	u32 v = pcif_read32(d->pci, cap + 16);
	return length == 4 ? v : v & ((1u << (8 * length)) - 1);
}

/* ---- the split virtqueue ---- */

int virtq_submit(struct virtq *q, const struct virtq_buf *bufs, unsigned n)
{
	if (!q->size || n == 0 || n > q->size)
		return -1;
	u16 head = q->next_desc;
	u16 i = head;
	for (unsigned k = 0; k < n; k++) {
		struct virtq_desc *dsc = &q->desc[i];
		u16 next = (u16)((i + 1) % q->size);
		dsc->addr = bufs[k].addr;
		dsc->len = bufs[k].len;
		dsc->flags = (u16)((bufs[k].device_writable ? VIRTQ_DESC_F_WRITE : 0) |
				   (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		dsc->next = k + 1 < n ? next : 0;
		i = next;
	}
	q->next_desc = i;
	q->avail->ring[q->avail_idx % q->size] = head;
	barrier();			/* the ring entry before the index (x86: stores in order) */
	q->avail_idx++;
	__atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
	return head;
}

void virtq_kick(const struct virtq *q)
{
	mb();				/* avail->idx is visible before the doorbell */
	mmio_write16(q->notify, q->index);
}

int virtq_has_used(const struct virtq *q)
{
	return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->last_used;
}

int virtq_get_used(struct virtq *q, u32 *id, u32 *len)
{
	if (!virtq_has_used(q))
		return -1;
	volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->size];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return 0;
}
