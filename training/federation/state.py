"""The coordinator's state in SQLite (`DIR/state.sqlite3`): sites, certificates, the plan, rounds, updates,
versions and the audit log.

Every process of a consortium's coordinator (`serve`, and `enroll`, `revoke`, `release`, `status` run beside it)
opens the same file, so a revocation committed by `coordinator revoke` is what `serve`'s next call checks. Writes
are short `BEGIN IMMEDIATE` transactions (models.sqlite_tx), `synchronous=FULL`: a committed row survives a
power cut.

Crash rule for versions: a round's package is written completely (under a temporary name, then renamed) *before*
the transaction that records the version and closes the round. After `kill -9` between the two, `reconcile`
finds the package on disk without its row and commits it then; so a version is never published twice and never
skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from models.manifest import MANIFEST_FILE, Task, parse_manifest
from models.sqlite_tx import ThreadConnections, add_missing_column, connect, read_snapshot, write_transaction
from training.calibration import DiceByThreshold

STATE_FILE = "state.sqlite3"
INCOMING_PREFIX = ".incoming-"  # a package being written: crash debris when found at start
DOWN, UP = "down", "up"  # the directions of a round's traffic: its model to a site, an update from it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    state TEXT NOT NULL,              -- active | paused | revoked
    reason TEXT NOT NULL DEFAULT '',  -- why paused or revoked
    payload_key BLOB NOT NULL,        -- the AES-GCM key in the site's bundle
    enrolled_at REAL NOT NULL,
    last_seen REAL,
    activity TEXT NOT NULL DEFAULT '' -- the site's last heartbeat state (idle, training, ...)
);
CREATE TABLE IF NOT EXISTS certificates (
    fingerprint TEXT PRIMARY KEY,     -- sha256 of the DER certificate
    site TEXT NOT NULL REFERENCES sites(name),
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL,
    cert_pem TEXT NOT NULL            -- renewal re-issues it for the same key
);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY,
    plan_sha256 TEXT NOT NULL,
    round INTEGER NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,              -- open | closed
    attempt INTEGER NOT NULL DEFAULT 1,
    invited TEXT NOT NULL,            -- JSON list of site names
    base_sha256 TEXT NOT NULL,
    base_path TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    version INTEGER,
    note TEXT NOT NULL DEFAULT '',    -- why the round was retried, last
    UNIQUE (plan_sha256, round)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    attempt INTEGER NOT NULL,         -- a refused site may try again in the round's next attempt
    site TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    num_cases INTEGER NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}',
    path TEXT,
    received_at REAL NOT NULL,
    threshold_dice TEXT               -- JSON: the site's mean validation Dice per threshold (training.calibration)
);
CREATE TABLE IF NOT EXISTS evaluations (
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    site TEXT NOT NULL,
    num_cases INTEGER NOT NULL,
    metrics TEXT NOT NULL,            -- an evaluator's means over its cases of the round's candidate
    received_at REAL NOT NULL,
    histograms TEXT NOT NULL DEFAULT '{}',  -- JSON: metric → {"edges", "counts"}, ≥ 5 cases per bin
    PRIMARY KEY (round_id, site)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_accepted_update ON updates (round_id, site) WHERE accepted = 1;
CREATE TABLE IF NOT EXISTS versions (
    task TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,              -- candidate | released
    round_id INTEGER REFERENCES rounds(id),
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    released_by TEXT,
    released_at REAL,
    PRIMARY KEY (task, version)
);
CREATE TABLE IF NOT EXISTS site_screening (
    site TEXT PRIMARY KEY REFERENCES sites(name),
    declared_cases INTEGER,           -- the dataset size the site declared to the consortium (`coordinator declare`)
    refused_in_a_row INTEGER NOT NULL DEFAULT 0  -- its updates screening refused since one passed; 2 suspends it
);
CREATE TABLE IF NOT EXISTS traffic (
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    site TEXT NOT NULL,
    direction TEXT NOT NULL,          -- down (the round's weights, or its candidate to an evaluator) | up (an update)
    bytes INTEGER NOT NULL,           -- the streams' messages as serialized, every attempt and resend
    PRIMARY KEY (round_id, site, direction)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,             -- enroll | renew | revoke | declare | screen | suspend | resume | publish
                                      -- | release | plan
    subject TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
"""
# Columns added after the tables first shipped: a database from before gets them when it is opened.
_ADDED_COLUMNS = (("updates", "threshold_dice", "TEXT"), ("evaluations", "histograms", "TEXT NOT NULL DEFAULT '{}'"))


