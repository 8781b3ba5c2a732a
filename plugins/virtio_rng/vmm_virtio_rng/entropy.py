"""The device side of virtio-rng that needs no virtio transport: a rate-limited source.

A virtio-rng request is one device-writable buffer; the device fills as much of it as
the source and the rate limit allow and reports the length written.  The virtqueue code
(a later issue) calls :meth:`EntropySource.read` for each request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


class EntropySource:
    """Reads random bytes from a host file, at most ``rate`` bytes/s (0: unlimited)."""

    def __init__(self, path: str | os.PathLike[str], rate: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._rate = rate
        self._clock = clock
        self._tokens = float(rate)          # allow one second's worth at once
        self._last = clock()

    def read(self, max_len: int) -> bytes:
        """Up to ``max_len`` bytes; fewer (possibly none) when the rate limit is hit."""
        if max_len <= 0:
            return b""
        n = max_len
        if self._rate:
            now = self._clock()
            self._tokens = min(float(self._rate), self._tokens + (now - self._last) * self._rate)
            self._last = now
            n = min(n, int(self._tokens))
            if n <= 0:
                return b""
        data = os.read(self._fd, n)
        if self._rate:
            self._tokens -= len(data)
        return data

    def fileno(self) -> int:
        """The source's fd (a sandboxed device process must keep it open)."""
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EntropySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
