"""Disk-image commands: `vmm create_qcow2`, `vmm disk info|check|convert`.

They work through the disk-format plugins (vmmcore.disk.open_disk and each format's
DiskFormat.create), so any installed format can be inspected or converted. Errors are one
line on stderr; bad input (a missing or corrupt image, a bad size or option) exits 2,
a failure of the host (I/O error) exits 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

MiB = 1 << 20
ZERO_GRAIN = 64 << 10       # convert: zero runs of this size are skipped


def _fail(message: str, status: int = 2) -> None:
    click.echo(f"vmm: error: {message}", err=True)
    sys.exit(status)


def _parse_size(text: str, what: str) -> int:
    from vmmcore.plugin_api import OptionValueError, Size

    try:
        return Size(what.replace(" ", "_"), min=0).parse(text)
    except OptionValueError as e:
        _fail(f"{what} {text!r} is not valid: expected {e}")
    raise AssertionError


def _formats() -> dict[str, Any]:
    from vmmcore.disk import _formats

    return _formats()


def _create(fmt: str, path: Path, size: int | None, **options: Any) -> None:
    from vmmcore.disk import DiskError

    formats = _formats()
    if fmt not in formats:
        _fail(f"disk format {fmt!r} is not installed (installed: "
              f"{', '.join(sorted(formats)) or 'none'})")
    factory = formats[fmt][1]
    inst = factory() if isinstance(factory, type) else factory
    try:
        inst.create(path, size, **options)
    except DiskError as e:
        _fail(str(e))


@click.command("create_qcow2")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("size", required=False)
@click.option("--backing-file", metavar="FILE",
              help="Backing file; a relative name is relative to PATH's directory.")
@click.option("--backing-format", metavar="FMT", help="Format of the backing file "
              "(detected when not given).")
@click.option("--cluster-size", default="64K", show_default=True,
              help="Cluster size: a power of two from 512 to 2M.")
@click.option("--refcount-bits", type=int, default=16, show_default=True,
              help="Refcount width: 1, 2, 4, 8, 16, 32 or 64.")
@click.option("--compat", type=click.Choice(["1.1", "0.10"]), default="1.1",
              show_default=True, help="qcow2 version 3 (1.1) or 2 (0.10).")
@click.option("--lazy-refcounts", is_flag=True, help="Set the lazy-refcounts feature.")
def create_qcow2(path: Path, size: str | None, backing_file: str | None,
                 backing_format: str | None, cluster_size: str, refcount_bits: int,
                 compat: str, lazy_refcounts: bool) -> None:
    """Create a qcow2 image at PATH of SIZE bytes (K/M/G/T suffixes).

    SIZE may be left out with --backing-file: the backing file's size is used.
    """
    nbytes = _parse_size(size, "size") if size is not None else None
    if nbytes is None and not backing_file:
        _fail("SIZE is required unless --backing-file is given")
    if path.exists() and path.is_dir():
        _fail(f"{path} is a directory")
    _create("qcow2", path, nbytes, backing_file=backing_file,
            backing_format=backing_format,
            cluster_size=_parse_size(cluster_size, "cluster size"),
            refcount_bits=refcount_bits, compat=compat, lazy_refcounts=lazy_refcounts)


@click.group("disk")
def disk() -> None:
    """Inspect, check and convert disk images (qcow2, raw, any installed format)."""


def _open(path: Path, fmt: str | None, read_only: bool = True) -> Any:
    from vmmcore.disk import DiskError, open_disk

    if not path.exists():
        _fail(f"{path}: no such file")
    try:
        return open_disk(path, fmt, read_only=read_only)
    except DiskError as e:
        _fail(str(e))


def _human(n: int) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} B"


@disk.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-f", "--format", "fmt", help="The image's format (detected when not given).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info(path: Path, fmt: str | None, as_json: bool) -> None:
    """Show an image's format, sizes, backing chain and format-specific facts."""
    d = _open(path, fmt)
    try:
        data = d.info()
    finally:
        d.close()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    _print_info(data, "")


def _print_info(data: dict[str, Any], indent: str) -> None:
    click.echo(f"{indent}image: {data.get('path')}")
    click.echo(f"{indent}file format: {data.get('format')}")
    size = int(data.get("virtual_size", 0))
    click.echo(f"{indent}virtual size: {_human(size)} ({size} bytes)")
    for key, value in data.items():
        if key in ("path", "format", "virtual_size", "backing", "snapshots") or value is None:
            continue
        click.echo(f"{indent}{key.replace('_', ' ')}: {value}")
    snaps = data.get("snapshots") or []
    if snaps:
        click.echo(f"{indent}snapshots:")
        click.echo(f"{indent}  ID  NAME                 VM STATE  DATE (UTC)")
        import datetime

        for s in snaps:
            date = datetime.datetime.fromtimestamp(int(s.get("date_sec", 0)),
                                                   datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{indent}  {s.get('id', ''):<3} {s.get('name', ''):<20} "
                       f"{_human(int(s.get('vm_state_size') or 0)):>8}  {date}")
    if data.get("backing"):
        click.echo(f"{indent}backing image:")
        _print_info(data["backing"], indent + "  ")


