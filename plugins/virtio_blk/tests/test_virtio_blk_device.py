"""The virtio-blk device model driven through the test virtqueue driver (tier 1)."""

from __future__ import annotations

import os
import random
import struct
import threading

import pytest
from blk_rig import SECTORS, TIMEOUT, BlkRig, FileDisk, MiB, header, host, segment
from vmm_virtio_blk.device import (
    CONFIG,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SEG,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_SECURE_ERASE,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
    default_id,
)

from vmmcore.disk import Buffers, DiskError
from vmmcore.virtio import DeviceType
from vmmcore.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

OK, IOERR, UNSUPP = VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP


# -- config space and features -----------------------------------------------------------

def test_config_space_layout(image):
    path, _ = image
    dev = VirtioBlock(FileDisk(path), block_size=4096, num_queues=4, queue_size=128)
    assert dev.device_type == DeviceType.BLOCK == 2
    assert dev.queue_max_sizes == (128,) * 4
    cfg = bytes(dev.read_config(0, CONFIG.size))
    (capacity, size_max, seg_max, _cyl, _heads, _secs, blk_size, phys_exp, align_off,
     min_io, opt_io, wce, _u0, num_queues, max_discard, max_discard_seg, discard_align,
     max_wz, max_wz_seg, may_unmap) = CONFIG.unpack(cfg)
    assert capacity == SECTORS
    assert size_max > 0 and seg_max == 126
    assert blk_size == 4096 and phys_exp == 0 and align_off == 0 and min_io == 1
    assert opt_io == 0 and wce == 0 and num_queues == 4
    assert max_discard == MAX_DISCARD_SECTORS and max_discard_seg == MAX_DISCARD_SEG
    assert discard_align == 8
    assert max_wz > 0 and max_wz_seg == MAX_WRITE_ZEROES_SEG and may_unmap == 1
    # field offsets as in struct virtio_blk_config
    assert struct.unpack_from("<I", cfg, 20)[0] == 4096
    assert struct.unpack_from("<H", cfg, 34)[0] == 4
    assert struct.unpack_from("<I", cfg, 52)[0] == MAX_WRITE_ZEROES_SEG
    assert cfg[56] == 1
    # beyond the struct: zeroes
    assert dev.read_config(60, 12) == bytes(12)
    feats = dev.features()
    for bit in (VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
                VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert feats >> bit & 1, bit
    assert not feats >> VIRTIO_BLK_F_RO & 1
    dev.disk.close()


def test_read_only_features_and_config(image):
    path, _ = image
    dev = VirtioBlock(FileDisk(path, read_only=True))
    feats = dev.features()
    assert feats >> VIRTIO_BLK_F_RO & 1
    assert not feats >> VIRTIO_BLK_F_DISCARD & 1
    assert not feats >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    fields = CONFIG.unpack(bytes(dev.read_config(0, CONFIG.size)))
    assert fields[14:] == (0, 0, 0, 0, 0, 0)
    dev.disk.close()


def test_sparse_false_withholds_discard(image):
    path, _ = image
    dev = VirtioBlock(FileDisk(path), sparse=False)
    assert not dev.features() >> VIRTIO_BLK_F_DISCARD & 1
    assert dev.features() >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert dev.read_config(56, 1) == b"\0"      # write_zeroes_may_unmap
    dev.disk.close()


def test_capacity_rounds_down_to_sectors(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(4096 + 100))
    dev = VirtioBlock(FileDisk(p))
    assert struct.unpack_from("<Q", dev.config, 0)[0] == 8
    dev.set_capacity(8192)
    assert struct.unpack_from("<Q", dev.config, 0)[0] == 16
    assert dev.config_generation == 1
    dev.disk.close()


def test_bad_constructor_arguments(image):
    path, _ = image
    disk = FileDisk(path)
    for kw in ({"block_size": 1000}, {"queue_size": 100}, {"num_queues": 0},
               {"serial": "x" * 21}, {"io_threads": 0}, {"engine": "fast"},
               {"poll_us": -1}):
        with pytest.raises(ValueError):
            VirtioBlock(disk, **kw)
    disk.close()


# -- every request type -----------------------------------------------------------------

def test_read(rig, image):
    _, contents = image
    req = rig.do_read(3, 4096)
    assert req.status == OK and req.length == 4097
    assert req.data == contents[3 * 512:3 * 512 + 4096]


def test_read_scattered_and_indirect(rig, image):
    _, contents = image
    req = rig.do([header(VIRTIO_BLK_T_IN, 10)], [100, 412, 1024, 1], indirect=True)
    assert req.status == OK and req.length == 1537
    assert req.data == contents[5120:5120 + 1536]


def test_header_split_across_descriptors(rig, image):
    _, contents = image
    hdr = header(VIRTIO_BLK_T_IN, 7)
    req = rig.do([hdr[:3], hdr[3:11], hdr[11:]], [512, 1])
    assert req.status == OK and req.data == contents[7 * 512:8 * 512]


def test_status_in_the_data_descriptor(rig, image):
    """Data and status in one writable buffer: the status is its last byte."""
    _, contents = image
    req = rig.do([header(VIRTIO_BLK_T_IN, 1)], [513])
    assert req.status == OK and req.data == contents[512:1024]


def test_write(rig, image):
    path, _ = image
    data = os.urandom(2048)
    req = rig.do_write(100, data)
    assert req.status == OK and req.length == 1
    assert host(path, 100 * 512, 2048) == data
    assert rig.do_read(100, 2048).data == data


def test_write_scattered(rig, image):
    path, _ = image
    data = os.urandom(1536)
    req = rig.do([header(VIRTIO_BLK_T_OUT, 9), data[:7], data[7:1000], data[1000:]], [1])
    assert req.status == OK
    assert host(path, 9 * 512, 1536) == data


def test_last_sector(rig, image):
    path, _ = image
    data = os.urandom(512)
    assert rig.do_write(SECTORS - 1, data).status == OK
    assert host(path, MiB - 512, 512) == data
    assert rig.do_read(SECTORS - 1, 512).data == data


def test_flush(rig):
    before = rig.flushes()
    req = rig.do([header(VIRTIO_BLK_T_FLUSH)], [1])
    assert req.status == OK and req.length == 1
    assert rig.flushes() == before + 1


def test_writethrough_without_flush_feature(image, rig_factory):
    path, _ = image
    disk = FileDisk(path)
    dev_features = VirtioBlock(FileDisk(path)).features()
    rig = rig_factory(disk, rig_kw={"ack": dev_features & ~(1 << VIRTIO_BLK_F_FLUSH)})
    assert rig.do_write(0, bytes(512)).status == OK
    assert rig.flushes() == 1


def test_get_id(rig):
    req = rig.do([header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert req.status == OK and req.length == 21
    assert req.data == b"test-serial".ljust(20, b"\0")


def test_get_id_full_20_bytes_and_default(image, rig_factory):
    path, _ = image
    rig = rig_factory(FileDisk(path), serial="abcdefghijklmnopqrst")
    assert rig.do([header(VIRTIO_BLK_T_GET_ID)], [20, 1]).data == b"abcdefghijklmnopqrst"
    rig2 = rig_factory(FileDisk(path))
    got = rig2.do([header(VIRTIO_BLK_T_GET_ID)], [20, 1]).data
    assert got == default_id(path) and len(got) == 20
    assert default_id(path) == default_id(str(path)) != default_id(path.parent / "x")


def test_discard(rig, image):
    path, _ = image
    req = rig.do([header(VIRTIO_BLK_T_DISCARD), segment(8, 8), segment(32, 16)], [1])
    assert req.status == OK
    assert rig.disk_ops() == 2
    if not rig.native:
        assert rig.device.disk.calls == [("discard", 4096, 4096), ("discard", 16384, 8192)]
    # FileDisk writes zeroes, the native engine punches a hole: both read back as zeroes
    assert host(path, 4096, 4096) == bytes(4096) and host(path, 16384, 8192) == bytes(8192)


def test_write_zeroes(rig, image):
    path, contents = image
    req = rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(2, 3, 1), segment(10, 1)], [1])
    assert req.status == OK
    assert rig.disk_ops() == 2
    if not rig.native:
        assert rig.device.disk.calls == [("write_zeroes", 1024, 1536, True),
                                         ("write_zeroes", 5120, 512, False)]
    assert host(path, 5120, 512) == bytes(512)
    assert host(path, 1024, 1536) == bytes(1536)
    assert host(path, 2560, 512) == contents[2560:3072]
    assert rig.do_read(2, 1536).data == bytes(1536)


def test_write_zeroes_unmap_ignored_when_may_unmap_is_off(image, rig_factory):
    path, _ = image
    rig = rig_factory(FileDisk(path), sparse=False)
    req = rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 1, 1)], [1])
    assert req.status == OK
    assert rig.disk_ops() == 1 and host(path, 0, 512) == bytes(512)
    if not rig.native:
        assert rig.device.disk.calls == [("write_zeroes", 0, 512, False)]
    # DISCARD was not offered: UNSUPP
    assert rig.do([header(VIRTIO_BLK_T_DISCARD), segment(0, 1)], [1]).status == UNSUPP


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_SECURE_ERASE,
                                   2, 3, 99, 0xFFFFFFFF])
