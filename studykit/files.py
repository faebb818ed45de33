"""Files every stage writes the same way: atomic writes, UTC timestamps, output-folder checks."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from studykit.config import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file. The file gets the
    permissions a plain open() would give it (mkstemp's temporary files are private to their owner)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def utc_now() -> str:
    """The current time as an ISO-8601 UTC timestamp (seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_writable(folder: Path, min_free_gib: float, what: str = "output folder", option: str = "--output_dir") -> None:
    """Create ``folder`` if needed and fail early (ConfigError) if it cannot be written or its disk is too full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Cannot write to the {what} {folder} ({exc.strerror or exc}). Choose another {option} or "
                          "fix its permissions; nothing was run.") from None
    free = shutil.disk_usage(folder).free / 2**30
    if free < min_free_gib:
        raise ConfigError(f"Only {free:.2f} GiB free on the disk of {folder}; this run needs at least "
                          f"{min_free_gib:g} GiB. Free some space or choose another {option}; nothing was run.")
