"""Boot-to-init benchmark: `vmm run` against QEMU (-accel kvm) on the same stock kernel.

Both boot Debian's stock kernel (bzImage) with the e2e level-2 initramfs, whose /init prints
``E2E: init=...`` and then powers off; the benchmark measures, per run, wall time from launch
to that line on the guest console ("to init") and to the VMM's exit ("to exit"), and prints
the medians and the ratio vmm/QEMU. Both run side by side in one environment: directly where
/dev/kvm runs a stock kernel, else inside one level-1 host (tests/e2e/harness.py), where
the QEMU is Debian's qemu-system-x86 with `-accel kvm` on level 1's kvm-amd.

    python3 benchmarks/boot.py [--runs 3] [--cpus 1] [--mem 256] [--json]

While `vmm run` cannot boot Linux (harness.vmm_linux_boot_missing), only QEMU is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import harness  # noqa: E402

INIT_MARKER = b"E2E: init="


def qemu_argv(kernel: str, initrd: str, cpus: int, mem: int) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", str(mem),
            "-smp", str(cpus), "-nographic", "-nodefaults", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", harness.LEVEL2_APPEND]


def measure(argv: list[str], timeout: float) -> dict:
    """Launch argv; time to the init marker on its output and to its exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=REPO)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf, t_init = b"", None
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            break
        if not sel.select(timeout=min(left, 1.0)):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        if t_init is None and INIT_MARKER in buf:
            t_init = time.monotonic() - t0
    status = proc.wait()
    t_exit = time.monotonic() - t0
    tail = buf.decode("utf-8", "replace")[-1500:]
    return {"status": status, "to_init": t_init, "to_exit": t_exit,
            "tail": tail if t_init is None or status != 0 else ""}


def inner(args: argparse.Namespace) -> dict:
    """Run the measurements here (the level-1 host, or this host when it runs them directly)."""
    results: dict[str, list[dict]] = {"qemu": [], "vmm": []}
    for i in range(args.runs):
        results["qemu"].append(measure(qemu_argv(args.kernel, args.initrd, args.cpus, args.mem),
                                       args.timeout))
        if args.with_vmm:
            argv = harness.vmm_run_argv(Path(args.kernel), Path(args.initrd), cpus=args.cpus,
                                        mem_mib=args.mem)
            results["vmm"].append(measure(argv, args.timeout))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)
    return results


def summarize(results: dict, nested: bool, why_no_vmm: str | None) -> str:
    lines = [f"boot to init, stock kernel, {'nested in level-1 QEMU TCG' if nested else 'direct'}"]
    med: dict[str, dict[str, float | None]] = {}
    for name, runs in results.items():
        if not runs:
            continue
        ok = [r for r in runs if r["status"] == 0 and r["to_init"] is not None]
        m = {k: (statistics.median(r[k] for r in ok) if ok else None)
             for k in ("to_init", "to_exit")}
        med[name] = m
        fmt = lambda v: "   n/a" if v is None else f"{v:6.2f}"  # noqa: E731
        lines.append(f"  {name:5} to init {fmt(m['to_init'])} s   to exit {fmt(m['to_exit'])} s"
                     f"   ({len(ok)}/{len(runs)} runs ok)")
        for r in runs:
            if r.get("tail"):
                lines.append(f"    failed run (status {r['status']}), output tail:\n{r['tail']}")
    if why_no_vmm:
        lines.append(f"  vmm   not measured: vmm cannot boot Linux yet ({why_no_vmm})")
    elif med.get("vmm", {}).get("to_init") and med.get("qemu", {}).get("to_init"):
        lines.append(f"  ratio vmm/QEMU to init: {med['vmm']['to_init'] / med['qemu']['to_init']:.2f}"
                     f"   to exit: {med['vmm']['to_exit'] / med['qemu']['to_exit']:.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=120.0, help="per boot, seconds")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--with-vmm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kernel", help=argparse.SUPPRESS)
    ap.add_argument("--initrd", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.inner:
        print("BENCH-JSON " + json.dumps(inner(args)), flush=True)
        return 0

    kernel, initrd = harness.level2_images()
    why = harness.vmm_linux_boot_missing()
    args.kernel, args.initrd, args.with_vmm = str(kernel), str(initrd), why is None
    inner_argv = [sys.executable, str(Path(__file__).resolve()), "--inner",
                  "--runs", str(args.runs), "--cpus", str(args.cpus), "--mem", str(args.mem),
                  "--timeout", str(args.timeout), "--kernel", args.kernel,
                  "--initrd", args.initrd] + (["--with-vmm"] if args.with_vmm else [])
    nested = not harness.has_direct_kvm()
    if nested:
        budget = args.runs * args.timeout * (2 if args.with_vmm else 1) + 120
        l1 = harness.run_level1(inner_argv, timeout=budget)
        out, ok = l1.output, l1.status == 0
        print(f"level-1 host: {l1.elapsed:.1f} s in all", file=sys.stderr)
    else:
        r = subprocess.run(inner_argv, capture_output=True, text=True, cwd=REPO)
        out, ok = r.stdout + r.stderr, r.returncode == 0
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH-JSON ")), None)
    if not ok or line is None:
        print(f"benchmark failed:\n{out[-4000:]}", file=sys.stderr)
        return 1
    results = json.loads(line.removeprefix("BENCH-JSON "))
    print(summarize(results, nested, why))
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
