"""mTLS for every federation call, and the coordinator's per-call check of who is calling.

grpc verifies the chain and the validity period in the TLS handshake (a wrong-CA or expired certificate never
reaches a method); it has no CRL support and a plain server interceptor sees no auth context, so revocation, role
and enrollment are checked by wrapping every method handler (`authorized_handlers`): the check sees the peer
certificate's fingerprint and name and the method, and a reason it returns aborts the call with PERMISSION_DENIED.
The same wrapping can count every message's serialized bytes each way (the coordinator's Prometheus `/metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from models.federation import federation_pb2_grpc, pki
from models.federation.enrollment import EnrollmentBundle

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "AccessCheck",
    "ByteCount",
    "add_coordinator_servicer",
    "authorized_handlers",
    "channel",
    "coordinator_handlers",
    "peer_certificate_fingerprint",
    "peer_certificate_pem",
    "peer_name",
    "server_credentials",
]

PROTOCOL_VERSION = 1
SERVICE = "fedlesion.federation.v1.Coordinator"
# A 1 MiB chunk plus its framing fits easily; a message far past that is refused by grpc before it is buffered.
MAX_MESSAGE_BYTES = 4 << 20
MESSAGE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

# (peer certificate fingerprint, peer name, method name such as "PutUpdate") -> None to allow, or the refusal reason.
AccessCheck = Callable[[str, str, str], str | None]
# (bytes received, bytes sent): called once per message with its serialized size (TLS and HTTP/2 framing not counted).
ByteCount = Callable[[int, int], None]

log = logging.getLogger(__name__)


def channel(bundle: EnrollmentBundle, *, options: tuple[tuple[str, Any], ...] = ()) -> grpc.Channel:
    """A secure channel to the bundle's coordinator, presenting the site's certificate (mTLS)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle.ca_cert_pem, private_key=bundle.require_key(), certificate_chain=bundle.cert_pem
    )
    overrides = (("grpc.ssl_target_name_override", pki.SERVER_NAME), *MESSAGE_OPTIONS, *options)
    return grpc.secure_channel(bundle.coordinator_address, credentials, options=overrides)


def server_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """The coordinator's TLS: its certificate, and only clients whose certificate this CA signed."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def peer_certificate_pem(context: grpc.ServicerContext) -> bytes | None:
    certificates = context.auth_context().get("x509_pem_cert")
    return certificates[0] if certificates else None


def peer_certificate_fingerprint(context: grpc.ServicerContext) -> str | None:
    pem = peer_certificate_pem(context)
    return None if pem is None else pki.certificate_fingerprint(pem)


def peer_name(context: grpc.ServicerContext) -> str | None:
    pem = peer_certificate_pem(context)
    return None if pem is None else pki.certificate_name(pem)


def _authorize(context: grpc.ServicerContext, method: str, check: AccessCheck) -> None:
    pem = peer_certificate_pem(context)
    if pem is None:
        log.warning("refused %s from %s: no client certificate", method, context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
    fingerprint, name = pki.certificate_fingerprint(pem), pki.certificate_name(pem)
    reason = check(fingerprint, name, method)
    if reason is not None:
        log.warning("refused %s from %s (%s…): %s", method, name, fingerprint[:16], reason)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)


def _serializers(handler: grpc.RpcMethodHandler, count_bytes: ByteCount | None) -> dict[str, Any]:
    """The handler's (de)serializers, counting each message's bytes when asked to."""
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if count_bytes is None:
        return {"request_deserializer": deserialize, "response_serializer": serialize}

    def counted_deserialize(data: bytes) -> Any:
        count_bytes(len(data), 0)
        return deserialize(data)

    def counted_serialize(message: Any) -> bytes:
        data = serialize(message)
        count_bytes(0, len(data))
        return data

    return {"request_deserializer": counted_deserialize, "response_serializer": counted_serialize}


def _guarded(handler: grpc.RpcMethodHandler, method: str, check: AccessCheck,
             count_bytes: ByteCount | None) -> grpc.RpcMethodHandler:
    serializers = _serializers(handler, count_bytes)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            _authorize(context, method, check)
            return inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            _authorize(context, method, check)
            yield from inner_us(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            _authorize(context, method, check)
            return inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
    inner_ss = handler.stream_stream

    def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        _authorize(context, method, check)
        yield from inner_ss(requests, context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)


def authorized_handlers(
    servicer_handlers: Mapping[str, grpc.RpcMethodHandler], check: AccessCheck, count_bytes: ByteCount | None = None
) -> dict[str, grpc.RpcMethodHandler]:
    """Every handler (method name → handler) wrapped so that `check` runs first on each call (and `count_bytes`
    sees every message)."""
    return {method: _guarded(handler, method, check, count_bytes) for method, handler in servicer_handlers.items()}


class _Recorder:
    """Stands in for a grpc.Server to catch the method handlers the generated `add_…_to_server` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers arrive below, by method name

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        if service != SERVICE:
            raise ValueError(f"unexpected service {service!r}")
        self.handlers.update(handlers)


def coordinator_handlers(servicer: federation_pb2_grpc.CoordinatorServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated method handlers of a Coordinator servicer, by method name ("Hello", "PutUpdate", …)."""
    recorder = _Recorder()
    federation_pb2_grpc.add_CoordinatorServicer_to_server(servicer, recorder)
    return recorder.handlers


def add_coordinator_servicer(
    server: grpc.Server, servicer: federation_pb2_grpc.CoordinatorServicer, check: AccessCheck,
    count_bytes: ByteCount | None = None,
) -> None:
    """Register `servicer` on `server` with `check` guarding every call (what `serve` uses)."""
    handlers = authorized_handlers(coordinator_handlers(servicer), check, count_bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
