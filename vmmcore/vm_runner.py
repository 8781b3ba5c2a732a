"""run_vm: build a VM from a VmConfig, run it to its end, and map that end to the
exit status of `vmm run`.

    0        the guest powered off or reset (crosvm exits on reset too)
    N        a test guest wrote N to the debug exit port
    1        the VMM failed (a device died, a KVM error)
    2        bad input (raised before anything starts, by the CLI)
    3        the guest crashed (triple fault, KVM internal error, failed entry)
    128+S    stopped by signal S
"""

from __future__ import annotations

import sys

from vmmcore.config import VmConfig
from vmmcore.vm_builder import build_vm
from vmmcore.vm_events import VmEvent, VmExit


def describe_exit(vm_exit: VmExit) -> str:
    return f"vmm: {vm_exit.message} (exit status {vm_exit.status})"


def run_vm(config: VmConfig) -> int:
    """Build, run and tear down one VM; returns the exit status."""
    server = None
    if config.socket is not None:      # bound first: a busy socket fails before the VM
        from vmmcore.control_socket import ControlServer

        server = ControlServer(config.socket)
    try:
        inst = build_vm(config)
        try:
            if server is not None:
                server.start(inst)
            vm_exit = inst.run()
        finally:
            if server is not None:
                server.close()
            inst.close()
    finally:
        if server is not None:
            server.close()
    quiet = vm_exit.event in (VmEvent.POWEROFF, VmEvent.RESET, VmEvent.GUEST_EXIT) \
        and vm_exit.status == 0
    if not quiet:
        print(describe_exit(vm_exit), file=sys.stderr)
    return vm_exit.status
