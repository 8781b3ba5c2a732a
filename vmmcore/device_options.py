"""`vmm run` device options: ``--device NAME:key=value,...`` and crosvm's spellings.

The spellings and what they mean::

    --device NAME[:key=value,...]     any installed device plugin
    --gpu key=value,...               --device virtio_gpu:key=value,...
    --block [PATH,]key=value,...      --device virtio_blk:path=PATH,key=value,...
    --disk PATH[,key=value,...]       --device virtio_blk:path=PATH,ro=true,...
    --rwdisk PATH[,key=value,...]     --device virtio_blk:path=PATH,ro=false,...
    --display-window-keyboard         window_keyboard=true on every GPU
    --display-window-mouse            window_mouse=true on every GPU

Values may be double-quoted to hold commas (``path="a,b.img"``); a bare key of a bool
option means true (``--block disk.img,ro``).  Devices keep their command-line order
across all the spellings (the first disk is /dev/vda, as in crosvm).

Everything is validated against the plugins' option schemas before the VM exists;
each problem is one ConfigError line (the CLI prints it and exits with status 2).

For `vmm run`::

    @device_options
    def run(..., device_args: DeviceArgs) -> None:
        ...
        config.devices = collect_devices(device_args)

This module imports only click and the standard library at import time, so that
`vmm --help` stays fast; the registry is imported when devices are collected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from vmmcore.config import DeviceConfig
from vmmcore.errors import ConfigError

if TYPE_CHECKING:
    from vmmcore.registry import Registry

GPU_DEVICE = "virtio_gpu"
BLOCK_DEVICE = "virtio_blk"

#: click parameter name -> the flag users type (for messages)
_VALUE_FLAGS = {"device": "--device", "gpu": "--gpu", "block": "--block", "disk": "--disk",
                "rwdisk": "--rwdisk"}
_ORDER_KEY = "vmm.device_order"


@dataclass
class DeviceArgs:
    """The raw device options of one `vmm run`, in command-line order."""

    items: list[tuple[str, str]] = field(default_factory=list)   # (flag, text)
    window_keyboard: bool = False
    window_mouse: bool = False


class _OrderedOption(click.Option):
    """A multiple option that also records each occurrence in command-line order.

    click gives each option its own tuple of values, which loses the interleaving of
    --disk, --rwdisk, --block and --device; device order is guest-visible (vda, vdb...).
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        table = {**getattr(parser, "_long_opt", {}), **getattr(parser, "_short_opt", {})}
        for opt in self.opts:
            popt = table.get(opt)
            if popt is None or not hasattr(popt, "process"):
                continue
            original = popt.process
            name = self.name

            def process(value: Any, state: Any, _orig: Callable[..., Any] = original,
                        _name: str | None = name) -> None:
                ctx.meta.setdefault(_ORDER_KEY, []).append((_name, value))
                _orig(value, state)

            popt.process = process


def device_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the device options to a click command; the command receives ``device_args``."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: tuple(kwargs.pop(name, ()) or ()) for name in _VALUE_FLAGS}
        keyboard = bool(kwargs.pop("display_window_keyboard", False))
        mouse = bool(kwargs.pop("display_window_mouse", False))
        ctx = click.get_current_context(silent=True)
        recorded = list(ctx.meta.get(_ORDER_KEY, ())) if ctx is not None else []
        if sorted(recorded) != sorted((n, v) for n, vs in values.items() for v in vs):
            # click internals changed: fall back to one flag after another
            recorded = [(n, v) for n, vs in values.items() for v in vs]
        items = [(_VALUE_FLAGS[n], v) for n, v in recorded]
        return f(*args, device_args=DeviceArgs(items, keyboard, mouse), **kwargs)

    opts = [
        click.option("--device", "device", multiple=True, cls=_OrderedOption,
                     metavar="NAME[:KEY=VALUE,...]",
                     help="Add a device from an installed plugin (see `vmm plugins list`, "
                          "`vmm plugins info NAME`); repeatable."),
        click.option("--gpu", "gpu", multiple=True, cls=_OrderedOption,
                     metavar="KEY=VALUE,...",
                     help="Add a virtio-gpu: --gpu width=800,height=600 (crosvm syntax)."),
        click.option("--block", "block", multiple=True, cls=_OrderedOption,
                     metavar="[PATH,]KEY=VALUE,...",
                     help="Add a virtio-blk disk: --block path=disk.img,ro=true; repeatable."),
        click.option("--disk", "disk", multiple=True, cls=_OrderedOption,
                     metavar="PATH[,KEY=VALUE...]", help="Add a read-only disk; repeatable."),
        click.option("--rwdisk", "rwdisk", multiple=True, cls=_OrderedOption,
                     metavar="PATH[,KEY=VALUE...]", help="Add a writable disk; repeatable."),
        click.option("--display-window-keyboard", "display_window_keyboard", is_flag=True,
                     help="Give the guest a keyboard fed from the GPU's display window."),
        click.option("--display-window-mouse", "display_window_mouse", is_flag=True,
                     help="Give the guest a mouse fed from the GPU's display window."),
    ]
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


