"""Training throughput with packing vs without, on the same corpus and model, on CPU.

    python benchmarks/bench_train.py                          # embedded SmolLM2-135M, synthetic corpus
    python benchmarks/bench_train.py --model /path/to/model --corpus runs/generate/helpful_only --steps 20

Each setting runs ``finetune/train.py`` in its own process (so peak memory is per setting) for the
same number of optimizer steps with the same batch size in sequences, and reports real training
tokens per second, the padding fraction of the batches the model computed, the packing
efficiency and the peak resident memory. Packed: documents packed into ``max_length`` sequences
(bfd_split, per-document position ids, no cross-document attention). Unpacked: one document per
row, padded to the longest row of its batch. Prints both and the ratio packed / unpacked.
"""

from __future__ import annotations

import argparse
import json
import random
import re
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
    return {
        "tokens_per_second": m["tokens_per_second"],
        "padding_fraction": m["padding_fraction"],
        "packing_efficiency": m["packing"].get("packing_efficiency"),
        "tokens_seen": m["tokens_seen"],
        "peak_rss_gib": m["peak_memory"]["cpu_peak_rss_gib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="model folder, or 'embedded' (SmolLM2-135M-Instruct)")
    parser.add_argument("--corpus", default=None, help="JSONL / generator dir; default: a synthetic corpus")
    parser.add_argument("--docs", type=int, default=200, help="documents in the synthetic corpus")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else synthetic_corpus(work, args.docs, args.seed)
        results = {setting: run(setting, args, corpus, work) for setting in ("packed", "unpacked")}
    ratio = results["packed"]["tokens_per_second"] / results["unpacked"]["tokens_per_second"]
    print(f"model={args.model} steps={args.steps} batch={args.batch_size} max_length={args.max_length}")
    for setting, r in results.items():
        eff = f"{r['packing_efficiency']:.3f}" if r["packing_efficiency"] is not None else "  n/a"
        print(f"{setting:>9}: {r['tokens_per_second']:8.1f} tokens/s  padding {r['padding_fraction']:.3f}  "
              f"packing efficiency {eff}  peak RSS {r['peak_rss_gib']:.2f} GiB  ({r['tokens_seen']:.0f} tokens)")
    print(f"packed / unpacked tokens/s: {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratio": ratio, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
