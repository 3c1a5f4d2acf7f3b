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

logger = logging.getLogger(__name__)


class RunLockedError(SetupError):
    pass


_HELD: dict = {}  # lock path -> how many RunLocks of this process hold it (re-entrant)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, stale_after_s: float = 1800.0) -> None:
        self.path = Path(run_dir) / ".lock"
        self.stale_after_s = stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            h = json.loads(self.path.read_text())
            return h if isinstance(h, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: judged by its age alone

    def _stale(self, h: dict) -> Optional[str]:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        if h.get("host") == self.me["host"] and isinstance(h.get("pid"), int):
            return None if _alive(h["pid"]) else f"its process {h['pid']} is gone"
        return f"not refreshed for {age:.0f} s" if age > self.stale_after_s else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if _HELD.get(key):  # this process holds it already (e.g. two Trainers in one program)
            _HELD[key] += 1
            self.held = True
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                h = self._holder()
                if h is None:
                    continue  # released meanwhile
                why = self._stale(h)
                if why is None:
                    raise RunLockedError(
                        f"{self.path.parent} is in use by pid {h.get('pid')} on {h.get('host')} "
                        f"(since {h.get('since', '?')}): another job, or the ranks of a killed job "
                        f"still running. Stop them, or use another run_dir; if that job is surely "
                        f"gone, delete {self.path}")
                logger.warning("taking over the stale lock %s (%s, held by %s)", self.path, why, h)
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
            key = str(self.path.resolve())
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
