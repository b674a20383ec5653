"""The syscall ABI's table: shared by the kernel (which binds handlers) and clients (names)."""

from llmasos.syscalls.errors import SyscallError
from llmasos.syscalls.table import ALL_CAPS, BY_NAME, BY_NUMBER, SIGNALS, SYSCALLS, Syscall

__all__ = ["ALL_CAPS", "BY_NAME", "BY_NUMBER", "SIGNALS", "SYSCALLS", "Syscall", "SyscallError"]
