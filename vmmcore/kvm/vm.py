"""Vm: one KVM virtual machine (memory slots, irqchip, PIT, eventfds, GSI routing)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmmcore.eventfd import EventFd
from vmmcore.kvm.stats import KvmStats, StatsSlot
from vmmcore.kvm.sys import check, ffi, ioctl_ptr, ioctl_val, lib
from vmmcore.kvm.vcpu import Vcpu


@dataclass(frozen=True)
class IrqRoute:
    """One GSI routing entry: to an irqchip pin, or an MSI message."""

    gsi: int
    irqchip: int | None = None
    pin: int = 0
    msi_address: int = 0
    msi_data: int = 0

    @classmethod
    def msi(cls, gsi: int, address: int, data: int) -> IrqRoute:
        return cls(gsi=gsi, msi_address=address, msi_data=data)


def default_irq_routes() -> list[IrqRoute]:
    """KVM's default routing after KVM_CREATE_IRQCHIP, which SET_GSI_ROUTING replaces.

    GSIs 0-15 go to the PICs and the IOAPIC (IRQ 0 on IOAPIC pin 2, as the MADT's
    interrupt source override says), 16-23 to the IOAPIC alone.
    """
    routes: list[IrqRoute] = []
    for gsi in range(16):
        chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
        routes.append(IrqRoute(gsi, chip, gsi % 8))
    for gsi in range(24):
        if gsi == 2:
            continue
        routes.append(IrqRoute(gsi, lib.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    return routes


class Vm:
    """A VM fd and the operations the core needs on it."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self._next_slot = 0
        self._stats = StatsSlot(lambda: KvmStats(self.fd, "VM"))

    # -- memory --------------------------------------------------------------------

    def add_memory_region(self, guest_addr: int, size: int, host_addr: int,
                          readonly: bool = False) -> int:
        """Map host memory into the guest in a new slot; returns the slot number."""
        slot = self._next_slot
        self.set_user_memory_region(slot, guest_addr, size, host_addr, readonly)
        self._next_slot += 1
        return slot

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int,
                               readonly: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION (size 0 deletes the slot)."""
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = lib.KVM_MEM_READONLY if readonly else 0
        region.guest_phys_addr = guest_addr
        region.memory_size = size
        region.userspace_addr = host_addr
        ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region,
                  f"KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_addr:#x}+{size:#x}")

    def set_tss_addr(self, addr: int) -> None:
        ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("uint64_t *", addr)
        ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    # -- interrupt controllers -----------------------------------------------------------

    def create_irqchip(self) -> None:
        """The in-kernel PIC, IOAPIC and per-vCPU LAPICs (before any vCPU exists)."""
        ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """The in-kernel i8254 PIT, with port 0x61 (speaker) handled as a dummy."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def set_irq_line(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: drive an irqchip input (GSI) high or low."""
        line = ffi.new("struct kvm_irq_level *")
        line.irq = irq
        line.level = int(level)
        ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, line, f"KVM_IRQ_LINE {irq}")

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table."""
        n = len(routes)
        arrays = [ffi.new("uint32_t[]", max(n, 1)) for _ in range(5)]
        gsi, kind, a, b, c = arrays
        for i, r in enumerate(routes):
            gsi[i] = r.gsi
            if r.irqchip is not None:
                kind[i], a[i], b[i] = lib.KVM_IRQ_ROUTING_IRQCHIP, r.irqchip, r.pin
            else:
                kind[i] = lib.KVM_IRQ_ROUTING_MSI
                a[i], b[i], c[i] = r.msi_address & 0xFFFFFFFF, r.msi_address >> 32, r.msi_data
        check(lib.vmm_set_irq_routing(self.fd, n, gsi, kind, a, b, c), "KVM_SET_GSI_ROUTING")

    # -- eventfds ------------------------------------------------------------------

    def register_irqfd(self, evt: EventFd, gsi: int, resample: EventFd | None = None) -> None:
        """Writes to evt raise GSI gsi without a trip through userspace.

        With resample (level-triggered INTx), KVM de-asserts the line at EOI and signals
        resample, so the device can re-assert it if it is still pending.
        """
        self._irqfd(evt, gsi, resample, 0)

    def unregister_irqfd(self, evt: EventFd, gsi: int) -> None:
        self._irqfd(evt, gsi, None, lib.KVM_IRQFD_FLAG_DEASSIGN)

    def _irqfd(self, evt: EventFd, gsi: int, resample: EventFd | None, flags: int) -> None:
        irqfd = ffi.new("struct kvm_irqfd *")
        irqfd.fd = evt.fd
        irqfd.gsi = gsi
        irqfd.flags = flags
        if resample is not None:
            irqfd.flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
            irqfd.resamplefd = resample.fd
        ioctl_ptr(self.fd, lib.KVM_IRQFD, irqfd, f"KVM_IRQFD gsi {gsi}")

    def register_ioeventfd(self, evt: EventFd, addr: int, length: int = 0, *,
                           datamatch: int | None = None, pio: bool = False) -> None:
        """Guest writes to addr signal evt inside KVM, without a VM exit to userspace."""
        self._ioeventfd(evt, addr, length, datamatch, pio, 0)

    def unregister_ioeventfd(self, evt: EventFd, addr: int, length: int = 0, *,
                             datamatch: int | None = None, pio: bool = False) -> None:
        self._ioeventfd(evt, addr, length, datamatch, pio, lib.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def _ioeventfd(self, evt: EventFd, addr: int, length: int, datamatch: int | None,
                   pio: bool, flags: int) -> None:
        ioevent = ffi.new("struct kvm_ioeventfd *")
        ioevent.addr = addr
        ioevent.len = length
        ioevent.fd = evt.fd
        ioevent.flags = flags | (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            ioevent.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            ioevent.datamatch = datamatch
        ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, ioevent, f"KVM_IOEVENTFD at {addr:#x}")

    # -- vCPUs -----------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU {vcpu_id}")
        return Vcpu(vcpu_id, fd, self.vcpu_mmap_size)

    def stats(self) -> KvmStats:
        """KVM's statistics for this VM (opened with it, closed with it)."""
        return self._stats.get()

    def close(self) -> None:
        self._stats.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