def test_unknown_types_are_unsupp(rig, rtype):
    req = rig.do([header(rtype)], [1])
    assert req.status == UNSUPP and req.length == 1
    assert rig.do_read(0, 512).status == OK   # the device carries on


# -- error statuses --------------------------------------------------------------------

@pytest.mark.parametrize("sector,nbytes", [
    (SECTORS, 512),                 # starts at the end
    (SECTORS - 1, 1024),            # crosses the end
    (2**64 - 1, 512),               # sector overflow
    (2**63, 512),
    (2**55, 512),                   # sector * 512 overflows u64
])
def test_read_past_end_is_ioerr(rig, sector, nbytes):
    req = rig.do_read(sector, nbytes)
    assert req.status == IOERR and req.length == 1


def test_write_past_end_is_ioerr_and_writes_nothing(rig, image):
    path, contents = image
    req = rig.do_write(SECTORS - 1, os.urandom(1024))
    assert req.status == IOERR
    assert path.read_bytes() == contents


@pytest.mark.parametrize("nbytes", [1, 511, 513, 4095])
def test_data_length_not_a_sector_multiple(rig, nbytes):
    assert rig.do_read(0, nbytes).status == IOERR
    assert rig.do_write(0, bytes(nbytes)).status == IOERR


def test_zero_length_transfer(rig):
    assert rig.do([header(VIRTIO_BLK_T_IN, 0)], [1]).status == OK
    assert rig.do([header(VIRTIO_BLK_T_IN, SECTORS + 1)], [1]).status == IOERR


