"""Differential test: the native and the Python engine answer the same chains the same way.

Hypothesis draws request chains (headers of every type, including unknown ones, sectors
around the end of the disk, data of odd sizes in both directions, DISCARD/WRITE_ZEROES
segments with random flags) and sometimes breaks them (a buffer outside guest RAM, a
loop, a next index past the table, nested or unnegotiated-looking indirect tables, no
writable byte, a head past the queue). Each chain is written byte for byte into two
rigs, one per engine, over two copies of the same image; after each chain both must
agree on NEEDS_RESET (and its reason), the used element, the status byte, every byte
the device wrote into the chain's writable buffers, and in the end the image contents.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass, field

import pytest
from blk_rig import TIMEOUT, BlkRig, FileDisk, header, make_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmm_virtio_blk.device import VirtioBlock

from vmmcore.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

IMAGE_SIZE = 64 << 10                      # 128 sectors: the end of the disk is near
SECTORS = IMAGE_SIZE // 512
TYPES = [0, 1, 4, 8, 11, 13, 2, 10, 14]
BREAKAGES = ["none"] * 14 + ["outside", "loop", "badnext", "nowrite", "badhead", "nested",
                            "indirect_len"]


@dataclass
class Chain:
    """One request as buffers: (bytes written into it, device-writable?) in order."""

    bufs: list[tuple[bytes, bool]]
    indirect: bool
    breakage: str


@dataclass
class Layout:
    """Where a Chain went in guest memory (the same in both rigs)."""

    head: int
    writable: list[tuple[int, int]] = field(default_factory=list)


def _segments(draw) -> bytes:
    n = draw(st.integers(0, 3))
    out = b""
    for _ in range(n):
        sector = draw(st.sampled_from([0, 1, SECTORS - 1, SECTORS, 2**64 - 1]))
        nsectors = draw(st.sampled_from([0, 1, 2, 8, SECTORS, (1 << 22) - 7]))
        flags = draw(st.sampled_from([0, 0, 1, 2]))
        out += struct.pack("<QII", sector, nsectors, flags)
    if draw(st.booleans()) and out:
        out = out[:-draw(st.integers(1, 15))]            # a truncated segment
    return out


@st.composite
def chains(draw) -> Chain:
    rtype = draw(st.sampled_from(TYPES))
    sector = draw(st.sampled_from([0, 3, 17, SECTORS - 8, SECTORS - 1, SECTORS, 2**63]))
    hdr = header(rtype, sector, draw(st.integers(0, 2**32 - 1)))
    cut = draw(st.sampled_from([16, 16, 16, 8, 15]))      # header split or short
    bufs: list[tuple[bytes, bool]] = [(hdr[:cut], False)]
    if cut == 8:
        bufs.append((hdr[8:], False))
    if rtype in (11, 13):
        payload = _segments(draw)
        if payload:
            bufs.append((payload, False))
    sizes = st.sampled_from([512, 512, 1024, 4096, 1, 20, 64, 511, 513])
    # mostly the direction the type wants, sometimes the wrong one
    wants_write = {0: True, 8: True, 1: False}.get(rtype)
    for _ in range(draw(st.integers(0, 3))):
        write = draw(st.booleans()) if wants_write is None or not draw(
            st.integers(0, 5)) else wants_write
        n = draw(sizes)
        bufs.append((bytes([0x5A]) * n if not write else bytes(n), write))
    if draw(st.integers(0, 9)):                            # usually a status byte
        bufs.append((b"", True))
    return Chain(bufs, draw(st.booleans()), draw(st.sampled_from(BREAKAGES)))


class Twin:
    """The same guest writes applied to a Python-engine rig and a native-engine rig."""

    def __init__(self, tmp_path) -> None:
        src = tmp_path / "base.img"
        make_image(src, IMAGE_SIZE)
        self.rigs: dict[str, BlkRig] = {}
        self.paths = {}
        for engine in ("python", "native"):
            path = tmp_path / f"{engine}.img"
            shutil.copyfile(src, path)
            self.paths[engine] = path
            rig = BlkRig(VirtioBlock(FileDisk(path), engine=engine, queue_size=16,
                                     serial="twin"))
            rig.activate()
            self.rigs[engine] = rig
        self.next_desc = 0
        self.next_addr = BlkRig.DATA_BASE

    def alloc(self, n: int) -> int:
        addr = self.next_addr
        self.next_addr = (addr + max(n, 1) + 15) & ~15
        return addr

    def write_all(self, fn) -> None:
        for rig in self.rigs.values():
            fn(rig)

    def place(self, chain: Chain) -> Layout:
        """Write the chain's buffers and descriptors into both rigs (not yet published)."""
        descs = []
        layout = Layout(head=0)
        for data, write in chain.bufs:
            n = len(data) or 1                             # b"" is the 1-byte status
            addr = self.alloc(n)
            fill = data or b"\xee"
            self.write_all(lambda r, a=addr, f=fill: r.mem.write(a, f))
            descs.append([addr, n, VIRTQ_DESC_F_WRITE if write else 0])
            if write:
                layout.writable.append((addr, n))
        if chain.breakage == "outside" and descs:
            n = descs[-1][1]                               # straddle the end of RAM if
            mem_size = self.rigs["python"].mem.size        # it can, else far outside
            descs[-1][0] = mem_size - n // 2 if n > 1 else 1 << 40
        if chain.breakage == "nowrite":
            for d in descs:
                d[2] &= ~VIRTQ_DESC_F_WRITE
        if chain.indirect or chain.breakage in ("nested", "indirect_len"):
            return self._place_indirect(chain, descs, layout)
        start = self.next_desc
        self.next_desc += len(descs)
        for i, (addr, n, flags) in enumerate(descs):
            nxt, more = start + i + 1, VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0
            if not more and chain.breakage == "loop":
                nxt, more = start, VIRTQ_DESC_F_NEXT
            if not more and chain.breakage == "badnext":
                nxt, more = 16, VIRTQ_DESC_F_NEXT            # == the queue size
            self.write_all(lambda r, i=i, a=addr, n=n, f=flags | more, x=nxt:
                           r.drivers[0].write_desc(start + i, a, n, f, x))
        layout.head = 16 + 5 if chain.breakage == "badhead" else start
        return layout

    def _place_indirect(self, chain: Chain, descs: list, layout: Layout) -> Layout:
        table = self.alloc(16 * len(descs) + 16)
        for i, (addr, n, flags) in enumerate(descs):
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0
            nxt = i + 1 if more else 0
            if not more and chain.breakage == "loop":
                nxt, more = 0, VIRTQ_DESC_F_NEXT
            if not more and chain.breakage == "badnext":
                nxt, more = len(descs), VIRTQ_DESC_F_NEXT    # == the table length
            if i == 0 and chain.breakage == "nested":
                addr, n, flags = table, 16, VIRTQ_DESC_F_INDIRECT
            self.write_all(lambda r, i=i, a=addr, n=n, f=flags | more, x=nxt:
                           r.drivers[0].write_desc(i, a, n, f, x, table=table))
        length = 16 * len(descs) + (8 if chain.breakage == "indirect_len" else 0)
        head = self.next_desc
        self.next_desc += 1
        self.write_all(lambda r: r.drivers[0].write_desc(head, table, length,
                                                         VIRTQ_DESC_F_INDIRECT, 0))
        layout.head = head
        return layout

    def run(self, layout: Layout) -> dict[str, tuple]:
        """Publish in both, kick, wait for the used element or NEEDS_RESET; outcomes."""
        out = {}
        for engine, rig in self.rigs.items():
            d = rig.drivers[0]
            before = d.used_idx()
            d.publish(layout.head)
            d.kick_evt.write(1)
            for _ in range(int(TIMEOUT / 0.001)):
                if d.used_idx() != before or rig.reset_seen.is_set():
                    break
                rig.reset_seen.wait(0.001)
            used = None
            if d.used_idx() != before:
                slot = before % d.size
                used = struct.unpack("<II", rig.mem.read(d.used + 4 + 8 * slot, 8))
            data = b"".join(rig.mem.read(a, n) for a, n in layout.writable)
            out[engine] = (rig.reset_reasons[:1], used, data)
        return out

    def close(self) -> dict[str, bytes]:
        for rig in self.rigs.values():
            rig.close()
        return {e: p.read_bytes() for e, p in self.paths.items()}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(st.lists(chains(), min_size=1, max_size=4))
