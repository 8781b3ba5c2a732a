"""Seccomp policies in crosvm's (minijail's) syntax, compiled with libseccomp, cached as BPF.

A policy file lists the system calls a device process may make::

    # comment
    read: 1                                   # always allowed
    ioctl: arg1 == FIONBIO || arg1 == FIOCLEX # allowed when the expression holds
    mmap: arg2 in ~PROT_EXEC                  # arg2 has no bits outside the mask
    clone: arg0 & CLONE_THREAD                # arg0 has at least one of the mask's bits
    fcntl: arg1 == F_GETFL; return EINVAL     # otherwise: fail with EINVAL (not killed)
    openat: return ENOENT                     # never executed, always fails with ENOENT
    {getpid, gettid}: 1                       # several system calls at once
    @include common_device.policy             # another file, relative to this one

Comparison operators: ``==  !=  <  <=  >  >=`` (unsigned 64-bit), ``&`` (some bit of
the mask is set) and ``in`` (no bit outside the mask is set). ``&&`` binds tighter than
``||``; there are no parentheses in expressions (as in minijail). Constants are numbers
(decimal, 0x hex, 0 octal), names from :data:`CONSTANTS` (O_RDONLY, PROT_READ, FIONBIO,
errno names, ...), combined with ``|``, ``~`` and parentheses. Actions: ``1`` or
``allow``, ``return ERRNO``, ``kill`` (process), ``kill-thread``, ``trap``, ``log``,
``trace``, ``user-notify``. A line ending with a backslash continues on the next one.

Several files (e.g. a device's policy and its disk format's) compile into one filter;
entries for the same system call are merged: an unconditional allow wins, conditional
allows are OR-ed, and two different fallback actions for one system call are an error.

What libseccomp (2.5) cannot express is refused with a PolicyError, not approximated:
one ``&&`` clause may test an argument several times only when the tests merge into one
comparison (``==``/``&``/``in`` into one masked test, bounds into one bound: ``arg0 > 1
&& arg0 < 5`` is refused), and a ``; return`` fallback must have a complement that fits
that rule (``arg0 == 1 || arg0 == 5; return EPERM`` does not: its complement holds
for 2..4). ``!=`` is compiled as ``<`` or ``>``.

System calls not listed get the default action: KILL_PROCESS (the process dies with
SIGSYS; see vmmcore.sandbox.proxy for how the syscall is then named), or LOG with
``--seccomp-log-failures`` (the kernel logs the call to the audit log and lets it run).

Compiled filters are cached as BPF under ~/.cache/vmm/seccomp (or $VMM_SECCOMP_CACHE),
keyed by a hash of every policy text, the architecture and the default action, so a
device process only loads bytes: it does not need libseccomp at all.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmmcore.errors import VmmError


def _import_binding():
    """libseccomp's binding: `seccomp` (mephi42-seccomp on PyPI for 3.12+, python3-seccomp
    on Debian) or `pyseccomp` (the same API over ctypes; 3.11).

    The project's own policy directory is called seccomp/ too, and when the source tree
    is on sys.path (pytest, `python -m` from a checkout) it would be imported as an empty
    namespace package; so a module without SyscallFilter is skipped and the import
    retried without the path entries that hold such a directory.
    """
    import importlib
    import sys

    for name in ("seccomp", "pyseccomp"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "SyscallFilter"):
            return mod
        saved_path, saved_mod = sys.path[:], sys.modules.pop(name, None)
        try:
            sys.path[:] = [p for p in sys.path
                           if not os.path.isdir(os.path.join(p or ".", name))]
            mod = importlib.import_module(name)
            if hasattr(mod, "SyscallFilter"):
                return mod
            sys.modules.pop(name, None)
        except ImportError:
            pass
        finally:
            sys.path[:] = saved_path
        if saved_mod is not None and name not in sys.modules:
            sys.modules[name] = saved_mod
    return None


_seccomp = _import_binding()

U64 = (1 << 64) - 1
POLICY_FORMAT = 1          # bump when the compiler's output for the same text changes

#: Where the core's policies (common_device.policy ...) live: vmmcore/_seccomp in an
#: installed wheel (setup.py copies seccomp/ there), else seccomp/ in the source tree.
CORE_POLICY_DIRS = (Path(__file__).resolve().parents[1] / "_seccomp",
                    Path(__file__).resolve().parents[2] / "seccomp")
CORE_POLICY_DIR = next((d for d in CORE_POLICY_DIRS if d.is_dir()), CORE_POLICY_DIRS[-1])


class PolicyError(VmmError):
    """A policy file is wrong; the message starts with file:line."""


def seccomp_module():
    """The libseccomp binding, or a PolicyError saying which package to install."""
    if _seccomp is None:
        raise PolicyError("no libseccomp Python binding: pip install pyseccomp (Python 3.11) "
                          "or mephi42-seccomp (3.12+)")
    return _seccomp


# -- constants ------------------------------------------------------------------------

def _build_constants() -> dict[str, int]:
    import errno
    import fcntl
    import mmap
    import signal
    import socket

    c: dict[str, int] = {}
    for name in dir(errno):
        if name.startswith("E") and isinstance(getattr(errno, name), int):
            c[name] = getattr(errno, name)
    for mod, prefixes in ((os, ("O_", "F_", "EFD_", "MFD_", "SEEK_", "CLONE_", "P_",
                                "RWF_", "AT_", "WNOHANG", "WEXITED", "POSIX_FADV_",
                                "GRND_", "SCHED_", "RTLD_")),
                          (fcntl, ("F_", "FD_", "LOCK_", "FALLOC_FL_")),
                          (mmap, ("PROT_", "MAP_", "MADV_")),
                          (socket, ("AF_", "SOCK_", "MSG_", "SOL_", "SO_", "SHUT_",
                                    "SCM_")),
                          (signal, ("SIG", "SA_"))):
        for name in dir(mod):
            value = getattr(mod, name)
            if name.startswith(prefixes) and isinstance(value, int) and not name.startswith(
                    ("SIG_", "SIGRT")):
                c.setdefault(name, int(value))
    # The rest from the Linux UAPI headers (x86_64 values).
    c.update({
        "O_RDONLY": 0, "O_WRONLY": 1, "O_RDWR": 2, "O_ACCMODE": 3, "O_CREAT": 0o100,
        "O_EXCL": 0o200, "O_NOCTTY": 0o400, "O_TRUNC": 0o1000, "O_APPEND": 0o2000,
        "O_NONBLOCK": 0o4000, "O_DSYNC": 0o10000, "O_DIRECT": 0o40000,
        "O_LARGEFILE": 0o100000, "O_DIRECTORY": 0o200000, "O_NOFOLLOW": 0o400000,
        "O_NOATIME": 0o1000000, "O_CLOEXEC": 0o2000000, "O_SYNC": 0o4010000,
        "O_PATH": 0o10000000, "O_TMPFILE": 0o20200000,
        "R_OK": 4, "W_OK": 2, "X_OK": 1,
        "PROT_NONE": 0, "PROT_READ": 1, "PROT_WRITE": 2, "PROT_EXEC": 4,
        "PROT_GROWSDOWN": 0x01000000, "PROT_GROWSUP": 0x02000000,
        "MAP_SHARED": 1, "MAP_PRIVATE": 2, "MAP_SHARED_VALIDATE": 3, "MAP_FIXED": 0x10,
        "MAP_ANONYMOUS": 0x20, "MAP_NORESERVE": 0x4000, "MAP_POPULATE": 0x8000,
        "MAP_STACK": 0x20000, "MAP_FIXED_NOREPLACE": 0x100000,
        "FIONBIO": 0x5421, "FIOCLEX": 0x5451, "FIONCLEX": 0x5450, "FIONREAD": 0x541B,
        "FIOASYNC": 0x5452, "TCGETS": 0x5401, "TCSETS": 0x5402, "TIOCGWINSZ": 0x5413,
        "BLKGETSIZE64": 0x80081272, "BLKSSZGET": 0x1268, "BLKFLSBUF": 0x1261,
        "F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_SETFL": 4,
        "F_DUPFD_CLOEXEC": 1030, "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034,
        "F_SEAL_SEAL": 1, "F_SEAL_SHRINK": 2, "F_SEAL_GROW": 4, "F_SEAL_WRITE": 8,
        "FD_CLOEXEC": 1,
        "AT_FDCWD": -100, "AT_EMPTY_PATH": 0x1000, "AT_SYMLINK_NOFOLLOW": 0x100,
        "CLONE_VM": 0x100, "CLONE_FS": 0x200, "CLONE_FILES": 0x400,
        "CLONE_SIGHAND": 0x800, "CLONE_PIDFD": 0x1000, "CLONE_PTRACE": 0x2000,
        "CLONE_VFORK": 0x4000, "CLONE_PARENT": 0x8000, "CLONE_THREAD": 0x10000,
        "CLONE_NEWNS": 0x20000, "CLONE_SYSVSEM": 0x40000, "CLONE_SETTLS": 0x80000,
        "CLONE_PARENT_SETTID": 0x100000, "CLONE_CHILD_CLEARTID": 0x200000,
        "CLONE_DETACHED": 0x400000, "CLONE_UNTRACED": 0x800000,
        "CLONE_CHILD_SETTID": 0x1000000, "CLONE_NEWCGROUP": 0x2000000,
        "CLONE_NEWUTS": 0x4000000, "CLONE_NEWIPC": 0x8000000, "CLONE_NEWUSER": 0x10000000,
        "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000, "CLONE_IO": 0x80000000,
        "FUTEX_WAIT": 0, "FUTEX_WAKE": 1, "FUTEX_FD": 2, "FUTEX_REQUEUE": 3,
        "FUTEX_CMP_REQUEUE": 4, "FUTEX_WAKE_OP": 5, "FUTEX_LOCK_PI": 6,
        "FUTEX_UNLOCK_PI": 7, "FUTEX_TRYLOCK_PI": 8, "FUTEX_WAIT_BITSET": 9,
        "FUTEX_WAKE_BITSET": 10, "FUTEX_WAIT_REQUEUE_PI": 11, "FUTEX_CMP_REQUEUE_PI": 12,
        "FUTEX_LOCK_PI2": 13, "FUTEX_PRIVATE_FLAG": 128, "FUTEX_CLOCK_REALTIME": 256,
        "PR_SET_PDEATHSIG": 1, "PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3,
        "PR_SET_DUMPABLE": 4, "PR_SET_NAME": 15, "PR_GET_NAME": 16,
        "PR_SET_SECCOMP": 22, "PR_CAPBSET_READ": 23, "PR_SET_NO_NEW_PRIVS": 38,
        "PR_GET_NO_NEW_PRIVS": 39, "PR_SET_VMA": 0x53564D41,
        "MADV_NORMAL": 0, "MADV_RANDOM": 1, "MADV_SEQUENTIAL": 2, "MADV_WILLNEED": 3,
        "MADV_DONTNEED": 4, "MADV_FREE": 8, "MADV_REMOVE": 9, "MADV_DONTFORK": 10,
        "MADV_DOFORK": 11, "MADV_MERGEABLE": 12, "MADV_HUGEPAGE": 14,
        "MADV_NOHUGEPAGE": 15, "MADV_DONTDUMP": 16,
        "EFD_SEMAPHORE": 1, "EFD_CLOEXEC": 0o2000000, "EFD_NONBLOCK": 0o4000,
        "MFD_CLOEXEC": 1, "MFD_ALLOW_SEALING": 2, "MFD_HUGETLB": 4,
        "SOCK_STREAM": 1, "SOCK_DGRAM": 2, "SOCK_RAW": 3, "SOCK_SEQPACKET": 5,
        "SOCK_NONBLOCK": 0o4000, "SOCK_CLOEXEC": 0o2000000,
        "AF_UNSPEC": 0, "AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10,
        "AF_NETLINK": 16, "AF_VSOCK": 40,
        "SIG_BLOCK": 0, "SIG_UNBLOCK": 1, "SIG_SETMASK": 2,
        "CLOCK_REALTIME": 0, "CLOCK_MONOTONIC": 1, "CLOCK_PROCESS_CPUTIME_ID": 2,
        "CLOCK_THREAD_CPUTIME_ID": 3, "CLOCK_MONOTONIC_RAW": 4, "CLOCK_BOOTTIME": 7,
        "FALLOC_FL_KEEP_SIZE": 1, "FALLOC_FL_PUNCH_HOLE": 2, "FALLOC_FL_ZERO_RANGE": 0x10,
        "EPOLL_CLOEXEC": 0o2000000, "EPOLL_CTL_ADD": 1, "EPOLL_CTL_DEL": 2,
        "EPOLL_CTL_MOD": 3,
        "SECCOMP_GET_ACTION_AVAIL": 2,
        "RLIMIT_NOFILE": 7, "RLIMIT_AS": 9, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
        "RLIMIT_CORE": 4,
        "GRND_NONBLOCK": 1, "GRND_RANDOM": 2,
        "SCHED_OTHER": 0, "SCHED_FIFO": 1, "SCHED_RR": 2, "SCHED_BATCH": 3,
        "SCHED_IDLE": 5,
    })
    return c


#: Names usable in expressions and ``return`` (errno names) — a reasonable table.
CONSTANTS: dict[str, int] = _build_constants()


# -- the policy model ----------------------------------------------------------------

_OPS = ("==", "!=", "<=", ">=", "<", ">", "&", "in")


@dataclass(frozen=True, order=True)
class Atom:
    """One comparison libseccomp can do: (arg op value), or (arg & mask) == value."""

    arg: int
    op: str           # "==", "!=", "<", "<=", ">", ">=", "masked"
    value: int
    mask: int = U64


Clause = tuple[Atom, ...]          # AND of atoms; the empty clause is "always"


@dataclass(frozen=True)
class Action:
    """What happens: allow, errno N, kill, kill-thread, trap, log, trace, user-notify."""

    kind: str
    value: int = 0

    def __str__(self) -> str:
        return f"return {self.value}" if self.kind == "errno" else self.kind

    def seccomp_action(self) -> int:
        s = seccomp_module()
        if self.kind == "allow":
            return s.ALLOW
        if self.kind == "errno":
            return s.ERRNO(self.value)
        if self.kind == "trace":
            return s.TRACE(self.value)
        return {"kill": s.KILL_PROCESS, "kill-thread": s.KILL, "trap": s.TRAP,
                "log": s.LOG, "user-notify": s.NOTIFY}[self.kind]


ALLOW = Action("allow")


@dataclass
class Entry:
    """One line of a policy: allow when any clause holds, else the fallback action."""

    syscall: str
    nr: int
    where: str                       # "file:line"
    clauses: list[Clause] | None     # None: unconditional (action applies always)
    action: Action = ALLOW           # for unconditional entries: the action
    fallback: Action | None = None   # for conditional entries: `; return ...`


@dataclass
class Policy:
    """Every entry of a set of files, merged per system call, in a stable order."""

    files: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    entries: dict[str, list[Entry]] = field(default_factory=dict)


# -- parsing ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(\|\||&&|==|!=|<=|>=|[<>&|~(){},;:]|[A-Za-z_][A-Za-z0-9_\-]*"
                    r"|-?0[xX][0-9a-fA-F]+|-?\d+)")


def _tokenize(text: str, where: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise PolicyError(f"{where}: unexpected {text[pos:].strip()[:20]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], where: str) -> None:
        self.t, self.i, self.where = tokens, 0, where

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None:
            raise PolicyError(f"{self.where}: unexpected end of line"
                              + (f", expected {expected!r}" if expected else ""))
        if expected is not None and tok != expected:
            raise PolicyError(f"{self.where}: expected {expected!r}, found {tok!r}")
        self.i += 1
        return tok

    # constant := term ('|' term)* ; term := '~' term | '(' constant ')' | NUMBER | NAME
    def constant(self) -> int:
        value = self._term()
        while self.peek() == "|":
            self.take()
            value |= self._term()
        return value & U64

    def _term(self) -> int:
        tok = self.take()
        if tok == "~":
            return ~self._term() & U64
        if tok == "(":
            value = self.constant()
            self.take(")")
            return value
        return _number(tok, self.where) & U64

    def action(self) -> Action:
        tok = self.take()
        if tok == "return":
            tok = self.take()
            if tok in CONSTANTS and tok.startswith("E"):
                return Action("errno", CONSTANTS[tok])
            return Action("errno", _number(tok, self.where))
        if tok in ("1", "allow"):
            return ALLOW
        if tok in ("kill", "kill-process"):
            return Action("kill")
        if tok in ("kill-thread", "trap", "log", "user-notify"):
            return Action(tok)
        if tok == "trace":
            return Action("trace", 0)
        raise PolicyError(f"{self.where}: {tok!r} is not an action (1, allow, return ERRNO, "
                          "kill, kill-thread, trap, log, trace, user-notify)")

    # expr := clause ('||' clause)* ; clause := atom ('&&' atom)*
    def expression(self) -> list[list[tuple[int, str, int]]]:
        clauses = [self._clause()]
        while self.peek() == "||":
            self.take()
            clauses.append(self._clause())
        return clauses

    def _clause(self) -> list[tuple[int, str, int]]:
        atoms = [self._atom()]
        while self.peek() == "&&":
            self.take()
            atoms.append(self._atom())
        return atoms

    def _atom(self) -> tuple[int, str, int]:
        tok = self.take()
        m = re.fullmatch(r"arg([0-5])", tok)
        if not m:
            raise PolicyError(f"{self.where}: expected arg0..arg5, found {tok!r}")
        op = self.take()
        if op not in _OPS:
            raise PolicyError(f"{self.where}: {op!r} is not an operator "
                              f"({' '.join(_OPS)})")
        return int(m.group(1)), op, self.constant()


def _number(tok: str, where: str) -> int:
    if tok in CONSTANTS:
        return CONSTANTS[tok]
    try:
        if re.fullmatch(r"-?0[0-7]+", tok):
            return int(tok, 8)
        return int(tok, 0)
    except ValueError:
        raise PolicyError(f"{where}: unknown constant {tok!r}") from None


def _atoms_of(arg: int, op: str, value: int) -> list[Atom]:
    """The libseccomp atoms (OR-ed) for one source comparison.

    `!=` becomes `< or >`: libseccomp 2.5 loses rules that combine != tests of several
    arguments with other actions, while ranges and masked tests come out right.
    """
    if op == "&":       # some bit of the mask set: one masked test per bit
        bits = [1 << b for b in range(64) if value >> b & 1]
        return [Atom(arg, "masked", b, b) for b in bits]
    if op == "in":      # no bit outside the mask
        return [Atom(arg, "masked", 0, ~value & U64)]
    if op == "!=":
        return _not_equal(arg, value)
    return [Atom(arg, op, value)]


def _not_equal(arg: int, value: int) -> list[Atom]:
    out = []
    if value > 0:
        out.append(Atom(arg, "<", value))
    if value < U64:
        out.append(Atom(arg, ">", value))
    return out


_RANGE_OPS = ("<", "<=", ">", ">=")


def _normalize(atoms: Iterable[Atom], where: str, syscall: str) -> Clause | None:
    """Merge the tests of each argument into one libseccomp comparison.

    Masked and == tests merge into one masked test; <, <=, >, >= into one bound. None
    when the clause can never hold; PolicyError when one comparison cannot say it (a
    range bounded on both sides, a range with a partial mask).
    """
    by_arg: dict[int, list[Atom]] = {}
    for a in atoms:
        if a.op == "==":
            a = Atom(a.arg, "masked", a.value & U64, U64)
        by_arg.setdefault(a.arg, []).append(a)
    out: list[Atom] = []
    for arg, group in sorted(by_arg.items()):
        masked = [a for a in group if a.op == "masked"]
        ranges = [a for a in group if a.op in _RANGE_OPS]
        mask = value = 0
        for a in masked:
            if (value ^ a.value) & mask & a.mask:
                return None           # contradictory: the clause never holds
            mask |= a.mask
            value = (value & ~a.mask) | (a.value & a.mask)
        value &= mask
        lo, hi = 0, U64
        for a in ranges:
            if a.op == "<":
                hi = min(hi, a.value - 1)
            elif a.op == "<=":
                hi = min(hi, a.value)
            elif a.op == ">":
                lo = max(lo, a.value + 1)
            else:
                lo = max(lo, a.value)
        if lo > hi:
            return None
        if masked and ranges:
            if mask != U64:
                raise PolicyError(f"{where}: {syscall}: libseccomp cannot test arg{arg} "
                                  "with a mask and a range in one && clause; restate it")
            if not lo <= value <= hi:
                return None
            ranges = []
        if masked:
            out.append(Atom(arg, "==", value) if mask == U64 else
                       Atom(arg, "masked", value, mask))
        elif ranges:
            if lo == hi:
                out.append(Atom(arg, "==", lo))
            elif lo == 0 and hi < U64:
                out.append(Atom(arg, "<=", hi))
            elif hi == U64 and lo > 0:
                out.append(Atom(arg, ">=", lo))
            elif lo > 0 and hi < U64:
                raise PolicyError(f"{where}: {syscall}: libseccomp cannot test arg{arg} "
                                  f"against a range ({lo:#x}..{hi:#x}) in one && clause; "
                                  "restate the condition")
    return tuple(out)


def _dnf(source: list[list[tuple[int, str, int]]], where: str, syscall: str) -> list[Clause]:
    clauses: list[Clause] = []
    for src_clause in source:
        expanded: list[list[Atom]] = [[]]
        for arg, op, value in src_clause:
            alts = _atoms_of(arg, op, value)
            if not alts:            # `arg & 0`: never true
                expanded = []
                break
            expanded = [c + [a] for c in expanded for a in alts]
            if len(expanded) > _MAX_CLAUSES:
                raise PolicyError(f"{where}: {syscall}: expression too large")
        for c in expanded:
            norm = _normalize(c, where, syscall)
            if norm is not None and norm not in clauses:
                clauses.append(norm)
    return clauses


_MAX_CLAUSES = 512
_NEGATE = {"<": ">=", ">=": "<", "<=": ">", ">": "<="}


def _negate_atom(a: Atom) -> list[Atom]:
    if a.op == "masked":     # some masked bit differs from the wanted value
        return [Atom(a.arg, "masked", ~a.value & (1 << b), 1 << b)
                for b in range(64) if a.mask >> b & 1]
    if a.op == "==":
        return _not_equal(a.arg, a.value)
    return [Atom(a.arg, _NEGATE[a.op], a.value)]


def complement(clauses: list[Clause], where: str, syscall: str) -> list[Clause]:
    """NOT (OR of clauses), as an OR of clauses libseccomp can express."""
    result: list[list[Atom]] = [[]]
    for clause in clauses:
        alts = [n for a in clause for n in _negate_atom(a)]
        result = [r + [n] for r in result for n in alts]
        pruned = []
        for r in result:
            try:
                norm = _normalize(r, where, syscall)
            except PolicyError as e:
                raise PolicyError(
                    f"{where}: {syscall}: libseccomp cannot express the fallback action "
                    f"({str(e).rsplit(': ', 1)[-1].split(';')[0]} in its complement); "
                    "list the fallback cases explicitly instead") from None
            if norm is not None and list(norm) not in pruned:
                pruned.append(list(norm))
        result = pruned
        if len(result) > _MAX_CLAUSES:
            raise PolicyError(f"{where}: {syscall}: the fallback's complement is too large")
    return [tuple(r) for r in result]


def resolve_syscall(name: str) -> int | None:
    """The x86_64 number of a system call name, or None if libseccomp does not know it."""
    s = seccomp_module()
    try:
        nr = s.resolve_syscall(s.Arch.NATIVE if hasattr(s.Arch, "NATIVE") else 0, name)
    except Exception:
        return None
    return nr if isinstance(nr, int) and nr >= 0 else None


def syscall_name(nr: int) -> str:
    """The name of system call nr on this architecture ('syscall N' if unknown)."""
    s = seccomp_module()
    try:
        name = s.resolve_syscall(s.Arch.NATIVE if hasattr(s.Arch, "NATIVE") else 0, nr)
    except Exception:
        name = None
    if isinstance(name, bytes):
        name = name.decode()
    return name or f"syscall {nr}"


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, text) with comments stripped and backslash continuations joined."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            yield start, line.strip()
    if pending.strip():
        yield start, pending.strip()


def parse_files(paths: Sequence[str | os.PathLike[str]],
                search_path: Sequence[str | os.PathLike[str]] = ()) -> Policy:
    """Parse policy files (and what they @include) into one merged Policy."""
    policy = Policy()
    dirs = [Path(d) for d in search_path] + [d for d in CORE_POLICY_DIRS if d.is_dir()]
    for p in paths:
        _parse_file(Path(p), policy, dirs, stack=[], where="command line")
    return policy


def _find_include(name: str, current: Path, dirs: list[Path]) -> Path | None:
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    for d in [current.parent, *dirs]:
        if (d / candidate).is_file():
            return d / candidate
    return None


def _parse_file(path: Path, policy: Policy, dirs: list[Path], stack: list[Path],
                where: str) -> None:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in [*stack, path])
        raise PolicyError(f"{where}: @include loop: {chain}")
    if path in policy.files:
        return                       # included twice (diamond): once is enough
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"{where}: cannot read policy {path}: {e.strerror}") from None
    policy.files.append(path)
    policy.texts.append(text)
    for number, line in _logical_lines(text):
        loc = f"{path}:{number}"
        if line.startswith("@"):
            directive, _, arg = line.partition(" ")
            arg = arg.strip()
            if directive == "@include":
                if not arg:
                    raise PolicyError(f"{loc}: @include needs a file name")
                found = _find_include(arg, path, dirs)
                if found is None:
                    raise PolicyError(f"{loc}: @include {arg}: no such policy file "
                                      f"(looked beside {path.name} and in "
                                      f"{', '.join(str(d) for d in dirs)})")
                _parse_file(found, policy, dirs, [*stack, path], loc)
            elif directive in ("@frequency", "@denylist", "@allowlist"):
                continue             # minijail hints for its own compiler: not needed
            else:
                raise PolicyError(f"{loc}: unknown directive {directive}")
            continue
        _parse_line(line, loc, policy)


def _parse_line(line: str, loc: str, policy: Policy) -> None:
    names_part, sep, body = line.partition(":")
    if not sep:
        raise PolicyError(f"{loc}: expected 'syscall: action or expression'")
    names_part = names_part.strip()
    if names_part.startswith("{"):
        if not names_part.endswith("}"):
            raise PolicyError(f"{loc}: unterminated {{ ... }} syscall group")
        names = [n.strip() for n in names_part[1:-1].split(",") if n.strip()]
    else:
        names = [names_part]
    if not names:
        raise PolicyError(f"{loc}: no system call named")
    p = _Parser(_tokenize(body, loc), loc)
    if p.peek() is None:
        raise PolicyError(f"{loc}: nothing after ':' (use 1 to allow)")
    clauses_src = None
    if p.peek() in ("1", "allow", "return", "kill", "kill-process", "kill-thread", "trap",
                    "log", "trace", "user-notify"):
        action, fallback = p.action(), None
    elif p.peek() == "0":
        raise PolicyError(f"{loc}: '0' is not an action: leave the system call out to deny "
                          "it, or use 'return ERRNO'")
    else:
        clauses_src = p.expression()
        action, fallback = ALLOW, None
        if p.peek() == ";":
            p.take()
            fallback = p.action()
    if p.peek() is not None:
        raise PolicyError(f"{loc}: unexpected {p.peek()!r}")
    for name in names:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*|\d+", name):
            raise PolicyError(f"{loc}: {name!r} is not a system call name")
        if name.isdigit():
            nr = int(name)
            name = syscall_name(nr) if not syscall_name(nr).startswith("syscall ") else name
        else:
            resolved = resolve_syscall(name)
            if resolved is None:
                raise PolicyError(f"{loc}: unknown system call {name!r}")
            nr = resolved
        clauses = None if clauses_src is None else _dnf(clauses_src, loc, name)
        policy.entries.setdefault(name, []).append(
            Entry(name, nr, loc, clauses, action, fallback))


# -- compiling --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One libseccomp rule: action for syscall when all atoms hold."""

    syscall: str
    nr: int
    action: Action
    atoms: Clause


