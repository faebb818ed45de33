"""study_state.json (per node: key, status, last command; a short history of study runs) and
moving superseded outputs aside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from studykit.config import ConfigError
from studykit.files import atomic_write_json


class StudyState:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"version": 2, "stages": {}, "runs": []}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path} is not valid JSON ({exc}). It is only written by the study; delete it to "
                                  "rerun every stage.") from None
            if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
                raise ConfigError(f"{path} is not a study state file; delete it to rerun every stage.")
            self.data = data

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def set_stage(self, name: str, **fields: Any) -> None:
        self.data["stages"][name] = {**(self.data["stages"].get(name) or {}), **fields}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def supersede(folder: Path, old_key: str | None, carry_over: tuple[str, ...] = ()) -> Path | None:
    """Move an output folder aside (never delete it): <folder>.superseded-<old key>[-N]; copy the files in
    ``carry_over`` (content-keyed call caches) back into a fresh folder, so a rerun replays what still applies."""
    if not folder.exists():
        return None
    base = folder.with_name(f"{folder.name}.superseded-{old_key[:8] if old_key else 'unrecorded'}")
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    folder.rename(target)
    for name in carry_over:
        for part in (name, f"{name}-wal"):  # an SQLite database and its write-ahead log travel together
            if (target / part).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy2(target / part, folder / part)
    return target
