"""The queries a service keeps for their match views: each query's photo in a private folder of
this process (mode 0700; the folders of servers that died are removed at start) and the local
features its search used, reachable only by the unguessable id its search returned, for
``QUERY_TTL`` seconds and the last ``QUERIES_KEPT`` queries."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

QUERY_TTL = 900.0  # seconds a query stays reachable for its match view
QUERIES_KEPT = 64
QUERY_DIR_PREFIX = "convlad-serve-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def query_folder() -> Path:
    """A private folder for this process's query photos; those of servers that died are removed."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{QUERY_DIR_PREFIX}*"):
        pid = old.name[len(QUERY_DIR_PREFIX):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and old.is_dir() and old.stat().st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{QUERY_DIR_PREFIX}{os.getpid()}-"))  # mode 0700


class Queries:
    """Recent queries: (photo, local features) by id."""

    def __init__(self, unknown):
        self.folder = query_folder()
        self.unknown = unknown  # the error for an id that is unknown or expired
        self.queries: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def remember(self, path: Path, local) -> str:
        """Keep a query for its match view; its id, unguessable, is the only way to reach it."""
        qid = uuid.uuid4().hex
        with self.lock:
            self.queries[qid] = (path, local, time.monotonic())
            self._expire(QUERIES_KEPT)
        return qid

    def get(self, qid: str):
        with self.lock:
            self._expire(QUERIES_KEPT)
            if qid not in self.queries:
                raise self.unknown(f"query {qid[:40]!r} is unknown or expired (queries are kept "
                                   f"{QUERY_TTL / 60:.0f} minutes, the last {QUERIES_KEPT})")
            path, local, _ = self.queries[qid]
        return path, local

    def _expire(self, keep: int) -> None:
        now = time.monotonic()
        while self.queries:
            qid, (path, _, t) = next(iter(self.queries.items()))
            if len(self.queries) <= keep and now - t < QUERY_TTL:
                break
            del self.queries[qid]
            path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["QUERIES_KEPT", "QUERY_TTL", "Queries", "query_folder"]
