"""The node's SQLite connections and transactions (design.md §1: WAL, busy_timeout 5 s, short transactions).

The studies table, the outbox, the job queue and the web page's user store each keep their own connections; they
share how a connection is opened and how a transaction is opened and ended, so a failed statement always rolls back
and never masks its error.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BUSY_TIMEOUT_MS = 5000


def connect(
    path: str | os.PathLike[str], *, synchronous: str | None = None, foreign_keys: bool = True
) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit, below) in WAL mode with the busy timeout.

    `synchronous` overrides SQLite's default (FULL); `check_same_thread` is off, so a caller that shares the
    connection between threads serialises its use itself.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    if foreign_keys:
        conn.execute("PRAGMA foreign_keys=ON")
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class ThreadConnections:
    """One connection per thread, kept open: closing the last connection checkpoints the WAL with an fsync, which
    would cost every short transaction milliseconds. Threads never share one; the connections of threads that have
    ended (an SCP association, a CLI call) are closed when the next thread opens its own."""

    def __init__(self, opener: Callable[[], sqlite3.Connection]) -> None:
        self._opener = opener
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[threading.Thread, sqlite3.Connection]] = []

    def get(self) -> sqlite3.Connection:
        conn = getattr(self._local, "connection", None)
        if conn is None:
            conn = self._opener()
            self._local.connection = conn
            with self._lock:
                for thread, other in self._open:
                    if not thread.is_alive():
                        other.close()
                self._open = [(t, c) for t, c in self._open if t.is_alive()]
                self._open.append((threading.current_thread(), conn))
        return conn

    def close_all(self) -> None:
        with self._lock:
            connections, self._open = self._open, []
        for _thread, conn in connections:
            conn.close()
        self._local = threading.local()


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A short write transaction taking the write lock at BEGIN, so read-then-write decisions cannot interleave.

    `conn` is in autocommit mode (isolation_level=None)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def add_missing_column(conn: sqlite3.Connection, table: str, column: str, definition: str) -> bool:
    """Add `column` to a table created before it existed (`CREATE TABLE IF NOT EXISTS` leaves an old one as it is);
    True when it was missing. Run it in a write transaction where several processes may open the file at once."""
    if column in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
        return False
    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    return True


@contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A consistent snapshot over several SELECTs."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
