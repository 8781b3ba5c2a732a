"""A VESA EDID 1.4 base block describing one display mode (what GET_EDID answers).

The block has the fixed header, a manufacturer id, sRGB chromaticity, the mode as the
preferred detailed timing (a CVT reduced-blanking style timing), a monitor name, a
range-limits descriptor and a serial string, and the checksum that makes the 128 bytes
sum to 0 mod 256 (what Linux's drm_edid_block_valid() checks).
"""

from __future__ import annotations

import struct

EDID_HEADER = b"\x00\xff\xff\xff\xff\xff\xff\x00"
DPI = 96

# CVT reduced blanking (v1) constants: fixed horizontal blank, 460 us minimum vblank
H_FRONT, H_SYNC, H_BACK = 48, 32, 80
V_FRONT, V_SYNC = 3, 6
MIN_VBLANK_US = 460
MIN_V_BACK = 6


def _manufacturer(code: str) -> bytes:
    """Three letters A-Z packed as 5-bit values, big-endian."""
    a, b, c = (ord(ch) - ord("A") + 1 for ch in code.upper())
    return struct.pack(">H", (a << 10) | (b << 5) | c)


def _chroma(v: float) -> int:
    return round(v * 1024) & 0x3FF


def _chromaticity() -> bytes:
    """sRGB primaries and D65 white point, 10-bit fractions split as EDID wants."""
    rx, ry, gx, gy, bx, by, wx, wy = (_chroma(v) for v in (
        0.640, 0.330, 0.300, 0.600, 0.150, 0.060, 0.3127, 0.3290))
    low_rg = ((rx & 3) << 6) | ((ry & 3) << 4) | ((gx & 3) << 2) | (gy & 3)
    low_bw = ((bx & 3) << 6) | ((by & 3) << 4) | ((wx & 3) << 2) | (wy & 3)
    return bytes([low_rg, low_bw, rx >> 2, ry >> 2, gx >> 2, gy >> 2, bx >> 2, by >> 2,
                  wx >> 2, wy >> 2])


def timing(width: int, height: int, refresh: int) -> dict[str, int]:
    """A reduced-blanking timing for the mode: totals, porches and the pixel clock."""
    h_blank = H_FRONT + H_SYNC + H_BACK
    h_total = width + h_blank
    # lines of vertical blank so that it lasts at least MIN_VBLANK_US
    line_us = 1e6 / (refresh * (height + 20)) if refresh else 1.0
    v_blank = max(int(MIN_VBLANK_US / line_us) + 1, V_FRONT + V_SYNC + MIN_V_BACK)
    v_total = height + v_blank
    clock_khz = h_total * v_total * refresh // 1000
    return {"h_blank": h_blank, "v_blank": v_blank, "h_total": h_total,
            "v_total": v_total, "clock_10khz": max(1, (clock_khz + 9) // 10)}


def _detailed_timing(width: int, height: int, refresh: int, width_mm: int,
                     height_mm: int) -> bytes:
    t = timing(width, height, refresh)
    clock = min(t["clock_10khz"], 0xFFFF)
    ha, hb = min(width, 0xFFF), min(t["h_blank"], 0xFFF)
    va, vb = min(height, 0xFFF), min(t["v_blank"], 0xFFF)
    hfp, hsw, vfp, vsw = H_FRONT, H_SYNC, V_FRONT, V_SYNC
    wmm, hmm = min(width_mm, 0xFFF), min(height_mm, 0xFFF)
    return bytes([
        clock & 0xFF, clock >> 8,
        ha & 0xFF, hb & 0xFF, ((ha >> 8) << 4) | (hb >> 8),
        va & 0xFF, vb & 0xFF, ((va >> 8) << 4) | (vb >> 8),
        hfp & 0xFF, hsw & 0xFF, ((vfp & 0xF) << 4) | (vsw & 0xF),
        ((hfp >> 8) << 6) | ((hsw >> 8) << 4) | ((vfp >> 4) << 2) | (vsw >> 4),
        wmm & 0xFF, hmm & 0xFF, ((wmm >> 8) << 4) | (hmm >> 8),
        0, 0,        # no border
        0x1E,        # digital separate sync, +vsync, +hsync
    ])


def _text_descriptor(tag: int, text: str) -> bytes:
    body = text.encode("ascii", "replace")[:13]
    if len(body) < 13:
        body += b"\n" + b" " * (12 - len(body))
    return bytes([0, 0, 0, tag, 0]) + body


def _range_limits(refresh: int, clock_10khz: int) -> bytes:
    vmin, vmax = max(1, min(refresh, 50)), min(255, max(refresh, 75))
    hmin, hmax = 1, 255
    max_clock = min(255, (clock_10khz + 999) // 1000 + 1)   # in 10 MHz units
    return bytes([0, 0, 0, 0xFD, 0, vmin, vmax, hmin, hmax, max_clock, 0x00,
                  0x0A, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20])


def build_edid(width: int, height: int, refresh: int = 60, *, name: str = "vmm virtio",
               serial: int = 0, manufacturer: str = "VMM", product: int = 0x1234) -> bytes:
    """The 128-byte EDID 1.4 base block for a width x height @ refresh display."""
    width_mm = max(1, round(width * 25.4 / DPI))
    height_mm = max(1, round(height * 25.4 / DPI))
    t = timing(width, height, refresh)
    block = bytearray()
    block += EDID_HEADER
    block += _manufacturer(manufacturer)
    block += struct.pack("<HI", product, serial)
    block += bytes([1, 34])                 # week 1 of 2024 (1990 + 34)
    block += bytes([1, 4])                  # EDID 1.4
    block += bytes([0xA5])                  # digital, 8 bits per colour, DisplayPort
    block += bytes([min(255, max(1, width_mm // 10)), min(255, max(1, height_mm // 10))])
    block += bytes([120])                   # gamma 2.2
    block += bytes([0x06])                  # RGB 4:4:4, sRGB default, preferred = native
    block += _chromaticity()
    block += bytes([0, 0, 0])               # no established timings
    block += b"\x01\x01" * 8                # no standard timings
    block += _detailed_timing(width, height, refresh, width_mm, height_mm)
    block += _text_descriptor(0xFC, name)
    block += _range_limits(refresh, t["clock_10khz"])
    block += _text_descriptor(0xFF, f"{serial:08d}")
    block += bytes([0])                     # no extension blocks
    assert len(block) == 127, len(block)
    block += bytes([(-sum(block)) & 0xFF])
    return bytes(block)


def parse_preferred_mode(edid: bytes) -> tuple[int, int]:
    """(width, height) of the first detailed timing (for tests and tools)."""
    d = edid[54:72]
    return d[2] | ((d[4] >> 4) << 8), d[5] | ((d[7] >> 4) << 8)
