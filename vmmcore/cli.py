"""The `vmm` command line: a click group whose options mirror crosvm's.

Every user error becomes one line on stderr and exit status 2 (bad input) or 1 (the VM
or the host failed); tracebacks are for bugs only.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from vmmcore import __version__
from vmmcore.config import VmConfig
from vmmcore.device_options import DeviceArgs, collect_devices, device_options
from vmmcore.errors import ConfigError, VmmError


def fail(message: str, status: int = 1) -> None:
    """Print one error line and exit; the single exit path for user-facing errors."""
    click.echo(f"vmm: error: {message}", err=True)
    sys.exit(status)


class VmmGroup(click.Group):
    """The `vmm` group: adds plugins' own `run` options only when `run` is invoked.

    `vmm --help` must not load plugins (it lists commands through get_command), so the
    vmm_cli_options hook is called from resolve_command, which click uses only for the
    subcommand actually being run (including `vmm run --help`).
    """

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is run:
            _add_plugin_options(cmd)
        return name, cmd, rest


def _add_plugin_options(cmd: click.Command) -> None:
    """Options from the vmm_cli_options hook; a clash with an existing option is skipped."""
    if getattr(cmd, "_plugin_options_added", False):
        return
    cmd._plugin_options_added = True  # type: ignore[attr-defined]
    from vmmcore.registry import get_registry

    taken = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    taken |= {p.name for p in cmd.params}
    for options in get_registry().hook_manager().hook.vmm_cli_options(command="run"):
        for option in options or ():
            names = {*option.opts, *option.secondary_opts, option.name}
            if names & taken:
                logging.getLogger(__name__).warning(
                    "plugin option %s clashes with an existing option; ignored",
                    "/".join(option.opts))
                continue
            taken |= names
            cmd.params.append(option)


@click.group(cls=VmmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmm")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """vmm: a KVM virtual machine monitor with every device as a sandboxed plugin."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="vmm: %(levelname)s: %(name)s: %(message)s")


@main.command()
@click.argument("kernel", required=False, type=click.Path(path_type=Path))
@click.option("-i", "--initrd", type=click.Path(path_type=Path), help="Initial ramdisk.")
@click.option("-p", "--params", multiple=True, help="Kernel command line parameter(s); repeatable.")
@click.option("-c", "--cpus", type=int, default=1, show_default=True, help="Number of vCPUs.")
@click.option("-m", "--mem", "mem_mib", type=int, default=256, show_default=True,
              help="Guest memory in MiB.")
@click.option("--serial", multiple=True, metavar="SPEC",
              help="Serial port: type=stdout|stderr|file|unix|sink,path=P,num=1..4,"
                   "console=true,stdin=true (crosvm syntax); repeatable.")
@click.option("--disable-sandbox", is_flag=True,
              help="Run devices in the main process (no jail, no seccomp).")
@click.option("--seccomp-log-failures", is_flag=True,
              help="Log syscalls a device's policy forbids instead of killing the device.")
@click.option("--kvm-device", type=click.Path(path_type=Path), default=Path("/dev/kvm"),
              show_default=True, help="Path to the KVM device.")
@click.option("-s", "--socket", "socket_path", type=click.Path(path_type=Path),
              help="Control socket for `vmm stop/suspend/resume/status/... PATH`.")
@device_options
def run(kernel: Path | None, initrd: Path | None, params: tuple[str, ...], cpus: int,
        mem_mib: int, serial: tuple[str, ...], disable_sandbox: bool,
        seccomp_log_failures: bool, kvm_device: Path, socket_path: Path | None, device_args: DeviceArgs, **plugin_options: object) -> None:
    """Boot KERNEL (bzImage or ELF vmlinux); with no KERNEL, the built-in demo guest."""
    config = VmConfig(kernel=kernel, initrd=initrd, params=list(params), cpus=cpus,
                      mem_mib=mem_mib, serial=list(serial), disable_sandbox=disable_sandbox,
                      seccomp_log_failures=seccomp_log_failures,
                      kvm_device=kvm_device, socket=socket_path,
                      plugin_options=plugin_options)
    try:
        config.devices = collect_devices(device_args)
        config.validate()
        from vmmcore.vm_runner import run_vm

        status = run_vm(config)
    except ConfigError as e:
        fail(str(e), 2)
    except VmmError as e:
        fail(str(e), 1)
    except KeyboardInterrupt:       # Ctrl-C before the VM ran (once it runs, it stops it)
        fail("interrupted", 128 + signal.SIGINT)
    sys.exit(status)


from vmmcore.cli_plugins import plugins as _plugins_group  # noqa: E402

main.add_command(_plugins_group)

from vmmcore import cli_control as _control  # noqa: E402

for _command in _control.COMMANDS:
    main.add_command(_command)

from vmmcore.cli_disk import add_disk_commands as _add_disk_commands  # noqa: E402

_add_disk_commands(main)  # `vmm create_qcow2`, `vmm disk info|check|convert`


if __name__ == "__main__":
    main()
