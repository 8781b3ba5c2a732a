"""The seccomp policy compiler: crosvm syntax, libseccomp output checked by loading it.

Behaviour is checked for real: a forked child loads the compiled filter and makes the
system call (getpgrp, whose arguments the kernel ignores but seccomp sees), so every
operator is tested against the kernel, not against our own reading of it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from vmmcore.sandbox import policy as P
from vmmcore.sandbox.policy import PolicyError, compile_policy, parse_files

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "seccomp" / "common_device.policy"
GETPGRP = 111   # getpgrp: not in the common policy; ignores its arguments
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def run_filtered(bpf: bytes, calls: list[list[int]]) -> tuple[list | None, int]:
    """Fork; the child loads bpf and makes syscall(nr, *args) for each call.

    Returns ([(ret, errno)...] or None, wait status)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            libc.prctl(38, 1, 0, 0, 0)          # PR_SET_NO_NEW_PRIVS
            P.load_bpf(bpf)
            out = []
            for nr, *args in calls:
                ctypes.set_errno(0)
                ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
                out.append([ret, ctypes.get_errno()])
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return (json.loads(data) if data else None), status


def policy_with(tmp_path: Path, body: str, **kw) -> P.CompiledPolicy:
    p = write(tmp_path, "t.policy", f"@include {COMMON}\n{body}\n")
    return compile_policy([p], use_cache=False, **kw)


def allowed(tmp_path: Path, expr: str, args_list: list[list[int]]) -> list[bool]:
    """For `getpgrp: expr; return EPERM`, which argument lists are allowed."""
    compiled = policy_with(tmp_path, f"getpgrp: {expr}; return EPERM")
    results, status = run_filtered(compiled.bpf, [[GETPGRP, *a] for a in args_list])
    assert results is not None, f"child died: status {status:#x}"
    out = []
    for ret, err in results:
        assert ret > 0 or err == 1, (ret, err)
        out.append(ret > 0)
    return out


@pytest.mark.parametrize("expr, cases", [
    ("arg0 == 5", [([5], True), ([6], False), ([0], False)]),
    ("arg0 != 5", [([6], True), ([5], False)]),
    ("arg0 < 5", [([4], True), ([5], False), ([1 << 40], False)]),
    ("arg0 <= 5", [([5], True), ([6], False)]),
    ("arg0 > 5", [([6], True), ([5], False), ([1 << 40], True)]),
    ("arg0 >= 5", [([5], True), ([4], False)]),
    ("arg1 & 0x6", [([0, 2], True), ([0, 4], True), ([0, 1], False), ([0, 0], False)]),
    ("arg1 in 0x6", [([0, 0], True), ([0, 6], True), ([0, 1], False), ([0, 8], False)]),
    ("arg0 == 1 && arg1 == 2", [([1, 2], True), ([1, 3], False), ([0, 2], False)]),
    ("arg0 == 1 || arg1 == 2", [([1, 0], True), ([0, 2], True), ([0, 0], False)]),
    ("arg2 in ~PROT_EXEC", [([0, 0, 3], True), ([0, 0, 7], False)]),
    ("arg0 == O_RDWR|O_CLOEXEC", [([0o2000002], True), ([2], False)]),
    ("arg0 == 0x100000000", [([1 << 32], True), ([0], False)]),
    ("arg0 in PROT_READ|PROT_WRITE && arg0 & PROT_WRITE", [([2], True), ([3], True),
                                                         ([1], False), ([6], False)]),
    ("arg3 == 017", [([0, 0, 0, 15], True), ([0, 0, 0, 17], False)]),
    ("arg0 == 1 || arg0 == 3", [([1], True), ([3], True), ([0], False), ([2], False),
                                ([4], False), ([1 << 33 | 1], False)]),
    ("arg0 != 1 && arg1 != 2", [([0, 0], True), ([1, 0], False), ([0, 2], False)]),
    ("arg0 >= 2 && arg0 > 3 || arg1 <= 1", [([4, 9], True), ([3, 9], False),
                                             ([0, 1], True)]),
    ("arg0 == 4 && arg0 > 3", [([4], True), ([5], False)]),
])
def test_operators_against_the_kernel(tmp_path, expr, cases):
    args = [a for a, _ in cases]
    assert allowed(tmp_path, expr, args) == [want for _, want in cases]


