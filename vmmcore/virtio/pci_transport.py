"""VirtioPciDevice: the modern (virtio 1.x) virtio-pci transport around a VirtioDevice.

What Linux's virtio_pci_modern driver expects (virtio 1.2, 4.1): vendor 0x1af4, device
0x1040 + type, revision 1, and vendor-specific capabilities pointing into one 64-bit
memory BAR that holds

    0x0000  common configuration  (features, status, MSI-X vectors, queue set-up)
    0x1000  ISR status            (read-to-clear; lowers INTx)
    0x2000  device configuration  (VirtioDevice.read_config / write_config)
    0x3000  notifications         (queue i at 0x3000 + 4 * i; KVM_IOEVENTFDs)
    0x4000  MSI-X table, 0x6000 PBA (vmmcore.pci.MsixConfig)

plus the VIRTIO_PCI_CAP_PCI_CFG window the spec requires. Queue kicks go straight from
KVM to the device worker's eventfds (ioevents()); a notify write that reaches write_bar
(no ioeventfd registered, e.g. in tests) signals the same eventfd.

The guest is hostile: every register write is bounds- and width-checked by building the
structure image and re-decoding it, out-of-range queue selects read as an absent queue,
unknown or unoffered features fail FEATURES_OK, and bad ring addresses at DRIVER_OK put
the device into DEVICE_NEEDS_RESET instead of activating it.
"""

from __future__ import annotations

import logging
import struct

from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.pci.config_space import (
    BarKind,
    DisplaySubclass,
    InputSubclass,
    MassStorageSubclass,
    MultimediaSubclass,
    NetworkSubclass,
    PciClass,
    PciConfiguration,
    SimpleCommunicationSubclass,
)
from vmmcore.pci.device import ConfiguredPciDevice, IoEventSpec
from vmmcore.pci.intx import PciIntx
from vmmcore.pci.msix import MsixConfig
from vmmcore.virtio.device import VirtioDevice, VirtioInterrupt
from vmmcore.virtio.queue import Queue, VirtqueueError, prepare_queues
from vmmcore.virtio.status import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    FEATURES_OK,
    TRANSPORT_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_VENDOR_ID,
    DeviceType,
    modern_pci_device_id,
)

log = logging.getLogger(__name__)

BAR = 0
BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1
DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x6000

PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# struct virtio_pci_common_cfg (virtio 1.2, 4.1.4.3), without the 1.2 queue_reset tail.
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
(_DFSEL, _DF, _GFSEL, _GF, _MSIX_CFG, _NUMQ, _STATUS, _GEN, _QSEL, _QSIZE, _QMSIX,
 _QENABLE, _QNOTIFY, _QDESC, _QDRIVER, _QDEVICE) = range(16)
_FIELD_SPANS = []
_off = 0
for _fmt in _COMMON.format[1:]:
    _FIELD_SPANS.append((_off, _off + struct.calcsize("<" + _fmt)))
    _off += struct.calcsize("<" + _fmt)
assert _off == COMMON_SIZE

#: PCI class per device type, as QEMU reports them (Linux binds virtio by vendor/device
#: id, but lspci, Xorg's primary-GPU choice and the VGA arbiter look at the class).
PCI_CLASSES: dict[int, tuple[int, int]] = {
    DeviceType.NET: (PciClass.NETWORK, NetworkSubclass.ETHERNET),
    DeviceType.BLOCK: (PciClass.MASS_STORAGE, MassStorageSubclass.SCSI),
    DeviceType.SCSI: (PciClass.MASS_STORAGE, MassStorageSubclass.SCSI),
    DeviceType.CONSOLE: (PciClass.SIMPLE_COMMUNICATION, SimpleCommunicationSubclass.OTHER),
    DeviceType.GPU: (PciClass.DISPLAY, DisplaySubclass.OTHER),
    DeviceType.INPUT: (PciClass.INPUT, InputSubclass.OTHER),
    DeviceType.SOUND: (PciClass.MULTIMEDIA, MultimediaSubclass.AUDIO),
}
DEFAULT_CLASS = (PciClass.OTHER, 0x00)


