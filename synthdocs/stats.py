"""``stats.json`` of a generator run: counts per stage, removals, filters, diversity, tokens, calls.

Written by ``synthdocs.generate`` through ``CorpusStats.write``; read by the study report and
the tests through ``CorpusStats.read``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from studykit.handoff import Record, Usage


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counts(_Part):
    facts: int
    doc_types: int
    ideas: int
    planned: int
    generated: int
    removed: int
    accepted: int


class CorpusSize(_Part):
    documents: int
    tokens: int
    mean_tokens: float


class FilterRate(_Part):
    evaluated: int
    flagged: int
    undecided: int
    rate: float | None


class Entity(_Part):
    entity: str
    documents: int
    share: float


class Diversity(_Part):
    documents: int
    distinct_1: float
    distinct_2: float
    distinct_3: float
    top_entities: list[Entity]
    world_entities: list[Entity]
    per_type: dict[str, int]
    per_fact: dict[str, int]
    warnings: list[str]


class CorpusStats(Record):
    WRITTEN_BY: ClassVar[str] = "the generator (python -m synthdocs.generate)"
    record: Literal["corpus_stats"] = "corpus_stats"
    schema_version: Literal[1] = 1
    universe: str
    generator: str
    counts: Counts
    stop_reason: str
    removed_by_reason: dict[str, int]
    removal_rate: float
    filters: dict[str, FilterRate]
    filter_judge: str
    dedup: dict[str, float]
    corpus: CorpusSize
    doc_types: dict[str, list[str]]
    brainstorm_failures: list[dict[str, str]]
    diversity: Diversity
    usage: Usage
    cache: dict[str, int]
    throughput: dict[str, float | None]
    timings: dict[str, float]
    config: dict[str, Any]