def test_native_and_python_engines_agree(tmp_path_factory, requests):
    twin = Twin(tmp_path_factory.mktemp("twin"))
    try:
        for chain in requests:
            if twin.next_desc + len(chain.bufs) + 2 > 16:
                break                                   # the 16-entry table is full
            layout = twin.place(chain)
            outcome = twin.run(layout)
            assert outcome["native"] == outcome["python"], chain
            if outcome["python"][0]:
                break                                   # NEEDS_RESET: the device stopped
    finally:
        images = twin.close()
    assert images["native"] == images["python"]


def test_twin_detects_a_difference(tmp_path):
    """The comparison can fail: the same chain on a read-only Python disk differs."""
    twin = Twin(tmp_path)
    ro = FileDisk(twin.paths["python"], read_only=True)
    twin.rigs["python"].close()
    twin.rigs["python"] = BlkRig(VirtioBlock(ro, engine="python", queue_size=16,
                                             serial="twin"))
    twin.rigs["python"].activate()
    layout = twin.place(Chain([(header(1, 0), False), (b"\x11" * 512, False), (b"", True)],
                              False, "none"))
    outcome = twin.run(layout)
    assert outcome["native"] != outcome["python"]
    twin.close()


@pytest.fixture(autouse=True)
def _needs_native():
    from vmm_virtio_blk.native import IMPORT_ERROR
    if IMPORT_ERROR is not None:
        pytest.skip(f"native engine not built: {IMPORT_ERROR}")
