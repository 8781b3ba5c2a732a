"""The qcow2 DiskFile: reads, writes, allocation, refcounts, backing files, snapshots.

Crash safety (metadata order)
-----------------------------
Metadata is written through (no write-back cache), in an order such that a process killed
at any point leaves an image that is consistent except for leaked clusters:

1. refcounts first: a cluster's refcount is raised (a new refcount block is written in
   full before the refcount-table entry that points at it; a grown refcount table is
   written and synced before the header points at it) before anything refers to it;
2. then the data (a newly allocated cluster is written in full, with the parts the
   request does not cover copied from the old cluster, the backing file or zeroes);
3. then the L2 entry (a new L2 table is written in full before its L1 entry);
4. then the L1 entry (or, for a grown L1 table, the header, after a sync);
5. last, the refcounts of clusters that are no longer referenced are lowered.

A crash between any two steps leaves clusters whose refcount is too high (leaks, which
`qemu-img check -r leaks` reclaims), never a reference to a cluster with a too-low
refcount. flush() is fdatasync(): everything written before it is durable after it.

Concurrency: one lock guards the metadata. Reads and in-place writes look up their host
extents under the lock and then move data with preadv/pwritev straight into or out of
the caller's memoryviews without holding it; freeing a cluster waits until such in-flight
I/O has finished, so a freed cluster is never reused under a running request.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from vmm_qcow2.layout import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_VIRTUAL_SIZE,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    LayoutError,
    Snapshot,
    parse_header,
    parse_snapshots,
)
from vmmcore.disk import (
    DiskCapabilities,
    DiskError,
    DiskFile,
    DiskFormat,
    DiskOpener,
)

IOV_MAX = 1024
_SWAP = sys.byteorder == "little"


def be_table(raw: bytes) -> array:
    """A big-endian table of 64-bit entries as an array('Q') (8 bytes per entry)."""
    t = array("Q")
    t.frombytes(raw)
    if _SWAP:
        t.byteswap()
    return t


def to_be(t: array) -> bytes:
    """An array('Q') as big-endian bytes."""
    if not _SWAP:
        return t.tobytes()
    c = array("Q", t)
    c.byteswap()
    return c.tobytes()
_ZEROS = bytes(1 << 21)

# extent kinds of the read map
_DATA, _ZERO, _UNALLOC, _COMP = range(4)


class _InFlight:
    """Counts data I/O running outside the metadata lock; drain() waits for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._n = 0

    def enter(self) -> None:
        with self._cond:
            self._n += 1

    def leave(self) -> None:
        with self._cond:
            self._n -= 1
            if self._n == 0:
                self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            while self._n:
                self._cond.wait()


class _Bufs:
    """A list of byte memoryviews seen as one buffer; slice() gives zero-copy sub-lists."""

    def __init__(self, bufs: Sequence[memoryview | bytes | bytearray]) -> None:
        self.views: list[memoryview] = []
        self.starts: list[int] = []
        pos = 0
        for b in bufs:
            mv = b if isinstance(b, memoryview) else memoryview(b)
            if mv.ndim != 1 or mv.format != "B":
                mv = mv.cast("B")
            if len(mv):
                self.views.append(mv)
                self.starts.append(pos)
                pos += len(mv)
        self.total = pos

    def slice(self, a: int, b: int) -> list[memoryview]:
        out: list[memoryview] = []
        if a >= b:
            return out
        i = bisect.bisect_right(self.starts, a) - 1
        while a < b:
            v, s = self.views[i], self.starts[i]
            hi = min(len(v), b - s)
            out.append(v[a - s:hi])
            a = s + hi
            i += 1
        return out


def _fill_zero(views: list[memoryview]) -> None:
    for v in views:
        n = len(v)
        pos = 0
        while pos < n:
            k = min(n - pos, len(_ZEROS))
            v[pos:pos + k] = _ZEROS[:k]
            pos += k


def _copy_into(views: list[memoryview], data: bytes | memoryview) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos:pos + len(v)]
        pos += len(v)


