"""Build the end-to-end tier's boot images from Debian packages: kernel, vmlinux, initramfs.

Everything here is made from packages at run time, nothing binary is committed:

* the stock kernel comes from Debian's ``linux-image-amd64`` (its dependency
  ``linux-image-<abi>-amd64``), fetched with ``apt-get download`` and unpacked with
  ``dpkg-deb -x`` into a cache (``$VMM_TEST_CACHE`` or ``~/.cache/vmm-test``, sub-directory
  ``e2e``); nothing is installed into the host system;
* the uncompressed ELF ``vmlinux`` is cut out of the bzImage (the payload that the boot
  header's ``payload_offset``/``payload_length`` point at, decompressed: what the kernel's
  scripts/extract-vmlinux does), because QEMU boots it through the PVH entry ~1.7 s faster;
* two initramfs images (newc cpio, gzip), written by our own cpio writer from
  ``busybox-static`` plus kernel modules whose dependencies are resolved from the modules'
  own ``.modinfo`` sections (the Debian package ships no modules.dep: depmod runs at install):

  - LEVEL 1, the nested host: loads kvm-amd, 9p and virtio, mounts the host's root over 9p
    read-only, chroots into it and runs the command that the harness left on a second,
    writable 9p share (see harness.py for the protocol);
  - LEVEL 2, the stock guest that `vmm run` boots: loads the virtio drivers, runs a
    scenario script and prints ``E2E:`` marker lines, then ``poweroff -f``.

Run this file to prefetch and build everything (``scripts/e2e-setup --prefetch`` does).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

# Modules of the level-1 host, in DESIGN.md's measured load order. Dependencies found in the
# modules' .modinfo are inserted before their users; names are matched with - and _ equal.
LEVEL1_MODULES = [
    "irqbypass", "kvm", "ccp", "kvm-amd",
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "9pnet", "9pnet_virtio", "netfs", "fscache", "9p",
]

# Modules of the level-2 guest: the virtio drivers whose devices vmm provides (or will).
# A driver whose device is absent loads and stays idle, so one image serves every scenario.
LEVEL2_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_blk", "virtio-rng", "virtio_input", "evdev", "virtio-gpu", "virtio_console",
]

MARKER = "E2E:"

# Programs of the level-2 image: C sources beside this file, built static with gcc when
# the image is built (path in the image -> source).
LEVEL2_PROGRAMS = {"bin/virgl_check": Path(__file__).with_name("virgl_check.c"),
                   "bin/iopoll_check": Path(__file__).with_name("iopoll_check.c")}


def cache_dir() -> Path:
    base = os.environ.get("VMM_TEST_CACHE") or os.path.expanduser("~/.cache/vmm-test")
    d = Path(base) / "e2e"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log(msg: str) -> None:
    if os.environ.get("VMM_E2E_QUIET") != "1":
        print(f"[e2e] {msg}", flush=True)


# --------------------------------------------------------------------------- kernel package


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package."""

    release: str          # e.g. "6.1.0-56-amd64" (the modules directory name)
    root: Path            # where the .deb was unpacked
    vmlinuz: Path         # the bzImage

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel, extracted on first use (cached beside the bzImage)."""
        out = self.root / f"vmlinux-{self.release}"
        if not out.exists():
            data = extract_vmlinux(self.vmlinuz.read_bytes())
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.rename(out)
        return out


def _apt_kernel_package() -> str | None:
    """The versioned package that linux-image-amd64 depends on, per the apt lists."""
    try:
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    return None


def fetch_kernel() -> Kernel:
    """Download (once) and unpack Debian's stock amd64 kernel; return the cached copy.

    ``$VMM_E2E_KERNEL_PKG`` pins the package (e.g. ``linux-image-6.1.0-56-amd64``). Offline,
    or when apt knows no candidate, the newest unpacked kernel already in the cache is used.
    """
    cdir = cache_dir()
    pkg = os.environ.get("VMM_E2E_KERNEL_PKG") or _apt_kernel_package()
    if pkg is None:
        cached = sorted(cdir.glob("linux-image-*/lib/modules/*"))
        if not cached:
            raise RuntimeError("cannot resolve linux-image-amd64 (apt-cache depends failed) "
                               "and no kernel is cached: run `apt-get update`")
        mod = cached[-1]
        root = mod.parents[2]
        return Kernel(mod.name, root, root / "boot" / f"vmlinuz-{mod.name}")
    release = pkg.removeprefix("linux-image-")
    root = cdir / pkg
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if not (vmlinuz.exists() and (root / ".complete").exists()):
        t0 = time.monotonic()
        _log(f"fetching {pkg} with apt-get download into {cdir}")
        with tempfile.TemporaryDirectory(dir=cdir) as dl:
            # _apt cannot write into root's home: apt falls back to downloading as root
            # and warns; the warning is harmless.
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=dl, check=True,
                           stdout=subprocess.DEVNULL)
            (deb,) = Path(dl).glob("*.deb")
            if root.exists() and not (root / ".complete").exists():
                shutil.rmtree(root)   # a half-finished unpack of an older harness
            unpack = Path(tempfile.mkdtemp(dir=cdir, prefix=".unpack-"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpack)], check=True)
            (unpack / ".complete").write_text(deb.name + "\n")
            try:
                unpack.rename(root)
            except OSError:   # another process (tests/debian_kernel.py) got there first
                shutil.rmtree(unpack, ignore_errors=True)
                if not (root / ".complete").exists():
                    raise
        _log(f"fetched and unpacked {pkg} in {time.monotonic() - t0:.1f} s")
    return Kernel(release, root, vmlinuz)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF vmlinux inside a bzImage (x86 boot protocol >= 2.08)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        data = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        data = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True,
                              check=True).stdout
    elif payload.startswith(b"\x5d\x00\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    else:
        raise ValueError(f"unknown bzImage payload compression {payload[:6].hex()}")
    if not data.startswith(b"\x7fELF"):
        raise ValueError("decompressed bzImage payload is not an ELF file")
    return data


# --------------------------------------------------------------------------- kernel modules


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of one section of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 LE file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data,
                                                                    shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name, off, size = sh(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end].decode() == wanted:
            return data[off:off + size]
    return None


def _read_module(path: Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def _norm(name: str) -> str:
    return name.replace("-", "_")


class ModuleIndex:
    """Module name -> file and its `depends=`, read from the .ko files themselves."""

    def __init__(self, modules_dir: Path):
        self.dir = modules_dir
        self.files: dict[str, Path] = {}
        for p in (modules_dir / "kernel").rglob("*.ko*"):
            name = p.name.split(".ko")[0]
            self.files[_norm(name)] = p
        self.builtin = {
            _norm(Path(line.strip()).name.split(".ko")[0])
            for line in (modules_dir / "modules.builtin").read_text().splitlines()
            if line.strip()
        }
        self._deps: dict[str, list[str]] = {}

    def depends(self, name: str) -> list[str]:
        n = _norm(name)
        if n not in self._deps:
            info = _elf_section(_read_module(self.files[n]), ".modinfo") or b""
            deps: list[str] = []
            for field in info.split(b"\0"):
                if field.startswith(b"depends="):
                    deps = [_norm(d) for d in field[8:].decode().split(",") if d]
            self._deps[n] = deps
        return self._deps[n]

    def closure(self, names: list[str]) -> list[Path]:
        """Files to insmod, in an order where every module follows its dependencies.

        A name built into the kernel (modules.builtin) is skipped; an unknown one raises.
        """
        order: list[str] = []
        seen: set[str] = set()

        def visit(n: str, stack: tuple[str, ...]) -> None:
            if n in seen:
                return
            if n in stack:
                raise ValueError(f"module dependency cycle: {' -> '.join(stack + (n,))}")
            if n not in self.files:
                if n in self.builtin:
                    seen.add(n)
                    return
                raise KeyError(f"module {n} is neither in {self.dir} nor built in")
            for d in self.depends(n):
                visit(d, stack + (n,))
            seen.add(n)
            order.append(n)

        for name in names:
            visit(_norm(name), ())
        return [self.files[n] for n in order]


# --------------------------------------------------------------------------- cpio (newc)


class CpioWriter:
    """A minimal newc ("070701") archive writer: directories, files, symlinks, nodes."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        namez = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(namez), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + namez)
        self.buf.write(b"\0" * (-(len(hdr) + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), 0o040000 | mode, nlink=2)

    def _parent(self, name: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.mkdir(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# --------------------------------------------------------------------------- initramfs


def _busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                         check=True).stdout
    return [a for a in out.split() if a and a != "busybox"]


def _base_image(modules: list[Path], modules_dir: Path) -> CpioWriter:
    if not BUSYBOX.exists():
        raise RuntimeError("busybox-static is not installed: run scripts/e2e-setup")
    w = CpioWriter()
    for d in ("dev", "proc", "sys", "tmp", "run", "mnt", "etc", "root", "bin", "sbin"):
        w.mkdir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _busybox_applets():
        if applet not in ("init", "linuxrc"):
            w.symlink(f"bin/{applet}", "busybox")
    lines = []
    for m in modules:
        rel = m.relative_to(modules_dir)
        name = f"lib/modules/{rel}"
        if m.suffix in (".xz", ".zst", ".gz"):   # busybox insmod wants a plain .ko
            name = name.rsplit(".", 1)[0]
        w.file(name, _read_module(m))
        lines.append("/" + name)
    w.file("etc/modules.load", ("\n".join(lines) + "\n").encode())
    return w


LEVEL1_INIT = r"""#!/bin/busybox sh
# LEVEL-1 host /init (generated by tests/e2e/images.py). Protocol with harness.py:
#   9p tag "hostroot": the host's / (read-only); tag "e2ework": the per-run directory
#   (read-write) holding run.sh, and `binds` (host paths under /tmp or /run to re-expose)
#   and `rwmounts` ("TAG PATH" lines: more read-write 9p shares, mounted at PATH).
#   run.sh's output goes to e2ework/output, its exit status to e2ework/status.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "E2E: $*" > /dev/console; }
up() { cut -d' ' -f1 /proc/uptime; }
fail() { say "level1-init-failed: $*"; poweroff -f; sleep 5; exit 1; }
# kvm.ko keeps, as the TSC rate of every vCPU it will create, the kernel's tsc_khz of the
# moment it loads. Before the refined TSC calibration (when the clocksource goes from
# tsc-early to tsc, ~2 s in) that is the early estimate, which under host load (HPET
# reference) comes out ~650 ppm low; with no TSC scaling (TCG has none) KVM then leaves
# each vCPU's TSC multiplier at 0 ("user requested TSC rate below hardware speed" in
# dmesg), and a level-2 guest's TSC-deadline timer fires tens of seconds late: soft
# lockups under `vmm run` and QEMU alike (tests/e2e/README.md). So wait for it (<= 5 s).
cs=/sys/devices/system/clocksource/clocksource0/current_clocksource
i=0
while [ "$(cat $cs)" != tsc ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
for m in $(cat /etc/modules.load); do
    insmod "$m" || say "insmod-failed $m"
done
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /host /newroot
mount -t 9p -o "$opts,ro,cache=loose" hostroot /host || fail "mount hostroot"
mount --bind /host /newroot || fail "bind newroot"
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs -o mode=755 run /newroot/run
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mkdir -p /newroot/run/e2e
mount -t 9p -o "$opts,rw" e2ework /newroot/run/e2e || fail "mount e2ework"
if [ -f /newroot/run/e2e/binds ]; then
    for p in $(cat /newroot/run/e2e/binds); do
        mkdir -p "/newroot$p" && mount --bind "/host$p" "/newroot$p" || say "bind-failed $p"
    done
fi
if [ -f /newroot/run/e2e/rwmounts ]; then
    while read -r tag p; do
        mkdir -p "/newroot$p" && mount -t 9p -o "$opts,rw" "$tag" "/newroot$p" \
            || say "rw-mount-failed $tag $p"
    done < /newroot/run/e2e/rwmounts
fi
[ -c /dev/kvm ] && kvm=yes || kvm=no
say "level1-ready=$(up) kvm=$kvm"
chroot /newroot /bin/sh -c 'cd /; exec /bin/sh /run/e2e/run.sh > /run/e2e/output 2>&1 < /dev/null'
status=$?
echo "$status" > /newroot/run/e2e/status
say "level1-status=$status level1-done=$(up)"
sync
umount /newroot/run/e2e
poweroff -f
sleep 10
"""

LEVEL2_INIT = r"""#!/bin/busybox sh
# LEVEL-2 guest /init (generated by tests/e2e/images.py): load the virtio drivers, run
# /scenario.sh (or /scenarios/NAME.sh for each NAME of e2e_scenario=NAME[,NAME...]),
# print E2E: marker lines on the console, then poweroff -f.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
say() { echo "E2E: $*"; }
say "init=$(cut -d' ' -f1 /proc/uptime)"
# insmod with the module's options from the kernel command line (MODULE.OPTION=VALUE),
# as modprobe would pass them
for m in $(cat /etc/modules.load); do
    name=$(basename "$m" .ko | tr - _)
    opts=""
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "$name".*=*) opts="$opts ${arg#"$name".}" ;; esac
    done
    insmod "$m" $opts 2>/dev/null || say "insmod-failed $m"
done
scenarios=/scenario.sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        e2e_scenario=*)
            scenarios=""
            for n in $(echo "${arg#e2e_scenario=}" | tr , ' '); do
                scenarios="$scenarios /scenarios/$n.sh"
            done ;;
    esac
done
for scenario in $scenarios; do
    if [ -f "$scenario" ]; then
        sh "$scenario"
        say "scenario-status=$? scenario-$(basename "$scenario" .sh)=done"
    else
        say "no-scenario=$scenario"
    fi
done
say "poweroff"
poweroff -f
sleep 10
say "poweroff-failed"
"""

# The default level-2 scenario: what the boot test asserts on.
DEFAULT_SCENARIO = r"""say() { echo "E2E: $*"; }
say "cpus=$(grep -c ^processor /proc/cpuinfo)"
say "online=$(cat /sys/devices/system/cpu/online)"
say "kernel=$(uname -r)"
"""

# The pattern the blk scenario writes to the start of /dev/vda: `seq 1 40000` padded with
# zero bytes to 256 KiB (the host checks the image against blk_pattern()).
BLK_PATTERN_BYTES = 262144


def blk_pattern() -> bytes:
    text = "".join(f"{i}\n" for i in range(1, 40001)).encode()
    return text + b"\0" * (BLK_PATTERN_BYTES - len(text))


# The blkpoll scenario's disk (iopoll_check.c): 4 MiB whose every 4 KiB block starts with
# its number (u64 LE), then the bytes (block + i) & 0xff; the program overwrites blocks
# 256..271 with the byte 0xA5 ^ block.
IOPOLL_BLOCKS = 1024
IOPOLL_WRITTEN = range(256, 272)
#: Requests iopoll_check makes: 64 + 8 reads, 8 + 8 writes, 16 reads back.
IOPOLL_IOS = 104


def iopoll_image(after: bool = False) -> bytes:
    """The blkpoll disk as the host writes it, or (after=True) as iopoll_check leaves it."""
    ramp = bytes(range(256)) * 32
    out = bytearray()
    for b in range(IOPOLL_BLOCKS):
        if after and b in IOPOLL_WRITTEN:
            out += bytes([0xA5 ^ (b & 0xFF)]) * 4096
            continue
        block = bytearray(ramp[b % 256:b % 256 + 4096])
        block[:8] = b.to_bytes(8, "little")
        out += block
    return bytes(out)


def blkpoll_problem(markers: dict[str, str], image: bytes) -> str | None:
    """What is wrong with a blkpoll run (its markers and the disk afterwards), or None:
    2 hardware queues, one polling, every IOPOLL request done with at most 2 interrupts
    on the request vectors (the fsync's flush), the writes in the image."""
    want = {"vda-hw-queues": "2", "vda-io-poll": "1", "iopoll": "ok",
            "iopoll-ios": str(IOPOLL_IOS)}
    wrong = {k: markers.get(k) for k, v in want.items() if markers.get(k) != v}
    if wrong:
        return f"markers {wrong}, expected {want}"
    irqs = int(markers["vda-req-irqs-after"]) - int(markers["vda-req-irqs-before"])
    if irqs > 2:
        return f"{irqs} request interrupts during polled I/O"
    if image != iopoll_image(after=True):
        return "the image does not hold what iopoll_check wrote"
    return None


# Named level-2 scenarios, /scenarios/NAME.sh in every level-2 image; chosen with
# `-p e2e_scenario=NAME[,NAME...]`. Each prints `E2E: key=value` markers for the tests.
LEVEL2_SCENARIOS = {
    "cpus": DEFAULT_SCENARIO,
    # virtio-blk: sizes and ro flags of vda..vdd; a pattern written to vda with dd, synced,
    # read back past the page cache; a write to vdb when vdb is read-only must fail.
    "blk": r"""say() { echo "E2E: $*"; }
for d in vda vdb vdc vdd; do
    [ -b /dev/$d ] && say "$d-sectors=$(cat /sys/block/$d/size) $d-ro=$(cat /sys/block/$d/ro)"
done
[ -b /dev/vda ] || { say "vda=missing"; exit 1; }
seq 1 40000 > /tmp/seq
dd if=/tmp/seq of=/tmp/pat bs=262144 count=1 conv=sync 2>/dev/null
if dd if=/tmp/pat of=/dev/vda bs=65536 conv=fsync 2>/dev/null; then
    say "vda-write=ok"
else
    say "vda-write=failed"
fi
sync
blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=65536 count=4 2>/dev/null
if cmp -s /tmp/pat /tmp/back; then say "vda-readback=ok"; else say "vda-readback=bad"; fi
if [ -b /dev/vdb ] && [ "$(cat /sys/block/vdb/ro)" = 1 ]; then
    if dd if=/tmp/pat of=/dev/vdb bs=65536 count=1 conv=fsync 2>/dev/null; then
        say "vdb-write=accepted"
    else
        say "vdb-write=refused"
    fi
fi
""",
    # virtio-blk poll queues (virtio_blk.poll_queues=1 on the command line, num_queues=2,
    # 2 vCPUs): the hardware queues blk-mq made, whether vda polls, and polled reads and
    # writes through io_uring IOPOLL (iopoll_check.c) against the host's block pattern.
    # Interrupts of the request queues' vectors around iopoll_check tell whether its I/O
    # was polled: a polled request that found no poll queue quietly takes the interrupt
    # path instead (Linux clears REQ_POLLED), and then each one is an interrupt.
    "blkpoll": r"""say() { echo "E2E: $*"; }
say "vda-hw-queues=$(ls -d /sys/block/vda/mq/[0-9]* 2>/dev/null | wc -l)"
say "vda-io-poll=$(cat /sys/block/vda/queue/io_poll 2>/dev/null || echo missing)"
req_irqs() {
    grep 'virtio[0-9]*-req' /proc/interrupts |
        awk '{for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i} END {print s + 0}'
}
say "vda-req-vectors=$(grep -c 'virtio[0-9]*-req' /proc/interrupts)"
say "vda-req-irqs-before=$(req_irqs)"
/bin/iopoll_check /dev/vda
say "vda-req-irqs-after=$(req_irqs)"
""",
    # virtio-rng: the hw_random core picks it, /dev/hwrng yields bytes.
    "rng": r"""say() { echo "E2E: $*"; }
say "rng-current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null || echo none)"
say "hwrng-bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)"
say "hwrng-hex=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
""",
    # virtio-gpu: the DRM device, its fbdev emulation and fbcon bound; then text on tty1
    # (fbcon draws it, so a screenshot of the scanout is not blank).
    "gpu": r"""say() { echo "E2E: $*"; }
say "drm=$(ls /sys/class/drm 2>/dev/null | tr '\n' ',')"
say "dri=$(ls /dev/dri 2>/dev/null | tr '\n' ',')"
say "fb0=$(cat /sys/class/graphics/fb0/name 2>/dev/null | tr ' ' _)"
for v in /sys/class/vtconsole/vtcon*; do
    grep -q "frame buffer" "$v/name" 2>/dev/null && say "fbcon-bound=$(cat "$v/bind")"
done
i=0
while [ $i -lt 20 ]; do echo "vmm e2e: fbcon line $i ##########################" > /dev/tty1; i=$((i+1)); done
say "fbcon-drawn=yes"
sleep 1
""",
    # virgl (backend=virglrenderer): the driver negotiated VIRTIO_GPU_F_VIRGL, and
    # virgl_check (virgl_check.c) renders a CLEAR through the DRM uapi and reads it back.
    "gpu3d": r"""say() { echo "E2E: $*"; }
say "virgl-dmesg=$(dmesg | grep -c 'features: +virgl')"
/bin/virgl_check
""",
    # virtio-input: every input device whose sysfs path is under a virtio device.
    "input": r"""say() { echo "E2E: $*"; }
say "input-virtio=$(grep -c '^S: Sysfs=.*/virtio[0-9]*/' /proc/bus/input/devices)"
say "input-names=$(grep '^N: Name=' /proc/bus/input/devices | sed 's/^N: Name=//; s/"//g; s/ /_/g' | tr '\n' ',')"
""",
}


def build_program(source: Path) -> bytes:
    """A C source built into a static, stripped x86-64 executable (gcc, glibc's libc.a)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / source.stem
        proc = subprocess.run(["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(out),
                               str(source)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.name} failed: {proc.stderr.strip()}")
        return out.read_bytes()


def _write_image(path: Path, w: CpioWriter, keep: int = 4) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(gzip.compress(w.finish(), compresslevel=1, mtime=0))
    tmp.rename(path)
    # Images are keyed by content: keep the newest few of this kind, drop older ones.
    prefix = path.name.rsplit("-", 1)[0] + "-"
    older = sorted((p for p in path.parent.glob(prefix + "*.cpio.gz") if p != path),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for p in older[keep - 1:]:
        with contextlib.suppress(OSError):
            p.unlink()
    return path


def _image_key(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    busybox = BUSYBOX.stat()
    h.update(f"{busybox.st_size}:{busybox.st_mtime_ns}".encode())
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_level1_initramfs(kernel: Kernel) -> Path:
    """The level-1 host's initramfs (cached by content key)."""
    key = _image_key("level1", kernel.release, LEVEL1_INIT, ",".join(LEVEL1_MODULES))
    out = cache_dir() / f"level1-{kernel.release}-{key}.cpio.gz"
    if out.exists():
        return out
    idx = ModuleIndex(kernel.modules_dir)
    w = _base_image(idx.closure(LEVEL1_MODULES), kernel.modules_dir)
    w.file("init", LEVEL1_INIT.encode(), 0o755)
    return _write_image(out, w)


def build_level2_initramfs(kernel: Kernel, scenarios: dict[str, str] | None = None,
                           default: str = DEFAULT_SCENARIO) -> Path:
    """The level-2 guest's initramfs: /scenario.sh runs by default; each entry of
    LEVEL2_SCENARIOS and ``scenarios`` becomes /scenarios/NAME.sh, chosen with
    ``e2e_scenario=NAME[,NAME...]`` on the kernel command line."""
    scenarios = dict(sorted({**LEVEL2_SCENARIOS, **(scenarios or {})}.items()))
    key = _image_key("level2", kernel.release, LEVEL2_INIT, ",".join(LEVEL2_MODULES), default,
                     *[f"{k}={v}" for k, v in scenarios.items()],
                     *[f"{k}={v.read_text()}" for k, v in LEVEL2_PROGRAMS.items()])
    out = cache_dir() / f"level2-{kernel.release}-{key}.cpio.gz"
    if out.exists():
        return out
    idx = ModuleIndex(kernel.modules_dir)
    w = _base_image(idx.closure(LEVEL2_MODULES), kernel.modules_dir)
    w.file("init", LEVEL2_INIT.encode(), 0o755)
    w.file("scenario.sh", default.encode(), 0o755)
    for name, text in scenarios.items():
        w.file(f"scenarios/{name}.sh", text.encode(), 0o755)
    for name, source in LEVEL2_PROGRAMS.items():
        w.file(name, build_program(source), 0o755)
    return _write_image(out, w)


def main() -> None:
    t0 = time.monotonic()
    k = fetch_kernel()
    print(f"kernel   {k.vmlinuz}")
    print(f"vmlinux  {k.vmlinux}")
    idx = ModuleIndex(k.modules_dir)
    print("level-1 modules:", " ".join(p.name for p in idx.closure(LEVEL1_MODULES)))
    print("level-2 modules:", " ".join(p.name for p in idx.closure(LEVEL2_MODULES)))
    print(f"level-1  {build_level1_initramfs(k)}")
    print(f"level-2  {build_level2_initramfs(k)}")
    print(f"done in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
