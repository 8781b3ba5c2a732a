"""Build hooks: the cffi KVM bindings, and the sources a wheel must carry.

API mode lets the C compiler check every struct layout and ioctl number against the
installed kernel headers, so nothing about struct kvm_run is hand-computed. The test and
demo guests (guests/, built with gcc on first use by vmmcore.guests) and the core's seccomp
policies (seccomp/) live at the top of the checkout; a wheel carries them inside the
package as vmmcore/_guests and vmmcore/_seccomp, where the core looks first.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = (  # (source directory, destination inside the package, suffixes)
    ("guests", "_guests", {".c", ".h", ".S", ".ld"}),
    ("seccomp", "_seccomp", {".policy"}),
)


class BuildPyWithData(build_py):
    """build_py that also copies guests/ and seccomp/ into the built package."""

    def run(self) -> None:
        super().run()
        for src_name, dst_name, suffixes in SHIPPED:
            src = HERE / src_name
            dst = Path(self.build_lib) / "vmmcore" / dst_name
            for f in sorted(src.rglob("*")):
                if f.is_file() and f.suffix in suffixes:
                    target = dst / f.relative_to(src)
                    self.mkpath(str(target.parent))
                    self.copy_file(str(f), str(target))


setup(cffi_modules=["vmmcore/kvm/_build.py:ffibuilder"],
      cmdclass={"build_py": BuildPyWithData})
