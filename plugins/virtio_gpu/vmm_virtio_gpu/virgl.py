"""virglrenderer through cffi (ABI mode), and the one thread that owns it.

Debian's libvirglrenderer1 (0.10.4) turns the guest's virgl command streams into OpenGL.
With ``VIRGL_RENDERER_USE_EGL | VIRGL_RENDERER_USE_SURFACELESS`` it needs no display
server and no DRM render node: without /dev/dri, Mesa's EGL falls back to llvmpipe
(software). The structures below are hand-written from the 0.10.4 header
(/usr/include/virgl/virglrenderer.h); only the calls the device makes are declared.

Why a thread of its own: virglrenderer keeps its GL context current on the thread that
initialised it, and switches contexts lazily, so every later call must come from that
same thread; the device's virtqueue worker, by contrast, is replaced on every reset.
When: Mesa starts threads when it initialises, and threads do not survive fork, so the
library is initialised in the process that runs the device, never in the main process
before the fork: the device's on_device_sandboxed() calls Renderer.start() in its jailed
device process (or, with --disable-sandbox, once every device exists), so that what the
jail or the host lacks stops `vmm run` at start-up; a Renderer nobody started starts on
its first call.

virglrenderer is a per-process singleton: one GPU per process may use it (the sandbox
gives each device its own process); a second one in the same process fails to start.
"""

from __future__ import annotations

import ctypes
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cffi

from vmmcore.errors import VmmError

CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct virgl_box { uint32_t x, y, z, w, h, d; };
struct virgl_renderer_callbacks {
    int version;
    void (*write_fence)(void *cookie, uint32_t fence);
    void *(*create_gl_context)(void *cookie, int scanout_idx, void *param);
    void (*destroy_gl_context)(void *cookie, void *ctx);
    int (*make_current)(void *cookie, int scanout_idx, void *ctx);
    int (*get_drm_fd)(void *cookie);
};
struct virgl_renderer_resource_create_args {
    uint32_t handle, target, format, bind, width, height, depth, array_size,
             last_level, nr_samples, flags;
};
struct virgl_renderer_resource_info {
    uint32_t handle, virgl_format, width, height, depth, flags, tex_id, stride;
    int drm_fourcc;
};
int virgl_renderer_init(void *cookie, int flags, struct virgl_renderer_callbacks *cb);
void virgl_renderer_poll(void);
void virgl_renderer_cleanup(void *cookie);
void virgl_renderer_reset(void);
void virgl_renderer_get_cap_set(uint32_t set, uint32_t *max_ver, uint32_t *max_size);
void virgl_renderer_fill_caps(uint32_t set, uint32_t version, void *caps);
int virgl_renderer_context_create(uint32_t handle, uint32_t nlen, const char *name);
void virgl_renderer_context_destroy(uint32_t handle);
int virgl_renderer_submit_cmd(void *buffer, int ctx_id, int ndw);
void virgl_renderer_ctx_attach_resource(int ctx_id, int res_handle);
void virgl_renderer_ctx_detach_resource(int ctx_id, int res_handle);
int virgl_renderer_resource_create(struct virgl_renderer_resource_create_args *args,
                                   struct iovec *iov, uint32_t num_iovs);
void virgl_renderer_resource_unref(uint32_t res_handle);
int virgl_renderer_resource_attach_iov(int res_handle, struct iovec *iov, int num_iovs);
void virgl_renderer_resource_detach_iov(int res_handle, struct iovec **iov, int *num_iovs);
int virgl_renderer_resource_get_info(int res_handle,
                                     struct virgl_renderer_resource_info *info);
int virgl_renderer_transfer_read_iov(uint32_t handle, uint32_t ctx_id, uint32_t level,
                                     uint32_t stride, uint32_t layer_stride,
                                     struct virgl_box *box, uint64_t offset,
                                     struct iovec *iov, int iovec_cnt);
int virgl_renderer_transfer_write_iov(uint32_t handle, uint32_t ctx_id, int level,
                                      uint32_t stride, uint32_t layer_stride,
                                      struct virgl_box *box, uint64_t offset,
                                      struct iovec *iovec, unsigned int iovec_cnt);
