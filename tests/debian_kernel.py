"""Debian's stock amd64 kernel for tests: fetched with apt, unpacked with dpkg-deb, cached.

The boot-protocol tests check our zero page against the REAL bzImage that Debian ships
(linux-image-amd64 -> linux-image-<abi>-amd64), not only against synthesized headers.
Nothing is installed: `apt-get download` fetches the .deb and `dpkg-deb -x` unpacks it into
$VMM_TEST_CACHE (default ~/.cache/vmm-test), sub-directory e2e/<package>/, the same layout
as tests/e2e/images.py uses, so both share one download. A finished unpack is marked with
a `.complete` file and moved into place atomically, so a killed run never leaves a
half-unpacked kernel behind.

Use the `debian_kernel` pytest fixture (session scoped), or call `fetch_debian_kernel()`,
which raises KernelUnavailable with the reason; the fixture turns that into a skip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

META_PACKAGE = "linux-image-amd64"


class KernelUnavailable(Exception):
    """apt/dpkg are missing or the download failed: tests needing the kernel skip."""


@dataclass(frozen=True)
class DebianKernel:
    """An unpacked Debian kernel package."""

    package: str          # e.g. linux-image-6.1.0-56-amd64
    release: str          # e.g. 6.1.0-56-amd64 (the modules directory name)
    root: Path            # where the .deb is unpacked
    vmlinuz: Path         # the bzImage

    @property
    def modules_dir(self) -> Path:
        """lib/modules/<release>, for tests that build an initramfs with modules."""
        return self.root / "lib" / "modules" / self.release

    def vmlinux(self) -> Path:
        """The uncompressed ELF vmlinux, cut out of the bzImage once and cached beside it.

        The extraction itself is tests/e2e/images.py's (same cache path), not repeated here.
        """
        out = self.root / f"vmlinux-{self.release}"
        if not out.exists():
            spec = importlib.util.spec_from_file_location(
                "_vmm_e2e_images", Path(__file__).parent / "e2e" / "images.py")
            if spec is None or spec.loader is None:
                raise KernelUnavailable("tests/e2e/images.py is missing")
            images = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(images)
            try:
                data = images.extract_vmlinux(self.vmlinuz.read_bytes())
            except (ValueError, OSError, subprocess.CalledProcessError) as e:
                raise KernelUnavailable(f"cannot extract vmlinux: {e}") from e
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.rename(out)
        return out


def cache_dir() -> Path:
    """$VMM_TEST_CACHE/e2e or ~/.cache/vmm-test/e2e, created on demand."""
    base = os.environ.get("VMM_TEST_CACHE") or os.path.expanduser("~/.cache/vmm-test")
    d = Path(base) / "e2e"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                              check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise KernelUnavailable(f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise KernelUnavailable(f"{' '.join(argv)} timed out") from e


def concrete_package(meta: str = META_PACKAGE) -> str:
    """The versioned linux-image-<abi>-amd64 package that the meta package depends on.

    Either the signed or the "-unsigned" variant; both carry the same bzImage.
    """
    pinned = os.environ.get("VMM_E2E_KERNEL_PKG")
    if pinned:
        return pinned
    res = _run(["apt-cache", "depends", meta])
    if res.returncode != 0:
        raise KernelUnavailable(f"apt-cache depends {meta} failed: {res.stderr.strip()}")
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].endswith("Depends:") \
                and fields[1].startswith("linux-image-") and fields[1] != meta:
            return fields[1]
    raise KernelUnavailable(f"apt knows no kernel package behind {meta} "
                            "(run apt-get update?)")


def fetch_debian_kernel() -> DebianKernel:
    """Download (once) and unpack Debian's stock amd64 kernel; return the cached copy."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise KernelUnavailable(f"{tool} is not installed (not a Debian-like host)")
    pkg = concrete_package()
    release = pkg.removeprefix("linux-image-").removesuffix("-unsigned")
    cdir = cache_dir()
    root = cdir / pkg
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if (root / ".complete").exists() and vmlinuz.exists():
        return DebianKernel(pkg, release, root, vmlinuz)
    with tempfile.TemporaryDirectory(dir=cdir, prefix=".download-") as dl:
        res = _run(["apt-get", "download", "-q", pkg], cwd=dl)
        debs = list(Path(dl).glob("*.deb"))
        if res.returncode != 0 or len(debs) != 1:
            raise KernelUnavailable(f"apt-get download {pkg} failed: "
                                    f"{(res.stderr or res.stdout).strip()[-300:]}")
        unpack = Path(tempfile.mkdtemp(dir=cdir, prefix=".unpack-"))
        res = _run(["dpkg-deb", "-x", str(debs[0]), str(unpack)])
        if res.returncode != 0:
            shutil.rmtree(unpack, ignore_errors=True)
            raise KernelUnavailable(f"dpkg-deb -x {debs[0].name} failed: {res.stderr.strip()}")
        (unpack / ".complete").write_text(debs[0].name + "\n")
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            unpack.rename(root)
        except OSError:
            shutil.rmtree(unpack, ignore_errors=True)   # a concurrent run won the race
    if not vmlinuz.exists():
        raise KernelUnavailable(f"{pkg} unpacked but has no {vmlinuz.relative_to(root)}")
    return DebianKernel(pkg, release, root, vmlinuz)


@pytest.fixture(scope="session")
def debian_kernel() -> DebianKernel:
    """The unpacked Debian kernel, or a skip saying why it is unavailable."""
    try:
        return fetch_debian_kernel()
    except KernelUnavailable as e:
        pytest.skip(f"Debian kernel unavailable: {e}")
