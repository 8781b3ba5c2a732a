"""The VM control socket (crosvm's ``-s/--socket``): a versioned JSON protocol over a
unix stream socket, the server that `vmm run --socket PATH` runs beside the VM, and the
client that `vmm stop/suspend/resume/powerbtn/status/kvm_stats/balloon/disk resize/gpu
screenshot` use. docs/control.md is the user-facing description; this docstring is the contract.

Protocol (version 1)
--------------------
Framing: one JSON object per line (UTF-8, ``\\n``-terminated; a final line without the
newline is accepted when the client shuts its sending side). A connection may carry any
number of requests; each gets exactly one response line, in order.

    request   {"version": 1, "command": "<name>", "args": {...}, "id": <optional>}
    success   {"version": 1, "ok": true, ...command-specific fields..., "id": ...}
    failure   {"version": 1, "ok": false, "error": "<one line for a human>", "id": ...}

``args`` may be omitted (= {}); ``id`` (a string or an integer) is echoed back when given.
A request whose version is not 1 is refused with an error naming the versions spoken.

Commands: stop, suspend, resume, powerbtn, status, kvm_stats {names?}, balloon {size},
balloon_stats, disk_resize {index, size}, gpu_screenshot {path, index?}, device {device |
kind+index, command, args?}. See COMMANDS and docs/control.md for their fields.

Limits (the VMM survives anything sent to the socket): a request line is at most
MAX_REQUEST bytes, must be complete within REQUEST_TIMEOUT seconds of its first byte
(slow-loris), a connection idle for IDLE_TIMEOUT seconds is closed, at most MAX_CLIENTS
connections are served at once (each in its own thread), a response must be taken within
SEND_TIMEOUT seconds. Malformed input gets an error response; only an over-long or
too-slow request also closes the connection.

Device-control contract
-----------------------
Commands addressed to one device (disk resize, gpu screenshot, balloon, ``device``) go
through one generic call. A device model -- the VirtioDevice a plugin's factory returns,
or a plugin's own PciDevice (the server looks at the PciDevice first, then at the
VirtioDevice inside a VirtioPciDevice) -- opts in by implementing::

    control_commands: tuple[str, ...]            # optional: the commands it accepts
    def control(self, command: str, args: dict) -> dict | None

``control`` runs in a control-socket thread (not the device's worker): it must take its
own locks. It returns a JSON-serialisable dict merged into the success response (None
means {}), and raises ``ControlError`` (or ValueError / KeyError / TypeError /
NotImplementedError / OSError) with a one-line message for a refused or failed command;
any other exception is logged with its traceback and reported as a failure. The VMM
keeps running either way. Commands the core sends:

    virtio_blk      "resize"      {"size": bytes}           grow/shrink the disk and send
                                                             a config-change interrupt
    virtio_gpu      "screenshot"  {"path": absolute path}   write a PNG of the scan-out to
                                                             path -- or return {"png": bytes}
                                                             and the server writes the file
    virtio_balloon  "set_size"    {"size": bytes}           balloon target (num_pages)
                    "stats"       {}                         guest memory statistics

Devices are found by their plugin name (aliases: disk/block -> virtio_blk, gpu ->
virtio_gpu, balloon -> virtio_balloon, rng -> virtio_rng) and their index among that
plugin's devices in command-line order (disk 0 is the first --disk/--block), or by label
("virtio_blk1").
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmmcore.errors import ConfigError, KvmError, VmmError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
SEND_TIMEOUT = 5.0
MAX_CLIENTS = 16
#: A command that changes the VM waits at most this long for another one to finish.
COMMAND_LOCK_TIMEOUT = 30.0
PAUSE_TIMEOUT = 5.0
#: sun_path is 108 bytes including the terminating NUL.
SOCKET_PATH_MAX = 107

KIND_ALIASES = {
    "disk": "virtio_blk", "block": "virtio_blk", "blk": "virtio_blk",
    "gpu": "virtio_gpu", "balloon": "virtio_balloon", "rng": "virtio_rng",
}


class ControlError(Exception):
    """A control command was refused or failed; the message goes to the client as is."""


class ControlClientError(VmmError):
    """The client could not talk to a VMM (no socket, nobody listening, bad answer)."""


# -- finding devices -------------------------------------------------------------------


@dataclass
class ControlledDevice:
    """One device as the control socket sees it."""

    label: str
    plugin: str | None          # the device plugin's name; None for core devices
    index: int | None           # index among that plugin's devices (command-line order)
    address: str                # PCI bus:device.function
    pci_device: Any

    @property
    def model(self) -> Any:
        """The VirtioDevice inside a VirtioPciDevice, else the PciDevice itself."""
        return getattr(self.pci_device, "device", None) or self.pci_device

    def control_target(self) -> Any | None:
        for obj in (self.pci_device, getattr(self.pci_device, "device", None)):
            if obj is not None and callable(getattr(obj, "control", None)):
                return obj
        return None


def list_devices(inst: Any) -> list[ControlledDevice]:
    """Every device on the VM's PCI root, with its plugin name and index when it came
    from a --device plugin (VmInstance.plugin_devices)."""
    plugin_of: dict[int, tuple[str, int]] = {}
    counts: dict[str, int] = {}
    for config, pci_device in getattr(inst, "plugin_devices", None) or []:
        index = counts.get(config.name, 0)
        counts[config.name] = index + 1
        plugin_of[id(pci_device)] = (config.name, index)
    devices = []
    root = getattr(inst, "pci_root", None)
    for address, pci_device in (root.devices() if root is not None else []):
        plugin, index = plugin_of.get(id(pci_device), (None, None))
        try:
            label = pci_device.debug_label()
        except Exception:
            label = type(pci_device).__name__
        devices.append(ControlledDevice(label, plugin, index, str(address), pci_device))
    return devices


def find_device(inst: Any, *, device: str | None = None, kind: str | None = None,
                index: int = 0) -> ControlledDevice:
    """The device labelled `device`, or the index-th device of plugin `kind`."""
    devices = list_devices(inst)
    if device is not None:
        for d in devices:
            if d.label == device:
                return d
        labels = ", ".join(d.label for d in devices) or "none"
        raise ControlError(f"no device labelled {device!r} (devices: {labels})")
    if kind is None:
        raise ControlError("name a device: 'device' (a label) or 'kind' and 'index'")
    plugin = KIND_ALIASES.get(kind, kind)
    matching = [d for d in devices if d.plugin == plugin]
    if not matching:
        raise ControlError(f"this VM has no {plugin} device")
    for d in matching:
        if d.index == index:
            return d
    raise ControlError(f"no {plugin} device {index}: this VM has {len(matching)} "
                       f"(indices 0-{len(matching) - 1})")


def device_control(dev: ControlledDevice, command: str, args: dict) -> dict:
    """Call dev's control(command, args) under the contract in the module docstring."""
    target = dev.control_target()
    what = f"{dev.label}" + (f" ({dev.plugin})" if dev.plugin and dev.plugin not in dev.label
                             else "")
    if target is None:
        raise ControlError(f"device {what} does not support control commands "
                           f"(so not {command!r})")
    supported = getattr(target, "control_commands", None)
    if supported is not None and command not in supported:
        raise ControlError(f"device {what} does not support {command!r} (it supports: "
                           f"{', '.join(supported) or 'nothing'})")
    try:
        result = target.control(command, dict(args))
    except ControlError as e:
        raise ControlError(f"{dev.label}: {command}: {e}") from None
    except (ValueError, KeyError, TypeError, NotImplementedError, OSError) as e:
        raise ControlError(f"{dev.label}: {command} failed: {e or type(e).__name__}") from None
    except Exception as e:
        log.exception("%s: control %s failed", dev.label, command)
        raise ControlError(f"{dev.label}: {command} failed: {type(e).__name__}: {e}") from None
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise ControlError(f"{dev.label}: {command}: the device answered "
                           f"{type(result).__name__}, not a dict")
    return result


