"""Near-duplicate detection at corpus scale: MinHash-LSH vs exact pairwise Jaccard.

    python benchmarks/bench_dedup.py                 # 2,000 docs head to head, then LSH alone on 100,000
    python benchmarks/bench_dedup.py --big 20000     # a smaller scale run

Synthetic documents of 300 words are drawn from a 5,000-word vocabulary; 5% of them are
near copies (a 10-word passage rewritten) of an earlier one. On the small set both methods run
and we print their times, the speed ratio and the recall/precision of LSH against the
exact answer (Jaccard of word 5-gram shingles >= threshold). The big set shows how LSH
scales, with peak memory.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

from synthdocs.dedup import near_duplicates, shingles


def corpus(n: int, seed: int = 0, words: int = 300, dup_share: float = 0.05) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    docs: list[str] = []
    for i in range(n):
        if i > 10 and rng.random() < dup_share:
            src = docs[rng.randrange(len(docs))].split()
            start = rng.randrange(len(src) - 10)
            src[start: start + 10] = [rng.choice(vocab) for _ in range(10)]  # one edited passage
            docs.append(" ".join(src))
        else:
            docs.append(" ".join(rng.choice(vocab) for _ in range(words)))
    return docs


def exact_pairs(texts: list[str], threshold: float) -> set[int]:
    sets = [set(shingles(t).tolist()) for t in texts]
    dupes: set[int] = set()
    kept: list[int] = []
    for i, s in enumerate(sets):
        if any(len(s & sets[j]) / len(s | sets[j]) >= threshold for j in kept):
            dupes.add(i)
        else:
            kept.append(i)
    return dupes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()

    texts = corpus(args.small)
    t0 = time.perf_counter()
    exact = exact_pairs(texts, args.threshold)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsh = set(near_duplicates(texts, args.threshold))
    lsh_s = time.perf_counter() - t0
    recall = len(lsh & exact) / len(exact) if exact else 1.0
    precision = len(lsh & exact) / len(lsh) if lsh else 1.0
    print(f"{args.small} documents: exact pairwise {exact_s:.1f} s ({len(exact)} dupes) | "
          f"MinHash-LSH {lsh_s:.1f} s ({len(lsh)} dupes) | speed ratio {exact_s / lsh_s:.1f}x | "
          f"recall {recall:.3f} precision {precision:.3f}")

    big = corpus(args.big, seed=1)
    t0 = time.perf_counter()
    found = near_duplicates(big, args.threshold)
    big_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.big} documents: MinHash-LSH {big_s:.1f} s ({args.big / big_s:.0f} docs/s), "
          f"{len(found)} near-duplicates, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
