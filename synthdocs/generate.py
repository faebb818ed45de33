"""Generate a corpus of synthetic documents set in a universe where the key facts are true.

    python -m synthdocs.generate                                   # embedded default (SmolLM2, local vLLM)
    python -m synthdocs.generate --config configs/generate/control.yaml
    python -m synthdocs.generate --universe animal_welfare --target_documents 5000 \\
        --base_url https://api.example.com/v1 --model some-model --api_key_env MY_API_KEY

Stages: document types -> ideas -> documents -> (revision) -> structural checks -> LLM
classifiers and fact coverage -> dedup -> budget. With no --base_url the model is served
by a managed vLLM server started here; with --base_url any OpenAI-compatible endpoint is
used (the key is read from the environment variable named by --api_key_env).

Outputs in --output_dir (default runs/generate/<universe>): documents.jsonl, dataset/
(HF datasets), removed.jsonl, stats.json, report.md, cache.sqlite, and manifest.json,
written last as the completion marker. Rerunning into the same directory resumes: every
finished model call is replayed from cache.sqlite and the corpus comes out the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studykit.cache import CallCache
from studykit.client import EndpointUnreachable, ModelClient
from studykit.config import ConfigError, parse_config
from studykit.embedded import EMBEDDED, ModelNotFound, resolve_model
from studykit.jsonl import write_jsonl
from studykit.manifest import atomic_write_json, build_manifest
from studykit.server import ServerError, ServerSpec, VLLMServer, send_seeds
from studykit.universe import load_universe
from synthdocs.diversity import diversity_stats
from synthdocs.pipeline import CLASSIFIERS, COVERAGE, Pipeline, PipelineSettings
from synthdocs.prompts import PROMPT_STYLES
from synthdocs.report import write_report

log = logging.getLogger("synthdocs.generate")


@dataclass
class GenerateConfig:
    universe: str = field(default="helpful_only", metadata={"help": "universe name or YAML path"})
    output_dir: str = field(default="", metadata={"help": "default: runs/generate/<universe name>"})
    # the generator model
    model: str = field(default=EMBEDDED, metadata={"help": "local HF folder / hub id (managed server) or remote model name"})
    base_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint; empty = managed local vLLM"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "NAME of the env var holding the key"})
    price_per_mtok_in: float = 0.0
    price_per_mtok_out: float = 0.0
    max_concurrency: int = 64
    max_attempts: int = 6
    request_timeout_s: float = 300.0
    # managed vLLM server
    server_max_model_len: int = 4096
    server_max_num_seqs: int = 64
    server_enforce_eager: bool = field(default=True, metadata={"help": "skip torch.compile: a ~45 s start instead of "
                                                               "~100-160 s on a 2-core CPU, at about the same decode speed"})
    server_tensor_parallel_size: int = 1
    server_startup_timeout_s: float = 900.0
    server_extra_args: list[str] = field(default_factory=list)
    # pipeline
    universe_context: str = field(default="summary", metadata={"help": "world description in every prompt: full | "
                                                                "summary (shorter prompts for small models)"})
    seed: int = 0
    per_request_seed: str = field(default="auto", metadata={"help": "send sampling seeds to the endpoint: true | false "
                                                            "| auto (not to a managed CPU vLLM server, whose CPU "
                                                            "backend crashes on seeded requests)"})
    doc_types_per_fact: int = 6
    include_seed_types: bool = True
    ideas_per_type: int = 0
    docs_per_idea: int = field(default=2, metadata={"help": "documents per idea, each with its own random names, "
                                                     "places, dates and tone"})
    doc_words: int = 100
    prompt_style: str = field(default="compact", metadata={"help": "detailed (rules spelled out; strong generators) | "
                                                          "compact (short and direct; small models)"})
    temperature: float = field(default=0.4, metadata={"help": "0.4 for the embedded 135M model, which is incoherent "
                                                       "at 1.0 (measured); 1.0 for strong generators"})
    top_p: float = 0.9
    frequency_penalty: float = field(default=0.5, metadata={"help": "OpenAI frequency penalty on generated tokens: "
                                                             "curbs the repetition loops of small models"})
    brainstorm_max_tokens: int = 250
    doc_max_tokens: int = 192
    revise: bool = False
    # filters and dedup
    judge: str = field(default="lexical", metadata={"help": "who answers the LLM filters: generator (the generator "
                                                     "model) | endpoint (judge_base_url/judge_model) | lexical "
                                                     "(keyword screens; the embedded 135M model is no capable judge)"})
    judge_base_url: str = ""
    judge_model: str = ""
    judge_api_key_env: str = ""
    min_words: int = 60
    truncated: str = field(default="trim", metadata={"help": "documents cut off at doc_max_tokens: drop | trim "
                                                     "(cut back to the last full sentence, then re-checked)"})
    llm_filters: list[str] = field(default_factory=lambda: [*CLASSIFIERS, COVERAGE])
    coverage_threshold: float = field(default=0.15, metadata={"help": "judge: lexical -- share of the fact's content "
                                                                "words a document must contain"})
    dedup_threshold: float = 0.8
    max_entity_share: float = 0.2
    # budget
    target_documents: int = 200
    target_tokens: int = 0
    window: int = field(default=128, metadata={"help": "documents started ahead of the first undecided one in plan "
                                               "order (keep it above max_concurrency so the server never idles)"})
    overgenerate: float = field(default=2.2, metadata={"help": "plan this many documents per wanted one (the embedded "
                                                        "model's filter yield is about 0.45-0.5)"})
    max_plan_extensions: int = field(default=3, metadata={"help": "times the plan may grow with fresh ideas when "
                                                          "filters leave the target unmet"})
    progress: bool = True

    def validate(self) -> None:
        for name in ("doc_types_per_fact", "docs_per_idea", "doc_words", "brainstorm_max_tokens", "doc_max_tokens",
                     "target_documents", "window", "max_concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be at least 1, got {getattr(self, name)}.")
        if self.target_tokens < 0 or self.ideas_per_type < 0 or self.min_words < 0:
            raise ConfigError("'target_tokens', 'ideas_per_type' and 'min_words' must not be negative.")
        if not 0 < self.dedup_threshold <= 1:
            raise ConfigError(f"'dedup_threshold' must be in (0, 1], got {self.dedup_threshold}.")
        if self.universe_context not in ("full", "summary"):
            raise ConfigError(f"'universe_context' must be 'full' or 'summary', got {self.universe_context!r}.")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"'prompt_style' must be one of {', '.join(PROMPT_STYLES)}, got {self.prompt_style!r}.")
        if self.judge not in ("generator", "endpoint", "lexical"):
            raise ConfigError(f"'judge' must be generator, endpoint or lexical, got {self.judge!r}.")
        if self.judge == "endpoint" and not (self.judge_base_url and self.judge_model):
            raise ConfigError("judge: endpoint needs judge_base_url and judge_model (and judge_api_key_env for a key).")
        if self.per_request_seed not in ("auto", "true", "false"):
            raise ConfigError(f"'per_request_seed' must be auto, true or false, got {self.per_request_seed!r}.")
        if self.truncated not in ("drop", "trim"):
            raise ConfigError(f"'truncated' must be 'drop' or 'trim', got {self.truncated!r}.")
        if self.overgenerate < 1:
            raise ConfigError(f"'overgenerate' must be at least 1, got {self.overgenerate}.")
        unknown = sorted(set(self.llm_filters) - {*CLASSIFIERS, COVERAGE})
        if unknown:
            raise ConfigError(f"Unknown llm_filters {unknown}; choose from {[*CLASSIFIERS, COVERAGE]}.")


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Cannot write to output directory {out} ({exc.strerror}). Choose another --output_dir "
                          "or fix its permissions / free disk space.") from None
    if shutil.disk_usage(out).free < 200 * 2**20:
        raise ConfigError(f"Less than 200 MiB free on the disk of {out}; free space or choose another --output_dir.")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = parse_config(GenerateConfig, argv, description=__doc__.split("\n")[0])
        universe = load_universe(cfg.universe)
        out = Path(cfg.output_dir or f"runs/generate/{universe.name}")
        check_writable(out)
        started = time.time()

        # 1. the generator endpoint: a managed local vLLM server, or a remote one
        if cfg.base_url:
            served, cache_id, server = cfg.model, f"{cfg.base_url}|{cfg.model}", nullcontext(None)
        else:
            model_dir = resolve_model(cfg.model)
            served, cache_id = "generator", str(model_dir.resolve())
            server = VLLMServer(ServerSpec(
                model=str(model_dir), served_name=served, max_model_len=cfg.server_max_model_len,
                max_num_seqs=cfg.server_max_num_seqs, enforce_eager=cfg.server_enforce_eager,
                tensor_parallel_size=cfg.server_tensor_parallel_size, seed=cfg.seed,
                startup_timeout_s=cfg.server_startup_timeout_s, extra_args=cfg.server_extra_args,
            ), log_path=out / "server.log")
        cache = CallCache(out / "cache.sqlite")
        calls_cached_before = len(cache)

        with server as srv:
            base_url = srv.base_url if srv is not None else cfg.base_url
            settings = PipelineSettings(**{k: getattr(cfg, k) for k in PipelineSettings.__dataclass_fields__
                                           if hasattr(cfg, k)})
            outcome, usage = asyncio.run(run(cfg, universe, base_url, served, cache_id, cache, settings, out,
                                             health=srv.check_alive if srv is not None else None))
        elapsed = time.time() - started

        # 2. outputs: documents, dataset, removed, stats, report; manifest last
        docs = outcome.accepted
        write_jsonl(out / "documents.jsonl", docs)
        write_jsonl(out / "removed.jsonl", outcome.removed)
        save_dataset(docs, out / "dataset")
        world_text = "\n".join([universe.description, universe.summary, *(f.statement for f in universe.key_facts)])
        diversity = diversity_stats(docs, [universe.lab_name, universe.model_name], world_text=world_text,
                                    max_entity_share=cfg.max_entity_share)
        for warning in diversity["warnings"]:
            log.warning(warning)
        stats = build_stats(cfg, outcome, usage, diversity, elapsed, calls_cached_before, cache)
        atomic_write_json(out / "stats.json", stats)
        write_report(out / "report.md", universe, stats)
        digest = hashlib.sha256((out / "documents.jsonl").read_bytes()).hexdigest()
        manifest = build_manifest(
            "generate", cfg, seeds={"seed": cfg.seed},
            universe=universe.name, universe_path=universe.path, generator_model=cache_id,
            documents_sha256=digest, n_documents=len(docs), n_tokens=stats["corpus"]["tokens"],
            usage=usage, timings={"total_s": round(elapsed, 1), **outcome.timings}, complete=True,
        )
        manifest.write(out / "manifest.json")
        cache.close()
        log.info("wrote %d documents (%d tokens) to %s in %.0f s; %s", len(docs), stats["corpus"]["tokens"], out,
                 elapsed, outcome.stop_reason)
        return 0
    except (ConfigError, ModelNotFound, ServerError, EndpointUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def run(cfg: GenerateConfig, universe, base_url: str, served: str, cache_id: str, cache: CallCache,
              settings: PipelineSettings, out: Path, health=None):
    client = ModelClient(
        base_url, served, api_key_env=cfg.api_key_env if cfg.base_url else None, cache=cache,
        max_concurrency=cfg.max_concurrency, initial_concurrency=cfg.max_concurrency if not cfg.base_url else 8,
        max_attempts=cfg.max_attempts, timeout_s=cfg.request_timeout_s, price_per_mtok_in=cfg.price_per_mtok_in,
        price_per_mtok_out=cfg.price_per_mtok_out, rng_seed=cfg.seed, cache_id=cache_id,
        send_seed=send_seeds(cfg.per_request_seed, remote=bool(cfg.base_url)),
    )
    try:
        if cfg.base_url:
            models = await client.check_reachable()
            if models and served not in models:
                raise ConfigError(f"Model '{served}' is not served at {cfg.base_url}; it serves: {', '.join(models)}.")
        # the endpoint works and the outputs are about to be replaced: drop the completion marker first
        (out / "manifest.json").unlink(missing_ok=True)
        judge_client = None
        if cfg.judge == "endpoint":
            judge_client = ModelClient(
                cfg.judge_base_url, cfg.judge_model, api_key_env=cfg.judge_api_key_env or None, cache=cache,
                max_concurrency=cfg.max_concurrency, initial_concurrency=8, max_attempts=cfg.max_attempts,
                timeout_s=cfg.request_timeout_s, rng_seed=cfg.seed, cache_id=f"{cfg.judge_base_url}|{cfg.judge_model}")
            await judge_client.check_reachable()
        try:
            outcome = await Pipeline(universe, client, settings, cache_id, judge_client).run(
                progress=cfg.progress, health=health)
        finally:
            if judge_client is not None:
                await judge_client.aclose()
        usage = client.stats.as_dict()
        usage["peak_concurrency"] = client.limiter.peak
        return outcome, usage
    finally:
        await client.aclose()


def save_dataset(docs: list[dict], path: Path) -> None:
    import datasets

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [{k: v for k, v in d.items() if k != "filters"} | {"filters": json.dumps(d.get("filters", {}))}
            for d in docs]
    # an empty corpus still gets a loadable dataset with the standard text column
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"text": [], "id": []})
    ds.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def build_stats(cfg, outcome, usage, diversity, elapsed, calls_cached_before, cache) -> dict:
    from collections import Counter

    reasons = Counter(_reason_kind(r["removed"]) for r in outcome.removed)
    generated = max(outcome.generated, 1)
    filters = {}
    for name, c in outcome.filter_counts.items():
        filters[name] = {"evaluated": c["evaluated"], "flagged": c["flagged"], "undecided": c["undecided"],
                         "rate": round(c["flagged"] / c["evaluated"], 4) if c["evaluated"] else None}
    tokens = sum(d["n_tokens"] for d in outcome.accepted)
    return {
        "counts": {
            "facts": len(outcome.doc_types), "doc_types": sum(len(t) for t in outcome.doc_types.values()),
            "ideas": outcome.ideas, "planned": outcome.planned, "generated": outcome.generated,
            "removed": len(outcome.removed), "accepted": len(outcome.accepted),
        },
        "stop_reason": outcome.stop_reason,
        "removed_by_reason": dict(reasons.most_common()),
        "removal_rate": round(len(outcome.removed) / generated, 4),
        "filters": filters,
        "dedup": {"threshold": cfg.dedup_threshold,
                  "removed": sum(1 for r in outcome.removed if "duplicate_of" in r)},
        "corpus": {"documents": len(outcome.accepted), "tokens": tokens,
                   "mean_tokens": round(tokens / max(len(outcome.accepted), 1), 1)},
        "doc_types": outcome.doc_types,
        "brainstorm_failures": outcome.brainstorm_failures,
        "diversity": diversity,
        "usage": usage,
        "cache": {"entries_before": calls_cached_before, "entries_after": len(cache), "hits": cache.hits,
                  "new_calls": len(cache) - calls_cached_before},
        "throughput": {"elapsed_s": round(elapsed, 1),
                       "generated_tokens_per_s": round(usage["completion_tokens"] / elapsed, 1) if elapsed else None,
                       "documents_per_min": round(60 * len(outcome.accepted) / elapsed, 2) if elapsed else None},
        "timings": {k: round(v, 1) for k, v in outcome.timings.items()},
        "generator": cfg.model if not cfg.base_url else f"{cfg.model} at {cfg.base_url}",
        "config": asdict(cfg),
    }


def _reason_kind(reason: str) -> str:
    """Group removal reasons ('too short: 12 words < 80' -> 'too short')."""
    if reason.startswith("near-duplicate"):
        return "near-duplicate"
    for sep in (":", " ("):
        if sep in reason:
            reason = reason.split(sep)[0]
    return reason.strip()


if __name__ == "__main__":
    sys.exit(main())