def device_state(dev: ControlledDevice) -> str:
    """A short word for the device's state: active, needs-reset, reset, configuring..."""
    pci = dev.pci_device
    interrupt = getattr(pci, "interrupt", None)
    if interrupt is not None and getattr(interrupt, "needs_reset", False):
        return "needs-reset"
    if hasattr(pci, "active") and hasattr(pci, "status"):
        if pci.active:
            return "active"
        return "reset" if not pci.status else "configuring"
    return "present"


def status_entry(dev: ControlledDevice) -> dict:
    """One device in `vmm status`: address, label, plugin, index, state, control,
    virtio_type (for a virtio device, also a sandboxed one) and error (when it needs a
    reset)."""
    entry = {"address": dev.address, "label": dev.label, "plugin": dev.plugin,
             "index": dev.index, "state": device_state(dev),
             "control": dev.control_target() is not None}
    dtype = getattr(dev.model, "device_type", None)
    if dtype is None:      # a sandboxed device: what its process reported (ProxyDevice)
        dtype = getattr(dev.pci_device, "virtio_type", None)
    if dtype is not None:
        entry["virtio_type"] = getattr(dtype, "name", str(dtype)).lower()
    reason = getattr(getattr(dev.pci_device, "interrupt", None), "needs_reset_reason", "")
    if reason:
        entry["error"] = reason
    return entry


