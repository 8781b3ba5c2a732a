"""Fuzzing the control socket of a running VM: whatever a peer sends -- random bytes,
random JSON, near-miss requests, over-long lines, a request dribbled in too slowly, more
connections than allowed, connections dropped mid-request -- the VMM keeps running, each
complete line gets one well-formed answer, and `status` still answers afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmcore import control_socket as cs
from vmmcore.control_socket import ControlServer, send_request

pytestmark = pytest.mark.kvm

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("tier 2 needs read-write access to /dev/kvm", allow_module_level=True)


def add_stand_ins(inst) -> None:
    """Devices for the fuzzed device commands to reach (the core's tests install no
    plugin): virtio_balloon0 and virtio_blk0 implement the control contract, virtio_rng0
    does not."""
    from vmmcore.config import DeviceConfig
    from vmmcore.virtio import DeviceType, VirtioDevice
    from vmmcore.virtio.pci_transport import VirtioPciDevice

    class StandIn(VirtioDevice):
        queue_max_sizes = (16,)
        control_commands = ("set_size", "stats", "query", "resize")

        def __init__(self, device_type) -> None:
            super().__init__()
            self.device_type = device_type
            self.size = 0

        def control(self, command, args):
            if command in ("set_size", "resize"):
                size = args["size"]
                if not isinstance(size, int) or size < 0:
                    raise ValueError(f"bad size {size!r}")
                self.size = size
                self.config_changed()
            return {"size": self.size}

    class Plain(VirtioDevice):
        device_type = DeviceType.RNG
        queue_max_sizes = (16,)

    for plugin, model in (("virtio_balloon", StandIn(DeviceType.BALLOON)),
                          ("virtio_blk", StandIn(DeviceType.BLOCK)),
                          ("virtio_rng", Plain())):
        pci = VirtioPciDevice(model, inst.mem, label=f"{plugin}0")
        inst.pci_root.add_device(pci)
        inst.plugin_devices.append((DeviceConfig(plugin), pci))


@pytest.fixture(scope="module")
def vm():
    """The hello guest spinning (spin=1) with stand-in devices and a control socket."""
    from vmmcore.config import VmConfig
    from vmmcore.guests import guest_path
    from vmmcore.vm_builder import build_vm

    d = Path(tempfile.mkdtemp(prefix="vmmfuzz", dir="/tmp"))
    serial = d / "serial.txt"
    config = VmConfig(kernel=guest_path("tests/hello"), mem_mib=64, params=["spin=1"],
                      serial=[f"type=file,path={serial}"])
    server = ControlServer(d / "vm.sock")
    inst = build_vm(config)
    add_stand_ins(inst)
    server.start(inst)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(exit=inst.run()))
    runner.start()
    deadline = time.monotonic() + 15
    while "spinning" not in serial.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield inst, server
    finally:
        inst.stop("fuzz teardown")
        runner.join(15)
        server.close()
        inst.close()
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    assert result["exit"].message == "fuzz teardown", result["exit"]   # nothing else ended it


def exchange(path: Path, data: bytes, timeout: float = 15) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        send_all(s, data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def send_all(s: socket.socket, data: bytes) -> None:
    # the server may close an over-long request early: fine
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)


def check_answers(out: bytes) -> list[dict]:
    answers = []
    for line in out.splitlines():
        answer = json.loads(line)
        assert isinstance(answer, dict) and answer.get("version") == 1
        if answer["ok"] is not True:
            assert answer["ok"] is False
            assert isinstance(answer["error"], str) and answer["error"]
            assert "\n" not in answer["error"]
        answers.append(answer)
    return answers


def assert_alive(inst, server) -> None:
    """The VM still runs, the guest still exits to us, and status answers."""
    inst.resume()                 # a fuzzed "suspend" may have paused it
    assert inst.events.exit is None
    before = inst.loops[0].exits
    deadline = time.monotonic() + 5
    while inst.loops[0].exits == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert inst.loops[0].exits > before
    status = send_request(server.path, "status")
    assert status["ok"] and status["state"] == "running", status


# -- strategies --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)

# Every command but stop (which ends the VM, by design); random names too.
commands = st.sampled_from([
    "status", "suspend", "resume", "powerbtn", "balloon", "balloon_stats", "disk_resize",
    "gpu_screenshot", "device", "", "STOP", "reboot", "status\x00",
]) | st.text(max_size=20).filter(lambda c: c != "stop")

arg_values = st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=40), st.none(),
                       st.booleans(), st.floats(allow_nan=False), st.lists(st.integers()),
                       st.sampled_from(["/", "/tmp/fuzz.png", "virtio_rng0", "virtio_balloon0",
                                        "disk", "gpu", "balloon", "query", "set_size",
                                        "stats", "resize", "screenshot"]))
args = st.dictionaries(st.sampled_from(["size", "index", "path", "device", "kind",
                                        "command", "args", "x"]), arg_values, max_size=5)
requests = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 0, 2, "1", None, True, 1.5]),
     "command": commands},
    optional={"args": args | json_values, "id": json_values})


# -- the fuzz tests ----------------------------------------------------------------------


def test_random_bytes(vm):
    inst, server = vm

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=4096))
    def one(data):
        check_answers(exchange(server.path, data))

    one()
    assert_alive(inst, server)


def test_random_json(vm):
    inst, server = vm

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(json_values, min_size=1, max_size=4))
    def one(values):
        data = b"".join(json.dumps(v).encode() + b"\n" for v in values)
        answers = check_answers(exchange(server.path, data))
        assert len(answers) == len(values)
        assert not any(a["ok"] for a in answers)    # none of them is a request

    one()
    assert_alive(inst, server)


def test_near_miss_requests(vm):
    inst, server = vm

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(requests, min_size=1, max_size=4))
    def one(reqs):
        data = b"".join(json.dumps(r).encode() + b"\n" for r in reqs)
        answers = check_answers(exchange(server.path, data))
        assert len(answers) == len(reqs)
        for r, a in zip(reqs, answers, strict=True):
            if type(r["version"]) is not int or r["version"] != 1:
                assert not a["ok"] and "version" in a["error"]

    one()
    assert_alive(inst, server)


def test_random_blobs_with_and_without_newlines(vm):
    inst, server = vm
    rng = random.Random(1234)
    for _ in range(40):
        n = rng.choice([1, 10, 1000, 70000, 200000])
        data = rng.randbytes(n)
        if rng.random() < 0.5:
            data = data.replace(b"\n", b"")
        check_answers(exchange(server.path, data))
    assert_alive(inst, server)


def test_an_over_long_line_is_refused_and_the_connection_closed(vm):
    inst, server = vm
    out = exchange(server.path, b"x" * (cs.MAX_REQUEST * 4))
    [answer] = check_answers(out)
    assert answer["error"] == (f"request longer than {cs.MAX_REQUEST} bytes; "
                               "closing the connection")
    # a long but legal request line is fine
    pad = "p" * (cs.MAX_REQUEST - 100)
    line = json.dumps({"version": 1, "command": "status", "args": {"pad": pad}}).encode()
    [answer] = check_answers(exchange(server.path, line + b"\n"))
    assert answer["ok"]
    assert_alive(inst, server)


def test_slow_loris_is_cut_off_and_blocks_nobody(vm, monkeypatch):
    inst, server = vm
    monkeypatch.setattr(cs, "REQUEST_TIMEOUT", 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(10)
        slow.connect(str(server.path))
        slow.sendall(b'{"version": 1, "comm')
        started = time.monotonic()
        assert send_request(server.path, "status")["ok"]     # others are served meanwhile
        for _ in range(3):
            time.sleep(0.2)
            try:
                slow.sendall(b" ")
            except OSError:
                break
        out = b""
        while chunk := slow.recv(4096):
            out += chunk
        [answer] = check_answers(out)
        assert "not completed within" in answer["error"]
        assert time.monotonic() - started < 5
    assert_alive(inst, server)


def test_connection_flood_is_limited(vm):
    inst, server = vm
    idle = []
    try:
        for _ in range(cs.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(server.path))
            idle.append(s)
        time.sleep(0.3)               # let the server take them all
        answer = send_request(server.path, "status")
        assert not answer["ok"] and "too many control connections" in answer["error"]
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if send_request(server.path, "status")["ok"]:
            break
        time.sleep(0.05)
    assert_alive(inst, server)


def test_peers_that_vanish(vm):
    inst, server = vm
    for i in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(server.path))
        if i % 3 == 1:
            s.sendall(b'{"version":1,"command":"status"}\n' * 50)   # never reads answers
        elif i % 3 == 2:
            s.sendall(b'{"version":1,"command":"sta')
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    assert_alive(inst, server)
    assert server.inst is inst


def test_idle_connections_are_hung_up(vm, monkeypatch):
    inst, server = vm
    monkeypatch.setattr(cs, "IDLE_TIMEOUT", 0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.settimeout(10)
        idle.connect(str(server.path))
        idle.sendall(b'{"version":1,"command":"status"}\n')
        assert json.loads(idle.makefile("rb").readline())["ok"]
        started = time.monotonic()
        assert idle.recv(10) == b""                   # closed by the server
        assert time.monotonic() - started < 5
    assert_alive(inst, server)
