"""The test/demo guests (guests/) build with gcc into ELFs the VMM's loader accepts, and
contain no instruction that kvm-pvm's ring-0 emulator lacks. Needs gcc (and objdump for
the instruction check); no KVM."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from vmmcore import guests
from vmmcore.errors import VmmError

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None,
                                   reason="objdump (binutils) is not installed")

ALL = guests.names()

# Instructions the ring-0 emulator lacks (DESIGN.md), and any SSE/MMX/AVX register use.
FORBIDDEN = re.compile(r"\b(int3|int\s+\$0x3|xsave\w*|xrstor\w*|fxsave\w*|fxrstor\w*|clac|stac|"
                       r"popcnt|ldmxcsr|stmxcsr)\b|%[xyz]mm\d|%mm\d")


def forbidden_instructions(elf: Path) -> list[str]:
    """Disassembly lines (objdump -d) that use a forbidden instruction or register."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-w", str(elf)],
                         capture_output=True, text=True, check=True).stdout
    assert "hlt" in out  # sanity: we did disassemble code
    bad = []
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
        if m and FORBIDDEN.search(re.sub(r"<[^>]*>|#.*$", "", m.group(2))):
            bad.append(line.strip())   # symbol names and comments dropped before matching
    return bad


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return guests.build_all()


def program_headers(data: bytes) -> tuple[int, list[tuple[int, int, int, int, int]]]:
    """(e_entry, [(p_type, p_vaddr, p_paddr, p_filesz, p_memsz)])"""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    assert data[4] == 2 and data[5] == 1, "not ELF64 little-endian"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert e_type == 2, "not ET_EXEC"
    assert e_machine == 62, "not x86-64"
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    assert e_phentsize == 56
    phdrs = []
    for i in range(e_phnum):
        p_type, _flags, _off, vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        phdrs.append((p_type, vaddr, paddr, filesz, memsz))
    return e_entry, phdrs


@needs_gcc
@pytest.mark.parametrize("name", ALL)
def test_guest_is_an_elf64_loaded_between_2_and_16_mib(built, name):
    entry, phdrs = program_headers(built[name].read_bytes())
    loads = [p for p in phdrs if p[0] == 1]
    assert loads, "no PT_LOAD segment"
    for _type, vaddr, paddr, filesz, memsz in loads:
        assert vaddr == paddr, f"segment {paddr:#x} is not identity-linked"
        assert filesz <= memsz
        assert paddr >= guests.LOAD_MIN and paddr + memsz <= guests.LOAD_MAX, \
            f"segment {paddr:#x}+{memsz:#x} outside {guests.LOAD_MIN:#x}..{guests.LOAD_MAX:#x}"
    assert entry == guests.LOAD_MIN, f"entry {entry:#x} is not _start at 0x200000"
    assert any(p[2] <= entry < p[2] + p[3] for p in loads)


@needs_gcc
@needs_objdump
@pytest.mark.parametrize("name", ALL)
def test_guest_uses_no_instruction_the_emulator_lacks(built, name):
    bad = forbidden_instructions(built[name])
    assert not bad, "forbidden instructions:\n" + "\n".join(bad)


@needs_gcc
@needs_objdump
def test_the_instruction_check_catches_forbidden_code(private_sources):
    crash = private_sources / "tests" / "crash.c"
    crash.write_text(crash.read_text().replace(
        "\t(void)bp;", "\t(void)bp;\n\t__asm__ volatile(\"int3; clac; popcnt %rax, %rbx; "
        "xsave (%rsp); movq %rax, %xmm0\");"))
    bad = "\n".join(forbidden_instructions(guests.guest_path("tests/crash")))
    for insn in ("int3", "clac", "popcnt", "xsave", "%xmm0"):
        assert insn in bad, bad


@needs_gcc
@pytest.mark.parametrize("name", ALL)
def test_guest_builds_without_warnings(tmp_path, name):
    diagnostics = guests.build_into(name, tmp_path / "g.elf", ["-Werror"])
    assert "warning" not in diagnostics, diagnostics


@needs_gcc
def test_cached_build_is_reused(built):
    path = built["tests/hello"]
    mtime = path.stat().st_mtime_ns
    assert guests.guest_path("tests/hello") == path
    assert path.stat().st_mtime_ns == mtime


@pytest.fixture
def private_sources(tmp_path, monkeypatch) -> Path:
    """A copy of guests/ and an empty cache, so tests may edit sources."""
    src = tmp_path / "src"
    shutil.copytree(guests.source_dir(), src)
    monkeypatch.setenv("VMM_GUESTS_DIR", str(src))
    monkeypatch.setenv("VMM_GUEST_CACHE", str(tmp_path / "cache"))
    return src


@needs_gcc
def test_a_changed_source_means_a_rebuild(private_sources):
    first = guests.guest_path("tests/hello")
    hello = private_sources / "tests" / "hello.c"
    hello.write_text(hello.read_text().replace("hello from guest", "hello from a new guest"))
    second = guests.guest_path("tests/hello")
    assert first != second
    assert b"hello from a new guest" in second.read_bytes()
    assert b"hello from a new guest" not in first.read_bytes()


@needs_gcc
def test_concurrent_builds_all_get_a_whole_elf(private_sources, tmp_path):
    results: list[Path | BaseException] = []

    def build():
        try:
            results.append(guests.guest_path("tests/mmio"))
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    program_headers(results[0].read_bytes())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]  # no temp dirs


@needs_gcc
def test_an_unwritable_cache_falls_back_to_tmp(private_sources, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("VMM_GUEST_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = guests.guest_path("tests/hello")
    assert path.parent == tmp_path / "tmp" / f"vmm-guests-{os.getuid()}"
    program_headers(path.read_bytes())


def test_missing_compiler_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("VMM_GUEST_CC", "no-such-gcc-for-vmm")
    with pytest.raises(VmmError) as err:
        guests.guest_path("demo")
    assert "\n" not in str(err.value)
    assert "no-such-gcc-for-vmm" in str(err.value) and "not found" in str(err.value)


def test_unknown_guest_lists_the_known_ones():
    with pytest.raises(VmmError, match="tests/hello"):
        guests.guest_path("tests/nope")


@needs_gcc
def test_compile_error_is_reported(private_sources):
    (private_sources / "tests" / "crash.c").write_text("this is not C\n")
    with pytest.raises(VmmError, match="building guest 'tests/crash' failed"):
        guests.guest_path("tests/crash")


@needs_gcc
def test_command_line_builds_all():
    proc = subprocess.run([sys.executable, "-m", "vmmcore.guests", "build"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ALL:
        assert re.search(rf"^{re.escape(name)}\s+/\S+\.elf$", proc.stdout, re.M), proc.stdout
