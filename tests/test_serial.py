"""The 16550A model and the --serial backends (tier 1: no KVM)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from vmmcore.arch.x86_64 import layout
from vmmcore.bus import Bus, BusDevice
from vmmcore.devices import serial as s
from vmmcore.devices.serial import Serial
from vmmcore.devices.serial_backends import (
    FdBackend,
    FileBackend,
    InputReader,
    RawTerminal,
    SerialParameters,
    SinkBackend,
    UnixSocketBackend,
    create_serial_devices,
    default_serial_parameters,
    open_backend,
    parse_serial_spec,
    resolve_serial_parameters,
    validate_serial_specs,
)
from vmmcore.errors import ConfigError
from vmmcore.interrupts import CallbackInterrupt


class Out:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def make() -> tuple[Serial, CallbackInterrupt, Out]:
    irq = CallbackInterrupt(lambda high: None)
    out = Out()
    return Serial(irq, out), irq, out


def rd(dev: Serial, off: int) -> int:
    return dev.read(off, 1)[0]


def wr(dev: Serial, off: int, value: int) -> None:
    dev.write(off, bytes([value]))


# Registers ---------------------------------------------------------------------------


def test_is_a_bus_device_and_reset_state():
    dev, irq, _ = make()
    assert isinstance(dev, BusDevice)
    assert rd(dev, s.IER) == 0
    assert rd(dev, s.IIR) == s.IIR_NO_INT
    assert rd(dev, s.LCR) == 0x03
    assert rd(dev, s.LSR) == s.LSR_THRE | s.LSR_TEMT
    assert rd(dev, s.MSR) == s.MSR_CTS | s.MSR_DSR | s.MSR_DCD
    assert rd(dev, s.DATA) == 0          # empty receiver
    assert irq.count == 0


def test_output_goes_to_backend_and_lsr_stays_empty():
    dev, irq, out = make()
    for b in b"hello\n":
        wr(dev, s.DATA, b)
        assert rd(dev, s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT
    assert bytes(out.data) == b"hello\n"
    assert irq.count == 0                # THRI not enabled


def test_scratch_and_ier_mask():
    dev, _, _ = make()
    wr(dev, s.SCR, 0xA5)
    assert rd(dev, s.SCR) == 0xA5
    wr(dev, s.IER, 0xFF)
    assert rd(dev, s.IER) == 0x0F       # Linux's autoconfig checks this
    wr(dev, s.MCR, 0xFF)
    assert rd(dev, s.MCR) == 0x1F


def test_dlab_switches_divisor_latch():
    dev, _, out = make()
    wr(dev, s.IER, s.IER_RDI)
    wr(dev, s.LCR, 0x80 | 0x03)
    assert rd(dev, s.DATA) == 12 and rd(dev, s.IER) == 0   # 9600 baud default
    wr(dev, s.DATA, 0x01)
    wr(dev, s.IER, 0x02)
    assert rd(dev, s.DATA) == 0x01 and rd(dev, s.IER) == 0x02
    assert dev.divisor == 0x0201
    assert out.data == b""               # DLL writes are not output
    wr(dev, s.LCR, 0x03)
    assert rd(dev, s.IER) == s.IER_RDI   # IER unchanged by DLM writes
    wr(dev, s.DATA, ord("A"))
    assert out.data == b"A"


def test_fcr_enables_fifo_bits_in_iir_and_clears_receiver():
    dev, _, _ = make()
    assert rd(dev, s.IIR) & 0xC0 == 0
    wr(dev, s.IIR, s.FCR_ENABLE)
    assert rd(dev, s.IIR) == 0xC0 | s.IIR_NO_INT
    dev.queue_input(b"abc")
    wr(dev, s.IIR, s.FCR_ENABLE | s.FCR_CLEAR_RCVR)
    assert not rd(dev, s.LSR) & s.LSR_DR
    assert dev.pending_input() == 0
    wr(dev, s.IIR, 0)
    assert rd(dev, s.IIR) & 0xC0 == 0


# Input and interrupts ----------------------------------------------------------------


def test_input_sets_dr_and_raises_rda_once_per_new_data():
    dev, irq, _ = make()
    wr(dev, s.IER, s.IER_RDI)
    assert irq.count == 0
    dev.queue_input(b"ab")
    assert irq.count == 1
    assert rd(dev, s.LSR) & s.LSR_DR
    assert rd(dev, s.IIR) == s.IIR_RDI
    dev.queue_input(b"c")                # already pending: no new edge needed
    assert irq.count == 1
    assert dev.read(s.DATA, 1) == b"a"
    assert rd(dev, s.DATA) == ord("b")
    assert rd(dev, s.IIR) == s.IIR_RDI
    assert rd(dev, s.DATA) == ord("c")
    assert rd(dev, s.IIR) == s.IIR_NO_INT
    assert not rd(dev, s.LSR) & s.LSR_DR
    dev.queue_input(b"d")                # empty -> non-empty: a new edge
    assert irq.count == 2


def test_input_without_rdi_enabled_raises_nothing_until_enabled():
    dev, irq, _ = make()
    dev.queue_input(b"x")
    assert irq.count == 0
    assert rd(dev, s.IIR) == s.IIR_NO_INT
    wr(dev, s.IER, s.IER_RDI)            # pending data + enable: interrupt now
    assert irq.count == 1
    assert rd(dev, s.IIR) == s.IIR_RDI


def test_thre_on_ier_enable_and_linux_thre_test():
    dev, irq, _ = make()
    wr(dev, s.IIR, s.FCR_ENABLE)
    wr(dev, s.IER, s.IER_THRI)
    assert irq.count == 1
    assert rd(dev, s.IIR) == 0xC0 | s.IIR_THRI
    assert rd(dev, s.IIR) == 0xC0 | s.IIR_NO_INT   # reading IIR acknowledged THRE
    # serial8250_do_startup: IER=0, IER=THRI, IIR must show an interrupt again.
    wr(dev, s.IER, 0)
    wr(dev, s.IER, s.IER_THRI)
    assert irq.count == 2
    assert rd(dev, s.IIR) & s.IIR_NO_INT == 0
    # Re-writing IER with THRI still set does not re-raise.
    wr(dev, s.IER, s.IER_THRI)
    assert irq.count == 2


def test_thre_after_every_write():
    dev, irq, out = make()
    wr(dev, s.IER, s.IER_THRI)
    assert rd(dev, s.IIR) == s.IIR_THRI
    base = irq.count
    for i, b in enumerate(b"xyz", 1):
        wr(dev, s.DATA, b)
        assert irq.count == base + i
        assert rd(dev, s.IIR) == s.IIR_THRI
    # Not read-acknowledged and written again: still one edge per write.
    wr(dev, s.DATA, ord("1"))
    wr(dev, s.DATA, ord("2"))
    assert irq.count == base + 5
    assert out.data == b"xyz12"
    wr(dev, s.IER, 0)
    assert rd(dev, s.IIR) == s.IIR_NO_INT


def test_overrun_is_reported_as_line_status(monkeypatch):
    dev, irq, _ = make()
    wr(dev, s.IER, s.IER_RLSI | s.IER_RDI)
    monkeypatch.setattr(s, "INPUT_LIMIT", 4)
    assert dev.queue_input(b"123456") == 4     # two bytes overflowed the buffer
    assert irq.count == 1
    assert rd(dev, s.IIR) == s.IIR_RLSI        # line status outranks data available
    lsr = rd(dev, s.LSR)
    assert lsr & s.LSR_OE and lsr & s.LSR_DR
    assert not rd(dev, s.LSR) & s.LSR_OE       # cleared by reading LSR
    assert rd(dev, s.IIR) == s.IIR_RDI
    assert bytes(rd(dev, s.DATA) for _ in range(4)) == b"1234"


def test_iir_priority_order_with_everything_pending():
    dev, _, _ = make()
    wr(dev, s.IER, s.IER_MASK)
    wr(dev, s.MCR, s.MCR_LOOP | s.MCR_RTS)    # CTS changes: modem status pending
    dev.queue_input(b"q")
    assert rd(dev, s.IIR) == s.IIR_RDI
    rd(dev, s.DATA)
    assert rd(dev, s.IIR) == s.IIR_THRI       # and reading IIR acknowledges it
    msr = rd(dev, s.IIR)
    assert msr == s.IIR_MSI
    assert rd(dev, s.MSR) & s.MSR_DELTA_MASK
    assert rd(dev, s.IIR) == s.IIR_NO_INT


def test_loopback_echoes_and_modem_lines_follow_mcr():
    dev, irq, out = make()
    wr(dev, s.MCR, s.MCR_LOOP | 0x0A)          # Linux autoconfig: RTS | OUT2
    assert rd(dev, s.MSR) & 0xF0 == 0x90       # CTS | DCD
    wr(dev, s.MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_OUT1)
    assert rd(dev, s.MSR) & 0xF0 == s.MSR_DSR | s.MSR_RI
    wr(dev, s.IER, s.IER_RDI)
    wr(dev, s.DATA, 0x42)
    assert out.data == b""                     # loopback: not transmitted
    assert irq.count == 1
    assert rd(dev, s.LSR) & s.LSR_DR
    assert rd(dev, s.DATA) == 0x42
    wr(dev, s.MCR, s.MCR_OUT2)
    assert rd(dev, s.MSR) & 0xF0 == s.MSR_DEFAULT
    wr(dev, s.DATA, 0x43)
    assert out.data == b"C"


def test_msr_delta_bits_cleared_by_read_and_teri():
    dev, _, _ = make()
    wr(dev, s.MCR, s.MCR_LOOP | s.MCR_OUT1)    # RI on
    rd(dev, s.MSR)
    wr(dev, s.MCR, s.MCR_LOOP)                 # RI trailing edge
    assert rd(dev, s.MSR) & s.MSR_TERI
    assert rd(dev, s.MSR) & s.MSR_DELTA_MASK == 0


def test_queue_input_thread_safe_and_ordered():
    dev, _, _ = make()
    chunks = [bytes([i]) * 100 for i in range(8)]

    def feed(c: bytes) -> None:
        for i in range(0, len(c), 10):
            dev.queue_input(c[i:i + 10])

    threads = [threading.Thread(target=feed, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    got = bytearray()
    deadline = time.monotonic() + 5
    while len(got) < 800 and time.monotonic() < deadline:
        if rd(dev, s.LSR) & s.LSR_DR:
            got.append(rd(dev, s.DATA))
    for t in threads:
        t.join()
    assert len(got) == 800
    for i in range(8):
        assert got.count(i) == 100


def test_output_backend_failure_does_not_raise():
    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError("gone")

    dev = Serial(CallbackInterrupt(lambda h: None), Broken())
    wr(dev, s.DATA, 1)
    wr(dev, s.DATA, 2)
    assert Serial(CallbackInterrupt(lambda h: None)).read(s.LSR, 1)


@pytest.mark.parametrize("offset", [-5, -1, 8, 9, 1000, 2**40])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 8, 16, -1])
def test_hostile_offsets_and_sizes(offset, size):
    dev, _, _ = make()
    data = dev.read(offset, size)
    assert isinstance(data, bytes) and len(data) == max(0, min(size, 8))
    if offset >= 8 or offset + size <= 0:
        assert set(data) <= {0xFF}
    dev.write(offset, b"\xff" * max(0, size))
    dev.write(offset, b"")


def test_wide_accesses_are_byte_cycles():
    dev, _, out = make()
    dev.write(s.DATA, b"AB")             # THR = 'A', IER = 'B' & 0xf
    assert out.data == b"A"
    assert rd(dev, s.IER) == ord("B") & 0x0F
    assert dev.read(s.SCR, 4) == bytes([0, 0xFF, 0xFF, 0xFF])   # SCR then off the end


def test_on_the_bus():
    bus = Bus("io")
    dev, _, out = make()
    bus.insert(dev, 0x3F8, 8)
    bus.write(0x3F8, b"Z")
    assert out.data == b"Z"
    assert bus.read(0x3FD, 1) == bytes([s.LSR_THRE | s.LSR_TEMT])


# --serial parsing ---------------------------------------------------------------------


def test_parse_full_spec(tmp_path):
    p = parse_serial_spec(f"type=file,path={tmp_path}/out,num=2,console,stdin=false,"
                          "earlycon=true,hardware=serial")
    assert p == SerialParameters(type="file", path=tmp_path / "out", num=2, console=True,
                                 stdin=False, earlycon=True)
    assert p.port == 0x2F8 and p.irq == 3 and p.tty == "ttyS1"


@pytest.mark.parametrize("num", [1, 2, 3, 4])
def test_num_maps_to_com_ports(num):
    p = parse_serial_spec(f"type=sink,num={num}")
    assert p.port == layout.SERIAL_PORTS[num - 1]
    assert p.irq == layout.SERIAL_IRQS[p.port]


def test_parse_defaults_and_synonyms():
    assert parse_serial_spec("type=stdout") == SerialParameters(type="stdout")
    assert parse_serial_spec(" Type = STDERR ").type == "stderr"
    assert parse_serial_spec("type=unix-stream,path=/x").type == "unix"
    assert parse_serial_spec("type=sink,console=TRUE").console is True
    assert parse_serial_spec("type=sink,input=/dev/null").input == Path("/dev/null")


@pytest.mark.parametrize("spec, message", [
    ("", "--serial: empty spec"),
    ("   ", "--serial: empty spec"),
    ("num=1", "missing type= (valid types: stdout, stderr, file, unix, unix-stream, sink, "
              "syslog)"),
    ("type=tty", "invalid type 'tty' (valid types: stdout, stderr, file, unix, "
                 "unix-stream, sink, syslog)"),
    ("type=stdout,colour=red", "unknown key 'colour' (valid keys: type, path, input, num, "
                               "console, stdin, earlycon, hardware)"),
    ("type=stdout,type=stderr", "key 'type' given twice"),
    ("type=stdout,,num=1", "empty option between commas"),
    ("type=stdout,", "empty option between commas"),
    ("type", "key 'type' needs a value"),
    ("type=stdout,num", "key 'num' needs a value"),
    ("type=file", "type=file needs path=PATH"),
    ("type=unix", "type=unix needs path=PATH"),
    ("type=file,path=", "path= is empty"),
    ("type=sink,input=", "input= is empty"),
    ("type=stdout,path=/tmp/x", "path= is only valid with type=file or type=unix or "
                                "type=unix-stream, not type=stdout"),
    ("type=stdout,num=0", "invalid num '0' (valid: 1, 2, 3, 4, for COM1..COM4)"),
    ("type=stdout,num=5", "invalid num '5' (valid: 1, 2, 3, 4"),
    ("type=stdout,num=-1", "invalid num '-1'"),
    ("type=stdout,num=one", "invalid num 'one'"),
    ("type=stdout,console=yes", "invalid console 'yes' (valid: true, false)"),
    ("type=stdout,stdin=1", "invalid stdin '1' (valid: true, false)"),
    ("type=stdout,earlycon=on", "invalid earlycon 'on' (valid: true, false)"),
    ("type=stdout,hardware=virtio-console", "invalid hardware 'virtio-console' "
                                            "(valid: serial)"),
])
def test_parse_errors(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_serial_spec(spec)
    text = str(e.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith("--serial")


def test_default_serial_parameters():
    p = default_serial_parameters()
    assert (p.type, p.num, p.console, p.port) == ("stdout", 1, True, 0x3F8)


def test_resolve_defaults_and_fill():
    params = resolve_serial_parameters([], stdin_isatty=True)
    assert [p.num for p in params] == [1, 2, 3, 4]
    assert params[0] == SerialParameters(type="stdout", num=1, console=True, stdin=True)
    assert all(p.type == "sink" and not p.stdin and not p.console for p in params[1:])
    # stdin not a tty: no stdin by default.
    assert resolve_serial_parameters([], stdin_isatty=False)[0].stdin is False


def test_resolve_adds_com1_console_when_no_console_and_com1_free():
    params = resolve_serial_parameters(["type=sink,num=2"], stdin_isatty=False)
    assert params[0] == SerialParameters(type="stdout", num=1, console=True, stdin=False)
    # COM1 given (not as console) or another port is the console: no default console.
    params = resolve_serial_parameters(["type=sink,num=1"], stdin_isatty=False)
    assert not any(p.console for p in params) and params[0].type == "sink"
    params = resolve_serial_parameters(["type=sink,num=3,console"], stdin_isatty=False)
    assert params[0].type == "sink" and params[2].console


def test_resolve_stdin_goes_to_first_stdout_only_when_not_claimed():
    params = resolve_serial_parameters(["type=sink,num=1", "type=stdout,num=3",
                                        "type=stdout,num=2"], stdin_isatty=True)
    assert [p.stdin for p in params] == [False, True, False, False]
    params = resolve_serial_parameters(["type=stdout,num=1", "type=sink,num=2,stdin"],
                                       stdin_isatty=True)
    assert [p.stdin for p in params] == [False, True, False, False]
    params = resolve_serial_parameters(["type=stdout,stdin=false"], stdin_isatty=True)
    assert not any(p.stdin for p in params)


@pytest.mark.parametrize("specs, message", [
    (["type=stdout", "type=sink"], "--serial: num=1 (COM1) is given twice"),
    (["type=sink,num=1,console", "type=sink,num=2,console"],
     "console is set on num=1 and num=2; only one port can be the console"),
    (["type=sink,num=1,stdin", "type=sink,num=3,stdin=true"],
     "stdin is set on num=1 and num=3; only one port can read stdin"),
])
def test_resolve_errors(specs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_serial_parameters(specs)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_serial_specs(specs)


# Backends -----------------------------------------------------------------------------


def test_file_backend_truncates_and_writes(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old contents")
    backend = open_backend(parse_serial_spec(f"type=file,path={path}"))
    assert isinstance(backend, FileBackend)
    backend.write(b"hello ")
    backend.write(b"world\n")
    backend.close()
    backend.close()
    assert path.read_bytes() == b"hello world\n"


def test_file_backend_open_error_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot open .*nodir/x: No such file"):
        open_backend(parse_serial_spec(f"type=file,path={tmp_path}/nodir/x"))


def test_unix_backend_connect_error_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"type=unix,num=1: cannot connect to .*nosock"):
        open_backend(parse_serial_spec(f"type=unix,path={tmp_path}/nosock"))


@contextlib.contextmanager
def listening(path: Path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(os.fspath(path))
    srv.listen(1)
    try:
        yield srv
    finally:
        srv.close()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    conn.settimeout(5)
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_unix_backend_is_two_way(tmp_path):
    path = tmp_path / "console.sock"
    with listening(path) as srv:
        backend = open_backend(parse_serial_spec(f"type=unix,path={path}"))
        assert isinstance(backend, UnixSocketBackend)
        conn, _ = srv.accept()
        with conn:
            got = []
            arrived = threading.Event()

            def deliver(data: bytes) -> None:
                got.append(data)
                arrived.set()

            backend.start_input(deliver)
            backend.write(b"to host")
            assert recv_exactly(conn, 7) == b"to host"
            conn.sendall(b"to guest")
            assert arrived.wait(5)
            deadline = time.monotonic() + 5
            while b"".join(got) != b"to guest" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert b"".join(got) == b"to guest"
            backend.close()
            backend.close()


def test_unix_backend_peer_gone_drops_output(tmp_path):
    path = tmp_path / "s.sock"
    with listening(path) as srv:
        backend = open_backend(parse_serial_spec(f"type=unix,path={path}"))
        conn, _ = srv.accept()
        conn.close()
        for _ in range(100):
            backend.write(b"x" * 1000)      # EPIPE after the first: no exception
        backend.close()


def test_sink_and_std_backends():
    assert isinstance(open_backend(parse_serial_spec("type=sink")), SinkBackend)
    assert open_backend(parse_serial_spec("type=stdout")).fd == 1
    assert open_backend(parse_serial_spec("type=stderr")).fd == 2


def test_syslog_backend_splits_lines(monkeypatch):
    backend = open_backend(parse_serial_spec("type=syslog"))
    lines = []
    monkeypatch.setattr(backend, "_log", lambda line: lines.append(line))
    backend.write(b"one\r\ntw")
    backend.write(b"o\n")
    backend.write(b"three")
    backend.close()
    assert lines == [b"one\r", b"two", b"three"]


# create_serial_devices ------------------------------------------------------------------


def test_create_serial_devices_wires_ports_and_irqs(tmp_path):
    irqs = []

    def interrupts_for(irq: int) -> CallbackInterrupt:
        irqs.append(irq)
        return CallbackInterrupt(lambda h: None)

    out = tmp_path / "com2.log"
    with contextlib.ExitStack() as stack:
        devices = create_serial_devices([f"type=file,path={out},num=2,console,earlycon"],
                                        interrupts_for, stack, stdin_isatty=False)
        assert [port for port, _ in devices] == list(layout.SERIAL_PORTS)
        assert irqs == [4, 3, 4, 3]
        assert devices.kernel_params() == ["console=ttyS1", "earlycon=uart8250,io,0x2f8"]
        bus = Bus("io")
        for port, serial in devices:
            bus.insert(serial, port, 8)
        for b in b"guest says hi\n":
            bus.write(0x2F8, bytes([b]))
        bus.write(0x3F8, b"?")              # COM1 is a sink now
    assert out.read_bytes() == b"guest says hi\n"


def test_create_serial_devices_default_is_com1_console_on_stdout():
    with create_serial_devices([], lambda irq: CallbackInterrupt(lambda h: None),
                               stdin_isatty=False) as devices:
        assert devices.ports[0].params == SerialParameters(type="stdout", num=1,
                                                           console=True, stdin=False)
        assert devices.kernel_params() == ["console=ttyS0"]


def test_create_serial_devices_failure_closes_what_was_opened(tmp_path, monkeypatch):
    closed = []
    real_close = FileBackend.close

    def close(self):
        closed.append(self.path)
        real_close(self)

    monkeypatch.setattr(FileBackend, "close", close)
    with pytest.raises(ConfigError, match="cannot connect"):
        create_serial_devices([f"type=file,path={tmp_path}/a,num=1",
                               f"type=unix,path={tmp_path}/none,num=2"],
                              lambda irq: CallbackInterrupt(lambda h: None),
                              stdin_isatty=False)
    assert closed == [tmp_path / "a"]


def test_create_serial_devices_reads_input_file_and_unix_socket(tmp_path):
    infile = tmp_path / "in"
    infile.write_bytes(b"typed")
    path = tmp_path / "c.sock"
    with listening(path) as srv, \
            create_serial_devices([f"type=sink,num=1,input={infile}",
                                   f"type=unix,path={path},num=2"],
                                  lambda irq: CallbackInterrupt(lambda h: None),
                                  start_input=False, stdin_isatty=False) as devices:
        conn, _ = srv.accept()
        with conn:
            com1, com2 = devices.ports[0].serial, devices.ports[1].serial
            devices.start_input()
            conn.sendall(b"remote")
            deadline = time.monotonic() + 5
            while (com1.pending_input() < 5 or com2.pending_input() < 6) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            assert bytes(rd(com1, s.DATA) for _ in range(5)) == b"typed"
            assert bytes(rd(com2, s.DATA) for _ in range(6)) == b"remote"
            com2.write(s.DATA, b"!")
            assert recv_exactly(conn, 1) == b"!"


def test_stdin_pipe_feeds_the_stdin_port():
    r, w = os.pipe()
    try:
        devices = create_serial_devices(["type=sink,stdin"],
                                        lambda irq: CallbackInterrupt(lambda h: None),
                                        start_input=False)
        devices.stdin_fd = r
        devices.start_input()
        os.write(w, b"ls\n")
        com1 = devices.ports[0].serial
        deadline = time.monotonic() + 5
        while com1.pending_input() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert com1.pending_input() == 3
        assert not devices.terminal.active      # a pipe is not made raw
        devices.close()
    finally:
        os.close(r)
        os.close(w)


def test_ctrl_a_escapes():
    escapes = []
    reader = InputReader(0, lambda d: None, "t", escape=lambda: escapes.append(1))
    assert reader.filter(b"ab\x01\x01c") == b"ab\x01c"
    assert reader.filter(b"\x01") == b""
    assert reader.filter(b"x rest") == b" rest"
    assert escapes == [1]
    assert reader.filter(b"\x01q") == b"\x01q"
    no_escape = InputReader(0, lambda d: None, "t")
    assert no_escape.filter(b"\x01x") == b"\x01x"


def test_raw_terminal_restores_on_pty():
    import pty
    import termios

    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with RawTerminal(slave) as term:
            assert term.active
            raw = termios.tcgetattr(slave)
            assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not term.active
        assert termios.tcgetattr(slave) == before
        # Restored even when the body raises.
        with pytest.raises(RuntimeError), RawTerminal(slave):
            raise RuntimeError
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_on_non_tty_is_a_no_op(tmp_path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        with RawTerminal(fd) as term:
            assert not term.active
    finally:
        os.close(fd)


def test_stdin_tty_goes_raw_and_ctrl_a_x_escapes():
    import pty
    import termios

    master, slave = pty.openpty()
    escaped = threading.Event()
    try:
        before = termios.tcgetattr(slave)
        devices = create_serial_devices(["type=sink,stdin"],
                                        lambda irq: CallbackInterrupt(lambda h: None),
                                        start_input=False, on_escape=escaped.set)
        devices.stdin_fd = slave
        devices.start_input()
        assert devices.terminal.active
        os.write(master, b"hi\x01x")
        assert escaped.wait(5)
        assert devices.ports[0].serial.pending_input() == 2
        devices.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# Fuzzing: any sequence of guest accesses and host input, no exception ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ops = st.lists(st.one_of(
    st.tuples(st.just("r"), st.integers(-2, 10), st.integers(-1, 9)),
    st.tuples(st.just("w"), st.integers(-2, 10), st.binary(max_size=9)),
    st.tuples(st.just("in"), st.just(0), st.binary(max_size=40)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_fuzz_any_access_sequence(ops):
    dev, irq, out = make()
    for kind, offset, arg in ops:
        if kind == "r":
            assert len(dev.read(offset, arg)) == max(0, min(arg, 8))
        elif kind == "w":
            dev.write(offset, arg)
        else:
            dev.queue_input(arg)
    lsr = rd(dev, s.LSR)
    assert lsr & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT
    assert bool(lsr & s.LSR_DR) == (dev.pending_input() > 0)
    iir = rd(dev, s.IIR)
    assert iir & 0x30 == 0 and iir & 0x0F in (1, 0, 2, 4, 6)


def test_unix_backend_never_blocks_on_a_peer_that_stops_reading(tmp_path, caplog):
    """A vCPU writes serial output: a peer that does not read must not stall it. What
    the socket buffer cannot take is dropped (said once per stall); once the peer reads
    again, new output flows."""
    path = tmp_path / "slow.sock"
    with listening(path) as srv:
        backend = open_backend(parse_serial_spec(f"type=unix,path={path}"))
        conn, _ = srv.accept()
        with conn:
            t0 = time.monotonic()
            for i in range(2000):                       # ~8 MiB, far past any buffer
                backend.write(bytes([65 + i % 26]) * 4096)
            assert time.monotonic() - t0 < 5            # never blocked
            assert sum("not reading" in r.message for r in caplog.records) == 1
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while conn.recv(1 << 20):               # the peer catches up
                    pass
            backend.write(b"END")
            conn.settimeout(5)
            assert recv_exactly(conn, 3) == b"END"
        backend.close()


def _read_until(fd: int, marker: bytes, timeout: float = 1.0) -> bytes:
    got, deadline = b"", time.monotonic() + timeout
    while marker not in got and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            got += os.read(fd, 1 << 20)
    return got


def _fill_pipe(w: int) -> None:
    """Fill the pipe so that the next write to it blocks (nobody reads it)."""
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"p" * 4096)
    os.set_blocking(w, True)


def test_fd_backend_never_blocks_on_a_pipe_nobody_reads(caplog):
    """stdout/stderr/file output goes through a bounded buffer drained by a writer thread:
    a pipe nobody reads (a paused pager) must not stall the vCPU's THR writes. What does
    not fit is dropped, said once per stall; once the reader is back, output flows and
    the next stall is said again."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        backend = FdBackend(w, "COM1", limit=8192)
        dev = Serial(CallbackInterrupt(lambda high: None), backend)
        _fill_pipe(w)

        def vcpu() -> None:
            for i in range(100_000):                 # far past the buffer
                dev.write(s.DATA, bytes([65 + i % 26]))

        t = threading.Thread(target=vcpu, daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive(), "a THR write blocked on the unread pipe"
        assert backend.dropped >= 100_000 - 2 * 8192
        assert sum("dropping output" in rec.message for rec in caplog.records) == 1
        got = _read_until(r, b"never")               # the reader is back...
        assert backend.flush(5)
        backend.write(b"END")
        got += _read_until(r, b"END")
        assert got.endswith(b"END")                  # ... and new output arrives whole,
        assert b"ABCDEFGHIJ" in got                  # after what was held
        assert backend.flush(5)
        _fill_pipe(w)                                # a second stall is said again
        for _ in range(10):
            backend.write(b"y" * 4096)
        assert sum("dropping output" in rec.message for rec in caplog.records) == 2
        os.close(r)
        r = -1
        backend.close()                              # gives up on a dead pipe, no hang
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_fd_backend_close_flushes_everything_held(tmp_path):
    path = tmp_path / "out.log"
    backend = open_backend(parse_serial_spec(f"type=file,path={path}"))
    data = bytes(range(256)) * 1000
    for i in range(0, len(data), 100):
        backend.write(data[i:i + 100])
    backend.close()
    assert path.read_bytes() == data
    assert backend.fd == -1
