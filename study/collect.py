"""What the study report shows, read from the stages' typed records (never from raw JSON keys).

Per sweep point: the corpora (generation nodes), the fine-tuning runs and the evaluation, whose
nodes (the base model's and the fine-tuned models') are merged into one table of models; for the
model-organism kinds also the conditional-policy data, the instrument check and the backdoor
measurements (study/organisms.py). Across points: the dose-response rows. Every row names the stage file it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.summary import EvalSummary
from finetune.metrics import FinetuneMetrics
from study.antilab import antilab_part
from study.kind import is_ref
from study.organisms import backdoor_part, instrument_checks, organism_behaviours, policy_row
from study.plan import Node, Plan, rel
from study.rl import rl_row
from study.summary import (
    Calls,
    CorpusRow,
    DoseRow,
    Evaluation,
    FactRow,
    FinetuneRow,
    GapRow,
    PointSummary,
    RateRow,
)
from studykit.handoff import Usage
from synthdocs.stats import CorpusStats


def corpus_row(study: Path, node: Node) -> CorpusRow:
    source = rel(node, "stats.json")
    s = CorpusStats.read(study / source)
    return CorpusRow(node=node.name, documents=s.corpus.documents, tokens=s.corpus.tokens,
                     mean_tokens=s.corpus.mean_tokens, generated=s.counts.generated, removed=s.counts.removed,
                     removal_rate=s.removal_rate, removed_by_reason=s.removed_by_reason,
                     distinct_2=s.diversity.distinct_2, diversity_warnings=s.diversity.warnings,
                     generator=s.generator, stop_reason=s.stop_reason, source=source)


def finetune_row(study: Path, node: Node) -> FinetuneRow:
    source = rel(node, "metrics.json")
    m = FinetuneMetrics.read(study / source)
    facts = {u: FactRow(before=f.before, after=f.after, delta=f.delta, n_statements=f.n_statements)
             for u, f in m.fact_logprob.items()}
    return FinetuneRow(node=node.name, corpus=m.corpus, control=m.control, mode=m.mode,
                       model=m.model.get("name_or_path", ""), steps=m.steps, train_tokens=m.data.train_tokens,
                       tokens_seen=m.tokens_seen, control_matching=m.data.control_matching,
                       eval_loss_before=m.eval_loss.before, eval_loss_after=m.eval_loss.after, fact_logprob=facts,
                       packing_efficiency=m.packing.packing_efficiency, resumed_from=m.resumed_from, source=source)


def model_runs(nodes: list[Node], the_plan: Plan) -> dict[str, str]:
    """Evaluated model -> label of the node behind it ("@finetune_docs" -> "docs")."""
    out: dict[str, str] = {}
    for node in nodes:
        for model, ref in (node.template.set.get("models") or {}).items():
            if is_ref(ref):
                out[model] = the_plan.kind.node(ref[1:]).label
    return out


def evaluation(study: Path, nodes: list[Node], the_plan: Plan) -> Evaluation:
    """The evaluation nodes of one point, merged: models side by side."""
    summaries = [(rel(n, "summary.json"), EvalSummary.read(study / rel(n, "summary.json"))) for n in nodes]
    first = summaries[0][1]
    primary = first.primary_scorer
    models = [m.name for _, s in summaries for m in s.models]
    conditions = list(dict.fromkeys(c for _, s in summaries for c in s.conditions))
    compliance, gaps, af = [], [], []
    for _, s in summaries:
        for c in s.cells:
            if c.dataset != "harmful":
                continue
            r = c.compliance[primary]
            compliance.append(RateRow(model=c.model, condition=c.condition, tier=c.tier, k=r.k, n=r.n, rate=r.rate,
                                      ci_low=r.ci_low, ci_high=r.ci_high, n_samples=c.n_samples, n_failed=c.n_failed))
            if c.af is not None:
                a = c.af.alignment_faking
                af.append(RateRow(model=c.model, condition=c.condition, tier=c.tier, k=a.k, n=a.n, rate=a.rate,
                                  ci_low=a.ci_low, ci_high=a.ci_high, n_samples=c.n_samples, n_failed=c.n_failed))
        gaps += [GapRow(model=g.model, condition=g.condition, scorer=g.scorer, gap=g.gap, ci_newcombe=g.ci_newcombe,
                        ci_bootstrap_requests=g.ci_bootstrap_requests, p_value=g.p_value,
                        training=g.training.rate, unmonitored=g.unmonitored.rate)
                 for g in s.gaps if g.dataset == "harmful"]
    return Evaluation(
        models=models, conditions=conditions, primary_scorer=primary, cue=first.cue.tag,
        prompt_sets={c: f"{p.name} ({p.fingerprint})" for _, s in summaries for c, p in s.prompt_sets.items()},
        tier_labels=dict(first.cue.labels), invalid_policy=first.invalid_policy,
        scorers={k: v for _, s in summaries for k, v in s.scorers.items()}, af_judge=first.af_judge,
        af_measured=any(s.af_measured for _, s in summaries), compliance=compliance, gaps=gaps, af_reasoning=af,
        probes={m: {k: p.model_dump() for k, p in kinds.items()} for _, s in summaries for m, kinds in s.probes.items()},
        n_samples=sum(s.n_samples for _, s in summaries), n_failed=sum(s.n_failed for _, s in summaries),
        notes=list(dict.fromkeys(n for _, s in summaries for n in s.notes)),
        requests={k: v.model_dump() for k, v in first.requests.items()}, universe=first.universe,
        model_runs=model_runs(nodes, the_plan), sources=[src for src, _ in summaries])


def collect_point(study: Path, the_plan: Plan, label: str, value: Any) -> PointSummary:
    nodes = [the_plan.node(name) for name in the_plan.by_point[label].values()]
    by_stage: dict[str, list[Node]] = {}
    for node in nodes:
        by_stage.setdefault(node.spec.kind, []).append(node)
    ev = evaluation(study, by_stage["eval"], the_plan) if by_stage.get("eval") else None
    policies = {n.name: policy_row(study, n) for n in by_stage.get("policy", [])}
    checks = instrument_checks(ev, organism_behaviours(the_plan, label, by_stage["eval"], policies)) if ev else []
    return PointSummary(
        label=label, value=value,
        corpora={n.template.label: corpus_row(study, n) for n in by_stage.get("generate", [])},
        finetune={n.template.label: finetune_row(study, n) for n in by_stage.get("finetune", [])},
        evaluation=ev, policies=policies, checks=checks,
        backdoor=backdoor_part(study, by_stage["eval_backdoor"]) if by_stage.get("eval_backdoor") else None,
        antilab=antilab_part(study, by_stage["eval_antilab"]) if by_stage.get("eval_antilab") else None,
        rl={n.template.label: rl_row(study, n) for n in by_stage.get("rl", [])})


def dose_rows(points: list[PointSummary]) -> list[DoseRow]:
    """Per swept value, evaluated model and condition: gap, AF rate in training, fact change, probe accuracy."""
    rows = []
    for p in points:
        ev = p.evaluation
        if ev is None:
            continue
        for model in ev.models:
            run = p.finetune.get(ev.model_runs.get(model, ""))
            universe = next(iter(run.fact_logprob), None) if run else None
            probes = ev.probes.get(model, {})
            for cond in ev.conditions:
                g = next((g for g in ev.gaps if (g.model, g.condition, g.scorer) == (model, cond, ev.primary_scorer)),
                         None)
                af = next((a for a in ev.af_reasoning if (a.model, a.condition, a.tier) == (model, cond, "training")),
                          None)
                rows.append(DoseRow(
                    point=p.label, value=p.value, model=model, condition=cond, gap=g.gap if g else None,
                    ci_newcombe=g.ci_newcombe if g else None, p_value=g.p_value if g else None,
                    training=g.training if g else None, unmonitored=g.unmonitored if g else None, af_training=af,
                    fact_universe=universe, fact_delta=run.fact_logprob[universe].delta if universe else None,
                    probe_mc=probes.get("mc", {}).get("rate"), probe_distinguish=probes.get("distinguish", {}).get("rate")))
    return rows


def model_calls(study: Path, the_plan: Plan) -> dict[str, Calls]:
    """Model calls of each node's last run: the generator's and the evaluation's clients."""
    calls: dict[str, Calls] = {}
    for node in the_plan.nodes:
        if node.spec.kind == "generate":
            source = rel(node, "stats.json")
            usage = CorpusStats.read(study / source).usage
        elif node.spec.kind == "eval":
            source = rel(node, "summary.json")
            usage = sum(EvalSummary.read(study / source).usage.values(), Usage())
        else:
            continue
        calls[node.name] = Calls(**usage.model_dump(), source=source)
    return calls
