"""Benchmark: a bus access round trip through ProxyDevice against the same access in-process.

    python -m benchmarks.proxy [N]

Prints the time per access for a BAR read (request and reply), a posted BAR write
(one-way), a synchronous write (an MSI-X table write, which waits for its reply) and a
configuration read, in-process and through a jailed, seccomp-filtered device process,
and the ratios. Numbers, not assertions (see DESIGN.md, Performance).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vmmcore.memory import GuestMemory
from vmmcore.pci.config_space import BarKind, PciConfiguration
from vmmcore.pci.device import ConfiguredPciDevice
from vmmcore.pci.msix import MsixConfig
from vmmcore.sandbox.jail import JailConfig
from vmmcore.sandbox.policy import CORE_POLICY_DIR, compile_policy
from vmmcore.sandbox.proxy import ProxyDevice


class _Dev(ConfiguredPciDevice):
    def __init__(self, mem: GuestMemory) -> None:
        cfg = PciConfiguration(vendor_id=0x1234, device_id=1, class_code=0xFF, subclass=0)
        super().__init__(cfg, "bench")
        cfg.add_bar(0, 0x8000, BarKind.MEM64)
        self.msix = MsixConfig(4, table_bar=0, table_offset=0x4000, pba_bar=0,
                               pba_offset=0x6000, label="bench")
        self.msix.add_capability(cfg)
        self.reg = b"\0\0\0\0"

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        return self.reg[:size]

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        self.reg = bytes(data)


def _time(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    n = int((argv or sys.argv[1:] or ["20000"])[0])
    mem = GuestMemory([(0, 1 << 20)])
    local = _Dev(mem)
    policy = compile_policy([Path(CORE_POLICY_DIR) / "common_device.policy"])
    proxy = ProxyDevice(_Dev, mem, label="bench", jail=JailConfig(seccomp=policy))
    try:
        cases = [
            ("BAR read (4 bytes)", lambda d: d.read_bar(0, 0, 4)),
            ("BAR write, posted", lambda d: d.write_bar(0, 0, b"\1\2\3\4")),
            ("MSI-X table write (sync)", lambda d: d.write_bar(0, 0x4000, b"\0\0\xe0\xfe")),
            ("config read", lambda d: d.config_register_read(0)),
        ]
        print(f"{'access':28} {'in-process':>12} {'sandboxed':>12} {'ratio':>8}")
        for name, fn in cases:
            a = _time(lambda fn=fn: fn(local), n)
            b = _time(lambda fn=fn: fn(proxy), n)
            proxy.read_bar(0, 0, 4)          # drain posted writes before the next case
            print(f"{name:28} {a * 1e6:10.2f}us {b * 1e6:10.2f}us {b / a:7.1f}x")
    finally:
        proxy.destroy()
        mem.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
