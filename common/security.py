"""Internal trust: how the gRPC services authenticate the processes that call them.

Two mechanisms, usable together:

- **mutual TLS** (`--tls-dir`): the directory holds `ca.pem`, `<role>.pem` and `<role>-key.pem`, as written by
  `mirador certs`. Servers require a client certificate signed by the CA, and the certificate's common name is the
  caller's role: the worker takes its step stream only from `scheduler` (or `admin`), the scheduler takes requests
  only from `gateway`, the vision service serves `scheduler` and `worker`. A stolen gateway key cannot drive the
  worker.
- **a shared token** (`--internal-token-file`, or `MIRADOR_INTERNAL_TOKEN`): every call carries
  `authorization: Bearer <token>` and every service compares it in constant time. Any holder of the token is
  trusted by every service; it is the simple option where TLS is not wanted (the token then crosses the network
  in clear text unless TLS is also on).

A service refuses to listen on a non-loopback address with neither (unless `--allow-unauthenticated-internal`).
`grpc.health.v1` stays open, so container probes need no credentials; reflection and every service method do not.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.args import ArgsBase, arg
from common.interceptors import wrap_handler

logger = logging.getLogger(__name__)

TOKEN_ENV = "MIRADOR_INTERNAL_TOKEN"
ROLES = ("gateway", "scheduler", "worker", "vision", "admin")
ADMIN = "admin"
# Who calls whom (docs/architecture.md); `admin` (an operator's grpcurl) may call anything.
CALLERS = {
    "mirador.scheduler.v1.Scheduler": ("gateway",),
    "mirador.worker.v1.Worker": ("scheduler",),
    "mirador.vision.v1.Vision": ("scheduler", "worker", "gateway"),  # the gateway only sends Prepare hints
}
_OPEN_PREFIX = "/grpc.health.v1.Health/"
_AUTH_HEADER = "authorization"


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only ("localhost", 127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class InternalAuthArgs(ArgsBase):
    """Flags shared by every service (the gateway uses them as a client only)."""

    _cli_group = "internal authentication (between the services)"

    internal_token_file: str = arg(
        "",
        f"file holding the cluster's shared secret; every internal gRPC call carries it and every service requires "
        f"it (also from the {TOKEN_ENV} environment variable)",
    )
    tls_dir: str = arg(
        "",
        "mutual TLS between the services: a directory with ca.pem, <service>.pem and <service>-key.pem (`mirador "
        "certs` writes one); each service then accepts only the callers it serves, by certificate name",
    )
    allow_unauthenticated_internal: bool = arg(
        False,
        "let a gRPC service listen on a non-loopback address without --tls-dir or an internal token (anyone who "
        "can reach the port can then drive it; only behind a network policy that already admits the right pods)",
    )

    def check_internal_auth(self, host: str, what: str) -> None:
        """Refuse, at flag parsing, to serve gRPC beyond loopback with no authentication."""
        if is_loopback(host) or self.allow_unauthenticated_internal:
            return
        if self.tls_dir or self.internal_token_file or os.environ.get(TOKEN_ENV):
            return
        raise ValueError(
            f"{what} would listen on {host}, beyond loopback, with no caller authentication: give --tls-dir "
            f"(mutual TLS; `mirador certs --out DIR` makes one) or --internal-token-file (or {TOKEN_ENV}), or "
            "--allow-unauthenticated-internal if a network policy already guards the port"
        )


@dataclass(frozen=True)
class InternalAuth:
    """One process's credentials: its role, the shared token, and its TLS files (PEM bytes)."""

    role: str = ""
    token: str = ""
    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""

    @classmethod
    def from_args(cls, args: InternalAuthArgs, role: str) -> InternalAuth:
        """Read the token and this role's TLS files named by the flags (`mirador up` reads them as `admin`)."""
        token = ""
        if args.internal_token_file:
            path = Path(args.internal_token_file)
            try:
                token = path.read_text().strip()
            except OSError as e:
                raise ValueError(f"--internal-token-file {path}: {e.strerror}") from None
            if not token:
                raise ValueError(f"--internal-token-file {path} is empty")
        else:
            token = os.environ.get(TOKEN_ENV, "").strip()
        if token and len(token) < 16:
            raise ValueError(
                "the internal token must have at least 16 characters (e.g. `openssl rand -hex 32`)"
            )
        ca = cert = key = b""
        if args.tls_dir:
            d = Path(args.tls_dir)
            files = [d / "ca.pem", d / f"{role}.pem", d / f"{role}-key.pem"]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(
                    f"--tls-dir {d}: missing {', '.join(missing)} (`mirador certs --out {d}` writes them)"
                )
            ca, cert, key = (f.read_bytes() for f in files)
        return cls(role=role, token=token, ca=ca, cert=cert, key=key)

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def describe(self) -> str:
        parts = [f"mutual TLS as {self.role!r}"] if self.tls else []
        if self.token:
            parts.append("shared token")
        return " + ".join(parts) or "none"

    # ------------------------------------------------------------------ server side

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def server_interceptors(self, service_name: str) -> list[grpc.aio.ServerInterceptor]:
        if not (self.tls or self.token):
            return []
        roles = CALLERS.get(service_name)
        if roles is None:
            raise KeyError(f"no callers are declared for {service_name} in common/security.CALLERS")
        return [_Guard(self.token, (*roles, ADMIN) if self.tls else None)]

    def local_refusal(self, service_name: str, token: str, role: str) -> tuple[grpc.StatusCode, str] | None:
        """(status code, message) when the hello of a local stream (common/local_stream.py) may not open a stream
        of `service_name`, else None. The socket lives in a directory only this user can enter, so the file
        permissions admit the caller; with a token configured the hello must carry it (compared in constant time,
        as the gRPC guard does). Under mutual TLS the role is the caller's claim (a Unix socket has no
        certificate): it is checked so that a misrouted caller is refused, but the trust is the file's."""
        if self.token and not hmac.compare_digest(token.encode(), self.token.encode()):
            return grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token (--internal-token-file)"
        if self.tls:
            roles = (*CALLERS.get(service_name, ()), ADMIN)
            if role not in roles:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"a caller with role {role!r} may not open {service_name} (allowed: {', '.join(roles)})",
                )
        return None

    # ------------------------------------------------------------------ client side

    def aio_channel(self, address: str, options: list) -> grpc.aio.Channel:
        interceptors = _aio_token_interceptors(self.token) if self.token else None
        if self.tls:
            creds = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
            return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)

    def sync_channel(self, address: str, options: list) -> grpc.Channel:
        if self.tls:
            creds = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
            channel = grpc.secure_channel(address, creds, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _SyncToken(self.token))
        return channel


