"""The sandbox: seccomp policy compiler, jail (namespaces, pivot_root, capabilities,
rlimits) and ProxyDevice, which runs a PCI device in a jailed child process.

Modules:
  policy      crosvm/minijail-syntax policy files -> a libseccomp filter -> cached BPF
  jail        what a device process does to itself before serving (namespaces, mounts...)
  proxy       ProxyDevice (main process side) and SandboxSupervisor (death reports)
  child_proc  the child's loop serving bus and configuration accesses
  protocol    the wire format between the two (safe to parse: no pickle from a child)
"""

from vmmcore.sandbox.policy import CompiledPolicy, PolicyError, compile_policy

__all__ = ["CompiledPolicy", "PolicyError", "compile_policy"]