def _vendor_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """Body of a virtio_pci_cap after the 2-byte (id, next) header."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBBxxII", cap_len, cfg_type, BAR, 0, offset, length) + extra


class VirtioPciDevice(ConfiguredPciDevice):
    """A VirtioDevice behind the virtio-pci modern transport. See the module docstring."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, label: str | None = None,
                 pci_class: tuple[int, int] | None = None) -> None:
        dtype = int(device.device_type)
        class_code, subclass = pci_class or PCI_CLASSES.get(dtype, DEFAULT_CLASS)
        config = PciConfiguration(vendor_id=VIRTIO_PCI_VENDOR_ID,
                                  device_id=modern_pci_device_id(dtype),
                                  class_code=class_code, subclass=subclass, revision_id=1,
                                  subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
                                  subsystem_id=0x40)
        super().__init__(config, label or f"virtio-{device.name}")
        self.device = device
        self.mem = mem
        self.queues = [Queue(n) for n in device.queue_max_sizes]
        self.queue_evts = [EventFd() for _ in self.queues]
        config.add_bar(BAR, BAR_SIZE, BarKind.MEM64)
        for cfg_type, off, size, extra in (
            (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE, b""),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE, b""),
            (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, b""),
            (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_SIZE,
             struct.pack("<I", NOTIFY_OFF_MULTIPLIER)),
        ):
            config.add_capability(PCI_CAP_ID_VNDR, _vendor_cap(cfg_type, off, size, extra))
        # VIRTIO_PCI_CAP_PCI_CFG: bar (1 byte), offset, length and the data window are
        # guest-writable; accesses to the data window become BAR accesses.
        body = _vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4))
        wmask = bytearray(len(body))
        wmask[2] = 0xFF
        wmask[6:18] = b"\xff" * 12
        self._pci_cfg = config.add_capability(PCI_CAP_ID_VNDR, body, bytes(wmask),
                                              self._on_pci_cfg_write)
        self.msix = MsixConfig(len(self.queues) + 1, table_bar=BAR,
                               table_offset=MSIX_TABLE_OFFSET, pba_bar=BAR,
                               pba_offset=MSIX_PBA_OFFSET, label=self.debug_label())
        self.msix.add_capability(config)
        self.interrupt = VirtioInterrupt(msix=self.msix, on_needs_reset=self._needs_reset)
        self._reset_transport()

    def _reset_transport(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.active = False
        for q in self.queues:
            q.reset()

    # -- PciDevice ----------------------------------------------------------------------

    def assign_irq(self, intx: PciIntx) -> bool:
        super().assign_irq(intx)
        self.interrupt.intx = intx
        self.interrupt.resample = (intx.resample_evt.fileno(), intx.handle_resample)
        return True

    def ioevents(self) -> list[IoEventSpec]:
        return [IoEventSpec(BAR, NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i, evt)
                for i, evt in enumerate(self.queue_evts)]

    def keep_fds(self) -> list[int]:
        return super().keep_fds() + [e.fd for e in self.queue_evts] + [
            self.mem.fd, *self.device.keep_fds()]

    def on_device_sandboxed(self) -> None:
        self.device.on_device_sandboxed()

    def destroy(self) -> None:
        self.device.shutdown()

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar != BAR or size <= 0:
            return bytes(max(size, 0))
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            return self._common_image()[offset - COMMON_OFFSET:][:size].ljust(size, b"\0")
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_SIZE:
            return bytes([self.interrupt.read_isr()]).ljust(size, b"\0")
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            return self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
        return bytes(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar != BAR or not data:
            return
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset - COMMON_OFFSET, bytes(data))
        elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            self.device.write_config(offset - DEVICE_CFG_OFFSET, bytes(data))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
            index = (offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER
            if index < len(self.queue_evts):
                self.queue_evts[index].write(1)

    # -- VIRTIO_PCI_CAP_PCI_CFG -----------------------------------------------------------

    def _pci_cfg_window(self) -> tuple[int, int, int]:
        base = self._pci_cfg
        bar = self.config.get_u8(base + 4)
        offset = self.config.get_u32(base + 8)
        length = self.config.get_u32(base + 12)
        return bar, offset, length

    def _on_pci_cfg_write(self, cap_offset: int, rel_offset: int) -> None:
        if rel_offset < 16:
            return
        bar, offset, length = self._pci_cfg_window()
        if length in (1, 2, 4):
            data = self.config.get_u32(cap_offset + 16).to_bytes(4, "little")[:length]
            self.write_bar(bar, offset, data)

    def read_config_register(self, reg_idx: int) -> int:
        if reg_idx == (self._pci_cfg + 16) // 4:
            bar, offset, length = self._pci_cfg_window()
            if length in (1, 2, 4):
                return int.from_bytes(self.read_bar(bar, offset, length), "little")
        return super().read_config_register(reg_idx)

    # -- common configuration ---------------------------------------------------------------

    def offered_features(self) -> int:
        return self.device.features() | TRANSPORT_FEATURES

    def _selected(self) -> Queue | None:
        sel = self.queue_select
        return self.queues[sel] if sel < len(self.queues) else None

    def _device_status(self) -> int:
        return self.status | (DEVICE_NEEDS_RESET if self.interrupt.needs_reset else 0)

    def _common_image(self) -> bytes:
        q = self._selected()
        sel = self.device_feature_select
        dfeat = (self.offered_features() >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        gsel = self.driver_feature_select
        gfeat = (self.driver_features >> (32 * gsel)) & 0xFFFF_FFFF if gsel < 2 else 0
        return _COMMON.pack(
            sel, dfeat, gsel, gfeat, self.interrupt.config_vector, len(self.queues),
            self._device_status(), self.device.config_generation & 0xFF, self.queue_select,
            q.size if q else 0, q.vector if q else VIRTIO_MSI_NO_VECTOR,
            int(q.ready) if q else 0, self.queue_select if q else 0,
            q.desc_table if q else 0, q.avail_ring if q else 0, q.used_ring if q else 0)

    def _common_write(self, offset: int, data: bytes) -> None:
        image = bytearray(self._common_image())
        end = min(offset + len(data), COMMON_SIZE)
        image[offset:end] = data[:end - offset]
        values = _COMMON.unpack(image)
        for field_index, (lo, hi) in enumerate(_FIELD_SPANS):
            if lo < end and offset < hi:
                self._set_field(field_index, values[field_index])

    def _set_field(self, field_index: int, value: int) -> None:
        q = self._selected()
        queue_writable = q is not None and not q.ready and not self.active
        if field_index == _DFSEL:
            self.device_feature_select = value
        elif field_index == _GFSEL:
            self.driver_feature_select = value
        elif field_index == _GF:
            sel = self.driver_feature_select
            if sel < 2 and not self.status & FEATURES_OK:
                mask = 0xFFFF_FFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif field_index == _MSIX_CFG:
            self.interrupt.config_vector = self._vector(value)
        elif field_index == _STATUS:
            self._set_status(value)
        elif field_index == _QSEL:
            self.queue_select = value
        elif field_index == _QSIZE and queue_writable:
            q.size = value
        elif field_index == _QMSIX and q is not None:
            q.vector = self._vector(value)
        elif field_index == _QENABLE and queue_writable and value == 1:
            q.ready = True
        elif field_index == _QDESC and queue_writable:
            q.desc_table = value
        elif field_index == _QDRIVER and queue_writable:
            q.avail_ring = value
        elif field_index == _QDEVICE and queue_writable:
            q.used_ring = value

    def _vector(self, value: int) -> int:
        """A guest-chosen MSI-X vector; one we do not have reads back as NO_VECTOR."""
        return value if value < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR

    def _set_status(self, value: int) -> None:
        value &= 0xFF & ~DEVICE_NEEDS_RESET
        if value == 0:
            self.reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            unoffered = self.driver_features & ~self.offered_features()
            if unoffered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                log.warning("%s: driver features %#x rejected (unoffered %#x, VERSION_1 %s)",
                            self.debug_label(), self.driver_features, unoffered,
                            bool(self.driver_features >> VIRTIO_F_VERSION_1 & 1))
                value &= ~FEATURES_OK
            else:
                self.device.ack_features(self.driver_features)
        self.status = value
        if value & DRIVER_OK and value & FEATURES_OK and not self.active:
            self._activate()

    def _activate(self) -> None:
        try:
            prepare_queues(self.mem, self.driver_features, self.queues)
        except VirtqueueError as e:
            self.interrupt.set_needs_reset(f"queue set-up: {e}")
            return
        self.active = True
        try:
            self.device.activate(self.mem, self.interrupt, self.queues, self.queue_evts)
        except Exception as e:  # a plugin bug must not take the vCPU thread down
            log.exception("%s: activate failed", self.debug_label())
            self.interrupt.set_needs_reset(f"activate failed: {e!r}")

    def _needs_reset(self, reason: str) -> None:
        log.error("%s: DEVICE_NEEDS_RESET: %s", self.debug_label(), reason)

    def reset(self) -> None:
        """The driver wrote 0 to device_status (virtio 1.2, 2.4)."""
        if not self.device.reset():
            log.warning("%s: device did not stop cleanly on reset", self.debug_label())
        self.interrupt.reset()
        self._reset_transport()
