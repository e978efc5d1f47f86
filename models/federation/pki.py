"""The federation's certificates: a private CA, the coordinator's server certificate, and site certificates that
carry the site's name (CN) and role (a `fedlesion:role:<role>` URI), all on EC P-256 keys for TLS.

A site makes its own key and a certificate request (`make_csr`); the coordinator signs the request's public key
under the name and role it decides (`issue_certificate`), so the site's key never leaves the site. grpcio has no
CRL support: revocation is the coordinator's per-call check of `certificate_fingerprint`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from models.federation.roles import SiteRole
from models.package import sha256_hex

__all__ = [
    "SERVER_NAME",
    "CertificateAuthority",
    "certificate_expired",
    "certificate_fingerprint",
    "certificate_name",
    "certificate_not_after",
    "certificate_role",
    "create_ca",
    "generate_key",
    "issue_certificate",
    "issue_server_certificate",
    "key_matches_certificate",
    "load_certificate",
    "load_private_key",
    "make_csr",
    "private_key_pem",
    "reissue_certificate",
    "verify_issued_by",
]

# The name every coordinator certificate carries and every channel checks (transport overrides the target name),
# so a bundle's address may be an IP, a host name or a tunnel without re-issuing the server certificate.
SERVER_NAME = "fedlesion-coordinator"
ROLE_URI_PREFIX = "fedlesion:role:"
CA_LIFETIME_DAYS = 3650
# Backdating absorbs small clock differences between the coordinator and the sites.
CLOCK_SKEW = dt.timedelta(minutes=5)


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM: what grpc reads; protect the file by its mode."""
    encoding, layout = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, layout, serialization.NoEncryption())


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"the TLS key is {type(key).__name__}, an EC P-256 key is required")
    return key


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise ValueError(f"not a PEM certificate: {error}") from None


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA's certificate and key (PEM): only init, enroll and renew hold it, never `serve`."""

    cert_pem: bytes
    key_pem: bytes

    def __post_init__(self) -> None:
        if not key_matches_certificate(self.key_pem, self.cert_pem):
            raise ValueError("the CA key does not belong to the CA certificate")

    def _sign(self, builder: x509.CertificateBuilder) -> bytes:
        ca_cert, ca_key = load_certificate(self.cert_pem), load_private_key(self.key_pem)
        builder = builder.issuer_name(ca_cert.subject).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: x509.Name, public_key: ec.EllipticCurvePublicKey, lifetime_days: float, now: dt.datetime | None
) -> x509.CertificateBuilder:
    start = _now(now)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + dt.timedelta(days=lifetime_days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(
    name: str = "fedlesion federation CA", *, lifetime_days: float = CA_LIFETIME_DAYS, now: dt.datetime | None = None
) -> CertificateAuthority:
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        _builder(subject, key.public_key(), lifetime_days, now)
        .issuer_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
    )
    cert_pem = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    return CertificateAuthority(cert_pem=cert_pem, key_pem=private_key_pem(key))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(builder: x509.CertificateBuilder, usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )


def issue_server_certificate(
    ca: CertificateAuthority, address: str, *, lifetime_days: float = 825, now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for the coordinator: SAN = SERVER_NAME plus the address's host (DNS or IP)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        if host and host != SERVER_NAME:
            names.append(x509.DNSName(host))
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    builder = _leaf(_builder(subject, key.public_key(), lifetime_days, now), ExtendedKeyUsageOID.SERVER_AUTH)
    return private_key_pem(key), ca._sign(builder.add_extension(x509.SubjectAlternativeName(names), critical=False))


def make_csr(name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM certificate request for `key`; the coordinator decides the certificate's name and role, not the CSR."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def _site_certificate(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    name: str,
    role: SiteRole | str,
    lifetime_days: float,
    now: dt.datetime | None,
) -> bytes:
    if not name or not name.isprintable() or len(name) > 64:
        raise ValueError(f"site name {name!r}: 1 to 64 printable characters")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise ValueError("the site's key must be an EC P-256 key")
    if lifetime_days <= 0:
        raise ValueError("lifetime_days must be positive")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    role_uri = x509.UniformResourceIdentifier(ROLE_URI_PREFIX + SiteRole(role).value)
    builder = _leaf(_builder(subject, public_key, lifetime_days, now), ExtendedKeyUsageOID.CLIENT_AUTH)
    return ca._sign(builder.add_extension(x509.SubjectAlternativeName([role_uri]), critical=False))


def issue_certificate(
    ca: CertificateAuthority,
    csr_pem: bytes,
    name: str,
    role: SiteRole | str,
    lifetime_days: float,
    *,
    now: dt.datetime | None = None,
) -> bytes:
    """The site certificate (PEM) for a CSR whose signature proves it holds the key; ValueError for a bad CSR."""
    try:
        request = x509.load_pem_x509_csr(csr_pem)
    except ValueError as error:
        raise ValueError(f"not a PEM certificate request: {error}") from None
    if not request.is_signature_valid:
        raise ValueError("the certificate request's signature does not verify")
    return _site_certificate(ca, request.public_key(), name, role, lifetime_days, now)  # type: ignore[arg-type]


def reissue_certificate(
    ca: CertificateAuthority, cert_pem: bytes, lifetime_days: float, *, now: dt.datetime | None = None
) -> bytes:
    """Renewal: a new certificate for the same key, name and role (the site keeps its key and bundle layout)."""
    verify_issued_by(ca.cert_pem, cert_pem)
    public_key = load_certificate(cert_pem).public_key()
    name, role = certificate_name(cert_pem), certificate_role(cert_pem)
    return _site_certificate(ca, public_key, name, role, lifetime_days, now)  # type: ignore[arg-type]


def certificate_fingerprint(pem: bytes) -> str:
    """sha256 hex of the certificate's DER: what the coordinator's site and revocation tables key on."""
    return sha256_hex(load_certificate(pem).public_bytes(serialization.Encoding.DER))


def certificate_name(pem: bytes) -> str:
    names = load_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError("the certificate has no single common name")
    return str(names[0].value)


def certificate_role(pem: bytes) -> SiteRole:
    try:
        alternative = load_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise ValueError("the certificate carries no role") from None
    roles = [
        uri.removeprefix(ROLE_URI_PREFIX)
        for uri in alternative.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(ROLE_URI_PREFIX)
    ]
    if len(roles) != 1:
        raise ValueError("the certificate carries no single role")
    return SiteRole(roles[0])


def certificate_not_after(pem: bytes) -> dt.datetime:
    return load_certificate(pem).not_valid_after_utc


def certificate_expired(pem: bytes, *, now: dt.datetime | None = None) -> bool:
    return _now(now) >= certificate_not_after(pem)


def key_matches_certificate(key_pem: bytes, cert_pem: bytes) -> bool:
    public = load_certificate(cert_pem).public_key()
    return load_private_key(key_pem).public_key() == public


def verify_issued_by(ca_cert_pem: bytes, cert_pem: bytes) -> None:
    """ValueError unless the CA signed `cert_pem` (bundle checks, renewals)."""
    try:
        load_certificate(cert_pem).verify_directly_issued_by(load_certificate(ca_cert_pem))
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError("the certificate was not issued by this CA") from None
