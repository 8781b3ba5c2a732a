"""The KVM-facing side of PCI interrupts and doorbells, behind small interfaces.

PCI device models (MSI-X tables, INTx lines) and the PciRoot never call KVM directly:
they talk to an IrqRouter (GSI routes and irqfds) and an IoEventRegistrar (ioeventfds).
Tier-1 tests pass fakes; the VMM passes KvmIrqRouter and the Vm itself (whose
register_ioeventfd/unregister_ioeventfd already have the IoEventRegistrar shape). A
sandboxed device would get an IrqRouter that forwards requests over its socket to the
main process, which owns the Vm.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from vmmcore.eventfd import EventFd
from vmmcore.kvm.vm import IrqRoute


class IrqRouter(Protocol):
    """GSI routing and irqfd registration (KVM_SET_GSI_ROUTING, KVM_IRQFD)."""

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route gsi to the MSI message (address, data), replacing any route it had."""

    def remove_route(self, gsi: int) -> None:
        """Drop gsi's MSI route (writes to its irqfd then go nowhere)."""

    def register_irqfd(self, evt: EventFd, gsi: int, resample: EventFd | None = None) -> None:
        """Writes to evt raise gsi inside KVM; with resample, as a level interrupt."""

    def unregister_irqfd(self, evt: EventFd, gsi: int) -> None:
        """Undo register_irqfd."""


class IoEventRegistrar(Protocol):
    """KVM_IOEVENTFD: guest writes to an address signal an eventfd, no exit to us."""

    def register_ioeventfd(self, evt: EventFd, addr: int, length: int = 0, *,
                           datamatch: int | None = None, pio: bool = False) -> None: ...

    def unregister_ioeventfd(self, evt: EventFd, addr: int, length: int = 0, *,
                             datamatch: int | None = None, pio: bool = False) -> None: ...


class KvmIrqRouter:
    """IrqRouter over a Vm: keeps the full routing table and pushes it on every change.

    KVM_SET_GSI_ROUTING replaces the whole table, including the routes that
    KVM_CREATE_IRQCHIP set up for the PIC and IOAPIC, so the table pushed is always
    the irqchip defaults plus every MSI route. The vm argument is anything with
    set_gsi_routing/register_irqfd/unregister_irqfd (a vmmcore.kvm.Vm).
    """

    def __init__(self, vm: object,
                 base_routes: Callable[[], Sequence[IrqRoute]] | None = None) -> None:
        if base_routes is None:
            from vmmcore.kvm.vm import default_irq_routes
            base_routes = default_irq_routes
        self._vm = vm
        self._base = list(base_routes())
        self._msi: dict[int, IrqRoute] = {}
        self._lock = threading.Lock()
        base_gsis = {r.gsi for r in self._base}
        self._base_gsis = frozenset(base_gsis)

    def routes(self) -> list[IrqRoute]:
        """The table as last pushed (irqchip defaults first, then MSI routes by GSI)."""
        with self._lock:
            return self._table()

    def _table(self) -> list[IrqRoute]:
        return self._base + [self._msi[g] for g in sorted(self._msi)]

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        if gsi in self._base_gsis:
            # KVM refuses a GSI routed both to an irqchip pin and to an MSI.
            raise ValueError(f"GSI {gsi} is an irqchip GSI and cannot carry an MSI route")
        route = IrqRoute.msi(gsi, address, data)
        with self._lock:
            if self._msi.get(gsi) == route:
                return
            self._msi[gsi] = route
            self._vm.set_gsi_routing(self._table())  # type: ignore[attr-defined]

    def remove_route(self, gsi: int) -> None:
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._vm.set_gsi_routing(self._table())  # type: ignore[attr-defined]

    def register_irqfd(self, evt: EventFd, gsi: int, resample: EventFd | None = None) -> None:
        self._vm.register_irqfd(evt, gsi, resample)  # type: ignore[attr-defined]

    def unregister_irqfd(self, evt: EventFd, gsi: int) -> None:
        self._vm.unregister_irqfd(evt, gsi)  # type: ignore[attr-defined]