def test_unlisted_syscall_kills_the_process_with_sigsys(tmp_path):
    compiled = policy_with(tmp_path, "")
    results, status = run_filtered(compiled.bpf, [[GETPGRP]])
    assert results is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_conditional_without_fallback_kills_when_false(tmp_path):
    compiled = policy_with(tmp_path, "getpgrp: arg0 == 7")
    results, _ = run_filtered(compiled.bpf, [[GETPGRP, 7]])
    assert results and results[0][0] > 0
    results, status = run_filtered(compiled.bpf, [[GETPGRP, 8]])
    assert results is None and os.WTERMSIG(status) == signal.SIGSYS


def test_log_failures_lets_unlisted_calls_run(tmp_path):
    compiled = policy_with(tmp_path, "", log_failures=True)
    assert compiled.default == P.Action("log")
    results, status = run_filtered(compiled.bpf, [[GETPGRP]])
    assert results and results[0][0] == os.getpgrp()


def test_return_errno_and_other_actions(tmp_path):
    compiled = policy_with(tmp_path, "getpgrp: return EACCES")
    results, _ = run_filtered(compiled.bpf, [[GETPGRP]])
    assert results == [[-1, 13]]
    compiled = policy_with(tmp_path, "getpgrp: return 42")
    assert run_filtered(compiled.bpf, [[GETPGRP]])[0] == [[-1, 42]]
    for action in ("kill", "kill-thread", "trap", "log", "allow", "1", "user-notify",
                   "trace"):
        parse_files([write(tmp_path, "a.policy", f"getpgrp: {action}\n")])


def test_syntax_comments_continuations_groups_numbers(tmp_path):
    p = write(tmp_path, "s.policy", """
# a comment line
read: 1   # trailing comment
{getpid, gettid}: 1
110: 1
ioctl: arg1 == FIONBIO || \\
       arg1 == FIOCLEX
@frequency ./ignored.frequency
""")
    policy = parse_files([p])
    assert set(policy.entries) == {"read", "getpid", "gettid", "getppid", "ioctl"}
    ioctl = policy.entries["ioctl"][0]
    assert ioctl.where.endswith("s.policy:6")
    assert sorted(a.value for c in ioctl.clauses for a in c) == [0x5421, 0x5451]


def test_includes_relative_then_core_dir_and_diamonds(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub, "inner.policy", "getpgrp: 1\n")
    write(tmp_path, "b.policy", "@include sub/inner.policy\n")
    top = write(tmp_path, "top.policy",
                "@include b.policy\n@include sub/inner.policy\n"
                "@include common_device.policy\n")
    policy = parse_files([top])
    assert "getpgrp" in policy.entries and "recvmsg" in policy.entries
    assert len(policy.files) == 4
    assert P.CORE_POLICY_DIR / "common_device.policy" in policy.files


@pytest.mark.parametrize("text, message", [
    ("nosuchcall: 1", "unknown system call 'nosuchcall'"),
    ("read: arg0 == NOT_A_CONSTANT", "unknown constant 'NOT_A_CONSTANT'"),
    ("read: arg0 =~ 1", "unexpected"),
    ("read: arg9 == 1", "expected arg0..arg5"),
    ("read 1", "expected 'syscall: action or expression'"),
    ("read:", "nothing after ':'"),
    ("read: arg0 == 1 junk", "unexpected 'junk'"),
    ("read: 0", "'0' is not an action"),
    ("read: return", "unexpected end of line"),
    ("read: arg0 == 1; frobnicate", "is not an action"),
    ("{read, write: 1", "unterminated"),
    ("@include nowhere.policy", "no such policy file"),
    ("@bogus x", "unknown directive @bogus"),
    ("read: arg0 == 1 || arg0 == 5; return EPERM", "cannot express the fallback"),
    ("read: arg0 in 0x3 && arg0 > 1", "a mask and a range"),
    ("read: arg0 > 1 && arg0 < 5", "against a range"),
])
def test_errors_name_file_and_line(tmp_path, text, message):
    p = write(tmp_path, "bad.policy", "# first line\n" + text + "\n")
    with pytest.raises(PolicyError) as e:
        compile_policy([p], use_cache=False)
    assert str(e.value).startswith(f"{p}:2"), str(e.value)
    assert message in str(e.value)


