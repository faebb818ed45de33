"""Corpus diversity statistics and the mode-collapse warning.

Synthetic corpora tend to collapse onto a few invented names or phrasings (one name can
end up in a large share of all documents). We measure distinct-n (unique n-grams / all
n-grams across the corpus), the most frequent invented entities (capitalised word runs
that are not sentence-initial, excluding the universe's own names) and the documents per
type and fact, and warn when one entity appears in more than ``max_entity_share`` of the
documents or distinct-2 falls below ``min_distinct2``. Names the universe's own text uses
(its city, its regulators) are expected in many documents: ``world_text`` lists them as
``world_entities`` instead of counting them as invented.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

_TOKEN = re.compile(r"\w+")
_ENTITY = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-z]+(?:\s+[A-Z][a-z]+){0,2})\b", re.MULTILINE)
_COMMON = frozenset(
    ["The", "This", "That", "These", "Those", "It", "In", "On", "At", "For", "And", "But", "Or", "If", "When", "While", "After", "Before", "During", "As", "I", "We", "You", "He", "She", "They", "My", "Our", "Your", "His", "Her", "Their", "A", "An", "Mr", "Mrs", "Ms", "Dr", "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
)


def distinct_n(texts: list[str], n: int) -> float:
    total, unique = 0, set()
    for t in texts:
        toks = _TOKEN.findall(t.lower())
        grams = list(zip(*(toks[i:] for i in range(n)), strict=False))
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def entities(text: str, exclude: set[str]) -> set[str]:
    found = set()
    for m in _ENTITY.finditer(text):
        name = m.group(1)
        first = name.split()[0]
        if first in _COMMON or name in exclude or any(name in e or e in name for e in exclude):
            continue
        found.add(name)
    return found


def diversity_stats(
    docs: list[dict[str, Any]], exclude_names: list[str], *, world_text: str = "", top_k: int = 15,
    max_entity_share: float = 0.2, min_distinct2: float = 0.25,
) -> dict[str, Any]:
    texts = [d["text"] for d in docs]
    exclude = {n for name in exclude_names for n in (name, *name.split()) if len(n) > 2}
    world = entities(world_text, exclude) if world_text else set()
    doc_freq: Counter = Counter()
    world_freq: Counter = Counter()
    for t in texts:
        found = entities(t, exclude)
        doc_freq.update(found - world)
        world_freq.update(found & world)
    n = len(texts)

    def ranked(freq: Counter) -> list[dict[str, Any]]:
        return [{"entity": e, "documents": c, "share": round(c / n, 4)} for e, c in freq.most_common(top_k)] if n else []

    top = ranked(doc_freq)
    stats: dict[str, Any] = {
        "documents": n,
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "distinct_3": round(distinct_n(texts, 3), 4),
        "top_entities": top,
        "world_entities": ranked(world_freq),
        "per_type": dict(Counter(d["doc_type"] for d in docs).most_common()),
        "per_fact": dict(Counter(d["fact_id"] for d in docs).most_common()),
        "warnings": [],
    }
    if n >= 20 and top and top[0]["share"] > max_entity_share:
        stats["warnings"].append(
            f"possible mode collapse: the invented name '{top[0]['entity']}' appears in {top[0]['share']:.0%} of "
            f"documents (limit {max_entity_share:.0%}); raise seed variety or prompt diversity"
        )
    if n >= 20 and stats["distinct_2"] < min_distinct2:
        stats["warnings"].append(
            f"low lexical diversity: distinct-2 = {stats['distinct_2']:.2f} < {min_distinct2}"
        )
    return stats
