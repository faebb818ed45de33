"""The generation stage's contract with the study (see studykit/stage.py)."""

from __future__ import annotations

from pathlib import Path

from studykit.handoff import CorpusFolder
from studykit.stage import StageSpec
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
