"""A make_shards job's working state on disk, so that the parent's memory does not grow
with the job.

One SQLite file per output folder (per part: OUT/part-IIII/.job.sqlite) holds

- `hashes`: every image file's content hash and the reason it is unusable (if so), keyed by
  path with the file's (size, mtime): the journal that spares a resumed or repeated job
  re-hashing files that did not change;
- `records`: what the sources said, one row per (image file, annotation entry), in
  reading order (rebuilt on every run: reading annotations is cheap, hashing is not);
- `samples`: one row per image of this part after merging byte-identical files, with
  its split, its place in the shard order and its shard metadata.

The job streams through it: sources are read into `records` in batches, image paths
are hashed page by page, samples are built one image group at a time from a sorted
query, and shards are planned from a query ordered by each sample's seeded hash. What
the parent holds at any time is one batch, one page or one shard, never the job.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Optional

from phoclip.errors import SetupError, one_line
from phoclip.lock import LockFileError, RunLock, RunLockedError

logger = logging.getLogger(__name__)

STORE_NAME = ".job.sqlite"
SCHEMA_VERSION = "2"  # 2: unusable but readable files keep their hash (their part)

# Every object the store may hold, created by exactly these statements. A store holding
# anything else (a trigger, a view, another table or index, a table of another shape)
# was not made by us: it is rebuilt, never used (a trigger would run on our inserts).
SCHEMA = {
    "meta": "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)",
    "hashes": "CREATE TABLE hashes(path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, sha TEXT, reason TEXT)",
    "records": "CREATE TABLE records(id INTEGER PRIMARY KEY, source TEXT, image_id TEXT, path TEXT, rel TEXT, "
               "captions TEXT, pin TEXT, origin TEXT)",
    "samples": "CREATE TABLE samples(sha TEXT PRIMARY KEY, split TEXT, ord TEXT, n_captions INTEGER, "
               "path TEXT, meta TEXT, captions TEXT)",
    "records_path": "CREATE INDEX records_path ON records(path)",
    "samples_order": "CREATE INDEX samples_order ON samples(split, ord)",
}


class ForeignStore(sqlite3.DatabaseError):
    """The store's schema holds objects this program did not create."""


