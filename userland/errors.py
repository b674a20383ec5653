"""Typed errors: one exception class per gRPC status code, carrying the kernel's message.

Catch `LLMError` for all of them, or a subclass (`NotFound`, `PermissionDenied`, ...) for one.
"""

from __future__ import annotations

import grpc


class LLMError(Exception):
    """A syscall failed; `code` is the gRPC status, `message` what the kernel said."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    exit_status = 1  # the shell's and tools' exit status for this error

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Cancelled(LLMError):
    code = grpc.StatusCode.CANCELLED


class Unknown(LLMError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LLMError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    exit_status = 2


class DeadlineExceeded(LLMError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LLMError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    """Spawn named a model that is not deployed; `deployed` lists those that are."""

    def __init__(self, message: str, deployed: list[str]) -> None:
        super().__init__(message)
        self.deployed = deployed


class AlreadyExists(LLMError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LLMError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LLMError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LLMError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LLMError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(LLMError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LLMError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LLMError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(LLMError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(LLMError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LLMError):
    code = grpc.StatusCode.UNAUTHENTICATED


class JobFailed(LLMError):
    """The job ran but ended badly (error, killed, shutdown); `pid` and `reason` say which."""

    def __init__(self, message: str, pid: int, reason: str) -> None:
        super().__init__(message)
        self.pid = pid
        self.reason = reason


BY_CODE: dict[grpc.StatusCode, type[LLMError]] = {
    cls.code: cls for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def from_rpc(err: grpc.RpcError, addr: str = "", hint: str = "") -> LLMError:
    """The typed error for a failed call, with a message that says what to do when we can."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else "") or str(code.name).lower()
    if code == grpc.StatusCode.UNAVAILABLE and _unreachable(details):
        details = f"cannot reach llmosd at {addr}: is it running? (start it with `llmosd run`)"
    elif code == grpc.StatusCode.UNAUTHENTICATED and hint:
        details = f"{details}; {hint}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not details.strip(". ").count(" "):
        details = "the call timed out (raise the client's timeout, or check the kernel's load)"
    return BY_CODE.get(code, Unknown)(details)


def _unreachable(details: str) -> bool:
    """gRPC's own words for a connection that failed; the kernel's UNAVAILABLE (a service down
    behind it) may quote them further on, so only a message that starts with them counts."""
    starts = ("failed to connect", "connection refused", "unreachable", "DNS resolution",
              "Socket closed", "failed to pick subchannel", "Connection reset",
              "recvmsg:Connection reset", "Broken pipe", "connections to all backends failing")
    return details.lower().startswith(tuple(w.lower() for w in starts))


def refused(pid: int, code: str, details: str) -> LLMError:
    """A Poll's refusal of one job (PollEntry.error_code and error) as its typed error."""
    status = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
    return BY_CODE.get(status, Unknown)(f"process {pid}: {details}")
