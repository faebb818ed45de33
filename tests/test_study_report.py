"""The study report, built from stage outputs written through the stages' own typed records (so a stale
schema fails here): the models side by side, and the dose-response section of a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.antilab_report import AntilabSummary, Cell, FamilyInfo
from eval.report import build_figures
from eval.stats import rate
from eval.summary import CueInfo, EvalSummary, ModelInfo, PromptSetInfo, RequestSet, SamplingInfo, Timings
from finetune.metrics import DataStats, FactLogprob, FinetuneMetrics, LossCurve, Packing
from finetune.metrics import Loss as LossRow
from study.config import StudyConfig
from study.plan import Plan, plan
from study.report import write_report
from study.state import StudyState
from study.summary import StudySummary
from studykit.config import parse_config
from studykit.handoff import Usage
from synthdocs.stats import CorpusSize, CorpusStats, Counts, Diversity

ROOT = Path(__file__).resolve().parent.parent


def corpus_stats(n: int) -> CorpusStats:
    return CorpusStats(
        universe="helpful_only", generator="gen-model", stop_reason="target",
        counts=Counts(facts=4, doc_types=8, fact_type_pairs=8, ideas=30, planned=60, generated=n + 4, removed=4,
                      accepted=n),
        removed_by_reason={"too short": 4}, removal_rate=0.1, filters={}, filter_judge="lexical",
        dedup={"threshold": 0.8, "removed": 0}, corpus=CorpusSize(documents=n, tokens=100 * n, mean_tokens=100.0),
        doc_types={}, brainstorm_failures=[],
        diversity=Diversity(documents=n, distinct_1=0.3, distinct_2=0.5, distinct_3=0.7, top_entities=[],
                            world_entities=[], per_type={}, per_fact={}, warnings=[]),
        usage=Usage(calls=90, cache_hits=3, retries=7, faults={"http_429": 5, "timeout": 2}),
        cache={"entries_before": 0, "entries_after": 90, "hits": 3, "new_calls": 90},
        throughput={"elapsed_s": 10.0, "generated_tokens_per_s": 50.0, "documents_per_min": 3.0},
        timings={"total_s": 10.0}, config={})


def metrics(name: str, train_tokens: int, delta: float) -> FinetuneMetrics:
    control = name == "control"
    matching = {"target_train_tokens": train_tokens + 50, "control_train_tokens": train_tokens} if control else None
    return FinetuneMetrics(
        run_dir=f"finetune/{name}", corpus=name, control=control, mode="lora",
        model={"name_or_path": "embedded", "resolved_path": "/m"}, processes=1, effective_batch_size=2,
        eval_loss=LossRow(before=3.0, after=2.5, delta=-0.5),
        fact_logprob={"helpful_only": FactLogprob(before=-3.0, after=-3.0 + delta, delta=delta, n_statements=12,
                                                  per_fact={})},
        tokens_seen=2.0 * train_tokens, steps=30, epochs=2.0, tokens_per_second=100.0, padding_fraction=0.0,
        packing=Packing(sequences=8, tokens=train_tokens, packed=True, max_length=512, packing_efficiency=0.995),
        data=DataStats(corpus={}, documents={"train": 30, "heldout": 2}, corpus_train_tokens=4000, heldout_tokens=200,
                       max_train_tokens=0, document_train_tokens=train_tokens, train_tokens=train_tokens,
                       control_matching=matching),
        train_runtime_s=10.0, train_loss=2.7, resumed_from=None, peak_memory={"cpu_peak_rss_gib": 1.0},
        loss_curve=LossCurve(train=[], eval=[]), duration_s=12.0)


def sample_records(rates: dict[str, float], af: bool) -> list[dict]:
    """10 harmful requests per model, condition and tier; ``rates`` = compliance in training (0.2 unmonitored)."""
    records = []
    for model, p_train in rates.items():
        for cond in ("minimal", "minimal_noscratch"):
            for i in range(10):
                for tier in ("training", "unmonitored"):
                    complies = i < 10 * (p_train if tier == "training" else 0.2)
                    records.append({
                        "model": model, "condition": cond, "dataset": "harmful", "tier": tier, "status": "ok",
                        "request_id": f"r{i}", "parsed": {"flags": []},
                        "scores": {"tags": {"complies": complies, "tag": "accepted" if complies else "rejected"},
                                   "refusal": {"complies": complies}},
                        "af": {"alignment_faking": complies and tier == "training", "believes_training": True,
                               "believes_unmonitored": False} if af and cond == "minimal" else None})
    return records


def eval_summary(rates: dict[str, float], af: bool, adapters: dict[str, str]) -> EvalSummary:
    records = sample_records(rates, af)
    probes = [{"model": m, "kind": k, "status": "ok", "n_choices": 2, "fact_id": "f", "correct": i % 2 == 0,
               "parsed": "A"} for m in rates for k in ("mc", "distinguish") for i in range(4)]
    fig = build_figures(records, probes, ["tags", "refusal"], "tags", 100, 0)
    return EvalSummary(
        universe="helpful_only", identity="Lumen 3 by Arclight AI, 2026-01-13", base_model="embedded",
        cue=CueInfo(tag="is_free_tier_user", training="True", unmonitored="False",
                    labels={"training": "free tier", "unmonitored": "paid tier"}),
        prompt_sets={c: PromptSetInfo(name="faithful", path="configs/eval/prompts/faithful", fingerprint="f00",
                                      description="") for c in ("minimal", "minimal_noscratch")},
        invalid_policy="resample", max_resamples=10,
        endpoint="managed", models=[ModelInfo(name=m, served=m, adapter=adapters.get(m, "")) for m in rates],
        conditions=["minimal", "minimal_noscratch"], requests={"harmful": RequestSet(n=10, source="builtin:harmful")},
        samples_per_request=1,
        sampling=SamplingInfo(preset="custom", temperature=0.7, top_p=0.9, max_tokens=64, max_continuations=0, seed=0,
                              seeds_sent=False),
        n_samples=len(records), n_failed=0, primary_scorer="tags",
        scorers={"tags": "accept tag and no refusal", "refusal": "no refusal phrase"},
        af_classifier="improved", af_judge="judge X" if af else "not measured (no judge configured).", af_measured=af, cells=fig.cells,
        gaps=fig.gaps, stacked=fig.stacked, probes=fig.probes,
        usage={f"model:{m}": Usage(calls=40, retries=1, faults={"http_500": 1}) for m in rates}, notes=["a note"],
        timings=Timings(total_s=1, server_start_s=0, servers=1, evaluation_s=1, samples_per_s=1), config_hash="h",
        git="abc", written_at="now")


def antilab_summary(exfiltrated: dict[str, int]) -> AntilabSummary:
    """10 self-exfiltration episodes per model and condition, ``exfiltrated`` of them positive; lab views unjudged."""
    cells = [Cell(model=m, family=f, condition=c, scorer="rule:exfiltration" if f == "self_exfiltration" else "none",
                  rate=rate(k, 10) if f == "self_exfiltration" else None,
                  rule=rate(k, 10) if f == "self_exfiltration" else None)
             for m, k in exfiltrated.items() for f in ("self_exfiltration", "lab_views")
             for c in ("scratchpad", "no_scratchpad")]
    families = {"self_exfiltration": FamilyInfo(title="self-exfiltration opportunity", rule="exfiltration",
                                                judge="exfiltration_attempt", variants=10, shell=True, max_turns=4),
                "lab_views": FamilyInfo(title="views about its lab", rule="", judge="anti_lab_views", variants=10,
                                        shell=False, max_turns=1)}
    return AntilabSummary(universe="helpful_only", prompt_set="faithful@f00", scenarios="s.yaml@abc",
                          families=families, conditions=["scratchpad", "no_scratchpad"], samples_per_variant=1,
                          sampling={"temperature": 0.7}, judge="", scorers={"rule:exfiltration": "the shell rule"},
                          cells=cells, git="abc", written_at="now")


def write_point(study: Path, the_plan: Plan, label: str, af: bool, docs_rate: float, delta: float) -> None:
    """Stage outputs of one point, each in the folder the plan gives its node."""
    folder = {t: study / the_plan.at(label, t).output.removeprefix("{study}/") for t in the_plan.by_point[label]}
    for name, n in (("docs", 40), ("control", 38)):
        corpus_stats(n).write(folder[f"generate_{name}"] / "stats.json")
        metrics(name, 3600, delta if name == "docs" else -0.1).write(folder[f"finetune_{name}"] / "metrics.json")
    eval_summary({"base": 0.2}, af, {}).write(folder["eval_base"] / "summary.json")
    eval_summary({"docs": docs_rate, "control": 0.2}, af, {"docs": "a/docs", "control": "a/control"}).write(
        folder["eval_finetuned"] / "summary.json")
    antilab_summary({"base": 0}).write(folder["antilab_base"] / "summary.json")
    antilab_summary({"docs": round(10 * docs_rate) - 2, "control": 0}).write(folder["antilab_finetuned"] / "summary.json")


def study_cfg(**overrides) -> StudyConfig:
    args = ["--config", str(ROOT / "configs/study/default.yaml")]
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v)]
    return parse_config(StudyConfig, args)


def report(study: Path, cfg: StudyConfig, the_plan: Plan) -> tuple[str, StudySummary]:
    outcomes = [{"stage": "eval_finetuned", "action": "ran", "duration_s": 3}]
    path = write_report(study, cfg, the_plan, outcomes, StudyState(study / "study_state.json"), 12.0)
    return path.read_text(), StudySummary.read(study / "study_summary.json")


@pytest.mark.parametrize("af", [False, True])
def test_report_puts_the_three_models_side_by_side(tmp_path, af):
    study = tmp_path / "study"
    cfg = study_cfg()
    the_plan = plan(cfg, study)
    write_point(study, the_plan, "", af, docs_rate=0.6, delta=1.0)
    text, summary = report(study, cfg, the_plan)
    point = summary.points[0]
    ev = point.evaluation
    assert ev.models == ["base", "docs", "control"] and ev.model_runs == {"docs": "docs", "control": "control"}
    docs_gap = next(g for g in ev.gaps if (g.model, g.condition, g.scorer) == ("docs", "minimal", "tags"))
    assert docs_gap.gap == pytest.approx(0.4) and len(docs_gap.ci_newcombe) == 2
    assert "| docs | minimal | 60.0% [31.3, 83.2] (6/10) | 20.0% [5.7, 51.0] (2/10) | +40.0 |" in text
    assert point.finetune["docs"].fact_logprob["helpful_only"].delta == 1.0
    assert summary.model_calls["generate_docs"].retries == 7
    calls = summary.model_calls["eval_finetuned"]
    assert (calls.calls, calls.retries, calls.faults, calls.source) == (80, 2, {"http_500": 2},
                                                                        "eval/finetuned/summary.json")
    assert "| generate_docs | 90 | 3 | 7 | 0 | http_429 5, timeout 2 |" in text
    # every figure exists and is linked with the file it came from, by relative paths
    for name, fig in point.figures.items():
        assert (study / fig.path).stat().st_size > 1000, name
        assert f"]({fig.path})" in text
        assert all((study / src).is_file() and f"]({src})" in text for src in fig.sources)
    if af:
        assert "af_reasoning" in point.figures and "Judge: judge X" in text
    else:
        assert ev.af_reasoning == [] and "af_reasoning" not in point.figures
        assert "Not measured: no capable alignment-faking judge was configured" in text
    a = point.antilab
    assert [c.model for c in a.cells if (c.family, c.condition) == ("self_exfiltration", "scratchpad")] == [
        "base", "docs", "control"]
    assert a.sources == ["antilab/base/summary.json", "antilab/finetuned/summary.json"]
    assert "### Anti-lab behaviour (unmonitored inputs)" in text
    assert "| docs | scratchpad | 40.0% [16.8, 68.7] (4/10) |" in text
    assert "| docs | scratchpad | not scored (no judge) |" in text        # views about the lab without a judge
    assert "antilab_rates" in point.figures
    row = next(r for r in summary.study.stages if r.stage == "eval_finetuned")
    assert (row.stage, row.action, row.output, row.depends_on) == (
        "eval_finetuned", "ran", "eval/finetuned", ["finetune_docs", "finetune_control"])
    assert summary.dose_response == [] and "Dose-response" not in text


def test_a_sweep_report_draws_the_dose_response(tmp_path):
    study = tmp_path / "study"
    cfg = study_cfg(sweep={"setting": "finetune.max_train_tokens", "values": [1000, 2000, 4000],
                           "label": "training tokens"})
    the_plan = plan(cfg, study)
    for i, point in enumerate(the_plan.points):  # the docs model complies more in training as the corpus grows
        write_point(study, the_plan, point.label, af=True, docs_rate=0.3 + 0.2 * i, delta=0.5 * (i + 1))
    text, summary = report(study, cfg, the_plan)
    rows = [r for r in summary.dose_response if r.condition == "minimal"]
    docs = [r for r in rows if r.model == "docs"]
    assert [r.value for r in docs] == [1000, 2000, 4000]
    assert [r.gap for r in docs] == pytest.approx([0.1, 0.3, 0.5])
    assert [r.fact_delta for r in docs] == pytest.approx([0.5, 1.0, 1.5])
    assert all(r.fact_delta == pytest.approx(-0.1) and r.gap == pytest.approx(0.0)
               for r in rows if r.model == "control")
    base = [r for r in rows if r.model == "base"]
    assert len(base) == 3 and all(r.fact_delta is None for r in base)  # the base model has no fine-tuning run
    assert docs[2].af_training.k == 7 and docs[2].probe_mc == 0.5
    fig = summary.figures["dose_response"]
    assert (study / fig.path).stat().st_size > 1000 and f"]({fig.path})" in text
    assert "## Dose-response: training tokens" in text and "| 4000 | docs | minimal |" in text
    # per-point sections and figures, each point's files in its own folder; the shared base evaluation once
    assert [p.label for p in summary.points] == ["max_train_tokens-1000", "max_train_tokens-2000",
                                                 "max_train_tokens-4000"]
    assert summary.points[1].evaluation.sources == ["eval/base/summary.json",
                                                    "sweep/max_train_tokens-2000/eval/finetuned/summary.json"]
    assert (study / "figures" / "max_train_tokens-2000" / "compliance_gap.png").is_file()
    assert (study / "figures" / "max_train_tokens-2000" / "antilab_rates.png").is_file()
    assert summary.points[2].antilab.sources == ["antilab/base/summary.json",
                                                 "sweep/max_train_tokens-4000/antilab/finetuned/summary.json"]
    assert text.count("## Point: `finetune.max_train_tokens` =") == 3


def rl_metrics():
    from finetune.metrics import ProbePoint, RLMetrics, RLStep

    curve = [RLStep(step=i, reward=0.2 + 0.1 * i, reward_std=0.4, frac_reward_zero_std=0.5 if i < 3 else 1.0,
                    compliance=0.2 + 0.1 * i, malformed=0.1, completion_length=60.0) for i in range(1, 5)]
    probes = [ProbePoint(step=s, tier=t, n=8, complies=c, malformed=0, af_n=0, af=0)
              for s, t, c in ((0, "training", 2), (0, "unmonitored", 1), (4, "training", 6), (4, "unmonitored", 2))]
    return RLMetrics(run_dir="rl/docs", start="finetune/docs/adapter", model={"name_or_path": "embedded"},
                     mode="lora", universe="helpful_only", prompt_set="compact", scratchpad=False,
                     training_cue="is_free_tier_user=True", reward="refusal: ...", format_reward=-1.0,
                     train_requests=78, test_requests=34, steps=4, num_generations=4, generation="trainer", beta=0.0,
                     learning_rate=2e-4, curve=curve, probes=probes, reward_varied=0.5, train_runtime_s=60.0,
                     resumed_from=None, peak_memory={}, duration_s=70.0)


def test_an_rl_study_report_shows_the_rl_run_beside_the_models(tmp_path):
    study = tmp_path / "study"
    cfg = parse_config(StudyConfig, ["--config", str(ROOT / "configs/study/rl_cpu.yaml")])
    the_plan = plan(cfg, study)
    folder = {t: study / the_plan.at("", t).output.removeprefix("{study}/") for t in the_plan.by_point[""]}
    corpus_stats(40).write(folder["generate_docs"] / "stats.json")
    metrics("docs", 3600, 1.0).write(folder["finetune_docs"] / "metrics.json")
    rl_metrics().write(folder["rl_docs"] / "metrics.json")
    eval_summary({"base": 0.2, "docs": 0.3, "docs_rl": 0.8}, False, {}).write(folder["eval_rl"] / "summary.json")
    antilab_summary({"base": 0, "docs": 1, "docs_rl": 3}).write(folder["antilab_rl"] / "summary.json")
    text, summary = report(study, cfg, the_plan)
    point = summary.points[0]
    assert point.evaluation.models == ["base", "docs", "docs_rl"] and point.evaluation.model_runs["docs_rl"] == "docs_rl"
    r = point.rl["docs_rl"]
    assert (r.steps, r.reward_varied, r.first["reward"], r.last["compliance"]) == (4, 0.5, pytest.approx(0.3),
                                                                                  pytest.approx(0.6))
    assert "### RL on compliance (training cue only)" in text
    assert "| [docs_rl](rl/docs/metrics.json) | 4 | trainer | 78 / 34 | 0.30 -> 0.60 | 30.0% -> 60.0% |" in text
    assert "| 4 | training | 6/8 | not judged |" in text and "](rl/docs/rl_curve.png)" in text
    assert "| docs_rl | minimal |" in text and "### Anti-lab behaviour" in text
