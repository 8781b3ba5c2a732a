"""Assembling a VM from a VmConfig: KVM, guest memory, buses, legacy devices, the
kernel, ACPI tables and vCPUs, in the order KVM requires.

build_vm() either returns a complete VmInstance or raises having released everything
it made (an ExitStack holds every fd, mapping and thread), so a failed start never
leaves half a VM behind.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmmcore.allocator import SystemAllocator
from vmmcore.arch.x86_64 import layout
from vmmcore.arch.x86_64.acpi import build_acpi_tables
from vmmcore.arch.x86_64.linux_loader import LoadedKernel, load_kernel
from vmmcore.arch.x86_64.regs import boot_regs, setup_long_mode
from vmmcore.arch.x86_64.vcpu_init import configure_vcpu
from vmmcore.bus import Bus, BusDevice
from vmmcore.config import DeviceConfig, VmConfig
from vmmcore.devices.acpi_pm import AcpiPmDevice
from vmmcore.devices.cmos import Cmos
from vmmcore.devices.debug_exit import DebugExit
from vmmcore.devices.i8042 import I8042
from vmmcore.devices.serial_backends import SerialDevices, create_serial_devices
from vmmcore.errors import ConfigError, VmmError
from vmmcore.eventfd import EventFd
from vmmcore.interrupts import CallbackInterrupt, IrqFdInterrupt
from vmmcore.kvm import Kvm, Vm
from vmmcore.kvm.run_loop import VcpuRunLoop, install_kick_handler
from vmmcore.kvm.sys import lib
from vmmcore.memory import GuestMemory
from vmmcore.pci.device import PciDevice, start_device
from vmmcore.pci.root import PciRoot, build_pci_root
from vmmcore.plugin_api import DeviceContext, load_factory
from vmmcore.registry import PluginRecord, get_registry, track_plugin_use
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.policy import compile_policy
from vmmcore.sandbox.proxy import ProxyDevice, SandboxSupervisor
from vmmcore.virtio import VirtioDevice
from vmmcore.virtio.pci_transport import VirtioPciDevice
from vmmcore.vm_control import VmMemoryController, VmMemoryServer
from vmmcore.vm_events import VmEvent, VmEventSink, VmExit

log = logging.getLogger(__name__)

MiB = 1024 * 1024
ECAM = (layout.PCIE_ECAM_START, 0, 0, layout.PCIE_ECAM_SIZE // (1 << 20) - 1)
#: How long a vCPU may take to leave the guest once the VM has ended: longer than a
#: sandboxed device's request timeout (10 s), which is the longest a vCPU can be inside
#: a device access.
JOIN_TIMEOUT = 15.0


@dataclass
class VmInstance:
    """A built, not yet running VM. Tests may add bus devices before run()."""

    config: VmConfig
    kvm: Kvm
    vm: Vm
    mem: GuestMemory
    io_bus: Bus
    mmio_bus: Bus
    events: VmEventSink
    kernel: LoadedKernel | None = None
    serials: SerialDevices | None = None
    allocator: SystemAllocator | None = None
    pci_root: PciRoot | None = None
    vm_memory: VmMemoryController | None = None
    vm_memory_server: VmMemoryServer | None = None
    supervisor: SandboxSupervisor | None = None
    loops: list[VcpuRunLoop] = field(default_factory=list)
    stuck: bool = False
    #: The ACPI PM device (the control socket's powerbtn presses its button).
    acpi_pm: AcpiPmDevice | None = None
    #: The --device plugins as created: (DeviceConfig, PciDevice), command-line order.
    plugin_devices: list[tuple[DeviceConfig, PciDevice]] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def irq_interrupt(self, gsi: int) -> IrqFdInterrupt:
        """An edge interrupt on GSI gsi through a KVM irqfd (released with the VM)."""
        evt = self.stack.enter_context(EventFd())
        self.vm.register_irqfd(evt, gsi)
        return IrqFdInterrupt(evt)

    def add_io_device(self, device: BusDevice, port: int, length: int) -> None:
        self.io_bus.insert(device, port, length)

    def run(self) -> VmExit:
        """Start every vCPU, wait until the VM ends, stop them all; returns how it ended."""
        self.events.add_listener(lambda _exit: self._kick_all())
        with _stop_on_signals() as caught:
            if self.serials is not None:
                self.serials.start_input()
            for loop in self.loops:
                loop.start()
            try:
                call_hook("vmm_vm_started", vm=self)
            except VmmError as e:
                self.events.report(VmEvent.ERROR, 1, str(e))
            # Signals are only recorded by their handler (reporting takes locks a
            # handler must not); this loop reports them.
            while (vm_exit := self.events.wait(0.2)) is None:
                if caught:
                    signum = caught[0]
                    self.events.report(VmEvent.STOPPED, 128 + signum,
                                       f"stopped by {signal.Signals(signum).name}")
        for loop in self.loops:
            if not loop.join(JOIN_TIMEOUT):
                log.error("vcpu%d did not stop within %.0f s", loop.vcpu.id, JOIN_TIMEOUT)
                self.stuck = True
            elif vm_exit is not None and vm_exit.event == VmEvent.STOPPED:
                log.info("vcpu%d stopped at rip %s", loop.vcpu.id, loop.rip())
        assert vm_exit is not None
        try:
            call_hook("vmm_vm_stopped", vm=self, exit_status=vm_exit.status)
        except VmmError as e:
            log.error("%s", e)
        return vm_exit

    def pause(self, timeout: float = 5.0) -> bool:
        """Suspend: every vCPU out of the guest and held; True when all are parked."""
        for loop in self.loops:
            loop.pause()
        return all(loop.wait_parked(timeout) for loop in self.loops)

    def resume(self) -> None:
        for loop in self.loops:
            loop.resume()

    @property
    def paused(self) -> bool:
        return any(loop.paused for loop in self.loops)

    def stop(self, message: str = "stopped by request") -> None:
        """End the VM from outside (control socket): the run returns status 0."""
        self.events.report(VmEvent.STOPPED, 0, message)

    def _kick_all(self) -> None:
        for loop in self.loops:
            loop.kick()

    def close(self) -> None:
        """Release everything. If a vCPU thread never stopped, closing its fds and the
        memory under it would only turn a stuck thread into a crash: the process is
        exiting anyway, so leave them to the kernel."""
        if self.stuck:
            log.error("a vCPU is stuck; leaving its resources to process exit")
            return
        self.stack.close()


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM stop the VM cleanly (status 128+signal) instead of killing us.

    Yields the list the handler appends signal numbers to; the caller reports them.
    """
    caught: list[int] = []

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield caught            # only the main thread may set handlers (tests, embedders)
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def call_hook(name: str, **kwargs: object) -> list:
    """Call a plugin lifecycle hook (vmmcore.hookspecs); a plugin's failure is one line."""
    hook = getattr(get_registry().hook_manager().hook, name)
    try:
        return hook(**kwargs)
    except VmmError:
        raise
    except Exception as e:
        raise VmmError(f"plugin hook {name} failed: {type(e).__name__}: {e}") from e


