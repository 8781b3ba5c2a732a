"""--serial: crosvm's serial port syntax, the host ends of the ports, and the COM ports
the VM builder maps.

Syntax (one --serial per port, keys in any order, crosvm style)::

    --serial type=TYPE[,path=PATH][,input=PATH][,num=1..4][,console[=true|false]]
             [,stdin[=true|false]][,earlycon[=true|false]][,hardware=serial]

    type      stdout | stderr   guest output to our stdout / stderr
              file              output to path= (created, truncated like crosvm)
              unix              a two-way channel over a unix *stream* socket that
                                already listens at path= (output to it, input from it;
                                crosvm's type=unix is a datagram socket, ours is a
                                stream one, and unix-stream is accepted as a synonym)
              sink              output discarded
              syslog            output to syslog(3), one message per line
    path      the file or socket for type=file / type=unix (required there, refused
              elsewhere)
    input     a file whose bytes are the port's input (read once, to its end)
    num       1..4 = COM1..COM4 at layout.SERIAL_PORTS, IRQs layout.SERIAL_IRQS; default 1
    console   this port is the kernel console (console=ttyS<num-1> on the command line)
    stdin     our stdin is this port's input. Default: the first type=stdout port takes
              stdin when stdin is a terminal and no port asked for it explicitly (as
              crosvm). While the VM runs that terminal is in raw mode (Ctrl-C goes to the
              guest); it is always restored. Ctrl-A x stops the VMM, Ctrl-A Ctrl-A sends
              one Ctrl-A.
    earlycon  also put earlycon=uart8250,io,<port> on the kernel command line
    hardware  only "serial" (the 16550A); crosvm's virtio-console is not supported

No output backend ever blocks a vCPU: stdout, stderr and file output go through a
bounded buffer that a writer thread drains (BufferedFdBackend), and type=unix sends
without waiting; when the host end stops taking output (a paused pager, a peer that
does not read), what does not fit is dropped, as a UART without flow control loses
what nobody reads, and a warning says so once per stall.

With no --serial at all, COM1 is the console on stdout (default_serial_parameters());
so it is whenever COM1 is not given and no port is the console (crosvm's rule). Like
crosvm, the other ports not given are still created, as sinks, so all four COM ports
exist.

The VM builder calls::

    create_serial_devices(specs, interrupts_for, stack=None, *, start_input=True,
                          stdin_isatty=None, on_escape=None) -> SerialDevices

which validates everything (ConfigError, one line), opens every backend, creates one
Serial per port (interrupts_for(irq) gives its Interrupt) and returns a SerialDevices:
a list of (port, Serial) tuples to insert on the IO bus with length 8. With
start_input=True the input threads start (and the terminal goes raw) at once; a builder
that still has to fork device processes passes start_input=False and calls
devices.start_input() after the forks. devices.close() (registered on `stack` when one
is given) stops the threads, restores the terminal and closes the backends.
devices.kernel_params() gives the console=/earlycon= parameters the specs asked for.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import signal
import socket
import termios
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from vmmcore.arch.x86_64 import layout
from vmmcore.devices.serial import Serial
from vmmcore.errors import ConfigError
from vmmcore.interrupts import Interrupt

log = logging.getLogger(__name__)

SERIAL_TYPES = ("stdout", "stderr", "file", "unix", "unix-stream", "sink", "syslog")
PATH_TYPES = ("file", "unix", "unix-stream")
VALID_KEYS = ("type", "path", "input", "num", "console", "stdin", "earlycon", "hardware")
FLAG_KEYS = ("console", "stdin", "earlycon")
HARDWARE = ("serial",)
NUM_PORTS = len(layout.SERIAL_PORTS)

CTRL_A = 0x01
READ_CHUNK = 4096


@dataclass(frozen=True)
class SerialParameters:
    """One serial port as --serial described it (see the module docstring)."""

    type: str = "sink"
    path: Path | None = None
    input: Path | None = None
    num: int = 1
    console: bool = False
    stdin: bool | None = None       # None: decided by resolve_serial_parameters()
    earlycon: bool = False

    @property
    def port(self) -> int:
        return layout.SERIAL_PORTS[self.num - 1]

    @property
    def irq(self) -> int:
        return layout.SERIAL_IRQS[self.port]

    @property
    def tty(self) -> str:
        """The guest's name for this port."""
        return f"ttyS{self.num - 1}"


