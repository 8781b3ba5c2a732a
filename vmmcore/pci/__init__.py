"""PCI: bus 0 with its host bridge (PciRoot), configuration space, BARs, MSI-X, INTx.

See root.py for how configuration access and BAR mappings work, device.py for the
PciDevice interface a device implements, and irq.py for the KVM-facing interfaces.
"""

from vmmcore.pci.config_space import (
    BarKind,
    BarRange,
    BridgeSubclass,
    DisplaySubclass,
    MassStorageSubclass,
    MultimediaSubclass,
    NetworkSubclass,
    OtherSubclass,
    PciBar,
    PciClass,
    PciConfiguration,
)
from vmmcore.pci.device import (
    ConfiguredPciDevice,
    ConfigWriteResult,
    IoEventSpec,
    PciAddress,
    PciDevice,
)
from vmmcore.pci.intx import PciIntx, intx_gsi, prt_entries
from vmmcore.pci.irq import IoEventRegistrar, IrqRouter, KvmIrqRouter
from vmmcore.pci.msix import MsixConfig
from vmmcore.pci.root import PciConfigIo, PciConfigMmio, PciRoot, build_pci_root

__all__ = [
    "BarKind", "BarRange", "BridgeSubclass", "DisplaySubclass", "MassStorageSubclass",
    "MultimediaSubclass", "NetworkSubclass", "OtherSubclass", "PciBar", "PciClass",
    "PciConfiguration", "ConfiguredPciDevice", "ConfigWriteResult", "IoEventSpec",
    "PciAddress", "PciDevice", "PciIntx", "intx_gsi", "prt_entries", "IoEventRegistrar",
    "IrqRouter", "KvmIrqRouter", "MsixConfig", "PciConfigIo", "PciConfigMmio", "PciRoot",
    "build_pci_root",
]
