"""The jail a device process puts itself in (crosvm/minijail's, by hand over ctypes).

Two steps, because a new PID namespace only applies to children:

  outer(cfg)   in the first child (the "keeper"): a new session, no core dumps, then
               unshare(user when not root, mount, pid, net, ipc). The keeper then forks
               the device process, which is PID 1 of the new namespace, and only waits.
  enter(cfg)   in the device process, after the device model was built (so it could
               open its files) and every module it will use is imported:
               1. mounts: everything private; a small tmpfs becomes the root through
                  pivot_root (the old root is detached), holding only what the plugin
                  declared as bind mounts (read-only unless writable);
               2. rlimits: RLIMIT_NOFILE, RLIMIT_DATA (guest RAM is a shared mapping of
                  a memfd and is not counted), RLIMIT_CORE 0;
               3. every capability dropped: bounding set, ambient set, then capset to
                  empty effective/permitted/inheritable sets;
               4. no_new_privs;
               5. the seccomp filter, last (see vmmcore.sandbox.policy).

After enter() the process has no file system to speak of: Python must not import or
open anything. preload() imports the modules a device process needs beforehand; a
plugin adds its own (JailConfig.preload).

Root or not: as root the namespaces are created directly (real root, then every
capability dropped); otherwise a user namespace maps the caller's uid/gid to 0 inside,
which makes the other namespaces, the mounts and pivot_root possible without privileges.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import resource
import signal
from dataclasses import dataclass, field

from vmmcore.sandbox.policy import CompiledPolicy

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_PIVOT_ROOT = 155
SYS_CAPSET = 126
SYS_CAPGET = 125
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

#: Modules every device process uses after the jail is closed (imported before it).
PRELOAD = (
    "json", "struct", "select", "socket", "threading", "logging", "traceback",
    "linecache", "contextlib", "errno", "queue", "time", "collections", "functools",
    "encodings.ascii", "encodings.utf_8", "encodings.latin_1", "encodings.idna",
    "vmmcore.errors", "vmmcore.eventfd", "vmmcore.memory", "vmmcore.interrupts",
    "vmmcore.pci.config_space", "vmmcore.pci.device", "vmmcore.pci.msix",
    "vmmcore.pci.intx", "vmmcore.pci.irq", "vmmcore.virtio", "vmmcore.virtio.device",
    "vmmcore.virtio.queue", "vmmcore.virtio.descriptor_utils",
    "vmmcore.virtio.pci_transport", "vmmcore.virtio.status",
    "vmmcore.sandbox.protocol", "vmmcore.sandbox.child_proc",
)


class JailError(OSError):
    """A jail step failed; the message says which."""


@dataclass
class JailConfig:
    """How a device process is confined. JailConfig(enabled=False): a plain child."""

    enabled: bool = True
    #: None: a user namespace exactly when not root. True/False to force.
    user_namespace: bool | None = None
    namespaces: bool = True          # mount, pid, net, ipc
    pivot_root: bool = True
    #: (host path, path inside the jail, writable) bind mounts the plugin declares.
    binds: list[tuple[str, str, bool]] = field(default_factory=list)
    rlimit_nofile: int = 1024
    #: Private writable memory (heap, thread stacks); guest RAM is not counted.
    rlimit_data: int | None = 2 << 30
    drop_caps: bool = True
    no_new_privs: bool = True
    #: The seccomp filter (None: no seccomp, e.g. --disable-sandbox style tests).
    seccomp: CompiledPolicy | None = None
    #: More modules to import before the jail closes (the plugin's lazy imports).
    preload: tuple[str, ...] = ()
    #: Size of the tmpfs that becomes the root.
    tmpfs_size: str = "64k"
    #: Forbidden calls go to a seccomp listener (the keeper) that names them and kills
    #: the device with SIGSYS, instead of the kernel killing it outright.
    seccomp_listener: bool = True

    def wants_user_namespace(self) -> bool:
        if self.user_namespace is not None:
            return self.user_namespace
        return os.geteuid() != 0


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(err, f"jail: {what}: {os.strerror(err)}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                      ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    if ret < 0:
        err = ctypes.get_errno()
        raise JailError(err, f"prctl({option}): {os.strerror(err)}")
    return ret


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def fork_frozen() -> int:
    """os.fork(), with every object that exists now frozen (gc.freeze) in the child.

    A device process closes the fds it does not keep and then opens its own, which
    reuse those numbers. An object inherited from the parent that owns one of the old
    numbers (a file or socket in a reference cycle, waiting for the collector) would,
    if the child's cyclic GC collected it, close whatever the child opened under that
    number since. Frozen objects are never collected. The parent unfreezes them again,
    unless something had frozen objects before (gc cannot unfreeze only some): then
    they all stay frozen, as that code wanted its own.
    """
    thaw = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        if thaw:
            gc.unfreeze()
        raise
    if pid and thaw:
        gc.unfreeze()
    return pid


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def outer(cfg: JailConfig) -> None:
    """In the keeper: new session, no cores, then the namespaces (see module docstring)."""
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not cfg.enabled or not cfg.namespaces:
        return
    if cfg.wants_user_namespace():
        uid, gid = os.geteuid(), os.getegid()
        # A process that changed uid (root dropping to a user) is not dumpable, which
        # makes /proc/self/uid_map root's; the maps below need it to be ours.
        prctl(PR_SET_DUMPABLE, 1)
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1\n")
        _write("/proc/self/gid_map", f"0 {gid} 1\n")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC),
           "unshare(mount, pid, net, ipc)")


def preload(extra: tuple[str, ...] = ()) -> None:
    """Import what the device process needs before the file system disappears."""
    for name in (*PRELOAD, *extra):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Error paths format exceptions: make sure their machinery is loaded too.
    import traceback

    try:
        raise RuntimeError("preload")
    except RuntimeError:
        traceback.format_exc()


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None),
           f"mount {source or ''} on {target}")


def _bind(fd: int, target: str, writable: bool) -> None:
    import stat

    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    if not writable:
        try:
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
                   | MS_NODEV)
        except JailError:
            # A user namespace cannot clear flags it inherited as locked; keep them.
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
                   | MS_NODEV | MS_NOEXEC)


def _new_root(cfg: JailConfig) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    base = next((d for d in ("/tmp", "/mnt", "/run", "/var/tmp") if os.path.isdir(d)), None)
    if base is None:
        raise JailError(0, "jail: no directory to build the new root on")
    # Bind sources are opened first: the tmpfs may cover them (a source under /tmp).
    sources = []
    try:
        for src, dest, writable in cfg.binds:
            try:
                fd = os.open(src, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                raise JailError(e.errno, f"jail: bind mount source {src}: {e.strerror}") \
                    from None
            sources.append((fd, dest, writable))
        _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"size={cfg.tmpfs_size},mode=0755")
        for fd, dest, writable in sources:
            _bind(fd, base + "/" + dest.lstrip("/"), writable)
    finally:
        for fd, _, _ in sources:
            os.close(fd)
    os.chdir(base)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir("/")
    # The new root itself read-only (best effort: bind mounts keep their own flags).
    with contextlib.suppress(JailError):
        _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
               | MS_NOEXEC)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Empty bounding, ambient, effective, permitted and inheritable sets."""
    prctl(PR_SET_KEEPCAPS, 0)
    for cap in range(64):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except JailError:
            break                  # EINVAL past the last capability the kernel knows
    with contextlib.suppress(JailError):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_CAPGET, ctypes.byref(header), ctypes.byref(data)), "capget")
    return tuple(data[0].__getattribute__(f) | data[1].__getattribute__(f) << 32
                 for f in ("effective", "permitted", "inheritable"))  # type: ignore[return-value]


def set_rlimits(cfg: JailConfig) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg.rlimit_nofile, cfg.rlimit_nofile))
    if cfg.rlimit_data is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (cfg.rlimit_data, cfg.rlimit_data))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def enter(cfg: JailConfig, listener: bool = False) -> int | None:
    """Close the jail around the calling (single-threaded) device process. Seccomp last.

    With listener (and cfg.seccomp_listener), forbidden calls wait on a seccomp
    listener whose fd is returned (None if the kernel cannot): the caller must hand it
    to a process that serves it (the keeper), or forbidden calls block forever.
    """
    preload(cfg.preload)
    if cfg.enabled:
        if cfg.namespaces and cfg.pivot_root:
            _new_root(cfg)
        set_rlimits(cfg)
        if cfg.drop_caps:
            drop_capabilities()
    if cfg.no_new_privs or cfg.seccomp is not None:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    if cfg.seccomp is not None:
        return cfg.seccomp.load(listener=listener and cfg.seccomp_listener)
    return None