def _bad(spec: str, message: str) -> ConfigError:
    return ConfigError(f"--serial {spec!r}: {message}")


def _parse_bool(spec: str, key: str, value: str) -> bool:
    v = value.lower()
    if v == "true":
        return True
    if v == "false":
        return False
    raise _bad(spec, f"invalid {key} {value!r} (valid: true, false)")


def parse_serial_spec(spec: str) -> SerialParameters:
    """Parse one --serial value; raises ConfigError naming the bad key or value."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--serial: empty spec (expected type=stdout|stderr|file|unix|"
                          "sink|syslog[,path=P][,num=1..4][,console][,stdin])")
    seen: dict[str, str | None] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise _bad(spec, "empty option between commas")
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if key not in VALID_KEYS:
            raise _bad(spec, f"unknown key {key!r} (valid keys: {', '.join(VALID_KEYS)})")
        if key in seen:
            raise _bad(spec, f"key {key!r} given twice")
        if not sep:
            if key not in FLAG_KEYS:
                raise _bad(spec, f"key {key!r} needs a value ({key}=...)")
            seen[key] = None
        else:
            seen[key] = value.strip()

    fields: dict[str, object] = {}
    if "type" not in seen:
        raise _bad(spec, f"missing type= (valid types: {', '.join(SERIAL_TYPES)})")
    type_ = (seen["type"] or "").lower()
    if type_ not in SERIAL_TYPES:
        raise _bad(spec, f"invalid type {seen['type']!r} (valid types: "
                         f"{', '.join(SERIAL_TYPES)})")
    fields["type"] = "unix" if type_ == "unix-stream" else type_

    for key in ("path", "input"):
        if key in seen:
            if not seen[key]:
                raise _bad(spec, f"{key}= is empty (expected a file path)")
            fields[key] = Path(seen[key])  # type: ignore[arg-type]
    if type_ in PATH_TYPES and "path" not in fields:
        raise _bad(spec, f"type={type_} needs path=PATH")
    if type_ not in PATH_TYPES and "path" in fields:
        raise _bad(spec, f"path= is only valid with type={' or type='.join(PATH_TYPES)}, "
                         f"not type={type_} (use input= for an input file)")

    if "num" in seen:
        num = seen["num"] or ""
        valid = ", ".join(str(n) for n in range(1, NUM_PORTS + 1))
        if not num.isdigit() or not 1 <= int(num) <= NUM_PORTS:
            raise _bad(spec, f"invalid num {num!r} (valid: {valid}, for COM1..COM{NUM_PORTS})")
        fields["num"] = int(num)

    for key in FLAG_KEYS:
        if key in seen:
            value = seen[key]
            fields[key] = True if value is None else _parse_bool(spec, key, value)

    if "hardware" in seen:
        hw = (seen["hardware"] or "").lower()
        if hw not in HARDWARE:
            raise _bad(spec, f"invalid hardware {seen['hardware']!r} "
                             f"(valid: {', '.join(HARDWARE)})")
    return SerialParameters(**fields)  # type: ignore[arg-type]


def default_serial_parameters() -> SerialParameters:
    """What no --serial means: COM1 on stdout as the console (stdin decided later)."""
    return SerialParameters(type="stdout", num=1, console=True, stdin=None)


def resolve_serial_parameters(specs: Iterable[str | SerialParameters], *,
                              stdin_isatty: bool | None = None,
                              fill_missing: bool = True) -> list[SerialParameters]:
    """Every --serial parsed and checked together, defaults applied, sorted by num.

    Raises ConfigError for a port given twice, two consoles or two stdin users. When
    no port is the console and COM1 is not given (no spec at all, say), COM1 is the
    stdout console, as in crosvm. stdin=None becomes True for the first
    stdout port when stdin is a terminal (stdin_isatty, default os.isatty(0)) and no
    port asked for stdin. With fill_missing, absent COM ports are added as sinks.
    """
    params = [s if isinstance(s, SerialParameters) else parse_serial_spec(s)
              for s in specs]
    by_num: dict[int, SerialParameters] = {}
    for p in params:
        if p.num in by_num:
            raise ConfigError(f"--serial: num={p.num} (COM{p.num}) is given twice")
        by_num[p.num] = p
    if 1 not in by_num and not any(p.console for p in params):
        # As crosvm: with no console asked for and COM1 not configured, COM1 is the
        # stdout console.
        by_num[1] = default_serial_parameters()
        params.append(by_num[1])
    consoles = [p.num for p in params if p.console]
    if len(consoles) > 1:
        raise ConfigError(f"--serial: console is set on num={consoles[0]} and "
                          f"num={consoles[1]}; only one port can be the console")
    stdin_users = [p.num for p in params if p.stdin]
    if len(stdin_users) > 1:
        raise ConfigError(f"--serial: stdin is set on num={stdin_users[0]} and "
                          f"num={stdin_users[1]}; only one port can read stdin")
    if not stdin_users:
        if stdin_isatty is None:
            try:
                stdin_isatty = os.isatty(0)
            except OSError:
                stdin_isatty = False
        first_stdout = next((p for p in sorted(params, key=lambda p: p.num)
                             if p.type == "stdout" and p.stdin is None), None)
        if first_stdout is not None and stdin_isatty:
            by_num[first_stdout.num] = replace(first_stdout, stdin=True)
    if fill_missing:
        for num in range(1, NUM_PORTS + 1):
            by_num.setdefault(num, SerialParameters(type="sink", num=num))
    return [replace(p, stdin=bool(p.stdin)) for _, p in sorted(by_num.items())]


def validate_serial_specs(specs: Iterable[str]) -> None:
    """Check --serial values without opening anything (for VmConfig.validate())."""
    resolve_serial_parameters(specs, stdin_isatty=False, fill_missing=False)


# Backends --------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


#: How much guest output a stdout/stderr/file port holds while its fd does not take it.
OUTPUT_BUFFER_LIMIT = 256 * 1024
#: How long close() waits for held output to drain before giving it up.
CLOSE_DRAIN_SECONDS = 5.0


class SerialBackend:
    """The host end of one serial port: write(bytes) gets guest output; a two-way
    backend also delivers input once start_input(deliver) is called."""

    def __init__(self, name: str = "serial") -> None:
        self.name = name
        self._failed = False

    def write(self, data: bytes) -> None:
        """Send guest output; errors are logged once and then output is dropped."""
        if self._failed or not data:
            return
        try:
            self._write(bytes(data))
        except OSError as e:
            self._failed = True
            log.warning("%s: output failed, dropping further output: %s", self.name, e)

    def _write(self, data: bytes) -> None:
        pass

    def start_input(self, deliver: Callable[[bytes], object]) -> None:
        """Start delivering input to deliver(bytes) (no-op for output-only backends)."""

    def close(self) -> None:
        """Stop input and release the host resource (idempotent)."""


class SinkBackend(SerialBackend):
    """Discards output."""


class BufferedFdBackend(SerialBackend):
    """Output to an fd through a bounded buffer that a writer thread drains, so that a
    vCPU never blocks on the fd (a paused pager on stdout, a stuck file system).

    write() only appends to the buffer; when the fd stops taking output and the buffer
    is full, what does not fit is dropped, as a UART without flow control loses what
    nobody reads, and said once per stall (a stall ends when the buffer has drained).
    The thread starts at the first write, i.e. after the VM builder's forks. close()
    waits up to CLOSE_DRAIN_SECONDS for the buffer to drain.
    """

    def __init__(self, fd: int, name: str, *, limit: int = OUTPUT_BUFFER_LIMIT) -> None:
        super().__init__(name)
        self.fd = fd
        self.limit = limit
        self.dropped = 0                   # bytes dropped so far
        self._buf = bytearray()
        self._busy = False                 # the writer holds bytes taken from _buf
        self._dropping = False
        self._closing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def _write(self, data: bytes) -> None:
        with self._cond:
            if self._closing:
                return
            room = self.limit - len(self._buf)
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
                if not self._dropping:
                    self._dropping = True
                    log.warning("%s: output is not being taken (fd %d blocks); dropping "
                                "output", self.name, self.fd)
            if not data:
                return
            was_empty = not self._buf
            self._buf += data
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name=f"{self.name} output",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.flush, CLOSE_DRAIN_SECONDS)   # a VM left unclosed
            elif was_empty:
                self._cond.notify()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if not self._buf:
                    return
                chunk, self._buf = bytes(self._buf), bytearray()
                self._busy = True
            try:
                _write_all(self.fd, chunk)
            except OSError as e:
                log.warning("%s: output failed, dropping further output: %s", self.name, e)
                with self._cond:
                    self._failed = self._closing = True
                    self._buf.clear()
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                if not self._buf:
                    self._dropping = False
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written so far has reached the fd; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buf and not self._busy
                                       or self._failed, timeout)

    def close(self) -> bool:  # type: ignore[override]
        """Drain what is held (up to CLOSE_DRAIN_SECONDS), then stop the writer thread.
        Returns True when the writer has stopped (the fd is then free to close)."""
        atexit.unregister(self.flush)
        drained = self.flush(CLOSE_DRAIN_SECONDS)
        with self._cond:
            self._closing = True
            lost = len(self._buf)
            self._cond.notify_all()
        if not drained:
            log.warning("%s: output still blocked at exit; %d bytes not written",
                        self.name, lost)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=0.5 if drained else 0)
        return self._thread is None or not self._thread.is_alive()


class FdBackend(BufferedFdBackend):
    """Output to an fd we do not own (stdout, stderr)."""


class FileBackend(BufferedFdBackend):
    """Output to a file, created and truncated (as crosvm's type=file)."""

    def __init__(self, path: Path, name: str = "serial") -> None:
        self.path = path
        super().__init__(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o644), name)

    def close(self) -> None:
        stopped = super().close()
        if self.fd >= 0 and stopped:     # else the writer still uses it: left to exit
            os.close(self.fd)
            self.fd = -1


