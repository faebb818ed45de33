"""Paths in a study: files named relative to the working directory or the repository, and the
placeholders ``{study}`` (the study folder) and ``{repo}`` (this checkout) that keep stage keys and
commands independent of where the study folder lies."""

from __future__ import annotations

from pathlib import Path

from studykit.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_file(path: str, what: str) -> Path:
    """A file given relative to the working directory or to the repository root."""
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{what} {path} does not exist (looked in {Path.cwd()} and {REPO_ROOT}). "
                      "Point it at an existing file (see configs/).")


def portable(path: Path, study: Path) -> str:
    """A path as it appears in a stage key: relative to the study folder or repository when inside them,
    so a study folder moved to another machine or checkout keeps its keys."""
    path = path.resolve()
    for root, tag in ((study, "{study}"), (REPO_ROOT, "{repo}")):
        if path == root or root in path.parents:
            return f"{tag}/{path.relative_to(root)}".rstrip("/.")
    return str(path)


def render(arg: str, study: Path) -> str:
    return arg.replace("{study}", str(study)).replace("{repo}", str(REPO_ROOT))
