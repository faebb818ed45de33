"""The study's settings (one YAML profile per hardware/scale in configs/study/), and one sweep.

A profile names the study kind (the graph of stages, configs/study/kinds/), and for each stage or
node the config file, overrides and launcher arguments to use:

    stages:
      generate_docs: {overrides: {target_documents: 56}}         # one node
      finetune: {config: configs/finetune/default.yaml,           # every node of the stage
                 launch: [--config_file, configs/finetune/accelerate/cpu.yaml],
                 overrides: {max_steps: 16}}

A stage-wide entry applies first, a node's own entry on top (overrides merge, config and launch
replace). A sweep varies one setting over a list of values; stages whose key does not depend on it
run once for all points:

    sweep: {setting: finetune.max_train_tokens, values: [3000, 6000, 12000], label: docs corpus size (tokens)}

``setting`` is ``model`` (the model under study) or ``<stage or node>.<key>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from studykit.config import ConfigError

STAGE_ENTRY_KEYS = {"config", "overrides", "launch"}


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class StudyConfig:
    output_dir: str = field(default="runs/study/default", metadata=_h("the study folder (a rerun resumes in it)"))
    profile: str = field(default="embedded default: SmolLM2-135M-Instruct, LoRA, CPU",
                         metadata=_h("what this profile is, shown up front and in the report"))
    kind: str = field(default="sdf_gap", metadata=_h("the study kind: a name in configs/study/kinds/ or a YAML path"))
    expected_minutes: dict[str, float] = field(default_factory=dict, metadata=_h(
        "node -> expected wall-clock minutes on the profile's hardware (per sweep point for nodes that vary)"))
    hardware: str = field(default="2 CPU cores", metadata=_h("the hardware the expected durations refer to"))
    min_free_gb: float = field(default=2.0, metadata=_h("fail before any stage starts when the study folder's "
                                                        "disk has less free space than this (GiB)"))
    model: str = field(default="", metadata=_h("the model under study: fills each stage's model setting "
                                               "(finetune model_name_or_path, eval base_model); '' = the stage configs'"))
    stages: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=_h(
        "stage or node -> {config: FILE, overrides: {key: value}, launch: [launcher args]}"))
    sweep: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "{setting: model | <stage or node>.<key>, values: [...], label: text}; empty = no sweep"))
    instrument_check: str = field(default="", metadata=_h(
        "an af_controls study folder (configs/study/af_controls_cpu.yaml writes runs/study/af_controls_cpu): the "
        "report shows its instrument check, so a gap is read beside what the instrument detects; '' = none"))
    dry_run: bool = field(default=False, metadata=_h("print every stage's command and whether it would run; "
                                                     "run nothing"))
    adopt_existing: bool = field(default=False, metadata=_h(
        "a stage with a manifest.json but no record in study_state.json (run by hand, e.g. on another machine "
        "with the command from --dry_run, and copied in) is adopted with its current key instead of rerun"))
    lock_wait_s: float = field(default=120.0, metadata=_h("how long to wait for an earlier study process (or its "
                                                          "stage, still stopping) to release the study folder"))
    progress: str = field(default="auto", metadata=_h("auto | live (rich table) | plain (one line per change)"))

    def validate(self) -> None:
        for name in ("expected_minutes", "stages", "sweep"):
            if getattr(self, name) is None:  # `key:` with nothing after it in the YAML
                setattr(self, name, {})
        if self.min_free_gb < 0:
            raise ConfigError(f"'min_free_gb' must not be negative, got {self.min_free_gb}.")
        if self.progress not in ("auto", "live", "plain"):
            raise ConfigError(f"'progress' must be auto, live or plain, got {self.progress!r}.")
        for target, entry in self.stages.items():
            _check_entry(target, entry)
        if self.sweep:
            _check_sweep(self.sweep)


def _check_entry(target: str, entry: Any) -> None:
    where = f"'stages.{target}'"
    if not isinstance(entry, dict) or set(entry) - STAGE_ENTRY_KEYS:
        extra = sorted(set(entry) - STAGE_ENTRY_KEYS) if isinstance(entry, dict) else []
        raise ConfigError(f"{where} must be a mapping with any of {sorted(STAGE_ENTRY_KEYS)}"
                          + (f"; unknown key(s) {extra}" if extra else "") + ".")
    if not isinstance(entry.get("overrides") or {}, dict):
        raise ConfigError(f"{where}.overrides must be a mapping of setting: value.")
    launch = entry.get("launch") or []
    if not isinstance(launch, list) or not all(isinstance(a, (str, int, float)) for a in launch):
        raise ConfigError(f"{where}.launch must be a list of launcher arguments, e.g. [--config_file, FILE].")
    if entry.get("config") is not None and not isinstance(entry["config"], str):
        raise ConfigError(f"{where}.config must be the path of a YAML file.")


def _check_sweep(sweep: dict[str, Any]) -> None:
    bad = sorted(set(sweep) - {"setting", "values", "label"})
    setting, values = sweep.get("setting"), sweep.get("values")
    if bad or not isinstance(setting, str) or not setting:
        raise ConfigError("'sweep' needs 'setting' (model or <stage or node>.<key>), 'values' (a list) and optionally "
                          "'label'" + (f"; unknown key(s) {bad}" if bad else "") + ".")
    if setting != "model" and not re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+", setting):
        raise ConfigError(f"'sweep.setting' must be 'model' or '<stage or node>.<key>', got {setting!r}.")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError("'sweep.values' must list at least two values.")
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"'sweep.values' lists a value twice: {values}.")
    if any(isinstance(v, (dict, list)) for v in values):
        raise ConfigError("'sweep.values' must be plain values (numbers, strings, booleans).")


@dataclass(frozen=True)
class Point:
    """One sweep point; a study without a sweep has one point with an empty label."""

    label: str
    value: Any = None


def sweep_points(cfg: StudyConfig) -> list[Point]:
    if not cfg.sweep:
        return [Point("")]
    key = cfg.sweep["setting"].split(".")[-1]
    return [Point(f"{key}-{_slug(v)}", v) for v in cfg.sweep["values"]]


def _slug(value: Any) -> str:
    text = str(value).rstrip("/").split("/")[-1] if isinstance(value, str) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]