def test_missing_or_short_header(rig):
    assert rig.do([], [1]).status == IOERR                       # status byte only
    assert rig.do([header(VIRTIO_BLK_T_IN)[:15]], [512, 1]).status == IOERR


def test_data_direction_wrong(rig, image):
    path, contents = image
    # IN with device-readable data after the header
    assert rig.do([header(VIRTIO_BLK_T_IN), bytes(512)], [512, 1]).status == IOERR
    # OUT with device-writable data before the status
    assert rig.do([header(VIRTIO_BLK_T_OUT), os.urandom(512)], [512, 1]).status == IOERR
    assert path.read_bytes() == contents


def test_readable_after_writable_is_ioerr(rig):
    d, mem = rig.drivers[0], rig.mem
    hdr, status, tail = 0x200000, 0x200100, 0x200200
    mem.write(hdr, header(VIRTIO_BLK_T_IN))
    mem.write(status, b"\xaa")
    d.write_desc(0, hdr, 16, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    d.write_desc(2, tail, 16, 0, 0)
    d.publish(0)
    d.kick_evt.write(1)
    _wait_used(rig)
    assert mem.read(status, 1) == bytes([IOERR])
    assert not rig.interrupt.needs_reset


def test_get_id_buffer_too_small(rig):
    assert rig.do([header(VIRTIO_BLK_T_GET_ID)], [10, 1]).status == IOERR


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_discard_write_zeroes_errors(rig, rtype):
    def do(*segs):
        return rig.do([header(rtype), *segs], [1]).status

    assert do() == IOERR                                          # no segment
    assert do(segment(0, 1)[:15]) == IOERR                         # truncated segment
    assert do(segment(0, 1), b"x") == IOERR
    assert do(segment(SECTORS - 1, 2)) == IOERR                    # past the end
    assert do(segment(2**64 - 1, 1)) == IOERR
    assert do(segment(0, MAX_DISCARD_SECTORS + 1)) == IOERR        # over the limit
    too_many = [segment(i, 1) for i in range(MAX_DISCARD_SEG + 1)]
    assert do(*too_many) == IOERR
    assert do(segment(0, 1, 2)) == UNSUPP                          # unknown flag
    assert do(segment(0, 1), segment(1, 1, 0x80000000)) == UNSUPP
    assert rig.disk_ops() == 0                                     # nothing was done
    if rtype == VIRTIO_BLK_T_DISCARD:
        assert do(segment(0, 1, 1)) == UNSUPP                      # unmap on discard
    assert do(segment(0, 1)) == OK


class FailingDisk(FileDisk):
    def read_into(self, offset: int, bufs: Buffers) -> int:
        raise DiskError("medium error")

    def flush(self) -> None:
        raise OSError(5, "EIO")


class NativeFailingDisk(FileDisk):
    """For the native engine: the file it is handed is a pipe (no positional I/O, no
    fdatasync), so every read, write and flush fails in the kernel."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.pipe = os.pipe()

    def file_extent(self):
        from vmmcore.disk import FileExtent
        return FileExtent(self.pipe[0])

    def close(self) -> None:
        super().close()
        for fd in self.pipe:
            os.close(fd)


def test_disk_errors_are_ioerr(image, rig_factory, engine, caplog):
    path, _ = image
    if engine == "native":
        rig = rig_factory(NativeFailingDisk(path))
        assert rig.do_read(0, 512).status == IOERR
        assert rig.do([header(VIRTIO_BLK_T_FLUSH)], [1]).status == IOERR
        assert rig.do_write(0, bytes(512)).status == IOERR
        assert rig.device.engine_stats()["disk_errors"] == 3
        assert not rig.interrupt.needs_reset
        return
    rig = rig_factory(FailingDisk(path))
    assert rig.do_read(0, 512).status == IOERR
    assert rig.do([header(VIRTIO_BLK_T_FLUSH)], [1]).status == IOERR
    assert rig.do_write(0, bytes(512)).status == OK
    assert not rig.interrupt.needs_reset


def test_native_disk_errors_are_all_counted_in_the_log(image, rig_factory, engine, caplog):
    """Errors that happen before Python reads the engine's messages are not lost: the
    log line says how many there were besides the one it quotes."""
    if engine == "python":
        pytest.skip("native engine only (the Python engine logs each one itself)")
    import re

    path, _ = image
    rig = rig_factory(NativeFailingDisk(path))
    for i in range(8):
        rig.read(i, 512, kick=False, indirect=True)
    rig.drivers[0].kick_evt.write(1)
    assert all(r.status == IOERR for r in rig.wait(8))
    rig.device.reset()                     # the engine's last messages are read here
    logged = 0
    for rec in caplog.records:
        if "request failed" in rec.getMessage():
            more = re.search(r"and (\d+) more disk errors", rec.getMessage())
            logged += 1 + (int(more.group(1)) if more else 0)
    assert logged == 8


# -- read-only -----------------------------------------------------------------------------

def test_read_only_enforced(image, rig_factory):
    path, contents = image
    rig = rig_factory(FileDisk(path, read_only=True))
    assert rig.do_read(0, 512).status == OK
    assert rig.do_write(0, os.urandom(512)).status == IOERR
    assert rig.do([header(VIRTIO_BLK_T_DISCARD), segment(0, 1)], [1]).status == IOERR
    assert rig.do([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 1)], [1]).status == IOERR
    assert rig.do([header(VIRTIO_BLK_T_FLUSH)], [1]).status == OK
    assert path.read_bytes() == contents


def test_read_only_option_over_a_writable_disk(image, rig_factory):
    path, contents = image
    rig = rig_factory(FileDisk(path), read_only=True)
    assert rig.device.features() >> VIRTIO_BLK_F_RO & 1
    assert rig.do_write(0, os.urandom(512)).status == IOERR
    assert path.read_bytes() == contents


# -- malformed chains: NEEDS_RESET only when no status can be written ----------------------

def _wait_used(rig, n=1, queue=0):
    """Wait until the device published n used entries (for hand-built chains)."""
    d = rig.drivers[queue]
    for _ in range(int(TIMEOUT / 0.01)):
        if d.used_idx() >= n:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the device never completed the request")


def test_chain_without_writable_byte_needs_reset(rig):
    d = rig.drivers[0]
    rig.mem.write(0x200000, header(VIRTIO_BLK_T_IN))
    d.write_desc(0, 0x200000, 16, 0, 0)
    d.publish(0)
    d.kick_evt.write(1)
    assert rig.reset_seen.wait(TIMEOUT)
    assert "no device-writable status byte" in rig.reset_reasons[0]
    assert rig.interrupt.needs_reset


def test_buffer_outside_guest_memory_needs_reset(rig):
    d = rig.drivers[0]
    rig.mem.write(0x200000, header(VIRTIO_BLK_T_IN))
    d.write_desc(0, 0x200000, 16, VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, 1 << 40, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    d.write_desc(2, 0x200100, 1, VIRTQ_DESC_F_WRITE, 0)
    d.publish(0)
    d.kick_evt.write(1)
    assert rig.reset_seen.wait(TIMEOUT)
    assert "outside guest RAM" in rig.reset_reasons[0]


def test_reset_and_reactivate_after_needs_reset(image, rig_factory, caplog):
    path, contents = image
    rig = rig_factory(FileDisk(path))
    d = rig.drivers[0]
    d.publish(rig.device.queue_size + 5)           # head beyond the queue
    d.kick_evt.write(1)
    assert rig.reset_seen.wait(TIMEOUT)
    assert rig.device.reset()
    # one failure, reported once (not again while the reset stops the engine)
    assert len(rig.reset_reasons) == 1
    assert sum("device needs reset" in r.getMessage() for r in caplog.records) == 1
    rig.interrupt.reset()
    from vmmcore.virtio.testing import VirtqueueDriver
    rig.drivers[0] = VirtqueueDriver(rig.mem, rig.device.queue_size, 0x1000,
                                     BlkRig.DATA_BASE, BlkRig.DATA_PER_QUEUE,
                                     event_idx=True, indirect=True, kick_evt=rig.kicks[0])
    rig.requests.clear()
    rig.device.ack_features(rig.device.features())
    rig.activate()
    assert rig.do_read(1, 512).data == contents[512:1024]


def test_hostile_headers_fuzz(rig, image):
    """Random headers and lengths: every request answered, the device never breaks."""
    path, _ = image
    rng = random.Random(1234)
    for _ in range(200):
        rtype = rng.choice([0, 1, 4, 8, 11, 13, rng.randrange(2**32)])
        sector = rng.choice([0, rng.randrange(SECTORS), SECTORS, rng.randrange(2**64)])
        out = [header(rtype, sector, rng.randrange(2**32))]
        if rng.random() < 0.5:
            out.append(os.urandom(rng.choice([0, 1, 16, 512, 1000])) or b"\0")
        ins = [rng.choice([1, 20, 512, 513, 4096])]
        req = rig.do(out, ins)
        assert req.status in (OK, IOERR, UNSUPP)
        assert 1 <= req.length <= sum(ins)
    assert not rig.interrupt.needs_reset
    assert os.path.getsize(path) == MiB
