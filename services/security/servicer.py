"""llmasos.v1.Security over gRPC: translates messages to and from the Security core."""

from __future__ import annotations

import grpc

from llmasos.proto import common_pb2, security_pb2, security_pb2_grpc
from llmasos.services.security.identity import Identity, UnknownUserError, UserExistsError
from llmasos.services.security.security import Security

SERVICE_NAME = security_pb2.DESCRIPTOR.services_by_name["Security"].full_name


def identity_pb(ident: Identity) -> security_pb2.Identity:
    q = ident.quota
    return security_pb2.Identity(user=ident.user, uid=ident.uid, root=ident.root,
                                 capabilities=list(ident.capabilities),
                                 quota=common_pb2.Quota(max_jobs=q.max_jobs,
                                                        max_tokens=q.max_tokens,
                                                        kv_share=q.kv_share))


class SecurityServicer(security_pb2_grpc.SecurityServicer):
    def __init__(self, security: Security) -> None:
        self.security = security

    def Authenticate(self, request: security_pb2.AuthenticateRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> security_pb2.Identity:
        ident = self.security.authenticate(request.token)
        if ident is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or malformed token")
        return identity_pb(ident)

    def AddUser(self, request: security_pb2.AddUserRequest,  # noqa: N802
                context: grpc.ServicerContext) -> security_pb2.AddUserResponse:
        try:
            ident, token = self.security.add_user(request.name, list(request.capabilities))
        except UserExistsError as e:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return security_pb2.AddUserResponse(identity=identity_pb(ident), token=token)

    def ListUsers(self, request: security_pb2.ListUsersRequest,  # noqa: N802
                  context: grpc.ServicerContext) -> security_pb2.ListUsersResponse:
        return security_pb2.ListUsersResponse(
            users=[identity_pb(i) for i in self.security.list_users()])


    def SetQuota(self, request: security_pb2.SetUserQuotaRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> security_pb2.Identity:
        changes = {f: getattr(request, f) for f in ("max_jobs", "max_tokens", "kv_share")
                   if request.HasField(f)}
        try:
            ident = self.security.set_quota(request.user, changes, reset=request.reset)
        except UnknownUserError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return identity_pb(ident)


def register(server: grpc.Server, security: Security) -> list[str]:
    security_pb2_grpc.add_SecurityServicer_to_server(SecurityServicer(security), server)
    return [SERVICE_NAME]
