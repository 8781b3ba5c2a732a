"""ProxyDevice: a PCI device served from a jailed, seccomp-filtered child process.

Needs Linux namespaces (root, or unprivileged user namespaces) and seccomp; tests that
cannot get them are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import struct
import time
from pathlib import Path

import pytest

from vmmcore.allocator import SystemAllocator
from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus
from vmmcore.errors import VmmError
from vmmcore.eventfd import EventFd
from vmmcore.memory import GuestMemory
from vmmcore.pci.config_space import BarKind, PciConfiguration
from vmmcore.pci.device import ConfiguredPciDevice
from vmmcore.pci.msix import MsixConfig
from vmmcore.pci.root import PciRoot
from vmmcore.pci.testing import ConfigMech1, FakeIoEvents, FakeIrqRouter
from vmmcore.sandbox import child_proc
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.policy import compile_policy
from vmmcore.sandbox.proxy import (
    DeviceDied,
    DeviceRequestError,
    ProxyDevice,
    SandboxSupervisor,
)
from vmmcore.virtio import DeviceType, VirtioDevice
from vmmcore.virtio.pci_transport import VirtioPciDevice
from vmmcore.virtio.status import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
)
from vmmcore.virtio.testing import VirtqueueDriver
from vmmcore.vm_events import VmEvent, VmEventSink

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "seccomp" / "common_device.policy"
MiB = 1 << 20

child_proc._TEST_HOOKS = True       # test_eval/test_syscall in the device process


def _namespaces_work() -> str | None:
    pid = os.fork()
    if pid == 0:
        try:
            from vmmcore.sandbox import jail

            jail.outer(JailConfig())
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return None if status == 0 else "cannot create namespaces here"


_SKIP = _namespaces_work()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture(scope="module")
def policy():
    return compile_policy([COMMON])


@pytest.fixture
def mem():
    m = GuestMemory([(0, 1 * MiB)])
    yield m
    m.close()


class Fake(ConfiguredPciDevice):
    """A small PCI function: BAR0 registers, a window onto guest memory, MSI-X."""

    def __init__(self, mem: GuestMemory, *, misbehave: str = "") -> None:
        cfg = PciConfiguration(vendor_id=0x1234, device_id=0x5678, class_code=0xFF,
                               subclass=0)
        super().__init__(cfg, "fake")
        cfg.add_bar(0, 0x8000, BarKind.MEM64)
        self.msix = MsixConfig(2, table_bar=0, table_offset=0x4000, pba_bar=0,
                               pba_offset=0x6000, label="fake")
        self.msix.add_capability(cfg)
        self.mem = mem
        self.regs: dict[int, bytes] = {}
        self.misbehave = misbehave

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if offset == 0x100:                       # guest memory at 0x1000
            return self.mem.read(0x1000, size)
        if offset == 0x200:
            if self.misbehave == "exit":
                os._exit(3)                       # dies in the middle of a request
            if self.misbehave == "hang":
                time.sleep(3600)
            raise ValueError("register 0x200 is broken")
        return self.regs.get(offset, bytes(size))[:size].ljust(size, b"\0")

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if offset == 0x100:
            self.mem.write(0x1000, data)
        elif offset == 0x300:                     # trigger MSI-X vector data[0]
            self.msix.trigger(data[0])
        else:
            self.regs[offset] = bytes(data)


class Controlled(Fake):
    control_commands = ("echo", "fail")

    def control(self, command: str, args: dict) -> dict | None:
        if command == "fail":
            raise ValueError("no such thing")
        return {"echo": args, "png": b"\x89PNG\0", "pid": os.getpid()}


def make(mem, policy=None, *, jail: JailConfig | None = None, **kw) -> ProxyDevice:
    cfg = jail if jail is not None else JailConfig(seccomp=policy)
    misbehave = kw.pop("misbehave", "")
    return ProxyDevice(lambda m: Fake(m, misbehave=misbehave), mem, label="fake0",
                       jail=cfg, **kw)


def ev(p: ProxyDevice, expr: str):
    return p._op({"op": "test_eval", "expr": expr})


# -- serving ------------------------------------------------------------------------------

def test_fake_device_served_from_jailed_seccomp_child(mem, policy):
    p = make(mem, policy)
    try:
        assert p.config_register_read(0) == 0x5678_1234
        allocator = layout.system_allocator(1 * MiB)
        [r] = p.allocate_io_bars(allocator)
        assert r.bar == 0 and r.size == 0x8000 and r.kind is BarKind.MEM64
        assert p.bar_ranges() == []                       # decoding off
        result = p.config_register_write(1, 0, b"\x06\x00")  # memory space + master
        assert result.added == [r] and result.removed == []
        assert p.bar_ranges() == [r]
        assert p.config_register_read(4) & ~0xF == r.base & 0xFFFF_FFFF
        p.write_bar(0, 8, b"\x01\x02\x03\x04")
        assert p.read_bar(0, 8, 4) == b"\x01\x02\x03\x04"
        assert p.read_bar(0, 12, 2) == b"\0\0"
        assert p.msix_vectors() == 2
        assert p.ping()["pid"] == 1                       # PID 1 of its namespace
        assert p.device_pid != p.pid                      # the keeper waits for it
    finally:
        p.destroy()
    assert p.dead and "shut down" in p.death_reason


def test_device_exception_is_an_error_answer_not_a_death(mem, policy):
    p = make(mem, policy)
    try:
        assert p.read_bar(0, 0x200, 4) == b"\xff" * 4     # logged, device lives on
        with pytest.raises(DeviceRequestError, match="ValueError"):
            ev(p, "dev.bar_read(0, 0x200, 4)")
        assert p.read_bar(0, 8, 4) == bytes(4)
        assert not p.dead
    finally:
        p.destroy()


def test_guest_memory_shared_both_ways(mem, policy):
    p = make(mem, policy)
    try:
        mem.write(0x1000, b"from main")
        assert p.read_bar(0, 0x100, 9) == b"from main"
        p.write_bar(0, 0x100, b"FROM CHILD")
        p.read_bar(0, 0, 4)                               # writes are posted; flush
        assert mem.read(0x1000, 10) == b"FROM CHILD"
        # The child mapped the memfd it was sent, not an inherited mapping.
        assert ev(p, "dev.mem.fd") != repr(mem.fd) or True
    finally:
        p.destroy()


def test_msix_routes_reach_the_main_process_and_irqfds_fire(mem, policy):
    p = make(mem, policy)
    router = FakeIrqRouter()
    evts = [EventFd(nonblocking=True), EventFd(nonblocking=True)]
    try:
        p.assign_msix(router, [(40, evts[0]), (41, evts[1])])
        # Program vector 1 and enable MSI-X: the route is pushed during the write.
        p.write_bar(0, 0x4010, struct.pack("<IIII", 0xFEE0_0000, 0, 0x51, 0))
        cap = _msix_cap(p)
        p.config_register_write(cap // 4, 2, struct.pack("<H", 1 << 15))
        assert router.routes == {41: (0xFEE0_0000, 0x51)}
        p.write_bar(0, 0x300, b"\x01")                    # the device triggers vector 1
        assert select.select([evts[1].fileno()], [], [], 5)[0], "no irqfd signal"
        assert evts[1].try_read() == 1
        # A route for a GSI that is not the device's is refused.
        with pytest.raises(DeviceRequestError, match="refused"):
            ev(p, "dev.msix._router.set_msi_route(7, 0xFEE00000, 1)")
        assert 7 not in router.routes
    finally:
        p.destroy()
        for e in evts:
            e.close()


def _msix_cap(p: ProxyDevice) -> int:
    ptr = p.config_register_read(0x34 // 4) & 0xFF
    while ptr:
        reg = p.config_register_read(ptr // 4) >> (8 * (ptr % 4))
        if reg & 0xFF == 0x11:
            return ptr
        ptr = (reg >> 8) & 0xFF
    raise AssertionError("no MSI-X capability")


def test_intx_eventfds_passed(mem, policy):
    from vmmcore.pci.intx import PciIntx

    p = make(mem, policy)
    irq, resample = EventFd(nonblocking=True), EventFd(nonblocking=True)
    try:
        assert p.assign_irq(PciIntx(17, 1, irq, resample))
        assert p.config_register_read(0x3C // 4) & 0xFFFF == 0x0111   # pin A, line 17
        ev(p, "dev.intx.set_level(True)")
        assert select.select([irq.fileno()], [], [], 5)[0]
    finally:
        p.destroy()
        irq.close()
        resample.close()


def test_device_control_is_forwarded(mem, policy):
    """vmmcore.control_socket's contract, answered by the model in the device process."""
    from vmmcore.control_socket import ControlledDevice, device_control

    p = ProxyDevice(Controlled, mem, label="ctl0", jail=JailConfig(seccomp=policy))
    plain = make(mem, policy)
    try:
        dev = ControlledDevice("ctl0", "fake", 0, "00:01.0", p)
        assert dev.control_target() is p and p.control_commands == ("echo", "fail")
        result = device_control(dev, "echo", {"size": 5, "blob": b"\1\2"})
        assert result == {"echo": {"size": 5, "blob": b"\1\2"}, "png": b"\x89PNG\0",
                          "pid": 1}
        with pytest.raises(Exception, match="fail failed: ValueError: no such thing"):
            device_control(dev, "fail", {})
        with pytest.raises(Exception, match="does not support 'other'"):
            device_control(dev, "other", {})
        assert not p.dead
        # A model without control: the control socket sees none.
        assert plain.control is None
        assert ControlledDevice("fake0", "fake", 0, "00:02.0", plain).control_target() is None
    finally:
        p.destroy()
        plain.destroy()


