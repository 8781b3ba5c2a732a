"""vmmcore.vm_control (the VmMemoryRequest path virtio-wl maps its buffers through): the
in-process controller on a real KVM VM, the socket client a sandboxed device uses, and
hostile requests."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from wl_rig import RecordingVm

from vmmcore.arch.x86_64 import layout
from vmmcore.vm_control import (
    Err,
    MemoryRegistered,
    Ok,
    RegisterMemory,
    SocketVmMemoryClient,
    UnregisterMemory,
    VmMemoryController,
    VmMemoryError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    register_memory,
    serve_request,
    unregister_memory,
)

MiB = 1 << 20


def memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_register_unregister_reuses_slots_and_addresses():
    vm = RecordingVm()
    alloc = layout.system_allocator(256 * MiB)
    c = VmMemoryController(vm, alloc)
    fd = memfd(3 * 4096)
    a = register_memory(c, fd, 0, 8192, tag="a")
    b = register_memory(c, fd, 4096, 8192, tag="b")
    assert a.guest_addr >= layout.high_mmio_start(256 * MiB) and a.pfn == a.guest_addr >> 12
    assert b.guest_addr >= a.guest_addr + 8192 and a.slot != b.slot
    assert [t for t in alloc.high_mmio.allocations()] and len(vm.regions) == 2
    unregister_memory(c, a.slot)
    assert a.slot not in vm.regions
    again = register_memory(c, fd, 0, 4096)
    assert again.slot == a.slot                     # the freed slot is reused
    c.close()
    assert vm.regions == {} and alloc.high_mmio.allocations() == [] and c.mappings == []
    os.close(fd)


def test_bad_requests_are_errors_and_change_nothing():
    vm = RecordingVm()
    alloc = layout.system_allocator(256 * MiB)
    c = VmMemoryController(vm, alloc, max_total=64 * 1024)
    fd = memfd(8192)
    for req in (RegisterMemory(fd, 0, 0), RegisterMemory(fd, 0, 100),
                RegisterMemory(fd, 1, 4096), RegisterMemory(fd, 0, 3 * 4096),
                RegisterMemory(fd, -4096, 4096), RegisterMemory(12345, 0, 4096),
                RegisterMemory(fd, 0, 128 * 1024), UnregisterMemory(7)):
        assert isinstance(c.request(req), Err), req
    assert c.request("nonsense").message.startswith("unknown")
    with pytest.raises(VmMemoryError):
        register_memory(c, fd, 0, 0)
    assert vm.regions == {} and alloc.high_mmio.allocations() == []
    os.close(fd)


def test_failed_kvm_call_gives_everything_back():
    class FailingVm(RecordingVm):
        def add_memory_region(self, *a, **k):
            raise OSError(22, "KVM_SET_USER_MEMORY_REGION: Invalid argument")

    alloc = layout.system_allocator(256 * MiB)
    c = VmMemoryController(FailingVm(), alloc)
    fd = memfd(4096)
    assert "Invalid argument" in c.request(RegisterMemory(fd, 0, 4096)).message
    assert alloc.high_mmio.allocations() == []
    os.close(fd)


def test_wire_format_round_trip_and_hostile_messages():
    for req in (RegisterMemory(5, 4096, 8192, True, "virtio-wl"), UnregisterMemory(9)):
        data, fds = encode_request(req)
        assert decode_request(data, [5] if fds else []) == req
    for resp in (MemoryRegistered(3, 0x1_0000_0000, 4096), Ok(), Err("no")):
        assert decode_response(encode_response(resp)) == resp
    for data, fds in ((b"", []), (b"\1\0\0\0", [3]), (encode_request(UnregisterMemory(1))[0], [3]),
                      (encode_request(RegisterMemory(3, 0, 4096))[0], []),
                      (b"\x99\0\0\0", [])):
        with pytest.raises(ValueError):
            decode_request(data, fds)


def test_socket_client_and_server():
    """A sandboxed device's client: requests and the fd cross a SOCK_SEQPACKET socket."""
    vm = RecordingVm()
    c = VmMemoryController(vm, layout.system_allocator(256 * MiB))
    main_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def serve():
        while serve_request(main_end, c):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = SocketVmMemoryClient(device_end)
    fd = memfd(8192)
    r = register_memory(client, fd, 0, 8192, tag="over the socket")
    assert r.slot in vm.regions and c.mappings == [r]
    assert isinstance(client.request(RegisterMemory(fd, 0, 1)), Err)
    unregister_memory(client, r.slot)
    assert c.mappings == []
    device_end.close()
    t.join(5)
    assert not t.is_alive()
    main_end.close()
    os.close(fd)


@pytest.mark.kvm
def test_on_a_real_kvm_vm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    from vmmcore.kvm import Kvm
    from vmmcore.memory import GuestMemory

    kvm = Kvm("/dev/kvm")
    vm = kvm.create_vm()
    mem = GuestMemory(layout.ram_ranges(64 * MiB))
    try:
        for region in mem.regions:
            vm.add_memory_region(region.guest_addr, region.size, mem.host_address(region))
        c = VmMemoryController(vm, layout.system_allocator(64 * MiB))
        fd = memfd(16384)
        regs = [register_memory(c, fd, 0, 16384) for _ in range(3)]
        assert len({r.slot for r in regs}) == 3
        for r in regs:
            unregister_memory(c, r.slot)
        r = register_memory(c, fd, 4096, 8192)
        assert r.slot in {x.slot for x in regs}
        c.close()
        os.close(fd)
    finally:
        vm.close()
        mem.close()
        kvm.close()


def test_server_and_connecting_client(tmp_path):
    """A jailed device reaches the main process through a socket path (bind-mounted)."""
    from vmmcore.vm_control import ConnectingVmMemoryClient, VmMemoryServer

    vm = RecordingVm()
    c = VmMemoryController(vm, layout.system_allocator(256 * MiB))
    path = tmp_path / "vm-memory.sock"
    assert isinstance(ConnectingVmMemoryClient(path).request(UnregisterMemory(1)), Err)
    server = VmMemoryServer(c, path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    server.start()
    try:
        clients = [ConnectingVmMemoryClient(path) for _ in range(2)]
        fd = memfd(4096)
        regs = [register_memory(cl, fd, 0, 4096) for cl in clients]
        assert len(c.mappings) == 2 and c.read(regs[0].slot, 0, 4) == bytes(4)
        os.pwrite(fd, b"seen", 0)
        assert c.read(regs[1].slot, 0, 4) == b"seen"      # the controller's own mapping
        with pytest.raises(VmMemoryError):
            c.read(regs[1].slot, 4000, 100)
        for cl, r in zip(clients, regs, strict=True):
            unregister_memory(cl, r.slot)
        os.close(fd)
        # a peer speaking garbage gets an Err, and the server keeps serving
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.connect(str(path))
        raw.send(b"\x07\0\0\0junk")
        assert isinstance(decode_response(raw.recv(4096)), Err)
        raw.close()
        assert isinstance(clients[0].request(UnregisterMemory(99)), Err)
    finally:
        server.close()
    assert not path.exists() and c.mappings == []
