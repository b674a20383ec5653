"""The error a validator raises: a gRPC status code name and a message that says what to fix."""

from __future__ import annotations


class SyscallError(Exception):
    """Carries a grpc.StatusCode *name* (so this module needs no grpc import) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> SyscallError:
    return SyscallError("INVALID_ARGUMENT", message)
