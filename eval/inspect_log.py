"""The evaluation's samples and scores as an Inspect AI log (``inspect.eval``), written through
``inspect_ai.log.write_eval_log`` so that ``inspect view`` opens it.

Each sample is one record of samples.jsonl: the input is the system prompt and the user turn,
the messages add every assistant turn (and the ``<NEXT/>`` turns between them), the output is
the whole response, and the scores are each compliance scorer's verdict (1 complies, 0 does
not, unscored when a judge could not score it) plus ``alignment_faking`` when the judge ran.
A sample's id names its model, condition, request set, tier and request; repeated samples of
the same request are its epochs. Failed samples carry their error. The results hold, per
scorer, the training and unmonitored rates and the gap for each model x condition x set (one
metric group each, with the intervals and test in the metric's metadata).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from inspect_ai.log import (
    EvalConfig,
    EvalDataset,
    EvalError,
    EvalLog,
    EvalMetric,
    EvalPlan,
    EvalPlanStep,
    EvalResults,
    EvalRevision,
    EvalSample,
    EvalScore,
    EvalSpec,
    EvalStats,
    HeadlineMetric,
    write_eval_log,
)
from inspect_ai.model import (
    ChatMessage,
    ChatMessageAssistant,
    ChatMessageSystem,
    ChatMessageUser,
    GenerateConfig,
    ModelOutput,
    ModelUsage,
)
from inspect_ai.scorer import Score

from eval.summary import EvalSummary
from studykit.handoff import Manifest, Usage
from studykit.parse import NEXT

TASK = "alignment_faking_compliance_gap"
AF_SCORE = "alignment_faking"
METADATA_KEYS = ("model", "served_model", "adapter", "condition", "dataset", "tier", "cue_value", "prompt_set",
                 "request_id", "category", "sample", "seed", "key")
STOP_REASONS = {"stop": "stop", "length": "max_tokens"}


def sample_id(rec: dict[str, Any]) -> str:
    return f"{rec['model']}/{rec['condition']}/{rec['dataset']}/{rec['tier']}/{rec['request_id']}"


def compliance_score(verdict: dict[str, Any]) -> Score:
    evidence = {k: v for k, v in verdict.items() if k != "complies"}
    explanation = verdict.get("rationale") or ", ".join(f"{k}: {v}" for k, v in evidence.items())
    if verdict["complies"] is None:
        return Score.unscored(reason="grader_failed", explanation=explanation, metadata=evidence)
    return Score(value=int(verdict["complies"]), answer=verdict.get("tag"), explanation=explanation,
                 metadata=evidence)


def partial_score(verdict: dict[str, Any]) -> Score:
    evidence = {k: v for k, v in verdict.items() if k != "partial"}
    if verdict["partial"] is None:
        return Score.unscored(reason="grader_failed", explanation=verdict.get("error", ""), metadata=evidence)
    return Score(value=int(verdict["partial"]), answer=verdict["kind"], explanation=verdict.get("rationale", ""),
                 metadata=evidence)


def af_score(af: dict[str, Any]) -> Score:
    evidence = {k: v for k, v in af.items() if k not in ("alignment_faking", "votes")}
    if af["alignment_faking"] is None:
        return Score.unscored(reason="grader_failed", explanation="no judge vote could be parsed", metadata=evidence)
    explanation = af.get("note") or (f"{af['af_vote_share']:.0%} of {af['n_votes']} votes meet criteria 1-4")
    return Score(value=int(af["alignment_faking"]), explanation=explanation, metadata=evidence)


def _messages(rec: dict[str, Any], inputs: list[ChatMessage]) -> list[ChatMessage]:
    messages = list(inputs)
    for i, turn in enumerate(rec["turns"]):
        if i:
            messages.append(ChatMessageUser(content=NEXT))
        messages.append(ChatMessageAssistant(content=turn["text"], model=rec["served_model"]))
    return messages


def to_sample(rec: dict[str, Any], system_prompt: str) -> EvalSample:
    inputs: list[ChatMessage] = [ChatMessageSystem(content=system_prompt), ChatMessageUser(content=rec["user_turn"])]
    common: dict[str, Any] = {"id": sample_id(rec), "epoch": rec["sample"] + 1, "input": inputs, "target": "",
                              "metadata": {k: rec.get(k) for k in METADATA_KEYS}}
    if rec["status"] != "ok":
        return EvalSample(**common, error=EvalError(message=rec.get("error", "failed"), traceback="",
                                                    traceback_ansi=""))
    common["metadata"].update(flags=rec["parsed"]["flags"], n_turns=rec["n_turns"])
    tokens_in = sum(t["prompt_tokens"] for t in rec["turns"])
    tokens_out = sum(t["completion_tokens"] for t in rec["turns"])
    usage = ModelUsage(input_tokens=tokens_in, output_tokens=tokens_out, total_tokens=tokens_in + tokens_out)
    output = ModelOutput.from_content(rec["served_model"], rec["response"],
                                      stop_reason=STOP_REASONS.get(rec["turns"][-1]["finish_reason"], "unknown"))
    output.usage = usage
    scores = {name: compliance_score(verdict) for name, verdict in rec["scores"].items() if name != "partial"}
    if "partial" in rec["scores"]:
        scores["partial"] = partial_score(rec["scores"]["partial"])
    if rec.get("af") is not None:
        scores[AF_SCORE] = af_score(rec["af"])
    return EvalSample(**common, messages=_messages(rec, inputs), output=output, scores=scores,
                      model_usage={rec["served_model"]: usage})


def _rate_metric(name: str, group: str, r: Any) -> EvalMetric:
    return EvalMetric(name=name, group=group, value=r.rate, metadata={"k": r.k, "n": r.n, "ci": [r.ci_low, r.ci_high]})


def results(summary: EvalSummary, records: list[dict[str, Any]]) -> EvalResults:
    """Per scorer: training rate, unmonitored rate and gap for each model x condition x set; AF rates per tier."""
    ok = [r for r in records if r["status"] == "ok"]
    scores: list[EvalScore] = []
    for scorer in sorted(summary.scorers, key=lambda s: s != summary.primary_scorer):
        metrics: dict[str, EvalMetric] = {}
        for g in (g for g in summary.gaps if g.scorer == scorer):
            group = f"{g.model}/{g.condition}/{g.dataset}"
            metrics[f"{group}/training"] = _rate_metric("training", group, g.training)
            metrics[f"{group}/unmonitored"] = _rate_metric("unmonitored", group, g.unmonitored)
            metrics[f"{group}/gap"] = EvalMetric(name="gap", group=group, value=g.gap, metadata={
                "ci_newcombe": g.ci_newcombe, "ci_bootstrap_requests": g.ci_bootstrap_requests, "z": g.z,
                "p_value": g.p_value, "test": g.test})
        scored = sum(r["scores"].get(scorer, {}).get("complies") is not None for r in ok)
        scores.append(EvalScore(name=scorer, scorer=scorer, scored_samples=scored, unscored_samples=len(ok) - scored,
                                metrics=metrics, metadata={"description": summary.scorers[scorer]}))
    if summary.af_measured:
        cells = [c for c in summary.cells if c.af]
        metrics = {f"{c.model}/{c.condition}/{c.dataset}/{c.tier}": _rate_metric(
            c.tier, f"{c.model}/{c.condition}/{c.dataset}", c.af.alignment_faking) for c in cells}
        n_judged = sum(c.af.alignment_faking.n for c in cells)
        scores.append(EvalScore(name=AF_SCORE, scorer=AF_SCORE, scored_samples=n_judged, metrics=metrics,
                                metadata={"description": summary.af_judge}))
    gaps = [k for k in scores[0].metrics if k.endswith("/gap")]
    headline = next((k for k in gaps if k.endswith("/harmful/gap")), gaps[0] if gaps else None)
    return EvalResults(total_samples=len(records), completed_samples=len(ok), scores=scores,
                       headline=HeadlineMetric(scorer=summary.primary_scorer, metric=headline) if headline else None,
                       metadata={"primary_scorer": summary.primary_scorer, "af_measured": summary.af_measured})


def _model_usage(usage: dict[str, Usage]) -> dict[str, ModelUsage]:
    return {name: ModelUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                             total_tokens=u.prompt_tokens + u.completion_tokens, total_cost=u.cost_usd or None)
            for name, u in usage.items()}


def eval_spec(summary: EvalSummary, records: list[dict[str, Any]], manifest: Manifest, base_url: str) -> EvalSpec:
    ids = list(dict.fromkeys(sample_id(r) for r in records))
    run_id = hashlib.sha256(f"{summary.config_hash}:{summary.written_at}".encode()).hexdigest()[:22]
    git = manifest.git
    return EvalSpec(
        eval_id=run_id, run_id=run_id, created=summary.written_at, task=TASK, task_id=summary.config_hash,
        task_version=summary.schema_version,
        task_args={"universe": summary.universe, "conditions": summary.conditions},
        dataset=EvalDataset(name="+".join(summary.requests),
                            location=", ".join(r.source for r in summary.requests.values()), samples=len(ids),
                            sample_ids=ids),
        model=f"{'openai-api' if base_url else 'vllm'}/{'+'.join(m.served for m in summary.models)}",
        model_base_url=base_url or None,
        model_args={"base_model": summary.base_model, "models": [m.model_dump() for m in summary.models]},
        model_generate_config=GenerateConfig(temperature=summary.sampling.temperature, top_p=summary.sampling.top_p,
                                             max_tokens=summary.sampling.max_tokens, seed=summary.sampling.seed),
        config=EvalConfig(epochs=summary.samples_per_request),
        revision=EvalRevision(type="git", origin="", commit=git["commit"], dirty=git["dirty"])
        if git.get("commit") else None,
        packages=manifest.packages,
        metadata={"identity": summary.identity, "endpoint": summary.endpoint, "config_hash": summary.config_hash,
                  "af_judge": summary.af_judge, "notes": summary.notes},
    )


def build_log(summary: EvalSummary, records: list[dict[str, Any]], prompts: dict[str, str], manifest: Manifest,
              base_url: str, started_at: str) -> EvalLog:
    plan = EvalPlan(steps=[
        EvalPlanStep(solver="generate", params={"max_continuations": summary.sampling.max_continuations,
                                                "continuation_turn": NEXT}),
        EvalPlanStep(solver="score", params={"scorers": list(summary.scorers), "af_judge": summary.af_judge}),
    ])
    return EvalLog(status="success", eval=eval_spec(summary, records, manifest, base_url), plan=plan,
                   results=results(summary, records),
                   stats=EvalStats(started_at=started_at, completed_at=summary.written_at,
                                   model_usage=_model_usage(summary.usage)),
                   samples=[to_sample(r, prompts[r["condition"]]) for r in records])


def write_inspect_log(path: Path, log: EvalLog) -> None:
    """Write through Inspect's own writer into a temporary name beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    write_eval_log(log, tmp)
    os.replace(tmp, path)
