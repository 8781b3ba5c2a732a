"""Consistency check of a qcow2 image (what `vmm disk check` prints) and refcount repair.

The check counts every reference the metadata makes to a host cluster (header, L1
tables of the active image and of each snapshot, L2 tables, data and compressed
clusters, the refcount table and blocks, the snapshot table) and compares the counts
with the stored refcounts, as `qemu-img check` does:

* stored < referenced: corruption (a cluster may be reused while in use);
* stored > referenced: a leak (space lost, harmless);
* a reference past the end of the file or misaligned, or an OFLAG_COPIED flag that
  disagrees with the refcount: corruption.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmm_qcow2.image import be_table  # noqa: E402
from vmm_qcow2.layout import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK
from vmmcore.disk import DiskError

if TYPE_CHECKING:
    from vmm_qcow2.image import Qcow2File


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    errors: list[str] = field(default_factory=list)
    leaked_clusters: list[int] = field(default_factory=list)
    allocated_clusters: int = 0
    total_clusters: int = 0

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks

    def to_json(self) -> dict[str, object]:
        return {"corruptions": self.corruptions, "leaks": self.leaks,
                "errors": self.errors[:100], "allocated_clusters": self.allocated_clusters,
                "total_clusters": self.total_clusters}


def _references(img: Qcow2File) -> tuple[dict[int, int], list[str]]:
    refs: dict[int, int] = defaultdict(int)
    errors: list[str] = []
    cs, cb = img._cs, img._cb
    end_of_file = img._file_end

    def add(off: int, length: int, what: str) -> bool:
        if length <= 0:
            return True
        if off + length > end_of_file + cs or off < 0:
            errors.append(f"{what} at {off:#x} lies past the end of the file")
            return False
        for c in range(off >> cb, ((off + length - 1) >> cb) + 1):
            refs[c] += 1
        return True

    h = img.header
    add(0, cs, "header")
    if h.l1_size:
        add(h.l1_table_offset, h.l1_size * 8, "L1 table")
    add(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    for i, e in enumerate(img._reftable):
        off = e & REFT_OFFSET_MASK
        if off:
            if off & (cs - 1):
                errors.append(f"refcount block {i} offset {off:#x} is not cluster aligned")
                continue
            add(off, cs, f"refcount block {i}")
    if h.nb_snapshots:
        add(h.snapshots_offset, img._snap_table_len, "snapshot table")

    l1s: list[tuple[str, list[int]]] = [("active", img._l1)]
    for s in img.snapshots:
        if not s.l1_size:
            continue
        if add(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.id} L1 table"):
            raw = img._pread(s.l1_table_offset, s.l1_size * 8, "snapshot L1 table")
            l1s.append((f"snapshot {s.id}", be_table(raw)))

    for name, l1 in l1s:
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            what = f"{name} L1 entry {i}: L2 table"
            if off & (cs - 1):
                errors.append(f"{what} at {off:#x} is not cluster aligned")
                continue
            if not add(off, cs, what):
                continue
            try:
                table = img._l2_load(off) if name == "active" else be_table(
                    img._pread(off, cs, "L2 table"))
            except DiskError as exc:
                errors.append(str(exc))
                continue
            for j, e2 in enumerate(table):
                if e2 & OFLAG_COMPRESSED:
                    coff, clen = img._compressed_extent(e2)
                    add(coff, clen, f"{name} compressed cluster {i}/{j}")
                    continue
                host = e2 & OFFSET_MASK
                if not host:
                    continue
                if host & (cs - 1):
                    errors.append(f"{name} L2 entry {i}/{j}: offset {host:#x} is not "
                                  "cluster aligned")
                    continue
                add(host, cs, f"{name} data cluster {i}/{j}")
    return refs, errors


def _copied_errors(img: Qcow2File) -> list[str]:
    errors = []
    cb = img._cb
    for _i, e in enumerate(img._l1):
        off = e & OFFSET_MASK
        if not off:
            continue
        rc = img.refcount(off >> cb)
        if bool(e & OFLAG_COPIED) != (rc == 1):
            errors.append(f"OFLAG_COPIED L2 table {off:#x}: refcount {rc}")
        try:
            table = img._l2_load(off)
        except DiskError:
            continue
        for e2 in table:
            host = e2 & OFFSET_MASK
            if e2 & OFLAG_COMPRESSED or not host:
                continue
            rc = img.refcount(host >> cb)
            if bool(e2 & OFLAG_COPIED) != (rc == 1):
                errors.append(f"OFLAG_COPIED data cluster {host:#x}: refcount {rc}")
    return errors


def _stored_nonzero(img: Qcow2File) -> dict[int, int]:
    out = {}
    per = img._rc_per_block
    for bi, e in enumerate(img._reftable):
        off = e & REFT_OFFSET_MASK
        if not off:
            continue
        blk = img._rb_load(off)
        if not any(blk):
            continue
        for idx in range(per):
            v = img._rb_get(blk, idx)
            if v:
                out[bi * per + idx] = v
    return out


def check_image(img: Qcow2File) -> CheckResult:
    """Compare references with refcounts; never modifies the image."""
    with img._lock:
        res = CheckResult()
        try:
            refs, errors = _references(img)
            stored = _stored_nonzero(img)
        except DiskError as exc:
            res.corruptions += 1
            res.errors.append(str(exc))
            return res
        res.errors += errors
        res.corruptions += len(errors)
        for c in sorted(set(refs) | set(stored)):
            r, s = refs.get(c, 0), stored.get(c, 0)
            if s < r:
                res.corruptions += 1
                res.errors.append(f"cluster {c:#x}: refcount {s} but {r} reference(s)")
            elif s > r:
                res.leaks += 1
                res.leaked_clusters.append(c)
        copied = _copied_errors(img)
        res.corruptions += len(copied)
        res.errors += copied
        res.allocated_clusters = len(refs)
        res.total_clusters = -(-img.size // img._cs)
        return res


def repair_refcounts(img: Qcow2File) -> None:
    """Set every refcount to the number of references (after a crash with lazy refcounts).

    New refcount blocks that the repair needs are counted by the next round.
    """
    with img._lock:
        for _round in range(8):
            refs, errors = _references(img)
            if errors:
                raise DiskError(f"qcow2 image {img.path}: cannot repair refcounts: "
                                + "; ".join(errors[:3]))
            stored = _stored_nonzero(img)
            diffs = [(c, refs.get(c, 0) - stored.get(c, 0))
                     for c in sorted(set(refs) | set(stored))
                     if refs.get(c, 0) != stored.get(c, 0)]
            if not diffs:
                return
            img._pinned = set(refs)
            try:
                # raise first, then lower: never a moment with a referenced cluster free
                img._update_refcounts([d for d in diffs if d[1] > 0])
                img._update_refcounts([d for d in diffs if d[1] < 0])
            finally:
                img._pinned = set()
        raise DiskError(f"qcow2 image {img.path}: refcount repair does not converge")


def leak_repair(img: Qcow2File) -> int:
    """Free leaked clusters; returns how many."""
    res = check_image(img)
    if res.corruptions:
        raise DiskError(f"qcow2 image {img.path}: corrupt, not repairing leaks")
    repair_refcounts(img)
    return res.leaks
