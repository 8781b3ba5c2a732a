"""virtio constants: device status bits, feature bits, ISR bits, device type ids.

Values are those of the OASIS virtio 1.2 specification (sections 2.1 device status,
2.2 / 6 feature bits, 4.1.4.5 ISR status, 5 device types). They live in one module so
that the transport, the queue and every plugin agree on them without importing each
other.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class DeviceStatus(IntFlag):
    """The device status field (virtio 1.2, 2.1), written by the driver, read back."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


ACKNOWLEDGE = DeviceStatus.ACKNOWLEDGE
DRIVER = DeviceStatus.DRIVER
DRIVER_OK = DeviceStatus.DRIVER_OK
FEATURES_OK = DeviceStatus.FEATURES_OK
DEVICE_NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET
FAILED = DeviceStatus.FAILED

# -- feature bits (bit numbers, not masks) ------------------------------------------

VIRTIO_F_NOTIFY_ON_EMPTY = 24      # legacy only; never offered by a modern device
VIRTIO_F_ANY_LAYOUT = 27           # legacy only
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34          # not offered: only the split ring is implemented
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40

# Short aliases matching the names used in the issue and in crosvm.
RING_INDIRECT_DESC = VIRTIO_F_RING_INDIRECT_DESC
RING_EVENT_IDX = VIRTIO_F_RING_EVENT_IDX
VERSION_1 = VIRTIO_F_VERSION_1
ACCESS_PLATFORM = VIRTIO_F_ACCESS_PLATFORM
RING_PACKED = VIRTIO_F_RING_PACKED


def bit(n: int) -> int:
    """The feature mask for feature bit number n."""
    return 1 << n


#: Feature bits the virtio-pci transport offers on top of a device's own bits: the
#: split-ring features that queue.py implements. RING_PACKED and ACCESS_PLATFORM are
#: deliberately absent (no packed ring, no IOMMU).
TRANSPORT_FEATURES = (
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_RING_EVENT_IDX)
)

# -- ISR status (virtio-pci 4.1.4.5; read-to-clear) ---------------------------------

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

#: The MSI-X "no vector" value for queue_msix_vector / config_msix_vector.
VIRTIO_MSI_NO_VECTOR = 0xFFFF

#: Largest queue size the split ring allows (virtio 1.2, 2.7: at most 32768).
MAX_QUEUE_SIZE = 32768


class DeviceType(IntEnum):
    """virtio device ids (virtio 1.2, section 5), plus crosvm's out-of-spec wl."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    P9 = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    IOMMU = 23
    MEM = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    WL = 63


VIRTIO_PCI_VENDOR_ID = 0x1AF4


def modern_pci_device_id(device_type: int) -> int:
    """The PCI device id of a modern (non-transitional) virtio device: 0x1040 + type."""
    return 0x1040 + int(device_type)