# -- the server ------------------------------------------------------------------------

Handler = Callable[[dict], "dict | tuple[dict, Callable[[], None]]"]


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(str(path))) > SOCKET_PATH_MAX:
        raise ConfigError(f"--socket {path}: longer than {SOCKET_PATH_MAX} bytes")


def socket_is_live(path: Path, timeout: float = 1.0) -> bool:
    """True when a process accepts connections on the unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:     # EAGAIN (backlog full), EACCES...: assume someone owns it
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()


def bind_control_socket(path: Path) -> tuple[socket.socket, os.stat_result]:
    """A listening unix socket at path with mode 0600, created without a window where it
    is wider (bound in a private 0700 directory, then hard-linked into place, which
    fails rather than replace anything). A stale socket (nobody listening) is removed; a
    live one or any other file is refused. Bad paths raise ConfigError (exit status 2),
    a socket in use VmmError (1)."""
    path = Path(path)
    _check_path_length(path)
    if not path.parent.is_dir():
        raise ConfigError(f"--socket {path}: directory {path.parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"--socket {path}: exists and is not a socket; "
                              "refusing to replace it")
        if socket_is_live(path):
            raise VmmError(f"control socket {path} is in use by a running VMM")
        log.info("removing stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".vmm", dir=path.parent)   # mode 0700
        tmp = os.path.join(tmpdir, "s")
        try:
            if len(os.fsencode(tmp)) > SOCKET_PATH_MAX:
                raise VmmError(f"control socket path {path} is too long to create safely")
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise VmmError(f"control socket {path} appeared while creating it "
                               "(another VMM?)") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)
        sock.listen(MAX_CLIENTS)
        return sock, os.lstat(path)
    except VmmError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise VmmError(f"control socket {path}: {e.strerror or e}") from None


class ControlServer:
    """Serves the control protocol for one VmInstance.

        server = ControlServer(path)    # binds now: fails before the VM is built
        server.start(inst)              # accept thread; uptime counts from here
        ...                             # inst.run()
        server.close()                  # stop serving, remove the socket file
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._sock, self._st = bind_control_socket(self.path)
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = threading.Event()
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self._command_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.inst: Any = None
        self.started = time.monotonic()
        self.requests = 0
        self.errors = 0
        self.handlers: dict[str, Handler] = {
            "status": self._status,
            "stop": self._stop,
            "suspend": self._suspend,
            "resume": self._resume,
            "powerbtn": self._powerbtn,
            "balloon": self._balloon,
            "balloon_stats": self._balloon_stats,
            "disk_resize": self._disk_resize,
            "gpu_screenshot": self._gpu_screenshot,
            "device": self._device,
            "kvm_stats": self._kvm_stats,
        }

    # -- lifecycle -------------------------------------------------------------------

    def start(self, inst: Any) -> None:
        self.inst = inst
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._accept_loop, name="vmm-control",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, end every connection, remove the socket file (only if it is
        still ours). Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._clients_lock:
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        # let a device command in flight finish before the caller tears the VM down
        if self._command_lock.acquire(timeout=timeout):
            self._command_lock.release()
        self._sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self._st.st_dev, self._st.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing.is_set():
            try:
                ready = poller.poll(1000)
            except InterruptedError:
                continue
            if self._closing.is_set():
                return
            if not ready:
                continue
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if self._closing.is_set():
                    return
                log.warning("control socket: accept failed: %s", e)
                time.sleep(0.1)          # EMFILE and friends: do not spin
                continue
            conn.setblocking(True)
            with self._clients_lock:
                too_many = len(self._clients) >= MAX_CLIENTS
                if not too_many:
                    self._clients.add(conn)
            if too_many:
                self._refuse(conn, f"too many control connections (at most {MAX_CLIENTS})")
                continue
            threading.Thread(target=self._serve_client, args=(conn,),
                             name="vmm-control-client", daemon=True).start()

    def _refuse(self, conn: socket.socket, message: str) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(0.5)
            conn.sendall(_encode(error_response(message)))
        conn.close()

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            self._client_loop(conn)
        except Exception:             # never let a client take anything down
            log.exception("control socket: client handler failed")
        finally:
            with self._clients_lock:
                self._clients.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _client_loop(self, conn: socket.socket) -> None:
        buf = bytearray()
        line_started = 0.0
        while not self._closing.is_set():
            nl = buf.find(b"\n")
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                line_started = time.monotonic()
                if line.strip() and not self._answer(conn, line):
                    return
                continue
            if len(buf) > MAX_REQUEST:
                self._send(conn, error_response(
                    f"request longer than {MAX_REQUEST} bytes; closing the connection"))
                return
            if buf:
                timeout = line_started + REQUEST_TIMEOUT - time.monotonic()
                if timeout <= 0:
                    self._send(conn, error_response(
                        f"request not completed within {REQUEST_TIMEOUT:.0f} s; "
                        "closing the connection"))
                    return
            else:
                timeout = IDLE_TIMEOUT
            conn.settimeout(timeout)
            try:
                data = conn.recv(MAX_REQUEST + 1 - len(buf) if len(buf) <= MAX_REQUEST else 1)
            except TimeoutError:
                if not buf:
                    return             # idle for IDLE_TIMEOUT: hang up
                continue               # mid-request: the check above answers and closes
            except OSError:
                return
            if not data:               # EOF: a last request without its newline counts
                if buf.strip():
                    self._answer(conn, bytes(buf))
                return
            if not buf:
                line_started = time.monotonic()
            buf += data

    def _send(self, conn: socket.socket, response: dict) -> bool:
        try:
            conn.settimeout(SEND_TIMEOUT)
            conn.sendall(_encode(response))
            return True
        except OSError:
            return False

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        """Handle one request line; False when the connection should end."""
        response, after = self.handle_line(line)
        sent = self._send(conn, response)
        if after is not None:
            try:
                after()
            except Exception:
                log.exception("control socket: post-response action failed")
        return sent

    # -- requests --------------------------------------------------------------------

    def handle_line(self, line: bytes) -> tuple[dict, Callable[[], None] | None]:
        """One request line -> (response, action to run after the response is sent)."""
        self.requests += 1
        request_id = None
        try:
            request = parse_request(line)
            request_id = request.get("id")
            handler = self.handlers.get(request["command"])
            if handler is None:
                raise ControlError(f"unknown command {request['command']!r}; commands: "
                                   f"{', '.join(sorted(self.handlers))}")
            result = handler(request["args"])
            after = None
            if isinstance(result, tuple):
                result, after = result
            response = {**result, "version": PROTOCOL_VERSION, "ok": True}
        except ControlError as e:
            self.errors += 1
            response, after = error_response(str(e)), None
        except Exception as e:
            self.errors += 1
            log.exception("control socket: request failed")
            response, after = error_response(f"internal error: {type(e).__name__}: {e}"), None
        if request_id is not None:
            response["id"] = request_id
        return response, after

    def _require_vm(self) -> Any:
        inst = self.inst
        if inst is None:
            raise ControlError("the VM is not running yet")
        if self._closing.is_set():
            raise ControlError("the VMM is shutting down")
        exit_ = inst.events.exit
        if exit_ is not None:
            raise ControlError(f"the VM is shutting down ({exit_.message})")
        return inst

    @contextlib.contextmanager
    def _exclusive(self):
        if not self._command_lock.acquire(timeout=COMMAND_LOCK_TIMEOUT):
            raise ControlError("busy: another control command is still running")
        try:
            yield
        finally:
            self._command_lock.release()

    # -- commands --------------------------------------------------------------------

    def _status(self, args: dict) -> dict:
        inst = self.inst
        if inst is None:
            raise ControlError("the VM is not running yet")
        vcpus = []
        for loop in inst.loops:
            thread = loop.thread
            if thread.ident is not None and not thread.is_alive():
                state = "stopped"
            elif thread.ident is None:
                state = "created"
            elif loop.parked.is_set():
                state = "paused"
            elif loop.paused:
                state = "pausing"
            else:
                state = "running"
            vcpus.append({"id": loop.vcpu.id, "state": state, "exits": loop.exits})
        devices = [status_entry(dev) for dev in list_devices(inst)]
        exit_ = inst.events.exit
        paused = bool(inst.loops) and all(v["state"] in ("paused", "stopped") for v in vcpus) \
            and inst.paused
        state = "stopping" if exit_ is not None else (
            "paused" if paused else ("pausing" if inst.paused else "running"))
        result = {"state": state, "paused": inst.paused, "uptime": round(
            time.monotonic() - self.started, 3), "pid": os.getpid(),
            "cpus": inst.config.cpus, "mem_mib": inst.config.mem_mib,
            "vcpus": vcpus, "devices": devices}
        if exit_ is not None:
            result["exit"] = {"event": exit_.event.value, "status": exit_.status,
                              "message": exit_.message}
        return result

    def _stop(self, args: dict):
        inst = self._require_vm()
        return {"state": "stopping"}, lambda: inst.stop("stopped by the control socket")

    def _suspend(self, args: dict) -> dict:
        inst = self._require_vm()
        with self._exclusive():
            if not inst.pause(PAUSE_TIMEOUT):
                raise ControlError(f"the vCPUs did not stop within {PAUSE_TIMEOUT:.0f} s "
                                   "(still pausing)")
        return {"state": "paused"}

    def _resume(self, args: dict) -> dict:
        inst = self._require_vm()
        with self._exclusive():
            inst.resume()
        return {"state": "running"}

    def _powerbtn(self, args: dict) -> dict:
        inst = self._require_vm()
        acpi = getattr(inst, "acpi_pm", None)
        if acpi is None:
            raise ControlError("this VM has no ACPI power button")
        acpi.press_power_button()
        from vmmcore.devices.acpi_pm import EN_PWRBTN

        return {"guest_listening": bool(acpi.enable & EN_PWRBTN)}

    def _device_call(self, args: dict, kind: str, command: str, dev_args: dict) -> dict:
        inst = self._require_vm()
        index = _int_arg(args, "index", 0, minimum=0)
        dev = find_device(inst, kind=kind, index=index)
        with self._exclusive():
            result = device_control(dev, command, dev_args)
        return {"device": dev.label, **result}

    def _balloon(self, args: dict) -> dict:
        size = _int_arg(args, "size", minimum=0)
        return self._device_call(args, "virtio_balloon", "set_size", {"size": size})

    def _balloon_stats(self, args: dict) -> dict:
        return self._device_call(args, "virtio_balloon", "stats", {})

    def _disk_resize(self, args: dict) -> dict:
        size = _int_arg(args, "size", minimum=0)
        return self._device_call(args, "virtio_blk", "resize", {"size": size})

    def _gpu_screenshot(self, args: dict) -> dict:
        path = args.get("path")
        if not isinstance(path, str) or not path or "\0" in path:
            raise ControlError("'path' must be a non-empty string (where to write the PNG)")
        if not os.path.isabs(path):
            raise ControlError(f"'path' must be absolute, not {path!r}")
        if not os.path.isdir(os.path.dirname(path)):
            raise ControlError(f"directory {os.path.dirname(path)} does not exist")
        result = self._device_call(args, "virtio_gpu", "screenshot", {"path": path})
        png = result.pop("png", None)
        if png is not None:
            if not isinstance(png, (bytes, bytearray, memoryview)):
                raise ControlError("the gpu answered a 'png' that is not bytes")
            _write_atomically(path, bytes(png))
            result["bytes"] = len(png)
        result["path"] = path
        return result

    def _device(self, args: dict) -> dict:
        inst = self._require_vm()
        command = args.get("command")
        if not isinstance(command, str) or not command:
            raise ControlError("'command' (the device command) must be a non-empty string")
        dev_args = args.get("args", {})
        if not isinstance(dev_args, dict):
            raise ControlError("'args' must be an object")
        label = args.get("device")
        kind = args.get("kind")
        if label is not None and not isinstance(label, str):
            raise ControlError("'device' must be a string (a device label)")
        if kind is not None and not isinstance(kind, str):
            raise ControlError("'kind' must be a string (a plugin name)")
        dev = find_device(inst, device=label, kind=kind,
                          index=_int_arg(args, "index", 0, minimum=0))
        with self._exclusive():
            result = device_control(dev, command, dev_args)
        return {"device": dev.label, "result": result}

    def _kvm_stats(self, args: dict) -> dict:
        """KVM's own statistics for the VM and every vCPU (QEMU's query-stats)."""
        from vmmcore.kvm.stats import snapshot  # the KVM bindings: server side only

        inst = self._require_vm()
        names = args.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ControlError("'names' must be a list of non-empty strings (name prefixes)")
        try:
            return snapshot(inst.vm, [loop.vcpu for loop in inst.loops], tuple(names))
        except KvmError as e:
            raise ControlError(f"KVM statistics: {e}") from None


