"""One job per run folder: `run_dir/.lock` holds the owner's host and pid.

Taken atomically (O_EXCL) by rank 0 before anything is written; refreshed as the run
logs; removed on exit. A lock whose process is gone (same host) or that has not been
refreshed for `stale_after_s` (another host) is stale and taken over, with a warning.
A live one is refused, naming its holder: a second job, or the orphaned ranks of a
killed one, would otherwise interleave checkpoints and metrics in one folder."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from phoclip.errors import SetupError
from phoclip.fileio import read_regular

logger = logging.getLogger(__name__)


class RunLockedError(SetupError):
    pass


class LockFileError(RunLockedError):
    """The lock's path holds something this program never writes (a folder, a link)."""


_HELD: dict = {}  # lock path -> how many RunLocks of this process hold it (re-entrant)


MAX_LOCK_BYTES = 4096  # what we write is ~80 bytes; anything far larger is not our lock
MAX_PID = 2**31 - 1     # os.kill overflows beyond a C int; no system has pids this large


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _valid_pid(pid) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= MAX_PID


def _show(v) -> str:
    """A value read from someone's lock file, safe for a one-line message."""
    return "?" if v is None else "".join(c if c.isprintable() else "?" for c in str(v))[:80]


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, stale_after_s: float = 1800.0) -> None:
        self.path = Path(run_dir) / ".lock"
        self.stale_after_s = stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _check_file(self) -> None:
        """A lock that is a folder, a link or a device is not one we wrote: refused in
        one line, never read (a FIFO would block), followed or removed."""
        import stat

        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a link" if stat.S_ISLNK(st.st_mode)
                    else "not a regular file")
            raise LockFileError(f"{self.path}: the lock file is {kind}, not a lock this program wrote; "
                                 "remove it if no job is using this folder")

    def _holder(self) -> Optional[dict]:
        try:
            h = json.loads(read_regular(self.path, MAX_LOCK_BYTES, follow_links=False))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            return {}  # unreadable: judged by its age alone
        return h if isinstance(h, dict) else {}

    def _stale(self, h: dict) -> Optional[str]:
        try:
            age = time.time() - os.lstat(self.path).st_mtime
        except FileNotFoundError:
            return "gone"
        # a pid no process can have (not an int, 20 digits): judged by its age alone
        if h.get("host") == self.me["host"] and _valid_pid(h.get("pid")):
            return None if _alive(h["pid"]) else f"its process {h['pid']} is gone"
        return f"not refreshed for {age:.0f} s" if age > self.stale_after_s else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.parent.resolve() / self.path.name)  # the lock itself may be a link
        if _HELD.get(key):  # this process holds it already (e.g. two Trainers in one program)
            _HELD[key] += 1
            self.held = True
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._check_file()
                h = self._holder()
                if h is None:
                    continue  # released meanwhile
                why = self._stale(h)
                if why is None:
                    raise RunLockedError(
                        f"{self.path.parent} is in use by pid {_show(h.get('pid'))} on {_show(h.get('host'))} "
                        f"(since {_show(h.get('since', '?'))}): another job, or the ranks of a killed job "
                        f"still running. Stop them, or use another run_dir; if that job is surely "
                        f"gone, delete {self.path}")
                logger.warning("taking over the stale lock %s (%s, held by %s)", self.path, why, _show(h))
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(dict(self.me, since=time.strftime("%Y-%m-%d %H:%M:%S")), f)
            _HELD[key] = 1
            self.held = True
            return
        raise RunLockedError(f"could not take {self.path}: another job keeps taking it")

    def refresh(self) -> None:
        """Mark the lock alive (a run on another host judges staleness by its age)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held:
            key = str(self.path.parent.resolve() / self.path.name)  # the lock itself may be a link
            _HELD[key] = _HELD.get(key, 1) - 1
            self.held = False
            if _HELD[key] > 0:
                return
            del _HELD[key]
            h = self._holder()
            if h and h.get("pid") == self.me["pid"] and h.get("host") == self.me["host"]:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
