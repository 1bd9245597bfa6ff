"""The registry in one SQLite file: the default, for a pool run from one host.

Servers are rows of ``servers`` (one column per field, ``reserved`` included);
volumes are rows of ``volumes`` holding the volume's JSON
(:meth:`Volume.to_dict`) next to its epoch.

Every change runs in one transaction opened with ``BEGIN IMMEDIATE``, which
takes the database's single write lock before anything is read: the checks
(free space, epoch) and the writes that rely on them can never interleave
with another writer, in this process or any other.  The file is in WAL mode,
so readers never wait for a writer, and writers queue on the busy timeout
instead of failing.  Each thread of each process gets its own connection, as
SQLite requires.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctl.registry.base import Registry
from ctl.registry.errors import (
    AlreadyExistsError,
    EpochConflictError,
    InUseError,
    NotFoundError,
    RegistryUnavailableError,
)
from ctl.registry.model import (
    SERVER_STATES,
    Server,
    Volume,
    check_server_unused,
    reservation_change,
)

log = logging.getLogger(__name__)

#: How long a writer waits for another one to commit before giving up.
BUSY_TIMEOUT = 30.0

#: Stored in ``PRAGMA user_version``; 0 means a new, empty file.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE servers (
    name TEXT PRIMARY KEY,
    control_url TEXT NOT NULL,
    nbd_address TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    slab_size INTEGER NOT NULL,
    zone TEXT,
    state TEXT NOT NULL,
    reserved INTEGER NOT NULL CHECK (reserved BETWEEN 0 AND capacity),
    last_seen REAL NOT NULL
);
CREATE TABLE volumes (
    name TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    data TEXT NOT NULL
);
"""

_SERVER_COLUMNS = (
    "name",
    "control_url",
    "nbd_address",
    "capacity",
    "slab_size",
    "zone",
    "state",
    "reserved",
    "last_seen",
)


