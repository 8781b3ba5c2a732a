"""Plugin discovery: entry points -> PluginRecords, without ever breaking the CLI.

Named drivers (devices, disk formats, displays) are found in the entry-point groups of
vmmcore.plugin_api.KIND_GROUPS and loaded with stevedore; hook implementations are found
in the group ``vmm`` and registered with a pluggy PluginManager (vmmcore.hookspecs).

Cost model -- discovery must stay cheap, because `vmm run` does it before every boot:

* listing names reads stevedore's entry-point cache (one small JSON file, rebuilt when a
  distribution is installed or removed); nothing is imported;
* selecting ``--device NAME`` imports only that plugin's spec module;
* `vmm plugins list` imports every spec module, and scans the installed distributions
  once to name the distribution and version behind each entry point.

Anything that goes wrong while loading a plugin (an ImportError, an exception in its
spec, a spec of the wrong type, kind or API version, a missing policy file, the same name
from two distributions) makes that plugin's record *broken* with a one-line reason;
it never propagates.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmcore.plugin_api import (
    API_VERSION,
    HOOK_GROUP,
    KIND_GROUPS,
    PluginSpec,
    api_compatible,
    parse_api_version,
)

HOOKS_KIND = "hooks"
#: Every kind `vmm plugins list` shows, in display order.
ALL_KINDS = (*KIND_GROUPS, HOOKS_KIND)
GROUP_KINDS = {**{g: k for k, g in KIND_GROUPS.items()}, HOOK_GROUP: HOOKS_KIND}


def canonical(name: str) -> str:
    """The form names are compared in: lower case, '-' and '_' equivalent."""
    return name.strip().lower().replace("-", "_")


def one_line(exc: BaseException) -> str:
    """An exception as one line: 'ModuleNotFoundError: No module named x'."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class PluginRecord:
    """What the registry knows about one entry point, loaded or not."""

    name: str
    kind: str
    group: str
    target: str                         # the entry point's "module:attr"
    distribution: str | None = None
    version: str | None = None
    spec: PluginSpec | None = None      # None for hook plugins and broken plugins
    error: str | None = None            # why the plugin is broken
    policy_path: Path | None = None
    api_version: str | None = None
    hooks: tuple[str, ...] = ()         # hook plugins: the hooks they implement
    obj: Any = field(default=None, repr=False)

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def implemented(self) -> bool:
        if self.broken:
            return False
        return self.kind == HOOKS_KIND or (self.spec is not None and self.spec.implemented)

    @property
    def status(self) -> str:
        if self.broken:
            return "broken"
        return "ok" if self.implemented else "not implemented yet"

    @property
    def summary(self) -> str:
        if self.spec is not None:
            return self.spec.summary
        if self.obj is not None and getattr(self.obj, "__doc__", None):
            return self.obj.__doc__.strip().splitlines()[0]
        return ""

    def to_json(self, with_options: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "status": self.status,
            "version": self.version, "distribution": self.distribution,
            "api_version": self.api_version, "entry_point": f"{self.group}:{self.target}",
            "policy": str(self.policy_path) if self.policy_path else None,
            "implemented": self.implemented, "error": self.error, "summary": self.summary,
        }
        if self.kind == HOOKS_KIND:
            d["hooks"] = list(self.hooks)
        if with_options:
            d["options"] = [o.describe() for o in self.spec.options] if self.spec else []
            d["positional"] = self.spec.positional if self.spec else None
        return d