def _write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".screenshot", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ControlError(f"cannot write {path}: {e.strerror or e}") from None


def _int_arg(args: dict, name: str, default: int | None = None, *,
             minimum: int | None = None) -> int:
    value = args.get(name, default)
    if value is None:
        raise ControlError(f"missing argument {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"argument {name!r} must be an integer, not {value!r:.40}")
    if minimum is not None and value < minimum:
        raise ControlError(f"argument {name!r} must be >= {minimum}, not {value}")
    return value


# -- encoding --------------------------------------------------------------------------


def error_response(message: str) -> dict:
    """A failure answer; the message is made one line (devices may raise anything)."""
    message = " ".join(str(message).split()) or "failed"
    return {"version": PROTOCOL_VERSION, "ok": False, "error": message}


def _encode(obj: dict) -> bytes:
    return (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()


def parse_request(line: bytes) -> dict:
    """Validate one request line; returns {"command", "args", "id"} or raises ControlError."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise ControlError(f"request is not valid JSON: {e}") from None
    except RecursionError:
        raise ControlError("request is not valid JSON: nested too deeply") from None
    if not isinstance(request, dict):
        raise ControlError(f"request must be a JSON object, not {type(request).__name__}")
    request_id = request.get("id")
    if request_id is not None and (isinstance(request_id, bool)
                                   or not isinstance(request_id, (str, int))):
        request_id = None
    version = request.get("version")
    if version is None:
        raise ControlError("request has no 'version' (this VMM speaks version "
                           f"{PROTOCOL_VERSION})")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ControlError(f"unsupported protocol version {version!r:.40}; this VMM "
                           f"speaks {', '.join(map(str, SUPPORTED_VERSIONS))}")
    command = request.get("command")
    if not isinstance(command, str) or not command:
        raise ControlError("request has no 'command' string")
    args = request.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ControlError(f"'args' must be a JSON object, not {type(args).__name__}")
    return {"command": command, "args": args, "id": request_id}


# -- the client ------------------------------------------------------------------------


def send_request(path: str | os.PathLike[str], command: str, args: dict | None = None,
                 timeout: float = 30.0) -> dict:
    """Send one request to the VMM at path and return its response (ok or not).

    Raises ControlClientError with one clear line when there is no VMM to ask.
    """
    path = Path(path)
    where = str(path)
    if len(os.fsencode(where)) > SOCKET_PATH_MAX:
        raise ControlClientError(f"{where}: a socket path is at most {SOCKET_PATH_MAX} bytes")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ControlClientError(f"{where}: no such control socket (is the VM running "
                                 f"with --socket {where}?)") from None
    except OSError as e:
        raise ControlClientError(f"{where}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlClientError(f"{where}: not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(where)
        except ConnectionRefusedError:
            raise ControlClientError(f"{where}: stale control socket: no VMM is "
                                     "listening there") from None
        except PermissionError:
            raise ControlClientError(f"{where}: permission denied") from None
        except TimeoutError:
            raise ControlClientError(f"{where}: the VMM did not accept the connection "
                                     f"within {timeout:.0f} s") from None
        except OSError as e:
            raise ControlClientError(f"{where}: cannot connect: {e.strerror or e}") from None
        request = {"version": PROTOCOL_VERSION, "command": command, "args": args or {}}
        try:
            # a VMM refusing the connection may already have closed it: read its answer
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(_encode(request))
            data = bytearray()
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 64 * MAX_REQUEST:
                    raise ControlClientError(f"{where}: the answer is implausibly long")
        except TimeoutError:
            raise ControlClientError(f"{where}: the VMM did not answer within "
                                     f"{timeout:.0f} s") from None
        except OSError as e:
            raise ControlClientError(f"{where}: connection failed: {e.strerror or e}") from None
    finally:
        sock.close()
    if not data:
        raise ControlClientError(f"{where}: the VMM closed the connection without answering")
    try:
        response = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        raise ControlClientError(f"{where}: the answer is not the vmm control "
                                 "protocol") from None
    if not isinstance(response, dict) or "ok" not in response:
        raise ControlClientError(f"{where}: the answer is not the vmm control protocol")
    return response


def request_ok(path: str | os.PathLike[str], command: str, args: dict | None = None,
               timeout: float = 30.0) -> dict:
    """send_request, raising ControlClientError(error) when the VMM refused."""
    response = send_request(path, command, args, timeout)
    if not response.get("ok"):
        raise ControlClientError(str(response.get("error") or "the VMM refused the command"))
    return response


__all__ = [
    "COMMAND_LOCK_TIMEOUT", "ControlClientError", "ControlError", "ControlServer",
    "ControlledDevice", "IDLE_TIMEOUT", "KIND_ALIASES", "MAX_CLIENTS", "MAX_REQUEST",
    "PROTOCOL_VERSION", "REQUEST_TIMEOUT", "bind_control_socket", "device_control",
    "find_device", "list_devices", "parse_request", "request_ok", "send_request",
]
