"""The pluggy hook specifications: the lifecycle part of the plugin API, in one place.

Two ways to extend vmm, both found through entry points (see docs/plugins.md):

* named drivers -- a device, disk format or display -- declare a
  :class:`vmmcore.plugin_api.PluginSpec` in the groups ``vmm.devices``,
  ``vmm.disk_formats`` or ``vmm.displays``;
* hook implementations -- code that takes part in the VM's lifecycle -- are modules (or
  objects) in the entry-point group ``vmm`` whose functions are marked with
  :data:`hookimpl` and named after the specifications below.  Such a module must also
  set ``VMM_API_VERSION = "MAJOR.MINOR"`` (the version of this API it was written
  against, see :data:`vmmcore.plugin_api.API_VERSION`); one without it, or with an
  incompatible one, is listed as broken and not called.

Every hook is called by the core with keyword arguments; an implementation may accept
any subset of them (pluggy matches by name).  The order of calls for one VM:

    vmm_cli_options            when `vmm run` builds its options (not called yet)
    vmm_configure              after the command line is parsed and validated
    vmm_kernel_cmdline         while the kernel command line is assembled
    vmm_vm_created             guest memory and the address allocator exist, no device yet
    vmm_devices_created        every device exists and is on its bus, no vCPU runs yet
    vmm_vm_started             the vCPUs run
    vmm_device_failed          a device process died (any time after start)
    vmm_vm_stopped             the vCPUs have stopped, before devices are torn down

Hooks that return values are collected in a list (one entry per implementation that did
not return None).  An exception from a hook stops the VM with a one-line error naming
the plugin; raise :class:`vmmcore.errors.ConfigError` from vmm_configure for bad input
(exit status 2).

Changing this file: adding a hook or an optional argument is a minor API change (bump
the minor of plugin_api.API_VERSION); removing or renaming is a major one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vmmcore.config import DeviceConfig, VmConfig

PROJECT = "vmm"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Mark a function as a hook implementation: ``@hookimpl def vmm_configure(config): ...``
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vmm_cli_options(command: str) -> list[Any]:
    """Return extra click options (``click.Option`` objects) for the command ``command``.

    Called for ``command="run"`` when `vmm run` is invoked (never for `vmm --help`); the
    values land in ``VmConfig.plugin_options`` under each option's name, where the
    plugin's vmm_configure and later hooks read them. An option whose name clashes with
    an existing one is skipped with a warning. For device settings, use the device's
    option schema (``--device NAME:key=value``) instead.
    """


@hookspec
def vmm_configure(config: VmConfig) -> None:
    """Inspect or adjust the validated VmConfig before anything is created.

    ``config.devices`` holds the validated DeviceConfig of every selected device.  Raise
    ConfigError (one line) to refuse the configuration: the CLI exits with status 2.
    """


@hookspec
def vmm_kernel_cmdline(config: VmConfig) -> list[str]:
    """Return kernel command-line parameters to append (e.g. ``["root=/dev/vda"]``)."""


@hookspec
def vmm_vm_created(vm: Any, memory: Any, allocator: Any) -> None:
    """The VM, its GuestMemory and its SystemAllocator exist; no device has been created.

    A plugin may reserve guest addresses from ``allocator`` here.
    """


@hookspec
def vmm_devices_created(vm: Any, devices: list[tuple[DeviceConfig, Any]]) -> None:
    """Every device has been created and placed on its bus; no vCPU has run yet.

    ``devices`` pairs each DeviceConfig with the device object its factory returned
    (a ProxyDevice when the device runs sandboxed).
    """


@hookspec
def vmm_vm_started(vm: Any) -> None:
    """The vCPU threads have started."""


@hookspec
def vmm_device_failed(vm: Any, device: str, reason: str) -> None:
    """A device process died; ``reason`` is one line (for SIGSYS it names the syscall)."""


@hookspec
def vmm_vm_stopped(vm: Any, exit_status: int) -> None:
    """The vCPUs have stopped (``exit_status`` as `vmm run` will return); devices still exist."""


__all__ = ["PROJECT", "hookimpl", "hookspec"]
