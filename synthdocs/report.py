"""``report.md`` of a generator run, rendered from its typed ``stats.json`` (``CorpusStats``)."""

from __future__ import annotations

from studykit.textfmt import pct
from synthdocs.stats import CorpusStats, Entity

_JUDGES = {
    "lexical": "**Answered by keyword screens, not by an LLM judge** (judge: lexical): no capable judge model is "
               "configured, so these rates measure only blatant cases (dialogue lines, explicit phrases, fact-word "
               "overlap). Configure judge: generator or judge: endpoint with a capable model for the original "
               "study's LLM classifiers.",
    "generator": "Answered by the generator model (judge: generator).",
}


def render_report(stats: CorpusStats) -> str:
    lines = [
        f"# Synthetic documents: universe `{stats.universe}`",
        "",
        f"Generator: `{stats.generator}`. Stopped because: {stats.stop_reason}.",
        "",
        *_counts(stats),
        *_filters(stats),
        *_corpus(stats),
        *_diversity(stats),
        *_usage(stats),
    ]
    return "\n".join(lines)


def _counts(stats: CorpusStats) -> list[str]:
    c = stats.counts
    return [
        "## Counts per stage",
        "",
        "| stage | count |",
        "|---|---:|",
        f"| key facts | {c.facts} |",
        f"| document types (distinct, case-insensitive) | {c.doc_types} |",
        f"| (fact, document type) pairs | {c.fact_type_pairs} |",
        f"| ideas | {c.ideas} |",
        f"| documents planned | {c.planned} |",
        f"| documents generated | {c.generated} |",
        f"| removed | {c.removed} ({pct(stats.removal_rate)}) |",
        f"| **accepted** | **{c.accepted}** |",
        "",
        "## Removals by reason",
        "",
        "| reason | documents |",
        "|---|---:|",
        *[f"| {reason} | {n} |" for reason, n in stats.removed_by_reason.items()],
        "",
        "Every removed document is in `removed.jsonl` with its full reason.",
        "",
    ]


def _judge_line(stats: CorpusStats) -> str:
    if stats.filter_judge == "endpoint":
        return (f"Answered by `{stats.config.get('judge_model')}` at `{stats.config.get('judge_base_url')}` "
                "(judge: endpoint).")
    return _JUDGES[stats.filter_judge]


def _filters(stats: CorpusStats) -> list[str]:
    return [
        "## LLM filters",
        "",
        "Yes/no classifiers over each document that passed the structural checks. The three classifiers remove "
        "a document on *yes*; the coverage check removes it on *no*. " + _judge_line(stats),
        "",
        "| filter | evaluated | flagged | undecided | rate |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {f.evaluated} | {f.flagged} | {f.undecided} | {pct(f.rate)} |"
          for name, f in stats.filters.items()],
        "",
        f"Near-duplicates removed (MinHash, threshold {stats.dedup.threshold}): {stats.dedup.removed}.",
        "",
    ]


def _corpus(stats: CorpusStats) -> list[str]:
    corpus = stats.corpus
    return [
        "## Corpus",
        "",
        f"{corpus.documents} documents, {corpus.tokens:,} tokens (cl100k_base), {corpus.mean_tokens} tokens per "
        "document on average.",
        "",
        "| fact | documents |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in stats.diversity.per_fact.items()],
        "",
    ]


def _names(entities: list[Entity]) -> str:
    return ", ".join(f"{e.entity} ({pct(e.share)})" for e in entities[:10]) or "none"


def _diversity(stats: CorpusStats) -> list[str]:
    d = stats.diversity
    return [
        "## Diversity",
        "",
        f"distinct-1 {d.distinct_1}, distinct-2 {d.distinct_2}, distinct-3 {d.distinct_3}.",
        "",
        "Most frequent invented names (share of documents): " + _names(d.top_entities),
        "",
        "Names from the universe's own text (expected to recur; not counted as invented): "
        + _names(d.world_entities),
        "",
        "Documents per type: " + ", ".join(f"{k} {v}" for k, v in list(d.per_type.items())[:15]),
        "",
        *([f"**Warning:** {w}" for w in d.warnings] or ["No mode-collapse warning."]),
        "",
    ]


def _usage(stats: CorpusStats) -> list[str]:
    usage, thr = stats.usage, stats.throughput
    faults = ", ".join(f"{kind} {n}" for kind, n in usage.faults.items()) or "none"
    return [
        "## Tokens, cost and throughput",
        "",
        "Every model call of the run: the generator's and, with judge: endpoint, the judge's.",
        "",
        f"- model calls made: {usage.calls} (replayed from cache: {usage.cache_hits}); retries {usage.retries}; "
        f"failed calls {usage.failures}; faults seen: {faults}",
        f"- tokens: {usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion "
        f"({usage.estimated_tokens:,} estimated with tiktoken where the server reported none)",
        f"- cost: ${usage.cost_usd:.4f}",
        f"- wall time {thr.elapsed_s} s; {thr.generated_tokens_per_s} generated tokens/s; "
        f"{thr.documents_per_min} accepted documents/min; peak concurrency {usage.peak_concurrency}",
        "",
    ]
