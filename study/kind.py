"""Study kinds: the graph of stages a study runs, read from configs/study/kinds/<name>.yaml.

A kind lists nodes in an order where every node comes after the nodes it refers to. Each node
names its stage (a key of ``study.specs.SPECS``), a label for reports (``docs``, ``control``...),
its output folder inside the study folder, optionally a default config file and launcher
arguments, and ``set``: the settings the study gives it, where the string ``"@other_node"``
stands for what that node hands on (its spec's artifact) and makes this node depend on it.
``report`` names the study report the kind's results go into (``REPORTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.paths import REPO_ROOT, find_file
from studykit.config import ConfigError, load_yaml

KINDS_DIR = REPO_ROOT / "configs" / "study" / "kinds"
REPORTS = ("sdf_gap", "backdoor", "af_controls")  # the study reports the tool can write (study/report.py)
_NODE_KEYS = {"stage", "label", "output", "config", "launch", "set"}


@dataclass(frozen=True)
class NodeTemplate:
    name: str
    stage: str
    label: str
    output: str
    config: str | None = None
    launch: tuple[str, ...] = ()
    set: dict[str, Any] = field(default_factory=dict)

    @property
    def refs(self) -> list[str]:
        """The nodes this one refers to ("@name" values anywhere in ``set``), in order of first mention."""
        found: list[str] = []
        for value in _walk(self.set):
            if is_ref(value) and value[1:] not in found:
                found.append(value[1:])
        return found


@dataclass(frozen=True)
class StudyKind:
    name: str
    description: str
    path: Path
    nodes: tuple[NodeTemplate, ...]
    report: str = "sdf_gap"

    def node(self, name: str) -> NodeTemplate:
        return next(n for n in self.nodes if n.name == name)

    @property
    def stages(self) -> set[str]:
        return {n.stage for n in self.nodes}


def is_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("@") and len(value) > 1


def _walk(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def resolve_kind_path(name_or_path: str) -> Path:
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        return find_file(name_or_path, "study kind file")
    candidate = KINDS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in KINDS_DIR.glob("*.yaml"))
        raise ConfigError(f"Unknown study kind '{name_or_path}'. Built-in kinds: {', '.join(known)}; or pass the path "
                          "of a kind YAML file.")
    return candidate


def load_kind(name_or_path: str, stages: set[str]) -> StudyKind:
    """Read and check a kind file; ``stages`` are the stage names the tool has."""
    path = resolve_kind_path(name_or_path)
    data = load_yaml(path)
    unknown = sorted(set(data) - {"name", "description", "report", "nodes"})
    if unknown or not isinstance(data.get("nodes"), dict) or not data["nodes"]:
        raise ConfigError(f"{path}: a study kind has 'name', 'description', 'report' and a non-empty mapping 'nodes'"
                          + (f"; unknown key(s) {unknown}" if unknown else "") + ".")
    report = str(data.get("report") or "sdf_gap")
    if report not in REPORTS:
        raise ConfigError(f"{path}: 'report' must be one of {', '.join(REPORTS)}, got {report!r}.")
    nodes: list[NodeTemplate] = []
    for name, raw in data["nodes"].items():
        nodes.append(_node(path, str(name), raw, stages, {n.name for n in nodes}))
    outputs = [n.output for n in nodes]
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"{path}: two nodes write to the same output folder ({outputs}).")
    return StudyKind(str(data.get("name") or path.stem), str(data.get("description") or ""), path, tuple(nodes),
                     report)


def _node(path: Path, name: str, raw: Any, stages: set[str], earlier: set[str]) -> NodeTemplate:
    where = f"{path}: node '{name}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with at least 'stage', 'label' and 'output'.")
    bad = sorted(set(raw) - _NODE_KEYS)
    missing = sorted({"stage", "label", "output"} - set(raw))
    if bad or missing:
        raise ConfigError(f"{where}: unknown key(s) {bad}, missing key(s) {missing}; allowed: {sorted(_NODE_KEYS)}.")
    if raw["stage"] not in stages:
        raise ConfigError(f"{where}: unknown stage '{raw['stage']}'; stages: {', '.join(sorted(stages))}.")
    if "@" in name or "/" in name:
        raise ConfigError(f"{where}: node names may not contain '@' or '/'.")
    node = NodeTemplate(name=name, stage=raw["stage"], label=str(raw["label"]), output=str(raw["output"]).strip("/"),
                        config=raw.get("config"), launch=tuple(str(a) for a in raw.get("launch") or ()),
                        set=dict(raw.get("set") or {}))
    late = [r for r in node.refs if r not in earlier]
    if late:
        raise ConfigError(f"{where} refers to {late}, which are not nodes listed before it (a node may only use the "
                          "outputs of nodes above it).")
    if "output_dir" in node.set:
        raise ConfigError(f"{where}: 'output_dir' is the node's 'output', not a 'set' key.")
    return node
