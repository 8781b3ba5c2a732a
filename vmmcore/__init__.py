"""vmmcore: the core of vmm, a KVM virtual machine monitor modelled on crosvm.

Nothing device-specific lives here; devices, disk formats and displays are plugins.
"""

__version__ = "0.1.0"