def _expected_master() -> set:
    """sqlite_master as SCHEMA makes it (autoindexes of the primary keys included)."""
    mem = sqlite3.connect(":memory:")
    try:
        for sql in SCHEMA.values():
            mem.execute(sql)
        return set(mem.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        mem.close()


def _check_store_file(path: Path) -> None:
    """The store and its journal files must be plain files of ours: a link (to another
    database, whose tables the job would empty), a device or a file owned by someone else
    (planted in a shared folder) is refused in one line, never opened."""
    import os
    import stat

    for p in (path, *(Path(str(path) + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        why = ("is a link" if stat.S_ISLNK(st.st_mode) else "is not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"is owned by uid {st.st_uid}, not by us" if hasattr(os, "geteuid") and st.st_uid != os.geteuid()
               else "has other hard links" if st.st_nlink > 1 else None)
        if why:
            raise OSError(f"{p}: the job store {why}; refused (it is only a cache: remove it, "
                          "or use an output folder only you can write)")


class JobStore:
    """The SQLite working state of one output folder (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _check_store_file(self.path)
        try:
            self.conn = self._open()
        except sqlite3.DatabaseError as e:  # a damaged or foreign store: it is a cache, start afresh
            logger.warning("%s is not a usable job store (%s); starting a new one (images are hashed again)",
                           self.path, e)
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA trusted_schema=OFF")  # the file is data: no functions from its schema
            # before anything is written (a trigger fires on our first insert): only our objects
            found = set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
            foreign = sorted(f"{t} {n}" for t, n, _, _ in found - _expected_master())
            if foreign:
                raise ForeignStore(f"it holds objects this program did not create: {', '.join(foreign[:5])}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(SCHEMA["meta"].replace("TABLE", "TABLE IF NOT EXISTS", 1))
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and row[0] != SCHEMA_VERSION:
                conn.execute("DROP TABLE IF EXISTS hashes")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            conn.execute(SCHEMA["hashes"].replace("TABLE", "TABLE IF NOT EXISTS", 1))
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ run tables
    def begin_run(self, limits: list) -> None:
        """Fresh `records` and `samples` for this run; the hash journal is kept when the
        image limits (pixels, bytes) are the same as the last run's."""
        c = self.conn
        row = c.execute("SELECT value FROM meta WHERE key='limits'").fetchone()
        if row is None or json.loads(row[0]) != limits:
            c.execute("DELETE FROM hashes")
            c.execute("INSERT OR REPLACE INTO meta VALUES ('limits', ?)", (json.dumps(limits),))
        c.execute("DROP TABLE IF EXISTS records")
        c.execute("DROP TABLE IF EXISTS samples")
        c.execute(SCHEMA["records"])
        c.execute(SCHEMA["samples"])

    def add_records(self, rows: Iterable[tuple]) -> None:
        """(source, image_id, path, rel, captions, pin, origin) rows, in reading order."""
        c = self.conn
        c.execute("BEGIN")
        c.executemany("INSERT INTO records(source, image_id, path, rel, captions, pin, origin) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      ((s, i, p, r, json.dumps(caps, ensure_ascii=False), pin,
                        json.dumps(o, ensure_ascii=False) if o else None) for s, i, p, r, caps, pin, o in rows))
        c.execute("COMMIT")

    def index_records(self) -> None:
        self.conn.execute(SCHEMA["records_path"].replace("INDEX", "INDEX IF NOT EXISTS", 1))

    # ------------------------------------------------------------------ hashing
    def path_pages(self, page: int) -> Iterator[list[str]]:
        """The distinct image paths of the records, sorted, `page` at a time."""
        last = ""
        while True:
            rows = self.conn.execute("SELECT DISTINCT path FROM records WHERE path > ? ORDER BY path LIMIT ?",
                                     (last, page)).fetchall()
            if not rows:
                return
            yield [r[0] for r in rows]
            last = rows[-1][0]

    def journal(self, paths: list[str]) -> dict[str, tuple]:
        """Journal entries of `paths`: path -> (size, mtime, sha, reason)."""
        out = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i:i + 500]
            q = "SELECT path, size, mtime, sha, reason FROM hashes WHERE path IN (%s)" % ",".join("?" * len(chunk))
            for p, size, mtime, sha, reason in self.conn.execute(q, chunk):
                out[p] = (size, mtime, sha, reason)
        return out

    def put_hashes(self, rows: Iterable[tuple]) -> None:
        """(path, size, mtime, sha, reason) rows; size/mtime None for a file that could
        not be stat'ed (never trusted on a later run)."""
        c = self.conn
        c.execute("BEGIN")
        c.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", rows)
        c.execute("COMMIT")

    def bad_records(self) -> Iterator[tuple[str, str, str, Optional[str]]]:
        """(path, source, reason, sha or None) of every record whose image is unusable,
        in reading order."""
        return self.conn.execute("SELECT r.path, r.source, h.reason, h.sha FROM records r "
                                 "JOIN hashes h ON h.path = r.path WHERE h.reason IS NOT NULL ORDER BY r.id")

    def record_groups(self) -> Iterator[tuple[str, list[tuple]]]:
        """(sha, records) per usable image, sha order; records in reading order as
        (source, image_id, path, rel, captions, pin, origin)."""
        cur = self.conn.execute(
            "SELECT h.sha, r.source, r.image_id, r.path, r.rel, r.captions, r.pin, r.origin "
            "FROM records r JOIN hashes h ON h.path = r.path WHERE h.reason IS NULL ORDER BY h.sha, r.id")
        sha, group = None, []
        for row in cur:
            if row[0] != sha:
                if group:
                    yield sha, group
                sha, group = row[0], []
            s, image_id, path, rel, caps, pin, origin = row[1:]
            group.append((s, image_id, path, rel, json.loads(caps), pin, json.loads(origin) if origin else None))
        if group:
            yield sha, group

    # ------------------------------------------------------------------ samples
    def add_samples(self, rows: list[tuple]) -> None:
        """(sha, split, ord, n_captions, path, meta dict, raw captions) rows."""
        c = self.conn
        c.execute("BEGIN")
        c.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                      ((sha, split, order, n, path, json.dumps(meta, ensure_ascii=False),
                        json.dumps(caps, ensure_ascii=False)) for sha, split, order, n, path, meta, caps in rows))
        c.execute("COMMIT")

    def index_samples(self) -> None:
        self.conn.execute(SCHEMA["samples_order"].replace("INDEX", "INDEX IF NOT EXISTS", 1))

    def count(self, split: Optional[str] = None) -> int:
        if split is None:
            return self.conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM samples WHERE split = ?", (split,)).fetchone()[0]

    def shard_rows(self, split: str, shard_size: int) -> Iterator[list[tuple]]:
        """The samples of `split` in shard order, `shard_size` at a time, as
        (sha, image path, meta dict, raw captions)."""
        cur = self.conn.cursor()
        cur.execute("SELECT sha, path, meta, captions FROM samples WHERE split = ? ORDER BY ord", (split,))
        while True:
            rows = cur.fetchmany(shard_size)
            if not rows:
                return
            yield [(sha, path, json.loads(meta), json.loads(caps)) for sha, path, meta, caps in rows]

    def sample_stats(self) -> Iterator[tuple[str, str, int, list[str]]]:
        """(sha, split, number of captions, sources) of every sample."""
        for sha, split, n, meta in self.conn.execute("SELECT sha, split, n_captions, meta FROM samples"):
            yield sha, split, n, json.loads(meta)["source"]


def lock_folder(folder: Path) -> RunLock:
    """One job per output folder, with the lock a run folder has (`RunLock`: host and pid
    in FOLDER/.lock; a dead holder's lock is taken over): two jobs writing one folder
    would interleave shards. A SetupError in one line while another job holds it (or the
    lock file is not one). The caller refreshes it as shards complete and releases it at
    the end."""
    lock = RunLock(folder)
    try:
        lock.acquire()
    except LockFileError:  # .lock is not a lock file: its own message names it
        raise
    except RunLockedError as e:
        raise SetupError(f"another job is writing to {folder}: {e}") from None
    except OSError as e:  # the folder cannot be written, say
        raise OSError(f"{folder}: {one_line(e)}") from None
    return lock
