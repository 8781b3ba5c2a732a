"""The raw disk format: the file (or block device) is the disk, byte for byte.

Data moves with os.preadv/os.pwritev straight between the image and the caller's
memoryviews (slices of guest memory), split into batches of at most IOV_MAX buffers and
looped on short transfers. Reading past the end of a file that is shorter than the disk
(truncated behind our back) gives zeroes. Every method is safe to call from several
threads at once: positional I/O needs no shared file offset, and the only mutable state
(the size, changed by resize) is guarded by a lock.

discard punches a hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); write_zeroes uses
FALLOC_FL_ZERO_RANGE (or a punched hole when the caller allows unmapping) and falls back
to writing zeroes where the file system supports neither.

direct=true opens the image with O_DIRECT. O_DIRECT needs aligned memory, offsets and
lengths: guest buffers that are not aligned go through an aligned bounce buffer (an
anonymous mmap, page aligned), and a transfer whose offset or length is not aligned (or
that the kernel refuses with EINVAL) goes through a second, buffered descriptor of the
same file, which the kernel keeps coherent with the direct one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
from pathlib import Path

from vmmcore.disk import (
    Buffers,
    DiskCapabilities,
    DiskError,
    DiskFile,
    DiskFormat,
    DiskOpener,
    FileExtent,
)

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: Alignment tried first for O_DIRECT transfers (memory address, file offset and length):
#: the logical block size of most devices. After an EINVAL the disk switches to
#: DIRECT_ALIGN (4 KiB-sector devices, file systems that want page alignment).
MIN_DIRECT_ALIGN = 512
DIRECT_ALIGN = 4096
#: Largest bounce buffer / zero-fill chunk.
CHUNK = 1 << 20

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    IOV_MAX = 1024
if IOV_MAX <= 0:
    IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _nbytes(bufs: Buffers) -> int:
    return sum(memoryview(b).nbytes for b in bufs)


def _as_bytes(bufs: Buffers) -> list[memoryview]:
    """Byte-format, non-empty views of bufs (preadv/pwritev want flat byte buffers)."""
    out = []
    for b in bufs:
        v = memoryview(b)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        if v.nbytes:
            out.append(v)
    return out


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """views without their first n bytes (after a short transfer)."""
    out = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def _address(view: memoryview) -> int:
    """The address of a writable or read-only byte view (for alignment checks)."""
    if view.readonly:
        return 1  # no address without a writable export: treat as unaligned (bounce)
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class RawDisk(DiskFile):
    """An open raw image (a regular file or a block device)."""

    format_name = "raw"

    def __init__(self, path: Path, read_only: bool, direct: bool = False) -> None:
        super().__init__(path, read_only)
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags)
        except OSError as e:
            mode = "read-only" if read_only else "read-write"
            raise DiskError(f"cannot open raw disk image {path} {mode}: {e.strerror}") from None
        self._dfd = -1
        self._align = MIN_DIRECT_ALIGN
        self._lock = threading.Lock()
        self._closed = False
        try:
            st = os.fstat(self._fd)
            self._is_block = stat.S_ISBLK(st.st_mode)
            if not (stat.S_ISREG(st.st_mode) or self._is_block):
                raise DiskError(f"raw disk image {path} is neither a regular file nor a "
                                "block device")
            self._size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
            if direct:
                try:
                    self._dfd = os.open(path, flags | os.O_DIRECT)
                except OSError as e:
                    raise DiskError(f"cannot open raw disk image {path} with O_DIRECT "
                                    f"(direct=true): {e.strerror}") from None
        except BaseException:
            self._close_fds()
            raise
        self._warned: set[str] = set()

    # -- facts -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> DiskCapabilities:
        writable = not self.read_only
        return DiskCapabilities(discard=writable, write_zeroes=writable,
                                resize=writable and not self._is_block,
                                sparse=not self._is_block)

    def fds(self) -> list[int]:
        return [fd for fd in (self._fd, self._dfd) if fd >= 0]

    def file_extent(self) -> FileExtent | None:
        """The whole file is the disk: a native data plane may do our preadv/pwritev,
        fdatasync and fallocate calls itself (plugin API 1.2)."""
        if self._closed:
            return None
        return FileExtent(fd=self._fd, offset=0, direct_fd=self._dfd,
                          block_device=self._is_block)

    def info(self) -> dict[str, object]:
        out = super().info()
        out["direct"] = self.direct
        out["read_only"] = self.read_only
        if not self._is_block:
            with contextlib.suppress(OSError):
                out["disk_size"] = os.fstat(self._fd).st_blocks * 512
        return out

    # -- data ----------------------------------------------------------------------------

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise DiskError(f"raw disk image {self.path} is closed")
        if write and self.read_only:
            raise DiskError(f"raw disk image {self.path} is read-only")
        self.check_range(offset, length)

    def read_into(self, offset: int, bufs: Buffers) -> int:
        views = _as_bytes(bufs)
        total = _nbytes(views)
        self._check(offset, total, write=False)
        if self._dfd >= 0:
            self._direct_io(offset, views, total, write=False)
        else:
            self._preadv(self._fd, offset, views)
        return total

    def write_from(self, offset: int, bufs: Buffers) -> int:
        views = _as_bytes(bufs)
        total = _nbytes(views)
        self._check(offset, total, write=True)
        if self._dfd >= 0:
            self._direct_io(offset, views, total, write=True)
        else:
            self._pwritev(self._fd, offset, views)
        return total

    def _preadv(self, fd: int, offset: int, views: list[memoryview]) -> None:
        """Fill every view from offset; zeroes past the end of the file."""
        while views:
            batch = views[:IOV_MAX]
            want = _nbytes(batch)
            try:
                n = os.preadv(fd, batch, offset)
            except InterruptedError:
                continue
            except OSError as e:
                raise _error(f"raw disk image {self.path}: read at {offset} failed: "
                             f"{e.strerror}", e.errno) from None
            if n == 0:  # end of file: the rest reads as zeroes
                for v in views:
                    v[:] = bytes(v.nbytes)
                return
            offset += n
            views = _advance(views, n) if n < want else views[len(batch):]

    def _pwritev(self, fd: int, offset: int, views: list[memoryview]) -> None:
        while views:
            batch = views[:IOV_MAX]
            want = _nbytes(batch)
            try:
                n = os.pwritev(fd, batch, offset)
            except InterruptedError:
                continue
            except OSError as e:
                raise _error(f"raw disk image {self.path}: write at {offset} failed: "
                             f"{e.strerror}", e.errno) from None
            if n <= 0:
                raise DiskError(f"raw disk image {self.path}: write at {offset} made no "
                                "progress")
            offset += n
            views = _advance(views, n) if n < want else views[len(batch):]

    # -- O_DIRECT ------------------------------------------------------------------------

    def _direct_io(self, offset: int, views: list[memoryview], total: int,
                   write: bool) -> None:
        a = self._align
        if offset % a or total % a:
            # The kernel would refuse it: the buffered descriptor serves this one.
            self._buffered(offset, views, write)
            return
        if all(v.nbytes % a == 0 and _address(v) % a == 0 for v in views):
            try:
                if write:
                    self._pwritev(self._dfd, offset, views)
                else:
                    self._preadv(self._dfd, offset, views)
                return
            except DiskError as e:
                if getattr(e, "errno", None) == errno.EINVAL and a < DIRECT_ALIGN:
                    self._align = DIRECT_ALIGN
                    log.info("raw disk image %s: O_DIRECT needs %d-byte alignment",
                             self.path, DIRECT_ALIGN)
                    self._direct_io(offset, views, total, write)
                    return
            # another refusal (or a real error): the buffered descriptor decides
            self._buffered(offset, views, write)
            return
        self._bounce(offset, views, total, write)

    def _buffered(self, offset: int, views: list[memoryview], write: bool) -> None:
        if write:
            self._pwritev(self._fd, offset, views)
        else:
            self._preadv(self._fd, offset, views)

    def _bounce(self, offset: int, views: list[memoryview], total: int, write: bool) -> None:
        """Move unaligned guest buffers through a page-aligned buffer, CHUNK at a time."""
        size = min(total, CHUNK)
        buf = mmap.mmap(-1, size)
        try:
            whole = memoryview(buf)
            try:
                pending = views
                done = 0
                while done < total:
                    n = min(size, total - done)
                    chunk = whole[:n]
                    if write:
                        pos = 0
                        for v in _take(pending, n):
                            chunk[pos:pos + v.nbytes] = v
                            pos += v.nbytes
                        self._direct_or_buffered(offset + done, [chunk], write=True)
                    else:
                        self._direct_or_buffered(offset + done, [chunk], write=False)
                        pos = 0
                        for v in _take(pending, n):
                            v[:] = chunk[pos:pos + v.nbytes]
                            pos += v.nbytes
                    pending = _advance(pending, n)
                    done += n
                    chunk.release()
            finally:
                whole.release()
        finally:
            buf.close()

    def _direct_or_buffered(self, offset: int, views: list[memoryview], write: bool) -> None:
        try:
            if write:
                self._pwritev(self._dfd, offset, views)
            else:
                self._preadv(self._dfd, offset, views)
        except DiskError:
            self._buffered(offset, views, write)

    # -- flush, discard, zeroes, resize --------------------------------------------------

    def flush(self) -> None:
        if self._closed or self.read_only:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise DiskError(f"raw disk image {self.path}: flush (fdatasync) failed: "
                            f"{e.strerror}") from None

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole; a file system that cannot is silently left as it is (advisory)."""
        self._check(offset, length, write=True)
        if not length:
            return
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self._warn_once("discard", f"raw disk image {self.path}: the file system "
                                f"cannot punch holes ({e.strerror}); discard ignored")
                return
            raise DiskError(f"raw disk image {self.path}: discard {offset}+{length} "
                            f"failed: {e.strerror}") from None

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check(offset, length, write=True)
        if not length:
            return
        modes = []
        if may_unmap and not self._is_block:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise DiskError(f"raw disk image {self.path}: write-zeroes "
                                    f"{offset}+{length} failed: {e.strerror}") from None
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeroes = memoryview(bytes(min(length, CHUNK)))
        end = offset + length
        while offset < end:
            n = min(CHUNK, end - offset)
            self._pwritev(self._fd, offset, [zeroes[:n]])
            offset += n

    def resize(self, new_size: int) -> None:
        if self.read_only:
            raise DiskError(f"raw disk image {self.path} is read-only: cannot resize")
        if self._is_block:
            raise DiskError(f"raw disk {self.path} is a block device: cannot resize")
        if new_size < 0:
            raise DiskError(f"raw disk image {self.path}: invalid size {new_size}")
        with self._lock:
            try:
                os.ftruncate(self._fd, new_size)
            except OSError as e:
                raise DiskError(f"raw disk image {self.path}: resize to {new_size} "
                                f"failed: {e.strerror}") from None
            self._size = new_size

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if not self.read_only:
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_dfd", "_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


def _error(message: str, err: int | None) -> DiskError:
    """A DiskError that remembers the errno behind it."""
    e = DiskError(message)
    e.errno = err  # type: ignore[attr-defined]
    return e


def _take(views: list[memoryview], n: int) -> list[memoryview]:
    """The first n bytes of views, as views."""
    out = []
    for v in views:
        if n <= 0:
            break
        part = v[:n] if v.nbytes > n else v
        out.append(part)
        n -= part.nbytes
    return out


class RawFormat(DiskFormat):
    """The raw format plugin's factory (PluginSpec.factory names this class)."""

    name = "raw"

    def open(self, path: Path, *, read_only: bool, opener: DiskOpener | None = None,
             direct: bool = False) -> RawDisk:
        return RawDisk(Path(path), read_only=read_only, direct=direct)

    def create(self, path: Path, size: int, **options: object) -> None:
        if options:
            raise DiskError(f"raw images take no options (got {', '.join(options)})")
        if size < 0:
            raise DiskError(f"invalid size {size} for raw image {path}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DiskError(f"cannot create raw image {path}: {e.strerror}") from None
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise DiskError(f"cannot size raw image {path} to {size}: {e.strerror}") from None
        finally:
            os.close(fd)