class SQLiteRegistry(Registry):
    """The registry in the SQLite file at ``path``, created if missing.

    Raises RegistryUnavailableError if the file cannot be created or opened
    (unwritable directory, not a database, a newer schema).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite://{self.path}"
        self._local = threading.local()
        self._opened: list[tuple[int, sqlite3.Connection]] = []
        self._opened_lock = threading.Lock()
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._cannot_open(e) from e
        # Open now, so that a bad path fails here and not at first use.
        self._connection()

    # Servers.

    def add_server(self, server: Server) -> Server:
        stored = Server.from_dict({**server.to_dict(), "reserved": 0})
        with self._transaction() as db:
            if _read_server(db, stored.name) is not None:
                raise AlreadyExistsError(f"server {stored.name!r} exists already")
            _insert_server(db, stored)
        log.debug("server added server=%s capacity=%d", stored.name, stored.capacity)
        return stored

    def get_server(self, name: str) -> Server:
        with self._reading() as db:
            return _server_or_raise(db, name)

    def list_servers(self) -> list[Server]:
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {', '.join(_SERVER_COLUMNS)} FROM servers ORDER BY name"
            ).fetchall()
        return [_server_from_row(row) for row in rows]

    def set_server_state(self, name: str, state: str) -> Server:
        if state not in SERVER_STATES:
            raise ValueError(
                f"unknown server state {state!r}: use one of {', '.join(SERVER_STATES)}"
            )
        with self._transaction() as db:
            server = _server_or_raise(db, name)
            server.state = state
            db.execute("UPDATE servers SET state = ? WHERE name = ?", (state, name))
        log.debug("server state changed server=%s state=%s", name, state)
        return server

    def touch_server(self, name: str, when: float) -> None:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE servers SET last_seen = ? WHERE name = ?", (when, name)
            )
            if cursor.rowcount == 0:
                raise _no_server(name)

    def remove_server(self, name: str) -> None:
        with self._transaction() as db:
            _server_or_raise(db, name)
            check_server_unused(name, _read_volumes(db))
            db.execute("DELETE FROM servers WHERE name = ?", (name,))
        log.debug("server removed server=%s", name)

    # Volumes.

    def create_volume(self, volume: Volume) -> Volume:
        stored = Volume.from_dict({**volume.to_dict(), "epoch": 1})
        with self._transaction() as db:
            if _read_volume(db, stored.name) is not None:
                raise AlreadyExistsError(f"volume {stored.name!r} exists already")
            servers = _read_servers(db)
            _check_servers_known(stored, servers)
            _reserve(db, stored.name, servers, stored.reservations(servers), {})
            db.execute(
                "INSERT INTO volumes (name, epoch, data) VALUES (?, ?, ?)",
                (stored.name, stored.epoch, json.dumps(stored.to_dict())),
            )
        log.debug(
            "volume created volume=%s extents=%d", stored.name, len(stored.extents)
        )
        return stored

    def get_volume(self, name: str) -> Volume:
        with self._reading() as db:
            volume = _read_volume(db, name)
        if volume is None:
            raise _no_volume(name)
        return volume

    def list_volumes(self) -> list[Volume]:
        with self._reading() as db:
            return _read_volumes(db)

    def update_volume(self, volume: Volume, expected_epoch: int) -> Volume:
        stored = Volume.from_dict({**volume.to_dict(), "epoch": expected_epoch + 1})
        with self._transaction() as db:
            old = _read_volume(db, volume.name)
            if old is None:
                raise _no_volume(volume.name)
            if old.epoch != expected_epoch:
                raise EpochConflictError(
                    f"volume {volume.name!r} changed since it was read (epoch "
                    f"{old.epoch}, expected {expected_epoch}): read it again and retry"
                )
            servers = _read_servers(db)
            _check_servers_known(stored, servers)
            _reserve(
                db,
                stored.name,
                servers,
                stored.reservations(servers),
                old.reservations(servers),
            )
            db.execute(
                "UPDATE volumes SET epoch = ?, data = ? WHERE name = ?",
                (stored.epoch, json.dumps(stored.to_dict()), stored.name),
            )
        log.debug("volume updated volume=%s epoch=%d", stored.name, stored.epoch)
        return stored

    def delete_volume(self, name: str) -> Volume:
        with self._transaction() as db:
            volume = _read_volume(db, name)
            if volume is None:
                raise _no_volume(name)
            if volume.attached_to:
                raise InUseError(
                    f"volume {name!r} is attached to {volume.attached_to}: "
                    "detach it first"
                )
            servers = _read_servers(db)
            _reserve(db, name, servers, {}, volume.reservations(servers))
            db.execute("DELETE FROM volumes WHERE name = ?", (name,))
        log.debug("volume deleted volume=%s", name)
        return volume

    def close(self) -> None:
        """Close every connection this process opened; later calls reopen."""
        with self._opened_lock:
            mine = [conn for pid, conn in self._opened if pid == os.getpid()]
            self._opened = [(p, c) for p, c in self._opened if p != os.getpid()]
        for conn in mine:
            conn.close()
        self._local = threading.local()

    # Connections and transactions.

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema made) on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        # A connection inherited through fork() belongs to the parent and
        # must not be used here (SQLite's locks are per process); it is
        # left alone rather than closed, which could disturb the parent.
        if conn is not None and self._local.pid == os.getpid():
            return conn
        conn = self._open()
        self._local.conn = conn
        self._local.pid = os.getpid()
        with self._opened_lock:
            self._opened.append((os.getpid(), conn))
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            # Autocommit (isolation_level None): this class writes its own
            # BEGIN IMMEDIATE, which the sqlite3 module would otherwise
            # replace by a deferred BEGIN.  check_same_thread is off only so
            # that close() can reach every thread's connection.
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise self._cannot_open(e) from e
        try:
            conn.row_factory = sqlite3.Row
            mode = _enable_wal(conn)
            if mode != "wal":
                raise RegistryUnavailableError(
                    f"cannot use {self.path} as the registry: its filesystem does "
                    f"not support SQLite's WAL mode (got {mode!r}); put it on a "
                    "local filesystem"
                )
            # The change must be on disk when a call returns: I/O relies on it.
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate(conn)
        except sqlite3.Error as e:
            conn.close()
            raise self._cannot_open(e) from e
        except RegistryUnavailableError:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file; refuse one from a newer rampool."""
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have just
            # created the schema.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                log.info(
                    "registry created path=%s schema=%d", self.path, SCHEMA_VERSION
                )
            elif version != SCHEMA_VERSION:
                raise RegistryUnavailableError(
                    f"{self.path} has registry schema {version}, but this rampool "
                    f"knows schema {SCHEMA_VERSION}: use the rampool that wrote it"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits or nothing does."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._unavailable(e) from e
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._unavailable(e) from e
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads; each statement sees one committed state."""
        try:
            yield self._connection()
        except sqlite3.OperationalError as e:
            raise self._unavailable(e) from e

    def _cannot_open(self, error: Exception) -> RegistryUnavailableError:
        return RegistryUnavailableError(
            f"cannot open the registry {self.path}: {error}; make sure its "
            "directory exists and this user may write there, or choose another "
            "file with --registry sqlite:///PATH or RAMPOOL_REGISTRY"
        )

    def _unavailable(self, error: sqlite3.Error) -> RegistryUnavailableError:
        return RegistryUnavailableError(
            f"registry {self.path} failed: {error}; if another rampool holds it "
            "busy, retry; otherwise check the disk and the file's permissions"
        )


def _enable_wal(conn: sqlite3.Connection) -> str:
    """Put the file in WAL mode (a no-op once it is); return the mode now in use.

    Turning a new file to WAL needs it to itself for a moment, and SQLite
    reports another process opening it at that moment as busy at once, without
    waiting on the busy timeout: so wait here.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# Rows.


def _server_from_row(row: sqlite3.Row) -> Server:
    return Server.from_dict(dict(zip(row.keys(), row, strict=True)))


def _read_server(db: sqlite3.Connection, name: str) -> Server | None:
    row = db.execute(
        f"SELECT {', '.join(_SERVER_COLUMNS)} FROM servers WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else _server_from_row(row)


def _server_or_raise(db: sqlite3.Connection, name: str) -> Server:
    server = _read_server(db, name)
    if server is None:
        raise _no_server(name)
    return server


def _read_servers(db: sqlite3.Connection) -> dict[str, Server]:
    rows = db.execute(f"SELECT {', '.join(_SERVER_COLUMNS)} FROM servers").fetchall()
    return {row["name"]: _server_from_row(row) for row in rows}


def _insert_server(db: sqlite3.Connection, server: Server) -> None:
    fields = server.to_dict()
    placeholders = ", ".join("?" for _ in _SERVER_COLUMNS)
    db.execute(
        f"INSERT INTO servers ({', '.join(_SERVER_COLUMNS)}) VALUES ({placeholders})",
        tuple(fields[column] for column in _SERVER_COLUMNS),
    )


def _read_volume(db: sqlite3.Connection, name: str) -> Volume | None:
    row = db.execute("SELECT data FROM volumes WHERE name = ?", (name,)).fetchone()
    return None if row is None else Volume.from_dict(json.loads(row["data"]))


def _read_volumes(db: sqlite3.Connection) -> list[Volume]:
    rows = db.execute("SELECT data FROM volumes ORDER BY name").fetchall()
    return [Volume.from_dict(json.loads(row["data"])) for row in rows]


def _no_server(name: str) -> NotFoundError:
    return NotFoundError(f"no server named {name!r}: see rampool server list")


def _no_volume(name: str) -> NotFoundError:
    return NotFoundError(f"no volume named {name!r}: see rampool volume list")


# Capacity.


def _check_servers_known(volume: Volume, servers: dict[str, Server]) -> None:
    unknown = sorted(
        {
            replica.server
            for extent in volume.extents
            for replica in extent.replicas
            if replica.server not in servers
        }
    )
    if unknown:
        raise NotFoundError(
            f"volume {volume.name!r} has replicas on unknown servers "
            f"{', '.join(unknown)}: add them first (rampool server add)"
        )


def _reserve(
    db: sqlite3.Connection,
    volume: str,
    servers: dict[str, Server],
    new: dict[str, int],
    old: dict[str, int],
) -> None:
    """Move each server's reservation from ``old`` to ``new`` bytes.

    Checked first by :func:`reservation_change`: nothing is written unless
    every server passes.
    """
    for name, growth in reservation_change(volume, servers, new, old).items():
        if growth:
            db.execute(
                "UPDATE servers SET reserved = reserved + ? WHERE name = ?",
                (growth, name),
            )
