/*
 * A small modern (virtio 1.x) virtio-pci driver for the test guests (runtime/virtio.c),
 * with split virtqueues in statically allocated, page-aligned guest RAM.  Not part of
 * the runtime every guest links: a guest that uses it lists runtime/virtio.c and
 * runtime/irq.c among its sources in vmmcore/guests.py's GUESTS.
 *
 * Bring-up, in the order virtio 1.2 section 3.1.1 wants it:
 *
 *   struct pci_func f;  pci_find(...); pci_assign_bars(&f, ...);
 *   virtio_probe(&d, &f)            capability walk: common 1, notify 2, ISR 3,
 *                                   device 4, pci_cfg 5 (addresses from the BARs)
 *   virtio_negotiate(&d, wanted)    reset, ACKNOWLEDGE, DRIVER, features (VERSION_1
 *                                   required), FEATURES_OK and its check
 *   virtio_setup_msix(&d, apic, v)  MSI-X on, table entry 0 -> vector v on that APIC
 *   virtio_setup_queue(&d, i, n, 0) select, size, desc/driver/device, msix 0, enable
 *   virtio_driver_ok(&d)            DRIVER_OK; fails on DEVICE_NEEDS_RESET
 *
 * then virtq_submit() + virtq_kick() and virtq_get_used().  Every function returns 0
 * or one of the VIRTIO_ERR_* codes below and leaves a one-line reason in d->error.
 */
#ifndef VMM_GUEST_VIRTIO_H
#define VMM_GUEST_VIRTIO_H

#include "runtime.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_MODERN_ID(type) ((u16)(0x1040 + (type)))
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4

/* device_status bits */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 32
#define VIRTIO_MSI_NO_VECTOR 0xffff

/* virtio_pci_cap cfg_type */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_PCI_CFG 5

/* struct virtio_pci_common_cfg field offsets */
#define VIRTIO_COMMON_DFSELECT 0x00
#define VIRTIO_COMMON_DF 0x04
#define VIRTIO_COMMON_GFSELECT 0x08
#define VIRTIO_COMMON_GF 0x0c
#define VIRTIO_COMMON_MSIX 0x10
#define VIRTIO_COMMON_NUMQ 0x12
#define VIRTIO_COMMON_STATUS 0x14
#define VIRTIO_COMMON_CFGGENERATION 0x15
#define VIRTIO_COMMON_Q_SELECT 0x16
#define VIRTIO_COMMON_Q_SIZE 0x18
#define VIRTIO_COMMON_Q_MSIX 0x1a
#define VIRTIO_COMMON_Q_ENABLE 0x1c
#define VIRTIO_COMMON_Q_NOFF 0x1e
#define VIRTIO_COMMON_Q_DESCLO 0x20
#define VIRTIO_COMMON_Q_AVAILLO 0x28
#define VIRTIO_COMMON_Q_USEDLO 0x30

/* Return codes (a guest adds them to its own base to make exit statuses). */
enum virtio_err {
	VIRTIO_OK = 0,
	VIRTIO_ERR_CAPS = 1,		/* a required virtio capability is missing / outside its BAR */
	VIRTIO_ERR_RESET = 2,		/* device_status did not read back 0 after the reset */
	VIRTIO_ERR_VERSION_1 = 3,	/* the device does not offer VIRTIO_F_VERSION_1 */
	VIRTIO_ERR_FEATURES_OK = 4,	/* FEATURES_OK did not stay set */
	VIRTIO_ERR_MSIX = 5,		/* no usable MSI-X capability/table */
	VIRTIO_ERR_QUEUE = 6,		/* queue absent, size 0, or a register did not read back */
	VIRTIO_ERR_VECTOR = 7,		/* queue_msix_vector read back as NO_VECTOR */
	VIRTIO_ERR_NEEDS_RESET = 8,	/* DEVICE_NEEDS_RESET (or not DRIVER_OK) after DRIVER_OK */
};