def _kernel_path(config: VmConfig) -> Path:
    if config.kernel is not None:
        return config.kernel
    from vmmcore.guests import guest_path

    return guest_path("demo")


def _create_vm(kvm: Kvm, stack: contextlib.ExitStack) -> Vm:
    """A VM with KVM's x86 prerequisites and the in-kernel PIC/IOAPIC/LAPIC and PIT."""
    for cap, name in ((lib.KVM_CAP_IRQCHIP, "an in-kernel irqchip"),
                      (lib.KVM_CAP_IRQFD, "irqfd"),
                      (lib.KVM_CAP_IOEVENTFD, "ioeventfd"),
                      (lib.KVM_CAP_USER_MEMORY, "user memory regions")):
        kvm.require(cap, name)
    vm = kvm.create_vm()
    stack.callback(vm.close)
    vm.set_tss_addr(layout.TSS_ADDR)
    vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
    vm.create_irqchip()
    vm.create_pit2()
    return vm


def _create_memory(vm: Vm, mem_size: int, stack: contextlib.ExitStack) -> GuestMemory:
    mem = GuestMemory(layout.ram_ranges(mem_size))
    stack.callback(mem.close)
    for region in mem.regions:
        vm.add_memory_region(region.guest_addr, region.size, mem.host_address(region))
    return mem