class Registry:
    """The installed plugins, discovered through entry points.

    ``fresh=True`` forgets what this process cached about entry points (needed only
    after installing or removing a distribution in the running process, as tests do).
    """

    def __init__(self, fresh: bool = False) -> None:
        self._records: dict[tuple[str, str], list[PluginRecord]] = {}
        self._dists: dict[tuple[str, str, str], tuple[str, str]] | None = None
        self._hook_manager: Any = None
        if fresh:
            importlib.invalidate_caches()
            from stevedore import ExtensionManager

            for group in (*KIND_GROUPS.values(), HOOK_GROUP):
                ExtensionManager.ENTRY_POINT_CACHE.pop(group, None)

    # -- discovery without importing anything -------------------------------------------

    @staticmethod
    def entry_points(group: str) -> list[Any]:
        """The entry points of a group (stevedore's cache; nothing is imported)."""
        from stevedore import ExtensionManager

        # list_entry_points only reads the cache; constructing a manager would load all.
        mgr = ExtensionManager.__new__(ExtensionManager)
        mgr.namespace = group
        seen: set[tuple[str, str]] = set()
        eps = []
        for ep in mgr.list_entry_points():
            if (ep.name, ep.value) not in seen:
                seen.add((ep.name, ep.value))
                eps.append(ep)
        return eps

    def names(self, kind: str) -> list[str]:
        """The canonical names installed for a kind, sorted; nothing is imported."""
        group = KIND_GROUPS.get(kind, HOOK_GROUP)
        return sorted({canonical(ep.name) for ep in self.entry_points(group)})

    def closest(self, kind: str, name: str, n: int = 3) -> list[str]:
        """The installed names of a kind closest to a misspelt one (difflib)."""
        return difflib.get_close_matches(canonical(name), self.names(kind), n=n, cutoff=0.5)

    # -- loading -------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> PluginRecord | None:
        """The record of one plugin, importing only that plugin; None if not installed.

        A name provided by two distributions gives a broken record saying so.
        """
        key = (kind, canonical(name))
        if key not in self._records:
            group = KIND_GROUPS.get(kind, HOOK_GROUP)
            eps = [ep for ep in self.entry_points(group) if canonical(ep.name) == key[1]]
            if not eps:
                return None
            self._records[key] = self._load(group, eps)
        records = self._records[key]
        if len(records) == 1:
            return records[0]
        first = records[0]
        targets = ", ".join(sorted(f"{r.target} ({r.distribution or '?'})" for r in records))
        return PluginRecord(name=first.name, kind=kind, group=first.group,
                            target=first.target, distribution=first.distribution,
                            version=first.version,
                            error=f"the name {first.name} is provided by several "
                                  f"entry points: {targets}")

    def records(self, kinds: tuple[str, ...] = ALL_KINDS) -> list[PluginRecord]:
        """Every installed plugin of the given kinds (imports each spec module)."""
        out: list[PluginRecord] = []
        if HOOKS_KIND in kinds:
            self.hook_manager()     # registering checks hook signatures against the specs
        for kind in kinds:
            for name in self.names(kind):
                rec = self.get(kind, name)
                if rec is not None:
                    out.append(rec)
        self.fill_distributions(out)
        return out

    def find(self, name: str) -> list[PluginRecord]:
        """The plugins of any kind called ``name`` (usually one)."""
        found = [r for k in ALL_KINDS if (r := self.get(k, name)) is not None]
        self.fill_distributions(found)
        return found

    def _load(self, group: str, eps: list[Any]) -> list[PluginRecord]:
        from stevedore import NamedExtensionManager

        kind = GROUP_KINDS[group]
        failures: dict[tuple[str, str], BaseException] = {}

        def on_failure(_mgr: Any, ep: Any, exc: BaseException) -> None:
            failures[(ep.name, ep.value)] = exc

        mgr = NamedExtensionManager(group, names=sorted({ep.name for ep in eps}),
                                    on_load_failure_callback=on_failure,
                                    on_missing_entrypoints_callback=None)
        loaded = {(ext.entry_point.name, ext.entry_point.value): ext.plugin
                  for ext in mgr.extensions}
        records = []
        for ep in eps:
            rec = PluginRecord(name=canonical(ep.name), kind=kind, group=group,
                               target=ep.value)
            key = (ep.name, ep.value)
            if key in failures:
                rec.error = f"cannot be loaded: {one_line(failures[key])}"
            elif key in loaded:
                try:
                    self._check(rec, loaded[key])
                except Exception as e:  # a plugin's bug must never break the CLI
                    rec.error = one_line(e)
            else:
                rec.error = "cannot be loaded: the entry point disappeared while loading"
            records.append(rec)
        return records

    def _check(self, rec: PluginRecord, obj: Any) -> None:
        """Validate what an entry point gave; sets rec.error for a plugin unfit to use."""
        rec.obj = obj
        if rec.kind == HOOKS_KIND:
            self._check_hooks(rec, obj)
            return
        spec = obj() if callable(obj) and not isinstance(obj, PluginSpec) else obj
        if not isinstance(spec, PluginSpec):
            rec.error = (f"entry point {rec.target} gives {type(spec).__name__}, "
                         "not a vmmcore.plugin_api.PluginSpec")
            return
        rec.api_version = spec.api_version
        if canonical(spec.name) != rec.name:
            rec.error = f"its spec is named {spec.name!r} but its entry point {rec.name!r}"
        elif spec.kind != rec.kind:
            rec.error = f"its spec declares kind {spec.kind!r} but it is in group {rec.group}"
        elif not api_compatible(spec.api_version):
            rec.error = (f"needs plugin API {spec.api_version}; "
                         f"this vmm provides {API_VERSION}")
        else:
            rec.spec = spec
            if spec.policy is not None:
                module = sys.modules.get(rec.target.partition(":")[0])
                base = Path(module.__file__).parent if module and module.__file__ else None
                path = (base / spec.policy) if base else Path(spec.policy)
                if path.is_file():
                    rec.policy_path = path
                else:
                    rec.spec = None
                    rec.error = f"its seccomp policy file {path} is missing"
            elif spec.kind == "device":
                rec.spec = None
                rec.error = "a device plugin must declare its seccomp policy file"

    @staticmethod
    def _check_hooks(rec: PluginRecord, obj: Any) -> None:
        wanted = getattr(obj, "VMM_API_VERSION", None)
        if wanted is None:
            rec.error = "does not declare VMM_API_VERSION"
            return
        rec.api_version = str(wanted)
        try:
            parse_api_version(rec.api_version)
        except ValueError as e:
            rec.error = str(e)
            return
        if not api_compatible(rec.api_version):
            rec.error = f"needs plugin API {rec.api_version}; this vmm provides {API_VERSION}"
            return
        from vmmcore import hookspecs

        marker = f"{hookspecs.PROJECT}_impl"     # the attribute pluggy's hookimpl sets
        rec.hooks = tuple(sorted(n for n in dir(obj)
                                 if getattr(getattr(obj, n, None), marker, None) is not None))
        unknown = [n for n in rec.hooks if not hasattr(hookspecs, n)]
        if unknown:
            rec.error = f"implements unknown hook(s): {', '.join(unknown)}"

    def fill_distributions(self, records: list[PluginRecord]) -> None:
        """Name the distribution and version behind each record (one scan, cached)."""
        if not records:
            return
        if self._dists is None:
            import importlib.metadata as md

            groups = {*KIND_GROUPS.values(), HOOK_GROUP}
            self._dists = {}
            for dist in md.distributions():
                try:
                    eps = dist.entry_points
                except Exception:  # a corrupt dist-info must not break listing
                    continue
                for ep in eps:
                    if ep.group in groups:
                        self._dists.setdefault((ep.group, canonical(ep.name), ep.value),
                                               (dist.metadata["Name"], dist.version))
        for rec in records:
            if rec.distribution is None:
                dist = self._dists.get((rec.group, rec.name, rec.target))
                if dist:
                    rec.distribution, rec.version = dist

    # -- hooks ---------------------------------------------------------------------------

    def hook_manager(self) -> Any:
        """A pluggy PluginManager with every working hook plugin registered.

        Broken hook plugins are left out (their records say why); a hook plugin whose
        functions do not match vmmcore.hookspecs is broken too.
        """
        if self._hook_manager is None:
            import pluggy

            from vmmcore import hookspecs

            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for name in self.names(HOOKS_KIND):
                rec = self.get(HOOKS_KIND, name)
                if rec is None or rec.broken:
                    continue
                try:
                    pm.register(rec.obj, name=rec.name)
                except Exception as e:  # pluggy.PluginValidationError and the like
                    rec.error = one_line(e)
                    if pm.has_plugin(rec.name):     # pluggy leaves it half-registered
                        pm.unregister(name=rec.name)
            self._hook_manager = pm
        return self._hook_manager


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (created on first use)."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry and stevedore's in-process entry-point cache."""
    global _default
    _default = Registry(fresh=True)


__all__ = ["ALL_KINDS", "HOOKS_KIND", "PluginRecord", "Registry", "canonical",
           "get_registry", "reset_registry"]


# Which plugins a device uses -----------------------------------------------------------

_plugin_uses: contextvars.ContextVar[dict[str, set[str]] | None] = contextvars.ContextVar(
    "vmm_plugin_uses", default=None)


@contextlib.contextmanager
def track_plugin_use() -> Iterator[dict[str, set[str]]]:
    """Collect, as {kind: {name, ...}}, the plugins that note_plugin_use() reports while
    the block runs: the VM builder wraps a device's factory in it, so that the device's
    jail gets the seccomp policies of the disk formats or display it really opened
    (PluginSpec.policy_with) rather than those of every installed one."""
    uses: dict[str, set[str]] = {}
    token = _plugin_uses.set(uses)
    try:
        yield uses
    finally:
        _plugin_uses.reset(token)


def note_plugin_use(kind: str, name: str) -> None:
    """Say that plugin kind/name is being used (vmmcore.disk.open_disk and
    vmmcore.display.open_display call this); a no-op outside track_plugin_use()."""
    uses = _plugin_uses.get()
    if uses is not None:
        uses.setdefault(kind, set()).add(name)
