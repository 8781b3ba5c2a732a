"""cffi API-mode builder for the KVM bindings (run by setup.py at install time).

The cdef declares structs with `...;` so that the C compiler, not this file, decides
their layout from the installed <linux/kvm.h>; constants are read from the header too.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    int ioctl(int fd, unsigned long request, ...);

    #define KVM_GET_API_VERSION ...
    #define KVM_CREATE_VM ...
    #define KVM_RUN ...
    """
)

ffibuilder.set_source(
    "vmmcore.kvm._kvm_cffi",
    """
    #include <sys/ioctl.h>
    #include <linux/kvm.h>
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