def test_include_loop_and_unreadable_file(tmp_path):
    write(tmp_path, "a.policy", "@include b.policy\n")
    write(tmp_path, "b.policy", "@include a.policy\n")
    with pytest.raises(PolicyError, match=r"b.policy:1: @include loop: a.policy -> "
                                          r"b.policy -> a.policy"):
        parse_files([tmp_path / "a.policy"])
    with pytest.raises(PolicyError, match="cannot read policy"):
        parse_files([tmp_path / "missing.policy"])


def test_files_merge_per_syscall(tmp_path):
    a = write(tmp_path, "a.policy", "getpgrp: arg0 == 1\nopenat: return ENOENT\n")
    b = write(tmp_path, "b.policy", "getpgrp: arg0 == 2\nopenat: return ENOENT\n")
    rules = P.merge(parse_files([a, b]))
    getppid = [r for r in rules if r.syscall == "getpgrp"]
    assert sorted(r.atoms[0].value for r in getppid) == [1, 2]
    c = write(tmp_path, "c.policy", "getpgrp: 1\n")
    assert [r.atoms for r in P.merge(parse_files([a, c])) if r.syscall == "getpgrp"] == [()]
    d = write(tmp_path, "d.policy", "openat: return EPERM\n")
    with pytest.raises(PolicyError, match="conflicting actions"):
        P.merge(parse_files([a, d]))


def test_contradictory_clause_is_dropped_not_an_error(tmp_path):
    p = write(tmp_path, "c.policy", "getpgrp: arg0 == 1 && arg0 == 2 || arg0 == 3\n")
    rules = [r for r in P.merge(parse_files([p])) if r.syscall == "getpgrp"]
    assert [(a.op, a.value) for r in rules for a in r.atoms] == [("==", 3)]


def test_bpf_cache(tmp_path, monkeypatch):
    p = write(tmp_path, "c.policy", f"@include {COMMON}\ngetpgrp: 1\n")
    cache = tmp_path / "cache"
    first = compile_policy([p], cache=cache)
    assert not first.cached and (cache / f"{first.key}.bpf").read_bytes() == first.bpf
    second = compile_policy([p], cache=cache)
    assert second.cached and second.bpf == first.bpf and second.key == first.key
    # The key covers included files' text and the default action.
    assert compile_policy([p], cache=cache, log_failures=True).key != first.key
    p.write_text(p.read_text() + "gettid: 1\n")
    assert compile_policy([p], cache=cache).key != first.key
    # A damaged cache entry is recompiled.
    (cache / f"{first.key}.bpf").write_bytes(b"abc")
    p.write_text(f"@include {COMMON}\ngetpgrp: 1\n")
    again = compile_policy([p], cache=cache)
    assert not again.cached and again.bpf == first.bpf
    # $VMM_SECCOMP_CACHE, else ~/.cache/vmm/seccomp.
    monkeypatch.setenv("VMM_SECCOMP_CACHE", str(tmp_path / "env"))
    assert P.cache_dir() == tmp_path / "env"
    monkeypatch.delenv("VMM_SECCOMP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert P.cache_dir() == tmp_path / ".cache" / "vmm" / "seccomp"
    # A cached filter loads and works like a fresh one.
    results, _ = run_filtered(second.bpf, [[GETPGRP]])
    assert results and results[0][0] == os.getpgrp()


def _plugin_policies() -> list[Path]:
    return sorted(ROOT.glob("plugins/*/vmm_*/*.policy"))


@pytest.mark.parametrize("path", [COMMON, *_plugin_policies()],
                         ids=lambda p: p.name)
def test_shipped_policies_compile(path):
    # Fragments (disk formats, displays) are compiled together with the common policy,
    # as the device process that loads them does.
    compiled = compile_policy([path, COMMON], use_cache=False)
    assert compiled.instructions > 10


def test_binding_found_although_seccomp_dir_shadows_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    saved = sys.modules.pop("seccomp", None)
    try:
        # Without the `seccomp` binding installed (3.11: pyseccomp), `import seccomp`
        # finds the policy directory as a namespace package.
        mod = P._import_binding()
        assert mod is not None and hasattr(mod, "SyscallFilter")
    finally:
        sys.modules.pop("seccomp", None)
        if saved is not None:
            sys.modules["seccomp"] = saved


def test_syscall_names():
    assert P.resolve_syscall("read") == 0
    assert P.resolve_syscall("no_such_call") is None
    assert P.syscall_name(41) == "socket"
    assert P.syscall_name(99999) == "syscall 99999"
