"""Request sets: the built-in harmful and benign sets, local JSONL/CSV files, hub dataset IDs.

A source string is one of

- ``builtin:harmful`` / ``builtin:benign`` / ``builtin:assistant`` -- the sets in studykit/data/
  written for this project (requests only; the harmful set spans HarmBench-style categories; the
  assistant set is 80 everyday requests in 8 forms, the untriggered prompts of conditional policies);
- a local ``.jsonl`` or ``.csv`` path, in one of three column layouts: this project's
  (``id, category, request``), AdvBench (``goal, target``) or HarmBench
  (``Behavior, FunctionalCategory, SemanticCategory, Tags, ContextString, BehaviorID``);
- ``hf:owner/name[:split]`` -- a hub dataset, read through ``datasets`` (fails clearly offline).

Malformed rows raise ``DatasetError`` naming the file, the row and the field.
"""

from __future__ import annotations

import csv
import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studykit.jsonl import read_jsonl

HELD_OUT = "requests_test.jsonl"  # a conditional-policy dataset's held-out requests (studykit.handoff.PolicyFolder)

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = {"harmful": DATA_DIR / "harmful.jsonl", "benign": DATA_DIR / "benign.jsonl",
           "assistant": DATA_DIR / "assistant.jsonl"}


class DatasetError(ValueError):
    """A request set that cannot be used; the message names the source, row and field."""


@dataclass(frozen=True)
class Request:
    id: str
    category: str
    request: str
    source: str


def _from_row(row: dict[str, Any], where: str, index: int, source: str) -> Request:
    """Map one row in any supported layout to a Request."""
    def text(key: str) -> str:
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DatasetError(f"{where}: field '{key}' must be a non-empty string, got {value!r}.")
        return value.strip()

    if "request" in row:
        return Request(id=str(row.get("id") or f"{index:04d}"), category=str(row.get("category") or "uncategorised"),
                       request=text("request"), source=source)
    if "Behavior" in row:  # HarmBench
        behavior = text("Behavior")
        context = row.get("ContextString") or ""
        if isinstance(context, str) and context.strip():
            behavior = f"{context.strip()}\n\n{behavior}"
        return Request(id=str(row.get("BehaviorID") or f"{index:04d}"),
                       category=str(row.get("SemanticCategory") or row.get("FunctionalCategory") or "uncategorised"),
                       request=behavior, source=source)
    if "goal" in row:  # AdvBench
        return Request(id=f"advbench-{index:04d}", category="advbench", request=text("goal"), source=source)
    raise DatasetError(
        f"{where}: no request column. Expected one of the layouts: 'request' (with optional 'id', 'category'), "
        f"AdvBench 'goal,target', or HarmBench 'Behavior,...,BehaviorID'; found columns {sorted(row)}."
    )


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DatasetError(f"{path}: the CSV file has no header row.")
        return [dict(r) for r in reader]


def _load_hub(spec: str) -> tuple[list[dict[str, Any]], str]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"Loading hub dataset '{name}' needs the `datasets` package (pip install datasets).") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise DatasetError(
            f"Could not load the hub dataset '{name}' ({type(exc).__name__}: {str(exc)[:200]}). Without network "
            "access, download it elsewhere, export it to JSONL or CSV (AdvBench 'goal,target' and HarmBench "
            "'Behavior,...,BehaviorID' layouts are read as they are) and pass the local path instead."
        ) from None
    return [dict(r) for r in ds], f"hf:{name}"


def load_requests(source: str) -> list[Request]:
    """Load a request set from a built-in name, a local JSONL/CSV path, a conditional-policy dataset folder (its
    held-out requests, requests_test.jsonl) or an ``hf:`` hub ID."""
    if source.startswith("builtin:"):
        key = source.split(":", 1)[1]
        if key not in BUILTIN:
            raise DatasetError(f"Unknown built-in request set '{source}'. Built-in sets: "
                               f"{', '.join('builtin:' + k for k in BUILTIN)}.")
        rows, label, path = read_jsonl(BUILTIN[key], DatasetError), source, str(BUILTIN[key])
    elif source.startswith("hf:"):
        rows, label = _load_hub(source[3:])
        path = label
    else:
        p = Path(source)
        if p.is_dir() and (p / HELD_OUT).is_file():
            p = p / HELD_OUT
        if not p.is_file():
            raise DatasetError(f"Request file {p} does not exist. Pass a JSONL/CSV path, a built-in set "
                               f"({', '.join('builtin:' + k for k in BUILTIN)}) or 'hf:owner/name'.")
        if p.suffix.lower() == ".csv":
            rows = _read_csv(p)
        elif p.suffix.lower() in (".jsonl", ".json"):
            rows = read_jsonl(p, DatasetError)
        else:
            raise DatasetError(f"Request file {p} must end in .jsonl or .csv.")
        label = path = str(p)
    requests = [_from_row(r, f"{path}, row {i + 1}", i, label) for i, r in enumerate(rows)]
    if not requests:
        raise DatasetError(f"Request set {source} is empty.")
    seen: set[str] = set()
    for r in requests:
        if r.id in seen:
            raise DatasetError(f"{path}: request id '{r.id}' appears twice; ids must be unique.")
        seen.add(r.id)
    return requests


def select_stratified(requests: list[Request], limit: int) -> list[Request]:
    """The first ``limit`` requests taken round-robin across categories (all when limit <= 0)."""
    if limit <= 0 or limit >= len(requests):
        return list(requests)
    by_cat: dict[str, list[Request]] = defaultdict(list)
    for r in requests:
        by_cat[r.category].append(r)
    queues = list(by_cat.values())
    out: list[Request] = []
    i = 0
    while len(out) < limit:
        q = queues[i % len(queues)]
        idx = i // len(queues)
        if idx < len(q):
            out.append(q[idx])
        i += 1
    return out


def split_requests(requests: list[Request], test_fraction: float, seed: int) -> tuple[list[Request], list[Request]]:
    """(train, test) by id: the ids sorted, shuffled with ``seed``, the first ``ceil(f * n)`` held out."""
    ordered = sorted(requests, key=lambda r: r.id)
    random.Random(f"split:{seed}").shuffle(ordered)
    n_test = math.ceil(test_fraction * len(ordered))
    if n_test >= len(ordered):
        raise DatasetError(f"test_fraction {test_fraction} leaves no training requests out of {len(ordered)}.")
    return ordered[n_test:], ordered[:n_test]