def _add_legacy_devices(inst: VmInstance) -> None:
    """Serial ports, i8042, CMOS/RTC, ACPI PM and the debug exit port."""
    mem_size = inst.config.mem_mib * MiB
    # Input threads (and a raw terminal) start only when the VM runs.
    inst.serials = create_serial_devices(inst.config.serial, inst.irq_interrupt, inst.stack,
                                         start_input=False)
    for port, serial in inst.serials:
        inst.add_io_device(serial, port, 8)
    inst.add_io_device(I8042(inst.events), layout.I8042_PORT, 5)
    inst.add_io_device(Cmos(mem_size), layout.CMOS_PORT, 2)
    # The SCI is level-triggered (MADT override), so drive the line, not an irqfd pulse.
    sci = CallbackInterrupt(lambda level: inst.vm.set_irq_line(layout.SCI_IRQ, level))
    inst.acpi_pm = AcpiPmDevice(inst.events, sci)
    inst.add_io_device(inst.acpi_pm, layout.ACPI_PM_BASE, layout.ACPI_PM_SIZE)
    inst.add_io_device(DebugExit(inst.events), layout.DEBUG_EXIT_PORT, 4)


def _add_pci_root(inst: VmInstance, mem_size: int) -> None:
    """The PCI root on bus 0: config mechanism 1 at 0xcf8, ECAM, MSI-X routing via KVM."""
    inst.allocator = layout.system_allocator(mem_size)
    inst.pci_root = build_pci_root(inst.vm, inst.io_bus, inst.mmio_bus, inst.allocator)
    inst.stack.callback(inst.pci_root.close)
    # Devices map host memory into the guest through this (VmMemoryRequest). The ExitStack
    # unwinds in reverse: in-process devices shut down before it closes, device processes
    # are destroyed after (by the PCI root); their late requests find the server gone.
    inst.vm_memory = VmMemoryController(inst.vm, inst.allocator)
    inst.stack.callback(inst.vm_memory.close)
    inst.vm_memory_server = VmMemoryServer(inst.vm_memory)
    inst.stack.callback(inst.vm_memory_server.close)
    # Watches the device processes; stopped before the PCI root destroys the proxies.
    inst.supervisor = SandboxSupervisor(inst.events)
    inst.stack.callback(inst.supervisor.stop)


def _device_model(record: PluginRecord, device: DeviceConfig, ctx: DeviceContext) -> object:
    """Run a device plugin's factory (in the main process, before any fork)."""
    try:
        return load_factory(record.spec)(dict(device.options), ctx)
    except VmmError:
        raise
    except Exception as e:  # a plugin bug or an OSError opening its files: one line
        raise VmmError(f"device {ctx.name}: {type(e).__name__}: {e}") from e


def jail_policies(record: PluginRecord, used: Mapping[str, Iterable[str]],
                  options: Mapping[str, object] | None = None) -> list[Path]:
    """The policy files of a device's jail: its plugin's, those its sandbox_policies
    names for these options, plus, for each kind in its policy_with, those of the plugins
    of that kind whose code runs in the device process.
    ``used`` is what its factory opened (registry.track_plugin_use: the disk formats of
    its image and backing files, its display); for a kind with nothing recorded (a
    plugin that loads them some other way) every installed plugin of the kind counts."""
    if record.policy_path is None:
        raise ConfigError(f"device {record.name} ships no seccomp policy; "
                          "run it with --disable-sandbox")
    registry = get_registry()
    policies = [record.policy_path]
    extra = record.spec.sandbox_policies
    for name in extra(dict(options or {})) if extra else ():
        path = record.policy_path.parent / name
        if not path.is_file():
            raise ConfigError(f"device {record.name}: its seccomp policy file {path} "
                              "is missing")
        policies.append(path)
    for kind in record.spec.policy_with:
        for name in sorted(used.get(kind, ())) or registry.names(kind):
            other = registry.get(kind, name)
            if other is not None and not other.broken and other.policy_path is not None \
                    and other.policy_path not in policies:
                policies.append(other.policy_path)
    return policies