int virgl_renderer_create_fence(int client_fence_id, uint32_t ctx_id);
"""

LIBRARY = "libvirglrenderer.so.1"
VIRGL_RENDERER_USE_EGL = 1 << 0
VIRGL_RENDERER_USE_SURFACELESS = 1 << 3
#: the capsets virglrenderer serves for OpenGL guests (virtio spec: VIRTIO_GPU_CAPSET_*)
CAPSET_VIRGL, CAPSET_VIRGL2 = 1, 2
#: how long a fenced command may wait for the host GPU before it is answered anyway
FENCE_TIMEOUT = 10.0

ffi = cffi.FFI()
ffi.cdef(CDEF)


EGL_LIBRARY = "libEGL.so.1"
EGL_PLATFORM_SURFACELESS_MESA = 0x31DD
egl_ffi = cffi.FFI()
egl_ffi.cdef("""
void *eglGetPlatformDisplay(unsigned int platform, void *native_display,
                            const intptr_t *attrib_list);
unsigned int eglInitialize(void *dpy, int *major, int *minor);
unsigned int eglTerminate(void *dpy);
int eglGetError(void);
""")


class VirglUnavailable(VmmError):
    """backend=virglrenderer cannot initialise here; the message says why."""


def _dlopen(lib_ffi: cffi.FFI, name: str, package: str) -> Any:
    """lib_ffi.dlopen(name), or VirglUnavailable naming it and the package to install.
    ctypes loads it first: where dlopen fails, cffi falls back to ctypes.util.
    find_library, which runs ldconfig and gcc, and in a jail seccomp kills the device
    on their pipe2 instead of it saying which library is missing."""
    try:
        ctypes.CDLL(name)
        return lib_ffi.dlopen(name)
    except OSError as e:
        raise VirglUnavailable(
            f"virtio-gpu backend=virglrenderer: cannot load {name} ({e}); install "
            f"Debian's {package} or use backend=2d") from None


def _load() -> Any:
    return _dlopen(ffi, LIBRARY, "libvirglrenderer1")


class _FenceState:
    """The newest fence virglrenderer reported done (write_fence runs on the renderer
    thread, inside virgl_renderer_poll)."""

    done = 0


_fences = _FenceState()


def _on_write_fence(cookie: Any, fence: int) -> None:
    # virglrenderer retires fences in order: the newest is the one to remember (a max()
    # would stick at the top once the sequence numbers wrap around)
    _fences.done = fence


#: fence sequence numbers run 1..FENCE_SEQ_MAX (virglrenderer takes a positive int)
FENCE_SEQ_MAX = 0x7FFF_FFFF


def fence_reached(done: int, seq: int) -> bool:
    """Whether fence `done` being retired means fence `seq` is: `done` is `seq` or up to
    half the sequence space after it, counting across the wrap from FENCE_SEQ_MAX to 1."""
    return (done - seq) % FENCE_SEQ_MAX < FENCE_SEQ_MAX // 2


# Created at import (before any jail closes): a libffi closure needs executable memory.
_WRITE_FENCE = ffi.callback("void(void *, uint32_t)", _on_write_fence)


class Renderer:
    """virglrenderer, initialised on and only ever called from a thread of its own.

    ``call(fn, *args)`` runs ``fn(lib, *args)`` on that thread and returns its result
    (or raises its exception). The thread and the library start on the first call.
    """

    _owner_lock = threading.Lock()
    _active: Renderer | None = None
    _initialised_in: int | None = None          # pid that initialised the library

    def __init__(self) -> None:
        self.lib: Any = None
        self.error: str | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._cookie = ffi.new("int *")
        self._cbs = ffi.new("struct virgl_renderer_callbacks *",
                            {"version": 1, "write_fence": _WRITE_FENCE})
        self._next_fence = 0

    # -- the thread ------------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(lib, *args) on the renderer thread; start it (and virglrenderer) first."""
        self.start()
        done = threading.Event()
        box: list[Any] = [None, None]
        self._jobs.put((fn, args, box, done))
        done.wait()
        if box[1] is not None:
            raise box[1]
        return box[0]

    def start(self) -> None:
        """Start the renderer thread and initialise virglrenderer on it (once); raise
        VirglUnavailable saying why it cannot, now and on every later call."""
        if self.error is not None:
            raise VirglUnavailable(self.error)
        if self._thread is not None:
            return
        with Renderer._owner_lock:
            if Renderer._active is not None and Renderer._active is not self:
                raise VirglUnavailable(
                    "virtio-gpu backend=virglrenderer: another virgl GPU already uses "
                    "virglrenderer in this process, which allows one per process (the "
                    "sandbox gives each GPU its own: drop --disable-sandbox, or use "
                    "backend=2d for the others)")
            Renderer._active = self
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name="virglrenderer", daemon=True)
        self._thread.start()
        ready.wait()
        if self.error is not None:
            raise VirglUnavailable(self.error)

    def _run(self, ready: threading.Event) -> None:
        try:
            self.lib = _initialise(self._cookie, self._cbs)
        except Exception as e:  # whatever it is, the caller waits on `ready`: say why
            self.error = str(e) if isinstance(e, VirglUnavailable) else (
                f"virtio-gpu backend=virglrenderer: initialising virglrenderer failed: "
                f"{type(e).__name__}: {e}")
            with Renderer._owner_lock:
                Renderer._active = None
            ready.set()
            return
        ready.set()
        while (job := self._jobs.get()) is not None:
            fn, args, box, done = job
            try:
                box[0] = fn(self.lib, *args)
            except BaseException as e:  # handed back to the caller
                box[1] = e
            done.set()
        self.lib.virgl_renderer_cleanup(self._cookie)
        Renderer._initialised_in = None

    def close(self) -> None:
        """Clean virglrenderer up (Mesa joins its threads) and stop the thread."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(30)
        self._thread = None
        with Renderer._owner_lock:
            if Renderer._active is self:
                Renderer._active = None

    # -- fences -------------------------------------------------------------------------------

    def fence(self, ctx_id: int, abort: threading.Event | None = None) -> bool:
        """Wait until the work submitted so far is done on the host GPU (a virglrenderer
        fence, polled); False after FENCE_TIMEOUT seconds, or once `abort` is set."""
        self._next_fence = self._next_fence % FENCE_SEQ_MAX + 1
        seq = self._next_fence
        if self.call(lambda lib: lib.virgl_renderer_create_fence(seq, ctx_id)) != 0:
            return False
        deadline = time.monotonic() + FENCE_TIMEOUT
        while True:
            self.call(lambda lib: lib.virgl_renderer_poll())
            if fence_reached(_fences.done, seq):
                return True
            if time.monotonic() > deadline or (abort is not None and abort.is_set()):
                return False
            time.sleep(0.0002)


def _initialise(cookie: Any, cbs: Any) -> Any:
    """dlopen and virgl_renderer_init (on the calling thread), or VirglUnavailable."""
    pid = os.getpid()
    if Renderer._initialised_in not in (None, pid):
        raise VirglUnavailable("virglrenderer was initialised in the parent process "
                               "before this one was forked; Mesa cannot run here")
    lib = _load()
    _check_egl()
    # No writable home in a jail: Mesa's on-disk shader cache would only fail.
    os.environ.setdefault("MESA_SHADER_CACHE_DISABLE", "true")
    _fences.done = 0
    ret = lib.virgl_renderer_init(cookie, VIRGL_RENDERER_USE_EGL
                                  | VIRGL_RENDERER_USE_SURFACELESS, cbs)
    if ret != 0:
        raise VirglUnavailable(
            f"virtio-gpu backend=virglrenderer: virgl_renderer_init failed ({ret}): "
            "no usable EGL/OpenGL driver (Mesa's libegl-mesa0 and libgl1-mesa-dri); "
            "use backend=2d")
    Renderer._initialised_in = pid
    return lib


def _check_egl() -> None:
    """Raise VirglUnavailable unless EGL opens a surfaceless display: virglrenderer
    0.10.4 crashes (SIGSEGV) when it cannot, e.g. when glvnd finds no vendor library
    (a jail without /usr/share/glvnd/egl_vendor.d, no libegl-mesa0)."""
    egl = _dlopen(egl_ffi, EGL_LIBRARY, "libegl1 and libegl-mesa0")
    display = egl.eglGetPlatformDisplay(EGL_PLATFORM_SURFACELESS_MESA, egl_ffi.NULL,
                                        egl_ffi.NULL)
    version = egl_ffi.new("int[2]")
    if display == egl_ffi.NULL or not egl.eglInitialize(display, version, version + 1):
        raise VirglUnavailable(
            f"virtio-gpu backend=virglrenderer: EGL has no surfaceless display (EGL "
            f"error {egl.eglGetError():#x}): no EGL vendor library was found or it "
            "failed (glvnd's egl_vendor.d, Debian's libegl-mesa0); use backend=2d")
    egl.eglTerminate(display)


def capset_info(lib: Any, capset_id: int) -> tuple[int, int]:
    """(max_version, max_size) of a capset; (0, 0) when virglrenderer lacks it."""
    out = ffi.new("uint32_t[2]")
    lib.virgl_renderer_get_cap_set(capset_id, out, out + 1)
    return int(out[0]), int(out[1])


def require_virgl_capset(lib: Any) -> None:
    """Raise VirglUnavailable unless virglrenderer serves the virgl capset: without it
    a guest's Mesa has nothing to render with."""
    if capset_info(lib, CAPSET_VIRGL) == (0, 0):
        raise VirglUnavailable("virtio-gpu backend=virglrenderer: virglrenderer has no "
                               "virgl capset")


