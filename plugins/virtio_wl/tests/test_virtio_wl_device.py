"""virtio-wl device model without a compositor: a fake compositor socket passes fds, pipes,
hang-ups, the in-queue back-pressure, and the hostile-guest checks."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time

import pytest
from vmm_virtio_wl import protocol as P
from vmm_virtio_wl.device import MAX_SEND_DATA, VirtioWl
from wl_rig import WlGuest, listening_socket, vm_memory

TRANS = 1 << P.VIRTIO_WL_F_TRANS_FLAGS
FENCES = 1 << P.VIRTIO_WL_F_SEND_FENCES


@pytest.fixture
def rig(tmp_path):
    """(guest, server-side socket of context 1) with a fake compositor."""
    path = tmp_path / "wayland-fake"
    with listening_socket(path) as srv:
        dev = VirtioWl({"": path}, vm_memory=vm_memory(), max_alloc=1 << 20, max_vfds=8)
        g = WlGuest(dev)
        assert P.CTRL_VFD_NEW_RESP.unpack(g.new_ctx(1))[0] == P.RESP_VFD_NEW
        peer, _ = srv.accept()
        yield g, peer
        peer.close()
        g.close()
        assert dev.vm_memory.mappings == []


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           struct.pack(f"<{len(fds)}i", *fds))] if fds else [])


def recv_fds(sock: socket.socket, n: int = 32) -> tuple[bytes, list[int]]:
    sock.settimeout(5)
    data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * n))
    fds = []
    for _level, _typ, cdata in anc:
        fds += struct.unpack(f"<{len(cdata) // 4}i", cdata[:len(cdata) // 4 * 4])
    return data, fds


def recv_until(g: WlGuest, pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        got += g.recv(0.2)
        if pred(got):
            return got
    raise AssertionError(f"timed out; got {got}")


def test_features_offered_and_acked():
    dev = VirtioWl({"": "/nonexistent"})
    assert dev.features() == TRANS | FENCES
    dev.ack_features(TRANS | FENCES | (1 << P.VIRTIO_WL_F_USE_SHMEM))
    assert dev.use_transition_flags and dev.use_send_vfd_v2
    assert VirtioWl({"": "/x"}, transition_flags=False, send_fences=False).features() == 0


def test_host_data_and_fds_become_vfds(rig):
    g, peer = rig
    shm = os.memfd_create("host-keymap")
    os.ftruncate(shm, 5000)
    os.pwrite(shm, b"keymap!", 0)
    r, w = os.pipe()
    send_fds(peer, b"hello guest", [shm, r])
    os.close(shm)
    os.close(r)
    msgs = recv_until(g, lambda m: any(x.type == P.CMD_VFD_RECV for x in m))
    new = [m for m in msgs if m.type == P.CMD_VFD_NEW]
    [recv] = [m for m in msgs if m.type == P.CMD_VFD_RECV]
    assert [m.vfd_id for m in new] == recv.ids == [P.NEXT_VFD_ID_BASE, P.NEXT_VFD_ID_BASE + 1]
    assert recv.vfd_id == 1 and recv.data == b"hello guest"
    shm_msg, pipe_msg = new
    # the host's memfd is mapped into the guest (page-rounded) and reported by pfn
    [mapping] = g.device.vm_memory.mappings
    assert (shm_msg.pfn, shm_msg.size) == (mapping.guest_addr >> 12, 8192)
    assert pipe_msg.flags == P.VFD_READ and pipe_msg.pfn == 0
    # the host pipe's data arrives on its VFD, then a hang-up when the host closes it
    os.write(w, b"from a host pipe")
    os.close(w)
    msgs = recv_until(g, lambda m: any(x.type == P.CMD_VFD_HUP for x in m))
    assert [(m.type, m.vfd_id, m.data) for m in msgs] == [
        (P.CMD_VFD_RECV, pipe_msg.vfd_id, b"from a host pipe"),
        (P.CMD_VFD_HUP, pipe_msg.vfd_id, b"")]
    # guest sends the host VFDs back: the same files arrive at the compositor
    assert g.send(1, b"back", [shm_msg.vfd_id]) == P.RESP_OK
    data, fds = recv_fds(peer)
    assert data == b"back" and len(fds) == 1
    assert os.pread(fds[0], 7, 0) == b"keymap!"
    os.close(fds[0])
    assert g.close_vfd(shm_msg.vfd_id) == P.RESP_OK
    assert g.device.vm_memory.mappings == []


def test_guest_pipes(rig):
    g, peer = rig
    # guest-write pipe: the compositor gets the read end
    assert P.CTRL_VFD_NEW_RESP.unpack(g.new_pipe(10, P.VFD_WRITE))[:3] == (
        P.RESP_VFD_NEW, 0, 10)
    assert g.send(1, b"take this", [10]) == P.RESP_OK
    _, [rfd] = recv_fds(peer)
    assert g.send(10, b"clipboard data") == P.RESP_OK
    assert os.read(rfd, 100) == b"clipboard data"
    assert g.send(10, b"x", [10]) == P.RESP_INVALID_TYPE     # no fds over a pipe
    os.close(rfd)                                            # the reader goes: HUP
    msgs = recv_until(g, lambda m: any(x.type == P.CMD_VFD_HUP for x in m))
    assert [m.vfd_id for m in msgs if m.type == P.CMD_VFD_HUP] == [10]
    # guest-read pipe: the compositor writes
    g.new_pipe(11, P.VFD_READ)
    assert g.send(1, b"p", [11]) == P.RESP_OK
    _, [wfd] = recv_fds(peer)
    os.write(wfd, b"paste")
    os.close(wfd)
    msgs = recv_until(g, lambda m: any(x.type == P.CMD_VFD_HUP for x in m))
    assert [(m.type, m.vfd_id, m.data) for m in msgs] == [
        (P.CMD_VFD_RECV, 11, b"paste"), (P.CMD_VFD_HUP, 11, b"")]
    assert g.send(11, b"no") == P.RESP_INVALID_TYPE           # a read pipe is not writable


def test_in_queue_backpressure(tmp_path):
    """More host messages than in-queue buffers: the device waits for buffers, loses nothing."""
    path = tmp_path / "wl"
    with listening_socket(path) as srv:
        dev = VirtioWl({"": path}, vm_memory=vm_memory())
        g = WlGuest.__new__(WlGuest)
        g.device = dev
        from vmmcore.virtio.testing import DeviceHarness
        g.h = DeviceHarness(dev, mem_size=8 << 20, queue_size=64)
        g.h.activate(TRANS)
        g.inbox = []
        g.new_ctx(1)
        peer, _ = srv.accept()
        for i in range(10):                 # 10 separate messages, no buffers posted yet
            peer.sendall(f"msg{i:02d};".encode())
            time.sleep(0.01)
        time.sleep(0.2)
        assert dev.pending and not dev._armed      # waiting for buffers, not spinning
        got = b""
        for _ in range(40):
            g.h.drivers[P.IN_QUEUE].add(in_sizes=[P.IN_BUFFER_SIZE])
            g.h.drivers[P.IN_QUEUE].kick()
            got += b"".join(m.data for m in g.recv(0.3))
            if len(got) >= 60:
                break
        assert got == b"".join(f"msg{i:02d};".encode() for i in range(10))
        peer.close()
        g.close()


def test_close_drops_undelivered_vfds(tmp_path):
    path = tmp_path / "wl"
    with listening_socket(path) as srv:
        dev = VirtioWl({"": path}, vm_memory=vm_memory())
        from vmmcore.virtio.testing import DeviceHarness
        h = DeviceHarness(dev, mem_size=8 << 20, queue_size=64)
        h.activate(TRANS)
        g = WlGuest.__new__(WlGuest)
        g.device, g.h, g.inbox = dev, h, []
        g.new_ctx(1)
        peer, _ = srv.accept()
        shm = os.memfd_create("x")
        os.ftruncate(shm, 4096)
        send_fds(peer, b"x", [shm])
        deadline = time.monotonic() + 5
        while not dev.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(dev.vfds) == 2 and len(dev.vm_memory.mappings) == 1
        assert g.close_vfd(1) == P.RESP_OK          # never delivered: its new VFD goes too
        assert dev.vfds == {} and dev.vm_memory.mappings == [] and not dev.pending
        os.close(shm)
        peer.close()
        h.close()


def test_non_transition_flags(tmp_path):
    path = tmp_path / "wl"
    with listening_socket(path):
        g = WlGuest(VirtioWl({"": path}, vm_memory=vm_memory()), features=0)
        try:
            assert P.CTRL_VFD_NEW_RESP.unpack(g.new_ctx(1))[3] == P.VFD_CONTROL
            resp = P.CTRL_VFD_NEW_RESP.unpack(g.new_alloc(2, 4096, P.VFD_WRITE | P.VFD_MAP))
            assert resp[0] == P.RESP_VFD_NEW and resp[3] == P.VFD_WRITE | P.VFD_MAP
            assert g.code(P.CTRL_VFD_NEW.pack(P.CMD_VFD_NEW, 0, 3, 0x10, 0, 4096)) == P.RESP_ERR
        finally:
            g.close()


# -- the hostile guest ---------------------------------------------------------------------------

def code(b: bytes) -> int:
    return struct.unpack_from("<I", b)[0]


def test_hostile_ids_flags_and_sizes(rig):
    g, _peer = rig
    dev = g.device
    assert code(g.new_alloc(P.VFD_ID_HOST_MASK | 5, 4096)) == P.RESP_INVALID_ID
    assert code(g.new_alloc(1, 4096)) == P.RESP_INVALID_ID               # in use (the ctx)
    assert code(g.new_alloc(2, 4096, flags=1)) == P.RESP_INVALID_FLAGS   # TRANS: flags = 0
    assert code(g.new_alloc(2, 0)) == P.RESP_ERR                         # bad size
    assert code(g.new_alloc(2, (1 << 20) + 1)) == P.RESP_OUT_OF_MEMORY   # > max_alloc
    assert code(g.new_alloc(2, 0xFFFF_FFFF)) == P.RESP_OUT_OF_MEMORY
    assert code(g.new_ctx(1)) == P.RESP_INVALID_ID
    assert code(g.new_ctx(P.VFD_ID_HOST_MASK)) == P.RESP_INVALID_ID
    assert code(g.new_pipe(3, P.VFD_READ | P.VFD_WRITE)) == P.RESP_INVALID_FLAGS
    assert code(g.new_pipe(3, 0)) == P.RESP_INVALID_FLAGS
    assert code(g.new_pipe(3, 0x80)) == P.RESP_INVALID_FLAGS
    assert g.close_vfd(12345) == P.RESP_INVALID_ID
    assert set(dev.vfds) == {1} and dev.vm_memory.mappings == []
    # too many VFDs (max_vfds=8)
    for i in range(7):
        assert code(g.new_alloc(100 + i, 4096)) == P.RESP_VFD_NEW
    assert code(g.new_alloc(200, 4096)) == P.RESP_OUT_OF_MEMORY
    assert code(g.new_pipe(201, P.VFD_READ)) == P.RESP_OUT_OF_MEMORY
    for i in range(7):
        assert g.close_vfd(100 + i) == P.RESP_OK


def test_hostile_sends(rig):
    g, peer = rig
    g.new_alloc(2, 4096)
    assert g.send(1, b"x", [999]) == P.RESP_INVALID_ID                    # unknown VFD
    assert g.send(999, b"x") == P.RESP_INVALID_ID                         # unknown target
    assert g.send(2, b"x") == P.RESP_INVALID_TYPE                         # shm is no socket
    assert g.send(1, b"x", [2] * 29) == P.RESP_ERR                        # > 28 fds
    assert g.send(1, b"", [], count=5) == P.RESP_ERR                      # ids missing
    assert g.send(1, b"", [], count=0xFFFF_FFFF) == P.RESP_ERR
    assert g.send(1, bytes(MAX_SEND_DATA + 1)) == P.RESP_ERR              # oversized
    assert g.send(1, b"ok", [2] * 28) == P.RESP_OK                        # the maximum
    data, fds = recv_fds(peer)
    assert data == b"ok" and len(fds) == 28
    for fd in fds:
        os.close(fd)
    # SEND_FOREIGN_ID: v2 entries after SEND_FENCES; gpu kinds have no resource bridge
    v2 = P.CTRL_VFD_SEND.pack(P.CMD_VFD_SEND_FOREIGN_ID, 0, 1, 1)
    assert g.code(v2 + P.SEND_VFD_V2.pack(P.SEND_KIND_LOCAL, 2) + b"y") == P.RESP_OK
    data, fds = recv_fds(peer)
    assert data == b"y" and len(fds) == 1
    os.close(fds[0])
    assert g.code(v2 + P.SEND_VFD_V2.pack(P.SEND_KIND_VIRTGPU, 2)) == P.RESP_INVALID_ID
    assert g.code(v2 + P.SEND_VFD_V2.pack(77, 2)) == P.RESP_INVALID_ID


def test_hostile_commands(rig):
    g, _ = rig
    assert g.code(struct.pack("<I", 0x100)) == P.RESP_ERR                 # short header
    assert g.code(P.HDR.pack(P.CMD_VFD_NEW, 0) + b"\1\0") == P.RESP_ERR    # short body
    assert g.code(P.HDR.pack(P.CMD_VFD_CLOSE, 0)) == P.RESP_ERR
    assert g.code(P.HDR.pack(0xDEAD, 0)) == P.RESP_INVALID_CMD
    assert g.code(P.HDR.pack(P.RESP_OK, 0)) == P.RESP_INVALID_CMD
    assert g.code(P.HDR.pack(P.CMD_VFD_RECV, 0) + bytes(8)) == P.RESP_INVALID_CMD
    # no GBM / render node: dma-buf commands answer as crosvm without minigbm
    assert g.code(P.CTRL_VFD_NEW_DMABUF.pack(P.CMD_VFD_NEW_DMABUF, 0, 7, 0, 0, 0,
                                             64, 64, 0x34325241, 0, 0, 0, 0, 0, 0)) \
        == P.RESP_INVALID_CMD
    assert g.code(P.CTRL_VFD_DMABUF_SYNC.pack(P.CMD_VFD_DMABUF_SYNC, 0, 1, 0)) \
        == P.RESP_INVALID_CMD
    name = P.CTRL_VFD_NEW_CTX_NAMED.pack(P.CMD_VFD_NEW_CTX_NAMED, 0, 9, 0, 0, 0, b"\xff\xfe")
    assert g.code(name) == P.RESP_ERR                                     # not UTF-8
    assert g.code(name[:-1]) == P.RESP_ERR                                # short
    # an empty chain or one without room for the response is still returned
    d = g.h.drivers[P.OUT_QUEUE]
    d.add(out=[P.CTRL_VFD.pack(P.CMD_VFD_CLOSE, 0, 4242)])
    [u] = g.h.wait_used(P.OUT_QUEUE, 1)
    assert u.length == 0
    d.add(out=[P.CTRL_VFD.pack(P.CMD_VFD_NEW_CTX, 0, 20)], in_sizes=[8])
    [u] = g.h.wait_used(P.OUT_QUEUE, 1)
    assert u.length == 8                                  # response cut, the VFD exists
    assert 20 in g.device.vfds
    assert g.h.reset_reasons == []                        # never NEEDS_RESET for any of it


def test_vfd_new_memory_is_the_guest_mapping(rig):
    """What the guest writes at the pfn is what the compositor reads from the fd."""
    g, peer = rig
    typ, _, _, _, pfn, size, _ = P.CTRL_VFD_NEW_RESP.unpack(g.new_alloc(2, 6000))
    assert typ == P.RESP_VFD_NEW and size == 8192
    vmm = g.device.vm_memory
    [m] = vmm.mappings
    assert m.guest_addr == pfn << 12
    # the RecordingVm got a host address: the controller's own mapping of the memfd
    _, _, host_addr = vmm.vm.regions[m.slot]
    import ctypes
    ctypes.memmove(host_addr + 100, b"drawn by the guest", 18)
    assert g.send(1, b"", [2]) == P.RESP_ERR      # fds need a byte to cross a stream
    assert g.send(1, b"m", [2]) == P.RESP_OK
    _, [fd] = recv_fds(peer)
    with mmap.mmap(fd, 8192) as view:
        assert view[100:118] == b"drawn by the guest"
    os.close(fd)


def test_reset_releases_everything(rig):
    g, _ = rig
    g.new_alloc(2, 4096)
    g.new_pipe(3, P.VFD_READ)
    assert g.device.reset()
    assert g.device.vfds == {} and g.device.vm_memory.mappings == []


def test_host_memory_that_cannot_be_mapped_is_announced_without_size(tmp_path):
    """No VmMemoryRequest path: a host memfd still becomes a VFD (it can be sent back),
    but with pfn 0 and size 0, so the guest never maps guest page 0 by mistake."""
    path = tmp_path / "wl"
    with listening_socket(path) as srv:
        g = WlGuest(VirtioWl({"": path}))
        try:
            g.new_ctx(1)
            peer, _ = srv.accept()
            shm = os.memfd_create("x")
            os.ftruncate(shm, 4096)
            send_fds(peer, b"k", [shm])
            os.close(shm)
            msgs = recv_until(g, lambda m: any(x.type == P.CMD_VFD_RECV for x in m))
            [new] = [m for m in msgs if m.type == P.CMD_VFD_NEW]
            assert (new.pfn, new.size) == (0, 0)
            assert g.send(1, b"b", [new.vfd_id]) == P.RESP_OK
            _, fds = recv_fds(peer)
            assert len(fds) == 1 and os.fstat(fds[0]).st_size == 4096
            os.close(fds[0])
            peer.close()
        finally:
            g.close()