def used_companions(record: PluginRecord, used: Mapping[str, Iterable[str]]
                    ) -> list[PluginRecord]:
    """The plugins of record's policy_with kinds that its factory really opened (a GPU's
    display=window): their code runs in the device process, so what they declare for the
    jail joins it. Unlike jail_policies there is no fall-back to every installed plugin:
    a bind mount or a preload is only granted to a plugin known to be in use."""
    registry = get_registry()
    found = []
    for kind in record.spec.policy_with if record.spec else ():
        for name in sorted(used.get(kind, ())):
            other = registry.get(kind, name)
            if other is not None and not other.broken and other.spec is not None:
                found.append(other)
    return found


def jail_binds_and_preload(record: PluginRecord, used: Mapping[str, Iterable[str]],
                           options: Mapping[str, object]
                           ) -> tuple[list[tuple[str, str, bool]], tuple[str, ...]]:
    """The bind mounts and preloaded modules of a device's jail (API 1.6): what its
    plugin declares for these options, plus what the plugins it uses (used_companions)
    declare for the same options, e.g. display=window's X11 socket and SDL's libraries."""
    binds: list[tuple[str, str, bool]] = []
    preload: list[str] = []
    for spec in [record.spec] + [c.spec for c in used_companions(record, used)]:
        if spec is None:
            continue
        for entry in spec.sandbox_binds(dict(options)) if spec.sandbox_binds else ():
            if _bind_mount(entry) not in binds:
                binds.append(_bind_mount(entry))
        preload += [m for m in spec.sandbox_preload if m not in preload]
    return binds, tuple(preload)


def _jail(inst: VmInstance, record: PluginRecord, device: DeviceConfig,
          used: Mapping[str, Iterable[str]]) -> JailConfig:
    """The device process's jail: its policies (jail_policies), the binds and preloads
    its plugin and the plugins it uses declare (jail_binds_and_preload)."""
    policies = jail_policies(record, used, device.options)
    binds, preload = jail_binds_and_preload(record, used, device.options)
    return JailConfig(
        seccomp=compile_policy(policies, log_failures=inst.config.seccomp_log_failures),
        binds=binds, preload=preload)


def _bind_mount(entry: object) -> tuple[str, str, bool]:
    """A sandbox_binds entry as a JailConfig bind: a path (read-write) or (path, writable)."""
    if isinstance(entry, tuple):
        path, writable = entry
        return str(path), str(path), bool(writable)
    return str(entry), str(entry), True


def _create_device(inst: VmInstance, device: DeviceConfig, index: int) -> PciDevice:
    """A --device plugin as a PCI device: in a jailed process of its own (a
    ProxyDevice), or in this process with --disable-sandbox."""
    record = get_registry().get("device", device.name)
    if record is None or record.spec is None:
        raise ConfigError(f"device {device.name} is not installed")
    name = f"{record.name}{index}"
    sandboxed = not inst.config.disable_sandbox
    # A device process cannot use this process's KVM fds: its VmMemoryRequests cross a
    # socket to the server here, which maps the memory.
    vm_memory = inst.vm_memory_server.channel() if sandboxed else inst.vm_memory
    ctx = DeviceContext(name=name, index=index, mem_size=inst.config.mem_mib * MiB,
                        vm_memory=vm_memory)
    try:
        with track_plugin_use() as used:
            model = _device_model(record, device, ctx)
        if not isinstance(model, VirtioDevice | PciDevice):
            raise VmmError(f"device {name}: the plugin's factory returned "
                           f"{type(model).__name__}, not a VirtioDevice or PciDevice")
    except BaseException:
        if sandboxed:
            vm_memory.sock.close()      # no device process will use this channel
        raise

    def build(mem: GuestMemory) -> PciDevice:
        if isinstance(model, VirtioDevice):
            return VirtioPciDevice(model, mem, label=name)
        return model

    if not sandboxed:
        if isinstance(model, VirtioDevice):
            inst.stack.callback(model.shutdown)
        return build(inst.mem)
    try:
        keep = [*model.keep_fds(), vm_memory.fileno()]
        proxy = ProxyDevice(build, inst.mem, label=name, jail=_jail(inst, record, device, used),
                            keep_fds=keep)
    finally:
        # The device process has its own copies now (or there is none): the model's
        # files and the channel's end are not this process's to keep.
        vm_memory.sock.close()
        _release_model(model)
    return inst.supervisor.add(proxy)


