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
    doc_types: int          # distinct document types over all facts (case-insensitive)
    fact_type_pairs: int    # (fact, document type) pairs the plan draws ideas for
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


class Dedup(_Part):
    threshold: float
    removed: int


class Throughput(_Part):
    elapsed_s: float
    generated_tokens_per_s: float | None
    documents_per_min: float | None


class Entity(_Part):
    entity: str
    documents: int
    share: float


class Diversity(_Part):
    documents: int
    distinct_1: float
    distinct_2: float
    distinct_3: float
    top_entities: list[Entity]      # invented names: capitalised runs that are not common words or the world's
    world_entities: list[Entity]    # names the universe's own text uses (expected to recur)
    per_type: dict[str, int]        # documents per type, case-insensitive (first spelling)
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
    dedup: Dedup
    corpus: CorpusSize
    doc_types: dict[str, list[str]]
    brainstorm_failures: list[dict[str, str]]
    diversity: Diversity
    usage: Usage
    cache: dict[str, int]
    throughput: Throughput
    timings: dict[str, float]
    config: dict[str, Any]
