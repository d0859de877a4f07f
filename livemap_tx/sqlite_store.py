"""
The store of a single node (no `--redis`): its devices, each device's
latest fix and its private maps, in one SQLite file under the data
directory, so that a restart or a crash forgets no phone and turns no
private map into an open one.

The node still answers from memory (`LocalDevices`, `MapDirectory`); this
store makes durable what memory promises, and a request that creates or
deletes something is answered only once its write is committed. There is
one connection, owned by one thread of its own: opening, checking, reading
at start-up and every later statement run there, never on the reactor's
thread, and writes asked for together share one commit. The file is in
WAL mode: a commit appends to the log; devices and maps are synced to the
disk before their answer (synchronous=FULL), a position survives a crash
of the process (synchronous=NORMAL).

A file that is not a livemap store, is damaged, or was written by a newer
livemap (`PRAGMA user_version`) is never written to: `StoreError` says so.
As in Redis, only token hashes are kept, never tokens.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, TypeVar

import orjson
from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .phones.devices import Devices, LocalDevices
from .maps import TOMBSTONE, MapDirectory

# What this livemap writes; a file with a higher one is from a newer livemap.
SCHEMA_VERSION = 1
FILE_NAME = "livemap.sqlite3"

_SCHEMA = (
    # expires_ms NULL: never. An expired map stays (its name refused) until
    # TOMBSTONE after its expiry, as in memory.
    "CREATE TABLE private_maps (name TEXT PRIMARY KEY, expires_ms INTEGER)",
    # A device until forget_at_ms (its map's expiry, or 30 days after its
    # last fix); version and entry ([VERSION, PIN]) are its latest fix.
    "CREATE TABLE devices (token_hash TEXT PRIMARY KEY, map TEXT NOT NULL,"
    " record BLOB NOT NULL, forget_at_ms INTEGER NOT NULL, version INTEGER, entry BLOB)",
    "CREATE INDEX devices_by_map ON devices (map)",
)

T = TypeVar("T")


class StoreError(Exception):
    """The store cannot be used: the message is the one line a person reads."""


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """
    Where a node keeps its store unless told (`--data-dir`): systemd's
    StateDirectory= ($STATE_DIRECTORY), else the XDG state directory
    ($XDG_STATE_HOME, ~/.local/state), whatever the working directory.
    """
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "livemap"


@dataclass
class StoredDevice:
    token_hash: str
    record: dict
    forget_at_ms: int
    version: Optional[int]
    entry: Optional[bytes]


@dataclass
class Contents:
    """What the store holds, read once at start-up."""

    maps: list[tuple[str, Optional[int]]] = field(default_factory=list)
    devices: list[StoredDevice] = field(default_factory=list)


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


def _store_pool() -> ThreadPool:
    pool = ThreadPool(minthreads=1, maxthreads=1, name="livemap-store")
    # A daemon: a process that stops without stopping the store (it failed
    # to start) must not wait for it. A normal stop closes the store first
    # (StoreService); an exit mid-write is a crash, which SQLite rolls back.
    pool.threadFactory = _daemon_thread  # type: ignore[assignment]
    return pool


class SqliteStore:
    """One SQLite file and the one thread that uses it."""

    log = Logger()

    def __init__(self, path: Path, reactor: Any, pool: ThreadPool) -> None:
        self.path = path
        self.reactor = reactor
        self.pool = pool
        self.db: Optional[sqlite3.Connection] = None
        # What the file held at start-up (`open`), until restored.
        self.contents: Optional[Contents] = None
        self.lock_file: Optional[BinaryIO] = None
        self._queue: list[tuple[bool, list, defer.Deferred]] = []
        self._flushing = False
        self._idle: list[defer.Deferred] = []

    @classmethod
    def open(cls, data_dir: Path, reactor: Any) -> SqliteStore:
        """
        Open (or create) the store in `data_dir`, check it and read what it
        holds (`contents`), on a thread of its own, and wait for it: for
        start-up, before the reactor runs. Raises StoreError. The thread
        and the connection end before this returns (twistd may fork into
        the background next, which neither survives); `start` makes new
        ones, only the file's lock is kept.
        """
        store = cls(Path(data_dir).absolute() / FILE_NAME, reactor, _store_pool())
        store.pool.start()
        try:
            store.wait(store._open)
            store.contents = store.wait(store.read, reactor.seconds() * 1000)
            store.wait(store._disconnect)
        except BaseException:
            store.wait(store._unlock)
            raise
        finally:
            store.pool.stop()
        return store

    def start(self) -> None:
        """The store's thread and connection, for the running process."""
        self.pool = _store_pool()
        self.pool.start()
        # The first job of the thread: every write comes after it.
        self.run(self._connect).addErrback(
            lambda failure: self.log.error("cannot open {path}: {error}", path=str(self.path),
                                           error=failure.getErrorMessage()))

    def _connect(self) -> None:
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")

    def _disconnect(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # Running on the store's thread

    def wait(self, work: Callable[..., T], *args: Any) -> T:
        """Run `work` on the store's thread and wait for it (start-up only)."""
        done = threading.Event()
        outcome: list[Any] = []

        def finished(success: bool, result: Any) -> None:
            outcome[:] = [success, result]
            done.set()
        self.pool.callInThreadWithCallback(finished, work, *args)
        done.wait()
        success, result = outcome
        if not success:
            result.raiseException()
        return result

    def run(self, work: Callable[..., T], *args: Any) -> defer.Deferred:
        """Run `work` on the store's thread; the Deferred fires on the reactor's."""
        return deferToThreadPool(self.reactor, self.pool, work, *args)

    # Group commit: the writes asked for while one transaction runs go in
    # the next one, so a busy node pays one thread hop and one commit (one
    # sync to the disk) per batch rather than per write. Each write is a
    # savepoint of its own: one that fails fails alone.

    def _submit(self, durable: bool, statements: list[tuple[str, tuple]]) -> defer.Deferred:
        """Fires once `statements` are committed (synced to the disk if `durable`)."""
        done: defer.Deferred = defer.Deferred()
        self._queue.append((durable, statements, done))
        if not self._flushing:
            self._flush()
        return done

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        self._flushing = True
        self.run(self._write, [(durable, statements) for durable, statements, _ in batch]
                 ).addBoth(self._written, batch)

    def _written(self, result: Any, batch: list[tuple[bool, list, defer.Deferred]]) -> None:
        for n, (_, _, done) in enumerate(batch):
            if isinstance(result, Failure):
                done.errback(result)
            elif result[n] is not None:
                done.errback(result[n])
            else:
                done.callback(None)
        self._flushing = False
        if self._queue:
            self._flush()
        elif self._idle:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    def _write(self, batch: list[tuple[bool, list[tuple[str, tuple]]]]
               ) -> list[Optional[Exception]]:
        db = self._db()
        durable = any(durable for durable, _ in batch)
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        outcomes: list[Optional[Exception]] = []
        db.execute("BEGIN")
        try:
            for _, statements in batch:
                db.execute("SAVEPOINT one_write")
                try:
                    for sql, args in statements:
                        db.execute(sql, args)
                except sqlite3.Error as error:
                    db.execute("ROLLBACK TO one_write")
                    outcomes.append(error)
                else:
                    outcomes.append(None)
                db.execute("RELEASE one_write")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    def drained(self) -> defer.Deferred:
        """Fires once every write asked for so far is committed (or failed)."""
        if not self._flushing and not self._queue:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._idle.append(waiter)
        return waiter

    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreError(f"the store {self.path} is closed")
        return self.db

    # Opening

    def _open(self) -> None:
        where = self.path.parent
        if where.exists() and not where.is_dir():
            raise StoreError(f"the data directory {where} is not a directory; give another "
                             f"--data-dir (or --store memory)")
        try:
            where.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the data directory {where}: "
                             f"{error.strerror or error}; give a writable one with "
                             f"--data-dir (or --store memory)") from None
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open {self.path}: {error}; check that the data "
                             f"directory is writable") from None
        try:
            self._lock()
            self._check(db, existed)
        except BaseException:
            db.close()
            self._unlock()
            raise
        self.db = db

    def _lock(self) -> None:
        # Two processes on one file would each answer from their own memory.
        # flock, which SQLite's own (POSIX) locks do not touch; the kernel
        # drops it when the process ends, however it ends.
        try:
            self.lock_file = open(self.path, "rb")  # noqa: SIM115 (held until close)
            fcntl.flock(self.lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{self.path} is in use by another livemap process: give each "
                             f"process its own --data-dir") from None
        except OSError as error:
            raise StoreError(f"cannot open {self.path}: {error.strerror or error}") from None

    def _unlock(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()
            self.lock_file = None

    def _check(self, db: sqlite3.Connection, existed: bool) -> None:
        path = self.path
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} was written by a newer livemap (store schema {version}; this "
                    f"one knows up to {SCHEMA_VERSION}): run that version, or move the "
                    f"file away to start empty")
            if existed:
                problems = [line.strip() for row in db.execute("PRAGMA quick_check(3)")
                            for line in str(row[0]).splitlines() if line.strip()]
                if problems != ["ok"]:
                    found = "; ".join(problems[:3])[:300]
                    raise StoreError(f"{path} is damaged ({found}): restore a backup, or "
                                     f"move the file away to start empty")
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and tables:
                raise StoreError(f"{path} is an SQLite file but not a livemap store: give "
                                 f"another --data-dir")
            if version == SCHEMA_VERSION and not {"private_maps", "devices"} <= tables:
                raise StoreError(f"{path} is damaged (tables missing): restore a backup, "
                                 f"or move the file away to start empty")
            self._writable()
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: cannot use WAL mode (the journal mode is {mode})")
            if version == 0:
                with db:
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            message = str(error)
            if "not a database" in message or "malformed" in message:
                raise StoreError(f"{path} is not a livemap store or is damaged ({message}): "
                                 f"restore a backup, or move the file away to start "
                                 f"empty") from None
            raise StoreError(f"cannot use {path}: {message}; check that the data directory "
                             f"and the file are writable") from None

    def _writable(self) -> None:
        # SQLite opens a file it may not write read-only, and says so only
        # at the first write: say it at start-up instead.
        for target in (self.path, self.path.parent):
            if target.exists() and not os.access(target, os.W_OK):
                raise StoreError(f"cannot write to {target}: "
                                 f"{os.strerror(errno.EACCES)}; give a writable --data-dir")

    # Start-up

    def read(self, now_ms: float) -> Contents:
        """Forget what is gone for good, then read the rest (on the store's thread)."""
        db = self._db()
        with db:
            db.execute("DELETE FROM devices WHERE forget_at_ms <= ?", (int(now_ms),))
            db.execute("DELETE FROM private_maps WHERE expires_ms <= ?",
                       (int(now_ms - TOMBSTONE * 1000),))
        contents = Contents()
        for name, expires_ms in db.execute("SELECT name, expires_ms FROM private_maps"):
            contents.maps.append((name, expires_ms))
        for token_hash, record, forget_at_ms, version, entry in db.execute(
                "SELECT token_hash, record, forget_at_ms, version, entry FROM devices"):
            try:
                decoded = orjson.loads(record)
            except orjson.JSONDecodeError:
                self.log.warn("a device of the store has a bad record; skipped")
                continue
            contents.devices.append(StoredDevice(token_hash, decoded, forget_at_ms, version,
                                                 None if entry is None else bytes(entry)))
        return contents

    # Writes: each fires once committed

    def add_map(self, name: str, expires_ms: Optional[int]) -> defer.Deferred:
        return self._submit(True, [(
            "INSERT OR REPLACE INTO private_maps (name, expires_ms) VALUES (?, ?)",
            (name, expires_ms))])

    def add_device(self, token_hash: str, record: dict, forget_at_ms: float) -> defer.Deferred:
        return self._submit(True, [(
            "INSERT OR REPLACE INTO devices (token_hash, map, record, forget_at_ms)"
            " VALUES (?, ?, ?, ?)",
            (token_hash, record["m"], orjson.dumps(record), int(forget_at_ms)))])

    def remove_device(self, token_hash: str) -> defer.Deferred:
        return self._submit(True, [(
            "DELETE FROM devices WHERE token_hash = ?", (token_hash,))])

    def save_fix(self, token_hash: str, version: int, entry: bytes,
                 forget_at_ms: float) -> defer.Deferred:
        return self._submit(False, [(
            "UPDATE devices SET version = ?, entry = ?, forget_at_ms = ?"
            " WHERE token_hash = ? AND (version IS NULL OR version < ?)",
            (version, entry, int(forget_at_ms), token_hash, version))])

    def forget_map(self, map_name: str) -> defer.Deferred:
        """The map expired: its devices go (the map's row stays, as its tombstone)."""
        return self._submit(False, [(
            "DELETE FROM devices WHERE map = ?", (map_name,))])

    def prune(self, now_ms: float) -> defer.Deferred:
        """Forget devices and expired maps' tombstones whose time is over."""
        return self._submit(False, [
            ("DELETE FROM devices WHERE forget_at_ms <= ?", (int(now_ms),)),
            ("DELETE FROM private_maps WHERE expires_ms <= ?",
             (int(now_ms - TOMBSTONE * 1000),))])

    def close(self) -> defer.Deferred:
        """After every write queued before it: checkpoint, close, end the thread."""
        def close() -> None:
            if self.db is not None:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.db.close()
                self.db = None
            self._unlock()
        return self.drained().addCallback(lambda _: self.run(close)).addBoth(self._stopped)

    def _stopped(self, result: Any) -> Any:
        self.pool.stop()
        return result