# -- parsing ------------------------------------------------------------------------------


def split_pairs(text: str, where: str) -> list[tuple[str, str | None]]:
    """'a=1,b="x,y",c' -> [('a', '1'), ('b', 'x,y'), ('c', None)]."""
    pairs: list[tuple[str, str | None]] = []
    items: list[str] = []
    buf: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted and i + 1 < len(text):
            buf.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    if quoted:
        raise ConfigError(f"{where}: unterminated quote in {text!r}")
    items.append("".join(buf))
    for item in items:
        if item.strip() == "":
            if text.strip() == "":
                continue
            raise ConfigError(f"{where}: empty item in {text!r} (expected key=value,...)")
        key, eq, value = item.partition("=")
        pairs.append((key.strip(), value if eq else None))
    return pairs


@dataclass
class _Request:
    flag: str                 # what the user typed, for messages: "--device", "--gpu", ...
    name: str                 # the device plugin's name
    pairs: list[tuple[str, str | None]]
    where: str                # message prefix: "--device virtio_rng", "--gpu", ...
    forced: dict[str, str] = field(default_factory=dict)   # keys the spelling sets itself


def _requests(args: DeviceArgs) -> list[_Request]:
    out = []
    for flag, text in args.items:
        if flag == "--device":
            name, colon, rest = text.partition(":")
            name = name.strip()
            if not name:
                raise ConfigError(f"--device {text!r}: expected NAME[:key=value,...]")
            out.append(_Request(flag, name, split_pairs(rest, f"--device {name}") if colon
                                else [], f"--device {name}"))
        elif flag == "--gpu":
            out.append(_Request(flag, GPU_DEVICE, split_pairs(text, flag), flag))
        elif flag == "--block":
            out.append(_Request(flag, BLOCK_DEVICE, split_pairs(text, flag), flag))
        else:   # --disk / --rwdisk: PATH first
            pairs = split_pairs(text, flag)
            if not pairs or pairs[0][1] is not None:
                raise ConfigError(f"{flag} {text!r}: expected PATH[,key=value,...]")
            out.append(_Request(flag, BLOCK_DEVICE, pairs, flag,
                                forced={"ro": "true" if flag == "--disk" else "false"}))
    for attr, key, flag in (("window_keyboard", "window_keyboard", "--display-window-keyboard"),
                            ("window_mouse", "window_mouse", "--display-window-mouse")):
        if getattr(args, attr):
            gpus = [r for r in out if r.name.replace("-", "_").lower() == GPU_DEVICE]
            if not gpus:
                raise ConfigError(f"{flag} needs a GPU: add --gpu (or --device {GPU_DEVICE})")
            for r in gpus:
                r.forced.setdefault(key, "true")
    return out


# -- validation ---------------------------------------------------------------------------