class SiteState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"  # its custodian's policy refused the task: not invited again in this round
    SUSPENDED = "suspended"  # screening refused its updates twice in a row: not invited until `coordinator resume`
    REVOKED = "revoked"


class RoundState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class VersionState(StrEnum):
    CANDIDATE = "candidate"
    RELEASED = "released"


@dataclass(frozen=True)
class Site:
    name: str
    role: str
    state: SiteState
    reason: str
    payload_key: bytes
    last_seen: float | None


@dataclass(frozen=True)
class Round:
    id: int
    plan_sha256: str
    round: int
    task: Task
    state: RoundState
    attempt: int
    invited: tuple[str, ...]
    base_sha256: str
    base_path: Path
    opened_at: float
    deadline: float
    version: int | None


@dataclass(frozen=True)
class AcceptedUpdate:
    site: str
    num_cases: int
    metrics: Mapping[str, float]
    path: Path
    threshold_dice: DiceByThreshold | None = None


@dataclass(frozen=True)
class Evaluation:
    """An evaluator's report on a round's candidate: case count, means, histograms (metric → edges, counts)."""

    site: str
    num_cases: int
    metrics: Mapping[str, float]
    histograms: Mapping[str, Mapping[str, list[Any]]]


@dataclass(frozen=True)
class Version:
    task: Task
    version: int
    state: VersionState
    path: Path
    round_id: int | None = None  # None: published, not a round's