def merge(policy: Policy) -> list[Rule]:
    """Rules for libseccomp from the merged entries (see the module docstring)."""
    rules: list[Rule] = []
    for name, entries in policy.entries.items():
        nr = entries[0].nr
        uncond = [e for e in entries if e.clauses is None]
        allow_all = [e for e in uncond if e.action == ALLOW]
        if allow_all:
            rules.append(Rule(name, nr, ALLOW, ()))
            continue
        others = {e.action for e in uncond}
        fallbacks = {e.fallback for e in entries if e.fallback is not None}
        decided = others | fallbacks
        if len(decided) > 1:
            locs = ", ".join(f"{e.where} ({e.action if e.clauses is None else e.fallback})"
                             for e in entries if e.clauses is None or e.fallback)
            raise PolicyError(f"{entries[0].where}: {name}: conflicting actions: {locs}")
        clauses: list[Clause] = []
        for e in entries:
            for c in e.clauses or []:
                if c not in clauses:
                    clauses.append(c)
        if () in clauses:            # a clause that always holds
            rules.append(Rule(name, nr, ALLOW, ()))
            continue
        for c in clauses:
            rules.append(Rule(name, nr, ALLOW, c))
        if decided:
            fallback = decided.pop()
            where = next(e.where for e in entries
                         if e.clauses is None or e.fallback is not None)
            if not clauses:
                rules.append(Rule(name, nr, fallback, ()))
            else:
                for c in complement(clauses, where, name):
                    rules.append(Rule(name, nr, fallback, c))
    return rules


