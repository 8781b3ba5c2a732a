"""Random commands from a hostile driver: every one gets an answer, the device never
needs a reset, never crashes, and leaks neither VFDs nor guest mappings."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmm_virtio_wl import protocol as P
from vmm_virtio_wl.device import VirtioWl
from wl_rig import WlGuest, listening_socket, vm_memory

CMDS = [P.CMD_VFD_NEW, P.CMD_VFD_CLOSE, P.CMD_VFD_SEND, P.CMD_VFD_RECV, P.CMD_VFD_NEW_CTX,
        P.CMD_VFD_NEW_PIPE, P.CMD_VFD_HUP, P.CMD_VFD_NEW_DMABUF, P.CMD_VFD_DMABUF_SYNC,
        P.CMD_VFD_SEND_FOREIGN_ID, P.CMD_VFD_NEW_CTX_NAMED, 0, 0xFFFFFFFF]
IDS = st.sampled_from([0, 1, 2, 3, P.VFD_ID_HOST_MASK, P.VFD_ID_HOST_MASK + 1, 0xFFFFFFFF])
U32 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 28, 29, 4096, 0xFFFFFFFF]),
                st.integers(0, 0xFFFFFFFF))

command = st.builds(
    lambda typ, vfd, a, b, tail, cut: (struct.pack("<IIIII", typ, 0, vfd, a, b) + tail)[:cut],
    st.sampled_from(CMDS), IDS, U32, U32, st.binary(max_size=96), st.integers(0, 140))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(command, min_size=1, max_size=12))
def test_random_commands(tmp_path_factory, cmds):
    path = tmp_path_factory.mktemp("fuzz") / "wl"
    with listening_socket(path):
        dev = VirtioWl({"": path}, vm_memory=vm_memory(), max_alloc=1 << 20, max_vfds=6)
        g = WlGuest(dev)
        try:
            for c in cmds:
                g.h.drivers[P.OUT_QUEUE].add(out=[c] if c else [b"\0"], in_sizes=[64])
                [used] = g.h.wait_used(P.OUT_QUEUE, 1)
                code = struct.unpack_from("<I", used.data)[0]
                assert code in P.RESP_NAMES, hex(code)
                assert len(dev.vfds) <= 6
            assert g.h.reset_reasons == []
            mapped = len(dev.vm_memory.mappings)
            assert mapped == sum(v.slot is not None for v in dev.vfds.values())
        finally:
            g.close()
        assert dev.vm_memory.mappings == []