class CoordinatorState:
    """The coordinator's tables; safe to share between threads (one connection per thread) and processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        # it holds every site's payload key: owner-only, like the key files (SQLite gives its WAL the same mode)
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._connections = ThreadConnections(lambda: connect(self.path, synchronous="FULL"))
        self._connections.get().executescript(_SCHEMA)  # idempotent: every process opening the file runs it
        with self._write() as db:
            for table, column, definition in _ADDED_COLUMNS:
                add_missing_column(db, table, column, definition)

    def close(self) -> None:
        self._connections.close_all()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with write_transaction(self._connections.get()) as db:
            yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with read_snapshot(self._connections.get()) as db:
            yield db

    # -- audit ------------------------------------------------------------------------------------------------
    @staticmethod
    def _audit(db: sqlite3.Connection, actor: str, action: str, subject: str, detail: Mapping[str, Any]) -> None:
        db.execute(
            "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, subject, json.dumps(dict(detail), sort_keys=True)),
        )

    def audit(self, actor: str, action: str, subject: str, **detail: Any) -> None:
        with self._write() as db:
            self._audit(db, actor, action, subject, detail)

    def audit_log(self) -> list[dict[str, Any]]:
        with self._read() as db:
            rows = db.execute("SELECT at, actor, action, subject, detail FROM audit ORDER BY id").fetchall()
        return [dict(at=r[0], actor=r[1], action=r[2], subject=r[3], detail=json.loads(r[4])) for r in rows]

    # -- sites and certificates -------------------------------------------------------------------------------
    def enroll(self, name: str, role: str, fingerprint: str, not_after: float, payload_key: bytes, cert_pem: bytes,
               *, actor: str) -> None:
        """A new site with its first certificate; enrolling a name twice is refused (renew or revoke it)."""
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM sites WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"site {name!r} is already enrolled: renew its certificate or enroll another name")
            db.execute(
                "INSERT INTO sites (name, role, state, payload_key, enrolled_at) VALUES (?, ?, ?, ?, ?)",
                (name, role, SiteState.ACTIVE, payload_key, now),
            )
            db.execute("INSERT INTO certificates VALUES (?, ?, ?, ?, ?)",
                       (fingerprint, name, not_after, now, cert_pem.decode("ascii")))
            self._audit(db, actor, "enroll", name, {"role": role, "fingerprint": fingerprint, "not_after": not_after})

    def renew(self, name: str, fingerprint: str, not_after: float, cert_pem: bytes, *, actor: str) -> None:
        """A new certificate for an enrolled, unrevoked site (the old one stays valid until it expires)."""
        with self._write() as db:
            site = self._site(db, name)
            if site.state is SiteState.REVOKED:
                raise ValueError(f"site {name!r} is revoked: enroll it under a new name")
            db.execute("INSERT INTO certificates VALUES (?, ?, ?, ?, ?)",
                       (fingerprint, name, not_after, time.time(), cert_pem.decode("ascii")))
            self._audit(db, actor, "renew", name, {"fingerprint": fingerprint, "not_after": not_after})

    def revoke(self, name: str, reason: str, *, actor: str) -> None:
        with self._write() as db:
            self._site(db, name)
            db.execute("UPDATE sites SET state = ?, reason = ? WHERE name = ?", (SiteState.REVOKED, reason, name))
            self._audit(db, actor, "revoke", name, {"reason": reason})

    def latest_certificate(self, name: str) -> bytes:
        """The site's newest certificate (PEM): what renewal re-issues."""
        with self._read() as db:
            row = db.execute("SELECT cert_pem FROM certificates WHERE site = ? ORDER BY issued_at DESC LIMIT 1",
                             (name,)).fetchone()
        if row is None:
            raise ValueError(f"no site named {name!r} is enrolled")
        return row[0].encode("ascii")

    def pause(self, name: str, reason: str) -> None:
        """Stop inviting an active site (its custodian refused the plan); a revoked site stays revoked."""
        with self._write() as db:
            db.execute("UPDATE sites SET state = ?, reason = ? WHERE name = ? AND state = ?",
                       (SiteState.PAUSED, reason, name, SiteState.ACTIVE))

    def unpause(self, name: str | None = None) -> None:
        """Invite a paused site again (`name`), or every paused site (None: a new round asks them again)."""
        with self._write() as db:
            db.execute("UPDATE sites SET state = ?, reason = '' WHERE state = ? AND (? IS NULL OR name = ?)",
                       (SiteState.ACTIVE, SiteState.PAUSED, name, name))

    def resume(self, name: str, *, actor: str) -> None:
        """The operator lets a suspended (or paused) site back in: invited again, its screening record cleared."""
        with self._write() as db:
            site = self._site(db, name)
            if site.state not in (SiteState.SUSPENDED, SiteState.PAUSED):
                raise ValueError(f"site {name!r} is {site.state.value}: only a suspended or paused site resumes")
            db.execute("UPDATE sites SET state = ?, reason = '' WHERE name = ?", (SiteState.ACTIVE, name))
            db.execute("UPDATE site_screening SET refused_in_a_row = 0 WHERE site = ?", (name,))
            self._audit(db, actor, "resume", name, {"was": site.state.value, "reason": site.reason})

    # -- screening --------------------------------------------------------------------------------------------
    def declare(self, name: str, cases: int, *, actor: str) -> None:
        """The dataset size a site declared: screening refuses an update reporting more training cases."""
        if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
            raise ValueError(f"declared cases must be an integer ≥ 1, got {cases!r}")
        with self._write() as db:
            self._site(db, name)
            db.execute("INSERT INTO site_screening (site, declared_cases) VALUES (?, ?) "
                       "ON CONFLICT (site) DO UPDATE SET declared_cases = excluded.declared_cases", (name, cases))
            self._audit(db, actor, "declare", name, {"cases": cases})

    def declared_cases(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT site, declared_cases FROM site_screening WHERE declared_cases IS NOT NULL")
            return {row[0]: row[1] for row in rows}

    def record_screening(self, round_id: int, refused: Mapping[str, str], passed: Sequence[str], *,
                         actor: str) -> list[str]:
        """Turn the round's accepted updates that screening refused into refusals, with why; count them per site
        (an update that passes resets the count) and suspend a site at its second in a row. Returns the sites
        suspended now."""
        suspended: list[str] = []
        with self._write() as db:
            for site, reason in refused.items():
                db.execute("UPDATE updates SET accepted = 0, reason = ? WHERE round_id = ? AND site = ? AND accepted = 1",
                           (f"screening: {reason}", round_id, site))
                db.execute("INSERT INTO site_screening (site, refused_in_a_row) VALUES (?, 1) ON CONFLICT (site) "
                           "DO UPDATE SET refused_in_a_row = refused_in_a_row + 1", (site,))
                in_a_row = db.execute("SELECT refused_in_a_row FROM site_screening WHERE site = ?",
                                      (site,)).fetchone()[0]
                self._audit(db, actor, "screen", site, {"round_id": round_id, "reason": reason,
                                                        "refused_in_a_row": in_a_row})
                if in_a_row >= 2 and self._site(db, site).state in (SiteState.ACTIVE, SiteState.PAUSED):
                    why = (f"screening refused {in_a_row} updates in a row (last: {reason}); "
                           f"`fedlesion coordinator resume {site}` lets it back")
                    db.execute("UPDATE sites SET state = ?, reason = ? WHERE name = ?", (SiteState.SUSPENDED, why, site))
                    self._audit(db, actor, "suspend", site, {"reason": why})
                    suspended.append(site)
            for site in passed:
                db.execute("INSERT INTO site_screening (site) VALUES (?) ON CONFLICT (site) "
                           "DO UPDATE SET refused_in_a_row = 0", (site,))
        return suspended

    def site(self, name: str) -> Site:
        with self._read() as db:
            return self._site(db, name)

    @staticmethod
    def _site(db: sqlite3.Connection, name: str) -> Site:
        row = db.execute("SELECT name, role, state, reason, payload_key, last_seen FROM sites WHERE name = ?",
                         (name,)).fetchone()
        if row is None:
            raise ValueError(f"no site named {name!r} is enrolled")
        return Site(row[0], row[1], SiteState(row[2]), row[3], bytes(row[4]), row[5])

    def certificate_site(self, fingerprint: str, now: float | None = None) -> tuple[Site | None, str | None]:
        """The site a peer certificate belongs to, or None and why it may not call (unknown, expired, revoked)."""
        now = time.time() if now is None else now
        with self._read() as db:
            row = db.execute("SELECT site, not_after FROM certificates WHERE fingerprint = ?",
                             (fingerprint,)).fetchone()
            if row is None:
                return None, "unknown certificate (not issued by this coordinator's enrollment)"
            site = self._site(db, row[0])
        if site.state is SiteState.REVOKED:
            return site, f"site {site.name} is revoked: {site.reason}"
        if row[1] < now:
            return site, f"site {site.name}'s certificate expired"
        return site, None

    def seen(self, name: str, activity: str, now: float | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE sites SET last_seen = ?, activity = ? WHERE name = ?",
                       (time.time() if now is None else now, activity, name))

    def active_sites(self, role: str, seen_after: float) -> list[str]:
        """Enrolled sites of `role`, neither paused nor revoked, seen since `seen_after`: the ones a round invites."""
        with self._read() as db:
            rows = db.execute(
                "SELECT name FROM sites WHERE role = ? AND state = ? AND last_seen >= ? ORDER BY name",
                (role, SiteState.ACTIVE, seen_after),
            ).fetchall()
        return [row[0] for row in rows]

    def enrolled_sites(self, role: str) -> list[str]:
        """Every enrolled site of `role` not revoked, whatever its state, in name order: the sites a sequential rule
        takes turns over (a site away for a while keeps its place)."""
        with self._read() as db:
            rows = db.execute("SELECT name FROM sites WHERE role = ? AND state != ? ORDER BY name",
                              (role, SiteState.REVOKED)).fetchall()
        return [row[0] for row in rows]

    # -- the plan ---------------------------------------------------------------------------------------------
    def adopt_plan(self, plan_toml: str, plan_sha256: str, *, actor: str) -> bool:
        """Record the plan `serve` runs; True when it changed. A new plan wakes the sites paused for the old one."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'plan_sha256'").fetchone()
            if row is not None and row[0] == plan_sha256:
                return False
            if row is not None:
                unfinished = db.execute("SELECT 1 FROM rounds WHERE plan_sha256 = ? AND state = ?",
                                        (row[0], RoundState.OPEN)).fetchone()
                if unfinished:
                    raise ValueError(f"a round of plan {row[0][:12]} is still open: serve that plan until it ends")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('plan_sha256', ?)", (plan_sha256,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('plan_toml', ?)", (plan_toml,))
            db.execute("UPDATE sites SET state = ?, reason = '' WHERE state = ?", (SiteState.ACTIVE, SiteState.PAUSED))
            self._audit(db, actor, "plan", plan_sha256, {})
            return True

    # -- rounds -----------------------------------------------------------------------------------------------
    def open_round(self, plan_sha256: str, number: int, task: Task, invited: Sequence[str], base_sha256: str,
                   base_path: Path, deadline: float) -> Round:
        with self._write() as db:
            db.execute(
                "INSERT INTO rounds (plan_sha256, round, task, state, invited, base_sha256, base_path, opened_at, "
                "deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (plan_sha256, number, str(task), RoundState.OPEN, json.dumps(list(invited)), base_sha256,
                 str(base_path), time.time(), deadline),
            )
        return self.round(plan_sha256, number)  # type: ignore[return-value]

    def retry_round(self, round_id: int, invited: Sequence[str], deadline: float, note: str) -> None:
        """Reopen a round that missed its quorum: the updates it accepted stay (same base weights)."""
        with self._write() as db:
            db.execute(
                "UPDATE rounds SET attempt = attempt + 1, invited = ?, deadline = ?, note = ? WHERE id = ?",
                (json.dumps(list(invited)), deadline, note, round_id),
            )

    def round(self, plan_sha256: str, number: int) -> Round | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE plan_sha256 = ? AND round = ?",
                             (plan_sha256, number)).fetchone()
        return None if row is None else _round(row)

    def last_round(self, plan_sha256: str) -> Round | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE plan_sha256 = ? ORDER BY round DESC LIMIT 1",
                             (plan_sha256,)).fetchone()
        return None if row is None else _round(row)

    def record_update(self, round_id: int, site: str, *, accepted: bool, reason: str = "", num_cases: int = 0,
                      metrics: Mapping[str, float] | None = None, path: Path | None = None,
                      threshold_dice: DiceByThreshold | None = None) -> str | None:
        """Record an update (accepted or refused, with why); returns why an accepted one was refused after all
        (the site already has an accepted update in this round), else None."""
        with self._write() as db:
            if accepted and db.execute("SELECT 1 FROM updates WHERE round_id = ? AND site = ? AND accepted = 1",
                                       (round_id, site)).fetchone():
                accepted, reason = False, "a second update from this site in this round"
                path = None
            db.execute(
                "INSERT INTO updates (round_id, attempt, site, accepted, reason, num_cases, metrics, path, "
                "received_at, threshold_dice) VALUES (?, (SELECT attempt FROM rounds WHERE id = ?), ?, ?, ?, ?, ?, ?, "
                "?, ?)",
                (round_id, round_id, site, int(accepted), reason, num_cases, json.dumps(dict(metrics or {}), sort_keys=True),
                 None if path is None else str(path), time.time(),
                 None if threshold_dice is None else json.dumps(asdict(threshold_dice))),
            )
        return None if accepted else reason

    def answered(self, round_id: int) -> set[str]:
        """Sites done with the round's current attempt: an accepted update in any attempt, a refused one in this."""
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT u.site FROM updates u JOIN rounds r ON r.id = u.round_id "
                "WHERE u.round_id = ? AND (u.accepted = 1 OR u.attempt = r.attempt)", (round_id,),
            ).fetchall()
        return {row[0] for row in rows}

    def invite(self, round_id: int, site: str) -> None:
        """Add a site that became active while the round was open (it joins this round rather than wait)."""
        with self._write() as db:
            row = db.execute("SELECT invited FROM rounds WHERE id = ?", (round_id,)).fetchone()
            invited = json.loads(row[0])
            if site not in invited:
                db.execute("UPDATE rounds SET invited = ? WHERE id = ?", (json.dumps([*invited, site]), round_id))

    def current_round(self, plan_sha256: str) -> Round | None:
        """The plan's open round, if any."""
        with self._read() as db:
            row = db.execute(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE plan_sha256 = ? AND state = ?",
                             (plan_sha256, RoundState.OPEN)).fetchone()
        return None if row is None else _round(row)

    def accepted_updates(self, round_id: int) -> list[AcceptedUpdate]:
        with self._read() as db:
            rows = db.execute("SELECT site, num_cases, metrics, path, threshold_dice FROM updates "
                              "WHERE round_id = ? AND accepted = 1 ORDER BY site", (round_id,)).fetchall()
        return [AcceptedUpdate(r[0], r[1], json.loads(r[2]), Path(r[3]),
                               None if r[4] is None else DiceByThreshold(**json.loads(r[4]))) for r in rows]

    def round_to_evaluate(self, plan_sha256: str, site: str) -> Round | None:
        """The plan's newest closed round that `site` has not evaluated yet."""
        with self._read() as db:
            row = db.execute(
                f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE plan_sha256 = ? AND state = ? AND id NOT IN "
                "(SELECT round_id FROM evaluations WHERE site = ?) ORDER BY round DESC LIMIT 1",
                (plan_sha256, RoundState.CLOSED, site),
            ).fetchone()
        return None if row is None else _round(row)

    def record_evaluation(self, round_id: int, site: str, num_cases: int, metrics: Mapping[str, float],
                          histograms: Mapping[str, Mapping[str, list[Any]]] | None = None) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO evaluations (round_id, site, num_cases, metrics, received_at, "
                       "histograms) VALUES (?, ?, ?, ?, ?, ?)",
                       (round_id, site, num_cases, json.dumps(dict(metrics), sort_keys=True), time.time(),
                        json.dumps({name: dict(bins) for name, bins in (histograms or {}).items()}, sort_keys=True)))

    def evaluations(self, round_id: int) -> list[Evaluation]:
        with self._read() as db:
            rows = db.execute("SELECT site, num_cases, metrics, histograms FROM evaluations WHERE round_id = ? "
                              "ORDER BY site", (round_id,)).fetchall()
        return [Evaluation(r[0], r[1], json.loads(r[2]), json.loads(r[3])) for r in rows]

    def record_traffic(self, round_id: int, site: str, direction: str, n_bytes: int) -> None:
        """Add `n_bytes` of a model streamed in `direction` (DOWN or UP) to the round's count for `site`."""
        if direction not in (DOWN, UP):
            raise ValueError(f"traffic direction must be {DOWN} or {UP}, got {direction!r}")
        with self._write() as db:
            db.execute("INSERT INTO traffic VALUES (?, ?, ?, ?) ON CONFLICT (round_id, site, direction) "
                       "DO UPDATE SET bytes = bytes + excluded.bytes", (round_id, site, direction, n_bytes))

    # -- versions ---------------------------------------------------------------------------------------------
    def versions_dir(self, task: Task) -> Path:
        return self.directory / "versions" / Task(task).value

    def next_version(self, task: Task) -> int:
        """One above every version recorded or lying on disk for `task` (a package without its row counts)."""
        with self._read() as db:
            row = db.execute("SELECT MAX(version) FROM versions WHERE task = ?", (str(task),)).fetchone()
        on_disk = [int(p.name) for p in _package_dirs(self.versions_dir(task))]
        return max([row[0] or 0, *on_disk]) + 1

    def commit_candidate(self, task: Task, version: int, path: Path, *, round_id: int | None, actor: str,
                         action: str = "publish") -> None:
        """Record a written package as a candidate; with `round_id`, close that round in the same transaction."""
        with self._write() as db:
            self._commit_candidate(db, Task(task), version, path, round_id, actor, action)

    def _commit_candidate(self, db: sqlite3.Connection, task: Task, version: int, path: Path, round_id: int | None,
                          actor: str, action: str) -> None:
        latest = db.execute("SELECT MAX(version) FROM versions WHERE task = ?", (str(task),)).fetchone()[0] or 0
        if version <= latest:
            raise ValueError(f"{task.value} version {version} is not newer than the recorded {latest}")
        db.execute("INSERT INTO versions (task, version, state, round_id, path, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (str(task), version, VersionState.CANDIDATE, round_id, str(path), time.time()))
        if round_id is not None:
            db.execute("UPDATE rounds SET state = ?, closed_at = ?, version = ? WHERE id = ?",
                       (RoundState.CLOSED, time.time(), version, round_id))
        self._audit(db, actor, action, f"{task.value} {version}", {"round_id": round_id, "path": str(path)})

    def mark_released(self, task: Task, version: int, *, actor: str) -> None:
        with self._write() as db:
            row = db.execute("SELECT state FROM versions WHERE task = ? AND version = ?",
                             (str(task), version)).fetchone()
            if row is None:
                raise ValueError(f"no {Task(task).value} version {version} is recorded")
            db.execute("UPDATE versions SET state = ?, released_by = ?, released_at = ? WHERE task = ? AND version = ?",
                       (VersionState.RELEASED, actor, time.time(), str(task), version))
            self._audit(db, actor, "release", f"{Task(task).value} {version}", {"was": row[0]})

    def version(self, task: Task, version: int) -> Version | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE task = ? AND version = ?",
                             (str(task), version)).fetchone()
        return None if row is None else _version(row)

    def latest_released(self, task: Task) -> Version | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE task = ? AND state = ? "
                             "ORDER BY version DESC LIMIT 1", (str(task), VersionState.RELEASED)).fetchone()
        return None if row is None else _version(row)

    def reconcile(self, *, actor: str) -> list[str]:
        """After a crash: commit each complete round package that lacks its row, remove half-written ones.

        A package on disk whose round is already closed with another version, or whose round is unknown, cannot be
        the next version: it is removed. Returns what was done, for the log.
        """
        done: list[str] = []
        for task in Task:
            root = self.versions_dir(task)
            for debris in sorted(root.glob(INCOMING_PREFIX + "*")) if root.is_dir() else []:
                shutil.rmtree(debris, ignore_errors=True)
                done.append(f"removed half-written {debris}")
            for package in _package_dirs(root):
                version = int(package.name)
                with self._write() as db:
                    if db.execute("SELECT 1 FROM versions WHERE task = ? AND version = ?",
                                  (task.value, version)).fetchone():
                        continue
                    training = parse_manifest((package / MANIFEST_FILE).read_bytes()).training
                    row = db.execute(
                        "SELECT id, state FROM rounds WHERE plan_sha256 = ? AND round = ?",
                        (training.plan_sha256, training.federated_round),
                    ).fetchone()
                    if row is not None and row[1] == RoundState.OPEN:
                        self._commit_candidate(db, task, version, package, row[0], actor, "resume")
                        done.append(f"recorded {task.value} {version} of round {training.federated_round}")
                        continue
                shutil.rmtree(package)
                done.append(f"removed {package}: its round is not open")
        return done

    # -- status -----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Sites, rounds (with refused updates and why, metrics per site), versions: `coordinator status`."""
        with self._read() as db:
            plan = db.execute("SELECT value FROM meta WHERE key = 'plan_sha256'").fetchone()
            sites = [
                dict(name=r[0], role=r[1], state=r[2], reason=r[3], last_seen=r[4], activity=r[5],
                     declared_cases=r[6], refused_in_a_row=r[7] or 0)
                for r in db.execute("SELECT name, role, state, reason, last_seen, activity, declared_cases, "
                                    "refused_in_a_row FROM sites LEFT JOIN site_screening ON site = name ORDER BY name")
            ]
            rounds = []
            for r in db.execute(f"SELECT {_ROUND_COLUMNS}, note, closed_at FROM rounds ORDER BY id").fetchall():
                round_, note, closed_at = _round(r[:-2]), r[-2], r[-1]
                updates = db.execute("SELECT site, accepted, reason, num_cases, metrics FROM updates "
                                     "WHERE round_id = ? ORDER BY id", (round_.id,)).fetchall()
                rounds.append(dict(
                    round=round_.round, plan_sha256=round_.plan_sha256, task=round_.task.value, state=round_.state.value,
                    attempt=round_.attempt, invited=list(round_.invited), version=round_.version, note=note,
                    opened_at=round_.opened_at, closed_at=closed_at,
                    contributors=[u[0] for u in updates if u[1]],
                    rejected=[dict(site=u[0], reason=u[2]) for u in updates if not u[1]],
                    metrics={u[0]: dict(json.loads(u[4]), cases=u[3]) for u in updates if u[1]},
                    evaluations={
                        e[0]: dict(json.loads(e[2]), cases=e[1], histograms=json.loads(e[3]))
                        for e in db.execute("SELECT site, num_cases, metrics, histograms FROM evaluations "
                                            "WHERE round_id = ? ORDER BY site", (round_.id,))
                    },
                    bytes=_traffic(db, round_.id),
                ))
            versions = [
                dict(task=r[0], version=r[1], state=r[2], round_id=r[3], released_by=r[4], released_at=r[5],
                     threshold=_threshold(Path(r[6])))
                for r in db.execute("SELECT task, version, state, round_id, released_by, released_at, path "
                                    "FROM versions ORDER BY task, version")
            ]
        return dict(plan_sha256=plan[0] if plan else None, sites=sites, rounds=rounds, versions=versions)