_CMP = {"==": "EQ", "<": "LT", "<=": "LE", ">": "GT", ">=": "GE"}


def build_filter(rules: Sequence[Rule], default: Action):
    """A libseccomp SyscallFilter for rules (not loaded)."""
    s = seccomp_module()
    f = s.SyscallFilter(default.seccomp_action())
    with _suppress_attr():
        f.set_attr(s.Attr.ACT_BADARCH, s.KILL_PROCESS)
    for r in rules:
        args = []
        for a in r.atoms:
            if a.op == "masked":
                args.append(s.Arg(a.arg, s.MASKED_EQ, a.mask, a.value))
            else:
                args.append(s.Arg(a.arg, getattr(s, _CMP[a.op]), a.value))
        try:
            f.add_rule(r.action.seccomp_action(), r.syscall, *args)
        except Exception as e:
            raise PolicyError(f"{r.syscall}: libseccomp refused the rule "
                              f"{r.action} {r.atoms}: {e}") from None
    return f


class _suppress_attr:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


@dataclass(frozen=True)
class CompiledPolicy:
    """A BPF program ready to load into a process; see load()."""

    bpf: bytes
    files: tuple[Path, ...]
    default: Action
    key: str
    cached: bool = False

    @property
    def instructions(self) -> int:
        return len(self.bpf) // 8

    def load(self, listener: bool = False) -> int | None:
        """Install the filter on the calling thread (and its future threads/children).

        Needs no_new_privs (or CAP_SYS_ADMIN). Loads the BPF directly, so the process
        loading it needs neither libseccomp nor any file. With listener, KILL_PROCESS
        becomes USER_NOTIF and the listener fd is returned (None when the kernel cannot,
        after loading the plain filter instead).
        """
        if listener and self.default.kind == "kill":
            try:
                return load_bpf_with_listener(self.bpf)
            except OSError:
                pass                   # an old kernel: kill, and name it from the audit log
        load_bpf(self.bpf)
        return None


