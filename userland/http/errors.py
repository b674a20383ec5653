"""OpenAI's error shape, and the HTTP status each gRPC status becomes.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

#   gRPC status                     HTTP  OpenAI type              code
STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT:    (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE:        (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED:     (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED:   (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND:           (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS:      (409, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED:  (429, "rate_limit_error", "resource_exhausted"),
    grpc.StatusCode.CANCELLED:           (499, "cancelled", None),
    grpc.StatusCode.UNIMPLEMENTED:       (501, "invalid_request_error", "unsupported"),
    grpc.StatusCode.UNAVAILABLE:         (503, "service_unavailable", None),
    grpc.StatusCode.DEADLINE_EXCEEDED:   (504, "timeout", None),
}
INTERNAL = (500, "server_error", None)


class APIError(Exception):
    """An error to hand back in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_param(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def from_rpc(err: grpc.RpcError, param: str | None = None) -> APIError:
    """A syscall's failure as an API error; an unknown model is OpenAI's model_not_found."""
    return from_status(err.code(), err.details(), param)


def from_status(status_code: grpc.StatusCode, details: str | None,
                param: str | None = None) -> APIError:
    status, type_, code = STATUS.get(status_code, INTERNAL)
    message = details or status_code.name
    if status_code == grpc.StatusCode.NOT_FOUND and "model" in message:
        param, code = "model", "model_not_found"
    return APIError(status, message, type_, param, code)


def no_key() -> APIError:
    return APIError(401, "no API key: send your LLMasOS token as 'Authorization: Bearer TOKEN' "
                    "(root's is $LLMASOS_HOME/root.token; `llmosd adduser NAME` makes others)",
                    "authentication_error", code="invalid_api_key")
