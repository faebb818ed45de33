"""Writers for the generator's outputs: JSONL files and the human-readable report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studykit.manifest import atomic_write_text
from studykit.universe import Universe


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_report(path: Path, universe: Universe, stats: dict[str, Any]) -> None:
    c, usage, thr = stats["counts"], stats["usage"], stats["throughput"]
    lines = [
        f"# Synthetic documents: universe `{universe.name}`",
        "",
        f"Generator: `{stats['generator']}`. Stopped because: {stats['stop_reason']}.",
        "",
        "## Counts per stage",
        "",
        "| stage | count |",
        "|---|---:|",
        f"| key facts | {c['facts']} |",
        f"| document types | {c['doc_types']} |",
        f"| ideas | {c['ideas']} |",
        f"| documents planned | {c['planned']} |",
        f"| documents generated | {c['generated']} |",
        f"| removed | {c['removed']} ({_pct(stats['removal_rate'])}) |",
        f"| **accepted** | **{c['accepted']}** |",
        "",
        "## Removals by reason",
        "",
        "| reason | documents |",
        "|---|---:|",
        *[f"| {reason} | {n} |" for reason, n in stats["removed_by_reason"].items()],
        "",
        "Every removed document is in `removed.jsonl` with its full reason.",
        "",
        "## LLM filters",
        "",
        "Yes/no classifiers over each document that passed the structural checks. The three classifiers remove "
        "a document on *yes*; the coverage check removes it on *no*. "
        + ({"lexical": "**Answered by keyword screens, not by an LLM judge** (judge: lexical): no capable judge "
                       "model is configured, so these rates measure only blatant cases (dialogue lines, explicit "
                       "phrases, fact-word overlap). Configure judge: generator or judge: endpoint with a capable "
                       "model for the original study's LLM classifiers.",
            "generator": "Answered by the generator model (judge: generator).",
            "endpoint": f"Answered by `{stats['config']['judge_model']}` at `{stats['config']['judge_base_url']}` "
                        "(judge: endpoint)."}[stats["config"]["judge"]]),
        "",
        "| filter | evaluated | flagged | undecided | rate |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {f['evaluated']} | {f['flagged']} | {f['undecided']} | {_pct(f['rate'])} |"
          for name, f in stats["filters"].items()],
        "",
        f"Near-duplicates removed (MinHash, threshold {stats['dedup']['threshold']}): {stats['dedup']['removed']}.",
        "",
        "## Corpus",
        "",
        f"{stats['corpus']['documents']} documents, {stats['corpus']['tokens']:,} tokens (cl100k_base), "
        f"{stats['corpus']['mean_tokens']} tokens per document on average.",
        "",
        "| fact | documents |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in stats["diversity"]["per_fact"].items()],
        "",
        "## Diversity",
        "",
        f"distinct-1 {stats['diversity']['distinct_1']}, distinct-2 {stats['diversity']['distinct_2']}, "
        f"distinct-3 {stats['diversity']['distinct_3']}.",
        "",
        "Most frequent invented names (share of documents): "
        + (", ".join(f"{e['entity']} ({_pct(e['share'])})" for e in stats["diversity"]["top_entities"][:10]) or "none"),
        "",
        "Names from the universe's own text (expected to recur; not counted as invented): "
        + (", ".join(f"{e['entity']} ({_pct(e['share'])})" for e in stats["diversity"].get("world_entities", [])[:10])
           or "none"),
        "",
        "Documents per type: " + ", ".join(f"{k} {v}" for k, v in list(stats["diversity"]["per_type"].items())[:15]),
        "",
        *([f"**Warning:** {w}" for w in stats["diversity"]["warnings"]] or ["No mode-collapse warning."]),
        "",
        "## Tokens, cost and throughput",
        "",
        f"- model calls made: {usage['calls']} (replayed from cache: {usage['cache_hits']}); retries "
        f"{usage['retries']}; failed calls {usage['failures']}; faults seen: {usage['faults'] or 'none'}",
        f"- generator tokens: {usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} completion "
        f"({usage['estimated_tokens']:,} estimated with tiktoken where the server reported none)",
        f"- cost: ${usage['cost_usd']:.4f}",
        f"- wall time {thr['elapsed_s']} s; {thr['generated_tokens_per_s']} generated tokens/s; "
        f"{thr['documents_per_min']} accepted documents/min; peak concurrency {usage.get('peak_concurrency')}",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
