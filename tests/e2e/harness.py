"""End-to-end harness: run commands on a LEVEL-1 host, and `vmm run` against a stock kernel.

Where /dev/kvm can run a stock Linux kernel (real hardware virtualization), `vmm run` runs
directly on this host. Where it cannot (kvm-pvm, see DESIGN.md "What /dev/kvm is on these
machines"), the harness boots a LEVEL-1 host in QEMU TCG with an AMD CPU that has SVM, whose
kvm-amd gives a real /dev/kvm, and runs `vmm run` inside it.

The level-1 protocol (the /init is in images.py):

* 9p tag ``hostroot`` = this host's ``/``, read-only; the level-1 /init chroots into it, so
  the same Python, venv and checkout are there under the same paths. Its /tmp and /run are
  fresh tmpfs; host paths under /tmp or /run that a command needs are listed in the work
  directory's ``binds`` file and bind-mounted back from the host root (read-only).
* 9p tag ``e2ework`` = a per-run work directory, read-write, mounted at ``/run/e2e``:
  the harness writes ``run.sh`` there; /init runs it in the chroot with stdout and stderr
  going to ``output``, writes its exit status to ``status``, and powers the machine off.
  The console (kernel messages and ``E2E:`` marker lines) is QEMU's stdout -> ``console``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import images

REPO = Path(__file__).resolve().parents[2]

LEVEL1_APPEND = "console=ttyS0 quiet mitigations=off panic=-1"
# Kernel command line of the LEVEL-2 guest that `vmm run` boots (quiet: every console byte
# is a port-IO exit to the VMM, ~165 us each at level 1). `noxsave` per DESIGN.md: level 1's
# reported XSAVE sizes disagree with the guest's.
LEVEL2_APPEND = "console=ttyS0 quiet mitigations=off panic=-1 noxsave"

DEFAULT_LEVEL1_TIMEOUT = float(os.environ.get("VMM_E2E_TIMEOUT", "180"))


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "no", "false", "off")


# --------------------------------------------------------------------------- probes


def has_direct_kvm() -> bool:
    """Can this host's /dev/kvm run a stock Linux kernel directly?

    ``VMM_E2E_DIRECT=1`` (or ``0``) decides. Otherwise the probe says yes only when
    /dev/kvm opens read-write, no ``kvm_pvm`` module is loaded (kvm-pvm runs guest ring 0
    in an emulator that cannot run a stock kernel), and a hardware backend, ``kvm_intel``
    or ``kvm_amd``, is loaded (``/sys/module/<name>``), with ``vmx`` or ``svm`` in
    /proc/cpuinfo. When unsure it answers no: the nested path works everywhere, only slower.
    """
    forced = _env_flag("VMM_E2E_DIRECT")
    if forced is not None:
        return forced
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError:
        return False
    sysmod = Path("/sys/module")
    if (sysmod / "kvm_pvm").exists():
        return False
    if not ((sysmod / "kvm_intel").exists() or (sysmod / "kvm_amd").exists()):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M))


def missing_tools() -> list[str]:
    """Host tools the nested path needs that are not installed (scripts/e2e-setup)."""
    need = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
            "apt-get": "apt", "dpkg-deb": "dpkg"}
    missing = [pkg for tool, pkg in need.items() if shutil.which(tool) is None]
    if not images.BUSYBOX.exists():
        missing.append("busybox-static")
    return missing


# Options `vmm run` needs for the stock-kernel scenarios.
VMM_RUN_NEEDED_OPTIONS = ("--initrd", "--params", "--cpus", "--mem")


def vmm_linux_boot_missing() -> str | None:
    """Why `vmm run` cannot boot a stock Linux kernel yet, or None when it should.

    The probe (each step in a subprocess, so pytest's own imports stay clean):
      1. ``python3 -m vmmcore.cli run --help`` lists VMM_RUN_NEEDED_OPTIONS;
      2. the modules `run` needs for Linux import: ``vmmcore.vm_runner`` (what `run`
         dispatches to) and ``vmmcore.arch.x86_64.linux_loader`` (bzImage/ELF loading).
    ``VMM_E2E_REQUIRE_VMM=1`` skips the probe (the tests then run, and fail if vmm can't);
    ``VMM_E2E_REQUIRE_VMM=0`` always reports "disabled" (the tests skip).
    """
    forced = _env_flag("VMM_E2E_REQUIRE_VMM")
    if forced is True:
        return None
    if forced is False:
        return "disabled by VMM_E2E_REQUIRE_VMM=0"
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    try:
        r = subprocess.run([sys.executable, "-m", "vmmcore.cli", "run", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env=env)
        if r.returncode != 0:
            return f"`vmm run --help` exits {r.returncode}: {r.stderr.strip()[-200:]}"
        lacking = [o for o in VMM_RUN_NEEDED_OPTIONS if o not in r.stdout]
        if lacking:
            return f"`vmm run` lacks {' '.join(lacking)}"
        mods = ("vmmcore.vm_runner", "vmmcore.arch.x86_64.linux_loader")
        r = subprocess.run([sys.executable, "-c", "import " + ", ".join(mods)], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env=env)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"{' or '.join(mods)} does not import: {last}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"probing `vmm run` failed: {e}"
    return None


_plugins: dict[str, dict] | None = None


def vmm_plugin_missing(*names: str) -> str | None:
    """Why the named plugins cannot be used yet (absent, broken, not implemented), or None.

    Reads ``vmm plugins list --json`` once per process. A plugin counts as usable when it is
    listed with ``"implemented": true`` and no ``error``.
    """
    global _plugins
    if _plugins is None:
        try:
            r = subprocess.run([sys.executable, "-m", "vmmcore.cli", "plugins", "list", "--json"],
                               cwd=REPO, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": _pythonpath()})
            _plugins = {p["name"]: p for p in json.loads(r.stdout)} if r.returncode == 0 else {}
        except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            _plugins = {}
    why = []
    for n in names:
        p = _plugins.get(n)
        if p is None:
            why.append(f"plugin {n} is not installed")
        elif p.get("error"):
            why.append(f"plugin {n} is broken: {p['error']}")
        elif not p.get("implemented", p.get("status") == "ok"):
            why.append(f"plugin {n}: {p.get('status', 'not usable')}")
    return "; ".join(why) or None


def _pythonpath() -> str:
    parts = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return ":".join(dict.fromkeys(parts))


# --------------------------------------------------------------------------- level 1


@dataclass
class Level1Result:
    status: int | None      # the command's exit status; None if it never finished
    output: str             # the command's stdout and stderr, interleaved
    console: str = ""       # level 1's serial console (kernel messages, E2E: markers)
    elapsed: float = 0.0    # wall seconds from QEMU start to QEMU exit
    timed_out: bool = False
    qemu_status: int | None = None
    workdir: Path | None = None
    markers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"status={self.status} qemu_status={self.qemu_status} "
                f"timed_out={self.timed_out} elapsed={self.elapsed:.1f}s workdir={self.workdir}\n"
                f"--- output ---\n{self.output[-6000:]}\n--- console ---\n{self.console[-4000:]}")


def parse_markers(text: str) -> dict[str, str]:
    """``E2E: key=value`` and ``E2E: word ...`` lines -> {key: value}; later ones win."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        i = line.find(images.MARKER)
        if i < 0:
            continue
        for tok in line[i + len(images.MARKER):].split():
            k, _, v = tok.partition("=")
            out[k] = v
    return out


_level1_files: tuple[Path, Path] | None = None


def level1_images() -> tuple[Path, Path]:
    """(kernel, initramfs) for QEMU: the ELF vmlinux (PVH entry) unless VMM_E2E_BZIMAGE=1."""
    global _level1_files
    if _level1_files is None:
        k = images.fetch_kernel()
        kernel = k.vmlinuz if _env_flag("VMM_E2E_BZIMAGE") else k.vmlinux
        _level1_files = (kernel, images.build_level1_initramfs(k))
    return _level1_files


def _needs_bind(p: str) -> str | None:
    """The host path to re-expose if p lives under level 1's fresh tmpfs /tmp or /run."""
    if not p.startswith("/"):
        return None
    real = os.path.realpath(p)
    for top in ("/tmp", "/run", "/var/run"):
        if real == top or real.startswith(top + "/"):
            return real if os.path.isdir(real) else os.path.dirname(real)
    return None


def _run_script(command: list[str] | str, cwd: str, env: dict[str, str]) -> str:
    lines = ["# generated by tests/e2e/harness.py; runs chrooted in level 1's host root"]
    for k, v in env.items():
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    cmd = command if isinstance(command, str) else "exec " + shlex.join(command)
    lines.append(cmd)
    return "\n".join(lines) + "\n"


def qemu_level1_argv(kernel: Path, initrd: Path, workdir: Path, mem_mib: int = 2048,
                     smp: int = 1, append: str = LEVEL1_APPEND,
                     rw_dirs: list[str] = ()) -> list[str]:
    """The measured level-1 recipe of DESIGN.md, plus the read-write work share and one
    read-write share per ``rw_dirs`` entry (tag e2erwN)."""
    extra: list[str] = []
    for n, d in enumerate(rw_dirs):
        extra += ["-fsdev", f"local,id=rw{n},path={d},security_model=none,multidevs=remap",
                  "-device", f"virtio-9p-pci,fsdev=rw{n},mount_tag=e2erw{n}"]
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm",
        "-m", str(mem_mib), "-smp", str(smp), "-nographic", "-no-reboot",
        "-nodefaults", "-serial", "stdio", "-monitor", "none",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-fsdev", "local,id=hr,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hr,mount_tag=hostroot",
        "-fsdev", f"local,id=wk,path={workdir},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=wk,mount_tag=e2ework",
        *extra,
        "-append", append,
    ]


LEVEL1_BOOT_DEADLINE = float(os.environ.get("VMM_E2E_BOOT_DEADLINE", "60"))


def _run_qemu(argv: list[str], console_path: Path, timeout: float) -> tuple[int | None, bool, bool]:
    """Run QEMU with its console going to console_path; returns (qemu status or None,
    timed out, hung before level 1's /init was ready). Kills its process group on exit."""
    t0 = time.monotonic()
    ready = b"E2E: level1-ready"
    hung = timed_out = False
    with open(console_path, "wb") as console_f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console_f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seen_ready = False
            while True:
                now = time.monotonic() - t0
                try:
                    status: int | None = proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if not seen_ready:
                    seen_ready = ready in console_path.read_bytes()
                    if not seen_ready and now > min(LEVEL1_BOOT_DEADLINE, timeout):
                        hung = True
                if now > timeout or hung:
                    timed_out = not hung
                    status = None
                    break
        finally:
            if proc.poll() is None:   # timed out, hung, KeyboardInterrupt and the like
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return status, timed_out or hung, hung


def run_level1(command: list[str] | str, timeout: float = DEFAULT_LEVEL1_TIMEOUT, *,
               cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
               binds: list[str] = (), rw_dirs: list[str | os.PathLike[str]] = (),
               keep_workdir: bool | None = None, echo: bool | None = None) -> Level1Result:
    """Boot a level-1 host in QEMU TCG, run ``command`` (argv list, or a shell snippet)
    inside its chroot of this host's root, and return its exit status and output.

    ``cwd`` defaults to the checkout; PATH starts with this Python's bin directory and
    PYTHONPATH with the checkout. QEMU is killed (its whole process group) after ``timeout``
    seconds; the result then has ``timed_out`` and ``status is None``. Host paths under /tmp
    or /run among cwd, the command's arguments and ``binds`` are bind-mounted into level 1.
    Each directory in ``rw_dirs`` is shared read-write, at the same path (for disk images
    that `vmm run` writes and the host checks afterwards).
    If level 1 does not reach its /init within VMM_E2E_BOOT_DEADLINE seconds (60), QEMU is
    killed and booted once more. The work directory is kept for a failed run (or with
    VMM_E2E_KEEP=1).
    """
    kernel, initrd = level1_images()
    cwd = str(cwd or REPO)
    workdir = Path(tempfile.mkdtemp(prefix="vmm-e2e-l1-"))
    pydir = os.path.dirname(sys.executable)
    full_env = {
        "PATH": f"{pydir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": _pythonpath(),
        "PYTHONDONTWRITEBYTECODE": "1",   # the host root is read-only at level 1
        "VMM_E2E_LEVEL": "1",
    }
    for k, v in os.environ.items():
        if k.startswith("VMM_") and k not in full_env:
            full_env[k] = v
    full_env.update(env or {})
    (workdir / "run.sh").write_text(_run_script(command, cwd, full_env))
    argv_paths = [command] if isinstance(command, str) else list(command)
    wanted = {b for b in (_needs_bind(p) for p in [cwd, sys.prefix, *argv_paths, *binds]) if b}
    if wanted:
        (workdir / "binds").write_text("\n".join(sorted(wanted)) + "\n")

    rw = [os.path.realpath(d) for d in rw_dirs]
    if rw:
        (workdir / "rwmounts").write_text("".join(f"e2erw{n} {d}\n" for n, d in enumerate(rw)))
    argv = qemu_level1_argv(kernel, initrd, workdir, rw_dirs=rw)
    echo = _env_flag("VMM_E2E_ECHO") if echo is None else echo
    console_path = workdir / "console"
    t0 = time.monotonic()
    timed_out = False
    qemu_status: int | None = None
    for attempt in (1, 2):
        t0 = time.monotonic()
        qemu_status, timed_out, hung = _run_qemu(argv, console_path, timeout)
        if not hung or attempt == 2:
            break
        # Level 1 never reached its /init: a QEMU TCG boot hang (DESIGN.md saw 1 in 7 with
        # -smp 2), not the command's fault. Boot once more, from a clean slate.
        os.rename(console_path, workdir / "console.hung")
        for f in ("output", "status"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(workdir / f)
    elapsed = time.monotonic() - t0

    console = console_path.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
    out_p, st_p = workdir / "output", workdir / "status"
    output = out_p.read_bytes().decode("utf-8", "replace") if out_p.exists() else ""
    status = None
    if st_p.exists():
        try:
            status = int(st_p.read_text().strip())
        except ValueError:
            status = None
    res = Level1Result(status, output, console, elapsed, timed_out, qemu_status, workdir,
                       parse_markers(console))
    if echo:
        print(res.describe())
    keep = keep_workdir
    if keep is None:
        keep = bool(_env_flag("VMM_E2E_KEEP")) or status != 0
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
        res.workdir = None
    return res


# --------------------------------------------------------------------------- vmm run


@dataclass
class VmmResult:
    status: int | None      # exit status of `vmm run`; None if it did not finish
    output: str             # its stdout and stderr: the level-2 serial console and errors
    elapsed: float          # wall seconds of `vmm run` itself (excluding level-1 boot)
    nested: bool            # ran inside a level-1 host
    level1: Level1Result | None = None
    markers: dict[str, str] = field(default_factory=dict)
    to_init: float | None = None   # wall seconds from launch to the guest's "E2E: init="
    retried: str | None = None     # the first run's output, when a timer lockup was retried

    def describe(self) -> str:
        s = (f"vmm run status={self.status} elapsed={self.elapsed:.1f}s to_init={self.to_init} "
             f"nested={self.nested}{' (retried after a level-2 timer lockup)' if self.retried else ''}\n"
             f"--- vmm output ---\n{self.output[-6000:]}")
        if self.level1 is not None:
            s += f"\n--- level 1 ---\n{self.level1.describe()}"
        return s


_TIME_RE = re.compile(
    r"^E2E-VMM-TIME: status=(-?\d+|timeout) elapsed=([0-9.]+) to_init=([0-9.]+|none)\s*$", re.M)
TIMED_RUN = Path(__file__).resolve().parent / "timed_run.py"


def level2_images(scenarios: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(stock bzImage, level-2 initramfs) for `vmm run`."""
    k = images.fetch_kernel()
    return k.vmlinuz, images.build_level2_initramfs(k, scenarios)


def vmm_run_argv(kernel: Path, initrd: Path, *, cpus: int = 1, mem_mib: int = 256,
                 append: str = LEVEL2_APPEND, scenario: str | None = None,
                 extra: list[str] = ()) -> list[str]:
    """`python3 -m vmmcore.cli run KERNEL -i INITRD -c N -m MiB -p ...` (the level-2 VM).

    ``scenario`` picks /scenarios/NAME.sh of the level-2 image (``-p e2e_scenario=NAME``);
    ``extra`` adds options such as ``--block path=...``.
    """
    params = append + (f" e2e_scenario={scenario}" if scenario else "")
    return [sys.executable, "-m", "vmmcore.cli", "run", str(kernel), "-i", str(initrd),
            "-c", str(cpus), "-m", str(mem_mib), "-p", params, *extra]


#: What the nested level-2 kernel prints when its timer interrupts arrive tens of seconds
#: late. The cause was level 1's, not the VMM's (QEMU -accel kvm failed the same way in
#: the same level-1 hosts): kvm.ko loaded before the kernel's refined TSC calibration
#: kept a low early TSC rate and left every vCPU's TSC multiplier at 0. The level-1 /init
#: now waits for that calibration (images.py); see README.md "Level-2 timer lockups".
LOCKUP_SIGNATURES = ("watchdog: BUG: soft lockup", "rcu: INFO: rcu_preempt self-detected stall",
                     "kthread timer wakeup didn't happen")


def run_vmm(args: list[str], timeout: float, level1_timeout: float | None = None,
            rw_dirs: list[str | os.PathLike[str]] = ()) -> VmmResult:
    """Run a `vmm run` argv (see vmm_run_argv) directly when /dev/kvm can, else in level 1.

    ``timeout`` bounds `vmm run` itself (it is killed after it, status None);
    level 1 gets ``timeout`` plus its own boot allowance. ``rw_dirs``: host directories
    that `vmm run` writes in (disk images), shared read-write with level 1.

    A run that timed out with the level-2 kernel reporting lost timer interrupts (see
    LOCKUP_SIGNATURES) is run once more, in a fresh level-1 host, and the result says so
    (``retried``); a second such run is returned as it is, and fails its test. (A safety
    net since the level-1 fix: its wait for the TSC calibration is bounded.)
    """
    result = _run_vmm_once(args, timeout, level1_timeout, rw_dirs)
    if result.status is None and any(sig in result.output for sig in LOCKUP_SIGNATURES):
        first = result
        warnings.warn("level-2 guest lost its timer interrupts (soft lockup); vmm run is "
                      f"retried once: {shlex.join(args[-6:])}", stacklevel=2)
        result = _run_vmm_once(args, timeout, level1_timeout, rw_dirs)
        result.retried = first.output
    return result


def _run_vmm_once(args: list[str], timeout: float, level1_timeout: float | None,
                  rw_dirs: list[str | os.PathLike[str]]) -> VmmResult:
    wrapped = [sys.executable, str(TIMED_RUN), str(timeout), "--", *args]
    l1 = None
    if has_direct_kvm():
        try:
            r = subprocess.run(wrapped, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout + 60,
                               env={**os.environ, "PYTHONPATH": _pythonpath()})
            raw = (r.stdout + r.stderr).decode("utf-8", "replace")
        except subprocess.TimeoutExpired as e:
            raw = ((e.stdout or b"") + (e.stderr or b"")).decode("utf-8", "replace")
    else:
        l1 = run_level1(wrapped, timeout=(level1_timeout or timeout + 90),
                        binds=[a for a in args if a.startswith("/")], rw_dirs=rw_dirs)
        raw = l1.output
    m = _TIME_RE.search(raw)
    output = _TIME_RE.sub("", raw).replace("\r\n", "\n").rstrip("\n") + "\n"
    status: int | None = None
    elapsed = l1.elapsed if l1 is not None else float(timeout)
    to_init: float | None = None
    if m:
        status = None if m.group(1) == "timeout" else int(m.group(1))
        elapsed = float(m.group(2))
        to_init = None if m.group(3) == "none" else float(m.group(3))
    return VmmResult(status, output, elapsed, l1 is not None, l1, parse_markers(output),
                     to_init)