class SyslogBackend(SerialBackend):
    """Output to syslog, one message per guest line."""

    def __init__(self, name: str = "serial") -> None:
        super().__init__(name)
        import syslog

        self._syslog = syslog
        self._line = bytearray()

    def _write(self, data: bytes) -> None:
        self._line += data
        while b"\n" in self._line:
            line, _, rest = bytes(self._line).partition(b"\n")
            self._line = bytearray(rest)
            self._log(line)

    def _log(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        self._syslog.syslog(self._syslog.LOG_INFO, f"{self.name}: {text}")

    def close(self) -> None:
        if self._line:
            self._log(bytes(self._line))
            self._line.clear()


class InputReader:
    """A thread that reads an fd and hands what it reads to deliver(bytes), until EOF
    or stop(). With escape set (a terminal), Ctrl-A x calls escape() instead, and
    Ctrl-A Ctrl-A passes one Ctrl-A on."""

    def __init__(self, fd: int, deliver: Callable[[bytes], object], name: str, *,
                 escape: Callable[[], object] | None = None,
                 recv: Callable[[int], bytes] | None = None) -> None:
        self.fd = fd
        self.deliver = deliver
        self.escape = escape
        self._recv = recv or (lambda n: os.read(fd, n))
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._after_ctrl_a = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            if self._thread.is_alive() and self._thread is not threading.current_thread():
                self._thread.join(timeout=2.0)
            if not self._thread.is_alive():
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def filter(self, data: bytes) -> bytes:
        """Apply the Ctrl-A escapes (when escape is set)."""
        if self.escape is None:
            return data
        out = bytearray()
        for b in data:
            if self._after_ctrl_a:
                self._after_ctrl_a = False
                if b in (ord("x"), ord("X")):
                    self.escape()
                    continue
                out.append(CTRL_A)
                if b != CTRL_A:
                    out.append(b)
            elif b == CTRL_A:
                self._after_ctrl_a = True
            else:
                out.append(b)
        return bytes(out)

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.fd, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                try:
                    data = self._recv(READ_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    return
                data = self.filter(data)
                if data:
                    self.deliver(data)
        except (OSError, ValueError) as e:
            log.warning("%s: input stopped: %s", self._thread.name, e)


class UnixSocketBackend(SerialBackend):
    """A two-way channel over a unix stream socket that listens at path."""

    def __init__(self, path: Path, name: str = "serial") -> None:
        super().__init__(name)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(os.fspath(path))
        except OSError:
            self.sock.close()
            raise
        self._reader: InputReader | None = None
        self._dropping = False

    def _write(self, data: bytes) -> None:
        """Never block the vCPU on a peer that stops reading: send what the socket buffer
        takes and drop the rest, as a UART without flow control loses characters nobody
        reads (said once per stall; nothing is held back to appear out of turn later)."""
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            if not self._dropping:
                self._dropping = True
                log.warning("%s: the socket peer is not reading; dropping output", self.name)
        else:
            self._dropping = False

    def start_input(self, deliver: Callable[[bytes], object]) -> None:
        if self._reader is None and self.sock.fileno() >= 0:
            self._reader = InputReader(self.sock.fileno(), deliver, f"{self.name} socket",
                                       recv=self.sock.recv)
            self._reader.start()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self.sock.close()


def open_backend(params: SerialParameters) -> SerialBackend:
    """Open the host end of one port; ConfigError (one line) when it cannot be opened.

    Input from stdin= or input= is not the backend's business: SerialDevices reads
    those (see create_serial_devices)."""
    name = f"COM{params.num}"
    try:
        if params.type == "stdout":
            return FdBackend(1, name)
        if params.type == "stderr":
            return FdBackend(2, name)
        if params.type == "file":
            assert params.path is not None
            return FileBackend(params.path, name)
        if params.type == "unix":
            assert params.path is not None
            return UnixSocketBackend(params.path, name)
        if params.type == "syslog":
            return SyslogBackend(name)
        if params.type == "sink":
            return SinkBackend(name)
    except OSError as e:
        reason = e.strerror or str(e)
        verb = "cannot connect to" if params.type == "unix" else "cannot open"
        raise ConfigError(f"--serial type={params.type},num={params.num}: {verb} "
                          f"{params.path}: {reason}") from None
    raise ConfigError(f"--serial: invalid type {params.type!r} "
                      f"(valid types: {', '.join(SERIAL_TYPES)})")


# The terminal ------------------------------------------------------------------------


class RawTerminal:
    """Puts a terminal in raw mode (no echo, no line editing, no signals from keys),
    and restores it on exit(), on close(), and at interpreter exit whatever happens."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._saved: list | None = None

    def enter(self) -> RawTerminal:
        if self._saved is not None or not os.isatty(self.fd):
            return self
        saved = termios.tcgetattr(self.fd)
        raw = termios.tcgetattr(self.fd)
        raw[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        raw[6][termios.VMIN] = 1
        raw[6][termios.VTIME] = 0
        self._saved = saved
        atexit.register(self.restore)
        termios.tcsetattr(self.fd, termios.TCSANOW, raw)
        return self

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        atexit.unregister(self.restore)
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    @property
    def active(self) -> bool:
        return self._saved is not None

    def __enter__(self) -> RawTerminal:
        return self.enter()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _default_escape() -> None:
    """Ctrl-A x: stop the VMM as Ctrl-C would have (vm_builder turns SIGINT into a
    clean stop)."""
    os.kill(os.getpid(), signal.SIGINT)


# The COM ports -------------------------------------------------------------------------


@dataclass
class SerialPort:
    """One created port: its parameters, device model and host end."""

    params: SerialParameters
    serial: Serial
    backend: SerialBackend

    @property
    def port(self) -> int:
        return self.params.port


class SerialDevices(list):
    """The COM ports of a VM: a list of (port, Serial) tuples, plus their lifecycle."""

    def __init__(self, ports: list[SerialPort], *, stdin_fd: int = 0,
                 on_escape: Callable[[], object] | None = None) -> None:
        super().__init__((p.port, p.serial) for p in ports)
        self.ports = ports
        self.stdin_fd = stdin_fd
        self.on_escape = on_escape or _default_escape
        self.terminal = RawTerminal(stdin_fd)
        self._readers: list[InputReader] = []
        self._input_fds: list[int] = []
        self._started = False
        self._closed = False

    def kernel_params(self) -> list[str]:
        """console=ttySN and earlycon=uart8250,io,PORT as the specs asked."""
        params = []
        for p in self.ports:
            if p.params.console:
                params.append(f"console={p.params.tty}")
            if p.params.earlycon:
                params.append(f"earlycon=uart8250,io,{p.params.port:#x}")
        return params

    def start_input(self) -> None:
        """Start the input threads (sockets, input= files, stdin) and make a terminal
        stdin raw. Call once, after any fork."""
        if self._started or self._closed:
            return
        self._started = True
        try:
            for p in self.ports:
                deliver = p.serial.queue_input
                p.backend.start_input(deliver)
                if p.params.input is not None:
                    fd = os.open(p.params.input, os.O_RDONLY | os.O_CLOEXEC)
                    self._input_fds.append(fd)
                    self._add_reader(fd, deliver, f"COM{p.params.num} input")
                if p.params.stdin:
                    tty = os.isatty(self.stdin_fd)
                    if tty:
                        self.terminal.fd = self.stdin_fd
                        self.terminal.enter()
                    self._add_reader(self.stdin_fd, deliver, f"COM{p.params.num} stdin",
                                     escape=self.on_escape if tty else None)
        except OSError as e:
            self.close()
            raise ConfigError(f"--serial: cannot read input: {e}") from None

    def _add_reader(self, fd: int, deliver: Callable[[bytes], object], name: str,
                    escape: Callable[[], object] | None = None) -> None:
        reader = InputReader(fd, deliver, name, escape=escape)
        self._readers.append(reader)
        reader.start()

    def close(self) -> None:
        """Stop input, restore the terminal, close every backend (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for reader in self._readers:
            reader.stop()
        self._readers.clear()
        self.terminal.restore()
        for fd in self._input_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._input_fds.clear()
        for p in self.ports:
            try:
                p.backend.close()
            except OSError as e:
                log.warning("COM%d: closing its backend: %s", p.params.num, e)

    def __enter__(self) -> SerialDevices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_serial_devices(specs: Iterable[str | SerialParameters],
                          interrupts_for: Callable[[int], Interrupt],
                          stack: contextlib.ExitStack | None = None, *,
                          start_input: bool = True,
                          stdin_isatty: bool | None = None,
                          on_escape: Callable[[], object] | None = None) -> SerialDevices:
    """The four COM ports for these --serial specs (see the module docstring).

    interrupts_for(irq) is called once per port with its ISA IRQ (4 or 3). On any
    error, whatever was opened is closed again and ConfigError is raised.
    """
    params = resolve_serial_parameters(specs, stdin_isatty=stdin_isatty)
    ports: list[SerialPort] = []
    try:
        for p in params:
            backend = open_backend(p)
            try:
                serial = Serial(interrupts_for(p.irq), backend, name=f"serial COM{p.num}")
            except BaseException:
                backend.close()
                raise
            ports.append(SerialPort(p, serial, backend))
    except BaseException:
        for port in ports:
            port.backend.close()
        raise
    devices = SerialDevices(ports, on_escape=on_escape)
    if stack is not None:
        stack.callback(devices.close)
    if start_input:
        devices.start_input()
    return devices