def cache_dir() -> Path:
    env = os.environ.get("VMM_SECCOMP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmm" / "seccomp"


def _arch_name() -> str:
    s = seccomp_module()
    try:
        return str(s.system_arch())
    except Exception:  # pragma: no cover
        return os.uname().machine


def compile_policy(paths: Sequence[str | os.PathLike[str]], *, log_failures: bool = False,
                   search_path: Sequence[str | os.PathLike[str]] = (),
                   use_cache: bool = True, cache: Path | None = None) -> CompiledPolicy:
    """Compile policy files (merged, with their includes) into BPF, through the cache.

    The default action for unlisted system calls is KILL_PROCESS, or LOG when
    log_failures (``--seccomp-log-failures``). Raises PolicyError with file:line.
    """
    policy = parse_files(paths, search_path)
    default = Action("log") if log_failures else Action("kill")
    h = hashlib.sha256()
    h.update(f"vmm-seccomp/{POLICY_FORMAT}/{_arch_name()}/{default}/"
             f"{getattr(_seccomp, '__name__', '?')}\0".encode())
    for p, text in zip(policy.files, policy.texts, strict=True):
        h.update(str(p).encode() + b"\0" + text.encode() + b"\0")
    key = h.hexdigest()
    directory = cache if cache is not None else cache_dir()
    path = directory / f"{key}.bpf"
    if use_cache:
        try:
            data = path.read_bytes()
            if data and len(data) % 8 == 0:
                return CompiledPolicy(data, tuple(policy.files), default, key, cached=True)
        except OSError:
            pass
    rules = merge(policy)
    f = build_filter(rules, default)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        data = tmp.read()
    if use_cache:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmpname = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmpname, path)
        except OSError:
            pass                     # a read-only home: compile every time
    return CompiledPolicy(data, tuple(policy.files), default, key, cached=False)