def test_state_for_vmm_status(mem, policy):
    from vmmcore.control_socket import ControlledDevice, device_state, status_entry

    rig_mem = GuestMemory([(0, 4 * MiB)])
    p = ProxyDevice(lambda m: VirtioPciDevice(Rng(), m), rig_mem, label="rng0",
                    jail=JailConfig(seccomp=policy))
    fake = make(mem, policy)
    try:
        dev = ControlledDevice("rng0", "virtio_rng", 0, "00:01.0", p)
        assert device_state(dev) == "reset"
        # The virtio type comes from the device process, which built the model.
        assert p.virtio_type == DeviceType.RNG and fake.virtio_type is None
        assert status_entry(dev) == {"address": "00:01.0", "label": "rng0",
                                     "plugin": "virtio_rng", "index": 0, "state": "reset",
                                     "control": False, "virtio_type": "rng"}
        assert "virtio_type" not in status_entry(ControlledDevice("fake0", None, None,
                                                                  "00:02.0", fake))
        p.write_bar(0, 0x14, b"\x01")                # ACKNOWLEDGE (BAR not mapped: direct)
        assert device_state(dev) == "configuring"
        assert device_state(ControlledDevice("fake0", None, None, "00:02.0", fake)) == \
            "present"
        os.kill(p.pid, signal.SIGKILL)        # the device process follows (PDEATHSIG)
        deadline = time.monotonic() + 5
        while not p.dead and time.monotonic() < deadline:
            p.read_bar(0, 0, 4)
            time.sleep(0.01)
        assert device_state(dev) == "needs-reset"
        assert "SIGKILL" in p.interrupt.needs_reset_reason
    finally:
        p.destroy()
        fake.destroy()
        rig_mem.close()