class DiskDevices(LocalDevices):
    """
    LocalDevices whose changes are also written to the store: memory
    decides, and the answer comes once the disk has it (undone in memory
    if the write fails, so that both say the same).
    """

    log = Logger()

    def __init__(self, store: SqliteStore) -> None:
        super().__init__()
        self.disk = store

    def add_device(self, token_hash: str, record: dict, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        outcome = self.add(token_hash, record, expires_ms, cap=cap, now_ms=now_ms)
        if outcome != "added":
            return defer.succeed(outcome)

        def undo(failure: Any) -> Any:
            self.records.pop(token_hash, None)
            return failure
        return self.disk.add_device(token_hash, record, expires_ms).addCallbacks(
            lambda _: outcome, undo)

    def remove_device(self, token_hash: str, map_name: str, pin_id: str) -> defer.Deferred:
        held = self.records.get(token_hash), self.versions.get(token_hash)
        existed = self.remove(token_hash)

        def undo(failure: Any) -> Any:
            record, version = held
            if record is not None:
                self.records.setdefault(token_hash, record)
            if version is not None:
                self.versions.setdefault(token_hash, version)
            return failure
        return self.disk.remove_device(token_hash).addCallbacks(lambda _: existed, undo)

    def save_fix(self, token_hash: str, map_name: str, version: int, entry: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        held = self.records.get(token_hash), self.versions.get(token_hash)
        outcome = self.save(token_hash, version, now_ms, expires_ms)
        if outcome != "saved":
            return defer.succeed(outcome)

        def undo(failure: Any) -> Any:
            record, previous = held
            if self.versions.get(token_hash) == version:
                if previous is None:
                    self.versions.pop(token_hash, None)
                else:
                    self.versions[token_hash] = previous
                if record is not None and token_hash in self.records:
                    self.records[token_hash] = record
            return failure
        return self.disk.save_fix(token_hash, version, entry, expires_ms).addCallbacks(
            lambda _: outcome, undo)

    def forget_map(self, map_name: str) -> None:
        super().forget_map(map_name)
        self.disk.forget_map(map_name).addErrback(
            lambda failure: self.log.warn("could not forget the devices of an expired map "
                                          "in the store: {error}",
                                          error=failure.getErrorMessage()))


def restore(contents: Contents, directory: MapDirectory, devices: Devices,
            disk: DiskDevices, now: float) -> None:
    """What the store held (`SqliteStore.contents`), back in memory and on the map."""
    for name, expires_ms in contents.maps:
        directory.learn(name, None if expires_ms is None else expires_ms / 1000)
    by_map: dict[str, list[dict]] = defaultdict(list)
    for stored in contents.devices:
        if stored.forget_at_ms <= now * 1000 or directory.is_expired(stored.record["m"]):
            continue
        disk.records[stored.token_hash] = (stored.record, stored.forget_at_ms)
        if stored.version is None or stored.entry is None:
            continue
        disk.versions[stored.token_hash] = stored.version
        try:
            version, state = orjson.loads(stored.entry)
            by_map[stored.record["m"]].append(dict(state, version=int(version)))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            continue
    for map_name, states in by_map.items():
        # Only those within --expire of their fix come back as pins.
        devices.apply(map_name, states)


class StoreService(service.Service):
    """Forgets what is over now and then, and closes the store last on stop."""

    log = Logger()

    def __init__(self, store: SqliteStore, reactor: Any, prune_every: float = 3600.0) -> None:
        self.store = store
        self.reactor = reactor
        self.prune_every = prune_every
        self.call: Any = None

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        self.store.start()
        self.call = self.reactor.callLater(self.prune_every, self._prune)

    def _prune(self) -> None:
        self.store.prune(self.reactor.seconds() * 1000).addErrback(
            lambda failure: self.log.warn("could not prune the store: {error}",
                                          error=failure.getErrorMessage()))
        self.call = self.reactor.callLater(self.prune_every, self._prune)

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        if self.call is not None and self.call.active():
            self.call.cancel()
        return self.store.close()
