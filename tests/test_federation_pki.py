"""Certificates, enrollment bundles and mTLS with the per-call check, on a real grpc server on loopback."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import ssl
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from models.federation import federation_pb2 as pb2
from models.federation import federation_pb2_grpc, pki, transport
from models.federation.enrollment import EnrollmentBundle, release_trust
from models.federation.roles import SiteRole
from models.package import TrustMode
from models.signing import generate_key_pair, load_public_key, public_key_fingerprint

PAYLOAD_KEY = bytes(range(32))


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca()


@pytest.fixture(scope="module")
def release_pub() -> bytes:
    return generate_key_pair()[1]


def site_bundle(
    ca: pki.CertificateAuthority, release_pub: bytes, name: str, address: str = "127.0.0.1:1", **issue: object
) -> EnrollmentBundle:
    key = pki.generate_key()
    cert = pki.issue_certificate(ca, pki.make_csr("site", key), name, issue.pop("role", "trainer"), **{
        "lifetime_days": 30, **issue,
    })  # type: ignore[arg-type]
    return EnrollmentBundle(
        site=name, role=pki.certificate_role(cert), coordinator_address=address, ca_cert_pem=ca.cert_pem,
        cert_pem=cert, key_pem=pki.private_key_pem(key), release_public_keys=(release_pub,), payload_key=PAYLOAD_KEY,
    )  # fmt: skip


def test_site_certificates_carry_name_role_fingerprint_and_lifetime(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = pki.issue_certificate(ca, pki.make_csr("whatever-the-site-asked", key), "site-a", SiteRole.EVALUATOR, 10)
    assert pki.certificate_name(cert) == "site-a" and pki.certificate_role(cert) is SiteRole.EVALUATOR
    der_sha256 = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.decode("ascii"))).hexdigest()
    assert pki.certificate_fingerprint(cert) == der_sha256
    days = (pki.certificate_not_after(cert) - dt.datetime.now(dt.UTC)).days
    assert 9 <= days <= 10 and not pki.certificate_expired(cert)
    assert pki.certificate_expired(cert, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=11))
    assert pki.key_matches_certificate(pki.private_key_pem(key), cert)
    renewed = pki.reissue_certificate(ca, cert, 100)
    assert pki.certificate_fingerprint(renewed) != pki.certificate_fingerprint(cert)
    assert (pki.certificate_name(renewed), pki.certificate_role(renewed)) == ("site-a", SiteRole.EVALUATOR)
    assert pki.key_matches_certificate(pki.private_key_pem(key), renewed)
    assert pki.certificate_not_after(renewed) > pki.certificate_not_after(cert) + dt.timedelta(days=80)
    with pytest.raises(ValueError, match="not issued by this CA"):
        pki.verify_issued_by(pki.create_ca().cert_pem, cert)
    with pytest.raises(ValueError, match="not a PEM certificate request"):
        pki.issue_certificate(ca, b"garbage", "site-a", "trainer", 10)
    with pytest.raises(ValueError, match="'auditor' is not a valid SiteRole"):
        pki.issue_certificate(ca, pki.make_csr("x", key), "site-a", "auditor", 10)


def test_the_server_certificate_names_the_coordinator_and_the_address_host(ca: pki.CertificateAuthority) -> None:
    _, cert = pki.issue_server_certificate(ca, "10.1.2.3:50051")
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [pki.SERVER_NAME]
    assert [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    _, cert = pki.issue_server_certificate(ca, "fl.hospital.example:443")
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [pki.SERVER_NAME, "fl.hospital.example"]


def test_a_bundle_is_one_private_file_that_reads_back(
    tmp_path: Path, ca: pki.CertificateAuthority, release_pub: bytes
) -> None:
    bundle = site_bundle(ca, release_pub, "site-a")
    path = bundle.write(tmp_path / "site-a.bundle")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert EnrollmentBundle.read(path) == bundle
    policy = release_trust(bundle)
    assert policy.mode is TrustMode.ENROLLED
    assert policy.fingerprints == {public_key_fingerprint(load_public_key(release_pub))}

    keyless = tmp_path / "keyless"
    keyless.mkdir()
    without_key = EnrollmentBundle(**{**bundle.__dict__, "key_pem": None})
    without_key.write(keyless / "site-a.bundle")
    assert json.loads((keyless / "site-a.bundle").read_text())["key_pem"] is None
    with pytest.raises(ValueError, match="holds no key and .*keyless/site.key cannot be read"):
        EnrollmentBundle.read(keyless / "site-a.bundle")
    (keyless / "site.key").write_bytes(bundle.require_key())
    assert EnrollmentBundle.read(keyless / "site-a.bundle") == bundle
    os.rename(keyless / "site.key", tmp_path / "elsewhere.key")
    assert EnrollmentBundle.read(keyless / "site-a.bundle", key_path=tmp_path / "elsewhere.key") == bundle


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: "{not json", "not a readable enrollment bundle"),
        (lambda d: {**d, "format": "something-else"}, "not a fedlesion-enrollment-bundle/1 document"),
        (lambda d: {k: v for k, v in d.items() if k != "cert_pem"}, "malformed enrollment bundle"),
        (lambda d: {**d, "site": "site-b"}, "the certificate names 'site-a', not site 'site-b'"),
        (lambda d: {**d, "role": "node"}, "the certificate's role is trainer, not node"),
        (lambda d: {**d, "role": "auditor"}, "'auditor' is not a valid SiteRole"),
        (lambda d: {**d, "payload_key": "c2hvcnQ="}, "payload_key must be 32 bytes"),
        (lambda d: {**d, "payload_key": "!!"}, "payload_key is not base64"),
        (lambda d: {**d, "coordinator_address": "no-port"}, "is not HOST:PORT"),
        (lambda d: {**d, "release_public_keys": []}, "at least one release key"),
        (lambda d: {**d, "key_pem": pki.private_key_pem(pki.generate_key()).decode()}, "does not belong"),
    ],
)
def test_a_bad_bundle_is_a_clear_value_error(
    tmp_path: Path, ca: pki.CertificateAuthority, release_pub: bytes, edit, reason: str
) -> None:
    document = json.loads(site_bundle(ca, release_pub, "site-a").to_json())
    edited = edit(document)
    path = tmp_path / "bad.bundle"
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ValueError, match=reason):
        EnrollmentBundle.read(path)


class EchoCoordinator(federation_pb2_grpc.CoordinatorServicer):
    """Answers with the caller's name, as the real coordinator does, for a unary and a streaming method."""

    def Hello(self, request: pb2.HelloRequest, context: grpc.ServicerContext) -> pb2.HelloReply:  # noqa: N802
        pem = transport.peer_certificate_pem(context)
        assert pem is not None
        role = pki.certificate_role(pem).value
        return pb2.HelloReply(protocol_version=transport.PROTOCOL_VERSION, site=transport.peer_name(context), role=role)

    def GetWeights(  # noqa: N802 - the generated servicer's method names
        self, request: pb2.WeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb2.StreamPart]:
        yield pb2.StreamPart(header=pb2.StreamHeader(round=request.round))

    def PutUpdate(  # noqa: N802
        self, request_iterator: Iterator[pb2.StreamPart], context: grpc.ServicerContext
    ) -> pb2.UpdateReply:
        return pb2.UpdateReply(accepted=True, reason=str(sum(1 for _ in request_iterator)))


