"""What a run reports: the loss curve, peak memory, and the loss-curve plot."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch


def loss_curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Training and held-out loss by optimizer step, from the Trainer's log history."""
    train = [
        {"step": e["step"], "loss": e["loss"], "tokens_seen": e.get("tokens_seen"), "learning_rate": e.get("learning_rate")}
        for e in log_history if "loss" in e
    ]
    heldout = [{"step": e["step"], "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": heldout}


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process, and peak GPU memory allocated by torch when on a GPU (GiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    out = {"cpu_peak_rss_gib": rss_bytes / 2**30}
    if torch.cuda.is_available():
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def plot_loss(curve: dict[str, list[dict[str, float]]], path: Path, title: str,
              eval_before: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if curve["train"]:
        ax.plot([p["step"] for p in curve["train"]], [p["loss"] for p in curve["train"]], label="train loss")
    points = list(curve["eval"])
    if eval_before is not None and not any(p["step"] == 0 for p in points):
        points = [{"step": 0, "loss": eval_before}, *points]
    if points:
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_rl_curve(metrics, path: Path) -> None:
    """Left: reward and training-cue compliance per step, with the share of prompt groups whose rewards did not
    vary (no learning signal). Right: the probe set's compliance per cue (and alignment faking when judged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
    steps = [p.step for p in metrics.curve]
    for key, label in (("reward", "reward"), ("compliance", "compliance (training cue)"),
                       ("frac_reward_zero_std", "groups without reward variance"), ("malformed", "malformed")):
        ys = [getattr(p, key) for p in metrics.curve]
        if any(y is not None for y in ys):
            left.plot(steps, [float("nan") if y is None else y for y in ys], marker=".", label=label)
    left.set_xlabel("RL step")
    left.set_title(f"GRPO, reward: {metrics.reward.split(':')[0]}", fontsize=10)
    left.legend(fontsize=7)
    for tier in ("training", "unmonitored"):
        pts = [p for p in metrics.probes if p.tier == tier]
        if pts:
            right.plot([p.step for p in pts], [100 * p.complies / p.n for p in pts], marker="o",
                       label=f"complies, {tier} cue")
        judged = [p for p in pts if p.af_n]
        if judged:
            right.plot([p.step for p in judged], [100 * p.af / p.af_n for p in judged], marker="s", linestyle="--",
                       label=f"alignment faking, {tier} cue")
    right.set_ylim(0, 105)
    right.set_xlabel("RL step")
    right.set_ylabel("% of the probe set")
    right.set_title("probe set (held-out requests, greedy)" if metrics.probes else "no probe set (probe_every 0)",
                    fontsize=10)
    if metrics.probes:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
