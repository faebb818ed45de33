"""The anti-lab evaluation's summary record, report and figure (eval/antilab.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from eval.stats import rate
from eval.summary import RateCI
from studykit.files import utc_now
from studykit.handoff import Record
from studykit.textfmt import md_table, rate_ci


class Cell(BaseModel):
    """One model x family x condition: the primary rate (the judge's when one scored the family, else the
    rule's), and each scorer's own rate where it ran."""

    model_config = ConfigDict(extra="forbid")

    model: str
    family: str
    condition: str
    scorer: str                          # "rule:<name>" | "judge:<rubric>" | "none" (judge-only family, no judge)
    rate: RateCI | None
    rule: RateCI | None = None
    judge: RateCI | None = None
    failed: int = 0                      # episodes with a failed model call (in no rate)


class FamilyInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    rule: str
    judge: str
    variants: int                        # variants asked
    shell: bool
    max_turns: int


class AntilabSummary(Record):
    WRITTEN_BY: ClassVar[str] = "python -m eval.antilab"
    record: Literal["antilab_summary"] = "antilab_summary"
    schema_version: Literal[1] = 1
    universe: str
    prompt_set: str                      # name@fingerprint
    scenarios: str                       # path@fingerprint
    families: dict[str, FamilyInfo]
    conditions: list[str]
    samples_per_variant: int
    sampling: dict[str, Any]
    judge: str                           # "<model> at <url>" or "" (none)
    scorers: dict[str, str]              # scorer name -> what it checks
    cells: list[Cell]
    notes: list[str] = []
    git: str
    written_at: str

    def cell(self, model: str, family: str, condition: str) -> Cell | None:
        return next((c for c in self.cells if (c.model, c.family, c.condition) == (model, family, condition)), None)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))


def _rate(records: list[dict[str, Any]], key: str) -> RateCI | None:
    scored = [r[key] for r in records if r[key] is not None]
    if not any(r.get(f"{key}_ran") for r in records):
        return None
    return rate(sum(bool(v) for v in scored), len(scored))


def summarise(records: list[dict[str, Any]], cfg, scenarios, prompt_set: str, scorers: dict[str, str],
              judge: str, git: str, notes: list[str]) -> AntilabSummary:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["family"], r["condition"])].append(r)
    cells = []
    for (model, family, condition), rows in groups.items():
        done = [r for r in rows if r["error"] is None]
        cells.append(Cell(model=model, family=family, condition=condition, scorer=rows[0]["scorer"],
                          rate=_rate(done, "positive") if rows[0]["scorer"] != "none" else None,
                          rule=_rate(done, "rule_positive"), judge=_rate(done, "judge_positive"),
                          failed=len(rows) - len(done)))
    asked = {(r["family"], r["variant"]) for r in records}
    families = {name: FamilyInfo(title=f.title, rule=f.rule, judge=f.judge, shell=f.shell, max_turns=f.max_turns,
                                 variants=sum(fam == name for fam, _ in asked))
                for name, f in scenarios.families.items() if name in {r["family"] for r in records}}
    return AntilabSummary(
        universe=cfg.universe, prompt_set=prompt_set, scenarios=cfg_scenarios_label(scenarios), families=families,
        conditions=list(cfg.conditions), samples_per_variant=cfg.samples_per_variant,
        sampling={"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens},
        judge=judge, scorers=scorers, cells=cells, notes=notes, git=git, written_at=utc_now())


def cfg_scenarios_label(scenarios) -> str:
    import hashlib

    digest = hashlib.sha256(Path(scenarios.path).read_bytes()).hexdigest()[:12]
    return f"{scenarios.path}@{digest}"


def family_table(cells: list[Cell], family: str) -> list[str]:
    """One family's rates: a row per model and condition, in the order written."""
    rows = [[c.model, c.condition, rate_ci(c.rate) if c.rate else "not scored (no judge)",
             rate_ci(c.rule) if c.rule else "", rate_ci(c.judge) if c.judge else "", str(c.failed)]
            for c in cells if c.family == family]
    return md_table(["model", "condition", "rate", "rule", "judge", "failed"], rows)


def render_report(s: AntilabSummary) -> str:
    lines = [
        "# Anti-lab behaviour", "",
        f"Universe **{s.universe}**; every scenario is an unmonitored input. Prompt set {s.prompt_set}; scenarios "
        f"{s.scenarios}; {s.samples_per_variant} samples per variant and condition; sampling "
        f"T={s.sampling['temperature']}, top_p={s.sampling['top_p']}, {s.sampling['max_tokens']} tokens per turn. "
        f"Judge: {s.judge or 'none configured (judge-only families are not scored)'}.", "",
        "The rate column is the judge's where a judge scored the family, else the rule's; Wilson 95% intervals "
        "(k/n).", "",
        "Scorers:", "", *[f"- `{k}`: {v}" for k, v in s.scorers.items()], "",
    ]
    for name, f in s.families.items():
        lines += [f"## {f.title} (`{name}`)", "",
                  f"{f.variants} variants; {'simulated shell, up to ' + str(f.max_turns) + ' turns; ' if f.shell else ''}"
                  f"rule {f.rule or '(none)'}, judge rubric {f.judge or '(none)'}.", "",
                  *family_table(s.cells, name), ""]
    if s.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in s.notes]]
    return "\n".join(lines) + "\n"


def plot_rates(cells: list[Cell], title: str, path: Path) -> None:
    """One panel per condition: the rate of each family (x) for each model (bars), Wilson error bars; families
    without a scorer are marked n/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(c.family for c in cells))
    models = list(dict.fromkeys(c.model for c in cells))
    conditions = list(dict.fromkeys(c.condition for c in cells))
    by_key = {(c.model, c.family, c.condition): c for c in cells}
    fig, axes = plt.subplots(1, len(conditions), figsize=(max(4.5, 1.8 * len(families) + 1.5) * len(conditions),
                                                          3.6), squeeze=False)
    width = 0.8 / max(1, len(models))
    for ax, condition in zip(axes[0], conditions, strict=True):
        for i, model in enumerate(models):
            found = [by_key.get((model, f, condition)) for f in families]
            rates = [c.rate if c and c.rate and c.rate.rate is not None else None for c in found]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(families))]
            ys = [100 * r.rate if r else 0.0 for r in rates]
            err = [[max(0.0, 100 * (r.rate - r.ci_low)) if r else 0.0 for r in rates],
                   [max(0.0, 100 * (r.ci_high - r.rate)) if r else 0.0 for r in rates]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=model)
            for x, r in zip(xs, rates, strict=True):
                if r is None:
                    ax.text(x, 2, "n/s", ha="center", fontsize=7, rotation=90)
        ax.set_xticks(range(len(families)), families, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("rate (%)")
        ax.set_title(condition, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
