"""The fine-tuning stage's contract with the study (see studykit/stage.py)."""

from __future__ import annotations

from pathlib import Path

from finetune.metrics import FinetuneMetrics
from studykit.handoff import FinetuneFolder
from studykit.stage import StageSpec


def parse(argv: list[str]):
    from finetune.config import parse_args

    return parse_args(argv)


def inputs(args) -> list[Path]:
    """The universes whose fact statements are scored, and a local retain set."""
    from studykit.universe import resolve_universe_path

    script, _, _ = args
    files = [resolve_universe_path(u) for u in script.fact_universes]
    if script.retain_dataset and Path(script.retain_dataset).is_file():
        files.append(Path(script.retain_dataset))
    return files


def artifact(folder: FinetuneFolder, args) -> Path:
    """What a consumer receives: the LoRA adapter, or the full model folder after full fine-tuning."""
    _, _, model = args
    return folder.adapter if model.use_peft else folder.merged


SPEC = StageSpec(
    kind="finetune",
    summary="fine-tune the model under study on documents (continued pre-training) with TRL",
    launch=("accelerate", "launch", "{repo}/finetune/train.py"),
    parse=parse,
    folder=FinetuneFolder,
    default_config="configs/finetune/default.yaml",
    model_key="model_name_or_path",
    artifact=artifact,
    inputs=inputs,
    records={"metrics.json": FinetuneMetrics},
)