@pytest.fixture(scope="module")
def coordinator(ca: pki.CertificateAuthority) -> Iterator[tuple[int, set[str], list[tuple[str, str, str]]]]:
    """A real mTLS server on 127.0.0.1:0; yields (port, revoked fingerprints, calls the check saw)."""
    revoked: set[str] = set()
    seen: list[tuple[str, str, str]] = []

    def check(fingerprint: str, name: str, method: str) -> str | None:
        seen.append((fingerprint, name, method))
        return f"site {name} is revoked" if fingerprint in revoked else None

    server_key, server_cert = pki.issue_server_certificate(ca, "127.0.0.1:0")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    transport.add_coordinator_servicer(server, EchoCoordinator(), check)
    port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(ca.cert_pem, server_cert, server_key))
    server.start()
    yield port, revoked, seen
    server.stop(grace=None)


def test_mtls_lets_an_enrolled_site_in_and_the_check_sees_who_calls(
    coordinator, ca: pki.CertificateAuthority, release_pub: bytes
) -> None:
    port, _, seen = coordinator
    bundle = site_bundle(ca, release_pub, "site-a", f"127.0.0.1:{port}", role=SiteRole.EVALUATOR)
    with transport.channel(bundle) as channel:
        stub = federation_pb2_grpc.CoordinatorStub(channel)
        reply = stub.Hello(pb2.HelloRequest(protocol_version=transport.PROTOCOL_VERSION), timeout=10)
        parts = list(stub.GetWeights(pb2.WeightsRequest(round=7), timeout=10))
        update = stub.PutUpdate(iter([pb2.StreamPart(), pb2.StreamPart()]), timeout=10)
    assert (reply.site, reply.role) == ("site-a", "evaluator")
    assert parts[0].header.round == 7 and update.accepted and update.reason == "2"
    assert seen[-3:] == [(bundle.fingerprint, "site-a", method) for method in ("Hello", "GetWeights", "PutUpdate")]