class Qcow2File(DiskFile):
    """An open qcow2 image (version 2 or 3)."""

    format_name = "qcow2"

    def __init__(self, path: Path, read_only: bool, opener: DiskOpener | None = None, *,
                 l2_cache_bytes: int = 32 << 20, barriers: bool = False,
                 _opening: frozenset[str] = frozenset()) -> None:
        super().__init__(Path(path), read_only)
        self._lock = threading.RLock()
        self._end_lock = threading.Lock()
        self._io = _InFlight()
        self._fd = -1
        self.backing: DiskFile | None = None
        self._closed = False
        self._barriers = barriers
        try:
            self._fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR)
                               | os.O_CLOEXEC)
        except OSError as e:
            raise DiskError(f"cannot open qcow2 image {self.path}: {e.strerror}") from None
        try:
            self._load(l2_cache_bytes)
            self._open_backing(opener, _opening)
            if not read_only:
                self._prepare_write()
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ helpers

    def _err(self, msg: str) -> DiskError:
        return DiskError(f"qcow2 image {self.path}: {msg}")

    def _pread(self, off: int, n: int, what: str) -> bytes:
        try:
            data = os.pread(self._fd, n, off)
        except OSError as e:
            raise self._err(f"reading {what} at {off:#x}: {e.strerror}") from None
        if len(data) < n:
            raise self._err(f"{what} at {off:#x}+{n} lies past the end of the file")
        return data

    def _pwrite(self, off: int, data: bytes | bytearray | memoryview) -> None:
        if off < 0 or off + len(data) > MAX_HOST_OFFSET:
            raise self._err(f"refusing to write at host offset {off:#x}")
        mv = memoryview(data)
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self._fd, mv[done:], off + done)
        except OSError as e:
            raise self._err(f"write at {off:#x}: {e.strerror}") from None
        self._file_end = max(self._file_end, off + len(mv))

    def _pwritev(self, off: int, views: list[memoryview]) -> None:
        if off < 0 or off + sum(len(v) for v in views) > MAX_HOST_OFFSET:
            raise self._err(f"refusing to write at host offset {off:#x}")
        try:
            while views:
                batch = views[:IOV_MAX]
                want = sum(len(v) for v in batch)
                n = os.pwritev(self._fd, batch, off)
                if n < want:    # partial: retry the rest
                    rest = []
                    skip = n
                    for v in batch:
                        if skip >= len(v):
                            skip -= len(v)
                            continue
                        rest.append(v[skip:])
                        skip = 0
                    views = rest + views[IOV_MAX:]
                else:
                    views = views[IOV_MAX:]
                off += n
        except OSError as e:
            raise self._err(f"write at {off:#x}: {e.strerror}") from None
        if off > self._file_end:
            with self._end_lock:        # not the metadata lock: this runs in flight
                self._file_end = max(self._file_end, off)

    def _preadv(self, off: int, views: list[memoryview]) -> None:
        """Read into views; bytes past the end of the file read as zeroes."""
        try:
            while views:
                batch = views[:IOV_MAX]
                want = sum(len(v) for v in batch)
                n = os.preadv(self._fd, batch, off)
                if n < want:
                    rest = []
                    skip = n
                    for v in batch:
                        if skip >= len(v):
                            skip -= len(v)
                            continue
                        rest.append(v[skip:])
                        skip = 0
                    if n == 0:      # end of file
                        _fill_zero(rest + views[IOV_MAX:])
                        return
                    views = rest + views[IOV_MAX:]
                else:
                    views = views[IOV_MAX:]
                off += n
        except OSError as e:
            raise self._err(f"read at {off:#x}: {e.strerror}") from None

    def _extend_file(self, end: int) -> None:
        try:
            os.ftruncate(self._fd, end)
        except OSError as e:
            raise self._err(f"extending the file to {end}: {e.strerror}") from None
        self._file_end = max(self._file_end, end)

    def _write_header_field(self, offset: int, fmt: str, *values: int) -> None:
        self._pwrite(offset, struct.pack(fmt, *values))

    # ------------------------------------------------------------------ open

    def _load(self, l2_cache_bytes: int) -> None:
        try:
            self._file_end = os.fstat(self._fd).st_size
        except OSError as e:
            raise self._err(f"stat: {e.strerror}") from None
        head = os.pread(self._fd, 1 << 21, 0)
        try:
            h = parse_header(head, self._file_end)
        except LayoutError as e:
            raise self._err(str(e)) from None
        self.header = h
        self._cb = h.cluster_bits
        self._cs = 1 << self._cb
        self._l2_bits = self._cb - 3
        self._l2_entries = 1 << self._l2_bits
        self._rc_bits = 1 << h.refcount_order
        self._rc_max = (1 << self._rc_bits) - 1
        self._rc_per_block = self._cs * 8 // self._rc_bits
        self._size = h.size
        if h.incompatible & INCOMPAT_CORRUPT and not self.read_only:
            raise self._err("marked corrupt (repair it with `qemu-img check -r all`); "
                            "it can only be opened read-only")

        cs = self._cs
        # the regions the fixed metadata occupies, for overlap checks
        regions: list[tuple[int, int, str]] = [(0, cs, "header")]
        if h.l1_size:
            regions.append((h.l1_table_offset, h.l1_size * 8, "L1 table"))
        regions.append((h.refcount_table_offset, h.refcount_table_clusters * cs,
                        "refcount table"))
        self.snapshots: list[Snapshot] = []
        self._snap_table_len = 0
        if h.nb_snapshots:
            # the table's length is known only by parsing it; read up to what is there
            avail = min(self._file_end - h.snapshots_offset, 64 << 20)
            data = self._pread(h.snapshots_offset, avail, "snapshot table")
            try:
                self.snapshots, self._snap_table_len = parse_snapshots(
                    data, h.nb_snapshots, cs, self._file_end)
            except LayoutError as e:
                raise self._err(str(e)) from None
            regions.append((h.snapshots_offset, self._snap_table_len, "snapshot table"))
            for i, s in enumerate(self.snapshots):
                if s.l1_size:
                    regions.append((s.l1_table_offset, s.l1_size * 8,
                                    f"snapshot {i} L1 table"))
        regions.sort()
        for (a, alen, an), (b, _blen, bn) in zip(regions, regions[1:], strict=False):
            if a + alen > b:
                raise self._err(f"{an} overlaps {bn}")
        # clusters that no data may be written into
        self._meta: set[int] = set()
        self._fixed: dict[int, str] = {}        # header, L1, refcount and snapshot tables
        for off, length, name in regions:
            for c in range(off >> self._cb, (off + length - 1 >> self._cb) + 1):
                self._fixed[c] = name
        self._meta.update(self._fixed)

        raw = self._pread(h.l1_table_offset, h.l1_size * 8, "L1 table") if h.l1_size else b""
        self._l1 = be_table(raw)
        n = h.refcount_table_clusters * cs // 8
        raw = self._pread(h.refcount_table_offset, n * 8, "refcount table")
        self._reftable = be_table(raw)
        for i, e in enumerate(self._reftable):
            off = e & REFT_OFFSET_MASK
            if off:
                self._check_table_ref(off, f"refcount block {i}")
                self._meta.add(off >> self._cb)
        for i, e in enumerate(self._l1):
            off = e & OFFSET_MASK
            if off:
                self._check_table_ref(off, f"L1 entry {i}: L2 table")
                self._meta.add(off >> self._cb)

        self._l2_cache: OrderedDict[int, list[int]] = OrderedDict()
        self._l2_cache_max = max(8, l2_cache_bytes // cs)
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_cache_max = max(8, (4 << 20) // cs)
        self._comp_cache: tuple[int, bytes] | None = None
        self._next_free = 1
        self._reserved: list[tuple[int, int]] = []
        self._pinned: set[int] = set()     # in use although refcounts may say otherwise
        self._zstd = None

    def _check_table_ref(self, off: int, what: str) -> None:
        if off & (self._cs - 1):
            raise self._err(f"{what} offset {off:#x} is not cluster aligned")
        if off + self._cs > self._file_end:
            raise self._err(f"{what} offset {off:#x} lies past the end of the file")
        if off >> self._cb in self._fixed:
            raise self._err(f"{what} at {off:#x} overlaps the {self._fixed[off >> self._cb]}")

    def _open_backing(self, opener: DiskOpener | None, opening: frozenset[str]) -> None:
        name = self.header.backing_file
        if not name:
            return
        if opener is None:
            raise self._err("has a backing file but no opener was given")
        if name.startswith("json:") or ("://" in name):
            raise self._err(f"backing file {name!r}: only local files are supported")
        path = Path(name) if os.path.isabs(name) else self.path.parent / name
        real = os.path.realpath(path)
        me = os.path.realpath(self.path)
        if real == me or real in opening:
            raise self._err(f"backing chain loop: {name} is already in the chain")
        token = _CHAIN.push(opening | {me})
        try:
            self.backing = opener(path, self.header.backing_format, read_only=True)
        except DiskError as e:
            msg = str(e)
            if "backing chain" in msg:
                raise DiskError(msg) from None
            raise self._err(f"backing file {name}: {msg}") from None
        finally:
            _CHAIN.pop(token)

    def _prepare_write(self) -> None:
        h = self.header
        changed = False
        if h.version >= 3 and h.autoclear:
            # we do not maintain what the autoclear features describe (bitmaps ...)
            h.autoclear = 0
            self._write_header_field(88, ">Q", 0)
            changed = True
        if h.version >= 3 and h.incompatible & INCOMPAT_DIRTY:
            # the image was not closed cleanly with lazy refcounts: rebuild them
            from vmm_qcow2.check import repair_refcounts

            repair_refcounts(self)
            self._sync()
            h.incompatible &= ~INCOMPAT_DIRTY
            self._write_header_field(72, ">Q", h.incompatible)
            changed = True
        if changed:
            self._sync()

    # ------------------------------------------------------------------ metadata

    def _barrier(self) -> None:
        """With barriers=True, make the previous step durable before the next one (the
        write order then survives power loss, not only a killed process)."""
        if self._barriers:
            self._sync()

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._err(f"fdatasync: {e.strerror}") from None

    def _l2_load(self, off: int) -> list[int]:
        t = self._l2_cache.get(off)
        if t is not None:
            self._l2_cache.move_to_end(off)
            return t
        self._check_table_ref(off, "L2 table")
        raw = self._pread(off, self._cs, "L2 table")
        t = be_table(raw)
        self._l2_cache[off] = t
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return t

    def _rb_load(self, off: int) -> bytearray:
        b = self._rb_cache.get(off)
        if b is not None:
            self._rb_cache.move_to_end(off)
            return b
        self._check_table_ref(off, "refcount block")
        b = bytearray(self._pread(off, self._cs, "refcount block"))
        self._rb_cache[off] = b
        if len(self._rb_cache) > self._rb_cache_max:
            self._rb_cache.popitem(last=False)
        return b

    def _rb_get(self, blk: bytearray, i: int) -> int:
        bits = self._rc_bits
        if bits >= 8:
            w = bits >> 3
            return int.from_bytes(blk[i * w:(i + 1) * w], "big")
        per = 8 // bits
        return (blk[i // per] >> (bits * (i % per))) & ((1 << bits) - 1)

    def _rb_set(self, blk: bytearray, i: int, v: int) -> tuple[int, int]:
        """Set entry i; returns the byte range touched."""
        bits = self._rc_bits
        if bits >= 8:
            w = bits >> 3
            blk[i * w:(i + 1) * w] = v.to_bytes(w, "big")
            return i * w, (i + 1) * w
        per = 8 // bits
        shift = bits * (i % per)
        mask = ((1 << bits) - 1) << shift
        blk[i // per] = (blk[i // per] & ~mask) | (v << shift)
        return i // per, i // per + 1

    def refcount(self, cluster: int) -> int:
        """The refcount of host cluster index `cluster` (0 when no block covers it)."""
        bi, idx = divmod(cluster, self._rc_per_block)
        if bi >= len(self._reftable):
            return 0
        off = self._reftable[bi] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self._rb_get(self._rb_load(off), idx)

    def _is_free(self, c: int) -> bool:
        if c in self._meta or c in self._pinned or self.refcount(c):
            return False
        return all(not a <= c < b for a, b in self._reserved)

    def _find_free(self, k: int) -> int:
        c = max(self._next_free, 1)
        run = 0
        while True:
            z = self._next_zero_refcount(c)
            if z != c:
                run = 0
                c = z
            if self._is_free(c):
                run += 1
                if run == k:
                    return c - k + 1
            else:
                run = 0
            c += 1

    def _next_zero_refcount(self, c: int) -> int:
        """The first cluster >= c whose stored refcount is 0 (block-wise byte search)."""
        per = self._rc_per_block
        while True:
            bi, idx = divmod(c, per)
            if bi >= len(self._reftable):
                return c
            off = self._reftable[bi] & REFT_OFFSET_MASK
            if not off:
                return c
            blk = self._rb_load(off)
            bits = self._rc_bits
            if bits < 8:
                for i in range(idx, per):
                    if not self._rb_get(blk, i):
                        return bi * per + i
            else:
                w = bits >> 3
                zero = bytes(w)
                pos = idx * w
                while True:
                    j = blk.find(zero, pos)
                    if j < 0:
                        break
                    if j % w:
                        pos = j - j % w + w
                        continue
                    return bi * per + j // w
            c = (bi + 1) * per

    def _update_refcounts(self, changes: list[tuple[int, int]]) -> None:
        """Apply (cluster, delta) changes; new refcount blocks are created as needed.

        Clusters whose refcount drops to 0 become free (after in-flight I/O drains).
        """
        touched: dict[int, list[int]] = {}
        freed = False
        for c, d in changes:
            bi, idx = divmod(c, self._rc_per_block)
            off = self._refblock(bi, create=d > 0)
            if not off:
                raise self._err(f"refcount of cluster {c:#x} would drop below 0")
            blk = self._rb_load(off)
            old = self._rb_get(blk, idx)
            new = old + d
            if new < 0:
                raise self._err(f"refcount of cluster {c:#x} would drop below 0 "
                                "(corrupt refcounts)")
            if new > self._rc_max:
                raise self._err(f"refcount of cluster {c:#x} would overflow "
                                f"{self._rc_bits}-bit refcounts")
            if new == 0 and old:
                if not freed:
                    self._io.drain()
                    freed = True
                self._next_free = min(self._next_free, c)
            a, b = self._rb_set(blk, idx, new)
            r = touched.setdefault(off, [a, b])
            r[0], r[1] = min(r[0], a), max(r[1], b)
        for off, (a, b) in touched.items():
            blk = self._rb_load(off)
            self._pwrite(off + a, blk[a:b])

    def _refblock(self, bi: int, create: bool) -> int:
        """The offset of refcount block bi; created (refcounts first) when create is set."""
        if bi >= len(self._reftable):
            if not create:
                return 0
            self._grow_reftable(bi)
        off = self._reftable[bi] & REFT_OFFSET_MASK
        if off or not create:
            return off
        # a new block: placed in a free cluster, preferably one that it covers itself
        b = self._find_free(1)
        blk = bytearray(self._cs)
        if b // self._rc_per_block == bi:
            self._rb_set(blk, b % self._rc_per_block, 1)
        else:
            self._reserved.append((b, b + 1))
            try:
                self._update_refcounts([(b, 1)])
            finally:
                self._reserved.remove((b, b + 1))
        if bi >= len(self._reftable):    # the recursion may have grown the table
            self._grow_reftable(bi)
        if self._reftable[bi] & REFT_OFFSET_MASK:   # ... or even created this block
            if b // self._rc_per_block != bi:
                self._update_refcounts([(b, -1)])
            return self._reftable[bi] & REFT_OFFSET_MASK
        self._pwrite(b << self._cb, blk)
        self._rb_cache[b << self._cb] = blk
        self._meta.add(b)
        self._reftable[bi] = b << self._cb
        self._pwrite(self.header.refcount_table_offset + bi * 8,
                     struct.pack(">Q", b << self._cb))
        return b << self._cb

    def _grow_reftable(self, bi_needed: int) -> None:
        """A bigger refcount table, with the refcount blocks it needs for itself."""
        cs, per = self._cs, self._rc_per_block
        old = self._reftable
        want = max(bi_needed + 1, len(old) * 3 // 2 + 1)
        start = max(-(-self._file_end // cs), self._next_free,
                    *(b for _a, b in self._reserved), 1)
        while True:
            nb = 0
            while True:
                tc = -(-want * 8 // cs)
                end = start + tc + nb
                if (end - 1) // per >= want:
                    want = (end - 1) // per + 1
                    continue
                new_blocks = [bi for bi in range(start // per, (end - 1) // per + 1)
                              if bi >= len(old) or not old[bi] & REFT_OFFSET_MASK]
                if len(new_blocks) == nb:
                    break
                nb = len(new_blocks)
            if tc * cs > MAX_REFTABLE_BYTES:
                raise self._err("the image is too large: its refcount table would exceed "
                                f"{MAX_REFTABLE_BYTES >> 20} MiB")
            busy = [c for c in range(start, end) if not self._is_free(c)]
            if not busy:
                break
            start = busy[-1] + 1
        table_off = start * cs
        new = array("Q", old)
        new.frombytes(bytes((want - len(old)) * 8))
        blocks: dict[int, bytearray] = {}
        for j, bi in enumerate(new_blocks):
            blocks[bi] = bytearray(cs)
            new[bi] = (start + tc + j) * cs
        # 1. refcounts for the new clusters: in existing blocks, or in the new ones
        self._reserved.append((start, end))
        try:
            existing = []
            for c in range(start, end):
                bi = c // per
                if bi in blocks:
                    self._rb_set(blocks[bi], c % per, 1)
                else:
                    existing.append((c, 1))
            self._update_refcounts(existing)
            # 2. the new blocks and the new table, synced
            for bi, blk in blocks.items():
                self._pwrite(new[bi], blk)
            self._pwrite(table_off, to_be(new)
                         + bytes(tc * cs - want * 8))
            self._sync()
            # 3. the header points at the new table
            self._write_header_field(48, ">QI", table_off, tc)
            self._sync()
        finally:
            self._reserved.remove((start, end))
        old_off, old_clusters = (self.header.refcount_table_offset,
                                 self.header.refcount_table_clusters)
        self.header.refcount_table_offset, self.header.refcount_table_clusters = table_off, tc
        new.frombytes(bytes((tc * cs // 8 - want) * 8))
        self._reftable = new
        for bi, blk in blocks.items():
            self._rb_cache[new[bi]] = blk
            self._meta.add(new[bi] >> self._cb)
        self._meta.update(range(start, start + tc))
        old_c = old_off >> self._cb
        self._meta.difference_update(range(old_c, old_c + old_clusters))
        for c in range(old_c, old_c + old_clusters):
            self._fixed.pop(c, None)
        self._fixed.update((c, "refcount table") for c in range(start, start + tc))
        # 4. the old table's clusters are free
        self._update_refcounts([(c, -1) for c in range(old_c, old_c + old_clusters)])

    def _alloc(self, k: int) -> int:
        """Allocate k contiguous clusters (refcount 1); returns the host offset."""
        start = self._find_free(k)
        if (start + k) << self._cb > MAX_HOST_OFFSET:
            raise self._err("image file would exceed the largest qcow2 offset")
        self._reserved.append((start, start + k))
        try:
            self._update_refcounts([(c, 1) for c in range(start, start + k)])
        finally:
            self._reserved.remove((start, start + k))
        self._next_free = start + k
        self._barrier()         # refcounts before anything refers to the clusters
        return start << self._cb

    def _entry_clusters(self, e: int) -> list[int]:
        """Host clusters an L2 entry holds a reference to."""
        if e & OFLAG_COMPRESSED:
            off, length = self._compressed_extent(e)
            return list(range(off >> self._cb, (off + length - 1 >> self._cb) + 1))
        host = e & OFFSET_MASK
        return [host >> self._cb] if host else []

    def _compressed_extent(self, e: int) -> tuple[int, int]:
        shift = 62 - (self._cb - 8)
        off = e & ((1 << shift) - 1)
        sectors = ((e >> shift) & ((1 << (self._cb - 8)) - 1)) + 1
        return off, sectors * 512 - (off & 511)

    def _set_l1(self, i: int, value: int) -> None:
        self._l1[i] = value
        self._pwrite(self.header.l1_table_offset + i * 8, struct.pack(">Q", value))

    def _l2_for_write(self, l1i: int) -> tuple[int, list[int]]:
        """The L2 table for L1 index l1i, allocated or copied so it may be changed."""
        e = self._l1[l1i]
        off = e & OFFSET_MASK
        if not off:
            new = self._alloc(1)
            self._pwrite(new, bytes(self._cs))
            t = array("Q", bytes(self._cs))
        else:
            if e & OFLAG_COPIED or self.refcount(off >> self._cb) == 1:
                if not e & OFLAG_COPIED:
                    self._set_l1(l1i, off | OFLAG_COPIED)
                return off, self._l2_load(off)
            # shared with a snapshot: copy on write
            old = self._l2_load(off)
            t = array("Q", old)
            for i, x in enumerate(t):
                if x & OFLAG_COPIED:
                    t[i] = x & ~OFLAG_COPIED
            new = self._alloc(1)
            self._pwrite(new, to_be(t))
        self._l2_cache[new] = t
        self._meta.add(new >> self._cb)
        self._barrier()         # the table before the L1 entry that points at it
        self._set_l1(l1i, new | OFLAG_COPIED)
        if off:
            self._meta.discard(off >> self._cb)
            self._l2_cache.pop(off, None)
            self._barrier()
            self._update_refcounts([(off >> self._cb, -1)])
        return new, t

    def _write_l2_entries(self, l2off: int, t: list[int], a: int, b: int) -> None:
        self._pwrite(l2off + a * 8, to_be(t[a:b]))

    # ------------------------------------------------------------------ mapping

    def _data_host(self, e: int, vcl: int) -> int:
        host = e & OFFSET_MASK
        if host & (self._cs - 1):
            raise self._err(f"L2 entry for cluster {vcl}: data offset {host:#x} is not "
                            "cluster aligned")
        if host >= self._file_end:
            raise self._err(f"L2 entry for cluster {vcl}: data offset {host:#x} lies past "
                            "the end of the file")
        if host >> self._cb in self._meta:
            raise self._err(f"L2 entry for cluster {vcl}: data cluster {host:#x} overlaps "
                            "metadata")
        return host

    def _classify(self, e: int, vcl: int) -> tuple[int, int]:
        if e & OFLAG_COMPRESSED:
            off, _ = self._compressed_extent(e)
            if off >= self._file_end or off < self._cs:
                raise self._err(f"compressed cluster {vcl} at {off:#x} lies outside the file")
            return _COMP, e
        if e & OFLAG_ZERO and self.header.version >= 3:
            return _ZERO, 0
        if e & OFFSET_MASK:
            return _DATA, self._data_host(e, vcl)
        return _UNALLOC, 0

    def _map(self, off: int, length: int) -> list[list[int]]:
        """[kind, virtual offset, length, host offset or entry] extents covering the range."""
        out: list[list[int]] = []
        pos, end = off, off + length
        cs, cb = self._cs, self._cb
        while pos < end:
            vcl = pos >> cb
            l1i = vcl >> self._l2_bits
            l1e = self._l1[l1i] if l1i < len(self._l1) else 0
            l2off = l1e & OFFSET_MASK
            if not l2off:
                nxt = min(end, (l1i + 1) << (self._l2_bits + cb))
                kind, arg = _UNALLOC, 0
            else:
                t = self._l2_load(l2off)
                kind, arg = self._classify(t[vcl & (self._l2_entries - 1)], vcl)
                nxt = min(end, (vcl + 1) << cb)
                if kind == _DATA:
                    arg += pos & (cs - 1)
            n = nxt - pos
            if out and kind != _COMP:
                last = out[-1]
                if last[0] == kind and (kind != _DATA or last[3] + last[2] == arg):
                    last[2] += n
                    pos = nxt
                    continue
            out.append([kind, pos, n, arg])
            pos = nxt
        return out

    def _read_extent(self, ext: list[int], views: list[memoryview]) -> None:
        kind, voff, n, arg = ext
        if kind == _DATA:
            self._preadv(arg, views)
        elif kind == _ZERO:
            _fill_zero(views)
        elif kind == _UNALLOC:
            b = self.backing
            if b is None or voff >= b.size:
                _fill_zero(views)
                return
            inside = min(n, b.size - voff)
            if inside == n:
                b.read_into(voff, views)
            else:
                bb = _Bufs(views)
                b.read_into(voff, bb.slice(0, inside))
                _fill_zero(bb.slice(inside, n))
        else:
            data = self._decompress(arg)
            s = voff & (self._cs - 1)
            _copy_into(views, memoryview(data)[s:s + n])

    def _decompress(self, e: int) -> bytes:
        off, length = self._compressed_extent(e)
        cached = self._comp_cache
        if cached is not None and cached[0] == e:
            return cached[1]
        length = min(length, self._file_end - off)
        raw = self._pread(off, length, "compressed cluster")
        cs = self._cs
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                if self._zstd is None:
                    try:
                        import zstandard
                    except ImportError:
                        raise self._err("zstd-compressed clusters need the zstandard "
                                        "package") from None
                    self._zstd = zstandard
                d = self._zstd.ZstdDecompressor().decompressobj()
                data = d.decompress(raw)
            else:
                d = zlib.decompressobj(-15)
                data = d.decompress(raw, cs)
        except DiskError:
            raise
        except Exception as exc:
            raise self._err(f"compressed cluster at {off:#x} is corrupt ({exc})") from None
        if len(data) < cs:
            raise self._err(f"compressed cluster at {off:#x} is corrupt (inflates to "
                            f"{len(data)} bytes, not {cs})")
        data = bytes(data[:cs])
        self._comp_cache = (e, data)
        return data

    # ------------------------------------------------------------------ DiskFile API

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> DiskCapabilities:
        return DiskCapabilities(discard=True, write_zeroes=True, resize=True, sparse=True)

    def fds(self) -> list[int]:
        return [self._fd] + (self.backing.fds() if self.backing else [])

    def read_into(self, offset: int, bufs: Sequence[memoryview]) -> int:
        B = _Bufs(bufs)
        self.check_range(offset, B.total)
        with self._lock:
            self._check_open()
            exts = self._map(offset, B.total)
            self._io.enter()
        try:
            for ext in exts:
                rel = ext[1] - offset
                self._read_extent(ext, B.slice(rel, rel + ext[2]))
        finally:
            self._io.leave()
        return B.total

    def _read_locked(self, offset: int, length: int) -> bytearray:
        """Read [offset, offset+length) with the lock held (for copy-on-write fills)."""
        out = bytearray(length)
        mv = memoryview(out)
        inside = max(0, min(length, self._size - offset))
        for ext in self._map(offset, inside):
            rel = ext[1] - offset
            self._read_extent(ext, [mv[rel:rel + ext[2]]])
        return out

    def write_from(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self.read_only:
            raise DiskError(f"qcow2 image {self.path} is read-only")
        B = _Bufs(bufs)
        self.check_range(offset, B.total)
        if not B.total:
            return 0
        with self._lock:
            self._check_open()
            plan = self._plan_inplace(offset, B.total)
            if plan is None:
                self._write_locked(offset, B)
                return B.total
            self._io.enter()
        try:
            for host, rel, n in plan:
                self._pwritev(host, B.slice(rel, rel + n))
        finally:
            self._io.leave()
        return B.total

    def _plan_inplace(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """Host extents when every cluster of the range may be overwritten in place."""
        plan: list[tuple[int, int, int]] = []
        pos, end, cb = offset, offset + length, self._cb
        while pos < end:
            vcl = pos >> cb
            l1i = vcl >> self._l2_bits
            if l1i >= len(self._l1) or not self._l1[l1i] & OFLAG_COPIED:
                return None
            t = self._l2_load(self._l1[l1i] & OFFSET_MASK)
            e = t[vcl & (self._l2_entries - 1)]
            if e & (OFLAG_COMPRESSED | OFLAG_ZERO) or not e & OFLAG_COPIED:
                return None
            host = self._data_host(e, vcl) + (pos & (self._cs - 1))
            nxt = min(end, (vcl + 1) << cb)
            if plan and plan[-1][0] + plan[-1][2] == host:
                h, r, n = plan[-1]
                plan[-1] = (h, r, n + nxt - pos)
            else:
                plan.append((host, pos - offset, nxt - pos))
            pos = nxt
        return plan

    def _writable_in_place(self, e: int) -> bool:
        if e & (OFLAG_COMPRESSED | OFLAG_ZERO) or not e & OFFSET_MASK:
            return False
        return bool(e & OFLAG_COPIED) or self.refcount((e & OFFSET_MASK) >> self._cb) == 1

    def _write_locked(self, offset: int, B: _Bufs) -> None:
        cs, cb = self._cs, self._cb
        pos, end = offset, offset + B.total
        mask = self._l2_entries - 1
        while pos < end:
            l1i = (pos >> cb) >> self._l2_bits
            chunk_end = min(end, (l1i + 1) << (self._l2_bits + cb))
            l2off, t = self._l2_for_write(l1i)
            while pos < chunk_end:
                vcl = pos >> cb
                idx = vcl & mask
                e = t[idx]
                if self._writable_in_place(e):
                    host = self._data_host(e, vcl)
                    if not e & OFLAG_COPIED:
                        t[idx] = e | OFLAG_COPIED
                        self._write_l2_entries(l2off, t, idx, idx + 1)
                    # extend over following in-place clusters with contiguous hosts
                    k = 1
                    while ((vcl + k) << cb) < chunk_end:
                        e2 = t[idx + k]
                        if not (e2 & OFLAG_COPIED and not e2 & (OFLAG_COMPRESSED | OFLAG_ZERO)
                                and e2 & OFFSET_MASK == host + k * cs):
                            break
                        k += 1
                    run_end = min(chunk_end, (vcl + k) << cb)
                    self._pwritev(host + (pos & (cs - 1)),
                                  B.slice(pos - offset, run_end - offset))
                    pos = run_end
                    continue
                # clusters that need a new host cluster
                k = 1
                while ((vcl + k) << cb) < chunk_end and k < 4096 \
                        and not self._writable_in_place(t[idx + k]):
                    k += 1
                run_end = min(chunk_end, (vcl + k) << cb)
                host = self._alloc(k)
                # clusters past the end of the file read as zeroes: zero fills need not
                # be written there, the file is extended (sparsely) instead
                fresh = host >= self._file_end
                cl_start = vcl << cb
                last_end = (vcl + k) << cb
                head = tail = b""
                if pos > cl_start:
                    head = self._read_locked(cl_start, pos - cl_start)
                if run_end < last_end:
                    tail = self._read_locked(run_end, last_end - run_end)
                data = B.slice(pos - offset, run_end - offset)
                start = host
                if head and not (fresh and head == _ZEROS[:len(head)]):
                    data.insert(0, memoryview(head))
                else:
                    start += len(head)
                if tail and not (fresh and tail == _ZEROS[:len(tail)]):
                    data.append(memoryview(tail))
                self._pwritev(start, data)
                if self._file_end < host + k * cs:
                    self._extend_file(host + k * cs)
                self._barrier()     # data before the L2 entries that map it
                old = t[idx:idx + k]
                for j in range(k):
                    t[idx + j] = (host + j * cs) | OFLAG_COPIED
                self._write_l2_entries(l2off, t, idx, idx + k)
                dec = [(c, -1) for e2 in old for c in self._entry_clusters(e2)]
                if dec:
                    self._barrier()     # the L2 entries before freeing what they pointed at
                    self._comp_cache = None
                    self._update_refcounts(dec)
                pos = run_end

    def flush(self) -> None:
        with self._lock:
            self._check_open()
            if not self.read_only:
                self._sync()

    def _check_open(self) -> None:
        if self._closed:
            raise DiskError(f"qcow2 image {self.path} is closed")

    # zeroes and discard ------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._zero_or_discard(offset, length, "zero_unmap" if may_unmap else "zero")

    def discard(self, offset: int, length: int) -> None:
        self._zero_or_discard(offset, length, "discard")

    def _zero_or_discard(self, offset: int, length: int, mode: str) -> None:
        if self.read_only:
            raise DiskError(f"qcow2 image {self.path} is read-only")
        self.check_range(offset, length)
        cs = self._cs
        with self._lock:
            self._check_open()
            end = offset + length
            first = -(-offset // cs)
            last = end // cs
            if end == self._size:       # the partial last cluster of the disk counts
                last = -(-end // cs)
            if first >= last:
                if mode != "discard":
                    self._write_zero_bytes(offset, length)
                return
            if mode != "discard":
                self._write_zero_bytes(offset, min(first * cs, end) - offset)
                self._write_zero_bytes(min(last * cs, end), max(0, end - last * cs))
            self._clusters_to(first, last, mode)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROS))
            self._write_locked(offset, _Bufs([memoryview(_ZEROS)[:n]]))
            offset += n
            length -= n

    def _clusters_to(self, first: int, last: int, mode: str) -> None:
        """Make clusters [first, last) zero (mode zero/zero_unmap) or discarded."""
        v3 = self.header.version >= 3
        has_backing = self.backing is not None and mode != "unmap"
        if not v3 and has_backing and mode not in ("discard", "unmap"):
            # version 2 has no zero flag: zeroes over a backing file must be written
            self._write_zero_bytes(first * self._cs,
                                   min(last * self._cs, self._size) - first * self._cs)
            return
        mask = self._l2_entries - 1
        c = first
        while c < last:
            l1i = c >> self._l2_bits
            chunk_last = min(last, (l1i + 1) << self._l2_bits)
            l1e = self._l1[l1i]
            need_zero_flag = v3 and has_backing
            if not l1e & OFFSET_MASK and not need_zero_flag:
                c = chunk_last
                continue        # nothing allocated, reads as zeroes (or as discarded)
            l2off, t = self._l2_for_write(l1i)
            a, b = c & mask, ((chunk_last - 1) & mask) + 1
            dec = []
            for i in range(a, b):
                e = t[i]
                if mode == "zero" and v3 and self._writable_in_place(e):
                    new = (e & OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO   # keep allocation
                elif need_zero_flag:
                    new = OFLAG_ZERO
                else:
                    new = 0
                if new != e:
                    if new & OFFSET_MASK != e & OFFSET_MASK or e & OFLAG_COMPRESSED:
                        dec += [(x, -1) for x in self._entry_clusters(e)]
                    t[i] = new
            self._write_l2_entries(l2off, t, a, b)
            if dec:
                self._barrier()
                self._comp_cache = None
                self._update_refcounts(dec)
            c = chunk_last

    # resize --------------------------------------------------------------------

    def resize(self, new_size: int, *, hide_backing: bool = True) -> None:
        """Grow or shrink the virtual disk. What a grow adds reads as zeroes, even where
        the backing file is longer (hide_backing=False, used at creation, shows it)."""
        if self.read_only:
            raise DiskError(f"qcow2 image {self.path} is read-only")
        if new_size < 0 or new_size > MAX_VIRTUAL_SIZE:
            raise DiskError(f"qcow2 image {self.path}: size {new_size} is out of range")
        with self._lock:
            self._check_open()
            old = self._size
            if new_size == old:
                return
            cs = self._cs
            if new_size > old:
                need = -(-new_size // (cs * self._l2_entries))
                if need > len(self._l1):
                    self._grow_l1(need)
                self._write_header_field(24, ">Q", new_size)
                self._size = new_size
                self.header.size = new_size
                # what lies past the old end must read as zeroes
                tail_end = min(new_size, -(-old // cs) * cs)
                if old % cs and tail_end > old:
                    self._write_zero_bytes(old, tail_end - old)
                if hide_backing and self.backing is not None and self.backing.size > tail_end:
                    top = min(new_size, self.backing.size)
                    if top > tail_end:
                        self._zero_or_discard(tail_end, top - tail_end, "zero")
            else:
                first = -(-new_size // cs)
                last = -(-old // cs)
                if first < last:
                    self._clusters_to(first, last, "unmap")   # drop everything past the end
                self._write_header_field(24, ">Q", new_size)
                self._size = new_size
                self.header.size = new_size

    def _grow_l1(self, entries: int) -> None:
        cs = self._cs
        if entries * 8 > MAX_L1_BYTES:
            raise DiskError(f"qcow2 image {self.path}: the L1 table would exceed "
                            f"{MAX_L1_BYTES >> 20} MiB (size too large for this cluster size)")
        clusters = -(-entries * 8 // cs)
        new_off = self._alloc(clusters)
        table = array("Q", self._l1)
        table.frombytes(bytes((entries - len(self._l1)) * 8))
        self._pwrite(new_off, to_be(table)
                     + bytes(clusters * cs - entries * 8))
        self._sync()
        self._write_header_field(36, ">IQ", entries, new_off)
        self._sync()
        old_off, old_n = self.header.l1_table_offset, self.header.l1_size
        self.header.l1_size, self.header.l1_table_offset = entries, new_off
        self._l1 = table
        self._meta.update(range(new_off >> self._cb, (new_off >> self._cb) + clusters))
        self._fixed.update((c, "L1 table") for c in range(new_off >> self._cb,
                                                           (new_off >> self._cb) + clusters))
        if old_n:
            oc = old_off >> self._cb
            n = -(-old_n * 8 // cs)
            self._meta.difference_update(range(oc, oc + n))
            for c in range(oc, oc + n):
                self._fixed.pop(c, None)
            self._update_refcounts([(c, -1) for c in range(oc, oc + n)])

    # info / check / close ------------------------------------------------------

    def check(self):
        """A CheckResult: corruptions and leaks, as `qemu-img check` counts them."""
        from vmm_qcow2.check import check_image

        return check_image(self)

    def repair_leaks(self) -> int:
        """Free leaked clusters (refuses when the image is corrupt); returns how many."""
        if self.read_only:
            raise DiskError(f"qcow2 image {self.path} is read-only")
        from vmm_qcow2.check import leak_repair

        return leak_repair(self)

    def info(self) -> dict[str, object]:
        h = self.header
        d: dict[str, object] = super().info()
        d.update({
            "cluster_size": self._cs,
            "version": h.version,
            "compat": "1.1" if h.version >= 3 else "0.10",
            "refcount_bits": self._rc_bits,
            "compression_type": COMPRESSION_NAMES.get(h.compression_type, "?"),
            "lazy_refcounts": bool(h.compatible & COMPAT_LAZY_REFCOUNTS),
            "dirty": bool(h.incompatible & INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible & INCOMPAT_CORRUPT),
            "backing_file": h.backing_file,
            "backing_format": h.backing_format,
            "file_size": self._file_end,
            "snapshots": [s.to_json() for s in self.snapshots],
        })
        if self.backing is not None:
            d["backing"] = self.backing.info()
        return d

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not self.read_only and self._fd >= 0:
                    self._sync()
            finally:
                self._release()

    def _release(self) -> None:
        self._closed = True
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self.backing is not None:
            b, self.backing = self.backing, None
            b.close()


class _ChainState(threading.local):
    """Per-thread record of the images being opened, to detect backing loops by path."""

    def __init__(self) -> None:
        self.stack: list[frozenset[str]] = []

    def current(self) -> frozenset[str]:
        return self.stack[-1] if self.stack else frozenset()

    def push(self, s: frozenset[str]) -> int:
        self.stack.append(s)
        return len(self.stack)

    def pop(self, token: int) -> None:
        del self.stack[token - 1:]


_CHAIN = _ChainState()


class Qcow2Format(DiskFormat):
    """The qcow2 DiskFormat (PluginSpec.factory)."""

    name = "qcow2"

    def open(self, path: Path, *, read_only: bool, opener: DiskOpener) -> Qcow2File:
        barriers = os.environ.get("VMM_QCOW2_BARRIERS", "") not in ("", "0")
        return Qcow2File(Path(path), read_only, opener, barriers=barriers,
                         _opening=_CHAIN.current())

    def create(self, path: Path, size: int | None = None, **options: object) -> None:
        from vmm_qcow2.create import create_image

        create_image(Path(path), size, **options)


__all__ = ["Qcow2File", "Qcow2Format", "be_table", "to_be"]
