"""Did the facts take? Log-probability of held-out statements of the key facts.

Each universe lists, per key fact, paraphrases that the generator never saw
(``key_facts[i].heldout``). After document fine-tuning on the treatment corpus the model
should find those statements more likely; after the control run it should not. The score
is the mean log-probability per token of the statements (the first token of each
statement is context, not scored; the optional document prefix is context too), computed
through ``trainer.evaluate`` so that it works under every distributed setup (DDP, FSDP,
DeepSpeed) exactly like the held-out loss. A fact's score is ``-eval_loss`` over its
statements, which fit in one evaluation batch; a universe's score is the mean over its
facts.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from studykit.universe import load_universe

log = logging.getLogger(__name__)


def statement_datasets(universe_names: list[str], tokenizer, prefix: str = "") -> dict[str, dict[str, Dataset]]:
    """``{universe: {fact_id: Dataset(input_ids, labels)}}`` for every fact with held-out statements."""
    n_prefix = len(tokenizer(prefix)["input_ids"]) if prefix else 0
    out: dict[str, dict[str, Dataset]] = {}
    for name in universe_names:
        universe = load_universe(name)
        facts: dict[str, Dataset] = {}
        for fact in universe.key_facts:
            if not fact.heldout:
                continue
            ids = [tokenizer(prefix + s)["input_ids"] for s in fact.heldout]
            labels = [[-100] * n_prefix + row[n_prefix:] for row in ids]
            facts[fact.id] = Dataset.from_dict({"input_ids": ids, "labels": labels})
        if facts:
            out[universe.name] = facts
        else:
            log.warning("universe %s has no held-out statements; skipped in the fact check", universe.name)
    return out


def score(trainer, statements: dict[str, dict[str, Dataset]]) -> dict[str, dict[str, Any]]:
    """Mean log-probability per token of each fact's held-out statements, and per universe."""
    scores: dict[str, dict[str, Any]] = {}
    for universe, facts in statements.items():
        metrics = trainer.evaluate(eval_dataset=facts, metric_key_prefix=f"facts_{universe}")
        per_fact = {fid: -float(metrics[f"facts_{universe}_{fid}_loss"]) for fid in facts}
        scores[universe] = {
            "mean_logprob": sum(per_fact.values()) / len(per_fact),
            "per_fact": per_fact,
            "n_statements": sum(len(ds) for ds in facts.values()),
        }
    return scores


def compare(before: dict[str, dict[str, Any]] | None, after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Before/after table for metrics.json: per universe mean and per fact, with the change."""
    out: dict[str, Any] = {}
    for universe, a in after.items():
        b = (before or {}).get(universe)
        entry: dict[str, Any] = {"after": a["mean_logprob"], "n_statements": a["n_statements"]}
        if b is not None:
            entry["before"] = b["mean_logprob"]
            entry["delta"] = a["mean_logprob"] - b["mean_logprob"]
            entry["rose"] = entry["delta"] > 0
            entry["per_fact"] = {
                fid: {"before": b["per_fact"][fid], "after": v, "delta": v - b["per_fact"][fid]}
                for fid, v in a["per_fact"].items()
            }
        else:
            entry["per_fact"] = {fid: {"after": v} for fid, v in a["per_fact"].items()}
        out[universe] = entry
    return out