/* The split virtqueue (virtio 1.2, 2.7) */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[];
};
struct virtq_used_elem {
	u32 id;
	u32 len;
};
struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[];
};

#define VIRTQ_MAX_SIZE 64		/* we never use more: one page holds each ring part */
#define VIRTIO_MAX_QUEUES 4		/* per device */
#define VIRTIO_RING_POOL 8		/* queues in the whole guest */

struct virtq {
	u16 index;
	u16 size;			/* 0: not set up */
	struct virtq_desc *desc;	/* page-aligned, in guest RAM (identity-mapped) */
	struct virtq_avail *avail;
	volatile struct virtq_used *used;
	u16 next_desc;			/* descriptors are used round-robin */
	u16 avail_idx;
	u16 last_used;
	u16 msix_vector;		/* as read back */
	u64 notify;			/* the address of this queue's doorbell */
};

struct virtq_buf {
	u64 addr;
	u32 len;
	int device_writable;
};

struct virtio_dev {
	struct pci_func *pci;		/* BARs must be assigned (pci_assign_bars) */
	u64 common, isr, device_cfg, notify_base;
	u32 device_cfg_len, notify_len, notify_mult;
	u8 cap_common, cap_notify, cap_isr, cap_device, cap_pci_cfg;	/* config offsets */
	u64 device_features, driver_features;
	u16 num_queues;
	u8 msix_cap;
	u16 msix_table_size;
	u64 msix_table;
	struct virtq vq[VIRTIO_MAX_QUEUES];
	const char *error;		/* why the last call failed */
};

int virtio_probe(struct virtio_dev *d, struct pci_func *f);
/* wanted: the driver's optional features; VERSION_1 is added and required. */
int virtio_negotiate(struct virtio_dev *d, u64 wanted);
int virtio_setup_msix(struct virtio_dev *d, u8 apic_id, u8 vector);
/* size: the most we want (capped at the device's maximum and VIRTQ_MAX_SIZE, rounded down
 * to a power of 2); msix_entry: the table entry for its interrupts, or VIRTIO_MSI_NO_VECTOR. */
int virtio_setup_queue(struct virtio_dev *d, u16 index, u16 size, u16 msix_entry);
int virtio_driver_ok(struct virtio_dev *d);
u8 virtio_status(const struct virtio_dev *d);
/* Writes 0 to device_status (and waits, bounded, for it to read back 0). */
void virtio_reset(struct virtio_dev *d);

/* Device configuration space, read through the device cap (offset bounds-checked;
 * out of range reads as 0). */
u8 virtio_cfg_read8(const struct virtio_dev *d, u32 off);
u16 virtio_cfg_read16(const struct virtio_dev *d, u32 off);
u32 virtio_cfg_read32(const struct virtio_dev *d, u32 off);
/* A 64-bit field, re-read until config_generation is stable (virtio 1.2, 2.5.1). */
u64 virtio_cfg_read64(const struct virtio_dev *d, u32 off);

/* A BAR register read through the VIRTIO_PCI_CAP_PCI_CFG window in config space
 * (length 1, 2 or 4); returns 0xffffffff if the device has no such capability. */
u32 virtio_pci_cfg_read(const struct virtio_dev *d, u8 bar, u32 offset, u8 length);

/* Puts a descriptor chain (n buffers, device-readable ones first) on the avail ring;
 * returns its head descriptor id, or -1 if n is 0 or larger than the queue. */
int virtq_submit(struct virtq *q, const struct virtq_buf *bufs, unsigned n);
/* Writes the queue index to its doorbell (notify_base + queue_notify_off * multiplier). */
void virtq_kick(const struct virtq *q);
/* 1 if the device has returned a chain we have not consumed yet. */
int virtq_has_used(const struct virtq *q);
/* Consumes one used element; 0 on success, -1 if there is none. */
int virtq_get_used(struct virtq *q, u32 *id, u32 *len);

#endif
