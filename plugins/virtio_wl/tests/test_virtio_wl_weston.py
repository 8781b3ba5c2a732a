"""Tier 1 against a real compositor: a test driver plays the guest's virtio_wl driver,
opens a context through the device, speaks hand-encoded Wayland to headless weston
(get_registry + sync, bind, a wl_shm pool on a VFD_NEW buffer, attach to a surface)."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from vmm_virtio_wl import protocol as P
from vmm_virtio_wl.device import VirtioWl
from wl_rig import WaylandClient, WlGuest, vm_memory, wl_msg


@pytest.fixture
def client(weston):
    vmm = vm_memory()
    dev = VirtioWl({"": weston.socket}, vm_memory=vmm)
    g = WlGuest(dev)
    yield WaylandClient(g, ctx_id=1)
    g.close()
    assert vmm.mappings == []       # every VFD_NEW mapping was given back


def test_registry_globals_through_vfd_recv(client):
    assert client.flags == P.VFD_READ | P.VFD_WRITE      # TRANS_FLAGS negotiated
    registry = client.new_id()
    client.request(wl_msg(1, 1, registry))               # wl_display.get_registry
    client.roundtrip()                                   # wl_display.sync -> done
    globals_ = client.globals(registry)
    assert "wl_compositor" in globals_ and "wl_shm" in globals_, globals_
    assert client.errors() == []
    assert all(m.type == P.CMD_VFD_RECV for m in client.g.inbox)


def test_shm_pool_from_vfd_new_attached_to_surface(client):
    g, dev = client.g, client.g.device
    registry = client.new_id()
    client.request(wl_msg(1, 1, registry))
    client.roundtrip()
    globals_ = client.globals(registry)
    compositor, shm = client.new_id(), client.new_id()
    name, _ = globals_["wl_compositor"]
    client.request(wl_msg(registry, 0, name, "wl_compositor", 4, compositor))
    name, _ = globals_["wl_shm"]
    client.request(wl_msg(registry, 0, name, "wl_shm", 1, shm))
    surface = client.new_id()
    client.request(wl_msg(compositor, 0, surface))       # wl_compositor.create_surface

    # VFD_NEW: shared memory mapped into the guest, reported as a pfn.
    width, height = 64, 48
    size = width * height * 4
    resp = g.new_alloc(2, size)
    typ, _, vfd_id, flags, pfn, rsize, _ = P.CTRL_VFD_NEW_RESP.unpack(resp)
    assert (typ, vfd_id, flags, rsize) == (P.RESP_VFD_NEW, 2, 0, size)
    [mapping] = dev.vm_memory.mappings
    assert pfn == mapping.guest_addr >> 12 and mapping.size == size
    guest_addr, msize, _host = dev.vm_memory.vm.regions[mapping.slot]
    assert (guest_addr, msize) == (mapping.guest_addr, size)
    # The "guest" draws into the buffer (through the memfd the slot maps).
    with mmap.mmap(dev.vfds[2].shm_fd, size) as pixels:
        pixels[:] = struct.pack("<I", 0xFF3366CC) * (width * height)

    # wl_shm.create_pool(id, fd, size): the fd travels as VFD 2 in VFD_SEND.
    pool, buffer = client.new_id(), client.new_id()
    client.request(wl_msg(shm, 0, pool, size), vfds=[2])
    client.request(wl_msg(pool, 0, buffer, 0, width, height, width * 4, 1))  # XRGB8888
    client.request(wl_msg(surface, 1, buffer, 0, 0))     # attach
    client.request(wl_msg(surface, 2, 0, 0, width, height))  # damage
    client.request(wl_msg(surface, 6))                   # commit
    client.roundtrip()
    assert client.errors() == []
    formats = [struct.unpack("<I", e.payload)[0] for e in client.events
               if e.obj == shm and e.opcode == 0]
    assert 0 in formats and 1 in formats                # ARGB8888 and XRGB8888 advertised

    # The compositor holds the pool open; closing the VFD unmaps it from the guest.
    assert g.close_vfd(2) == P.RESP_OK
    assert dev.vm_memory.mappings == [] and dev.vm_memory.vm.regions == {}
    client.request(wl_msg(buffer, 0))                    # wl_buffer.destroy
    client.request(wl_msg(pool, 1))                      # wl_shm_pool.destroy
    client.roundtrip()
    assert client.errors() == []


def test_protocol_error_reaches_the_guest(client):
    """A bad request gets weston's wl_display.error back through VFD_RECV, then a HUP."""
    client.request(wl_msg(77, 0))                        # no object 77
    msgs = []
    for _ in range(20):
        msgs += client.g.recv(2.0)
        if any(m.type == P.CMD_VFD_HUP for m in msgs):
            break
    data = b"".join(m.data for m in msgs if m.type == P.CMD_VFD_RECV)
    obj, word = struct.unpack_from("<II", data)
    assert obj == 1 and word & 0xFFFF == 0               # wl_display.error
    assert [m.vfd_id for m in msgs if m.type == P.CMD_VFD_HUP] == [1]
    # The VFD stays until the guest closes it; sending now fails cleanly.
    assert client.g.send(1, wl_msg(1, 0, 99)) == P.RESP_ERR
    assert client.g.close_vfd(1) == P.RESP_OK


def test_two_contexts_and_named_socket(weston, tmp_path):
    dev = VirtioWl({"": weston.socket, "other": weston.socket}, vm_memory=vm_memory())
    g = WlGuest(dev)
    try:
        a = WaylandClient(g, ctx_id=1)
        r = g.new_ctx_named(5, b"other")
        assert P.CTRL_VFD_NEW_RESP.unpack(r)[:3] == (P.RESP_VFD_NEW, 0, 5)
        assert g.code(P.CTRL_VFD_NEW_CTX_NAMED.pack(P.CMD_VFD_NEW_CTX_NAMED, 0, 6, 0, 0, 0,
                                                    b"nope")) == P.RESP_ERR
        reg = a.new_id()
        a.request(wl_msg(1, 1, reg))
        a.roundtrip()
        assert "wl_compositor" in a.globals(reg)
        # the named context is a separate connection that works as well
        assert g.send(5, wl_msg(1, 0, 2)) == P.RESP_OK
        got = []
        for _ in range(20):
            got += [m for m in g.recv(1.0) if m.vfd_id == 5]
            if got:
                break
        assert got and got[0].type == P.CMD_VFD_RECV
    finally:
        g.close()


def test_without_vm_memory_vfd_new_is_an_error(weston):
    g = WlGuest(VirtioWl({"": weston.socket}))
    try:
        assert struct.unpack_from("<I", g.new_alloc(3, 4096))[0] == P.RESP_ERR
        assert 3 not in g.device.vfds
    finally:
        g.close()
    assert os.path.exists(weston.socket)
