"""The coordinator directory and the operator's commands that run beside `serve`: init, enroll, renew, revoke,
resume, declare, release and publish.

Keys live apart (ARCHITECTURE.md): `DIR/ca/` is read only here by init, enroll and renew; `DIR/release/` only by
`release` (and its public keys by enroll, for the bundles); `serve` reads `DIR/server/` and the state database,
so a compromised server can neither mint a site nor release a model. Every command writes its audit row.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from models.durable import create_file, fsync_dir, write_atomic
from models.federation import pki
from models.federation.enrollment import PAYLOAD_KEY_BYTES, EnrollmentBundle
from models.federation.roles import SiteRole
from models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Task, parse_manifest
from models.package import LoadedPackage, TrustPolicy, load_package
from models.signing import generate_key_pair, load_private_key, parse_signature, sign
from training.federation.state import INCOMING_PREFIX, CoordinatorState, Evaluation, VersionState

DEFAULT_LIFETIME_DAYS = 365


@dataclass(frozen=True)
class CoordinatorDir:
    """The layout of `coordinator init --dir DIR`."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def release(self) -> Path:
        return self.root / "release"

    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def round_key(self) -> Path:
        return self.server / "round.key"

    @property
    def address(self) -> str:
        return (self.server / "address").read_text(encoding="utf-8").strip()

    def rounds(self, plan_sha256: str) -> Path:
        """A plan's rounds: base and aggregate weights, updates, and the operators' report (monitoring.py)."""
        return self.root / "rounds" / plan_sha256[:16]

    def certificate_authority(self) -> pki.CertificateAuthority:
        return pki.CertificateAuthority((self.ca / "ca.pem").read_bytes(), (self.ca / "ca.key").read_bytes())

    def release_public_keys(self) -> tuple[bytes, ...]:
        """The current release key first, then the older ones kept for rotation."""
        current = self.release / "release.pub.pem"
        older = sorted(p for p in self.release.glob("*.pub.pem") if p != current)
        return tuple(path.read_bytes() for path in [current, *older])

    def state(self) -> CoordinatorState:
        if not (self.server / "address").is_file():
            raise ValueError(f"{self.root} is not a coordinator directory: run `fedlesion coordinator init` first")
        return CoordinatorState(self.root)


def operator() -> str:
    """Who runs an audited command (the login name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def init(directory: Path, address: str) -> CoordinatorDir:
    """A CA, the server certificate, the round and release signing keys, and the state database; never overwrites."""
    layout = CoordinatorDir(Path(directory))
    for folder in (layout.ca, layout.release, layout.server):
        if folder.exists():
            raise ValueError(f"{folder} exists: this directory already holds a coordinator")
    layout.root.mkdir(parents=True, exist_ok=True)
    for folder in (layout.ca, layout.release, layout.server):
        folder.mkdir(mode=0o700)
    ca = pki.create_ca()
    create_file(layout.ca / "ca.key", ca.key_pem, mode=0o600)
    create_file(layout.ca / "ca.pem", ca.cert_pem)
    release_private, release_public = generate_key_pair()
    create_file(layout.release / "release.key", release_private, mode=0o600)
    create_file(layout.release / "release.pub.pem", release_public)
    server_key, server_cert = pki.issue_server_certificate(ca, address)
    create_file(layout.server / "server.key", server_key, mode=0o600)
    create_file(layout.server / "server.pem", server_cert)
    create_file(layout.server / "ca.pem", ca.cert_pem)
    create_file(layout.round_key, generate_key_pair()[0], mode=0o600)
    create_file(layout.server / "address", f"{address}\n".encode())
    layout.state().close()
    return layout


def enroll(directory: Path, site: str, role: SiteRole | str, out: Path, *, csr_pem: bytes | None = None,
           lifetime_days: float = DEFAULT_LIFETIME_DAYS) -> EnrollmentBundle:
    """Sign the site's request (or, without one, a key made here and put in the bundle) into `out` (mode 0600)."""
    layout = CoordinatorDir(Path(directory))
    state = layout.state()
    key_pem = None
    if csr_pem is None:
        key = pki.generate_key()
        key_pem, csr_pem = pki.private_key_pem(key), pki.make_csr(site, key)
    cert_pem = pki.issue_certificate(layout.certificate_authority(), csr_pem, site, role, lifetime_days)
    bundle = _bundle(layout, cert_pem, key_pem, secrets.token_bytes(PAYLOAD_KEY_BYTES))
    state.enroll(site, SiteRole(role).value, bundle.fingerprint, pki.certificate_not_after(cert_pem).timestamp(),
                 bundle.payload_key, cert_pem, actor=operator())
    bundle.write(out)
    return bundle


def renew(directory: Path, site: str, out: Path, *, csr_pem: bytes | None = None, old_bundle: Path | None = None,
          lifetime_days: float = DEFAULT_LIFETIME_DAYS) -> EnrollmentBundle:
    """A new certificate for an enrolled site, written as a new bundle with the same payload key.

    With `csr_pem` the site changes its key; otherwise the newest certificate is re-issued for the same key (and
    `old_bundle`, when it holds the key, passes it on to the new bundle).
    """
    layout = CoordinatorDir(Path(directory))
    state = layout.state()
    ca = layout.certificate_authority()
    key_pem = None
    if csr_pem is not None:
        cert_pem = pki.issue_certificate(ca, csr_pem, site, state.site(site).role, lifetime_days)
    else:
        cert_pem = pki.reissue_certificate(ca, state.latest_certificate(site), lifetime_days)
        if old_bundle is not None:
            key_pem = EnrollmentBundle.read(old_bundle).key_pem
    bundle = _bundle(layout, cert_pem, key_pem, state.site(site).payload_key)
    state.renew(site, bundle.fingerprint, pki.certificate_not_after(cert_pem).timestamp(), cert_pem, actor=operator())
    bundle.write(out)
    return bundle


