"""cffi API-mode builder of the native virtio-blk engine (run by setup.py at install time).

The engine is plain C (_engine.c, API in _engine.h); cffi compiles it into the extension
module vmm_virtio_blk._engine_cffi and releases the GIL around every call, so a Python
thread blocked in blk_engine_stop never stalls the others. The header's declarations are
the cdef, minus preprocessor lines, so the two cannot drift apart.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _rel(path: Path) -> str:
    """setuptools wants source paths relative to the directory setup.py runs in."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef("\n".join(line for line in (HERE / "_engine.h").read_text().splitlines()
                          if not line.lstrip().startswith("#")))
ffibuilder.set_source(
    "vmm_virtio_blk._engine_cffi",
    '#include "_engine.h"',
    sources=[_rel(HERE / name) for name in ("_engine.c", "_ring.c", "_blk.c")],
    include_dirs=[_rel(HERE)],
    extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-sign-compare"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=False)
