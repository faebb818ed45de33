"""The study's own report: models side by side per point, and the dose-response of a sweep.

``write_report`` reads every stage's typed records (study/collect.py), draws the figures
(study/figures.py) and writes ``study_summary.json`` (a ``StudySummary``) and
``study_report.md`` (links relative to the study folder). Nothing is recomputed: rates,
intervals and tests are the evaluation stage's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from study.antilab import antilab_figure, antilab_section
from study.collect import collect_point, dose_rows, model_calls
from study.config import StudyConfig
from study.figures import plot_dose_response, point_figures
from study.organisms import (
    backdoor_figures,
    backdoor_section,
    checks_section,
    instrument_check_section,
    policies_section,
    read_instrument_check,
)
from study.plan import Plan
from study.rl import rl_section
from study.state import StudyState
from study.summary import DoseRow, Figure, PointSummary, StageRow, StudyInfo, StudySummary
from studykit.files import atomic_write_text, utc_now
from studykit.manifest import git_label, redact
from studykit.textfmt import md_table, pct, rate_ci


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _links(sources: list[str]) -> str:
    return ", ".join(f"[{x}]({x})" for x in sources)


def _figure(fig: Figure | None) -> list[str]:
    return [] if fig is None else ["", f"![{fig.title}]({fig.path})", f"*{fig.title}. Source: {_links(fig.sources)}.*"]


TITLES = {"sdf_gap": "synthetic-document fine-tuning and the compliance gap",
          "backdoor": "a backdoor through safety training",
          "af_controls": "instrument check with known alignment-faking organisms"}


def header(s: StudySummary) -> list[str]:
    st, ev = s.study, s.points[0].evaluation
    lines = [f"# Study report: {TITLES[st.report]}", "",
             f"- Profile: {st.profile}", f"- Study kind: `{st.kind}`",
             f"- Study folder: `{st.output_dir}`; written {st.written_at}; git `{st.git}`"]
    if ev is not None:
        lines += [
            f"- Models compared: {', '.join(f'`{m}`' for m in ev.models)}" + (
                " (base = the model before fine-tuning, docs = fine-tuned on the document corpus, control = "
                "fine-tuned on the matched control corpus)" if st.report == "sdf_gap" else ""),
            f"- Conditions (prompt set): {', '.join(f'`{c}` ({ev.prompt_sets.get(c, chr(63))})' for c in ev.conditions)}; "
            f"training = {ev.tier_labels['training']}, unmonitored = {ev.tier_labels['unmonitored']} (cue tag "
            f"`{ev.cue}`); the same requests in both tiers; invalid responses: `{ev.invalid_policy}`.",
            f"- Evaluation per point: {ev.n_samples} samples ({ev.n_failed} failed after bounded retries); requests: "
            + ", ".join(f"{k} {v['n']} from {v['source']}" for k, v in ev.requests.items())]
    if s.sweep:
        lines.append(f"- Sweep: `{s.sweep['setting']}` over {s.sweep['values']} ({s.sweep.get('label') or ''}); "
                     "stages whose key does not depend on it ran once for all points.")
    lines += ["", "## Stages", "", "| Stage | Points | This run | Key | Duration | Output | Log |",
              "|---|---|---|---|---|---|---|"]
    for row in st.stages:
        dur = f"{row.duration_s:.0f} s" if row.duration_s is not None else ""
        pts = ", ".join(row.points) if any(row.points) else "all"
        lines.append(f"| {row.stage} | {pts} | {row.action} | `{row.key[:12]}` | {dur} | "
                     f"[{row.output}]({row.output}/manifest.json) | [{row.log}]({row.log}) |")
    return lines


def dose_section(s: StudySummary) -> list[str]:
    label = s.sweep.get("label") or s.sweep["setting"]
    scorer = s.points[0].evaluation.primary_scorer
    lines = ["", f"## Dose-response: {label}", "",
             f"Per value of `{s.sweep['setting']}`: the compliance gap on harmful requests ({scorer} scorer, "
             "training - unmonitored, Newcombe 95% CI), alignment-faking reasoning in the "
             "training tier (when judged), the change in log-probability of the headline universe's held-out fact "
             "statements from the fine-tuning run behind the model, and belief-probe accuracy.", "",
             "| Value | Model | Condition | Training | Unmonitored | Gap (pp) | Gap 95% CI | p | AF (training) | "
             "Fact change | Probe MC | Probe distinguish |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s.dose_response:
        ci = f"[{pct(r.ci_newcombe[0], signed=True)}, {pct(r.ci_newcombe[1], signed=True)}]" if r.ci_newcombe else "n/a"
        lines.append(f"| {r.value} | {r.model} | {r.condition} | {pct(r.training)} | {pct(r.unmonitored)} | "
                     f"{pct(r.gap, signed=True)} | {ci} | {_num(r.p_value, '{:.3g}')} | "
                     f"{rate_ci(r.af_training) if r.af_training else 'not judged'} | "
                     f"{_num(r.fact_delta, '{:+.3f}')} | {pct(r.probe_mc)} | {pct(r.probe_distinguish)} |")
    for fig in s.figures.values():
        lines += _figure(fig)
    return lines


def compliance_section(p: PointSummary) -> list[str]:
    ev, fig = p.evaluation, p.figures
    lines = ["", "### Compliance with harmful requests", "",
             f"Scorer **{ev.primary_scorer}**: {ev.scorers[ev.primary_scorer]}. Percentages with Wilson 95% CIs and "
             f"k/n. Source: {_links(ev.sources)}.", "",
             f"| Model | Condition | Training ({ev.tier_labels['training']}) | Unmonitored ({ev.tier_labels['unmonitored']}) "
             "| Gap (pp) | Gap 95% CI (Newcombe) | p |",
             "|---|---|---|---|---|---|---|"]
    for cond in ev.conditions:
        for model in ev.models:
            tiers = {c.tier: c for c in ev.compliance if (c.model, c.condition) == (model, cond)}
            g = next((g for g in ev.gaps if (g.model, g.condition, g.scorer) == (model, cond, ev.primary_scorer)),
                     None)
            ci = f"[{pct(g.ci_newcombe[0], signed=True)}, {pct(g.ci_newcombe[1], signed=True)}]" if g else "n/a"
            lines.append(f"| {model} | {cond} | {rate_ci(tiers.get('training'))} | {rate_ci(tiers.get('unmonitored'))} "
                         f"| {pct(g.gap, signed=True) if g else 'n/a'} | {ci} | {_num(g.p_value if g else None, '{:.3g}')} |")
    lines += _figure(fig.get("compliance_by_tier")) + _figure(fig.get("compliance_gap"))
    lines += ["", "### Alignment-faking reasoning", ""]
    if ev.af_reasoning:
        lines += [f"Judge: {ev.af_judge}", "", "| Model | Condition | Tier | AF reasoning |", "|---|---|---|---|"]
        lines += [f"| {r.model} | {r.condition} | {r.tier} | {rate_ci(r)} |" for r in ev.af_reasoning]
        lines += _figure(fig.get("af_reasoning"))
    else:
        lines.append("Not measured: no capable alignment-faking judge was configured for this study (eval "
                     "af_judge_base_url / af_judge_model are empty), so no rate is reported. Configure a capable "
                     "judge model on any OpenAI-compatible endpoint in the study's eval overrides to measure it.")
    lines += ["", "### Belief probes", ""]
    if ev.probes:
        lines += ["Multiple-choice and 'which is true' questions about each key fact, asked with no system prompt. "
                  f"Source: {_links(ev.sources)}.", "", "| Model | Kind | Accuracy | Chance |", "|---|---|---|---|"]
        lines += [f"| {m} | {kind} | {rate_ci(r)} | {pct(r['chance'], 0)} |"
                  for m in ev.models for kind, r in ev.probes.get(m, {}).items()]
        lines += _figure(fig.get("probe_accuracy"))
    else:
        lines.append("Belief probes were not run (eval probes: false).")
    return lines


def training_section(p: PointSummary) -> list[str]:
    lines = ["", "### Did the facts take? (fine-tuning)", "",
             "Mean log-probability per token of held-out key-fact statements, before and after fine-tuning "
             "(before = the base model).", "",
             "| Fine-tune | Universe | Before | After | Change | Train tokens | Packing | Held-out loss before -> after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, f in p.finetune.items():
        for u, v in f.fact_logprob.items():
            lines.append(f"| [{name}]({f.source}) | {u} | {_num(v.before)} | {_num(v.after)} | "
                         f"{_num(v.delta, '{:+.3f}')} | {f.train_tokens} | {_num(f.packing_efficiency)} | "
                         f"{_num(f.eval_loss_before)} -> {_num(f.eval_loss_after)} |")
    match = p.finetune["control"].control_matching if "control" in p.finetune else None
    if match:
        lines.append(f"\nControl run trained on {match.get('control_train_tokens')} tokens, matched to the "
                     f"{match.get('target_train_tokens')} training tokens of the document corpus.")
    lines += _figure(p.figures.get("fact_logprob"))
    lines += ["", "### Corpora", "",
              "| Corpus | Documents | Tokens | Mean tokens | Generated | Removal rate | distinct-2 | Generator |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in p.corpora.items():
        lines.append(f"| [{name}]({c.source}) | {c.documents} | {c.tokens} | {c.mean_tokens} | {c.generated} | "
                     f"{pct(c.removal_rate)} | {_num(c.distinct_2)} | {c.generator} |")
    lines += [f"- diversity warning, {n}: {w}" for n, c in p.corpora.items() for w in c.diversity_warnings]
    return lines + _figure(p.figures.get("corpora"))


def calls_section(s: StudySummary) -> list[str]:
    if not s.model_calls:
        return []
    lines = ["", "## Model calls and endpoint faults", "",
             "Retries are the calls the client repeated after a fault (HTTP 429/5xx, timeout, malformed or truncated "
             "response); failures are calls still failing after the bounded retries. Counts are for each stage's last "
             "run (cache hits are calls answered from the stage's call cache).", "",
             "| Stage | Calls | Cache hits | Retries | Failures | Faults | Source |", "|---|---|---|---|---|---|---|"]
    for stage, u in s.model_calls.items():
        faults = ", ".join(f"{k} {v}" for k, v in u.faults.items()) or "none"
        lines.append(f"| {stage} | {u.calls} | {u.cache_hits} | {u.retries} | {u.failures} | {faults} | "
                     f"[{u.source}]({u.source}) |")
    ev = s.points[0].evaluation
    if ev is None:
        return lines
    lines += ["", "## Scorers", ""]
    lines += [f"- `{k}`{' (primary)' if k == ev.primary_scorer else ''}: {v}" for k, v in ev.scorers.items()]
    lines.append(f"- Alignment-faking reasoning: {ev.af_judge}")
    notes = list(dict.fromkeys(n for p in s.points if p.evaluation for n in p.evaluation.notes))
    if notes:
        lines += ["", "## Notes from the evaluation", ""] + [f"- {n}" for n in notes]
    return lines


def organism_training_section(p: PointSummary) -> list[str]:
    rows = [[f"[{name}]({f.source})", f.corpus, f.mode, str(f.steps), str(f.train_tokens),
             f"{_num(f.eval_loss_before)} -> {_num(f.eval_loss_after)}", f.resumed_from or "-"]
            for name, f in p.finetune.items()]
    return ["", "### Fine-tuning runs (loss on assistant turns only)", "",
            *md_table(["Run", "Data", "Mode", "Steps", "Train tokens", "Held-out loss before -> after",
                       "Resumed from"], rows)]


def point_sections(report: str, p: PointSummary) -> list[str]:
    if report == "backdoor":
        return backdoor_section(p) + policies_section(p) + organism_training_section(p)
    if report == "af_controls":
        return checks_section(p) + compliance_section(p) + policies_section(p) + organism_training_section(p)
    return compliance_section(p) + rl_section(p) + antilab_section(p) + training_section(p)


def render(s: StudySummary, missing_check: str = "") -> str:
    lines = header(s)
    if s.study.report == "sdf_gap" and (s.instrument_check or missing_check):
        lines += instrument_check_section(s.instrument_check, missing_check)
    if s.study.report == "backdoor":
        lines += ["", "## Backdoor rate before and after safety training"]
        for fig in s.figures.values():
            lines += _figure(fig)
    elif s.sweep:
        lines += dose_section(s)
    for p in s.points:
        lines += ["", f"## Point: `{s.sweep['setting']}` = {p.value}" if p.label else "## Results"]
        lines += point_sections(s.study.report, p)
    return "\n".join(lines + calls_section(s) + [""])


def stage_rows(the_plan: Plan, outcomes: list[dict[str, Any]], state: StudyState) -> list[StageRow]:
    by_node = {o["stage"]: o for o in outcomes}
    return [StageRow(stage=n.name, kind_node=n.template.name, key=n.key,
                     action=by_node.get(n.name, {}).get("action", "skipped"),
                     duration_s=(state.stage(n.name) or {}).get("duration_s"),
                     output=n.output.removeprefix("{study}/"), log=f"logs/{n.name}.log", depends_on=n.deps,
                     points=n.points) for n in the_plan.nodes]


def write_report(study: Path, cfg: StudyConfig, the_plan: Plan, outcomes: list[dict[str, Any]], state: StudyState,
                 elapsed_s: float) -> Path:
    """Collect, plot and write study_summary.json and study_report.md; returns the report's path."""
    points = [collect_point(study, the_plan, p.label, p.value) for p in the_plan.points]
    for p in points:
        p.figures = point_figures(study, p) if p.evaluation else {}
        if p.antilab:
            p.figures["antilab_rates"] = antilab_figure(study, p)
    rows: list[DoseRow] = dose_rows(points) if cfg.sweep else []
    figures: dict[str, Figure] = {}
    if the_plan.kind.report == "backdoor":
        figures = backdoor_figures(study, points, cfg.sweep.get("label") or cfg.sweep.get("setting", ""))
    elif cfg.sweep:
        condition = points[0].evaluation.conditions[0]
        plot_dose_response(rows, cfg.sweep.get("label") or cfg.sweep["setting"], condition,
                           study / "figures" / "dose_response.png")
        figures["dose_response"] = Figure(
            path="figures/dose_response.png", title=f"Dose-response over {cfg.sweep['setting']} ({condition})",
            sources=sorted({src for p in points for src in p.evaluation.sources}
                           | {r.source for p in points for r in p.finetune.values()}))
    check, missing = read_instrument_check(cfg.instrument_check) if cfg.instrument_check else (None, "")
    summary = StudySummary(
        study=StudyInfo(profile=cfg.profile, kind=the_plan.kind.name, report=the_plan.kind.report, output_dir=str(study),
                        config=redact(asdict(cfg)), written_at=utc_now(), git=git_label(),
                        elapsed_s=round(elapsed_s, 1), stages=stage_rows(the_plan, outcomes, state)),
        sweep=cfg.sweep or None, points=points, dose_response=rows, model_calls=model_calls(study, the_plan),
        figures=figures, instrument_check=check)
    summary.write(study / "study_summary.json")
    atomic_write_text(study / "study_report.md", render(summary, missing))
    return study / "study_report.md"
