"""The enrollment bundle: the one file (mode 0600) a site or a node receives from the coordinator's operator.

It holds what the site needs to talk to the coordinator (address, CA certificate, its own certificate and, only for
`--generate`, its key), whom to trust for released models (several Ed25519 release keys, so keys can rotate) and
the symmetric key of its payload encryption. A bundle without a key takes it from `site.key` beside the bundle
(`site keygen` wrote it there), so the site's TLS key never travels.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.durable import write_text_atomic
from models.federation import pki
from models.federation.roles import SiteRole
from models.manifest import Task
from models.package import TrustPolicy
from models.signing import load_public_key

__all__ = ["BUNDLE_FORMAT", "PAYLOAD_KEY_BYTES", "SITE_KEY_FILE", "EnrollmentBundle", "release_trust"]

BUNDLE_FORMAT = "fedlesion-enrollment-bundle/1"
SITE_KEY_FILE = "site.key"
PAYLOAD_KEY_BYTES = 32


@dataclass(frozen=True)
class EnrollmentBundle:
    """A site's enrollment; PEMs are bytes (what grpc and cryptography take). Checked on construction."""

    site: str
    role: SiteRole
    coordinator_address: str
    ca_cert_pem: bytes
    cert_pem: bytes
    key_pem: bytes | None
    release_public_keys: tuple[bytes, ...]
    payload_key: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", SiteRole(self.role))
        object.__setattr__(self, "release_public_keys", tuple(self.release_public_keys))
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator_address {self.coordinator_address!r} is not HOST:PORT")
        pki.verify_issued_by(self.ca_cert_pem, self.cert_pem)
        if pki.certificate_name(self.cert_pem) != self.site:
            raise ValueError(f"the certificate names {pki.certificate_name(self.cert_pem)!r}, not site {self.site!r}")
        if pki.certificate_role(self.cert_pem) is not self.role:
            raise ValueError(f"the certificate's role is {pki.certificate_role(self.cert_pem)}, not {self.role}")
        if self.key_pem is not None and not pki.key_matches_certificate(self.key_pem, self.cert_pem):
            raise ValueError("the site key does not belong to the site certificate")
        if not self.release_public_keys:
            raise ValueError("release_public_keys: at least one release key is required")
        for pem in self.release_public_keys:
            load_public_key(pem)
        if not isinstance(self.payload_key, bytes) or len(self.payload_key) != PAYLOAD_KEY_BYTES:
            raise ValueError(f"payload_key must be {PAYLOAD_KEY_BYTES} bytes")

    @property
    def fingerprint(self) -> str:
        return pki.certificate_fingerprint(self.cert_pem)

    def to_json(self) -> str:
        document = {
            "format": BUNDLE_FORMAT,
            "site": self.site,
            "role": self.role.value,
            "coordinator_address": self.coordinator_address,
            "ca_cert_pem": self.ca_cert_pem.decode("ascii"),
            "cert_pem": self.cert_pem.decode("ascii"),
            "key_pem": None if self.key_pem is None else self.key_pem.decode("ascii"),
            "release_public_keys": [pem.decode("ascii") for pem in self.release_public_keys],
            "payload_key": base64.b64encode(self.payload_key).decode("ascii"),
        }
        return json.dumps(document, indent=2) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """One JSON file, mode 0600, written atomically: it holds the payload key (and maybe the TLS key)."""
        return write_text_atomic(path, self.to_json(), mode=0o600)

    @classmethod
    def read(cls, path: str | os.PathLike[str], key_path: str | os.PathLike[str] | None = None) -> EnrollmentBundle:
        """The bundle at `path`; without a key inside, the key comes from `key_path` (default: site.key beside it)."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable enrollment bundle: {error}") from None
        try:
            return cls._from_document(document, path, Path(key_path) if key_path else path.parent / SITE_KEY_FILE)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: malformed enrollment bundle ({type(error).__name__}: {error})") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def _from_document(cls, document: Any, path: Path, key_path: Path) -> EnrollmentBundle:
        if not isinstance(document, dict) or document.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"not a {BUNDLE_FORMAT} document")
        key_pem = document["key_pem"]
        if key_pem is None:
            try:
                key = key_path.read_bytes()
            except OSError as error:
                raise ValueError(f"the bundle holds no key and {key_path} cannot be read: {error.strerror}") from None
        else:
            key = key_pem.encode("ascii")
        try:
            payload_key = base64.b64decode(document["payload_key"], validate=True)
        except binascii.Error:
            raise ValueError("payload_key is not base64") from None
        return cls(
            site=str(document["site"]),
            role=SiteRole(document["role"]),
            coordinator_address=str(document["coordinator_address"]),
            ca_cert_pem=document["ca_cert_pem"].encode("ascii"),
            cert_pem=document["cert_pem"].encode("ascii"),
            key_pem=key,
            release_public_keys=tuple(pem.encode("ascii") for pem in document["release_public_keys"]),
            payload_key=payload_key,
        )

    def require_key(self) -> bytes:
        """The site's TLS key; ValueError when the bundle was built without one (e.g. before `write`)."""
        if self.key_pem is None:
            raise ValueError(f"the bundle of {self.site!r} holds no TLS key")
        return self.key_pem


def release_trust(bundle: EnrollmentBundle, tasks: Iterable[Task] = tuple(Task)) -> TrustPolicy:
    """Whose packages an enrolled node accepts: the bundle's release keys, never the demo key."""
    return TrustPolicy.enrolled((load_public_key(pem) for pem in bundle.release_public_keys), tasks)
