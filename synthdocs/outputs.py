"""What a finished generator run writes into its ``CorpusFolder``.

documents.jsonl, dataset/ (the same records as an HF ``datasets`` folder), removed.jsonl,
stats.json (``CorpusStats``), report.md (rendered from it) and, last, manifest.json: its
presence marks the run complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from studykit.files import atomic_write_text
from studykit.handoff import CorpusFolder, Usage, sha256_file
from studykit.jsonl import write_jsonl
from studykit.manifest import build_manifest
from studykit.universe import Universe
from synthdocs.config import GenerateConfig
from synthdocs.diversity import diversity_stats
from synthdocs.pipeline import Outcome
from synthdocs.plan import type_key
from synthdocs.report import render_report
from synthdocs.stats import CorpusSize, CorpusStats, Counts, Dedup, FilterRate, Throughput

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """How the run went, beside its outcome: what it called, how long it took, what the cache held."""

    generator_model: str        # what identifies the generator in cache keys: served weights or endpoint|model
    usage: Usage
    started_at: str
    elapsed_s: float
    cache: dict[str, int]       # entries_before, entries_after, hits, new_calls


def write_outputs(folder: CorpusFolder, cfg: GenerateConfig, universe: Universe, outcome: Outcome,
                  run: RunRecord) -> CorpusStats:
    """Write every output of the run; the manifest last."""
    write_jsonl(folder.documents, outcome.accepted)
    write_jsonl(folder.removed, outcome.removed)
    save_dataset(outcome.accepted, folder.dataset)
    stats = build_stats(cfg, universe, outcome, run)
    for warning in stats.diversity.warnings:
        log.warning(warning)
    stats.write(folder.stats)
    atomic_write_text(folder.report, render_report(stats))
    build_manifest(
        "generate", cfg, seeds={"seed": cfg.seed},
        universe=universe.name, universe_path=universe.path, generator_model=run.generator_model,
        documents_sha256=sha256_file(folder.documents), n_documents=stats.corpus.documents,
        n_tokens=stats.corpus.tokens, usage=run.usage.model_dump(), timings=stats.timings,
        started_at=run.started_at,
    ).write(folder.manifest)
    return stats


def save_dataset(docs: list[dict[str, Any]], path: Path) -> None:
    import datasets

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [{k: v for k, v in d.items() if k != "filters"} | {"filters": json.dumps(d.get("filters", {}))}
            for d in docs]
    # an empty corpus still gets a loadable dataset with the standard text column: with no rows, datasets writes
    # no data file unless asked for one shard, and then cannot load the folder back
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"text": [], "id": []})
    ds.save_to_disk(str(tmp), num_shards=None if rows else 1)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def build_stats(cfg: GenerateConfig, universe: Universe, outcome: Outcome, run: RunRecord) -> CorpusStats:
    accepted, removed = outcome.accepted, outcome.removed
    tokens = sum(d["n_tokens"] for d in accepted)
    world_text = "\n".join([universe.description, universe.summary, *(f.statement for f in universe.key_facts)])
    elapsed = run.elapsed_s
    return CorpusStats(
        universe=universe.name,
        generator=cfg.generator,
        counts=_counts(outcome),
        stop_reason=outcome.stop_reason,
        removed_by_reason=dict(Counter(reason_kind(r["removed"]) for r in removed).most_common()),
        removal_rate=round(len(removed) / max(outcome.generated, 1), 4),
        filters={name: _filter_rate(c) for name, c in outcome.filter_counts.items()},
        filter_judge=cfg.judge,
        dedup=Dedup(threshold=cfg.dedup_threshold, removed=sum(1 for r in removed if "duplicate_of" in r)),
        corpus=CorpusSize(documents=len(accepted), tokens=tokens, mean_tokens=round(tokens / max(len(accepted), 1), 1)),
        doc_types=outcome.doc_types,
        brainstorm_failures=outcome.brainstorm_failures,
        diversity=diversity_stats(accepted, [universe.lab_name, universe.model_name], world_text=world_text,
                                  max_entity_share=cfg.max_entity_share),
        usage=run.usage,
        cache=run.cache,
        throughput=Throughput(
            elapsed_s=round(elapsed, 1),
            generated_tokens_per_s=round(run.usage.completion_tokens / elapsed, 1) if elapsed else None,
            documents_per_min=round(60 * len(accepted) / elapsed, 2) if elapsed else None),
        timings={k: round(v, 1) for k, v in {"total_s": elapsed, **outcome.timings}.items()},
        config=asdict(cfg),
    )


def _counts(outcome: Outcome) -> Counts:
    return Counts(
        facts=len(outcome.doc_types),
        doc_types=len({type_key(t) for types in outcome.doc_types.values() for t in types}),
        fact_type_pairs=sum(len(types) for types in outcome.doc_types.values()),
        ideas=outcome.ideas, planned=outcome.planned, generated=outcome.generated,
        removed=len(outcome.removed), accepted=len(outcome.accepted),
    )


def _filter_rate(c: Counter) -> FilterRate:
    return FilterRate(evaluated=c["evaluated"], flagged=c["flagged"], undecided=c["undecided"],
                      rate=round(c["flagged"] / c["evaluated"], 4) if c["evaluated"] else None)


def reason_kind(reason: str) -> str:
    """Group removal reasons ('too short: 12 words < 80' -> 'too short')."""
    if reason.startswith("near-duplicate"):
        return "near-duplicate"
    for sep in (":", " ("):
        if sep in reason:
            reason = reason.split(sep)[0]
    return reason.strip()
