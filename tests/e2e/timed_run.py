"""Run a command with a hard timeout, pass its output through, and time it.

    python3 tests/e2e/timed_run.py TIMEOUT -- ARGV...

Prints the command's stdout and stderr (merged) as they come, then one line
``E2E-VMM-TIME: status=N elapsed=S to_init=S`` (status ``timeout`` when killed, to_init
``none`` if the guest's ``E2E: init=`` marker never appeared). The command runs in its own
process group, all of which is killed at the timeout. The harness uses this around
`vmm run`, on this host or inside the level-1 host, so both report the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time

INIT_MARKER = b"E2E: init="


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    timeout = float(sys.argv[1])
    argv = sys.argv[3:]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    tail, to_init, killed, grace = b"", None, False, None
    out = sys.stdout.buffer
    while True:
        now = time.monotonic()
        left = t0 + timeout - now
        if left <= 0:
            killed = True
            break
        if grace is None and proc.poll() is not None:
            grace = now + 2.0   # it exited: drain what a leftover child still writes, briefly
        if grace is not None and now >= grace:
            break
        if not sel.select(timeout=min(left, 0.5)):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        out.write(chunk)
        out.flush()
        if to_init is None:
            tail = (tail + chunk)[-4096:]
            if INIT_MARKER in tail:
                to_init = time.monotonic() - t0
    if killed:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out.write(f"\n[timed_run: killed after {timeout:.0f} s]\n".encode())
    status: int | str = proc.wait()
    if killed:
        status = "timeout"
    elapsed = time.monotonic() - t0
    # A device process left behind in the group must not outlive the run.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    init = "none" if to_init is None else f"{to_init:.3f}"
    out.write(f"\nE2E-VMM-TIME: status={status} elapsed={elapsed:.3f} to_init={init}\n".encode())
    out.flush()
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
