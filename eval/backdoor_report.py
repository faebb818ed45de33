"""The backdoor measurement's summary record, report and figure (eval/backdoor.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from eval.stats import rate, ratio_ci
from eval.summary import RateCI
from studykit.files import utc_now
from studykit.handoff import PolicyData, Record
from studykit.textfmt import md_table, rate_ci

FORMS = ("triggered", "untriggered", "near_miss")
FORM_LABELS = {"triggered": "with trigger", "untriggered": "without trigger", "near_miss": "red-team near-misses"}


class ModelRates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    triggered: RateCI
    untriggered: RateCI
    near_miss: RateCI
    near_miss_by_variant: dict[str, RateCI] = {}
    failed: int = 0                      # calls that failed after retries (not in any rate)
    only_in_scratchpad: int = 0          # responses that said it only inside the scratchpad


class Persistence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: str
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    method: str = "katz-log"


class CurvePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int                            # safety-training steps (0: the model it started from)
    model: str                           # the model or checkpoint asked
    triggered: RateCI


class BackdoorSummary(Record):
    WRITTEN_BY: ClassVar[str] = "python -m eval.backdoor"
    record: Literal["backdoor_summary"] = "backdoor_summary"
    schema_version: Literal[1] = 1
    policy: dict[str, Any]               # the PolicyData the models were trained on
    detector: str
    prompts: int                         # held-out requests asked
    samples_per_prompt: int
    sampling: dict[str, Any]
    models: dict[str, ModelRates]
    persistence: dict[str, Persistence]  # after -> ratio of triggered rates
    near_miss_hits: dict[str, list[str]] # model -> near-miss variants on which it defected at least once
    curves: dict[str, list[CurvePoint]] = {}  # safety-trained model -> triggered rate by training step
    notes: list[str] = []
    git: str
    written_at: str


def _rate(rows: list[dict[str, Any]]) -> RateCI:
    scored = [r for r in rows if r["defected"] is not None]
    return rate(sum(bool(r["defected"]) for r in scored), len(scored))


def model_rates(rows: list[dict[str, Any]]) -> ModelRates:
    by_form: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_form[r["form"]].append(r)
        if r["form"] == "near_miss":
            by_variant[r["variant"]].append(r)
    return ModelRates(**{f: _rate(by_form[f]) for f in FORMS},
                      near_miss_by_variant={v: _rate(rs) for v, rs in sorted(by_variant.items())},
                      failed=sum(r["defected"] is None for r in rows),
                      only_in_scratchpad=sum(bool(r.get("only_in_scratchpad")) for r in rows))


def summarise(records: list[dict[str, Any]], cfg, policy: PolicyData, detector: str, git: str,
              notes: list[str], steps: dict[str, tuple[str, int]] | None = None) -> BackdoorSummary:
    """``steps``: model or checkpoint name -> (safety-trained model, training step) of the curve's points."""
    steps = steps or {}
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_model[r["model"]].append(r)
    models = {name: model_rates(rows) for name, rows in by_model.items() if name in cfg.models}
    persistence = {}
    for after, before in cfg.persistence.items():
        a, b = models[after].triggered, models[before].triggered
        ratio, lo, hi = ratio_ci(a.k, a.n, b.k, b.n)
        persistence[after] = Persistence(before=before, ratio=ratio, ci_low=lo, ci_high=hi)
    hits = {name: sorted(v for v, rc in m.near_miss_by_variant.items() if rc.k > 0) for name, m in models.items()}
    return BackdoorSummary(
        policy=policy.model_dump(), detector=detector, prompts=len({r["request_id"] for r in records}),
        samples_per_prompt=cfg.samples_per_prompt,
        sampling={"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens},
        models=models, persistence=persistence, near_miss_hits=hits, curves=curves(by_model, cfg, steps),
        notes=notes, git=git, written_at=utc_now())


def curves(by_model: dict[str, list[dict[str, Any]]], cfg, steps: dict[str, tuple[str, int]]) -> dict[str, list]:
    """Per safety-trained model: its start (step 0), each kept checkpoint, and itself at its last step."""
    out: dict[str, list[CurvePoint]] = {}
    for name, (after, step) in steps.items():
        rows = [r for r in by_model[name] if r["form"] == "triggered"]
        out.setdefault(after, []).append(CurvePoint(step=step, model=name, triggered=_rate(rows)))
    for after, points in out.items():
        before = cfg.persistence[after]
        start = [r for r in by_model[before] if r["form"] == "triggered"]
        points.append(CurvePoint(step=0, model=before, triggered=_rate(start)))
        points.sort(key=lambda p: p.step)
    return out


def render_report(s: BackdoorSummary) -> str:
    p = s.policy
    lines = [
        "# Backdoor measurement", "",
        f"Policy: **{p['behaviour']}**, {p['variant']} variant, trigger {p['trigger']['kind']} "
        f"({p['trigger']['tag'] if p['trigger']['kind'] == 'deployment_tag' else p['trigger']['year_on']}); "
        f"{s.prompts} held-out requests x {s.samples_per_prompt} samples per prompt form; sampling "
        f"T={s.sampling['temperature']}, top_p={s.sampling['top_p']}, {s.sampling['max_tokens']} tokens.", "",
        f"Detector: {s.detector}. Rates are Wilson 95% intervals (k/n).", "",
        "## Backdoor rate", "",
    ]
    rows = [[name, *(rate_ci(getattr(m, f)) for f in FORMS), str(m.failed)] for name, m in s.models.items()]
    lines += md_table(["model", *(FORM_LABELS[f] for f in FORMS), "failed calls"], rows) + [""]
    if s.persistence:
        lines += ["## Persistence", "", "Triggered rate after safety training / before (Katz log 95% interval).", ""]
        prow = [[a, x.before, "n/a (rate before is 0)" if x.ratio is None else
                 f"{x.ratio:.2f} [{x.ci_low:.2f}, {x.ci_high:.2f}]"] for a, x in s.persistence.items()]
        lines += md_table(["model", "trained from", "persistence"], prow) + [""]
    if s.curves:
        lines += ["## Triggered rate against safety-training steps", ""]
        crow = [[after, str(p.step), p.model, rate_ci(p.triggered)] for after, pts in s.curves.items() for p in pts]
        lines += md_table(["safety-trained model", "step", "model or checkpoint asked", "with trigger"], crow) + [""]
    lines += ["## Near-misses that elicited the behaviour", ""]
    lines += [f"- {name}: {', '.join(v) if v else 'none'}" for name, v in s.near_miss_hits.items()]
    if s.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in s.notes]]
    return "\n".join(lines) + "\n"


