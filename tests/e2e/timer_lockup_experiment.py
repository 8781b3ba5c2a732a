"""Experiment: is the nested level-2 timer lockup (harness.LOCKUP_SIGNATURES) our VMM's fault?

The findings are in README.md, "Level-2 timer lockups". Boots ``--boots`` level-1 hosts
(harness.run_level1) in turn and, inside each, boots the same level-2 kernel
and initramfs N times with each of: (a) `vmm run` (harness.vmm_run_argv) and (b) a control,
Debian's `qemu-system-x86_64 -accel kvm -cpu host` on level 1's kvm-amd, alternating a, b,
a, b, ... so host load hits both alike. Optionally this host is loaded with busy loops
(``--load K``: K processes spinning, the "stress" of the task) for the whole experiment.
Each boot gets a hard timeout (timed_run.py); a run counts as a lockup when its console
shows a lockup signature, as a timeout when it did not finish, and as ok when it reached
/init and exited 0. Level 1's dmesg is kept (its TSC calibration and kvm.ko load times
tell a bad level-1 host), and again after a failed run.

    python3 tests/e2e/timer_lockup_experiment.py --boots 8 --runs 1 --load 2 --cpus 1 \
        --scenario gpu,input --vmm-arg=--gpu --vmm-arg=width=800,height=600,display=headless \
        --qemu-arg=-device --qemu-arg=virtio-gpu-pci [--diag] [--json FILE]

Prints one line per boot and a summary; ``--json FILE`` keeps the raw results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

# An extra level-2 scenario (--diag): how the guest keeps time, and how often its timer
# softirq and its local timer interrupt have run so far.
DIAG = r"""say() { echo "E2E: $*"; }
say "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
say "clockevent=$(cat /sys/devices/system/clockevents/clockevent0/current_device 2>/dev/null)"
say "timer-softirq=$(grep ' TIMER:' /proc/softirqs | tr -s ' ' | cut -d' ' -f3- | tr ' ' /)"
say "loc-irqs=$(grep 'LOC:' /proc/interrupts | tr -s ' ' | cut -d' ' -f3- | cut -d' ' -f1-2 | tr ' ' /)"
say "uptime=$(cut -d' ' -f1 /proc/uptime)"
dmesg | grep -i -E 'clocksource|tsc|kvm-clock|apic timer|tsc-deadline|clockevent' | head -20
"""


def boot(argv: list[str], timeout: float) -> dict:
    """One level-2 boot on this host's /dev/kvm (inside level 1), through timed_run.py."""
    res = harness._run_vmm_once(argv, timeout, None, ())
    out = res.output
    sigs = [s for s in harness.LOCKUP_SIGNATURES if s in out]
    verdict = ("lockup" if sigs else "timeout" if res.status is None
               else "ok" if res.status == 0 and res.to_init is not None else "fail")
    return {"status": res.status, "to_init": res.to_init, "elapsed": res.elapsed,
            "verdict": verdict, "signatures": sigs,
            "tail": "" if verdict == "ok" else out[-3000:], "markers": res.markers,
            "dmesg": [ln for ln in out.splitlines() if ln.startswith("[")][:30]}


def qemu_argv(kernel: str, initrd: str, cpus: int, mem: int, append: str) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", str(mem),
            "-smp", str(cpus), "-nographic", "-nodefaults", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", append]


def _level1_state() -> list[str]:
    """Level 1's kernel log and clock: its clocksource, then `dmesg` (the last 300 lines)."""
    cs = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    return [f"clocksource={cs.read_text().strip() if cs.exists() else '?'}", *log[-300:]]