def pfc(paths: Sequence[str | os.PathLike[str]], *, log_failures: bool = False,
        search_path: Sequence[str | os.PathLike[str]] = ()) -> str:
    """libseccomp's pseudo filter code for the policy (for humans, `vmm` debugging)."""
    policy = parse_files(paths, search_path)
    f = build_filter(merge(policy), Action("log") if log_failures else Action("kill"))
    with tempfile.TemporaryFile("w+") as tmp:
        f.export_pfc(tmp)
        tmp.seek(0)
        return tmp.read()


# -- loading raw BPF -----------------------------------------------------------------

class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_libc = ctypes.CDLL(None, use_errno=True)


SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_KILL_PROCESS = 0x8000_0000
SECCOMP_RET_USER_NOTIF = 0x7FC0_0000
#: ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, struct seccomp_notif[80 bytes])
SECCOMP_IOCTL_NOTIF_RECV = 0xC050_2100
_BPF_RET_K = 0x06
_libc.syscall.restype = ctypes.c_long


def _prog(bpf: bytes) -> tuple[_SockFprog, object]:
    n = len(bpf) // 8
    if n == 0 or len(bpf) % 8 or n > 0xFFFF:
        raise ValueError(f"bad BPF program of {len(bpf)} bytes")
    buf = (_SockFilter * n).from_buffer_copy(bpf)
    return _SockFprog(n, ctypes.cast(buf, ctypes.POINTER(_SockFilter))), buf


