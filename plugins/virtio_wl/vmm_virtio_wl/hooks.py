"""virtio-wl's lifecycle hooks: give in-process virtio-wl devices a VmMemoryRequest path.

While the core does not wire VmMemoryRequest itself, these two hooks do it for this
plugin's devices (and stand aside once the core does):

* vmm_vm_created: when the configuration has a virtio_wl device, make one
  VmMemoryController for the VM (KVM slots + the VM's SystemAllocator), as
  ``vm.vm_memory`` unless the core already set one, closed with the VM;
* vmm_devices_created: hand it to every virtio-wl model that has none.

A sandboxed device (a ProxyDevice) is not reachable from here: its model lives in the
device process, which needs a SocketVmMemoryClient / ConnectingVmMemoryClient set up
where the sandbox builds it (see the README).
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import hookimpl

VMM_API_VERSION = "1.0"
PLUGIN_NAME = "virtio_wl"


@hookimpl
def vmm_vm_created(vm: Any, allocator: Any) -> None:
    config = getattr(vm, "config", None)
    if not any(d.name == PLUGIN_NAME for d in getattr(config, "devices", ())):
        return
    if getattr(vm, "vm_memory", None) is not None:
        return
    from vmmcore.vm_control import VmMemoryController

    controller = VmMemoryController(vm.vm, allocator)
    vm.vm_memory = controller
    vm.stack.callback(controller.close)     # after the devices' shutdown, before vm.close


@hookimpl
def vmm_devices_created(vm: Any, devices: list[tuple[Any, Any]]) -> None:
    controller = getattr(vm, "vm_memory", None)
    if controller is None:
        return
    from vmm_virtio_wl.device import VirtioWl

    for config, device in devices:
        model = getattr(device, "device", device)
        if config.name == PLUGIN_NAME and isinstance(model, VirtioWl) \
                and model.vm_memory is None:
            model.vm_memory = controller
