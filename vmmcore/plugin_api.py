"""The public plugin API: what a plugin imports to describe itself to the core.

A plugin distribution points an entry point in one of the groups ``vmm.devices``,
``vmm.disk_formats`` or ``vmm.displays`` at a :class:`PluginSpec`::

    # pyproject.toml
    [project.entry-points."vmm.devices"]
    virtio_rng = "vmm_virtio_rng.plugin:PLUGIN"

    # vmm_virtio_rng/plugin.py
    from vmmcore.plugin_api import API_VERSION, PluginSpec, Bool, Int, Path

    PLUGIN = PluginSpec(
        name="virtio_rng",
        kind="device",
        api_version="1.0",
        summary="virtio entropy device fed from a host random source",
        options=(Path("source", default="/dev/urandom", must_exist=True, help="..."),),
        policy="virtio_rng.policy",
        factory="vmm_virtio_rng.device:create",
    )

The module holding the spec must import nothing heavy: ``vmm plugins list`` imports it to
read the metadata.  The device model itself is named by ``factory`` ("module:attribute")
and imported only when a VM is built.  A spec whose ``factory`` is None describes a
device whose model does not exist yet: it is listed, its options are validated, and
selecting it stops with "not implemented yet".

This module deliberately imports only the standard library, so that reading a plugin's
metadata costs no more than importing the plugin's spec module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path as _FsPath
from typing import Any

#: The version of the plugin API this core provides, "MAJOR.MINOR".  A plugin states the
#: version it was written against; it loads when the majors are equal and its minor is
#: not newer than the core's.  Additions bump the minor; removals or changes, the major.
#: 1.2: DiskFile.file_extent() / FileExtent; VirtioInterrupt.queue_irqfd() and
#: add_route_listener() (a device's native data plane may signal irqfds itself).
#: 1.3: a sandbox_binds entry may be a (path, writable) pair (read-only binds).
#: 1.4: PluginSpec.sandbox_policies (further policy files for some option values).
#: 1.5: VirtioDevice/PciDevice.on_device_sandboxed(), called where the device runs
#: once its jail is closed; its exception is a start-up error naming the device.
#: 1.6: the sandbox_binds and sandbox_preload of a plugin a device uses (policy_with: its
#: disk formats, its display) join that device's jail.
API_VERSION = "1.6"

#: The plugin kinds, and the entry-point group each is discovered in.
KIND_GROUPS: dict[str, str] = {
    "device": "vmm.devices",
    "disk_format": "vmm.disk_formats",
    "display": "vmm.displays",
}
#: The pluggy hook-implementation group (see vmmcore.hookspecs).
HOOK_GROUP = "vmm"

OPTION_TYPES = ("bool", "int", "size", "str", "path", "enum")

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

class OptionValueError(ValueError):
    """A value that does not fit an option; the message says what was expected."""


def parse_api_version(text: str) -> tuple[int, int]:
    """ "1.0" -> (1, 0); raises ValueError for anything else."""
    m = re.fullmatch(r"(\d+)\.(\d+)", str(text).strip())
    if not m:
        raise ValueError(f"API version {text!r} is not MAJOR.MINOR")
    return int(m.group(1)), int(m.group(2))


def api_compatible(wanted: str, provided: str = API_VERSION) -> bool:
    """True when a plugin written for API ``wanted`` runs on a core providing ``provided``."""
    w_major, w_minor = parse_api_version(wanted)
    p_major, p_minor = parse_api_version(provided)
    return w_major == p_major and w_minor <= p_minor


def format_size(n: int) -> str:
    """4096 -> "4K", 1536 -> "1536": the largest exact binary unit."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


