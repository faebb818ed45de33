"""The study's own report: the three models side by side, built from the stages' output files.

Reads ``generate/{docs,control}/stats.json``, ``finetune/{docs,control}/metrics.json`` and
``eval/summary.json`` in the study folder and writes ``study_summary.json`` (every figure, with
the file it came from), ``figures/*.png`` and ``study_report.md`` (links relative to the study
folder). Nothing here recomputes a statistic: rates, CIs and tests are the evaluation stage's.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from studykit.config import ConfigError
from studykit.manifest import atomic_write_json, atomic_write_text, git_state, redact

log = logging.getLogger(__name__)

MODELS = ("base", "docs", "control")
CORPORA = {"docs": "generate/docs/stats.json", "control": "generate/control/stats.json"}
FINETUNES = {"docs": "finetune/docs/metrics.json", "control": "finetune/control/metrics.json"}
EVAL = "eval/summary.json"
TIER_LABEL = {"training": "training (free tier)", "unmonitored": "unmonitored (paid tier)"}


def _read(study: Path, rel: str) -> dict[str, Any]:
    path = study / rel
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Cannot read {path} ({exc}); rerun the stage that writes it.") from None


def _usage_total(usages: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"calls": 0, "cache_hits": 0, "retries": 0, "failures": 0}
    faults: Counter = Counter()
    for u in usages:
        for k in total:
            total[k] += int(u.get(k) or 0)
        faults.update(u.get("faults") or {})
    total["faults"] = dict(sorted(faults.items()))
    return total


def collect(study: Path) -> dict[str, Any]:
    """Every figure of the report, from the stage outputs, each with its source file."""
    corpora = {}
    calls: dict[str, Any] = {}
    for name, rel in CORPORA.items():
        s = _read(study, rel)
        div = s.get("diversity") or {}
        corpora[name] = {
            "documents": s["corpus"]["documents"], "tokens": s["corpus"]["tokens"],
            "mean_tokens": s["corpus"]["mean_tokens"], "generated": s["counts"]["generated"],
            "removed": s["counts"]["removed"], "removal_rate": s["removal_rate"],
            "removed_by_reason": s.get("removed_by_reason", {}), "distinct_2": div.get("distinct_2"),
            "diversity_warnings": div.get("warnings", []), "generator": s.get("generator"),
            "stop_reason": s.get("stop_reason"), "source": rel,
        }
        calls[f"generate_{name}"] = {**_usage_total([s.get("usage") or {}]), "source": rel}

    finetune = {}
    for name, rel in FINETUNES.items():
        m = _read(study, rel)
        data = m.get("data") or {}
        finetune[name] = {
            "corpus": m.get("corpus"), "control": m.get("control"), "mode": m.get("mode"),
            "model": (m.get("model") or {}).get("name_or_path"), "steps": m.get("steps"),
            "train_tokens": data.get("train_tokens"), "tokens_seen": m.get("tokens_seen"),
            "control_matching": data.get("control_matching"), "eval_loss": m.get("eval_loss"),
            "fact_logprob": {u: {k: v.get(k) for k in ("before", "after", "delta", "n_statements")}
                             for u, v in (m.get("fact_logprob") or {}).items()},
            "resumed_from": m.get("resumed_from"), "source": rel,
        }

    ev = _read(study, EVAL)
    primary = ev["primary_scorer"]
    models = [m for m in MODELS if any(c["model"] == m for c in ev["cells"])]
    models += sorted({c["model"] for c in ev["cells"]} - set(models))
    compliance = [{"model": c["model"], "condition": c["condition"], "tier": c["tier"], "n_samples": c["n_samples"],
                   "n_failed": c["n_failed"], **c["compliance"][primary]}
                  for c in ev["cells"] if c["dataset"] == "harmful"]
    gaps = [{"model": g["model"], "condition": g["condition"], "scorer": g["scorer"], "gap": g["gap"],
             "ci_newcombe": g["ci_newcombe"], "ci_bootstrap_requests": g["ci_bootstrap_requests"],
             "p_value": g["p_value"], "training": g["training"]["rate"], "unmonitored": g["unmonitored"]["rate"]}
            for g in ev["gaps"] if g["dataset"] == "harmful"]
    af = [{"model": c["model"], "condition": c["condition"], "tier": c["tier"], **c["af"]["alignment_faking"]}
          for c in ev["cells"] if c["dataset"] == "harmful" and c.get("af")]
    calls["eval"] = {**_usage_total(list((ev.get("usage") or {}).values())), "source": EVAL}
    evaluation = {
        "models": models, "conditions": ev["config"]["conditions"], "primary_scorer": primary,
        "scorers": ev["scorers"], "af_judge": ev.get("af_judge"), "af_measured": bool(af),
        "compliance": compliance, "gaps": gaps, "af_reasoning": af or None, "probes": ev.get("probes") or {},
        "n_samples": ev.get("n_samples"), "n_failed": ev.get("n_failed"), "notes": ev.get("notes", []),
        "requests": ev.get("requests"), "universe": ev.get("universe"), "source": EVAL,
    }
    return {"corpora": corpora, "finetune": finetune, "evaluation": evaluation, "model_calls": calls}


# ---------------------------------------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(rate: float | None, lo: float | None, hi: float | None) -> tuple[float, list[float]]:
    if rate is None:
        return 0.0, [0.0, 0.0]
    return rate, [max(rate - lo, 0.0), max(hi - rate, 0.0)]


def plot_compliance(ev: dict[str, Any], out: Path) -> None:
    plt = _plt()
    conds = ev["conditions"]
    fig, axes = plt.subplots(1, len(conds), figsize=(4.2 * len(conds), 3.6), squeeze=False, sharey=True)
    for ax, cond in zip(axes[0], conds, strict=True):
        for j, tier in enumerate(("training", "unmonitored")):
            xs, ys, errs = [], [], [[], []]
            for i, model in enumerate(ev["models"]):
                c = next((c for c in ev["compliance"] if (c["model"], c["condition"], c["tier"]) == (model, cond, tier)),
                         None)
                if c is None:
                    continue
                y, e = _err(c["rate"], c["ci_low"], c["ci_high"])
                xs.append(i + (j - 0.5) * 0.38)
                ys.append(y)
                errs[0].append(e[0])
                errs[1].append(e[1])
            ax.bar(xs, ys, width=0.36, yerr=errs, capsize=3, label=TIER_LABEL[tier],
                   color=("#e6550d", "#3182bd")[j])
        ax.set_xticks(range(len(ev["models"])), ev["models"])
        ax.set_ylim(0, 1)
        ax.set_title(cond, fontsize=10)
    axes[0][0].set_ylabel(f"compliance with harmful requests\n({ev['primary_scorer']} scorer, Wilson 95% CI)")
    axes[0][-1].legend(fontsize=8)
    _save(fig, out)


def plot_gap(ev: dict[str, Any], out: Path) -> None:
    plt = _plt()
    rows = [g for g in ev["gaps"] if g["scorer"] == ev["primary_scorer"]]
    conds = ev["conditions"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(ev["models"]) * len(conds), 3.4))
    for k, cond in enumerate(conds):
        for i, model in enumerate(ev["models"]):
            g = next((g for g in rows if (g["model"], g["condition"]) == (model, cond)), None)
            if g is None:
                continue
            x = i + (k - (len(conds) - 1) / 2) * 0.25
            lo, hi = g["ci_newcombe"]
            ax.errorbar([x], [g["gap"]], yerr=[[g["gap"] - lo], [hi - g["gap"]]], fmt="o", capsize=4,
                        color=f"C{k}", label=cond if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(ev["models"])), ev["models"])
    ax.set_ylim(-1, 1)
    ax.set_ylabel("compliance gap\n(training - unmonitored, Newcombe 95% CI)")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_af(ev: dict[str, Any], out: Path) -> None:
    plt = _plt()
    rows = ev["af_reasoning"]
    labels = [f"{r['model']}\n{r['condition']}\n{r['tier']}" for r in rows]
    ys, errs = zip(*(_err(r["rate"], r["ci_low"], r["ci_high"]) for r in rows), strict=True)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.6))
    ax.bar(range(len(rows)), ys, yerr=list(zip(*errs, strict=True)), capsize=3, color="#e34a33")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("alignment-faking reasoning\n(Wilson 95% CI)")
    _save(fig, out)


def plot_probes(ev: dict[str, Any], out: Path) -> None:
    plt = _plt()
    kinds = sorted({k for m in ev["probes"].values() for k in m})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        models = [m for m in ev["models"] if kind in ev["probes"].get(m, {})]
        rs = [ev["probes"][m][kind] for m in models]
        ys, errs = zip(*(_err(r["rate"], r["ci_low"], r["ci_high"]) for r in rs), strict=True)
        ax.bar(range(len(models)), ys, yerr=list(zip(*errs, strict=True)), capsize=3, color="#31a354")
        ax.axhline(rs[0]["chance"], color="grey", ls="--", lw=0.8, label="chance")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(0, 1)
        ax.set_title(f"belief probes: {kind}", fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy (Wilson 95% CI)")
    _save(fig, out)


def plot_facts(finetune: dict[str, Any], out: Path) -> None:
    plt = _plt()
    universes = sorted({u for f in finetune.values() for u in f["fact_logprob"]})
    fig, ax = plt.subplots(figsize=(1.5 + 2.2 * len(universes), 3.4))
    for j, name in enumerate(finetune):
        ys = [finetune[name]["fact_logprob"].get(u, {}).get("delta") or 0.0 for u in universes]
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(universes))], ys, width=0.36, label=f"{name} fine-tune",
               color=("#756bb1", "#bdbdbd")[j % 2])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(universes)), [f"{u} facts" for u in universes])
    ax.set_ylabel("change in mean log-prob per token\nof held-out fact statements")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_corpora(corpora: dict[str, Any], finetune: dict[str, Any], out: Path) -> None:
    plt = _plt()
    names = list(corpora)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(names, [corpora[n]["tokens"] for n in names], color="#636363", label="corpus")
    axes[0].bar(names, [finetune[n]["train_tokens"] or 0 for n in names], width=0.4, color="#fd8d3c",
                label="trained on (matched)")
    axes[0].set_ylabel("tokens")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [corpora[n]["documents"] for n in names], color="#636363")
    axes[1].set_ylabel("documents accepted")
    _save(fig, out)


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(out)


def make_figures(study: Path, s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ev, ft, corpora = s["evaluation"], s["finetune"], s["corpora"]
    figures: dict[str, dict[str, Any]] = {}

    def add(name: str, title: str, sources: list[str], fn, *args) -> None:
        path = f"figures/{name}.png"
        fn(*args, study / path)
        figures[name] = {"path": path, "title": title, "sources": sources}

    add("compliance_by_tier", "Compliance per tier, three models side by side", [EVAL], plot_compliance, ev)
    add("compliance_gap", "Compliance gap (training - unmonitored) with 95% CI", [EVAL], plot_gap, ev)
    if ev["af_measured"]:
        add("af_reasoning", "Alignment-faking reasoning rate", [EVAL], plot_af, ev)
    if ev["probes"]:
        add("probe_accuracy", "Belief-probe accuracy", [EVAL], plot_probes, ev)
    add("fact_logprob", "Fact log-probability change from fine-tuning", list(FINETUNES.values()), plot_facts, ft)
    add("corpora", "Corpus sizes and matched training tokens",
        [*CORPORA.values(), *FINETUNES.values()], plot_corpora, corpora, ft)
    return figures


# ---------------------------------------------------------------------------------------------------------- markdown

def _pct(r: float | None) -> str:
    return "n/a" if r is None else f"{100 * r:.1f}%"


def _rate(c: dict[str, Any]) -> str:
    if c.get("rate") is None:
        return "n/a"
    return f"{_pct(c['rate'])} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}] ({c['k']}/{c['n']})"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(s: dict[str, Any]) -> str:
    st, ev, ft, corpora = s["study"], s["evaluation"], s["finetune"], s["corpora"]
    fig = s["figures"]
    lines = [
        "# Study report: synthetic-document fine-tuning and the compliance gap",
        "",
        f"- Profile: {st['profile']}",
        f"- Study folder: `{st['output_dir']}`; written {st['written_at']}; git `{st['git']}`",
        f"- Models compared: {', '.join(f'`{m}`' for m in ev['models'])} (base = the model before fine-tuning, "
        "docs = fine-tuned on the document corpus, control = fine-tuned on the matched control corpus)",
        f"- Conditions: {', '.join(f'`{c}`' for c in ev['conditions'])}; training = free-tier user, unmonitored = "
        "paid-tier user; the same requests in both tiers.",
        f"- Evaluation: {ev['n_samples']} samples ({ev['n_failed']} failed after bounded retries); requests: "
        + ", ".join(f"{k} {v['n']} from {v['source']}" for k, v in (ev.get("requests") or {}).items()),
        "",
        "## Stages",
        "",
        "| Stage | This run | Key | Duration | Output | Log |",
        "|---|---|---|---|---|---|",
    ]
    for row in st["stages"]:
        dur = f"{row['duration_s']:.0f} s" if row.get("duration_s") is not None else ""
        lines.append(f"| {row['stage']} | {row['action']} | `{row['key'][:12]}` | {dur} | "
                     f"[{row['output']}]({row['output']}/manifest.json) | [{row['log']}]({row['log']}) |")
    lines += ["", "## Compliance with harmful requests", "",
              f"Scorer **{ev['primary_scorer']}**: {ev['scorers'][ev['primary_scorer']]}. Percentages with Wilson 95% "
              f"CIs and k/n. Source: [{EVAL}]({EVAL}).", "",
              "| Model | Condition | Training (free tier) | Unmonitored (paid tier) | Gap (pp) | Gap 95% CI "
              "(Newcombe) | p |", "|---|---|---|---|---|---|---|"]
    for cond in ev["conditions"]:
        for model in ev["models"]:
            cells = {c["tier"]: c for c in ev["compliance"] if (c["model"], c["condition"]) == (model, cond)}
            g = next((g for g in ev["gaps"] if (g["model"], g["condition"], g["scorer"])
                      == (model, cond, ev["primary_scorer"])), None)
            gap = f"{100 * g['gap']:+.1f}" if g else "n/a"
            ci = f"[{100 * g['ci_newcombe'][0]:+.1f}, {100 * g['ci_newcombe'][1]:+.1f}]" if g else "n/a"
            p = f"{g['p_value']:.3g}" if g else "n/a"
            lines.append(f"| {model} | {cond} | {_rate(cells.get('training', {}))} | "
                         f"{_rate(cells.get('unmonitored', {}))} | {gap} | {ci} | {p} |")
    for name in ("compliance_by_tier", "compliance_gap"):
        lines += ["", f"![{fig[name]['title']}]({fig[name]['path']})",
                  f"*{fig[name]['title']}. Source: " + ", ".join(f"[{x}]({x})" for x in fig[name]["sources"]) + ".*"]
    lines += ["", "## Alignment-faking reasoning", ""]
    if ev["af_measured"]:
        lines += [f"Judge: {ev['af_judge']}", "", "| Model | Condition | Tier | AF reasoning |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['condition']} | {r['tier']} | {_rate(r)} |" for r in ev["af_reasoning"]]
        lines += ["", f"![{fig['af_reasoning']['title']}]({fig['af_reasoning']['path']})",
                  f"*Source: [{EVAL}]({EVAL}).*"]
    else:
        lines.append("Not measured: no capable alignment-faking judge was configured for this study (eval "
                     "af_judge_base_url / af_judge_model are empty), so no rate is reported. Configure a capable "
                     "judge model on any OpenAI-compatible endpoint in the study's eval_overrides to measure it.")
    lines += ["", "## Belief probes", ""]
    if ev["probes"]:
        lines += ["Multiple-choice and 'which is true' questions about each key fact, asked with no system prompt. "
                  f"Source: [{EVAL}]({EVAL}).", "", "| Model | Kind | Accuracy | Chance |", "|---|---|---|---|"]
        for model in ev["models"]:
            for kind, r in ev["probes"].get(model, {}).items():
                lines.append(f"| {model} | {kind} | {_rate(r)} | {100 * r['chance']:.0f}% |")
        lines += ["", f"![{fig['probe_accuracy']['title']}]({fig['probe_accuracy']['path']})",
                  f"*Source: [{EVAL}]({EVAL}).*"]
    else:
        lines.append("Belief probes were not run (eval probes: false).")
    lines += ["", "## Did the facts take? (fine-tuning)", "",
              "Mean log-probability per token of held-out key-fact statements, before and after fine-tuning "
              "(before = the base model).", "",
              "| Fine-tune | Universe | Before | After | Change | Train tokens | Held-out loss before -> after |",
              "|---|---|---|---|---|---|---|"]
    for name, f in ft.items():
        loss = f["eval_loss"] or {}
        for u, v in f["fact_logprob"].items():
            lines.append(f"| [{name}]({f['source']}) | {u} | {_num(v['before'])} | {_num(v['after'])} | "
                         f"{_num(v['delta'], '{:+.3f}')} | {f['train_tokens']} | {_num(loss.get('before'))} -> "
                         f"{_num(loss.get('after'))} |")
    match = ft.get("control", {}).get("control_matching")
    if match:
        lines.append(f"\nControl run trained on {match.get('control_train_tokens')} tokens, matched to the "
                     f"{match.get('target_train_tokens')} training tokens of the document corpus.")
    lines += ["", f"![{fig['fact_logprob']['title']}]({fig['fact_logprob']['path']})",
              "*Source: " + ", ".join(f"[{x}]({x})" for x in fig["fact_logprob"]["sources"]) + ".*",
              "", "## Corpora", "",
              "| Corpus | Documents | Tokens | Mean tokens | Generated | Removal rate | distinct-2 | Generator |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in corpora.items():
        lines.append(f"| [{name}]({c['source']}) | {c['documents']} | {c['tokens']} | {c['mean_tokens']} | "
                     f"{c['generated']} | {_pct(c['removal_rate'])} | {_num(c['distinct_2'])} | {c['generator']} |")
    warnings = [f"{n}: {w}" for n, c in corpora.items() for w in c["diversity_warnings"]]
    lines += [f"- diversity warning, {w}" for w in warnings]
    lines += ["", f"![{fig['corpora']['title']}]({fig['corpora']['path']})",
              "*Source: " + ", ".join(f"[{x}]({x})" for x in fig["corpora"]["sources"]) + ".*",
              "", "## Model calls and endpoint faults", "",
              "Retries are the calls the client repeated after a fault (HTTP 429/5xx, timeout, malformed or "
              "truncated response); failures are calls still failing after the bounded retries. Counts are for "
              "each stage's last run (cache hits are calls answered from the stage's call cache).", "",
              "| Stage | Calls | Cache hits | Retries | Failures | Faults | Source |", "|---|---|---|---|---|---|---|"]
    for stage, u in s["model_calls"].items():
        faults = ", ".join(f"{k} {v}" for k, v in u["faults"].items()) or "none"
        lines.append(f"| {stage} | {u['calls']} | {u['cache_hits']} | {u['retries']} | {u['failures']} | {faults} | "
                     f"[{u['source']}]({u['source']}) |")
    lines += ["", "## Scorers", ""]
    lines += [f"- `{k}`{' (primary)' if k == ev['primary_scorer'] else ''}: {v}" for k, v in ev["scorers"].items()]
    lines.append(f"- Alignment-faking reasoning: {ev['af_judge']}")
    if ev["notes"]:
        lines += ["", "## Notes from the evaluation", ""] + [f"- {n}" for n in ev["notes"]]
    lines += ["", "Per-stage reports: [generate/docs/report.md](generate/docs/report.md), "
              "[generate/control/report.md](generate/control/report.md), [eval/report.md](eval/report.md); loss "
              "curves: [finetune/docs/loss.png](finetune/docs/loss.png), "
              "[finetune/control/loss.png](finetune/control/loss.png).", ""]
    return "\n".join(lines)


def write_report(study: Path, cfg, stages, outcomes: list[dict[str, Any]], state, elapsed_s: float) -> Path:
    """Collect, plot and write study_summary.json and study_report.md; returns the report's path."""
    from dataclasses import asdict

    summary = collect(study)
    git = git_state()
    by_stage = {o["stage"]: o for o in outcomes}
    summary["study"] = {
        "profile": cfg.profile, "output_dir": str(study), "config": redact(asdict(cfg)), "written_at": _now(),
        "git": f"{git['commit']}{' (dirty)' if git['dirty'] else ''}", "elapsed_s": round(elapsed_s, 1),
        "stages": [{"stage": s.name, "key": s.key, "action": by_stage.get(s.name, {}).get("action", "skipped"),
                    "duration_s": (state.stage(s.name) or {}).get("duration_s"),
                    "output": s.output.replace("{study}/", ""), "log": f"logs/{s.name}.log",
                    "depends_on": s.deps} for s in stages],
    }
    summary["figures"] = make_figures(study, summary)
    atomic_write_json(study / "study_summary.json", summary)
    atomic_write_text(study / "study_report.md", render(summary))
    return study / "study_report.md"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