def validate_device(registry: Registry, req: _Request) -> tuple[DeviceConfig, Any]:
    """One request -> DeviceConfig, checked against its plugin's schema."""
    from vmmcore.registry import canonical

    rec = registry.get("device", req.name)
    if rec is None:
        if req.flag != "--device":
            raise ConfigError(f"{req.flag} needs the {req.name} device plugin, which is not "
                              f"installed (see `vmm plugins list`)")
        close = registry.closest("device", req.name)
        hint = (f"closest installed: {', '.join(close)}" if close else
                "installed devices: " + (", ".join(registry.names("device")) or "none"))
        raise ConfigError(f"unknown device {req.name!r} ({hint}); see `vmm plugins list`")
    if rec.broken or rec.spec is None:
        raise ConfigError(f"{req.where}: the plugin is broken: {rec.error}")
    spec = rec.spec
    where = req.where if req.flag != "--device" else f"--device {spec.name}"
    valid = ", ".join(sorted(o.name for o in spec.options)) or "none"
    given: dict[str, Any] = {}
    for i, (key, text) in enumerate(req.pairs):
        ckey = canonical(key)
        opt = spec.option(ckey)
        if text is None and opt is None and i == 0 and spec.positional:
            opt, ckey, text = spec.option(spec.positional), spec.positional, key
        if opt is None:
            if not key:
                raise ConfigError(f"{where}: empty option name (valid options: {valid})")
            raise ConfigError(f"{where}: unknown option {key!r} (valid options: {valid})")
        if ckey in req.forced:
            raise ConfigError(f"{where}: option {ckey!r} is set by {req.flag} itself"
                              + ("; use --block to choose it" if req.flag in
                                 ("--disk", "--rwdisk") else ""))
        if ckey in given:
            raise ConfigError(f"{where}: option {ckey!r} given twice")
        if text is None:
            if opt.type != "bool":
                raise ConfigError(f"{where}: option {ckey!r} needs a value "
                                  f"({ckey}=VALUE, {opt.expected})")
            text = "true"
        given[ckey] = _parse(opt, text, where)
    for key, text in req.forced.items():
        opt = spec.option(key)
        if opt is None:
            raise ConfigError(f"{req.flag}: the {spec.name} plugin has no option {key!r}")
        given[key] = _parse(opt, text, where)
    options: dict[str, Any] = {}
    for opt in spec.options:
        if opt.name in given:
            options[opt.name] = given[opt.name]
        elif opt.required:
            raise ConfigError(f"{where}: missing required option {opt.name!r} "
                              f"({opt.name}=VALUE, {opt.expected})")
        else:
            options[opt.name] = opt.default_value()
    if spec.validate is not None:
        try:
            spec.validate(options)
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return DeviceConfig(name=spec.name, options=options), rec


def _parse(opt: Any, text: str, where: str) -> Any:
    from vmmcore.plugin_api import OptionValueError

    try:
        return opt.parse(text)
    except OptionValueError as e:
        raise ConfigError(f"{where}: {opt.name}={text!r} is not valid: expected {e}") from None


def collect_devices(args: DeviceArgs, registry: Registry | None = None,
                    require_implemented: bool = True) -> list[DeviceConfig]:
    """Every device the command line asked for, validated, in command-line order.

    Raises ConfigError (one line) for the first problem: unknown device, broken plugin,
    unknown key, bad value, missing required key, or -- once everything else is valid --
    a device whose model is not implemented yet.
    """
    requests = _requests(args)
    if not requests:
        return []                       # no device asked for: no discovery at all
    if registry is None:
        from vmmcore.registry import get_registry

        registry = get_registry()
    validated = [validate_device(registry, req) for req in requests]
    if require_implemented:
        for config, rec in validated:
            if not rec.implemented:
                registry.fill_distributions([rec])
                by = f" (plugin {rec.distribution} {rec.version})" if rec.distribution else ""
                raise ConfigError(f"device {config.name}{by} is not implemented yet: its "
                                  "options are known but its device model is still to come")
    return [config for config, _ in validated]


__all__ = ["DeviceArgs", "collect_devices", "device_options", "split_pairs",
           "validate_device"]
