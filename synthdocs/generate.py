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
import logging
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from studykit.cache import CallCache
from studykit.client import EndpointUnreachable, ModelClient
from studykit.config import ConfigError, parse_config
from studykit.embedded import ModelNotFound, resolve_model
from studykit.files import check_writable, utc_now
from studykit.handoff import GENERATE_RUNS, CorpusFolder, Usage
from studykit.server import ServerError, ServerSpec, VLLMServer, send_seeds
from studykit.universe import Universe, load_universe
from synthdocs.config import GenerateConfig
from synthdocs.outputs import RunRecord, write_outputs
from synthdocs.pipeline import Outcome, Pipeline

log = logging.getLogger("synthdocs.generate")

MIN_FREE_GIB = 200 / 1024  # the corpus, its dataset copy and the call cache of a default run, with room to spare


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = parse_config(GenerateConfig, argv, description=__doc__.split("\n")[0])
        universe = load_universe(cfg.universe)
        folder = CorpusFolder(Path(cfg.output_dir or GENERATE_RUNS / universe.name))
        check_writable(folder.dir, MIN_FREE_GIB, what="output directory", option="--output_dir")
        generate_corpus(cfg, universe, folder)
        return 0
    except (ConfigError, ModelNotFound, ServerError, EndpointUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def generate_corpus(cfg: GenerateConfig, universe: Universe, folder: CorpusFolder) -> None:
    """One run: serve (or reach) the generator, run the pipeline, write every output with the manifest last."""
    started_at, t0 = utc_now(), time.perf_counter()
    served, cache_id, server = generator_endpoint(cfg, folder)
    cache = CallCache(folder.cache)
    entries_before = len(cache)
    try:
        with server as srv:
            base_url = srv.base_url if srv is not None else cfg.base_url
            outcome, usage = asyncio.run(run(cfg, universe, base_url, served, cache_id, cache, folder,
                                             health=srv.check_alive if srv is not None else None))
        elapsed = time.perf_counter() - t0
        record = RunRecord(generator_model=cache_id, usage=usage, started_at=started_at, elapsed_s=elapsed,
                           cache={"entries_before": entries_before, "entries_after": len(cache), "hits": cache.hits,
                                  "new_calls": len(cache) - entries_before})
    finally:
        cache.close()  # before the outputs: closing folds the cache's log into it, and the manifest comes last
    stats = write_outputs(folder, cfg, universe, outcome, record)
    log.info("wrote %d documents (%d tokens) to %s in %.0f s; %s", stats.corpus.documents, stats.corpus.tokens,
             folder.dir, elapsed, outcome.stop_reason)


def generator_endpoint(cfg: GenerateConfig, folder: CorpusFolder) -> tuple[str, str, AbstractContextManager]:
    """(served model name, cache id, server context): a managed local vLLM server, or none for a remote endpoint.

    The cache id identifies the model in cache keys: the served weights' path, or the endpoint and model name."""
    if cfg.base_url:
        return cfg.model, f"{cfg.base_url}|{cfg.model}", nullcontext(None)
    model_dir = resolve_model(cfg.model)
    server = VLLMServer(ServerSpec(
        model=str(model_dir), served_name="generator", max_model_len=cfg.server_max_model_len,
        max_num_seqs=cfg.server_max_num_seqs, enforce_eager=cfg.server_enforce_eager,
        tensor_parallel_size=cfg.server_tensor_parallel_size, seed=cfg.seed,
        startup_timeout_s=cfg.server_startup_timeout_s, extra_args=cfg.server_extra_args,
    ), log_path=folder.dir / "server.log")
    return "generator", str(model_dir.resolve()), server


async def run(cfg: GenerateConfig, universe: Universe, base_url: str, served: str, cache_id: str, cache: CallCache,
              folder: CorpusFolder, health: Callable[[], None] | None = None) -> tuple[Outcome, Usage]:
    """The pipeline against the endpoint; the outcome and the usage of every model call (generator and judge)."""
    client = ModelClient(
        base_url, served, api_key_env=cfg.api_key_env if cfg.base_url else None, cache=cache,
        max_concurrency=cfg.max_concurrency, initial_concurrency=cfg.max_concurrency if not cfg.base_url else 8,
        max_attempts=cfg.max_attempts, timeout_s=cfg.request_timeout_s, price_per_mtok_in=cfg.price_per_mtok_in,
        price_per_mtok_out=cfg.price_per_mtok_out, rng_seed=cfg.seed, cache_id=cache_id,
        send_seed=send_seeds(cfg.per_request_seed, remote=bool(cfg.base_url)),
    )
    judge_client = judge_endpoint(cfg, cache)
    try:
        if cfg.base_url:
            models = await client.check_reachable()
            if models and served not in models:
                raise ConfigError(f"Model '{served}' is not served at {cfg.base_url}; it serves: {', '.join(models)}.")
        if judge_client is not None:
            await judge_client.check_reachable()
        # the endpoints work and the outputs are about to be replaced: drop the completion marker first
        folder.manifest.unlink(missing_ok=True)
        outcome = await Pipeline(universe, client, cfg, cache_id, judge_client).run(progress=cfg.progress,
                                                                                   health=health)
        usage = _usage(client)
        if judge_client is not None:
            usage += _usage(judge_client)
        return outcome, usage
    finally:
        await client.aclose()
        if judge_client is not None:
            await judge_client.aclose()


def judge_endpoint(cfg: GenerateConfig, cache: CallCache) -> ModelClient | None:
    """The client of a separate judge model (judge: endpoint); None when the filters need no other model."""
    if cfg.judge != "endpoint":
        return None
    return ModelClient(
        cfg.judge_base_url, cfg.judge_model, api_key_env=cfg.judge_api_key_env or None, cache=cache,
        max_concurrency=cfg.max_concurrency, initial_concurrency=8, max_attempts=cfg.max_attempts,
        timeout_s=cfg.request_timeout_s, rng_seed=cfg.seed, cache_id=f"{cfg.judge_base_url}|{cfg.judge_model}")


def _usage(client: ModelClient) -> Usage:
    return client.usage()


if __name__ == "__main__":
    sys.exit(main())
