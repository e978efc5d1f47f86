"""Ed25519 signatures over the exact bytes of `manifest.json` (design.md §2).

`manifest.sig` is a small JSON document holding the signature *and* the signer's public key. Naming the key lets
the loader tell the two failures apart that a bare signature cannot: "the manifest changed after signing" (the
signature does not verify under its own key) and "signed by someone you do not trust" (it verifies, but the key is
not one of yours). Trust still comes only from comparing that key with the node's trusted keys.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.durable import create_file

ALGORITHM = "ed25519"
DEMO_KEYS_DIR = Path(__file__).resolve().parent / "demo-keys"
DEMO_PRIVATE_KEY_FILE = DEMO_KEYS_DIR / "DEMO_PRIVATE_KEY_DO_NOT_TRUST.pem"
DEMO_PUBLIC_KEY_FILE = DEMO_KEYS_DIR / "DEMO_PUBLIC_KEY.pem"


@dataclass(frozen=True)
class SignatureFile:
    """The parsed contents of `manifest.sig`."""

    public_key: Ed25519PublicKey
    signature: bytes


def load_private_key(pem: bytes | Path) -> Ed25519PrivateKey:
    """An unencrypted PKCS8 PEM Ed25519 private key, from bytes or a file."""
    data = pem.read_bytes() if isinstance(pem, Path) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"private key is {type(key).__name__}, an Ed25519 key is required")
    return key


def load_public_key(pem: bytes | Path) -> Ed25519PublicKey:
    """A PEM (SubjectPublicKeyInfo) Ed25519 public key, from bytes or a file."""
    data = pem.read_bytes() if isinstance(pem, Path) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key is {type(key).__name__}, an Ed25519 key is required")
    return key


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the 32 raw public-key bytes, lowercase hex: what logs, the CLI and the web page show."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def demo_private_key() -> Ed25519PrivateKey:
    """The shipped demo key. Public on purpose: anything it signs proves nothing."""
    return load_private_key(DEMO_PRIVATE_KEY_FILE)


@functools.cache
def demo_public_key() -> Ed25519PublicKey:
    return load_public_key(DEMO_PUBLIC_KEY_FILE)


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The contents of `manifest.sig` for these exact manifest bytes."""
    if not isinstance(manifest_bytes, (bytes, bytearray)):
        raise ValueError(f"manifest_bytes must be bytes, not {type(manifest_bytes).__name__}")
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"key must be an Ed25519 private key, not {type(key).__name__}")
    document = {
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ).decode("ascii"),
        "signature": base64.b64encode(key.sign(bytes(manifest_bytes))).decode("ascii"),
    }
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("ascii")


def parse_signature(data: bytes) -> SignatureFile:
    """Read `manifest.sig`; a `ValueError` says what is wrong with it."""
    try:
        document = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("manifest.sig is not a signature document (ASCII JSON)") from None
    if not isinstance(document, dict) or set(document) != {"algorithm", "public_key", "signature"}:
        raise ValueError("manifest.sig must hold exactly algorithm, public_key and signature")
    if document["algorithm"] != ALGORITHM:
        raise ValueError(f"manifest.sig: algorithm {document['algorithm']!r} is not {ALGORITHM!r}")
    try:
        raw_key = base64.b64decode(document["public_key"], validate=True)
        signature = base64.b64decode(document["signature"], validate=True)
    except (binascii.Error, TypeError):
        raise ValueError("manifest.sig: public_key and signature must be base64") from None
    if len(raw_key) != 32 or len(signature) != 64:
        raise ValueError("manifest.sig: an Ed25519 public key has 32 bytes and a signature 64")
    return SignatureFile(Ed25519PublicKey.from_public_bytes(raw_key), signature)


def verify(manifest_bytes: bytes, signature: bytes, public_key: Ed25519PublicKey) -> bool:
    """True when `signature` (the contents of `manifest.sig`) is `public_key`'s signature over these bytes.

    Returns False rather than raising for a wrong key or changed bytes, so a caller cannot mistake "checked and
    failed" for a crash; a malformed signature file is still a `ValueError`.
    """
    parsed = parse_signature(signature)
    if public_key_fingerprint(parsed.public_key) != public_key_fingerprint(public_key):
        return False
    return signed_by_own_key(manifest_bytes, parsed)


def signed_by_own_key(manifest_bytes: bytes, parsed: SignatureFile) -> bool:
    """True when the signature verifies under the key the signature file names (says nothing about trust)."""
    try:
        parsed.public_key.verify(parsed.signature, bytes(manifest_bytes))
    except InvalidSignature:
        return False
    return True


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh (private PEM, public PEM) pair for `fedlesion model keygen`."""
    key = Ed25519PrivateKey.generate()
    return private_key_pem(key), public_key_pem(key.public_key())


def write_key_pair(prefix: str) -> tuple[Path, Path, bytes]:
    """A new pair as PREFIX.private.pem (created, never overwritten, readable by its owner only) and
    PREFIX.public.pem; returns both paths and the public PEM."""
    private_path, public_path = Path(f"{prefix}.private.pem"), Path(f"{prefix}.public.pem")
    for path in (private_path, public_path):
        if path.exists():
            raise ValueError(f"{path} exists; refusing to overwrite a key")
    private_pem, public_pem = generate_key_pair()
    create_file(private_path, private_pem, mode=0o600)
    create_file(public_path, public_pem)
    return private_path, public_path, public_pem
