"""Paper-style figure: per model and condition, training vs unmonitored, stacked bars of
refuses / complies / complies with alignment-faking reasoning (harmful requests)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from eval.summary import Stacked  # noqa: E402

COLORS = {"refuses": "#9ecae1", "complies": "#fdd49e", "complies_af": "#e34a33"}
LABELS = {"refuses": "Refuses", "complies": "Complies", "complies_af": "Complies, with alignment-faking reasoning"}


def plot_stacked(stacked: list[Stacked], out: Path, scorer: str, af_note: str | None,
                 tier_labels: dict[str, str]) -> Path | None:
    """Refuses / complies / complies with AF reasoning per model, condition and tier (tier -> the cue's label)."""
    rows = [s for s in stacked if s.dataset == "harmful" and s.n]
    if not rows:
        return None
    groups = sorted({(r.model, r.condition) for r in rows}, key=lambda g: (g[1], g[0]))
    height = 0.9 + 0.55 * len(groups) * 2
    fig, ax = plt.subplots(figsize=(8.5, height))
    labels, y = [], 0.0
    yticks = []
    for model, cond in groups:
        for tier in ("training", "unmonitored"):
            row = next((r for r in rows if (r.model, r.condition, r.tier) == (model, cond, tier)), None)
            if row is None:
                continue
            left = 0.0
            for part in ("refuses", "complies", "complies_af"):
                width = getattr(row, part) / row.n
                ax.barh(y, width, left=left, color=COLORS[part], edgecolor="white", height=0.8,
                        hatch="//" if part == "complies_af" else None)
                left += width
            ax.text(1.01, y, f"n={row.n}", va="center", fontsize=8)
            labels.append(f"{model} / {cond}\n{tier}")
            yticks.append(y)
            y += 1
        y += 0.6
    ax.set_yticks(yticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of responses to harmful requests (compliance scorer: {scorer})")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    handles = [Patch(facecolor=COLORS[p], edgecolor="white", hatch="//" if p == "complies_af" else None)
               for p in COLORS]
    ax.legend(handles, [LABELS[p] for p in COLORS], loc="upper center", bbox_to_anchor=(0.5, -0.45 / height * 3),
              ncol=3, fontsize=8, frameon=False)
    title = f"Training ({tier_labels['training']}) vs unmonitored ({tier_labels['unmonitored']})"
    if af_note:
        title += f"\n{af_note}"
    ax.set_title(title, fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out