def inner(a: argparse.Namespace) -> None:
    os.environ["VMM_E2E_DIRECT"] = "1"           # level 1's /dev/kvm: boot here
    scen = a.scenario + (",diag" if a.diag else "")
    append = harness.LEVEL2_APPEND + f" e2e_scenario={scen}" + (f" {a.extra_append}" if a.extra_append else "")
    for k, v in (kv.split("=", 1) for kv in a.vmm_env):
        os.environ[k] = v
    kinds = [k for k in a.kinds.split(",") if k]
    print("EXP-L1 " + json.dumps(_level1_state()), flush=True)
    for i in range(a.runs):
        for kind in kinds:
            if kind == "vmm":
                argv = harness.vmm_run_argv(Path(a.kernel), Path(a.initrd), cpus=a.cpus,
                                            mem_mib=a.mem, scenario=scen, extra=a.vmm_arg,
                                            append=harness.LEVEL2_APPEND + (f" {a.extra_append}" if a.extra_append else ""))
            else:
                argv = qemu_argv(a.kernel, a.initrd, a.cpus, a.mem, append) + a.qemu_arg
            r = boot(argv, a.timeout)
            r.update(kind=kind, run=i)
            if r["verdict"] != "ok":
                r["level1_after"] = _level1_state()[-40:]
            print("EXP-JSON " + json.dumps(r), flush=True)


def spin() -> None:
    while True:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="boots of each kind per level 1")
    ap.add_argument("--boots", type=int, default=1, help="level-1 hosts booted in turn")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=60.0, help="per boot, seconds")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes on this host")
    ap.add_argument("--kinds", default="vmm,qemu")
    ap.add_argument("--extra-append", default="")
    ap.add_argument("--vmm-env", action="append", default=[], help="K=V for the vmm runs")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--scenario", default="cpus", help="level-2 scenario(s), e.g. gpu,input")
    ap.add_argument("--vmm-arg", action="append", default=[], help="an extra `vmm run` argument")
    ap.add_argument("--qemu-arg", action="append", default=[], help="an extra QEMU argument")
    ap.add_argument("--diag", action="store_true", help="also run the DIAG scenario")
    ap.add_argument("--show", action="store_true", help="print each run's E2E markers")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kernel", help=argparse.SUPPRESS)
    ap.add_argument("--initrd", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        inner(a)
        return 0

    kernel, initrd = harness.level2_images({"diag": DIAG})
    argv = [sys.executable, str(Path(__file__).resolve()), "--inner", "--runs", str(a.runs),
            "--cpus", str(a.cpus), "--mem", str(a.mem), "--timeout", str(a.timeout),
            "--kinds", a.kinds, "--kernel", str(kernel), "--initrd", str(initrd),
            "--extra-append", a.extra_append, *(["--diag"] if a.diag else []),
            "--scenario", a.scenario, *sum((["--vmm-arg=" + x] for x in a.vmm_arg), []),
            *sum((["--qemu-arg=" + x] for x in a.qemu_arg), []), *sum((["--vmm-env", e] for e in a.vmm_env), [])]
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(a.load)]
    for p in spinners:
        p.start()
    results, l1_dmesg, l1_status = [], [], []
    try:
        budget = a.runs * len(a.kinds.split(",")) * (a.timeout + 5) + 120
        for boot_no in range(a.boots):
            l1 = harness.run_level1(argv, timeout=budget, echo=False)
            l1_status.append(l1.status)
            for ln in l1.output.splitlines():
                if ln.startswith("EXP-JSON "):
                    results.append({**json.loads(ln[len("EXP-JSON "):]), "boot": boot_no})
                elif ln.startswith("EXP-L1 "):
                    l1_dmesg.append(json.loads(ln[len("EXP-L1 "):]))
            if l1.status != 0:
                print(l1.describe()[-3000:])
    finally:
        for p in spinners:
            p.kill()
            p.join()
    for r in results:
        print(f"{r['kind']:4} L1#{r['boot']:<2} #{r['run']:<2} {r['verdict']:7} to_init={r['to_init']} "
              f"elapsed={r['elapsed']:.1f} {','.join(r['signatures'])}")
        if a.show:
            print("     ", {k: v for k, v in r["markers"].items() if k not in ("kernel",)})
    print(f"level 1: {a.boots} boots, statuses={l1_status} load={a.load} cpus={a.cpus}")
    for kind in a.kinds.split(","):
        rs = [r for r in results if r["kind"] == kind]
        counts = {v: sum(r["verdict"] == v for r in rs) for v in ("ok", "lockup", "timeout", "fail")}
        print(f"  {kind:4} {len(rs)} runs: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "level1_status": l1_status,
                                            "level1_dmesg": l1_dmesg, "results": results},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
