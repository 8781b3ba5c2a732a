"""The virtio-wl wire protocol: command and response codes, flags, feature bits, layouts.

Facts from the Chrome OS kernel's include/uapi/linux/virtio_wl.h and crosvm's
devices/src/virtio/wl.rs. Every structure is little-endian and packed the way the C
structs lay out (natural alignment, no hidden padding except where noted).
"""

from __future__ import annotations

import struct

# -- queues -----------------------------------------------------------------------------------
IN_QUEUE = 0            # device -> driver: VFD_NEW / VFD_RECV / VFD_HUP commands
OUT_QUEUE = 1           # driver -> device: commands, each answered in the same chain
QUEUE_SIZE = 256

# -- feature bits (bit numbers) ------------------------------------------------------------
VIRTIO_WL_F_TRANS_FLAGS = 1     # the newer VFD flag semantics (READ/WRITE, no CONTROL/MAP)
VIRTIO_WL_F_SEND_FENCES = 2     # the driver may send fences; SEND_FOREIGN_ID uses v2 entries
VIRTIO_WL_F_USE_SHMEM = 3       # pfns are offsets in a shared-memory BAR (not offered here)

# -- commands (driver -> device on the out queue; device -> driver on the in queue) ----------
CMD_VFD_NEW = 0x100
CMD_VFD_CLOSE = 0x101
CMD_VFD_SEND = 0x102
CMD_VFD_RECV = 0x103
CMD_VFD_NEW_CTX = 0x104
CMD_VFD_NEW_PIPE = 0x105
CMD_VFD_HUP = 0x106
CMD_VFD_NEW_DMABUF = 0x107
CMD_VFD_DMABUF_SYNC = 0x108
CMD_VFD_SEND_FOREIGN_ID = 0x109
CMD_VFD_NEW_CTX_NAMED = 0x10A

# -- responses --------------------------------------------------------------------------------
RESP_OK = 0x1000
RESP_VFD_NEW = 0x1001
RESP_VFD_NEW_DMABUF = 0x1002
RESP_ERR = 0x1100
RESP_OUT_OF_MEMORY = 0x1101
RESP_INVALID_ID = 0x1102
RESP_INVALID_TYPE = 0x1103
RESP_INVALID_FLAGS = 0x1104
RESP_INVALID_CMD = 0x1105

RESP_NAMES = {
    RESP_OK: "OK", RESP_VFD_NEW: "VFD_NEW", RESP_VFD_NEW_DMABUF: "VFD_NEW_DMABUF",
    RESP_ERR: "ERR", RESP_OUT_OF_MEMORY: "OUT_OF_MEMORY", RESP_INVALID_ID: "INVALID_ID",
    RESP_INVALID_TYPE: "INVALID_TYPE", RESP_INVALID_FLAGS: "INVALID_FLAGS",
    RESP_INVALID_CMD: "INVALID_CMD",
}

# -- VFD flags ----------------------------------------------------------------------------------
VFD_WRITE = 0x1
VFD_READ = 0x2          # with TRANS_FLAGS
VFD_MAP = 0x2           # without TRANS_FLAGS (same bit)
VFD_CONTROL = 0x4       # without TRANS_FLAGS: a Wayland connection
VFD_FENCE = 0x8

DMABUF_SYNC_VALID_FLAG_MASK = 0x7

# -- VFD ids ------------------------------------------------------------------------------------
#: Ids the host allocates have this bit set; the guest's never do.
VFD_ID_HOST_MASK = 0x4000_0000
NEXT_VFD_ID_BASE = VFD_ID_HOST_MASK

# -- foreign-id send kinds ---------------------------------------------------------------------
SEND_KIND_LOCAL = 0
SEND_KIND_VIRTGPU = 1
SEND_KIND_VIRTGPU_FENCE = 2
SEND_KIND_VIRTGPU_SIGNALED_FENCE = 3

# -- limits ---------------------------------------------------------------------------------------
#: Most VFDs in one VFD_SEND / VFD_RECV (the kernel's VIRTWL_SEND_MAX_ALLOCS).
SEND_MAX_ALLOCS = 28
PFN_SHIFT = 12
IN_BUFFER_SIZE = 4096

# -- layouts ----------------------------------------------------------------------------------
HDR = struct.Struct("<II")                  # type, flags
CTRL_VFD = struct.Struct("<III")            # hdr, vfd_id
#: hdr, vfd_id, flags, pfn, size (then 4 bytes of padding in a response; the kernel's
#: struct continues with the dmabuf/name union, which VFD_NEW ignores).
CTRL_VFD_NEW = struct.Struct("<IIIIQI")
CTRL_VFD_NEW_RESP = struct.Struct("<IIIIQII")   # ... size, padding: 32 bytes
#: hdr, vfd_id, flags, pfn, size, name[32] (VFD_NEW_CTX_NAMED).
CTRL_VFD_NEW_CTX_NAMED = struct.Struct("<IIIIQI32s")
CTRL_VFD_SEND = struct.Struct("<IIII")      # hdr, vfd_id, vfd_count; then ids, then data
CTRL_VFD_RECV = struct.Struct("<IIII")      # hdr, vfd_id, vfd_count; then ids, then data
CTRL_VFD_DMABUF_SYNC = struct.Struct("<IIII")   # hdr, vfd_id, flags
#: hdr, vfd_id, flags, pfn, size, width, height, format, stride0-2, offset0-2.
CTRL_VFD_NEW_DMABUF = struct.Struct("<IIIIQI" + "I" * 9)
SEND_VFD = struct.Struct("<II")             # kind, id (SEND_FOREIGN_ID without SEND_FENCES)
SEND_VFD_V2 = struct.Struct("<I4xQ")        # kind, union {le32 id; le64 seqno} (8-aligned)
U32 = struct.Struct("<I")

#: Bytes of host data that fit in one in-queue buffer next to the header and the ids.
IN_DATA_MAX = IN_BUFFER_SIZE - CTRL_VFD_RECV.size - SEND_MAX_ALLOCS * U32.size


def vfd_new(resp: bool, vfd_id: int, flags: int, pfn: int, size: int) -> bytes:
    """A VFD_NEW response (resp=True) or command to the driver (resp=False)."""
    return CTRL_VFD_NEW_RESP.pack(RESP_VFD_NEW if resp else CMD_VFD_NEW, 0, vfd_id, flags,
                                  pfn, size, 0)


def vfd_recv(vfd_id: int, ids: list[int], data: bytes) -> bytes:
    return (CTRL_VFD_RECV.pack(CMD_VFD_RECV, 0, vfd_id, len(ids))
            + b"".join(U32.pack(i) for i in ids) + data)


def vfd_hup(vfd_id: int) -> bytes:
    return CTRL_VFD.pack(CMD_VFD_HUP, 0, vfd_id)


def code(value: int) -> bytes:
    """A bare response code (OK and the errors)."""
    return U32.pack(value)