def _bundle(layout: CoordinatorDir, cert_pem: bytes, key_pem: bytes | None, payload_key: bytes) -> EnrollmentBundle:
    return EnrollmentBundle(
        site=pki.certificate_name(cert_pem),
        role=pki.certificate_role(cert_pem),
        coordinator_address=layout.address,
        ca_cert_pem=(layout.ca / "ca.pem").read_bytes(),
        cert_pem=cert_pem,
        key_pem=key_pem,
        release_public_keys=layout.release_public_keys(),
        payload_key=payload_key,
    )


def revoke(directory: Path, site: str, reason: str) -> None:
    """Takes effect at the running coordinator's next call from that site: every call reads the table."""
    CoordinatorDir(Path(directory)).state().revoke(site, reason or "revoked by the operator", actor=operator())


def resume(directory: Path, site: str) -> None:
    """Let a site that screening suspended (or a paused one) back into the rounds, from the next one it can join."""
    CoordinatorDir(Path(directory)).state().resume(site, actor=operator())


def declare(directory: Path, site: str, cases: int) -> None:
    """Record the dataset size a site declared: screening refuses its updates reporting more training cases."""
    CoordinatorDir(Path(directory)).state().declare(site, cases, actor=operator())


def release(directory: Path, task: Task | str, version: int, *, by: str | None = None) -> Path:
    """Sign a candidate's manifest with the release key and mark it released: from now on nodes may pull it. The
    manifest first gets the evaluator sites' scores of the candidate that have arrived (`with_evaluations`)."""
    layout = CoordinatorDir(Path(directory))
    state, task = layout.state(), Task(task)
    recorded = state.version(task, version)
    if recorded is None:
        raise ValueError(f"no {task.value} version {version}: `coordinator status` lists the candidates")
    if recorded.state is VersionState.RELEASED:
        raise ValueError(f"{task.value} version {version} is already released")
    key = load_private_key(layout.release / "release.key")
    old = (recorded.path / MANIFEST_FILE).read_bytes()
    new = old if recorded.round_id is None else with_evaluations(old, state.evaluations(recorded.round_id))
    if new != old:  # a crash before the signature below leaves it unverifiable until `release` runs again
        write_atomic(recorded.path / MANIFEST_FILE, lambda temp: temp.write_bytes(new))
    signature = sign(new, key)
    write_atomic(recorded.path / SIGNATURE_FILE, lambda temp: temp.write_bytes(signature))
    released = load_package(recorded.path, TrustPolicy.enrolled([key.public_key()], [task]))  # what nodes will check
    state.mark_released(task, released.manifest.version, actor=by or operator())
    return recorded.path


def with_evaluations(manifest_json: bytes, evaluations: Sequence[Evaluation]) -> bytes:
    """The manifest with each evaluator's means beside the trainers' metrics in `training.site_metrics`, under the
    evaluator's name with its case count as `evaluated_cases` (a trainer's `cases` are its training cases)."""
    if not evaluations:
        return manifest_json
    manifest = parse_manifest(manifest_json)
    site_metrics = {site: dict(values) for site, values in manifest.training.site_metrics.items()}
    for evaluation in evaluations:
        site_metrics[evaluation.site] = {**evaluation.metrics, "evaluated_cases": float(evaluation.num_cases)}
    return replace(manifest, training=replace(manifest.training, site_metrics=site_metrics)).to_json_bytes()


def publish(directory: Path, package: Path) -> LoadedPackage:
    """Register a package trained elsewhere (e.g. centrally) as the task's next candidate version.

    Its signature must verify under the key it names (integrity; trust comes with the release), demo packages are
    refused, and its version must be the task's next one so that versions stay gapless.
    """
    layout = CoordinatorDir(Path(directory))
    state = layout.state()
    package = Path(package)
    if not package.is_dir():
        raise ValueError(f"{package}: publish takes a package directory (model.onnx, manifest.json, manifest.sig)")
    signer = parse_signature((package / SIGNATURE_FILE).read_bytes()).public_key
    loaded = load_package(package, TrustPolicy.enrolled([signer]))
    if loaded.demo:
        raise ValueError(f"{package}: a demo package cannot become a candidate")
    task, version = loaded.manifest.task, loaded.manifest.version
    expected = state.next_version(task)
    if version != expected:
        raise ValueError(f"{package}: version {version}, but the next {task.value} version here is {expected} "
                         f"(export it with --version {expected})")
    target = state.versions_dir(task) / str(version)
    incoming = target.with_name(f"{INCOMING_PREFIX}{version}")
    incoming.mkdir(parents=True)
    try:
        for name, data in loaded.package_files().items():
            create_file(incoming / name, data, sync_directory=False)
        fsync_dir(incoming)
        os.rename(incoming, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    state.commit_candidate(task, version, target, round_id=None, actor=operator(), action="publish")
    return loaded


__all__ = ["CoordinatorDir", "DEFAULT_LIFETIME_DAYS", "declare", "enroll", "init", "operator", "publish", "release",
           "renew", "resume", "revoke", "with_evaluations"]