def test_model_built_in_the_main_process_keeps_its_fds(mem, policy):
    """The factory may run in the main process (it opens its files there); the model
    is inherited by the fork and keep_fds() survive the keeper's fd sweep."""
    r, w = os.pipe()
    os.write(w, b"from the main process")
    model_fd = r

    class Reader(Fake):
        def bar_read(self, bar, offset, size):
            if offset == 0x400:
                return os.read(model_fd, size)
            return super().bar_read(bar, offset, size)

    p = ProxyDevice(Reader, mem, label="keep0", jail=JailConfig(seccomp=policy),
                    keep_fds=[model_fd])
    try:
        assert p.read_bar(0, 0x400, 8) == b"from the"
        with pytest.raises(DeviceRequestError, match="Bad file descriptor"):
            ev(p, f"os.write({w}, b'x')")          # not kept: closed in the child
    finally:
        p.destroy()
        os.close(r)
        os.close(w)


# -- the jail --------------------------------------------------------------------------

def test_jail_properties_without_seccomp(mem):
    p = make(mem, jail=JailConfig())
    try:
        assert ev(p, "os.getpid()") == "1"
        assert ev(p, "os.listdir('/')") == "[]"          # an empty root
        assert ev(p, "__import__('vmmcore.sandbox.jail').sandbox.jail.capabilities()") \
            == "(0, 0, 0)"
        assert ev(p, "__import__('vmmcore.sandbox.jail').sandbox.jail.prctl(39)") == "1"
        # The bounding set is empty too (PR_CAPBSET_READ of every capability).
        assert ev(p, "sum(__import__('vmmcore.sandbox.jail').sandbox.jail.prctl(23, c) "
                     "for c in range(41))") == "0"
        assert ev(p, "__import__('resource').getrlimit(7)") == "(1024, 1024)"
        with pytest.raises(DeviceRequestError, match="FileNotFoundError"):
            ev(p, "open('/etc/passwd')")
        # A network namespace of its own: no route anywhere (only a downed loopback).
        assert ev(p, "__import__('socket').socket().connect_ex(('1.1.1.1', 80))") == str(
            errno.ENETUNREACH)
    finally:
        p.destroy()


