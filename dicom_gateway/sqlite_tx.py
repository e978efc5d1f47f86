"""The node's SQLite transactions (design.md §1: WAL, busy_timeout 5 s, short transactions), written once.

The studies table, the outbox, the job queue and the web page's user store each keep their own connections; they
share how a transaction is opened and ended, so a failed statement always rolls back and never masks its error.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

BUSY_TIMEOUT_MS = 5000


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


@contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A consistent snapshot over several SELECTs."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
