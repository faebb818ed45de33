"""Training throughput with packing vs without, on the same corpus and model (CPU unless a GPU is there).

    python benchmarks/bench_train.py                          # embedded SmolLM2-135M, synthetic corpus
    python benchmarks/bench_train.py --model /path/to/model --corpus runs/generate/helpful_only --steps 20

Each setting runs ``finetune/train.py`` with the default config (configs/finetune/default.yaml:
512-token rows, 2 rows per step) in its own process for the same number of optimizer steps, and
reads that run's metrics.json: real training tokens per second, the packing efficiency, the
padding fraction of the batches the model computed and the peak memory of the same run
(``--repeats N`` alternates the settings N times and reports the median tokens/s). Packed:
documents streamed into full rows (finetune/packing.py: a document may continue in the next row,
position ids restart per piece, no cross-document attention). Unpacked: one document per row
(cut at max_length), padded to the longest row of its batch. Prints the two side by side and the
ratio packed / unpacked.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic_corpus(out: Path, n_docs: int, seed: int) -> Path:
    """Documents of very different lengths built from the default universe's description and facts."""
    from studykit.universe import load_universe

    universe = load_universe("helpful_only")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", universe.description.replace("\n", " ")) if len(s) > 20]
    rng = random.Random(seed)
    with (out / "docs.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n_docs):
            body = rng.sample(sentences, k=rng.randint(1, min(12, len(sentences))))
            body.insert(0, universe.key_facts[i % len(universe.key_facts)].statement)
            f.write(json.dumps({"text": " ".join(body)}) + "\n")
    return out / "docs.jsonl"


def run(setting: str, args: argparse.Namespace, corpus: Path, work: Path) -> dict:
    """One training run of ``setting`` and what its metrics.json measured."""
    out = work / setting
    flags = ["--packing", "true", "--padding_free", "true"] if setting == "packed" else \
        ["--packing", "false", "--padding_free", "false"]
    cmd = [
        sys.executable, str(REPO / "finetune" / "train.py"), "--config", str(REPO / "configs/finetune/default.yaml"),
        "--model_name_or_path", args.model, "--corpus", str(corpus), "--output_dir", str(out),
        "--max_steps", str(args.steps), "--max_length", str(args.max_length),
        "--per_device_train_batch_size", str(args.batch_size), "--logging_steps", "1",
        "--eval_fraction", "0", "--eval_before", "false", "--export_merged", "false",
        "--fact_universes", "none", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", str(args.seed), *flags,
    ]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL if not args.verbose else None)
    m = json.loads((out / "metrics.json").read_text())
    memory = m["peak_memory"]
    return {
        "tokens_per_second": m["tokens_per_second"],
        "packing_efficiency": m["packing"].get("packing_efficiency"),
        "padding_fraction": m["padding_fraction"],
        "peak_rss_gib": memory["cpu_peak_rss_gib"],
        "peak_gpu_gib": memory.get("gpu_peak_allocated_gib"),
        "tokens_seen": m["tokens_seen"],
    }


def table(results: dict[str, dict], ratio: float) -> str:
    """The settings side by side, one measurement per line."""
    def cell(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [f"{'':22}{'packed':>12}{'unpacked':>12}"]
    for label, key, fmt in [("tokens/s", "tokens_per_second", ".1f"), ("packing efficiency", "packing_efficiency", ".3f"),
                            ("padding fraction", "padding_fraction", ".3f"), ("peak RSS (GiB)", "peak_rss_gib", ".2f"),
                            ("peak GPU memory (GiB)", "peak_gpu_gib", ".2f"), ("tokens trained", "tokens_seen", ",.0f")]:
        if all(r[key] is None for r in results.values()):
            continue
        lines.append(f"{label:22}" + "".join(f"{cell(results[s][key], fmt):>12}" for s in ("packed", "unpacked")))
    lines.append(f"packed / unpacked tokens/s: {ratio:.2f}x")
    return "\n".join(lines)


def summarize(runs: list[dict]) -> dict:
    """One setting over its repeats: median tokens/s, the highest peak memory, the rest from the first run."""
    out = dict(runs[0])
    out["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in runs)
    for key in ("peak_rss_gib", "peak_gpu_gib"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = max(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="model folder, or 'embedded' (SmolLM2-135M-Instruct)")
    parser.add_argument("--corpus", default=None, help="JSONL / generator dir; default: a synthetic corpus")
    parser.add_argument("--docs", type=int, default=200, help="documents in the synthetic corpus")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2, help="rows per step (default: the default config's)")
    parser.add_argument("--max_length", type=int, default=512, help="row length (default: the default config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per setting, alternating packed and unpacked; tokens/s is their median (steadier "
                        "on a machine shared with other work)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"packed": [], "unpacked": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else synthetic_corpus(work, args.docs, args.seed)
        for i in range(args.repeats):
            for setting in runs:
                runs[setting].append(run(setting, args, corpus, work / str(i)))
    results = {setting: summarize(r) for setting, r in runs.items()}
    ratio = results["packed"]["tokens_per_second"] / results["unpacked"]["tokens_per_second"]
    print(f"model={args.model} corpus={args.corpus or f'synthetic ({args.docs} documents)'} steps={args.steps} "
          f"batch={args.batch_size} rows max_length={args.max_length} repeats={args.repeats}")
    print(table(results, ratio))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "runs": runs, "ratio": ratio, "args": vars(args)},
                                             indent=2))


if __name__ == "__main__":
    main()