# -- the start-up check ----------------------------------------------------------------------


def check_virglrenderer(env: dict[str, str] | None = None, timeout: float = 60) -> None:
    """Raise VirglUnavailable (one line, saying why) unless virglrenderer initialises
    on this host.

    The probe runs in a separate process: initialising Mesa here, in the main process
    before the device processes fork, would leave them with its dead threads. The
    device initialises it again where it runs (VirglGpu.on_device_sandboxed: what its
    jail lacks); this check is kept because a driver that crashes is contained here
    with its stderr and advice, even with --disable-sandbox, where the device's own
    start would take the VMM down with it.
    """
    try:
        proc = subprocess.run([sys.executable, "-c",
                               "from vmm_virtio_gpu.virgl import _probe; _probe()"],
                              capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        raise VirglUnavailable(f"virtio-gpu backend=virglrenderer: initialising "
                               f"virglrenderer took over {timeout:.0f}s; use backend=2d") \
            from None
    if proc.returncode == 0:
        return
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if lines:
        raise VirglUnavailable(lines[-1])
    died = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
            else f"exited with status {proc.returncode}")
    said = " ".join(proc.stderr.split()[-12:])
    raise VirglUnavailable(
        f"virtio-gpu backend=virglrenderer: initialising virglrenderer {died}"
        f"{' (' + said + ')' if said else ''}; is an EGL driver (Debian: libegl-mesa0, "
        "libgl1-mesa-dri) installed? use backend=2d")


def _probe() -> None:
    """The probe process: initialise virglrenderer, print why not (exit 1) or exit 0."""
    cookie = ffi.new("int *")
    cbs = ffi.new("struct virgl_renderer_callbacks *",
                  {"version": 1, "write_fence": _WRITE_FENCE})
    try:
        require_virgl_capset(_initialise(cookie, cbs))
    except VirglUnavailable as e:
        print(e, flush=True)
        os._exit(1)
    os._exit(0)


def sandbox_paths() -> list[tuple[str, bool]]:
    """What Mesa reads when it initialises in the jail, as read-only binds: the multiarch
    library directory (libvirglrenderer, libepoxy, libEGL, libEGL_mesa, the DRI driver,
    LLVM), glvnd's EGL vendor lists and Mesa's driver configuration."""
    multiarch = getattr(sys.implementation, "_multiarch", "x86_64-linux-gnu")
    candidates = [f"/usr/lib/{multiarch}", "/usr/share/glvnd/egl_vendor.d",
                  "/etc/glvnd/egl_vendor.d", "/usr/share/drirc.d"]
    return [(path, False) for path in candidates if os.path.isdir(path)]
