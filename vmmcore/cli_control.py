"""The control-socket client subcommands (crosvm's `crosvm stop SOCKET` and friends).

    vmm stop PATH                         end the VM (`vmm run` exits 0)
    vmm suspend PATH / vmm resume PATH    hold / release every vCPU
    vmm powerbtn PATH                     press the ACPI power button
    vmm status PATH [--json]              vCPUs, devices and their state, uptime
    vmm kvm_stats PATH [PREFIX...] [--json]   KVM's statistics for the VM and each vCPU
    vmm balloon PATH SIZE                 set the virtio-balloon target (bytes, K/M/G)
    vmm balloon_stats PATH                the guest's memory statistics from the balloon
    vmm disk resize PATH DISK_INDEX NEW_SIZE
    vmm gpu screenshot PATH OUT.png
    vmm device PATH DEVICE COMMAND [JSON] any device-control command (see docs/control.md)

PATH is the socket given to `vmm run --socket PATH`. Errors are one line on stderr with
exit status 1 (the VMM refused, or there is no VMM at PATH); bad arguments exit 2.
"""

from __future__ import annotations

import json
import os
import sys

import click

from vmmcore.control_socket import ControlClientError, request_ok
from vmmcore.plugin_api import OptionValueError, Size

_SIZE = Size("size")


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"vmm: error: {message}", err=True)
    sys.exit(status)


def _call(path: str, command: str, args: dict | None = None, timeout: float = 30.0) -> dict:
    try:
        return request_ok(path, command, args, timeout=timeout)
    except ControlClientError as e:
        _fail(str(e))
    raise AssertionError("unreachable")


def _size(text: str, what: str) -> int:
    try:
        return _SIZE.parse(text)
    except OptionValueError as e:
        _fail(f"{what} {text!r} is not valid: expected {e}", 2)
    raise AssertionError("unreachable")


_path_arg = click.argument("path", metavar="PATH", type=click.Path(dir_okay=False))


@click.command()
@_path_arg
def stop(path: str) -> None:
    """Stop the VM whose control socket is PATH."""
    _call(path, "stop")


@click.command()
@_path_arg
def suspend(path: str) -> None:
    """Suspend the VM at PATH: every vCPU leaves the guest and is held."""
    _call(path, "suspend")


@click.command()
@_path_arg
def resume(path: str) -> None:
    """Resume a suspended VM."""
    _call(path, "resume")


@click.command()
@_path_arg
def powerbtn(path: str) -> None:
    """Press the VM's ACPI power button (the guest decides what to do)."""
    response = _call(path, "powerbtn")
    if not response.get("guest_listening", True):
        click.echo("vmm: note: the guest has not enabled the power button event (yet)",
                   err=True)


def format_status(s: dict) -> str:
    lines = [f"state: {s.get('state')}   uptime: {s.get('uptime', 0):.1f} s   "
             f"cpus: {s.get('cpus')}   memory: {s.get('mem_mib')} MiB   pid: {s.get('pid')}"]
    if "exit" in s:
        lines.append(f"exit: {s['exit'].get('message')} (status {s['exit'].get('status')})")
    lines.append("vcpus:")
    for v in s.get("vcpus", []):
        lines.append(f"  vcpu{v.get('id')}  {v.get('state'):<8} exits {v.get('exits')}")
    lines.append("devices:")
    for d in s.get("devices", []):
        what = d.get("virtio_type") or ""
        extra = "  control" if d.get("control") else ""
        error = f"  ({d['error']})" if d.get("error") else ""
        lines.append(f"  {d.get('address')}  {d.get('label'):<16} {what:<8} "
                     f"{d.get('state')}{extra}{error}")
    return "\n".join(lines)


@click.command()
@_path_arg
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(path: str, as_json: bool) -> None:
    """Show the VM's vCPUs, devices and their state, and uptime."""
    response = _call(path, "status")
    response.pop("ok", None)
    if as_json:
        click.echo(json.dumps(response, indent=2, sort_keys=True))
    else:
        click.echo(format_status(response))


