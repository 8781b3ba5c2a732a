"""Build and locate the freestanding test and demo guests (guests/, C + assembly).

    guest_path("demo")         -> Path of a built ELF64 executable
    guest_path("tests/hello")  -> ...
    python3 -m vmmcore.guests build [NAME...]   builds all (or the named) guests
    python3 -m vmmcore.guests path NAME         prints the ELF path (building if needed)
    python3 -m vmmcore.guests list              lists the guest names

Guests are built with gcc from source, never committed as binaries. A build lands in a
cache directory ($VMM_GUEST_CACHE, else $XDG_CACHE_HOME/vmm/guests, else
~/.cache/vmm/guests; $TMPDIR/vmm-guests-UID if that cannot be created) under a name keyed by a hash of every guest source file, the compiler
flags and the compiler's version, so a changed source or compiler means a rebuild and an
unchanged one means none. Each build happens in a private temporary directory and the
finished ELF is renamed into place atomically, so concurrent threads and processes may
build the same guest at once: the last rename wins and every reader sees a whole file.

The sources are looked up in this order: $VMM_GUESTS_DIR; vmmcore/_guests/ inside the
installed package (a wheel ships guests/ there, see guests/README.md); guests/ beside the
vmmcore package (a git checkout or an editable install).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from vmmcore.errors import VmmError

log = logging.getLogger(__name__)

#: Runtime linked into every guest (paths relative to the guests/ source directory).
RUNTIME_SOURCES = (
    "runtime/start.S",
    "runtime/lib.c",
    "runtime/bootparams.c",
    "runtime/pci.c",
    "runtime/acpi.c",
    "runtime/cmos.c",
)
LINKER_SCRIPT = "runtime/guest.ld"

#: Every guest: name -> its own sources (the runtime is added to each).
GUESTS: dict[str, tuple[str, ...]] = {
    "demo": ("demo/main.c", "runtime/virtio.c", "runtime/irq.c"),
    "tests/hello": ("tests/hello.c",),
    "tests/smp": ("tests/smp.c", "tests/smp_trampoline.S"),
    "tests/mmio": ("tests/mmio.c",),
    "tests/crash": ("tests/crash.c",),
    "tests/virtio_rng": ("tests/virtio_rng.c", "runtime/virtio.c", "runtime/irq.c"),
    "tests/virtio_blk": ("tests/virtio_blk.c", "runtime/virtio.c", "runtime/irq.c"),
    "tests/pci": ("tests/pci.c",),
}

#: Flags for kvm-pvm, whose ring-0 emulator lacks SSE, popcnt, xsave/xrstor, clac, int3.
CFLAGS = (
    "-m64", "-march=x86-64", "-mtune=generic",
    "-ffreestanding", "-fno-builtin", "-fno-pic", "-fno-pie",
    "-mno-red-zone", "-mgeneral-regs-only",
    "-mno-sse", "-mno-sse2", "-mno-mmx", "-mno-3dnow", "-mno-avx", "-mno-popcnt",
    "-mcmodel=small",
    "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fno-common", "-fno-tree-loop-distribute-patterns",
    "-std=gnu11", "-O2", "-g0", "-Wall", "-Wextra",
)
LDFLAGS = (
    "-nostdlib", "-static", "-no-pie",
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack",
)

#: Where PT_LOAD segments may sit (layout.KERNEL_START up to 16 MiB).
LOAD_MIN = 0x200000
LOAD_MAX = 0x1000000

_SOURCE_SUFFIXES = {".c", ".h", ".S", ".s", ".ld"}


def compiler() -> str:
    """The C compiler: $VMM_GUEST_CC or gcc, as an absolute path; VmmError if missing."""
    cc = os.environ.get("VMM_GUEST_CC", "gcc")
    path = shutil.which(cc)
    if path is None:
        raise VmmError(f"cannot build the test guests: C compiler {cc!r} not found on PATH "
                       "(install gcc, or set VMM_GUEST_CC)")
    return path


def source_dir() -> Path:
    """The guests/ source directory (see the module docstring for the search order)."""
    candidates: list[Path] = []
    env = os.environ.get("VMM_GUESTS_DIR")
    if env:
        candidates.append(Path(env))
    package = Path(__file__).resolve().parent
    candidates += [package / "_guests", package.parent / "guests"]
    for c in candidates:
        if (c / LINKER_SCRIPT).is_file():
            return c
    raise VmmError("cannot find the guest sources: looked in "
                   + ", ".join(str(c) for c in candidates))


def cache_dir() -> Path:
    """Where built guests go."""
    env = os.environ.get("VMM_GUEST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vmm" / "guests"


def names() -> list[str]:
    """The names guest_path() accepts."""
    return list(GUESTS)


@functools.lru_cache(maxsize=8)
def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except OSError as e:
        raise VmmError(f"cannot run the C compiler {cc}: {e.strerror}") from e
    return out.splitlines()[0] if out else cc


def _source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES)


def _build_key(src: Path, cc: str) -> str:
    """Hash of every source file under guests/, the flags and the compiler version."""
    h = hashlib.sha256()
    for part in (_compiler_id(cc), *CFLAGS, *LDFLAGS):
        h.update(part.encode() + b"\0")
    for f in _source_files(src):
        h.update(f.relative_to(src).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _check_name(name: str) -> str:
    name = name.strip("/").removesuffix(".elf")
    if name not in GUESTS:
        raise VmmError(f"unknown guest {name!r}; known guests: {', '.join(GUESTS)}")
    return name


def _compile(cc: str, src: Path, name: str, out: Path, extra: Iterable[str] = ()) -> str:
    """One gcc run: compile and link guest NAME into OUT; returns gcc's diagnostics."""
    sources = [str(src / s) for s in (*RUNTIME_SOURCES, *GUESTS[name])]
    cmd = [cc, *CFLAGS, *extra, *LDFLAGS, f"-I{src / 'runtime'}",
           "-T", str(src / LINKER_SCRIPT), "-o", str(out), *sources]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise VmmError(f"cannot run the C compiler {cc}: {e.strerror}") from e
    if proc.returncode != 0:
        detail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise VmmError(f"building guest {name!r} failed (gcc exit {proc.returncode}):\n{detail}")
    return proc.stderr