def load_bpf(bpf: bytes) -> None:
    """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, bpf) on the calling thread."""
    prog, _keep = _prog(bpf)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"loading the seccomp filter: {os.strerror(err)}")


def kill_to_notify(bpf: bytes) -> bytes:
    """The same program with every KILL_PROCESS return turned into USER_NOTIF."""
    out = bytearray(bpf)
    for off in range(0, len(out), 8):
        code, k = int.from_bytes(out[off:off + 2], "little"), int.from_bytes(
            out[off + 4:off + 8], "little")
        if code == _BPF_RET_K and k == SECCOMP_RET_KILL_PROCESS:
            out[off + 4:off + 8] = SECCOMP_RET_USER_NOTIF.to_bytes(4, "little")
    return bytes(out)


def load_bpf_with_listener(bpf: bytes) -> int:
    """Load bpf with its KILL_PROCESS actions as USER_NOTIF; returns the listener fd.

    Whoever holds the listener sees each forbidden call (its number, in
    struct seccomp_notif) while the calling thread waits, and then kills the process:
    the unprivileged way to name the system call (see vmmcore.sandbox.proxy).
    """
    prog, _keep = _prog(kill_to_notify(bpf))
    fd = _libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                       ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER), ctypes.byref(prog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"loading the seccomp filter with a listener: {os.strerror(err)}")
    return int(fd)


def errno_name(value: int) -> str:
    return _errno.errorcode.get(value, str(value))
