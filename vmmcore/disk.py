"""The disk-format plugin API: what virtio-blk (and `vmm disk ...`) sees of a disk image.

A disk-format plugin (entry-point group ``vmm.disk_formats``) has a PluginSpec whose
``factory`` names a :class:`DiskFormat` subclass and whose ``magic`` holds the bytes that
identify the format at offset 0 (``b"QFI\\xfb"`` for qcow2; raw has none and is the
fallback). :func:`open_disk` picks the format (explicit ``format=`` or detection),
opens the file and returns a :class:`DiskFile`.

Data moves straight between the image and guest memory: read_into/write_from take lists
of memoryviews (zero-copy slices of GuestMemory, as a descriptor chain yields them), so a
raw image is a single preadv/pwritev. A format whose image is a straight byte range of
one file (raw) also says so through :meth:`DiskFile.file_extent` (plugin API 1.2), so a
device with a native data plane can do that I/O itself, outside Python. Disk images are hostile input: a format raises
:class:`DiskError` with a message naming the problem, never a bare traceback, and never
writes outside its own file.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmmcore.errors import VmmError

Buffers = Sequence[memoryview]


class DiskError(VmmError):
    """A disk image is unusable, corrupt, or an operation on it failed."""


class DiskUnsupported(DiskError):
    """The format (or this image) cannot do the requested operation (discard, resize...)."""


@dataclass(frozen=True)
class DiskCapabilities:
    """What a DiskFile supports, so virtio-blk offers only the matching feature bits."""

    discard: bool = False
    write_zeroes: bool = False
    resize: bool = False
    sparse: bool = False            # holes read as zeroes without occupying space


@dataclass(frozen=True)
class FileExtent:
    """The virtual disk is bytes [offset, offset + size) of one open file, unchanged.

    Returned by :meth:`DiskFile.file_extent` (plugin API 1.2) for a format whose every
    operation is plain positional I/O on that file, so that a device may do it itself
    (virtio-blk's native engine does): read = preadv (zeroes past the end of the file),
    write = pwritev, flush = fdatasync(fd), discard = fallocate(PUNCH_HOLE|KEEP_SIZE),
    write-zeroes = fallocate(ZERO_RANGE) or written zeroes. The descriptors stay owned
    by the DiskFile and valid until its close(); the user must not close them.
    """

    fd: int                     #: the image, opened read-only or read-write like the disk
    offset: int = 0             #: file offset of the disk's byte 0
    direct_fd: int = -1         #: the same file opened O_DIRECT (direct=true), or -1
    block_device: bool = False  #: a block device: no hole punching for write-zeroes


class DiskFile(abc.ABC):
    """An open disk image. Thread-safe: virtio-blk serves requests from a thread pool."""

    #: the format's name, as in ``format=`` and `vmm disk info`
    format_name: str = ""

    def __init__(self, path: Path, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The virtual disk size in bytes (what the guest sees)."""

    @abc.abstractmethod
    def read_into(self, offset: int, bufs: Buffers) -> int:
        """Fill bufs from the disk at offset; returns bytes read. Holes read as zeroes.

        [offset, offset + total) must lie inside the disk: a request past the end raises
        DiskError (virtio-blk checks first and answers IOERR).
        """

    @abc.abstractmethod
    def write_from(self, offset: int, bufs: Buffers) -> int:
        """Write bufs to the disk at offset; returns bytes written. DiskError if read-only."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (fdatasync, metadata included for qcow2)."""

    def capabilities(self) -> DiskCapabilities:
        return DiskCapabilities()

    def discard(self, offset: int, length: int) -> None:
        """Tell the image [offset, offset+length) is unused (may read back as anything)."""
        raise DiskUnsupported(f"{self.format_name} image {self.path}: discard not supported")

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeroes (unmapping it when may_unmap)."""
        raise DiskUnsupported(f"{self.format_name} image {self.path}: write-zeroes not supported")

    def resize(self, new_size: int) -> None:
        """Grow (or shrink) the virtual disk."""
        raise DiskUnsupported(f"{self.format_name} image {self.path}: resize not supported")

    def file_extent(self) -> FileExtent | None:
        """Where the disk lies in one file, if every operation is positional I/O on it.

        None (the default) means "go through read_into/write_from/...": compressed,
        allocated or layered formats (qcow2) keep their own I/O path. Plugin API 1.2.
        """
        return None

    def fds(self) -> list[int]:
        """File descriptors this image uses (a sandboxed device process must keep them)."""
        return []

    def info(self) -> dict[str, object]:
        """Facts for `vmm disk info` (format, virtual size, and format-specific keys)."""
        return {"format": self.format_name, "virtual_size": self.size, "path": str(self.path)}

    @abc.abstractmethod
    def close(self) -> None:
        """Flush what must be flushed and close the file(s)."""

    def __enter__(self) -> DiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_range(self, offset: int, length: int) -> None:
        """Raise DiskError unless [offset, offset+length) lies inside the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(f"{self.path}: access {offset}+{length} is outside the "
                            f"{self.size}-byte disk")


#: open(path, format=None, read_only=...) -> DiskFile, for backing files of any format.
DiskOpener = Callable[..., DiskFile]


class DiskFormat(abc.ABC):
    """A disk-format plugin's factory object (PluginSpec.factory points at the class)."""

    name: str = ""

    @abc.abstractmethod
    def open(self, path: Path, *, read_only: bool, opener: DiskOpener) -> DiskFile:
        """Open an existing image; opener opens backing files (any registered format).

        A format that can bypass the host page cache also accepts ``direct: bool = False``
        (O_DIRECT); open_disk passes it only when direct=True was asked for.
        """

    def create(self, path: Path, size: int, **options: object) -> None:
        """Create a new image of size bytes (qcow2: backing_file, cluster_size, ...)."""
        raise DiskUnsupported(f"cannot create {self.name} images")


def _formats() -> dict[str, tuple[bytes | None, type[DiskFormat] | DiskFormat]]:
    """Installed disk formats: name -> (magic, factory), from the plugin registry."""
    from vmmcore.plugin_api import load_factory
    from vmmcore.registry import get_registry

    registry = get_registry()
    out = {}
    for name in registry.names("disk_format"):
        record = registry.get("disk_format", name)
        spec = getattr(record, "spec", None)
        if spec is None or not spec.implemented:
            continue
        out[spec.name] = (spec.magic, load_factory(spec))
    return out


def _instance(factory: type[DiskFormat] | DiskFormat) -> DiskFormat:
    return factory() if isinstance(factory, type) else factory


def detect_format(path: Path, formats: dict | None = None) -> str:
    """The format whose magic the file starts with; "raw" when none matches."""
    formats = _formats() if formats is None else formats
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise DiskError(f"cannot open disk image {path}: {e.strerror}") from None
    for name, (magic, _factory) in formats.items():
        if magic and head.startswith(magic):
            return name
    if "raw" not in formats:
        raise DiskError(f"{path}: no installed disk format recognises it (raw is not installed)")
    return "raw"


def open_disk(path: str | os.PathLike[str], format: str | None = None, *,
              read_only: bool = False, direct: bool = False, _depth: int = 0) -> DiskFile:
    """Open a disk image with its format plugin (detected when format is None).

    direct=True asks for O_DIRECT; a format whose open() takes no ``direct`` keyword
    refuses it with a DiskError. _depth bounds backing chains, so a chain that loops back
    on itself is an error, not a recursion crash.
    """
    if _depth > MAX_BACKING_DEPTH:
        raise DiskError(f"{path}: backing chain deeper than {MAX_BACKING_DEPTH} "
                        "(a loop?)")
    from vmmcore.registry import note_plugin_use

    path = Path(path)
    formats = _formats()
    name = format or detect_format(path, formats)
    if name not in formats:
        known = ", ".join(sorted(formats)) or "none"
        raise DiskError(f"{path}: unknown disk format {name!r} (installed: {known})")

    def opener(p: str | os.PathLike[str], format: str | None = None, *,
               read_only: bool = True) -> DiskFile:
        return open_disk(p, format, read_only=read_only, _depth=_depth + 1)

    note_plugin_use("disk_format", name)      # its policy joins the device's jail
    fmt = _instance(formats[name][1])
    if direct:
        if not _accepts_keyword(fmt.open, "direct"):
            raise DiskError(f"{path}: the {name} disk format does not support direct=true "
                            "(O_DIRECT)")
        return fmt.open(path, read_only=read_only, opener=opener, direct=True)
    return fmt.open(path, read_only=read_only, opener=opener)


def _accepts_keyword(func: Callable[..., object], name: str) -> bool:
    """Whether func takes keyword argument `name` (explicitly or through **kwargs)."""
    import inspect

    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               or p.kind == p.VAR_KEYWORD for p in params)


MAX_BACKING_DEPTH = 64
