"""On-disk cache of model calls keyed by the content hash of the request.

SQLite in WAL mode: every ``put`` is its own committed transaction, so a process killed
at any moment (even ``kill -9``) leaves either the whole entry or none of it, and a
rerun finds every call that had finished. The cache records how often it was hit and
missed so tests and reports can prove that a resumed run repeated no call.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def request_key(payload: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of (model, messages, sampling params, seed, ...)."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CallCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, request TEXT, response TEXT, created REAL)"
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT response FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO calls (key, request, response, created) VALUES (?, ?, ?, ?)",
            (key, json.dumps(request, ensure_ascii=False), json.dumps(response, ensure_ascii=False), time.time()),
        )

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has an entry (not counted as a hit or a miss)."""
        return self._db.execute("SELECT 1 FROM calls WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        self._db.close()
