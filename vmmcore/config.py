"""VmConfig: everything `vmm run` was asked for, validated before anything starts.

The CLI only builds one of these; the VM builder only reads one. Keeping the two apart
means a bad option is rejected (exit status 2) before a single fd or thread exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmcore.errors import ConfigError

MAX_VCPUS = 64
MAX_DEVICES = 31            # PCI bus 0's device numbers 1-31 (0 is the host bridge)
MIN_MEM_MIB = 16


@dataclass
class DeviceConfig:
    """One --device NAME:key=value,... after validation against the plugin's schema."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class VmConfig:
    """The validated configuration of one VM."""

    kernel: Path | None = None          # None: boot the built-in demo guest
    initrd: Path | None = None
    params: list[str] = field(default_factory=list)
    cpus: int = 1
    mem_mib: int = 256
    serial: list[str] = field(default_factory=list)   # crosvm-style --serial specs
    devices: list[DeviceConfig] = field(default_factory=list)
    disable_sandbox: bool = False
    seccomp_log_failures: bool = False
    socket: Path | None = None
    kvm_device: Path = Path("/dev/kvm")
    plugin_options: dict[str, Any] = field(default_factory=dict)   # vmm_cli_options values

    def validate(self) -> None:
        """Raise ConfigError with one clear line for anything that cannot work."""
        if not 1 <= self.cpus <= MAX_VCPUS:
            raise ConfigError(f"--cpus must be between 1 and {MAX_VCPUS}, not {self.cpus}")
        if self.mem_mib < MIN_MEM_MIB:
            raise ConfigError(f"--mem must be at least {MIN_MEM_MIB} MiB, not {self.mem_mib}")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{what} {path}: no such file")
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("--initrd needs a kernel")
        if len(self.devices) > MAX_DEVICES:
            raise ConfigError(f"{len(self.devices)} devices: PCI bus 0 holds at most "
                              f"{MAX_DEVICES}")
        from vmmcore.devices.serial_backends import validate_serial_specs

        validate_serial_specs(self.serial)

    @property
    def cmdline(self) -> str:
        """The kernel command line: every -p joined with spaces, as crosvm does."""
        return " ".join(p for p in self.params if p)