@dataclass(frozen=True)
class Option:
    """One key of a plugin's option schema.

    ``type`` is one of bool, int, size, str, path, enum.  ``default`` is used when the
    key is not given (and must itself be valid); ``required=True`` means there is no
    default and the user must give the key.  ``min``/``max`` bound int and size
    values; ``choices`` lists the values of an enum; ``must_exist`` makes a path option
    fail validation when the path does not exist.  Use the helpers Bool, Int, Size,
    Str, Path and Enum rather than building an Option by hand.
    """

    name: str
    type: str
    default: Any = None
    help: str = ""
    required: bool = False
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] = ()
    must_exist: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"option name {self.name!r} must match {_NAME_RE.pattern}")
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name}: type {self.type!r} is not one of "
                             f"{', '.join(OPTION_TYPES)}")
        if self.type == "enum" and not self.choices:
            raise ValueError(f"option {self.name}: an enum needs choices")
        if self.required and self.default is not None:
            raise ValueError(f"option {self.name}: a required option has no default")
        if self.default is not None:
            # A default must pass its own validation (except path existence, which is
            # the user's machine's business and is checked when the value is used).
            self._check(self.default, check_exists=False)

    @property
    def expected(self) -> str:
        """What a valid value looks like, for error messages and `vmm plugins info`."""
        if self.type == "bool":
            return "a bool (true/false/1/0/yes/no)"
        if self.type in ("int", "size"):
            what = "an int" if self.type == "int" else "a size (bytes, or with K/M/G/T suffix)"
            lo = format_size(self.min) if self.type == "size" and self.min is not None else self.min
            hi = format_size(self.max) if self.type == "size" and self.max is not None else self.max
            if self.min is not None and self.max is not None:
                return f"{what} from {lo} to {hi}"
            if self.min is not None:
                return f"{what} >= {lo}"
            if self.max is not None:
                return f"{what} <= {hi}"
            return what
        if self.type == "enum":
            return "one of " + ", ".join(self.choices)
        if self.type == "path":
            return "an existing path" if self.must_exist else "a path"
        return "a string"

    def parse(self, text: str) -> Any:
        """Convert the text given on the command line; raise OptionValueError if invalid."""
        t = self.type
        raw = text.strip()
        if t == "bool":
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise OptionValueError(self.expected)
        if t == "int":
            try:
                value: Any = int(raw, 0) if raw.lower().startswith(("0x", "0o", "0b")) else int(raw)
            except ValueError:
                raise OptionValueError(self.expected) from None
            return self._check(value)
        if t == "size":
            m = _SIZE_RE.match(raw)
            if not m:
                raise OptionValueError(self.expected)
            return self._check(int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
        if t == "enum":
            if raw not in self.choices:
                raise OptionValueError(self.expected)
            return raw
        if t == "path":
            if not raw:
                raise OptionValueError(self.expected)
            return self._check(_FsPath(os.path.expanduser(raw)))
        return text

    def _check(self, value: Any, check_exists: bool = True) -> Any:
        t = self.type
        if t == "bool" and not isinstance(value, bool):
            raise ValueError(f"option {self.name}: default {value!r} is not a bool")
        if t in ("int", "size"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionValueError(self.expected)
            if (self.min is not None and value < self.min) or (
                    self.max is not None and value > self.max):
                raise OptionValueError(self.expected)
        if t == "enum" and value not in self.choices:
            raise OptionValueError(self.expected)
        if t == "path":
            value = _FsPath(value)
            if check_exists and self.must_exist and not value.exists():
                raise OptionValueError(f"{self.expected}; {value} does not exist")
        if t == "str" and not isinstance(value, str):
            raise OptionValueError(self.expected)
        return value

    def default_value(self) -> Any:
        """The value used when the key is absent (paths as pathlib.Path)."""
        if self.default is None:
            return None
        return _FsPath(self.default) if self.type == "path" else self.default

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for `vmm plugins info --json` and docs)."""
        d: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required,
                             "default": None if self.default is None else (
                                 str(self.default) if self.type == "path" else self.default),
                             "help": self.help, "expected": self.expected}
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        if self.choices:
            d["choices"] = list(self.choices)
        if self.type == "path":
            d["must_exist"] = self.must_exist
        return d


def Bool(name: str, default: bool | None = False, help: str = "") -> Option:  # noqa: N802
    """A bool option: true/false/1/0/yes/no; a bare key (``ro``) also means true."""
    return Option(name, "bool", default=default, help=help)


def Int(name: str, default: int | None = None, help: str = "", *,  # noqa: N802
        min: int | None = None, max: int | None = None, required: bool = False) -> Option:
    """An integer option (decimal, or 0x/0o/0b prefixed) bounded by min and max."""
    return Option(name, "int", default=default, help=help, min=min, max=max, required=required)


def Size(name: str, default: int | None = None, help: str = "", *,  # noqa: N802
         min: int | None = None, max: int | None = None, required: bool = False) -> Option:
    """A size in bytes; accepts K, M, G and T suffixes (binary: 1K = 1024)."""
    return Option(name, "size", default=default, help=help, min=min, max=max,
                  required=required)


def Str(name: str, default: str | None = None, help: str = "", *,  # noqa: N802
        required: bool = False) -> Option:
    """A free-form string option."""
    return Option(name, "str", default=default, help=help, required=required)


def Path(name: str, default: str | None = None, help: str = "", *,  # noqa: N802
         must_exist: bool = False, required: bool = False) -> Option:
    """A host path (``~`` expanded); with must_exist, it must exist when validated."""
    return Option(name, "path", default=default, help=help, must_exist=must_exist,
                  required=required)


def Enum(name: str, choices: tuple[str, ...] | list[str], default: str | None = None,  # noqa: N802
         help: str = "", *, required: bool = False) -> Option:
    """One of a fixed set of strings."""
    return Option(name, "enum", default=default, help=help, choices=tuple(choices),
                  required=required)


@dataclass(frozen=True)
class PluginSpec:
    """Everything the core needs to know about a device, disk format or display plugin.

    name         the name users type (``--device NAME:...``); lower case, ``_`` separated;
                 equal to the entry point's name
    kind         "device", "disk_format" or "display"; must match the entry-point group
    api_version  the plugin API version the plugin was written against ("MAJOR.MINOR")
    summary      one line for `vmm plugins list`
    options      the option schema: a tuple of Option
    policy       the seccomp policy file (crosvm syntax), relative to the plugin's package
                 directory; the sandbox compiles it with the core's common policy
    factory      "module:attribute" of the callable that builds the device model, imported
                 only when a VM is built; None while the model is not implemented yet
    validate     optional callable(options: dict) -> None raising ValueError for checks
                 across keys (the message becomes the one-line error)
    positional   the option that a leading bare value fills, as in crosvm's
                 ``--block /path,ro`` (path) — None when there is none
    magic        disk formats only: the bytes at offset 0 that identify the format
    policy_with  (API 1.1) plugin kinds whose plugins' policies are compiled into this
                 device's filter, because their code runs in its process
                 (virtio_blk: ("disk_format",); virtio_gpu: ("display",)): those its
                 factory opened through vmmcore.disk.open_disk / vmmcore.display.
                 open_display, or every installed one of a kind it opened none of
    sandbox_binds (API 1.1) callable(options) -> host paths the device process reaches
                 after the jail closes (e.g. a Wayland socket it connects to later);
                 each is bind-mounted at the same path inside the jail, read-write;
                 (API 1.3) an entry (path, False) is bound read-only (libraries, data)
    sandbox_preload (API 1.1) modules the device imports lazily, imported before the jail
                 closes (afterwards there is no file system to import from)
    sandbox_policies (API 1.4) callable(options) -> further policy files (relative to the
                 package directory, like ``policy``) compiled into this device's filter
                 for these options only, so that what one mode needs does not widen the
                 others (virtio_gpu: Mesa's executable mappings for backend=virglrenderer)

    (API 1.6) A disk format or display declares sandbox_binds and sandbox_preload too:
    they join the jail of a device whose factory opened it (policy_with, as its policy
    does), called with that device's options (display=window: the X11 socket, SDL's
    libraries), and no other device's.
    """

    name: str
    kind: str
    api_version: str
    summary: str
    options: tuple[Option, ...] = ()
    policy: str | None = None
    factory: str | None = None
    validate: Callable[[dict[str, Any]], None] | None = None
    positional: str | None = None
    magic: bytes | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    policy_with: tuple[str, ...] = ()
    sandbox_binds: Callable[[dict[str, Any]], list[str | tuple[str, bool]]] | None = None
    sandbox_preload: tuple[str, ...] = ()
    sandbox_policies: Callable[[dict[str, Any]], list[str]] | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"plugin name {self.name!r} must match {_NAME_RE.pattern}")
        if self.kind not in KIND_GROUPS:
            raise ValueError(f"plugin {self.name}: kind {self.kind!r} is not one of "
                             f"{', '.join(KIND_GROUPS)}")
        parse_api_version(self.api_version)
        names = [o.name for o in self.options]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"plugin {self.name}: option(s) declared twice: {', '.join(dupes)}")
        if self.positional is not None and self.positional not in names:
            raise ValueError(f"plugin {self.name}: positional option {self.positional!r} "
                             "is not in its options")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"plugin {self.name}: factory {self.factory!r} is not "
                             "'module:attribute'")

    @property
    def implemented(self) -> bool:
        return self.factory is not None

    def option(self, name: str) -> Option | None:
        for o in self.options:
            if o.name == name:
                return o
        return None


@dataclass(frozen=True)
class DeviceContext:
    """What the core tells a device factory besides its options.

    A device factory is ``factory(options: dict, ctx: DeviceContext)`` and returns a
    vmmcore.virtio.VirtioDevice (the core wraps it in the virtio-pci transport) or a
    vmmcore.pci.PciDevice. Factories run before the VM starts, in the main process: open
    files and sockets there; the sandbox hands them to the device process.
    """

    name: str                   # unique instance label, e.g. "virtio_blk1"
    index: int                  # position among this plugin's devices on the command line
    mem_size: int               # guest RAM in bytes
    #: API 1.1: the VmMemoryRequest channel (vmmcore.vm_control) through which a device
    #: maps host memory (a memfd) into the guest at an allocator address; in a sandboxed
    #: device process it is replaced by a client of the main process's controller.
    vm_memory: Any = None


def load_factory(spec: PluginSpec) -> Callable[..., Any]:
    """Import and return the spec's factory (only when a VM is actually built)."""
    if spec.factory is None:
        raise NotImplementedError(f"{spec.kind} {spec.name} is not implemented yet")
    import importlib

    module_name, _, attr = spec.factory.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def hookimpl(*args: Any, **kwargs: Any) -> Any:
    """The pluggy hook-implementation marker for project "vmm" (see vmmcore.hookspecs).

    Imported lazily so that a spec-only plugin does not pay for importing pluggy.
    """
    from vmmcore.hookspecs import hookimpl as _impl

    return _impl(*args, **kwargs)


__all__ = [
    "API_VERSION", "DeviceContext", "HOOK_GROUP", "KIND_GROUPS", "OPTION_TYPES", "Bool", "Enum", "Int",
    "Option", "OptionValueError", "Path", "PluginSpec", "Size", "Str", "api_compatible",
    "format_size", "hookimpl", "load_factory", "parse_api_version",
]
