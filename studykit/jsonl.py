"""JSONL files: read with an error that names the file and line; write atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studykit.config import ConfigError
from studykit.files import atomic_write_text


def read_jsonl(path: str | Path, error: type[Exception] = ConfigError) -> list[dict[str, Any]]:
    """Every JSON object in ``path`` (blank lines skipped); a broken line raises ``error`` naming it."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}, line {lineno}: not valid JSON ({exc.msg}). Each line must be one JSON "
                            "object; fix or delete that line and rerun.") from None
            if not isinstance(row, dict):
                raise error(f"{path}, line {lineno}: each line must be a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