def _release_model(model: VirtioDevice | PciDevice) -> None:
    """Close, in the main process, what a sandboxed device's model opened here."""
    try:
        if isinstance(model, VirtioDevice):
            model.shutdown()
        else:
            model.destroy()
    except Exception:  # only our copies are at stake; the device process is unaffected
        log.warning("closing the main process's copy of a device model failed",
                    exc_info=True)


def _add_plugin_devices(inst: VmInstance) -> None:
    """The --device plugins, on PCI bus 0 in command-line order (so vda comes first)."""
    counts: dict[str, int] = {}
    for device in inst.config.devices:
        index = counts.get(device.name, 0)
        counts[device.name] = index + 1
        assert inst.pci_root is not None
        pci_device = _create_device(inst, device, index)
        try:
            inst.pci_root.add_device(pci_device)
        except BaseException:
            pci_device.destroy()        # never placed: nobody else would end it
            raise
        inst.plugin_devices.append((device, pci_device))
    _start_in_process(inst)
    call_hook("vmm_devices_created", vm=inst, devices=list(inst.plugin_devices))
    # Threads only now: every device process has been forked.
    inst.supervisor.start()
    inst.vm_memory_server.start()


def _start_in_process(inst: VmInstance) -> None:
    """on_device_sandboxed() of the devices that run here (--disable-sandbox); a device
    process ran its own before answering INIT. Only once every device exists: what a
    device starts (virglrenderer's Mesa threads) must not precede a fork."""
    for _, pci_device in inst.plugin_devices:
        if not isinstance(pci_device, ProxyDevice):
            start_device(pci_device)


def build_vm(config: VmConfig, kvm: Kvm | None = None) -> VmInstance:
    """Everything of a VM but running it; raises (having cleaned up) on any failure."""
    stack = contextlib.ExitStack()
    try:
        call_hook("vmm_configure", config=config)
        if kvm is None:
            kvm = Kvm(str(config.kvm_device))
            stack.callback(kvm.close)
        if config.cpus > kvm.max_vcpus():
            raise ConfigError(f"--cpus {config.cpus}: this KVM allows at most "
                              f"{kvm.max_vcpus()} vCPUs")
        mem_size = config.mem_mib * MiB
        install_kick_handler()    # here: build_vm runs on the main thread, run() may not
        vm = _create_vm(kvm, stack)
        mem = _create_memory(vm, mem_size, stack)
        inst = VmInstance(config, kvm, vm, mem, Bus("io"), Bus("mmio"), VmEventSink(),
                          stack=stack)
        _add_legacy_devices(inst)
        _add_pci_root(inst, mem_size)
        call_hook("vmm_vm_created", vm=inst, memory=mem, allocator=inst.allocator)
        _add_plugin_devices(inst)
        # console=/earlycon= from --serial and plugins first, so -p can override them.
        plugin_params = [p for params in call_hook("vmm_kernel_cmdline", config=config)
                         for p in params]
        cmdline = " ".join([*inst.serials.kernel_params(), *plugin_params,
                            config.cmdline]).strip()
        inst.kernel = load_kernel(mem, _kernel_path(config), cmdline, config.initrd, mem_size)
        build_acpi_tables(mem, config.cpus, ecam=ECAM)
        _create_vcpus(inst)
        return inst
    except BaseException:
        stack.close()
        raise


def _create_vcpus(inst: VmInstance) -> None:
    supported = inst.kvm.supported_cpuid()
    tsc_deadline = bool(inst.kvm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER))
    long_mode = setup_long_mode(inst.mem)
    for vcpu_id in range(inst.config.cpus):
        vcpu = inst.vm.create_vcpu(vcpu_id)
        inst.stack.callback(vcpu.close)
        boot = (long_mode, boot_regs(inst.kernel)) if vcpu_id == 0 and inst.kernel else None
        configure_vcpu(vcpu, supported, inst.config.cpus, boot, tsc_deadline)
        inst.loops.append(VcpuRunLoop(vcpu, inst.io_bus, inst.mmio_bus, inst.events))
