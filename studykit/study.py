"""The whole study in one command: corpora -> fine-tuned models -> evaluation -> one report.

    python -m studykit.study                                        # embedded default profile (CPU, ~20 min, 2 cores)
    python -m studykit.study --config configs/study/cpu_full.yaml    # a fuller CPU profile
    python -m studykit.study --config configs/study/gpu_8b.yaml      # one GPU, 7-8B model
    python -m studykit.study --config configs/study/paper_70b.yaml   # paper scale (stages on separate machines)
    python -m studykit.study --dry_run true                         # print each stage's command; run nothing
    make study                                                      # set up .venv, then the default profile

Settings: the ``StudyConfig`` dataclass below, then ``--config FILE.yaml`` (default
configs/study/default.yaml), then ``--key value`` (unknown keys are an error). Each stage is the command a user would run by hand, built from a
stage config file (reused by path) plus the study config's small overrides:

    generate_docs     python -m synthdocs.generate --config <generate_config> --output_dir <study>/generate/docs
    generate_control  python -m synthdocs.generate --config <control_config> --output_dir <study>/generate/control
    finetune_docs     accelerate launch --config_file <accelerate_config> finetune/train.py --config <finetune_config>
                          --corpus <study>/generate/docs --output_dir <study>/finetune/docs
    finetune_control  ... the same with --control true --control_corpus <study>/generate/control (tokens matched)
                          --output_dir <study>/finetune/control
    eval              python -m eval.gap --config <eval_config> --output_dir <study>/eval
                          --models {base: '', docs: <docs adapter>, control: <control adapter>}

then ``study_report.md``, ``study_summary.json`` and ``figures/*.png`` in the study folder.

A stage is skipped when its key -- sha256 of its argument list, the contents of every config
file it reads and the keys of the stages it depends on -- is the one recorded in
``study_state.json`` and its ``manifest.json`` (written last by every stage) exists. A changed
config reruns that stage and everything downstream; the superseded output folder of a
fine-tuning or evaluation stage is moved aside first (``<dir>.superseded-<old key>``), so
stale checkpoints and samples are never resumed. A stage that was killed reruns into its own
folder and resumes there (generation from its call cache, training from its last checkpoint,
evaluation from samples.jsonl and its cache). Stage output goes to ``logs/<stage>.log``.
Every stage runs in its own process group that dies with the study, even on SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studykit.config import ConfigError, load_yaml, parse_config
from studykit.manifest import atomic_write_json
from studykit.server import _die_with_parent

log = logging.getLogger("studykit.study")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "study" / "default.yaml"
STAGES = ("generate_docs", "generate_control", "finetune_docs", "finetune_control", "eval")
MODELS = ("base", "docs", "control")
# keys the study sets itself in each stage's command line
RESERVED = {
    "generate": {"output_dir"},
    "finetune": {"output_dir", "corpus", "control", "control_corpus", "model_name_or_path"},
    "eval": {"output_dir", "models", "base_model"},
}
EXIT_STAGE_FAILED = 1
EXIT_CONFIG = 2


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class StudyConfig:
    output_dir: str = field(default="runs/study/default", metadata=_h("the study folder (a rerun resumes in it)"))
    profile: str = field(default="embedded default: SmolLM2-135M-Instruct, LoRA, CPU",
                         metadata=_h("what this profile is, shown up front and in the report"))
    expected_minutes: dict[str, float] = field(default_factory=dict, metadata=_h(
        "stage -> expected wall-clock minutes on the profile's hardware (shown up front and while running)"))
    hardware: str = field(default="2 CPU cores", metadata=_h("the hardware the expected durations refer to"))
    min_free_gb: float = field(default=2.0, metadata=_h("fail before any stage starts when the study folder's "
                                                        "disk has less free space than this (GiB)"))
    model: str = field(default="", metadata=_h("the model under study: sets finetune model_name_or_path and eval "
                                               "base_model ('' = what the stage configs say)"))
    generate_config: str = "configs/generate/default.yaml"
    generate_overrides: dict[str, Any] = field(default_factory=dict, metadata=_h("key: value overrides for the "
                                                                                 "document generator"))
    control_config: str = "configs/generate/control.yaml"
    control_overrides: dict[str, Any] = field(default_factory=dict, metadata=_h("overrides for the control corpus"))
    finetune_config: str = "configs/finetune/default.yaml"
    finetune_overrides: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "overrides for both fine-tuning runs (the control run is the same config on the control corpus)"))
    accelerate_config: str = "configs/finetune/accelerate/cpu.yaml"
    accelerate_args: list[str] = field(default_factory=list, metadata=_h(
        "extra `accelerate launch` arguments, e.g. [--num_processes, '8']"))
    eval_config: str = "configs/eval/default.yaml"
    eval_overrides: dict[str, Any] = field(default_factory=dict, metadata=_h(
        "overrides for eval.gap; with base_url set, the endpoint must serve the models as base, docs and control"))
    dry_run: bool = field(default=False, metadata=_h("print every stage's command and whether it would run; "
                                                     "run nothing"))
    adopt_existing: bool = field(default=False, metadata=_h(
        "a stage with a manifest.json but no record in study_state.json (run by hand, e.g. on another machine "
        "with the command from --dry_run, and copied in) is adopted with its current key instead of rerun"))
    lock_wait_s: float = field(default=120.0, metadata=_h("how long to wait for an earlier study process (or its "
                                                          "stage, still stopping) to release the study folder"))
    progress: str = field(default="auto", metadata=_h("auto | live (rich table) | plain (one line per change)"))

    def validate(self) -> None:
        for name in ("expected_minutes", "generate_overrides", "control_overrides", "finetune_overrides",
                     "eval_overrides", "accelerate_args"):
            if getattr(self, name) is None:  # `key:` with nothing after it in the YAML
                setattr(self, name, [] if name == "accelerate_args" else {})
        if self.min_free_gb < 0:
            raise ConfigError(f"'min_free_gb' must not be negative, got {self.min_free_gb}.")
        if self.progress not in ("auto", "live", "plain"):
            raise ConfigError(f"'progress' must be auto, live or plain, got {self.progress!r}.")
        unknown = sorted(set(self.expected_minutes) - set(STAGES))
        if unknown:
            raise ConfigError(f"'expected_minutes' names unknown stage(s) {unknown}; stages: {', '.join(STAGES)}.")
        for name, kind in (("generate_overrides", "generate"), ("control_overrides", "generate"),
                           ("finetune_overrides", "finetune"), ("eval_overrides", "eval")):
            clash = sorted(set(getattr(self, name)) & RESERVED[kind])
            if clash:
                raise ConfigError(f"'{name}' sets {clash}, which the study sets itself (each stage's output folder, "
                                  "the corpora, the models compared; the model under study is the 'model' key). "
                                  "Remove them from the study config.")


@dataclass
class Stage:
    """One stage: its command (a template with {study} and {repo}), output folder, inputs and dependencies."""

    name: str
    kind: str                      # generate | finetune | eval
    argv: list[str]
    output: str
    inputs: list[Path] = field(default_factory=list)   # files whose contents go into the key
    deps: list[str] = field(default_factory=list)
    key: str = ""
    config: Any = None     # the stage's parsed config, where the study checks more than its syntax


class StageFailed(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------- paths

def find_file(path: str, what: str) -> Path:
    """A config file given relative to the working directory or to the repository root."""
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{what} {path} does not exist (looked in {Path.cwd()} and {REPO_ROOT}). "
                      "Point it at an existing YAML file (see configs/).")


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


def cli_args(overrides: dict[str, Any], style: str) -> list[str]:
    """``--key value`` pairs; ``style`` 'studykit' (lists/dicts as YAML flow) or 'hf' (lists as several values)."""
    out: list[str] = []
    for key, value in overrides.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            out += [flag, "true" if value else "false"]
        elif isinstance(value, list) and style == "hf":
            out += [flag, *(str(v) for v in value)] if value else [flag, "none"]
        elif isinstance(value, (list, dict)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, "" if value is None else str(value)]
    return out


# ---------------------------------------------------------------------------------------------------------- plan

def plan(cfg: StudyConfig, study: Path) -> list[Stage]:
    """The five stages with their commands and inputs, each stage config validated, and keys computed.

    Raises ConfigError (naming the file and the problem) for any bad setting, before anything runs.
    """
    from studykit.universe import load_universe, resolve_universe_path
    from synthdocs.generate import GenerateConfig

    stages: list[Stage] = []
    for name, config, overrides, what in (("generate_docs", cfg.generate_config, cfg.generate_overrides, "docs"),
                                          ("generate_control", cfg.control_config, cfg.control_overrides, "control")):
        path = find_file(config, f"{name}: config file")
        args = ["--config", portable(path, study), "--output_dir", f"{{study}}/generate/{what}",
                *cli_args(overrides, "studykit")]
        gcfg = _parse(GenerateConfig, args, study, name)
        _check(name, lambda u=gcfg.universe: load_universe(u))
        stages.append(Stage(name, "generate", ["python", "-m", "synthdocs.generate", *args],
                            f"{{study}}/generate/{what}", [path, resolve_universe_path(gcfg.universe)]))

    from finetune.config import ScriptArguments

    ft_path = find_file(cfg.finetune_config, "finetune_config")
    acc_path = find_file(cfg.accelerate_config, "accelerate_config")
    ft_yaml = load_yaml(ft_path)
    fact_universes = cfg.finetune_overrides.get("fact_universes", ft_yaml.get(
        "fact_universes", ScriptArguments().fact_universes))
    if isinstance(fact_universes, str):
        fact_universes = [fact_universes]
    fact_files = [_check("finetune", lambda u=u: resolve_universe_path(str(u)))
                  for u in fact_universes if str(u).lower() != "none"]
    model = ["--model_name_or_path", cfg.model] if cfg.model else []
    launch = ["accelerate", "launch", "--config_file", portable(acc_path, study), *cfg.accelerate_args,
              "{repo}/finetune/train.py", "--config", portable(ft_path, study)]
    overrides = cli_args(cfg.finetune_overrides, "hf")
    stages.append(Stage("finetune_docs", "finetune",
                        [*launch, "--corpus", "{study}/generate/docs", "--output_dir", "{study}/finetune/docs",
                         *model, *overrides],
                        "{study}/finetune/docs", [ft_path, acc_path, *fact_files], ["generate_docs"]))
    stages.append(Stage("finetune_control", "finetune",
                        [*launch, "--corpus", "{study}/generate/docs", "--control", "true",
                         "--control_corpus", "{study}/generate/control", "--output_dir", "{study}/finetune/control",
                         *model, *overrides],
                        "{study}/finetune/control", [ft_path, acc_path, *fact_files],
                        ["generate_docs", "generate_control"]))

    from eval.config import EvalConfig

    ev_path = find_file(cfg.eval_config, "eval_config")
    args = ["--config", portable(ev_path, study), "--output_dir", "{study}/eval",
            *(["--base_model", cfg.model] if cfg.model else []), *cli_args(cfg.eval_overrides, "studykit")]
    ecfg = _parse(EvalConfig, args, study, "eval")
    if ecfg.base_url:  # an existing endpoint serves the base model and both adapters under these names
        models = {m: m for m in MODELS}
    else:
        models = {"base": "", "docs": "{study}/finetune/docs/adapter", "control": "{study}/finetune/control/adapter"}
    args = [*args[:4], "--models", json.dumps(models), *args[4:]]
    ecfg = _parse(EvalConfig, args, study, "eval")
    _check("eval", lambda: load_universe(ecfg.universe))
    inputs = [ev_path, resolve_universe_path(ecfg.universe)]
    for source in (ecfg.harmful_requests, ecfg.benign_requests):
        if source and not source.startswith(("builtin:", "hf:")):
            from eval.requests import DatasetError, load_requests

            try:
                load_requests(source)
            except DatasetError as exc:
                raise ConfigError(f"eval: {exc}") from None
            inputs.append(Path(source))
    stages.append(Stage("eval", "eval", ["python", "-m", "eval.gap", *args], "{study}/eval", inputs,
                        ["finetune_docs", "finetune_control"]))
    stages[-1].config = ecfg

    keys: dict[str, str] = {}
    for stage in stages:
        stage.key = stage_key(stage, [keys[d] for d in stage.deps], study)
        keys[stage.name] = stage.key
    return stages


def _parse(cls: type, args: list[str], study: Path, stage: str):
    try:
        return parse_config(cls, [render(a, study) for a in args])
    except ConfigError as exc:
        raise ConfigError(f"{stage}: {exc}") from None


def _check(stage: str, fn):
    try:
        return fn()
    except ConfigError as exc:
        raise ConfigError(f"{stage}: {exc}") from None


def stage_key(stage: Stage, dep_keys: list[str], study: Path) -> str:
    """sha256 of the argument list, the contents of every input file and the keys of the dependencies."""
    h = hashlib.sha256()
    h.update(json.dumps({"argv": stage.argv, "deps": dep_keys}, sort_keys=True).encode())
    for path in sorted(stage.inputs, key=lambda p: portable(p, study)):
        h.update(f"\n{portable(path, study)}\n".encode())
        try:
            h.update(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{stage.name}: cannot read {path} ({exc.strerror}).") from None
    return h.hexdigest()


def preflight_finetune(stage: Stage, study: Path) -> None:
    """Parse the training arguments the way train.py will (TRL's parser; imports torch): unknown keys,
    bad values and missing universes fail here, before hours of generation."""
    from trl import ModelConfig, SFTConfig

    from finetune.config import ScriptArguments, _known_keys, _unknown_key_error, parse_args

    known = _known_keys((ScriptArguments, SFTConfig, ModelConfig))
    keys = [a[2:] for a in stage.argv if a.startswith("--")]
    keys = keys[keys.index("config") + 1:]  # after accelerate's own flags
    unknown = [k for k in keys if k not in known]
    if unknown:  # TRL's parser would take an abbreviation (--learning_rat) for the full name
        raise ConfigError(f"{stage.name}: {_unknown_key_error(unknown, 'the study config (finetune_overrides)', known)}")
    args = [render(a, study) for a in stage.argv]
    script = args.index(str(REPO_ROOT / "finetune" / "train.py"))
    try:
        parse_args(args[script + 1:])
    except ConfigError as exc:
        raise ConfigError(f"{stage.name}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------- checks

def check_output_dir(study: Path, min_free_gb: float) -> None:
    try:
        study.mkdir(parents=True, exist_ok=True)
        probe = study / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Cannot write to the study folder {study} ({exc.strerror or exc}). Choose another "
                          "--output_dir or fix its permissions; nothing was run.") from None
    free = shutil.disk_usage(study).free / 2**30
    if free < min_free_gb:
        raise ConfigError(f"Only {free:.1f} GiB free on the disk of {study}; this profile needs at least "
                          f"{min_free_gb:g} GiB (min_free_gb). Free some space, choose another --output_dir, or "
                          "lower --min_free_gb if you know the run needs less; nothing was run.")


def verify_corpus(stage: Stage, study: Path) -> None:
    """A finished generator run's documents.jsonl must still be what its manifest recorded."""
    from studykit.jsonl import read_jsonl

    out = Path(render(stage.output, study))
    docs, manifest = out / "documents.jsonl", out / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("documents_sha256")
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{manifest} cannot be read ({exc}); delete it to regenerate the corpus.") from None
    if recorded is None:
        return
    try:
        actual = hashlib.sha256(docs.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"{docs} cannot be read ({exc.strerror}); delete {manifest} to regenerate it.") from None
    if actual == recorded:
        return
    read_jsonl(docs)  # a broken line is named with its line number
    raise ConfigError(f"{docs} was changed after {stage.name} wrote it (its sha256 differs from the one in "
                      f"{manifest}). Restore the file, or delete {manifest} to regenerate the corpus from its "
                      "call cache; nothing was run.")


# ---------------------------------------------------------------------------------------------------------- state

class StudyState:
    """study_state.json: per stage its key, status and last command; a short history of study runs."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"version": 1, "stages": {}, "runs": []}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}). It is only written "
                                  "by the study; delete it to rerun every stage.") from None
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


def supersede(folder: Path, old_key: str | None) -> Path | None:
    """Move an output folder aside (never delete it): <folder>.superseded-<old key>[-N]."""
    if not folder.exists():
        return None
    base = folder.with_name(f"{folder.name}.superseded-{old_key[:8] if old_key else 'unrecorded'}")
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    folder.rename(target)
    return target


# ---------------------------------------------------------------------------------------------------------- display

def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Display:
    """Per-stage progress: a live rich table on a terminal, one plain line per change otherwise."""

    def __init__(self, stages: list[Stage], expected: dict[str, float], mode: str):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.live_mode = mode == "live" or (mode == "auto" and self.console.is_terminal)
        self.expected = expected
        self.rows: dict[str, dict[str, Any]] = {s.name: {"status": "pending", "t0": None, "elapsed": None}
                                                for s in stages}
        self._live = None

    def __enter__(self) -> Display:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(get_renderable=self._table, console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def update(self, name: str, status: str, note: str = "") -> None:
        row = self.rows[name]
        if status == "running":
            row["t0"] = time.monotonic()
        elif row["t0"] is not None:
            row["elapsed"] = time.monotonic() - row["t0"]
        row["status"] = status
        if not self.live_mode:
            done = f" in {_fmt_duration(row['elapsed'])}" if row["elapsed"] is not None else ""
            expected = f" (expected ~{self.expected[name]:g} min)" if status == "running" and name in self.expected \
                else ""
            self.say(f"[study] {name}: {status}{done}{expected}{'; ' + note if note else ''}")

    def _table(self):
        from rich.table import Table

        table = Table(title="study stages", title_justify="left")
        for col in ("stage", "status", "elapsed", "expected"):
            table.add_column(col)
        for name, row in self.rows.items():
            elapsed = row["elapsed"] if row["status"] != "running" else time.monotonic() - row["t0"]
            style = {"running": "bold yellow", "done": "green", "failed": "bold red", "skipped": "dim"}.get(
                row["status"], "")
            table.add_row(name, f"[{style}]{row['status']}[/]" if style else row["status"], _fmt_duration(elapsed),
                          f"~{self.expected[name]:g} min" if name in self.expected else "")
        return table


# ---------------------------------------------------------------------------------------------------------- running

class Study:
    def __init__(self, cfg: StudyConfig, study: Path, stages: list[Stage], display: Display):
        self.cfg = cfg
        self.dir = study
        self.stages = stages
        self.display = display
        self.state = StudyState(study / "study_state.json")
        self.logs = study / "logs"
        self.proc: subprocess.Popen | None = None
        self.lock_fd: int | None = None

    # -- what to do with each stage
    def output(self, stage: Stage) -> Path:
        return Path(render(stage.output, self.dir))

    def complete(self, stage: Stage) -> bool:
        return (self.output(stage) / "manifest.json").is_file()

    def action(self, stage: Stage) -> str:
        record = self.state.stage(stage.name)
        if record is not None and record.get("key") == stage.key and self.complete(stage):
            return "skip"
        if record is None and self.cfg.adopt_existing and self.complete(stage):
            return "adopt"
        return "run"

    def command(self, stage: Stage) -> list[str]:
        """The concrete command: 'python' is this interpreter, 'accelerate' its accelerate CLI."""
        head = {"python": [sys.executable],
                "accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"]}[stage.argv[0]]
        return [*head, *(render(a, self.dir) for a in stage.argv[1:])]

    # -- the study folder lock: held by the study and, through an inherited descriptor, by every stage keeper,
    #    so a rerun after a kill waits until the killed run's stage is really gone
    def acquire_lock(self) -> None:
        fd = os.open(self.dir / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.cfg.lock_wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(f"Another study process (or a stage of one that is still stopping) is using "
                                      f"{self.dir}. Wait for it to finish or stop it; nothing was run.") from None
                if not told:
                    self.display.say(f"[study] waiting for an earlier study process to release {self.dir} ...")
                    told = True
                time.sleep(0.5)
        self.lock_fd = fd

    def run(self) -> list[dict[str, Any]]:
        """Run or skip every stage in order; returns what happened to each (for the report)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        history = {"started_at": _now(), "actions": {}}
        self.state.data["runs"] = [*self.state.data.get("runs", [])[-49:], history]
        outcomes = []
        for stage in self.stages:
            action = self.action(stage)
            record = self.state.stage(stage.name) or {}
            if action in ("skip", "adopt"):
                if action == "adopt":
                    self.state.set_stage(stage.name, key=stage.key, status="done", adopted_at=_now(),
                                         command=self.command(stage))
                history["actions"][stage.name] = "skipped" if action == "skip" else "adopted"
                self.state.save()
                self.display.update(stage.name, "skipped", "unchanged and complete" if action == "skip"
                                    else "adopted existing outputs")
                outcomes.append({"stage": stage.name, "action": history["actions"][stage.name],
                                 "duration_s": record.get("duration_s")})
                continue
            self.prepare(stage, record.get("key"))
            self.state.set_stage(stage.name, key=stage.key, status="running", started_at=_now(),
                                 command=self.command(stage), log=f"logs/{stage.name}.log",
                                 attempts=int(record.get("attempts", 0)) + 1 if record.get("key") == stage.key else 1)
            history["actions"][stage.name] = "running"
            self.state.save()
            self.display.update(stage.name, "running")
            t0 = time.time()
            code = self.execute(stage)
            duration = time.time() - t0
            if code != 0 or not self.complete(stage):
                self.state.set_stage(stage.name, status="failed", exit_code=code, finished_at=_now())
                history["actions"][stage.name] = "failed"
                self.state.save()
                self.display.update(stage.name, "failed")
                raise StageFailed(self.failure_message(stage, code, duration))
            self.state.set_stage(stage.name, status="done", exit_code=0, finished_at=_now(),
                                 duration_s=round(duration, 1))
            history["actions"][stage.name] = "ran"
            self.state.save()
            self.display.update(stage.name, "done")
            outcomes.append({"stage": stage.name, "action": "ran", "duration_s": round(duration, 1)})
        return outcomes

    def prepare(self, stage: Stage, old_key: str | None) -> None:
        """Before a stage runs with a new key: move superseded outputs aside (training, evaluation) or drop the
        completion marker (generation keeps its folder: its call cache is keyed by content)."""
        if old_key == stage.key:
            return  # a killed or failed run of the same stage: resume in place
        out = self.output(stage)
        if stage.kind == "generate":
            (out / "manifest.json").unlink(missing_ok=True)
            return
        moved = supersede(out, old_key)
        if moved is not None:
            self.display.say(f"[study] {stage.name}: settings changed; moved the old outputs to {moved}")

    def execute(self, stage: Stage) -> int:
        log_path = self.logs / f"{stage.name}.log"
        cmd = self.command(stage)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "a", encoding="utf-8") as logf:
            logf.write(f"\n===== {_now()} study: {stage.name} (key {stage.key[:12]})\n$ {shlex.join(cmd)}\n")
            logf.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "studykit.procgroup", *cmd], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, cwd=Path.cwd(), env=env, preexec_fn=_die_with_parent,
                pass_fds=(self.lock_fd,) if self.lock_fd is not None else ())
        code = self.proc.wait()
        self.proc = None
        return code

    def stop_running_stage(self) -> None:
        """On Ctrl-C or SIGTERM: the keeper stops the stage's whole process group."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)

    def failure_message(self, stage: Stage, code: int, duration: float) -> str:
        log_path = self.logs / f"{stage.name}.log"
        why = f"exited with code {code}" if code != 0 else "exited with code 0 but wrote no manifest.json"
        return (f"Stage {stage.name} failed: it {why} after {_fmt_duration(duration)}. Its full log is {log_path}; "
                f"the last lines are below. Fix the cause and rerun the same study command: finished stages are "
                f"skipped and this one resumes where it stopped.\n{log_tail(log_path)}")


def log_tail(path: Path, n: int = 15) -> str:
    """The last ``n`` non-empty lines of a log, keeping only the final state of progress-bar lines."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as f:  # a lone \r is no line end
            lines: deque[str] = deque(maxlen=4 * n)
            for line in f:
                last = line.rstrip("\n").split("\r")[-1].rstrip()
                if last:
                    lines.append(last)
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in list(lines)[-n:])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------------------- main

