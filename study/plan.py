"""The study plan: the kind's graph of stage specs, instantiated for every sweep point, with keys.

For each point and node the plan builds the stage's command line from its config file, the
profile's overrides, the point's swept value, the study's ``model`` and the kind's ``set``
(``"@node"`` becomes what that node hands on), parses it with the stage's own parser (so bad
settings fail here, before anything runs) and computes the node's key: sha256 of the command
without output paths, the contents of every file it reads (config, launcher config, universes,
request files) and the keys of the nodes it depends on. Points whose node has the same key share
one run of it in ``<study>/<output>``; nodes that differ between points run per point in
``<study>/sweep/<point>/<output>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.config import Point, StudyConfig, sweep_points
from study.kind import NodeTemplate, StudyKind, is_ref, load_kind
from study.paths import find_file, portable, render
from study.specs import SPECS
from studykit.config import ConfigError, to_cli
from studykit.stage import PENDING, StageSpec


@dataclass
class Node:
    """One stage run of the study."""

    name: str                  # the kind's node name, plus "@<point>" when it runs per sweep point
    template: NodeTemplate
    spec: StageSpec
    argv: list[str]            # the command, with {study} and {repo} placeholders
    output: str                # "{study}/..."
    key: str
    deps: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    config: Any = None         # the stage's parsed settings
    points: list[str] = field(default_factory=list)


@dataclass
class Plan:
    kind: StudyKind
    points: list[Point]
    nodes: list[Node]
    by_point: dict[str, dict[str, str]]  # point label -> kind node name -> Node.name

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def at(self, point: str, template: str) -> Node:
        return self.node(self.by_point[point][template])


@dataclass
class Draft:
    """A node at one point before output folders are assigned."""

    template: NodeTemplate
    config_file: Path
    launch: list[str]
    settings: dict[str, Any]   # overrides + set, "@node" references unresolved
    config: Any
    inputs: list[Path]
    key: str


def plan(cfg: StudyConfig, study: Path) -> Plan:
    """Every node of every point with its command, parsed settings and key; ConfigError for any bad setting."""
    kind = load_kind(cfg.kind, set(SPECS))
    check_profile(cfg, kind)
    points = sweep_points(cfg)
    drafts: dict[str, dict[str, Draft]] = {}
    for point in points:
        drafts[point.label] = {}
        for template in kind.nodes:
            drafts[point.label][template.name] = draft(cfg, template, point, drafts[point.label], study)
    return assemble(kind, points, drafts)


def check_profile(cfg: StudyConfig, kind: StudyKind) -> None:
    """The profile's stage entries and sweep name stages or nodes of this kind and leave its wiring alone."""
    targets = kind.stages | {n.name for n in kind.nodes}
    unknown = sorted(set(cfg.stages) - targets)
    if unknown:
        raise ConfigError(f"'stages' names {unknown}, which are neither stages nor nodes of the study kind "
                          f"'{kind.name}' ({kind.path}); it has stages {sorted(kind.stages)} and nodes "
                          f"{[n.name for n in kind.nodes]}.")
    unknown_minutes = sorted(set(cfg.expected_minutes) - {n.name for n in kind.nodes})
    if unknown_minutes:
        raise ConfigError(f"'expected_minutes' names unknown node(s) {unknown_minutes}; nodes: "
                          f"{', '.join(n.name for n in kind.nodes)}.")
    for template in kind.nodes:
        spec = SPECS[template.stage]
        reserved = {"output_dir", *template.set} | ({spec.model_key} if cfg.model and spec.model_key else set())
        for target in (template.stage, template.name):
            clash = sorted(set((cfg.stages.get(target) or {}).get("overrides") or {}) & reserved)
            if clash:
                raise ConfigError(f"'stages.{target}.overrides' sets {clash}, which the study sets itself for node "
                                  f"'{template.name}' (its output folder, what the kind wires in, the study's "
                                  "'model'). Remove them from the study config.")
    if cfg.sweep and cfg.sweep["setting"] != "model":
        target, key = cfg.sweep["setting"].split(".")
        hit = [n for n in kind.nodes if target in (n.stage, n.name)]
        if not hit:
            raise ConfigError(f"'sweep.setting' {cfg.sweep['setting']!r}: '{target}' is neither a stage nor a node of "
                              f"the study kind '{kind.name}'.")
        if any(key == "output_dir" or key in n.set for n in hit):
            raise ConfigError(f"'sweep.setting' {cfg.sweep['setting']!r} is a setting the study wires itself.")


def node_settings(cfg: StudyConfig, template: NodeTemplate, point: Point) -> tuple[str, list[str], dict[str, Any]]:
    """(config file, launcher arguments, overrides) of a node at a point: kind default < stage < node < sweep."""
    spec = SPECS[template.stage]
    config, launch, overrides = template.config or spec.default_config, list(template.launch), {}
    for target in (template.stage, template.name):
        entry = cfg.stages.get(target) or {}
        config = entry.get("config") or config
        launch = [str(a) for a in entry["launch"]] if entry.get("launch") is not None else launch
        overrides.update(entry.get("overrides") or {})
    if cfg.model and spec.model_key:
        overrides[spec.model_key] = cfg.model
    if cfg.sweep:
        target, _, key = cfg.sweep["setting"].rpartition(".")
        if not target and spec.model_key:  # model
            overrides[spec.model_key] = point.value
        elif target in (template.stage, template.name):
            overrides[key] = point.value
    return config, launch, overrides