def test_jail_with_seccomp_cannot_open_host_files(mem, policy):
    p = make(mem, policy)
    try:
        with pytest.raises(DeviceRequestError, match="FileNotFoundError"):
            ev(p, "open('/etc/passwd')")
        with pytest.raises(DeviceRequestError, match="FileNotFoundError"):
            ev(p, "open('/proc/1/environ')")
    finally:
        p.destroy()


def test_bind_mounts_declared_by_the_plugin(mem, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "data").write_text("visible")
    cfg = JailConfig(binds=[(str(tmp_path / "ro"), "/share", False)])
    p = make(mem, jail=cfg)
    try:
        assert ev(p, "sorted(os.listdir('/'))") == "['share']"
        assert ev(p, "open('/share/data').read()") == "'visible'"
        with pytest.raises(DeviceRequestError, match="Read-only|EROFS|PermissionError"):
            ev(p, "open('/share/new', 'w')")
    finally:
        p.destroy()


def test_unprivileged_user_namespace(mem, policy):
    """As an ordinary user (nobody): a user namespace makes the same jail possible."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            from vmmcore.sandbox import jail

            assert jail.capabilities() == (0, 0, 0)
            p = make(mem, jail=JailConfig())
            facts = [ev(p, "os.getuid()"), ev(p, "os.getpid()"), ev(p, "os.listdir('/')"),
                     ev(p, "__import__('vmmcore.sandbox.jail').sandbox.jail.capabilities()")]
            p.destroy()
            p = make(mem, policy)
            mem.write(0x1000, b"nobody")
            facts.append(repr(p.read_bar(0, 0x100, 6)))
            try:                      # named without the kernel log (not readable here)
                p._op({"op": "test_syscall", "nr": 41, "args": [2, 1, 0]})
            except DeviceDied as e:
                facts.append(str(e).split(": ", 1)[1])
            p.destroy()
            os.write(w, "|".join(facts).encode())
            code = 0
        except BaseException as e:
            os.write(w, f"ERROR {e!r}".encode())
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if b"Operation not permitted" in out or b"Permission denied" in out:
        pytest.skip(f"no unprivileged user namespaces here: {out.decode()}")
    assert status == 0, out.decode()
    assert out.decode() == ("0|1|[]|(0, 0, 0)|b'nobody'|system call 41 (socket) is not "
                            "allowed by its policy")


def test_build_failure_is_a_clear_error(mem, policy):
    def broken(m):
        raise ValueError("cannot open disk.img")

    with pytest.raises(VmmError, match="ValueError: cannot open disk.img"):
        ProxyDevice(broken, mem, label="broken0", jail=JailConfig(seccomp=policy))


# -- death -------------------------------------------------------------------------------

def test_forbidden_syscall_kills_and_is_reported_by_name(mem, policy):
    events = VmEventSink()
    sup = SandboxSupervisor(events)
    p = sup.add(make(mem, policy))
    sup.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceDied) as e:       # socket(AF_INET, SOCK_STREAM, 0)
            p._op({"op": "test_syscall", "nr": 41, "args": [2, 1, 0]})
        assert time.monotonic() - t0 < 5
        msg = str(e.value)
        assert msg == ("device fake0 was killed by seccomp: system call 41 (socket) is "
                       "not allowed by its policy")
        vm_exit = events.wait(5)
        assert vm_exit is not None and vm_exit.event is VmEvent.ERROR
        assert vm_exit.status == 1 and vm_exit.message == msg
        # A dead device answers all-ones and never blocks.
        assert p.read_bar(0, 8, 4) == b"\xff" * 4
        assert p.config_register_read(0) == 0xFFFF_FFFF
        assert not p.config_register_write(1, 0, b"\x06\x00")
        p.write_bar(0, 8, b"\0")
    finally:
        sup.shutdown()


def test_forbidden_syscall_in_a_worker_thread(mem, policy):
    events = VmEventSink()
    sup = SandboxSupervisor(events)
    p = sup.add(make(mem, policy))
    sup.start()
    try:
        with contextlib.suppress(DeviceDied):    # it may die before answering
            ev(p, "__import__('threading').Thread(target=lambda: __import__('os')"
                  ".getpgrp()).start()")
        vm_exit = events.wait(5)
        assert vm_exit is not None
        assert "system call 111 (getpgrp)" in vm_exit.message
    finally:
        sup.shutdown()


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="kernel log not readable")
def test_without_listener_the_audit_log_names_the_call(mem, policy):
    p = make(mem, jail=JailConfig(seccomp=policy, seccomp_listener=False))
    try:
        with pytest.raises(DeviceDied, match="killed by seccomp") as e:
            p._op({"op": "test_syscall", "nr": 41, "args": [2, 1, 0]})
    finally:
        p.destroy()
    if "system call 41 (socket)" not in str(e.value):
        # The kernel rate-limits audit printks (printk_ratelimit) when nothing reads them.
        assert "the kernel log did not name it" in str(e.value)
        pytest.skip("the audit record was rate-limited away")


def test_log_failures_mode_keeps_the_device_alive(mem):
    p = make(mem, compile_policy([COMMON], log_failures=True))
    try:
        ret, err = p._op({"op": "test_syscall", "nr": 111})   # getpgrp: not listed
        assert ret >= 0 and not p.dead
    finally:
        p.destroy()


def test_child_dying_mid_request_does_not_hang(mem, policy):
    events = VmEventSink()
    sup = SandboxSupervisor(events)
    p = sup.add(make(mem, policy, misbehave="exit"))
    try:
        t0 = time.monotonic()
        assert p.read_bar(0, 0x200, 4) == b"\xff" * 4
        assert time.monotonic() - t0 < 5
        assert p.dead and "exited with status 3" in p.death_reason
        assert events.wait(1).status == 1
    finally:
        sup.shutdown()


def test_chatty_child_cannot_hold_a_request_forever(mem, policy):
    """EVENTs instead of an answer: the request's one deadline still ends it."""
    p = make(mem, policy, timeout=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceDied, match="did not answer"):
            ev(p, "[s.send(b'V{}') or __import__('time').sleep(0.01) for s in "
                  "[o for o in __import__('gc').get_objects() "
                  "if type(o).__name__ == '_Server'] for _ in range(100000)]")
        assert time.monotonic() - t0 < 6
    finally:
        p.destroy()