def build_into(name: str, out: Path, extra_flags: Iterable[str] = ()) -> str:
    """Builds guest NAME to OUT without the cache (tests use it with -Werror)."""
    return _compile(compiler(), source_dir(), _check_name(name), out, extra_flags)


def guest_path(name: str, *, rebuild: bool = False, _cache: Path | None = None) -> Path:
    """A built ELF for guest NAME ("demo", "tests/hello", ...), building it if needed."""
    name = _check_name(name)
    src = source_dir()
    cc = compiler()
    key = _build_key(src, cc)
    cache = _cache or cache_dir()
    target = cache / f"{name.replace('/', '-')}-{key}.elf"
    if target.is_file() and not rebuild:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    except OSError as e:
        # A read-only home (a jail, a 9p root) still gets a per-user cache in /tmp.
        fallback = Path(tempfile.gettempdir()) / f"vmm-guests-{os.getuid()}"
        if cache == fallback:
            raise VmmError(f"cannot create the guest build cache {cache}: {e.strerror}") from e
        log.info("guest cache %s is not writable (%s); using %s", cache, e.strerror, fallback)
        try:
            fallback.mkdir(mode=0o700, exist_ok=True)
            st = fallback.lstat()
        except OSError as e2:
            raise VmmError(f"cannot create the guest build cache {fallback}: {e2.strerror}") from e2
        if st.st_uid != os.getuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
            # Someone else's directory in a shared /tmp: never run ELFs from it.
            raise VmmError(f"guest build cache {fallback} is not a private directory of this "
                           "user; set VMM_GUEST_CACHE") from e
        return guest_path(name, rebuild=rebuild, _cache=fallback)
    try:
        out = tmp / "guest.elf"
        _compile(cc, src, name, out)
        os.replace(out, target)   # atomic: readers see the old file, or the whole new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_all(selected: Iterable[str] | None = None, *, rebuild: bool = False) -> dict[str, Path]:
    """Builds every guest (or the selected ones); returns name -> ELF path."""
    return {n: guest_path(n, rebuild=rebuild) for n in (selected or GUESTS)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m vmmcore.guests",
                                     description="Build and locate the vmm test guests.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build all (or the named) guests, print their paths")
    b.add_argument("names", nargs="*", metavar="NAME")
    b.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    p = sub.add_parser("path", help="print a guest's ELF path, building it if needed")
    p.add_argument("name", metavar="NAME")
    sub.add_parser("list", help="list the guest names")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            for n, path in build_all(args.names or None, rebuild=args.rebuild).items():
                print(f"{n:14} {path}")
        elif args.command == "path":
            print(guest_path(args.name))
        else:
            print("\n".join(GUESTS))
    except VmmError as e:
        print(f"vmm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