_process_auth = InternalAuth()


def set_process_auth(auth: InternalAuth) -> None:
    """This process's identity, used by every channel it opens (each service has exactly one)."""
    global _process_auth
    _process_auth = auth


def process_auth() -> InternalAuth:
    return _process_auth


def configure_from_args(args: ArgsBase, role: str) -> InternalAuth:
    """Load the credentials named by a service's flags and make them this process's."""
    auth = InternalAuth.from_args(args, role) if hasattr(args, "tls_dir") else InternalAuth(role=role)
    set_process_auth(auth)
    return auth


# ---------------------------------------------------------------------- the server's guard


def _peer_role(context) -> str | None:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def _refusal(token: str, roles: Iterable[str] | None, context, method: str) -> tuple | None:
    """(status code, message) when the caller may not make this call, else None."""
    if token:
        sent = dict(context.invocation_metadata() or ()).get(_AUTH_HEADER, "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token (--internal-token-file)"
    if roles is not None:
        role = _peer_role(context)
        if role not in roles:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"a caller with certificate {role!r} may not call {method} (allowed: {', '.join(roles)})",
            )
    return None


class _Guard(grpc.aio.ServerInterceptor):
    """Checks the caller of every method but health's, inside the call (where the peer's certificate is seen)."""

    def __init__(self, token: str, roles: tuple[str, ...] | None):
        self._token = token
        self._roles = roles

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIX):
            return handler
        reflection = self._roles is not None and method.startswith("/grpc.reflection.")
        roles = ROLES if reflection else self._roles  # any certificate of the cluster may list services

        async def check(context) -> None:
            refusal = _refusal(self._token, roles, context, method)
            if refusal is not None:
                await context.abort(*refusal)

        return wrap_handler(handler, check)


# ---------------------------------------------------------------------- the client's token


def _with_token(metadata, token: str):
    return (*(tuple(metadata) if metadata else ()), (_AUTH_HEADER, f"Bearer {token}"))


def _aio_token_interceptors(token: str) -> list:
    def details_with_token(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, _with_token(d.metadata, token), d.credentials, d.wait_for_ready
        )

    class UU(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, d, request):
            return await continuation(details_with_token(d), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, d, request):
            return await continuation(details_with_token(d), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, d, request_iterator):
            return await continuation(details_with_token(d), request_iterator)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, d, request_iterator):
            return await continuation(details_with_token(d), request_iterator)

    return [UU(), US(), SU(), SS()]


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: object
    wait_for_ready: bool | None
    compression: object


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self._token = token

    def _details(self, d) -> _SyncDetails:
        fields = {f.name: getattr(d, f.name, None) for f in dataclasses.fields(_SyncDetails)}
        fields["metadata"] = _with_token(fields["metadata"], self._token)
        return _SyncDetails(**fields)

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)
