"""KvmStats: the kernel's own counters for a VM or a vCPU (KVM_GET_STATS_FD, Linux 5.14+).

KVM keeps statistics per VM and per vCPU: exits by kind, halts and how many of them
halt polling satisfied, interrupt injections, TLB flushes, pages mapped. The binary stats
interface (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD") hands each one out as a
file: a header, one descriptor per statistic (name, type, unit, size), and a block of
u64 values that reads always return fresh. QEMU exposes the same through `query-stats`;
`vmm kvm_stats` does through the control socket.

They are what shows whether a guest's waits are served the way a benchmark assumes:
halt_attempted_poll / halt_successful_poll say how often KVM polled for a halted vCPU's
interrupt before putting its thread to sleep (benchmarks/halt_poll.py models that).
The descriptors are read once; the file is trusted (the kernel writes it) but every
offset and size is still checked against what was read, so a short read fails cleanly.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmmcore.errors import KvmError
from vmmcore.kvm.sys import ioctl_val

#: _IO(KVMIO, 0xce): an ioctl without an argument, so its number is fixed by the ABI and
#: needs no header (older <linux/kvm.h> lack it; the binding builds without it).
KVM_GET_STATS_FD = 0xAECE

_HEADER = struct.Struct("<6I")          # flags, name_size, num_desc, id/desc/data offsets
_DESC = struct.Struct("<IhHII")         # flags, exponent, size, offset, bucket_size
_MAX_NAME = 4096
_MAX_DESCS = 65536

_TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
_UNITS = {0: "", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
_SECONDS = {0: "s", -3: "ms", -6: "us", -9: "ns"}


@dataclass(frozen=True)
class StatDesc:
    """One statistic: where its values are and what they count."""

    name: str
    type: str            # cumulative, instant, peak, linear_hist, log_hist
    unit: str            # "", bytes, seconds, cycles, boolean
    base: int            # 10 or 2: the value is value * base**exponent units
    exponent: int
    size: int            # number of u64 values (1, or the buckets of a histogram)
    offset: int          # into the data block
    bucket_size: int     # linear histograms only

    @property
    def unit_label(self) -> str:
        """A short, exact label: "ns", "bytes*2^12", "cycles", or "" for plain counts."""
        if self.unit == "seconds" and self.base == 10 and self.exponent in _SECONDS:
            return _SECONDS[self.exponent]
        if not self.exponent:
            return self.unit
        scale = f"{self.base}^{self.exponent}"
        return f"{self.unit}*{scale}" if self.unit else f"*{scale}"


class KvmStats:
    """The statistics file of one VM or vCPU fd; read() returns every value."""

    def __init__(self, owner_fd: int, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._fd = ioctl_val(owner_fd, KVM_GET_STATS_FD, 0, f"KVM_GET_STATS_FD ({what})")
        try:
            self.id, self.descs, self._data = self._read_layout()
        except BaseException:
            os.close(self._fd)
            raise

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise KvmError(f"{self.what}: KVM's statistics file is shorter than its header "
                           f"says ({len(data)} of {n} bytes at {offset})")
        return data

    def _read_layout(self) -> tuple[str, list[StatDesc], tuple[int, int]]:
        _, name_size, num, id_off, desc_off, data_off = _HEADER.unpack(
            self._pread(_HEADER.size, 0))
        if not 0 < name_size <= _MAX_NAME or num > _MAX_DESCS:
            raise KvmError(f"{self.what}: KVM's statistics header is not usable "
                           f"(name size {name_size}, {num} descriptors)")
        ident = self._pread(name_size, id_off).split(b"\0", 1)[0].decode(errors="replace")
        step = _DESC.size + name_size
        raw = self._pread(step * num, desc_off)
        descs, words = [], 0
        for i in range(num):
            flags, exponent, size, offset, bucket = _DESC.unpack_from(raw, i * step)
            name = raw[i * step + _DESC.size:(i + 1) * step].split(b"\0", 1)[0].decode(
                errors="replace")
            if offset % 8:
                raise KvmError(f"{self.what}: statistic {name} is not 8-byte aligned")
            descs.append(StatDesc(
                name=name, type=_TYPES.get(flags & 0xF, f"type{flags & 0xF}"),
                unit=_UNITS.get((flags >> 4) & 0xF, f"unit{(flags >> 4) & 0xF}"),
                base=2 if (flags >> 8) & 0xF == 1 else 10, exponent=exponent, size=size,
                offset=offset, bucket_size=bucket))
            words = max(words, offset // 8 + size)
        return ident, descs, (data_off, words)

    def read(self) -> dict[str, int | list[int]]:
        """Every statistic's current value: an int, or a list for a histogram."""
        data_off, words = self._data
        with self._lock:
            if self._fd < 0:
                raise KvmError(f"{self.what}: the statistics are closed (the VM is gone)")
            raw = self._pread(8 * words, data_off)
        values = struct.unpack(f"<{words}Q", raw)
        out: dict[str, int | list[int]] = {}
        for d in self.descs:
            first = d.offset // 8
            out[d.name] = values[first] if d.size == 1 and not d.type.endswith("hist") \
                else list(values[first:first + d.size])
        return out

    def units(self) -> dict[str, str]:
        """name -> unit label, for the statistics that have one."""
        return {d.name: d.unit_label for d in self.descs if d.unit_label}

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class StatsSlot:
    """A Vm's or Vcpu's KvmStats, opened when its owner is created and closed with it.

    Not later: KVM_GET_STATS_FD on a vCPU runs under the vCPU's mutex, which KVM_RUN holds
    for as long as the guest runs, so a control thread opening it while the guest sits in
    HLT would wait for the vCPU's next exit to userspace (for a halted guest, forever).
    A kernel without binary statistics (before 5.14) leaves the slot empty: the VM runs,
    and asking for its statistics says why there are none."""

    def __init__(self, opener: Callable[[], KvmStats]) -> None:
        self._lock = threading.Lock()
        self._stats: KvmStats | None = None
        self._why = ""
        try:
            self._stats = opener()
        except (KvmError, OSError) as e:
            self._why = f"KVM statistics are not available: {e}"

    def get(self) -> KvmStats:
        with self._lock:
            if self._stats is None:
                raise KvmError(self._why or "KVM statistics: the VM is gone")
            return self._stats

    def close(self) -> None:
        with self._lock:
            if self._stats is not None:
                self._stats.close()
                self._stats = None
            self._why = ""


def snapshot(vm, vcpus, prefixes: tuple[str, ...] = ()) -> dict:
    """The VM's and each vCPU's statistics as one JSON-able dict (what `vmm kvm_stats`
    prints), keeping only names that start with one of `prefixes` when any are given."""
    def pick(stats: KvmStats) -> dict:
        values = stats.read()
        return {k: v for k, v in values.items() if not prefixes or k.startswith(prefixes)}

    vm_stats = vm.stats()
    out = {"vm": {"id": vm_stats.id, "stats": pick(vm_stats)}, "vcpus": [], "units": {}}
    units = dict(vm_stats.units())
    for vcpu in vcpus:
        s = vcpu.stats()
        out["vcpus"].append({"id": vcpu.id, "stats": pick(s)})
        units.update(s.units())
    shown = set(out["vm"]["stats"]).union(*(v["stats"] for v in out["vcpus"]))
    out["units"] = {k: u for k, u in sorted(units.items()) if k in shown}
    return out
