"""`vmm plugins list [--json]` and `vmm plugins info NAME [--json]`.

Listing never fails because of a plugin: a plugin that cannot be imported, declares
another API version or is otherwise unusable is shown as broken, with the reason.
The registry is imported only when one of these commands runs, so `vmm --help` loads no
plugin code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def _fail(message: str) -> None:
    click.echo(f"vmm: error: {message}", err=True)
    sys.exit(2)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@click.group("plugins")
def plugins() -> None:
    """List and describe the installed device, disk-format and display plugins."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array for scripts.")
@click.option("--kind", type=click.Choice(["device", "disk_format", "display", "hooks"]),
              help="Only plugins of this kind.")
def list_plugins(as_json: bool, kind: str | None) -> None:
    """List every installed plugin: name, kind, version, status, policy, summary."""
    from vmmcore.registry import ALL_KINDS, get_registry

    records = get_registry().records((kind,) if kind else ALL_KINDS)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in records], indent=2))
        return
    if not records:
        what = f"no {kind} plugins" if kind else "no plugins"
        click.echo(f"{what} installed (the source tree's plugins/ directory has the "
                   "standard ones: scripts/dev-install installs them)")
        return
    rows = [[r.name, r.kind, r.version or "?", r.distribution or "?", r.status,
             r.policy_path.name if r.policy_path else "-",
             r.summary if not r.broken else r.error or ""] for r in records]
    click.echo(_table(rows, ["NAME", "KIND", "VERSION", "DISTRIBUTION", "STATUS", "POLICY",
                             "SUMMARY / PROBLEM"]))


def _describe(rec: Any) -> str:
    out = [f"{rec.name}: {rec.kind} plugin"
           + (f" from {rec.distribution} {rec.version}" if rec.distribution else ""),
           f"  summary:      {rec.summary or '-'}",
           f"  status:       {rec.status}" + (f": {rec.error}" if rec.broken else ""),
           f"  plugin API:   {rec.api_version or '?'} (this vmm provides "
           f"{_api_version()})",
           f"  entry point:  {rec.group} = {rec.target}"]
    if rec.kind != "hooks":
        out.append(f"  policy:       {rec.policy_path or '-'}")
    if rec.hooks:
        out.append(f"  hooks:        {', '.join(rec.hooks)}")
    spec = rec.spec
    if spec is None:
        return "\n".join(out)
    if spec.positional:
        out.append(f"  positional:   a leading bare value sets {spec.positional}")
    if not spec.options:
        out.append("  options:      none")
        return "\n".join(out)
    out.append("  options:")
    rows = []
    for o in spec.options:
        default = "(required)" if o.required else ("-" if o.default is None else
                                                   _fmt_default(o))
        rows.append([o.name, o.type, default, o.help + (f" [{o.expected}]" if o.expected
                                                        else "")])
    table = _table(rows, ["NAME", "TYPE", "DEFAULT", "HELP"])
    out.extend("    " + line for line in table.splitlines())
    return "\n".join(out)


def _fmt_default(o: Any) -> str:
    if o.type == "bool":
        return "true" if o.default else "false"
    if o.type == "size":
        from vmmcore.plugin_api import format_size

        return format_size(o.default)
    return str(o.default) if o.default != "" else '""'


def _api_version() -> str:
    from vmmcore.plugin_api import API_VERSION

    return API_VERSION


@plugins.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info(name: str, as_json: bool) -> None:
    """Describe plugin NAME: metadata, policy, and every option with type, default, help."""
    from vmmcore.registry import ALL_KINDS, get_registry

    reg = get_registry()
    found = reg.find(name)
    if not found:
        import difflib

        every = sorted({n for k in ALL_KINDS for n in reg.names(k)})
        close = difflib.get_close_matches(name.replace("-", "_").lower(), every, n=3,
                                          cutoff=0.5)
        hint = f"closest installed: {', '.join(close)}" if close else (
            "installed: " + (", ".join(every) or "none"))
        _fail(f"no plugin named {name!r} ({hint})")
    if as_json:
        data = [r.to_json(with_options=True) for r in found]
        click.echo(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return
    click.echo("\n\n".join(_describe(r) for r in found))


__all__ = ["plugins"]