def test_a_revoked_certificate_is_refused_on_every_kind_of_call_with_the_reason(
    coordinator, ca: pki.CertificateAuthority, release_pub: bytes
) -> None:
    port, revoked, _ = coordinator
    bundle = site_bundle(ca, release_pub, "site-r", f"127.0.0.1:{port}")
    with transport.channel(bundle) as channel:
        stub = federation_pb2_grpc.CoordinatorStub(channel)
        assert stub.Hello(pb2.HelloRequest(), timeout=10).site == "site-r"
        revoked.add(bundle.fingerprint)  # takes effect on the next call, on the same connection
        calls = [
            lambda: stub.Hello(pb2.HelloRequest(), timeout=10),
            lambda: list(stub.GetWeights(pb2.WeightsRequest(), timeout=10)),
            lambda: stub.PutUpdate(iter([pb2.StreamPart()]), timeout=10),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert raised.value.details() == "site site-r is revoked"


def raw_channel(port: int, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    return grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", pki.SERVER_NAME)]
    )


def test_wrong_ca_and_expired_certificates_fail_in_the_tls_handshake(
    coordinator, ca: pki.CertificateAuthority
) -> None:
    port, _, seen = coordinator
    stranger_ca = pki.create_ca("a stranger's CA")
    key = pki.generate_key()
    strangers = pki.issue_certificate(stranger_ca, pki.make_csr("x", key), "site-s", "trainer", 30)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = pki.issue_certificate(ca, pki.make_csr("x", key), "site-e", "trainer", 1, now=long_ago)
    valid = pki.issue_certificate(ca, pki.make_csr("x", key), "site-v", "trainer", 1)
    with raw_channel(port, ca.cert_pem, pki.private_key_pem(key), valid) as channel:  # the control: same key, valid
        assert federation_pb2_grpc.CoordinatorStub(channel).Hello(pb2.HelloRequest(), timeout=10).site == "site-v"
    calls_before = len(seen)
    for cert in (strangers, expired):
        with raw_channel(port, ca.cert_pem, pki.private_key_pem(key), cert) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                federation_pb2_grpc.CoordinatorStub(channel).Hello(pb2.HelloRequest(), timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    # and a site that does not trust the coordinator's CA never talks to it
    with raw_channel(port, stranger_ca.cert_pem, pki.private_key_pem(key), strangers) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            federation_pb2_grpc.CoordinatorStub(channel).Hello(pb2.HelloRequest(), timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert len(seen) == calls_before  # no method (nor the check) ever ran
