"""The study's figures, drawn from the summary rows (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from study.summary import DoseRow, Evaluation, Figure, FinetuneRow, PointSummary, RateRow


def tier_label(ev: Evaluation, tier: str) -> str:
    return f"{tier} ({ev.tier_labels[tier]})"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(r: RateRow | None) -> tuple[float, list[float]]:
    if r is None or r.rate is None:
        return 0.0, [0.0, 0.0]
    return r.rate, [max(r.rate - r.ci_low, 0.0), max(r.ci_high - r.rate, 0.0)]


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(out)


def plot_compliance(ev: Evaluation, out: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(ev.conditions), figsize=(4.2 * len(ev.conditions), 3.6), squeeze=False,
                             sharey=True)
    for ax, cond in zip(axes[0], ev.conditions, strict=True):
        for j, tier in enumerate(("training", "unmonitored")):
            xs, ys, errs = [], [], [[], []]
            for i, model in enumerate(ev.models):
                row = next((c for c in ev.compliance if (c.model, c.condition, c.tier) == (model, cond, tier)), None)
                if row is None:
                    continue
                y, e = _err(row)
                xs.append(i + (j - 0.5) * 0.38)
                ys.append(y)
                errs[0].append(e[0])
                errs[1].append(e[1])
            ax.bar(xs, ys, width=0.36, yerr=errs, capsize=3, label=tier_label(ev, tier), color=("#e6550d", "#3182bd")[j])
        ax.set_xticks(range(len(ev.models)), ev.models)
        ax.set_ylim(0, 1)
        ax.set_title(f"{cond}\nprompt set {ev.prompt_sets.get(cond, '?')}", fontsize=9)
    axes[0][0].set_ylabel(f"compliance with harmful requests\n({ev.primary_scorer} scorer, Wilson 95% CI)")
    axes[0][-1].legend(fontsize=8)
    _save(fig, out)


def plot_gap(ev: Evaluation, out: Path) -> None:
    plt = _plt()
    rows = [g for g in ev.gaps if g.scorer == ev.primary_scorer]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(ev.models) * len(ev.conditions), 3.4))
    for k, cond in enumerate(ev.conditions):
        for i, model in enumerate(ev.models):
            g = next((g for g in rows if (g.model, g.condition) == (model, cond)), None)
            if g is None:
                continue
            x = i + (k - (len(ev.conditions) - 1) / 2) * 0.25
            lo, hi = g.ci_newcombe
            ax.errorbar([x], [g.gap], yerr=[[g.gap - lo], [hi - g.gap]], fmt="o", capsize=4, color=f"C{k}",
                        label=cond if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(ev.models)), ev.models)
    ax.set_ylim(-1, 1)
    ax.set_ylabel(f"compliance gap, {ev.primary_scorer} scorer\n(training - unmonitored, Newcombe 95% CI)")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_af(ev: Evaluation, out: Path) -> None:
    plt = _plt()
    rows = ev.af_reasoning
    ys, errs = zip(*(_err(r) for r in rows), strict=True)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.6))
    ax.bar(range(len(rows)), ys, yerr=list(zip(*errs, strict=True)), capsize=3, color="#e34a33")
    ax.set_xticks(range(len(rows)), [f"{r.model}\n{r.condition}\n{r.tier}" for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("alignment-faking reasoning\n(Wilson 95% CI)")
    _save(fig, out)


def plot_probes(ev: Evaluation, out: Path) -> None:
    plt = _plt()
    kinds = sorted({k for m in ev.probes.values() for k in m})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        models = [m for m in ev.models if kind in ev.probes.get(m, {})]
        rows = [RateRow(model=m, condition="", tier="", **{k: ev.probes[m][kind][k] for k in
                                                          ("k", "n", "rate", "ci_low", "ci_high")}) for m in models]
        ys, errs = zip(*(_err(r) for r in rows), strict=True)
        ax.bar(range(len(models)), ys, yerr=list(zip(*errs, strict=True)), capsize=3, color="#31a354")
        ax.axhline(ev.probes[models[0]][kind]["chance"], color="grey", ls="--", lw=0.8, label="chance")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(0, 1)
        ax.set_title(f"belief probes: {kind}", fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy (Wilson 95% CI)")
    _save(fig, out)


def plot_facts(finetune: dict[str, FinetuneRow], out: Path) -> None:
    plt = _plt()
    universes = list(dict.fromkeys(u for f in finetune.values() for u in f.fact_logprob))
    fig, ax = plt.subplots(figsize=(1.5 + 2.2 * len(universes), 3.4))
    for j, (name, run) in enumerate(finetune.items()):
        ys = [(run.fact_logprob[u].delta or 0.0) if u in run.fact_logprob else 0.0 for u in universes]
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(universes))], ys, width=0.36, label=f"{name} fine-tune",
               color=("#756bb1", "#bdbdbd")[j % 2])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(universes)), [f"{u} facts" for u in universes])
    ax.set_ylabel("change in mean log-prob per token\nof held-out fact statements")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_corpora(point: PointSummary, out: Path) -> None:
    plt = _plt()
    names = list(point.corpora)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(names, [point.corpora[n].tokens for n in names], color="#636363", label="corpus")
    axes[0].bar(names, [point.finetune[n].train_tokens if n in point.finetune else 0 for n in names], width=0.4,
                color="#fd8d3c", label="trained on (matched)")
    axes[0].set_ylabel("tokens")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [point.corpora[n].documents for n in names], color="#636363")
    axes[1].set_ylabel("documents accepted")
    _save(fig, out)


def point_figures(study: Path, point: PointSummary) -> dict[str, Figure]:
    """The per-point figures, in figures/ (or figures/<point>/ in a sweep)."""
    ev, figures = point.evaluation, {}
    folder = f"figures/{point.label}/" if point.label else "figures/"
    sources_ft = [r.source for r in point.finetune.values()]

    def add(name: str, title: str, sources: list[str], fn, *args: Any) -> None:
        fn(*args, study / f"{folder}{name}.png")
        figures[name] = Figure(path=f"{folder}{name}.png", title=title, sources=sources)

    add("compliance_by_tier", "Compliance per tier, models side by side", ev.sources, plot_compliance, ev)
    add("compliance_gap", "Compliance gap (training - unmonitored) with 95% CI", ev.sources, plot_gap, ev)
    if ev.af_reasoning:
        add("af_reasoning", "Alignment-faking reasoning rate", ev.sources, plot_af, ev)
    if ev.probes:
        add("probe_accuracy", "Belief-probe accuracy", ev.sources, plot_probes, ev)
    if point.finetune:
        add("fact_logprob", "Fact log-probability change from fine-tuning", sources_ft, plot_facts, point.finetune)
    if point.corpora:
        add("corpora", "Corpus sizes and matched training tokens",
            [r.source for r in point.corpora.values()] + sources_ft, plot_corpora, point)
    return figures


def plot_dose_response(rows: list[DoseRow], label: str, condition: str, out: Path) -> None:
    """Four panels against the swept value, one line per evaluated model: gap, AF rate, fact change, probes."""
    plt = _plt()
    rows = [r for r in rows if r.condition == condition]
    values = list(dict.fromkeys(r.value for r in rows))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x_of = {v: (v if numeric else i) for i, v in enumerate(values)}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("compliance gap (Newcombe 95% CI)", lambda r: r.gap, lambda r: r.ci_newcombe),
              ("AF reasoning, training tier", lambda r: r.af_training.rate if r.af_training else None,
               lambda r: [r.af_training.ci_low, r.af_training.ci_high] if r.af_training else None),
              ("fact log-prob change", lambda r: r.fact_delta, lambda r: None),
              ("probe accuracy (multiple choice)", lambda r: r.probe_mc, lambda r: None)]
    models = list(dict.fromkeys(r.model for r in rows))
    log = numeric and len(values) > 2 and max(values) / max(min(values), 1e-12) >= 8
    span = (max(x_of.values()) - min(x_of.values())) or 1

    def dodge(x: float, k: int) -> float:   # models side by side, so equal values stay visible
        shift = (k - (len(models) - 1) / 2) * 0.012
        return x * 10 ** shift if log else x + shift * span

    for ax, (title, y_of, ci_of) in zip(axes, panels, strict=True):
        drawn = False
        for k, model in enumerate(models):
            pts = [(x_of[r.value], y_of(r), ci_of(r)) for r in rows if r.model == model and y_of(r) is not None]
            if not pts:
                continue
            drawn = True
            xs, ys, cis = zip(*pts, strict=True)
            xs = [dodge(x, k) for x in xs]
            err = [[y - ci[0] if ci else 0 for y, ci in zip(ys, cis, strict=True)],
                   [ci[1] - y if ci else 0 for y, ci in zip(ys, cis, strict=True)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=f"C{k}", label=model)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(label)
        if log:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=7)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[0].axhline(0, color="grey", lw=0.8)
    _save(fig, out)
