"""Error types shared by the core.

Every error a user can cause (bad CLI input, bad image, missing /dev/kvm) derives from
VmmError so that the CLI can print one clear line instead of a traceback.
"""


class VmmError(Exception):
    """Base of every error the core reports to the user as a one-line message."""


class ConfigError(VmmError):
    """Bad user configuration (CLI options, plugin options); exit status 2."""


class GuestMemoryError(VmmError):
    """A guest-physical access outside guest RAM (the guest may be hostile)."""


class AllocationError(VmmError):
    """A SystemAllocator pool cannot satisfy a request (exhausted, misaligned, taken)."""


class BusConflictError(VmmError):
    """A bus range overlaps one already registered."""


class KvmError(VmmError):
    """/dev/kvm is missing, unusable, or an ioctl failed."""
