"""The document plan: which (fact, type, idea, copy) items to write, in which order.

Document types are compared without regard to case: "News article" and "news article" are
one type, spelled as it was first met (in fact order, brainstormed types before catalogue
ones), so per-type counts and prompts never split a type in two.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from studykit.universe import KeyFact


@dataclass
class PlanItem:
    index: int
    fact: KeyFact
    doc_type: str
    idea: str
    copy: int

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.fact.id}|{self.doc_type}|{self.idea}|{self.copy}".encode()).hexdigest()[:12]


def type_key(doc_type: str) -> str:
    """What makes two document types the same type: their words, ignoring case and spacing."""
    return " ".join(doc_type.casefold().split())


def unify_spellings(types_per_fact: list[list[str]]) -> list[list[str]]:
    """Each fact's types, spelled as the type was first spelled across all facts (in the order given)."""
    first: dict[str, str] = {}
    for types in types_per_fact:
        for t in types:
            first.setdefault(type_key(t), t)
    return [[first[type_key(t)] for t in types] for types in types_per_fact]


def interleave(pairs: list[tuple[KeyFact, str]], ideas: list[list[str]], copies: int, start: int = 0) -> list[PlanItem]:
    """Round-robin over (fact, type) pairs so any prefix of the plan is balanced across facts and types."""
    order: list[tuple[KeyFact, str, str, int]] = []
    depth = max((len(i) for i in ideas), default=0)
    for copy in range(copies):
        for k in range(depth):
            for (fact, doc_type), pair_ideas in zip(pairs, ideas, strict=True):
                if k < len(pair_ideas):
                    order.append((fact, doc_type, pair_ideas[k], copy))
    # facts are listed pair by pair above; rotate so consecutive items alternate facts
    by_fact: dict[str, list[tuple[KeyFact, str, str, int]]] = {}
    for row in order:
        by_fact.setdefault(row[0].id, []).append(row)
    queues = list(by_fact.values())
    merged: list[tuple[KeyFact, str, str, int]] = []
    while any(queues):
        for q in queues:
            if q:
                merged.append(q.pop(0))
    return [PlanItem(start + i, f, t, idea, c) for i, (f, t, idea, c) in enumerate(merged)]