def draft(cfg: StudyConfig, template: NodeTemplate, point: Point, earlier: dict[str, Draft], study: Path) -> Draft:
    spec = SPECS[template.stage]
    where = template.name + (f" (sweep point {point.label})" if point.label else "")
    try:
        config, launch, overrides = node_settings(cfg, template, point)
        config_file = find_file(config, f"{where}: config file")
        launch_files = [find_file(a, f"{where}: launcher file") for a in launch if _looks_like_file(a)]
        settings = {**overrides, **template.set}
        provisional = _resolve_refs(settings, lambda ref: f"{study}/{PENDING}/{ref}")
        argv = ["--config", str(config_file), *to_cli(provisional), "--output_dir", f"{study}/{PENDING}/{template.name}"]
        parsed = spec.parse(argv)
        inputs = [config_file, *launch_files, *spec.inputs(parsed)]
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    symbolic = {"stage": template.stage, "config": portable(config_file, study), "settings": settings,
                "launch": [portable(find_file(a, "launcher file"), study) if _looks_like_file(a) else a for a in launch],
                "deps": [earlier[ref].key for ref in template.refs]}
    return Draft(template, config_file, launch, settings, parsed, inputs, stage_key(symbolic, inputs, study, where))


def _looks_like_file(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml", ".json"))


def _resolve_refs(value: Any, resolve) -> Any:
    """A copy of ``value`` with every "@node" string replaced by ``resolve(node)``."""
    if isinstance(value, dict):
        return {k: _resolve_refs(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, resolve) for v in value]
    return resolve(value[1:]) if is_ref(value) else value


def stage_key(symbolic: dict[str, Any], inputs: list[Path], study: Path, where: str) -> str:
    """sha256 of the node's settings (no output paths), its dependencies' keys and its input files' contents."""
    h = hashlib.sha256(json.dumps(symbolic, sort_keys=True, default=str).encode())
    for path in sorted(set(inputs), key=lambda p: portable(p, study)):
        h.update(f"\n{portable(path, study)}\n".encode())
        try:
            h.update(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path} ({exc.strerror}).") from None
    return h.hexdigest()


def assemble(kind: StudyKind, points: list[Point], drafts: dict[str, dict[str, Draft]]) -> Plan:
    """Merge equal-keyed nodes across points, give every node its folder, resolve references."""
    nodes: list[Node] = []
    by_point: dict[str, dict[str, str]] = {p.label: {} for p in points}
    folders: dict[tuple[str, str], str] = {}  # (point, kind node) -> output folder
    for template in kind.nodes:
        groups: dict[str, list[str]] = {}
        for p in points:
            groups.setdefault(drafts[p.label][template.name].key, []).append(p.label)
        for key, labels in groups.items():
            shared = len(groups) == 1
            name = template.name if shared else f"{template.name}@{labels[0]}"
            output = f"{{study}}/{template.output}" if shared else f"{{study}}/sweep/{labels[0]}/{template.output}"
            d = drafts[labels[0]][template.name]

            def artifact(ref: str, label: str = labels[0]) -> str:
                producer = drafts[label][ref]
                folder = SPECS[producer.template.stage].folder(Path(folders[(label, ref)]))
                return str(SPECS[producer.template.stage].artifact(folder, producer.config))

            settings = {**_resolve_refs(d.settings, artifact), "output_dir": output}
            spec = SPECS[template.stage]
            argv = spec.command(portable_arg(d.config_file), settings, [_portable_launch(a) for a in d.launch])
            deps = [by_point[labels[0]][ref] for ref in template.refs]
            nodes.append(Node(name, template, spec, argv, output, key, deps, d.inputs, d.config, labels))
            for label in labels:
                by_point[label][template.name] = name
                folders[(label, template.name)] = output
    return Plan(kind, points, nodes, by_point)


def portable_arg(path: Path) -> str:
    """A file argument in a command: {repo}-relative inside the checkout, absolute elsewhere."""
    return portable(path, Path("/nonexistent-study-folder"))


def _portable_launch(arg: str) -> str:
    return portable_arg(find_file(arg, "launcher file")) if _looks_like_file(arg) else arg


def rel(node: Node, name: str) -> str:
    """A file of a node's folder, relative to the study folder (what reports link to)."""
    return f"{node.output.removeprefix('{study}/')}/{name}"


def render_command(node: Node, study: Path, python: str) -> list[str]:
    """The concrete command: 'python' is this interpreter, 'accelerate' its accelerate CLI."""
    head = {"python": [python], "accelerate": [python, "-m", "accelerate.commands.accelerate_cli"]}[node.argv[0]]
    return [*head, *(render(a, study) for a in node.argv[1:])]
