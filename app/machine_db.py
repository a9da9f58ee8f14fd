"""One small SQLite file that the worker processes of one machine share (``callbridge serve
--workers N``): the stream-token nonces already used, the calls each worker carries and the
calls admitted whose stream has not started yet.

SQLite because it gives atomic read-check-write across processes with nothing to run: each
step is one short ``BEGIN IMMEDIATE`` transaction (the file lock serialises the workers).
The file lives in the workers' multiprocess directory, a tmpfs or emptyDir: it is state of
the running instance, created afresh by the supervisor at start. Its name must not end in
``.db``: prometheus-client reads every ``*.db`` file of that directory as its own.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

FILE_NAME = "callbridge-machine.sqlite"
BUSY_TIMEOUT_SECONDS = 0.5
"""How long a worker waits for another's transaction. Each holds the lock for microseconds;
waiting longer would stall that worker's event loop (and its calls' audio)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS used_tokens (nonce TEXT PRIMARY KEY, expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS used_tokens_by_expiry ON used_tokens (expires);
CREATE TABLE IF NOT EXISTS worker_calls (worker INTEGER PRIMARY KEY, active INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS admissions (call_sid TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbound_calls (
    key TEXT PRIMARY KEY, record TEXT NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
"""


def path_in(directory: Path) -> Path:
    return directory / FILE_NAME


def create(directory: Path) -> Path:
    """A new, empty file (any old one removed): called once, by the supervisor, before any worker starts."""
    path = path_in(directory)
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    db = connect(path)
    try:
        db.executescript(SCHEMA)
    finally:
        db.close()
    return path


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode; WAL so that readers never wait for a writer, and no
    fsync per commit (the file is instance state on a tmpfs, not data to keep)."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE``: takes the write lock first, so a check and the write that depends
    on it are one atomic step across processes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
