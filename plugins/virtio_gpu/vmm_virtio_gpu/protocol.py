"""The virtio-gpu wire format (virtio 1.2, section 5.7): command codes, structures, formats.

All structures are little-endian and packed as the specification lays them out; every
command starts with struct virtio_gpu_ctrl_hdr.
"""

from __future__ import annotations

import struct

# Feature bits (5.7.3)
VIRTIO_GPU_F_VIRGL = 0
VIRTIO_GPU_F_EDID = 1
VIRTIO_GPU_F_RESOURCE_UUID = 2
VIRTIO_GPU_F_RESOURCE_BLOB = 3
VIRTIO_GPU_F_CONTEXT_INIT = 4

# Config space events (5.7.4)
VIRTIO_GPU_EVENT_DISPLAY = 1 << 0
VIRTIO_GPU_MAX_SCANOUTS = 16

# 2D commands
CMD_GET_DISPLAY_INFO = 0x0100
CMD_RESOURCE_CREATE_2D = 0x0101
CMD_RESOURCE_UNREF = 0x0102
CMD_SET_SCANOUT = 0x0103
CMD_RESOURCE_FLUSH = 0x0104
CMD_TRANSFER_TO_HOST_2D = 0x0105
CMD_RESOURCE_ATTACH_BACKING = 0x0106
CMD_RESOURCE_DETACH_BACKING = 0x0107
CMD_GET_CAPSET_INFO = 0x0108
CMD_GET_CAPSET = 0x0109
CMD_GET_EDID = 0x010A
CMD_RESOURCE_ASSIGN_UUID = 0x010B
CMD_RESOURCE_CREATE_BLOB = 0x010C
CMD_SET_SCANOUT_BLOB = 0x010D
# 3D commands
CMD_CTX_CREATE = 0x0200
CMD_CTX_DESTROY = 0x0201
CMD_CTX_ATTACH_RESOURCE = 0x0202
CMD_CTX_DETACH_RESOURCE = 0x0203
CMD_RESOURCE_CREATE_3D = 0x0204
CMD_TRANSFER_TO_HOST_3D = 0x0205
CMD_TRANSFER_FROM_HOST_3D = 0x0206
CMD_SUBMIT_3D = 0x0207
CMD_RESOURCE_MAP_BLOB = 0x0208
CMD_RESOURCE_UNMAP_BLOB = 0x0209
# cursor commands
CMD_UPDATE_CURSOR = 0x0300
CMD_MOVE_CURSOR = 0x0301

# success responses
RESP_OK_NODATA = 0x1100
RESP_OK_DISPLAY_INFO = 0x1101
RESP_OK_CAPSET_INFO = 0x1102
RESP_OK_CAPSET = 0x1103
RESP_OK_EDID = 0x1104
RESP_OK_RESOURCE_UUID = 0x1105
RESP_OK_MAP_INFO = 0x1106
# error responses
RESP_ERR_UNSPEC = 0x1200
RESP_ERR_OUT_OF_MEMORY = 0x1201
RESP_ERR_INVALID_SCANOUT_ID = 0x1202
RESP_ERR_INVALID_RESOURCE_ID = 0x1203
RESP_ERR_INVALID_CONTEXT_ID = 0x1204
RESP_ERR_INVALID_PARAMETER = 0x1205

FLAG_FENCE = 1 << 0
FLAG_INFO_RING_IDX = 1 << 1

# Formats (5.7.6.8): the name lists the components in memory (byte) order.
FORMAT_B8G8R8A8_UNORM = 1
FORMAT_B8G8R8X8_UNORM = 2
FORMAT_A8R8G8B8_UNORM = 3
FORMAT_X8R8G8B8_UNORM = 4
FORMAT_R8G8B8A8_UNORM = 67
FORMAT_X8B8G8R8_UNORM = 68
FORMAT_A8B8G8R8_UNORM = 121
FORMAT_R8G8B8X8_UNORM = 134