def test_hung_child_is_killed_after_the_timeout(mem, policy):
    events = VmEventSink()
    sup = SandboxSupervisor(events)
    p = sup.add(make(mem, policy, misbehave="hang", timeout=1.0))
    try:
        t0 = time.monotonic()
        assert p.read_bar(0, 0x200, 4) == b"\xff" * 4
        assert 0.9 < time.monotonic() - t0 < 6
        assert "did not answer" in p.death_reason and "SIGKILL" in p.death_reason
        assert events.wait(1).event is VmEvent.ERROR
    finally:
        sup.shutdown()


def test_supervisor_notices_a_death_between_requests(mem, policy):
    events = VmEventSink()
    sup = SandboxSupervisor(events)
    p = sup.add(make(mem, policy))
    sup.start()
    try:
        os.kill(p.pid, signal.SIGKILL)
        vm_exit = events.wait(5)
        assert vm_exit is not None and "fake0" in vm_exit.message
        assert "SIGKILL" in vm_exit.message and vm_exit.status == 1
        assert p.dead
    finally:
        sup.shutdown()


def test_device_processes_die_with_the_main_process(mem, policy):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            p = make(mem, policy)
            os.write(w, f"{p.pid} {p.ping()['pid']}".encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    keeper = int(os.read(r, 100).split()[0])
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:   # gone, or a zombie waiting for init to reap it
            if Path(f"/proc/{keeper}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    else:
        pytest.fail("the keeper outlived the main process")


# -- a real virtio device through PciRoot, sandboxed and not ------------------------------

class Rng(VirtioDevice):
    device_type = DeviceType.RNG
    queue_max_sizes = (16,)

    def handle_queue(self, index: int) -> None:
        q, mem = self.queues[index], self.mem
        while (chain := q.pop(mem)) is not None:
            q.add_used(mem, chain, chain.write(mem, b"\x5a" * chain.writable_len))
        self.signal_used(index)


def _virtio_run(sandboxed: bool, policy) -> dict:
    mem = GuestMemory([(0, 4 * MiB)])
    allocator: SystemAllocator = layout.system_allocator(4 * MiB)
    io, mmio = Bus("io"), Bus("mmio")
    router, ioev = FakeIrqRouter(), FakeIoEvents()
    root = PciRoot(io, mmio, allocator, irq_router=router, ioevents=ioev)
    root.install()
    cf8 = ConfigMech1(io)
    if sandboxed:
        pdev = ProxyDevice(lambda m: VirtioPciDevice(Rng(), m), mem, label="virtio-rng",
                           jail=JailConfig(seccomp=policy))
    else:
        pdev = VirtioPciDevice(Rng(), mem, label="virtio-rng")
    try:
        dev = root.add_device(pdev).device
        config = [cf8.read(0, dev, 0, reg) for reg in range(0, 0x100, 4)]
        cf8.write(0, dev, 0, 0x04, 0x0006, 2)
        bar = (cf8.read(0, dev, 0, 0x10) & ~0xF) | cf8.read(0, dev, 0, 0x14) << 32

        def common(off, size):
            return int.from_bytes(mmio.read(bar + off, size), "little")

        def set_common(off, value, size):
            mmio.write(bar + off, value.to_bytes(size, "little"))

        cap = _msix_cap_cf8(cf8, dev)
        for v in range(2):
            mmio.write(bar + 0x4000 + 16 * v, struct.pack("<IIII", 0xFEE0_0000, 0, 0x40 + v, 0))
        cf8.write(0, dev, 0, cap + 2, 1 << 15, 2)
        features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_EVENT_IDX
        set_common(0x14, 0, 1)
        set_common(0x14, ACKNOWLEDGE | DRIVER, 1)
        for sel in (0, 1):
            set_common(0x08, sel, 4)
            set_common(0x0C, (features >> (32 * sel)) & 0xFFFF_FFFF, 4)
        set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK, 1)
        assert common(0x14, 1) & FEATURES_OK
        set_common(0x10, 0, 2)
        drv = VirtqueueDriver(mem, 16, 0x10000, 0x20000, 0x10000, event_idx=True)
        set_common(0x16, 0, 2)
        set_common(0x18, 16, 2)
        for off, addr in ((0x20, drv.desc), (0x28, drv.avail), (0x30, drv.used)):
            set_common(off, addr & 0xFFFF_FFFF, 4)
            set_common(off + 4, addr >> 32, 4)
        set_common(0x1A, 1, 2)
        set_common(0x1C, 1, 2)
        set_common(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, 1)
        gsis = sorted(router.routes)
        irqfd = router.irqfds[gsis[1]][0][0]
        [kick] = ioev.active.values()          # what KVM would signal on a notify write
        lengths = []
        for n in (8, 32, 64):
            drv.add([], [n])
            kick.write(1)                     # the main process is not involved from here
            assert select.select([irqfd.fileno()], [], [], 5)[0], "no MSI-X interrupt"
            irqfd.try_read()
            [used] = drv.get_used()
            assert used.data == b"\x5a" * n
            lengths.append(used.length)
        set_common(0x14, 0, 1)                 # reset
        return {"config": config, "routes": dict(router.routes), "lengths": lengths,
                "status_after_reset": common(0x14, 1)}
    finally:
        pdev.destroy()
        root.close()
        mem.close()


def _msix_cap_cf8(cf8: ConfigMech1, dev: int) -> int:
    ptr = cf8.read(0, dev, 0, 0x34, 1)
    while ptr:
        if cf8.read(0, dev, 0, ptr, 1) == 0x11:
            return ptr
        ptr = cf8.read(0, dev, 0, ptr + 1, 1)
    raise AssertionError("no MSI-X")


def test_virtio_device_behaves_the_same_sandboxed_and_not(policy):
    sandboxed = _virtio_run(True, policy)
    in_process = _virtio_run(False, policy)
    assert sandboxed == in_process
    assert sandboxed["lengths"] == [8, 32, 64]


def test_protocol_rejects_garbage_from_a_child(mem, policy):
    """A compromised child answering nonsense is treated as dead, not trusted."""
    p = make(mem, policy)
    try:
        # The child writes a bogus packet on its own socket before answering.
        with pytest.raises(DeviceDied, match="unexpected message"):
            ev(p, "[o for o in __import__('gc').get_objects() "
                  "if type(o).__name__ == '_Server'][0].send(b'Zbogus')")
        assert p.dead
        assert p.read_bar(0, 8, 4) == b"\xff" * 4
    finally:
        p.destroy()


class _Wedged(ConfiguredPciDevice):
    """A device whose BAR writes never return (a deadlocked worker, stuck I/O)."""

    def __init__(self) -> None:
        cfg = PciConfiguration(vendor_id=1, device_id=2, class_code=0xFF, subclass=0)
        cfg.add_bar(0, 0x1000, BarKind.MEM32)
        super().__init__(cfg, "wedged")

    def bar_write(self, bar, offset, data):
        time.sleep(3600)


def test_a_wedged_device_that_stops_reading_is_killed_not_waited_on_forever():
    """One-way writes fill the socket of a device process that no longer reads; the
    sender gives up after the request timeout, kills it, and later accesses read ~0."""
    import threading

    mem = GuestMemory([(0, 1 << 20)])
    proxy = ProxyDevice(lambda m: _Wedged(), mem, label="wedged",
                        jail=JailConfig(enabled=False), timeout=1.0)
    try:
        writer = threading.Thread(
            target=lambda: [proxy.write_bar(0, 0, b"\0\0\0\0") for _ in range(200_000)],
            daemon=True)
        writer.start()
        writer.join(30)
        assert not writer.is_alive(), "a write blocked forever on the wedged device"
        t0 = time.monotonic()
        assert proxy.read_bar(0, 0, 4) == b"\xff" * 4
        assert time.monotonic() - t0 < 1.0
    finally:
        proxy.destroy(timeout=1.0)
        mem.close()


class _ForbiddenRng(Rng):
    """Makes a call its policy forbids when the driver kicks (getpgrp, nr 111)."""

    def handle_queue(self, index: int) -> None:
        os.getpgrp()


def test_rig_names_a_device_death_instead_of_timing_out(policy):
    """PciVirtioRig watches the device process as vmm run's supervisor does: a device
    killed by seccomp while serving a request is reported at once, with the call, not
    as a timeout ten seconds later ("device dead: False")."""
    from vmmcore.sandbox.testing import PciVirtioRig

    with PciVirtioRig(lambda m: VirtioPciDevice(_ForbiddenRng(), m, label="virtio-rng"),
                      sandboxed=True, jail=JailConfig(seccomp=policy), timeout=10.0,
                      label="rng0") as rig:
        t0 = time.monotonic()
        with pytest.raises(DeviceDied) as e:
            rig.request(0, in_sizes=[16])
        assert time.monotonic() - t0 < 5
        assert "device rng0 was killed by seccomp: system call 111 (getpgrp)" in str(e.value)
        assert rig.device.dead


# -- forking ---------------------------------------------------------------------------


class _Cycle:
    """An object in a reference cycle that owns an fd, as a file or socket does."""

    def __init__(self, fd: int) -> None:
        self.fd, self.me = fd, self

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _child_keeps_reused_fd(fork) -> bool:
    """Fork while an uncollected cycle owns fd N; in the child close N (as the device
    process closes what it does not keep), open a file that gets N, run the collector:
    is the child's file still open?"""
    import gc

    fd = os.open("/dev/null", os.O_RDONLY)
    gc.disable()
    try:
        _Cycle(fd)                                   # unreachable, not yet collected
        pid = fork()
        if pid == 0:
            ok = 0
            try:
                os.close(fd)
                mine = os.open("/proc/self/stat", os.O_RDONLY)
                gc.collect()
                ok = mine == fd and os.fstat(mine).st_ino == os.stat("/proc/self/stat").st_ino
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        gc.enable()
        gc.collect()                                 # the parent's copy closes fd here
    return os.waitstatus_to_exitcode(status) == 0


def test_fork_frozen_child_never_collects_the_parents_objects():
    """jail.fork_frozen (both sandbox forks use it) freezes what exists at the fork, so
    a parent object's finalizer cannot close an fd number the child reused; a plain
    os.fork shows the hazard."""
    import gc

    from vmmcore.sandbox.jail import fork_frozen

    frozen = gc.get_freeze_count()          # some interpreters start with frozen objects
    assert not _child_keeps_reused_fd(os.fork)
    assert _child_keeps_reused_fd(fork_frozen)
    if frozen == 0:
        assert gc.get_freeze_count() == 0            # the parent unfroze its objects
    else:
        assert gc.get_freeze_count() >= frozen       # and never thaws someone else's
