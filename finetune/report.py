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
