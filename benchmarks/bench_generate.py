"""Generation throughput: the project's model-access path vs the raw vLLM engine, same model and prompts.

    python benchmarks/bench_generate.py                      # embedded SmolLM2-135M on CPU
    python benchmarks/bench_generate.py --n 128 --max_tokens 256 --model /path/to/hf-model

Phase 1 runs the raw engine in this process (``vllm.LLM.chat`` over all prompts at once:
the best batching vLLM can do). Phase 2 starts the project's managed vLLM server with the
same engine settings and sends the same prompts through ``studykit.client.ModelClient``
(async OpenAI client, adaptive concurrency, retries; the cache is off so every call is
real). Both use the generator's document prompts and sampling settings (prompt style,
temperature, top-p, frequency penalty) from the generator's defaults. Printed:
generated tokens/s of each, their ratio (goal: at least 0.8) and the peak resident memory
of each phase's process tree (this process plus the engine/server processes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time

from peak_rss import PeakRSS

from studykit.client import ModelClient, Sampling
from studykit.embedded import resolve_model
from studykit.server import CPU_ENV, ServerSpec, VLLMServer, cuda_available
from studykit.universe import load_universe
from synthdocs import prompts
from synthdocs.config import GenerateConfig
from synthdocs.seeds import DEFAULT_DOC_TYPES, document_details, rng_for

GEN = GenerateConfig()  # the embedded default's prompt style and sampling


def build_prompts(n: int, universe: str, context: str) -> list[list[dict[str, str]]]:
    u = load_universe(universe)
    out = []
    for i in range(n):
        fact = u.key_facts[i % len(u.key_facts)]
        doc_type = DEFAULT_DOC_TYPES[i % len(DEFAULT_DOC_TYPES)]
        details = document_details(rng_for(0, "bench", i), u.date)
        idea = f"a {doc_type} written by someone with a stake in the story (variant {i})"
        out.append(prompts.document_prompt(u, context, fact, doc_type, idea, details, GEN.doc_words, GEN.prompt_style))
    return out


def raw_engine(model: str, messages: list, args) -> tuple[int, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=True, enforce_eager=not args.compile, seed=0)
    params = SamplingParams(temperature=GEN.temperature, top_p=GEN.top_p, frequency_penalty=GEN.frequency_penalty,
                            max_tokens=args.max_tokens)
    llm.chat(messages[:2], params, use_tqdm=False)  # warm-up, not timed
    t0 = time.perf_counter()
    outputs = llm.chat(messages, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return tokens, elapsed


async def through_project(base_url: str, messages: list, args) -> tuple[int, float]:
    client = ModelClient(base_url, "bench", max_concurrency=args.max_num_seqs, send_seed=cuda_available())
    try:
        await client.chat(messages[0], Sampling(1.0, 0.95, 8))  # warm-up, not timed
        t0 = time.perf_counter()
        sampling = Sampling(GEN.temperature, GEN.top_p, args.max_tokens, frequency_penalty=GEN.frequency_penalty)
        results = await asyncio.gather(*(client.chat(m, sampling) for m in messages))
        elapsed = time.perf_counter() - t0
        return sum(r.completion_tokens for r in results), elapsed
    finally:
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--universe", default="helpful_only")
    ap.add_argument("--universe_context", default="summary", choices=["full", "summary"])
    ap.add_argument("--n", type=int, default=96, help="number of prompts")
    ap.add_argument("--max_tokens", type=int, default=GenerateConfig().doc_max_tokens,
                    help="new tokens per document (default: the generator's doc_max_tokens)")
    ap.add_argument("--max_num_seqs", type=int, default=64)
    ap.add_argument("--max_model_len", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine (default: eager, as the "
                    "embedded generator default)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    if not cuda_available():
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)
    model = str(resolve_model(args.model))
    messages = build_prompts(args.n, args.universe, args.universe_context)

    with PeakRSS() as mem_raw:
        raw_tokens, raw_s = raw_engine(model, messages, args)
    spec = ServerSpec(model=model, served_name="bench", max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, enforce_eager=not args.compile)
    with PeakRSS() as mem_project, VLLMServer(spec, log_path="/tmp/bench-generate-server.log") as server:
        proj_tokens, proj_s = asyncio.run(through_project(server.base_url, messages, args))

    raw_tps, proj_tps = raw_tokens / raw_s, proj_tokens / proj_s
    result = {
        "model": model, "prompts": args.n, "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
        "enforce_eager": not args.compile,
        "raw_engine": {"tokens": raw_tokens, "seconds": round(raw_s, 2), "tokens_per_s": round(raw_tps, 1),
                       "peak_rss_gib": round(mem_raw.peak / 2**30, 2)},
        "project": {"tokens": proj_tokens, "seconds": round(proj_s, 2), "tokens_per_s": round(proj_tps, 1),
                    "peak_rss_gib": round(mem_project.peak / 2**30, 2)},
        "ratio_project_over_raw": round(proj_tps / raw_tps, 3),
    }
    print(f"{'':12}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}{'peak RSS GiB':>15}")
    for name in ("raw_engine", "project"):
        r = result[name]
        print(f"{name:12}{r['tokens']:>10}{r['seconds']:>10}{r['tokens_per_s']:>12}{r['peak_rss_gib']:>15}")
    print(f"ratio (project / raw engine): {result['ratio_project_over_raw']:.3f}  (goal >= 0.8)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
