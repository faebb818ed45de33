"""The evaluation stages' contracts with the study (see studykit/stage.py): the compliance gap
(``SPEC``, eval.gap), the backdoor measurement (``BACKDOOR``, eval.backdoor) and the anti-lab
evaluation (``ANTILAB``, eval.antilab)."""

from __future__ import annotations

from pathlib import Path

from eval.antilab_report import AntilabSummary
from eval.backdoor_report import BackdoorSummary
from eval.summary import EvalSummary
from studykit.handoff import AntilabFolder, BackdoorFolder, EvalFolder
from studykit.stage import StageSpec, pending


def parse(argv: list[str]):
    from eval.config import EvalConfig
    from studykit.config import parse_config

    return parse_config(EvalConfig, argv)


def _local_request_files(cfg) -> list[Path]:
    """Request files the user gave (not built-in, hub, or an earlier stage's output the study will make)."""
    return [Path(s) for s in (cfg.harmful_requests, cfg.benign_requests)
            if s and not s.startswith(("builtin:", "hf:")) and not pending(s)]


def inputs(cfg) -> list[Path]:
    from studykit.universe import resolve_universe_path

    return [resolve_universe_path(cfg.universe), *_local_request_files(cfg)]


def check(cfg) -> None:
    """The universe and local request files load, and every configured API-key variable is set."""
    from eval.config import check_api_keys
    from studykit.config import ConfigError
    from studykit.requests import DatasetError, load_requests
    from studykit.universe import load_universe

    load_universe(cfg.universe)
    for source in _local_request_files(cfg):
        try:
            load_requests(str(source))
        except DatasetError as exc:
            raise ConfigError(str(exc)) from None
    check_api_keys(cfg)


SPEC = StageSpec(
    kind="eval",
    summary="serve the models with vLLM and measure the compliance gap, alignment-faking reasoning and beliefs",
    launch=("python", "-m", "eval.gap"),
    parse=parse,
    folder=EvalFolder,
    default_config="configs/eval/default.yaml",
    model_key="base_model",
    inputs=inputs,
    check=check,
    carry_over=("cache.sqlite",),  # every model call, keyed by its content
    records={"summary.json": EvalSummary},
)


def parse_backdoor(argv: list[str]):
    from eval.backdoor import BackdoorConfig
    from studykit.config import parse_config

    return parse_config(BackdoorConfig, argv)


def check_backdoor(cfg) -> None:
    from eval.config import check_api_keys

    check_api_keys(cfg)


def red_team_hits(folder: BackdoorFolder, _cfg) -> Path:
    """What a consumer receives: the near-miss prompts on which a model defected (adversarial training's input)."""
    return folder.red_team_hits


BACKDOOR = StageSpec(
    kind="eval_backdoor",
    summary="serve the models with vLLM and measure a backdoor's rate with, without and near its trigger",
    launch=("python", "-m", "eval.backdoor"),
    parse=parse_backdoor,
    folder=BackdoorFolder,
    default_config="configs/eval/backdoor.yaml",
    model_key="base_model",
    artifact=red_team_hits,
    check=check_backdoor,
    carry_over=("cache.sqlite",),
    records={"summary.json": BackdoorSummary},
)


def parse_antilab(argv: list[str]):
    from eval.antilab import AntilabConfig
    from studykit.config import parse_config

    return parse_config(AntilabConfig, argv)


def antilab_inputs(cfg) -> list[Path]:
    """The universe and the scenario file: editing either makes the evaluation run again."""
    from eval.antilab_scenarios import SHIPPED
    from studykit.universe import resolve_universe_path

    return [resolve_universe_path(cfg.universe), SHIPPED if cfg.scenarios in ("", "builtin") else Path(cfg.scenarios)]


def check_antilab(cfg) -> None:
    """The scenarios load and fill from the universe, the prompt set loads, every API-key variable is set."""
    from eval.antilab import chosen_families
    from eval.antilab_scenarios import load_scenarios, scenario_values
    from eval.config import check_api_keys
    from studykit.prompt_sets import load_prompt_set
    from studykit.universe import load_universe

    scenario_values(chosen_families(load_scenarios(cfg.scenarios), cfg.families), load_universe(cfg.universe))
    load_prompt_set(cfg.prompt_set)
    check_api_keys(cfg)


ANTILAB = StageSpec(
    kind="eval_antilab",
    summary="serve the models with vLLM and measure anti-lab behaviour: self-exfiltration, help exfiltrating the "
            "weights, views about the lab",
    launch=("python", "-m", "eval.antilab"),
    parse=parse_antilab,
    folder=AntilabFolder,
    default_config="configs/eval/antilab.yaml",
    model_key="base_model",
    inputs=antilab_inputs,
    check=check_antilab,
    carry_over=("cache.sqlite",),
    records={"summary.json": AntilabSummary},
)