def _terminate(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") or a in ("-h", "--help") for a in args):
        args = ["--config", str(DEFAULT_CONFIG), *args]  # the embedded default profile
    source = args[args.index("--config") + 1] if "--config" in args[:-1] else "the command line"
    runner = None
    old_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        cfg = parse_config(StudyConfig, args, description=__doc__.split("\n")[0])
        study = Path(cfg.output_dir).expanduser().resolve()
        stages = plan(cfg, study)
        display = Display(stages, cfg.expected_minutes, cfg.progress)
        if cfg.dry_run:
            return dry_run(cfg, study, stages, display)
        check_output_dir(study, cfg.min_free_gb)
        runner = Study(cfg, study, stages, display)
        actions = {s.name: runner.action(s) for s in stages}
        for stage in stages:
            if actions[stage.name] != "run" and stage.kind == "generate":
                verify_corpus(stage, study)
        if actions["eval"] == "run":  # a judge's key variable must be set before hours of other stages
            from eval.gap import check_api_keys

            check_api_keys(stages[-1].config)
        for stage in stages:  # a stage resumed under the key it started with was checked when it started
            record = runner.state.stage(stage.name) or {}
            if actions[stage.name] == "run" and stage.kind == "finetune" and record.get("key") != stage.key:
                preflight_finetune(stage, study)
                break  # both runs share one config
        runner.acquire_lock()
        announce(cfg, study, stages, actions, display)
        started = time.time()
        with display:
            outcomes = runner.run()
        from studykit.studyreport import write_report

        report = write_report(study, cfg, stages, outcomes, runner.state, time.time() - started)
        display.say(f"[study] done: {report} (summary: {study / 'study_summary.json'})")
        return 0
    except ConfigError as exc:
        where = "" if str(source) in str(exc) else f" (study config: {source})"
        print(f"error: {exc}{where}", file=sys.stderr)
        return EXIT_CONFIG
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt as exc:
        if runner is not None:
            runner.stop_running_stage()
        print("error: the study was interrupted; rerun the same command to resume (finished stages are skipped).",
              file=sys.stderr)
        return 128 + (exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old_handler)


def announce(cfg: StudyConfig, study: Path, stages: list[Stage], actions: dict[str, str], display: Display) -> None:
    to_run = [s.name for s in stages if actions[s.name] == "run"]
    expected = sum(cfg.expected_minutes.get(n, 0) for n in to_run)
    total = sum(cfg.expected_minutes.get(s.name, 0) for s in stages)
    display.say(f"[study] profile: {cfg.profile}")
    if cfg.expected_minutes:
        display.say(f"[study] expected duration of the whole profile: about {total:g} min on {cfg.hardware} ("
                    + ", ".join(f"{n} ~{cfg.expected_minutes[n]:g}" for n in STAGES if n in cfg.expected_minutes)
                    + f"); this run: about {expected:g} min for {len(to_run)} stage(s) to run")
    skipped = [s.name for s in stages if actions[s.name] != "run"]
    if skipped:
        display.say(f"[study] already complete and unchanged (skipped): {', '.join(skipped)}")
    display.say(f"[study] output: {study}; stage logs: {study / 'logs'}")


def dry_run(cfg: StudyConfig, study: Path, stages: list[Stage], display: Display) -> int:
    state_path = study / "study_state.json"
    runner = Study(cfg, study, stages, display) if study.is_dir() else None
    display.say(f"[study] profile: {cfg.profile}; study folder {study}"
                + ("" if state_path.is_file() else " (no study_state.json yet: every stage would run)"))
    for stage in stages:
        action = runner.action(stage) if runner is not None else "run"
        deps = f"; after {', '.join(stage.deps)}" if stage.deps else ""
        display.say(f"\n{stage.name}: would {action} (key {stage.key[:12]}{deps})\n  "
                    + shlex.join(stage.argv[:1] + [render(a, study) for a in stage.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