#: format -> (name, byte index of R, G, B, and of A or None)
FORMATS: dict[int, tuple[str, int, int, int, int | None]] = {
    FORMAT_B8G8R8A8_UNORM: ("B8G8R8A8_UNORM", 2, 1, 0, 3),
    FORMAT_B8G8R8X8_UNORM: ("B8G8R8X8_UNORM", 2, 1, 0, None),
    FORMAT_A8R8G8B8_UNORM: ("A8R8G8B8_UNORM", 1, 2, 3, 0),
    FORMAT_X8R8G8B8_UNORM: ("X8R8G8B8_UNORM", 1, 2, 3, None),
    FORMAT_R8G8B8A8_UNORM: ("R8G8B8A8_UNORM", 0, 1, 2, 3),
    FORMAT_X8B8G8R8_UNORM: ("X8B8G8R8_UNORM", 3, 2, 1, None),
    FORMAT_A8B8G8R8_UNORM: ("A8B8G8R8_UNORM", 3, 2, 1, 0),
    FORMAT_R8G8B8X8_UNORM: ("R8G8B8X8_UNORM", 0, 1, 2, None),
}
BYTES_PER_PIXEL = 4

# struct virtio_gpu_ctrl_hdr: type, flags, fence_id, ctx_id, ring_idx, padding[3]
CTRL_HDR = struct.Struct("<IIQIB3x")
# struct virtio_gpu_rect
RECT = struct.Struct("<IIII")
# bodies after the header
RESOURCE_CREATE_2D = struct.Struct("<IIII")          # resource_id, format, width, height
RESOURCE_ID_PAD = struct.Struct("<I4x")              # unref, detach_backing
SET_SCANOUT = struct.Struct("<IIIIII")               # rect, scanout_id, resource_id
RESOURCE_FLUSH = struct.Struct("<IIIII4x")           # rect, resource_id, padding
TRANSFER_TO_HOST_2D = struct.Struct("<IIIIQI4x")     # rect, offset, resource_id, padding
ATTACH_BACKING = struct.Struct("<II")                # resource_id, nr_entries
MEM_ENTRY = struct.Struct("<QI4x")                   # addr, length, padding
GET_EDID = struct.Struct("<I4x")                     # scanout, padding
GET_CAPSET_INFO = struct.Struct("<I4x")              # capset_index, padding
GET_CAPSET = struct.Struct("<II")                    # capset_id, capset_version
# 3D bodies: ctx_create (nlen, context_init, debug_name[64]); ctx_attach/detach_resource
# and submit_3d (resource_id or size, padding); resource_create_3d (resource_id, target,
# format, bind, width, height, depth, array_size, last_level, nr_samples, flags,
# padding); transfer_to/from_host_3d (box x y z w h d, offset, resource_id, level,
# stride, layer_stride)
CTX_CREATE = struct.Struct("<II64s")
CTX_RESOURCE = struct.Struct("<I4x")
SUBMIT_3D = struct.Struct("<I4x")
RESOURCE_CREATE_3D = struct.Struct("<11I4x")
TRANSFER_HOST_3D = struct.Struct("<6IQ4I")
# cursor: struct virtio_gpu_cursor_pos (scanout_id, x, y, padding), resource_id, hot_x,
# hot_y, padding
UPDATE_CURSOR = struct.Struct("<IiiIIII4x")
# responses
DISPLAY_ONE = struct.Struct("<IIIIII")               # rect, enabled, flags
RESP_EDID_HEAD = struct.Struct("<I4x")               # size, padding; then edid[1024]
RESP_CAPSET_INFO = struct.Struct("<III4x")           # capset_id, max_version, max_size
EDID_MAX = 1024

# config space: events_read, events_clear, num_scanouts, num_capsets
CONFIG = struct.Struct("<IIII")



class GpuError(Exception):
    """A command failed: carries the error response type (RESP_ERR_*)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


COMMAND_NAMES = {v: k[4:] for k, v in globals().items()
                 if k.startswith("CMD_") and isinstance(v, int)}
