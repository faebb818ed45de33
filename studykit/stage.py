"""The contract every stage exports (``<stage>/spec.py: SPEC``), so a study is a graph of specs.

A ``StageSpec`` says what the orchestrator needs to know about a stage without knowing its
internals: how to launch it, how its settings are parsed (the stage's own parser, so the study
checks a stage's settings exactly as the stage will), which of the study's settings it takes
(the model under study), which files go into its key besides its config file, what another
stage receives when it refers to this one (a corpus folder, an adapter folder), how a finished
run is verified before it is reused, and the typed records it writes, and which of its files are keyed by content (call caches) and so
may be carried into a rerun with changed settings.

Stages implement their hooks in their own ``spec.py`` with lazy imports, so the study can read
every spec without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studykit.config import to_cli
from studykit.handoff import Record, RunFolder

PENDING = ".plan"  # while a study plans, "@node" references point into <study>/.plan/<node>


def pending(path: str | Path) -> bool:
    """Whether a path in a parsed config is an earlier stage's output that does not exist yet (a study's "@node"
    reference while it plans): hooks skip such paths, whose contents the producing node's key already covers."""
    return PENDING in Path(path).parts


def _nothing(_: Any) -> list[Path]:
    return []


def _no_check(_: Any) -> None:
    return None


def _folder(folder: RunFolder, _config: Any) -> Path:
    return folder.dir


@dataclass(frozen=True)
class StageSpec:
    kind: str                                   # generate | finetune | eval | ...
    summary: str                                # one line for --help and reports
    launch: tuple[str, ...]                     # ("python", "-m", module) or ("accelerate", "launch", script)
    parse: Callable[[list[str]], Any]           # the stage's own settings parser (argv after the launch part)
    folder: type[RunFolder]                     # the layout of its output folder
    default_config: str                         # repository-relative YAML used when a study names none
    model_key: str | None = None                # the setting the study's `model` fills (model under study)
    artifact: Callable[[RunFolder, Any], Path] = _folder  # what "@node" gives a consumer (folder, parsed config)
    inputs: Callable[[Any], list[Path]] = _nothing     # files (besides its config) whose contents key a run
    check: Callable[[Any], None] = _no_check           # deeper checks before any stage runs (raise ConfigError)
    verify: Callable[[RunFolder], None] = _no_check    # a finished run still intact before it is reused
    records: dict[str, type[Record]] = field(default_factory=dict)  # file name in its folder -> typed record
    carry_over: tuple[str, ...] = ()                  # content-keyed files a rerun with new settings may reuse

    def command(self, config_file: str, settings: dict[str, Any], launch_args: list[str] | None = None) -> list[str]:
        """The stage's command line: launcher (+ its arguments) + ``--config FILE`` + ``--key value`` settings.

        ``python`` and ``accelerate`` stand for this interpreter and its accelerate CLI; ``launch_args`` go
        right after ``accelerate launch`` (its --config_file, --num_processes...)."""
        head = list(self.launch)
        if head[:2] == ["accelerate", "launch"]:
            head = [*head[:2], *(launch_args or []), *head[2:]]
        elif launch_args:
            raise ValueError(f"stage {self.kind} is not started with accelerate; it takes no launch arguments")
        return [*head, "--config", config_file, *to_cli(settings)]

    def read(self, folder: Path, name: str) -> Record:
        """One of the stage's typed records from a finished run's folder (``name`` e.g. 'stats.json')."""
        return self.records[name].read(Path(folder) / name)
