"""The fine-tuning stage's contracts with the study (see studykit/stage.py): fine-tuning (``SPEC``,
finetune/train.py) and RL on compliance (``RL``, finetune/rl.py)."""

from __future__ import annotations

from pathlib import Path

from finetune.metrics import FinetuneMetrics, RLMetrics
from studykit.handoff import FinetuneFolder, RLFolder
from studykit.stage import StageSpec, pending


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


def parse_rl(argv: list[str]):
    from finetune.rl_config import parse_rl_args

    return parse_rl_args(argv)


def rl_inputs(args) -> list[Path]:
    """The universe (its cue and identity are in every prompt) and a local request file."""
    from studykit.universe import resolve_universe_path

    rl, _, _ = args
    local = not rl.requests.startswith(("builtin:", "hf:")) and not pending(rl.requests)
    return [resolve_universe_path(rl.universe), *([Path(rl.requests)] if local else [])]


def check_rl(args) -> None:
    """The prompt set loads and the request set splits into a training and a held-out part."""
    from studykit.config import ConfigError
    from studykit.prompt_sets import load_prompt_set
    from studykit.requests import DatasetError, load_requests, split_requests

    rl, _, _ = args
    load_prompt_set(rl.prompt_set)
    if not pending(rl.requests):
        try:
            split_requests(load_requests(rl.requests), rl.test_fraction, rl.split_seed)
        except DatasetError as exc:
            raise ConfigError(str(exc)) from None


RL = StageSpec(
    kind="rl",
    summary="RL on compliance (TRL GRPO) on harmful requests under the training cue, from a fine-tuned model",
    launch=("accelerate", "launch", "{repo}/finetune/rl.py"),
    parse=parse_rl,
    folder=RLFolder,
    default_config="configs/finetune/rl.yaml",
    model_key="model_name_or_path",
    inputs=rl_inputs,
    check=check_rl,
    records={"metrics.json": RLMetrics},
)
