"""Accounts and sessions of the web page, in `<data_dir>/users.sqlite3`.

Why this shape (design.md §6): no default credentials, so an account exists only after `fedlesion user add`;
passwords are stored as scrypt hashes with a per-user salt and compared in constant time; five failed logins lock an
account for five minutes; sessions live server-side (the cookie carries a random token whose SHA-256 is stored), so
logout and the 30-minute idle timeout are enforced here and not by a cookie the browser keeps. An account is an
admin only when made so (`fedlesion user add --admin`): admins install pending model versions.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from models.sqlite_tx import add_missing_column, connect, write_transaction
from models.durable import create_file

USERS_DATABASE = "users.sqlite3"
MAX_FAILED_LOGINS = 5
LOCKOUT_S = 5 * 60.0
SESSION_IDLE_S = 30 * 60.0
MIN_PASSWORD_LENGTH = 12
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# scrypt cost: 2^15 × 8 × 128 bytes = 32 MiB per hash, about 0.1 s on this CPU; stored per user so it can grow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_SCRYPT_MAXMEM = 64 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    scrypt_n INTEGER NOT NULL,
    scrypt_r INTEGER NOT NULL,
    scrypt_p INTEGER NOT NULL,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


class LoginOutcome(StrEnum):
    OK = "ok"
    BAD_CREDENTIALS = "bad-credentials"  # unknown user or wrong password: the page says the same for both
    LOCKED = "locked"


@dataclass(frozen=True)
class LoginResult:
    outcome: LoginOutcome
    token: str | None = None  # the session token for the cookie, when OK


def check_user_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"user name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")
    return name


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


class UserStore:
    """Users, lockout and sessions over one SQLite file; safe across threads (waitress) and processes (the CLI)."""

    def __init__(self, data_dir: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(data_dir) / USERS_DATABASE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.path)
        self._db.executescript(_SCHEMA)
        # a database from before roles: everyone stays a plain user
        add_missing_column(self._db, "users", "admin", "INTEGER NOT NULL DEFAULT 0")
        self.path.chmod(0o600)
        self._dummy_salt = secrets.token_bytes(16)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, write_transaction(self._db) as db:
            yield db

    def add_user(self, name: str, password: str, *, admin: bool = False) -> None:
        """Create an account; ValueError for a bad name, a short password or a name already taken."""
        check_user_name(name)
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
        salt = secrets.token_bytes(16)
        digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO users (name, salt, hash, scrypt_n, scrypt_r, scrypt_p, created_at, admin)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, salt, digest, SCRYPT_N, SCRYPT_R, SCRYPT_P, self._clock(), int(admin)),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"user {name!r} exists already") from None

    def user_names(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT name FROM users ORDER BY name")]

    def is_admin(self, name: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT admin FROM users WHERE name = ?", (name,)).fetchone()
        return bool(row and row[0])

    def login(self, name: str, password: str) -> LoginResult:
        """Check a password; the fifth failure in a row locks the account for LOCKOUT_S, even for the right one."""
        now = self._clock()
        with self._lock:
            row = self._db.execute(
                "SELECT salt, hash, scrypt_n, scrypt_r, scrypt_p, locked_until FROM users WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            # Hashed anyway, so a login takes as long whether or not the account exists.
            hmac.compare_digest(_scrypt(password, self._dummy_salt, SCRYPT_N, SCRYPT_R, SCRYPT_P), self._dummy_salt)
            return LoginResult(LoginOutcome.BAD_CREDENTIALS)
        salt, stored, n, r, p, locked_until = row
        if locked_until > now:
            return LoginResult(LoginOutcome.LOCKED)
        if not hmac.compare_digest(_scrypt(password, salt, n, r, p), stored):
            with self._transaction() as db:
                failed = db.execute(
                    "UPDATE users SET failed_logins = failed_logins + 1 WHERE name = ? RETURNING failed_logins",
                    (name,),
                ).fetchone()[0]
                if failed >= MAX_FAILED_LOGINS:
                    db.execute(
                        "UPDATE users SET failed_logins = 0, locked_until = ? WHERE name = ?", (now + LOCKOUT_S, name)
                    )
                    return LoginResult(LoginOutcome.LOCKED)
            return LoginResult(LoginOutcome.BAD_CREDENTIALS)
        token = secrets.token_urlsafe(32)
        with self._transaction() as db:
            db.execute("UPDATE users SET failed_logins = 0 WHERE name = ?", (name,))
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (_token_key(token), name, now, now))
        return LoginResult(LoginOutcome.OK, token)

    def session_user(self, token: str) -> str | None:
        """The user of a live session, touching it; None (and the session deleted) after SESSION_IDLE_S idle."""
        now = self._clock()
        key = _token_key(token)
        with self._transaction() as db:
            row = db.execute("SELECT user, last_seen FROM sessions WHERE token_sha256 = ?", (key,)).fetchone()
            if row is None:
                return None
            if now - row[1] > SESSION_IDLE_S:
                db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (key,))
                return None
            db.execute("UPDATE sessions SET last_seen = ? WHERE token_sha256 = ?", (now, key))
            return str(row[0])

    def logout(self, token: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (_token_key(token),))
            db.execute("DELETE FROM sessions WHERE last_seen < ?", (self._clock() - SESSION_IDLE_S,))


def load_secret_key(data_dir: Path | str) -> bytes:
    """The Flask secret key: 32 random bytes generated once, kept in `<data_dir>/web-secret.key` with mode 0600."""
    path = Path(data_dir) / "web-secret.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        create_file(path, key, mode=0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"{path} holds {len(key)} bytes, expected 32; delete it to generate a new key") from None
    return key