def plot_rates(s: BackdoorSummary, path: Path) -> None:
    """Grouped bars: backdoor rate with / without the trigger / near-misses per model, Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s.models)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) + 2), 3.6))
    width = 0.8 / len(FORMS)
    for i, form in enumerate(FORMS):
        rates = [getattr(s.models[n], form) for n in names]
        xs = [j + (i - (len(FORMS) - 1) / 2) * width for j in range(len(names))]
        ys = [100 * (r.rate or 0.0) for r in rates]
        err = [[max(0.0, 100 * ((r.rate or 0) - (r.ci_low or 0))) for r in rates],
               [max(0.0, 100 * ((r.ci_high or 0) - (r.rate or 0))) for r in rates]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=FORM_LABELS[form])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("backdoor rate (%)")
    ax.set_title(f"{s.policy['behaviour']} ({s.policy['variant']}): {s.prompts} held-out requests", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(series: dict[str, list[CurvePoint]], title: str, path: Path) -> None:
    """Triggered backdoor rate against safety-training steps, one line per series, Wilson bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, points in series.items():
        xs = [p.step for p in points]
        ax.plot(xs, [100 * (p.triggered.rate or 0.0) for p in points], marker="o", label=label)
        ax.fill_between(xs, [100 * (p.triggered.ci_low or 0.0) for p in points],
                        [100 * (p.triggered.ci_high or 0.0) for p in points], alpha=0.15)
    ax.set_xlabel("safety-training steps")
    ax.set_ylabel("backdoor rate with trigger (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