@disk.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-f", "--format", "fmt", help="The image's format (detected when not given).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--repair-leaks", is_flag=True, help="Free leaked clusters (qcow2).")
def check(path: Path, fmt: str | None, as_json: bool, repair_leaks: bool) -> None:
    """Check an image's metadata: exit 0 when consistent (leaks are reported, and are
    harmless), 3 when corrupt."""
    from vmmcore.disk import DiskError

    d = _open(path, fmt, read_only=not repair_leaks)
    try:
        checker = getattr(d, "check", None)
        if checker is None:
            result: dict[str, Any] = {"format": d.format_name, "checked": False,
                                      "corruptions": 0, "leaks": 0, "errors": []}
        else:
            res = checker()
            result = {"format": d.format_name, "checked": True, **res.to_json()}
            if repair_leaks and res.leaks and not res.corruptions:
                result["leaks_fixed"] = d.repair_leaks()
    except DiskError as e:
        _fail(str(e))
    finally:
        d.close()
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif not result["checked"]:
        click.echo(f"{path}: {result['format']} images have no metadata to check.")
    else:
        for err in result["errors"]:
            click.echo(f"ERROR {err}")
        if result["corruptions"]:
            click.echo(f"{result['corruptions']} errors were found on the image.")
        elif result.get("leaks_fixed"):
            click.echo(f"{result['leaks_fixed']} leaked clusters were freed; "
                       "no errors were found on the image.")
        elif result["leaks"]:
            click.echo(f"{result['leaks']} leaked clusters were found on the image "
                       "(wasted space, no harm to data). No errors were found.")
        else:
            click.echo("No errors were found on the image.")
    if result["corruptions"]:
        sys.exit(3)


@disk.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("-f", "--format", "src_fmt", help="SRC's format (detected when not given).")
@click.option("-O", "--output-format", "out_fmt", type=click.Choice(["raw", "qcow2"]),
              default="raw", show_default=True, help="DST's format.")
@click.option("--cluster-size", default="64K", show_default=True,
              help="Cluster size of a qcow2 DST.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
def convert(src: Path, dst: Path, src_fmt: str | None, out_fmt: str, cluster_size: str,
            progress: bool | None) -> None:
    """Copy the disk SRC (any format, with its backing chain) into a new image DST.

    Zero ranges stay holes (sparse raw file, unallocated qcow2 clusters).
    """
    from vmmcore.disk import DiskError, open_disk

    cs = _parse_size(cluster_size, "cluster size")
    if os.path.realpath(src) == os.path.realpath(dst):
        _fail("SRC and DST are the same file")
    s = _open(src, src_fmt)
    try:
        size = s.size
        if out_fmt == "qcow2":
            _create("qcow2", dst, size, cluster_size=cs)
            d = open_disk(dst, "qcow2", read_only=False)
        else:
            d = None
            try:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                _fail(f"cannot create {dst}: {e.strerror}")
        try:
            _copy(s, size, d, fd if d is None else -1, progress)
        finally:
            if d is not None:
                d.close()
            else:
                os.ftruncate(fd, size)
                os.fsync(fd)
                os.close(fd)
    except DiskError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{dst}: {e.strerror}", 1)
    finally:
        s.close()


def _copy(s: Any, size: int, d: Any, fd: int, progress: bool | None) -> None:
    chunk = 4 * MiB if size > 4 * MiB else max(size, 1)
    buf = bytearray(chunk)
    zero = bytes(chunk)
    show = sys.stderr.isatty() if progress is None else progress
    with click.progressbar(length=size, label="converting", file=sys.stderr,
                           show_pos=False, show_percent=True, hidden=not show) as bar:
        off = 0
        while off < size:
            n = min(chunk, size - off)
            mv = memoryview(buf)[:n]
            s.read_into(off, [mv])
            # write the non-zero 64 KiB runs only: zeroes stay holes / unallocated
            pos = 0
            while pos < n:
                while pos < n and mv[pos:pos + ZERO_GRAIN] == zero[:min(ZERO_GRAIN, n - pos)]:
                    pos += ZERO_GRAIN
                start = pos
                while pos < n and mv[pos:pos + ZERO_GRAIN] != zero[:min(ZERO_GRAIN, n - pos)]:
                    pos += ZERO_GRAIN
                end = min(pos, n)
                if end > start:
                    run = mv[start:end]
                    if d is not None:
                        d.write_from(off + start, [run])
                    else:
                        done = 0
                        while done < len(run):
                            done += os.pwrite(fd, run[done:], off + start + done)
            off += n
            bar.update(n)
    if d is not None:
        d.flush()


def add_disk_commands(main: click.Group) -> None:
    """Add `create_qcow2` and the `disk` subcommands to the CLI.

    `vmm disk` may already exist (the control socket's `vmm disk resize`): the image
    commands then join that group.
    """
    main.add_command(create_qcow2)
    existing = main.commands.get("disk")
    if isinstance(existing, click.Group) and existing is not disk:
        for name, cmd in disk.commands.items():
            existing.add_command(cmd, name)
        existing.help = (existing.help or "").rstrip() + (
            "\n\nImages: info, check and convert work on disk-image files (qcow2, raw, any "
            "installed format).")
    else:
        main.add_command(disk)


__all__ = ["add_disk_commands", "create_qcow2", "disk"]