def format_kvm_stats(s: dict) -> str:
    """One line per statistic: its name, the VM's or each vCPU's value, its unit.
    A histogram shows its number of samples (the buckets are in --json)."""
    vcpus = s.get("vcpus", [])
    units = s.get("units", {})

    def line(name: str, values: list) -> str:
        hist = any(isinstance(v, list) for v in values)
        cells = " ".join(f"{_stat_value(v):>14}" for v in values)
        unit = "samples" if hist else units.get(name, "")
        return f"  {name:<32} {cells} {unit}".rstrip()

    vm = s.get("vm", {})
    lines = [f"{'vm ' + str(vm.get('id', '?')):<34} {'value':>14}"]
    lines += [line(name, [value]) for name, value in vm.get("stats", {}).items()]
    if vcpus:
        lines.append(f"{'vcpu':<34} " + " ".join(f"{'vcpu' + str(v.get('id')):>14}"
                                                   for v in vcpus))
        for name in vcpus[0].get("stats", {}):
            lines.append(line(name, [v.get("stats", {}).get(name) for v in vcpus]))
    return "\n".join(lines)


def _stat_value(value) -> str:
    if isinstance(value, list):            # a histogram: how many samples it holds
        return str(sum(value))
    return "-" if value is None else str(value)


@click.command("kvm_stats")
@_path_arg
@click.argument("prefixes", nargs=-1, metavar="[PREFIX]...")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def kvm_stats(path: str, prefixes: tuple[str, ...], as_json: bool) -> None:
    """KVM's statistics (KVM_GET_STATS_FD) for the VM and each vCPU; only names that
    start with a PREFIX when any are given (e.g. `halt_` for halts and halt polling)."""
    response = _call(path, "kvm_stats", {"names": list(prefixes)})
    response.pop("ok", None)
    response.pop("version", None)
    if as_json:
        click.echo(json.dumps(response, indent=2, sort_keys=True))
    else:
        click.echo(format_kvm_stats(response))


@click.command()
@_path_arg
@click.argument("size")
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which virtio-balloon device.")
def balloon(path: str, size: str, index: int) -> None:
    """Set the balloon to SIZE bytes (K/M/G suffixes): memory taken from the guest."""
    _call(path, "balloon", {"size": _size(size, "SIZE"), "index": index})


@click.command("balloon_stats")
@_path_arg
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True)
def balloon_stats(path: str, index: int) -> None:
    """Print the balloon's state and the guest's memory statistics as JSON."""
    response = _call(path, "balloon_stats", {"index": index})
    response.pop("ok", None)
    response.pop("version", None)
    click.echo(json.dumps(response, indent=2, sort_keys=True))


@click.group()
def disk() -> None:
    """Disk commands."""


@disk.command("resize")
@_path_arg
@click.argument("disk_index", type=click.IntRange(min=0))
@click.argument("new_size")
def disk_resize(path: str, disk_index: int, new_size: str) -> None:
    """Resize disk DISK_INDEX (command-line order) of a running VM to NEW_SIZE bytes."""
    _call(path, "disk_resize", {"index": disk_index, "size": _size(new_size, "NEW_SIZE")})


@click.group()
def gpu() -> None:
    """GPU commands."""


@gpu.command("screenshot")
@_path_arg
@click.argument("out", metavar="OUT.png", type=click.Path(dir_okay=False))
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which virtio-gpu device.")
def gpu_screenshot(path: str, out: str, index: int) -> None:
    """Write the GPU's current scan-out to OUT.png."""
    _call(path, "gpu_screenshot", {"path": os.path.abspath(out), "index": index},
          timeout=60.0)


@click.command()
@_path_arg
@click.argument("device")
@click.argument("command")
@click.argument("args_json", metavar="[JSON]", required=False, default="{}")
def device(path: str, device: str, command: str, args_json: str) -> None:
    """Send COMMAND with JSON arguments to DEVICE (a label from `vmm status`)."""
    try:
        args = json.loads(args_json)
    except ValueError as e:
        _fail(f"JSON arguments are not valid JSON: {e}", 2)
    if not isinstance(args, dict):
        _fail("JSON arguments must be an object", 2)
    response = _call(path, "device", {"device": device, "command": command, "args": args})
    click.echo(json.dumps(response.get("result", {}), indent=2, sort_keys=True))


#: What vmmcore.cli adds to the `vmm` group.
COMMANDS = [stop, suspend, resume, powerbtn, status, kvm_stats, balloon, balloon_stats, disk,
            gpu, device]