_ROUND_COLUMNS = ("id, plan_sha256, round, task, state, attempt, invited, base_sha256, base_path, opened_at, deadline, "
                  "version")


def _round(row: Sequence[Any]) -> Round:
    return Round(row[0], row[1], row[2], Task(row[3]), RoundState(row[4]), row[5], tuple(json.loads(row[6])), row[7],
                 Path(row[8]), row[9], row[10], row[11])


_VERSION_COLUMNS = "task, version, state, path, round_id"


def _version(row: Sequence[Any]) -> Version:
    return Version(Task(row[0]), row[1], VersionState(row[2]), Path(row[3]), row[4])


def _threshold(package: Path) -> float | None:
    """The threshold a version's manifest reads its probabilities at (None when its package is gone)."""
    try:
        return parse_manifest((package / MANIFEST_FILE).read_bytes()).output.threshold
    except (OSError, ValueError):
        return None


def _traffic(db: sqlite3.Connection, round_id: int) -> dict[str, dict[str, int]]:
    """A round's model bytes per site: {site: {DOWN: n, UP: n}}, each direction there once it carried a byte."""
    traffic: dict[str, dict[str, int]] = {}
    for site, direction, n_bytes in db.execute("SELECT site, direction, bytes FROM traffic WHERE round_id = ? "
                                               "ORDER BY site, direction", (round_id,)):
        traffic.setdefault(site, {})[direction] = n_bytes
    return traffic


def _package_dirs(root: Path) -> list[Path]:
    """The version folders under `root` (named by their number), in version order."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


__all__ = ["AcceptedUpdate", "CoordinatorState", "DOWN", "Evaluation", "Round", "RoundState", "Site", "SiteState", "UP",
           "Version", "VersionState", "INCOMING_PREFIX", "STATE_FILE"]
