"""The virtio-blk plugin's PluginSpec (see vmm_virtio_rng.plugin for the commented template).

crosvm's spellings map here: ``--block path=P,ro=true``, ``--disk P`` (read-only) and
``--rwdisk P`` (writable) all become ``--device virtio_blk:path=P,...``.
"""

from __future__ import annotations

from typing import Any

from vmmcore.plugin_api import Bool, Enum, Int, Path, PluginSpec, Size, Str


def _validate(options: dict[str, Any]) -> None:
    bs = options["block_size"]
    if bs & (bs - 1):
        raise ValueError(f"block_size={bs} is not a power of two")
    if len(options["id"].encode()) > 20:
        raise ValueError(f"id={options['id']!r} is longer than 20 bytes (VIRTIO_BLK_ID_BYTES)")
    qs = options["queue_size"]
    if qs & (qs - 1):
        raise ValueError(f"queue_size={qs} is not a power of two")
    fmt = options["format"]
    if fmt != "auto":
        from vmmcore.registry import get_registry

        formats = get_registry().names("disk_format")
        if fmt not in formats:
            raise ValueError(f"format={fmt!r} is not an installed disk format "
                             f"(installed: auto, {', '.join(formats) or 'none'})")


PLUGIN = PluginSpec(
    name="virtio_blk",
    kind="device",
    api_version="1.2",
    summary="virtio block device backed by a disk image (raw, qcow2, ... plugins)",
    options=(
        Path("path", required=True, must_exist=True, help="The disk image file."),
        Bool("ro", default=False, help="Read-only: the guest cannot write to the disk."),
        Bool("sparse", default=True,
             help="Let guest DISCARD/WRITE_ZEROES punch holes in the image."),
        Bool("direct", default=False, help="Open the image with O_DIRECT (no host cache)."),
        Size("block_size", default=512, min=512, max=64 << 10,
             help="Logical block size reported to the guest (a power of two)."),
        Str("id", default="", help="Serial number the guest reads (VIRTIO_BLK_T_GET_ID)."),
        Str("format", default="auto",
            help="Disk format plugin (see `vmm plugins list --kind disk_format`); "
                 "auto detects it from the image's header."),
        Int("num_queues", default=1, min=1, max=16, help="Number of request virtqueues."),
        Int("queue_size", default=256, min=2, max=32768,
            help="Entries per virtqueue (a power of two)."),
        Int("io_threads", default=32, min=1, max=256,
            help="Threads serving requests concurrently (the real queue depth)."),
        Enum("engine", ("auto", "native", "python"), default="auto",
             help="Request path: native (C, GIL-free; formats that map the disk onto one "
                  "file, i.e. raw), python (any format), or auto (native where it can)."),
        Int("poll_us", default=32, min=0, max=1000,
            help="Native engine: the most microseconds a queue thread keeps watching "
                 "the ring, kicks off, after serving it (QEMU's adaptive poll-max-ns, "
                 "same default): the window grows while requests come that close "
                 "together and drops to 0 when they do not. 0 never polls."),
    ),
    positional="path",
    policy="virtio_blk.policy",
    factory="vmm_virtio_blk.device:create",   # create(options, ctx) -> VirtioBlock
    policy_with=("disk_format",),             # the image's format code runs in its process
    validate=_validate,
)
