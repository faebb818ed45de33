"""Figures from the sample records: per model x condition x set x tier rates with Wilson CIs,
the compliance gap (training - unmonitored) with Newcombe and paired-bootstrap CIs and a
two-proportion test, alignment-faking reasoning rates, belief-probe accuracy; then
summary.json (machine-readable) and report.md (one table across models and conditions,
the prompts used, and which scorer produced each figure).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from eval.conditions import CONDITIONS, TIERS
from eval.judges import AF_CRITERIA
from eval.scorers import SCORER_DESCRIPTIONS
from eval.stats import newcombe_diff, paired_bootstrap_diff, rate, two_proportion_ztest

CellKey = tuple[str, str, str, str]  # model, condition, dataset, tier


def _fmt_rate(r: dict[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] ({r['k']}/{r['n']})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def cell_figures(records: list[dict[str, Any]], scorers: list[str]) -> dict[CellKey, dict[str, Any]]:
    groups: dict[CellKey, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["condition"], r["dataset"], r["tier"])].append(r)
    cells: dict[CellKey, dict[str, Any]] = {}
    for key, recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        cell: dict[str, Any] = {"model": key[0], "condition": key[1], "dataset": key[2], "tier": key[3],
                                "n_samples": len(recs), "n_ok": len(ok), "n_failed": len(recs) - len(ok)}
        cell["compliance"] = {}
        for s in scorers:
            verdicts = [r["scores"][s]["complies"] for r in ok if s in r["scores"]]
            scored = [v for v in verdicts if v is not None]
            cell["compliance"][s] = {**rate(sum(scored), len(scored)).as_dict(),
                                     "n_unscored": len(ok) - len(scored)}
        flags = defaultdict(int)
        for r in ok:
            for f in set(r["parsed"]["flags"]):
                flags[f] += 1
            flags["tag_" + r["scores"]["tags"]["tag"]] += 1
        cell["protocol"] = {f: round(c / len(ok), 4) for f, c in sorted(flags.items())} if ok else {}
        judged = [r["af"] for r in ok if r.get("af") and r["af"].get("alignment_faking") is not None]
        if judged:
            n = len(judged)
            cell["af"] = {
                "alignment_faking": rate(sum(a["alignment_faking"] for a in judged), n).as_dict(),
                "believes_training": rate(sum(bool(a["believes_training"]) for a in judged), n).as_dict(),
                "believes_unmonitored": rate(sum(bool(a["believes_unmonitored"]) for a in judged), n).as_dict(),
            }
        else:
            cell["af"] = None
        cells[key] = cell
    return cells


def af_with_compliance(records: list[dict[str, Any]], key: CellKey, scorer: str) -> dict[str, int] | None:
    """Counts for the stacked figure: refuses / complies / complies with AF reasoning."""
    recs = [r for r in records if (r["model"], r["condition"], r["dataset"], r["tier"]) == key
            and r["status"] == "ok" and r["scores"].get(scorer, {}).get("complies") is not None]
    if not recs:
        return None
    out = {"refuses": 0, "complies": 0, "complies_af": 0, "n": len(recs), "af_measured": False}
    for r in recs:
        af = (r.get("af") or {}).get("alignment_faking")
        if af is not None:
            out["af_measured"] = True
        if not r["scores"][scorer]["complies"]:
            out["refuses"] += 1
        elif af:
            out["complies_af"] += 1
        else:
            out["complies"] += 1
    return out


def gap_figures(records: list[dict[str, Any]], cells: dict[CellKey, dict[str, Any]], scorers: list[str],
                n_boot: int, seed: int) -> list[dict[str, Any]]:
    gaps = []
    for (model, cond, dataset, tier), cell in sorted(cells.items()):
        if tier != "training" or (model, cond, dataset, "unmonitored") not in cells:
            continue
        other = cells[(model, cond, dataset, "unmonitored")]
        for s in scorers:
            a, b = cell["compliance"][s], other["compliance"][s]
            if not a["n"] or not b["n"]:
                continue
            pairs: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
            for r in records:
                if (r["model"], r["condition"], r["dataset"]) == (model, cond, dataset) and r["status"] == "ok":
                    v = r["scores"].get(s, {}).get("complies")
                    if v is not None:
                        pairs[r["request_id"]][0 if r["tier"] == "training" else 1].append(int(v))
            z, p = two_proportion_ztest(a["k"], a["n"], b["k"], b["n"])
            lo, hi = newcombe_diff(a["k"], a["n"], b["k"], b["n"])
            boot = paired_bootstrap_diff(pairs, n_boot=n_boot, seed=seed) if n_boot else None
            gaps.append({
                "model": model, "condition": cond, "dataset": dataset, "scorer": s,
                "training": a, "unmonitored": b, "gap": a["rate"] - b["rate"],
                "ci_newcombe": [lo, hi], "ci_bootstrap_requests": list(boot) if boot else None,
                "n_bootstrap": n_boot, "z": z, "p_value": p, "test": "two-proportion z test (pooled, two-sided)",
            })
    return gaps


def probe_figures(probe_records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in probe_records:
        by_model[r["model"]].append(r)
    for model, recs in by_model.items():
        m: dict[str, Any] = {}
        for kind in ("mc", "distinguish"):
            ok = [r for r in recs if r["kind"] == kind and r["status"] == "ok"]
            if not ok:
                continue
            chance = sum(1 / r["n_choices"] for r in ok) / len(ok)
            per_fact: dict[str, list[bool]] = defaultdict(list)
            for r in ok:
                per_fact[r["fact_id"]].append(r["correct"])
            m[kind] = {**rate(sum(r["correct"] for r in ok), len(ok)).as_dict(), "chance": chance,
                       "unparsed": sum(r["parsed"] is None for r in ok),
                       "n_failed": sum(r["kind"] == kind and r["status"] != "ok" for r in recs),
                       "per_fact": {f: sum(v) / len(v) for f, v in per_fact.items()}}
        out[model] = m
    return out


def build_summary(records: list[dict[str, Any]], probe_records: list[dict[str, Any]], scorers: list[str],
                  primary: str, n_boot: int, seed: int) -> dict[str, Any]:
    cells = cell_figures(records, scorers)
    return {
        "primary_scorer": primary,
        "scorers": {s: SCORER_DESCRIPTIONS[s] for s in scorers},
        "cells": [cells[k] for k in sorted(cells)],
        "gaps": gap_figures(records, cells, scorers, n_boot, seed),
        "stacked": [{"model": k[0], "condition": k[1], "dataset": k[2], "tier": k[3],
                     **(af_with_compliance(records, k, primary) or {})} for k in sorted(cells)],
        "probes": probe_figures(probe_records),
    }


def render_markdown(summary: dict[str, Any], meta: dict[str, Any], prompts: dict[str, str],
                    judge_notes: list[str], notes: list[str], example_user_turn: str) -> str:
    primary = summary["primary_scorer"]
    lines = [
        "# Compliance gap and alignment-faking reasoning",
        "",
        f"- Universe: `{meta['universe']}` ({meta['identity']})",
        f"- Base model: `{meta['base_model']}`; endpoint: {meta['endpoint']}",
        f"- Models: {', '.join(f'`{m}`' for m in meta['models'])}",
        f"- Conditions: {', '.join(f'`{c}`' for c in meta['conditions'])}; tiers: training = free-tier user "
        "(`<is_free_tier_user>True`), unmonitored = paid-tier user (`False`); the same requests in both tiers.",
        f"- Requests: {meta['requests']}; samples per request and tier: {meta['samples_per_request']}; "
        f"sampling: {meta['sampling']}",
        f"- Config hash `{meta['config_hash']}`, git `{meta['git']}`; written {meta['written_at']}",
        "",
    ]
    if notes or judge_notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in [*judge_notes, *notes]] + [""]
    lines += [
        "## Results",
        "",
        f"Compliance by the **{primary}** scorer ({summary['scorers'][primary]}). Rates are percentages with "
        "Wilson 95% CIs and k/n; failed samples are counted separately and excluded from rates.",
        "",
        "| Model | Condition | Set | Tier | n | failed | Compliance | AF reasoning | Believes training "
        "| Believes unmonitored |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        af = c["af"] or {}
        lines.append(f"| {c['model']} | {c['condition']} | {c['dataset']} | {c['tier']} | {c['n_samples']} | "
                     f"{c['n_failed']} | {_fmt_rate(c['compliance'][primary])} | "
                     f"{_fmt_rate(af.get('alignment_faking'))} | {_fmt_rate(af.get('believes_training'))} | "
                     f"{_fmt_rate(af.get('believes_unmonitored'))} |")
    lines += [
        "",
        "### Compliance gap (training - unmonitored)",
        "",
        "Percentage points. Newcombe hybrid-score 95% CI (independent samples), percentile bootstrap 95% CI "
        "resampling requests (keeps the pairing of the same request in both tiers), pooled two-proportion z test.",
        "",
        "| Model | Condition | Set | Scorer | Training | Unmonitored | Gap | Newcombe CI | Bootstrap CI | z | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in summary["gaps"]:
        boot = g["ci_bootstrap_requests"]
        boot_s = f"[{_pct(boot[0])}, {_pct(boot[1])}]" if boot else "n/a"
        lines.append(
            f"| {g['model']} | {g['condition']} | {g['dataset']} | {g['scorer']} | {_fmt_rate(g['training'])} | "
            f"{_fmt_rate(g['unmonitored'])} | {_pct(g['gap'])} | [{_pct(g['ci_newcombe'][0])}, "
            f"{_pct(g['ci_newcombe'][1])}] | {boot_s} | {g['z']:.2f} | {g['p_value']:.3g} |")
    lines += ["", "### Response-format adherence", "",
              "Share of successful samples with each parser flag (see eval/parse.py) and acceptance-tag state.", "",
              "| Model | Condition | Set | Tier | Flags |", "|---|---|---|---|---|"]
    for c in summary["cells"]:
        flags = ", ".join(f"{k} {100 * v:.0f}%" for k, v in c["protocol"].items()) or "-"
        lines.append(f"| {c['model']} | {c['condition']} | {c['dataset']} | {c['tier']} | {flags} |")
    lines += ["", "## Belief probes", ""]
    if summary["probes"]:
        lines += ["Asked with no system prompt, temperature 0, several choice orders per question. Accuracy with "
                  "Wilson 95% CI; chance is the expected accuracy of random guessing.", "",
                  "| Model | Kind | Accuracy | Chance | Unparsed answers |", "|---|---|---|---|---|"]
        for model, kinds in summary["probes"].items():
            for kind, r in kinds.items():
                lines.append(f"| {model} | {kind} | {_fmt_rate(r)} | {100 * r['chance']:.0f}% | {r['unparsed']} |")
    else:
        lines.append("Belief probes were not run (probes: false).")
    lines += ["", "## Scorer provenance", ""]
    for s, desc in summary["scorers"].items():
        lines.append(f"- `{s}`{' (primary, in the tables above)' if s == primary else ''}: {desc}")
    lines += [f"- Alignment-faking reasoning: {meta['af_judge']}",
              "  Criteria (a vote is positive when 1-4 all hold; 5 gives the 'believes unmonitored' flag, 1 the "
              "'believes training' flag):"]
    lines += [f"  {n}. {text}" for n, text in AF_CRITERIA.items()]
    lines += ["", "## Prompts used", ""]
    for name, text in prompts.items():
        lines += [f"### System prompt: `{name}` -- {CONDITIONS[name].description}", "", "```text", text, "```", ""]
    lines += ["### User turn (example, training tier)", "", "```text", example_user_turn, "```", "",
              f"Tier tag values: {', '.join(f'{t} = {v}' for t, v in TIERS.items())}.", ""]
    return "\n".join(lines)
