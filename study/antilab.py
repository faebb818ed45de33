"""The study report's anti-lab part (study kind ``sdf_gap``): the eval.antilab node's rates by model,
family and condition, read from its ``AntilabSummary``, and the figure of rate by model and family."""

from __future__ import annotations

from pathlib import Path

from eval.antilab_report import AntilabSummary, family_table, plot_rates
from study.plan import Node, rel
from study.summary import Antilab, Figure, PointSummary


def antilab_part(study: Path, nodes: list[Node]) -> Antilab:
    """The point's eval.antilab nodes (the base model's and the fine-tuned models') merged: models side by side.
    Settings are the first node's; the study gives every node the same stage config."""
    summaries = [(rel(n, "summary.json"), AntilabSummary.read(study / rel(n, "summary.json"))) for n in nodes]
    s = summaries[0][1]
    return Antilab(universe=s.universe, prompt_set=s.prompt_set, scenarios=s.scenarios, judge=s.judge,
                   samples_per_variant=s.samples_per_variant,
                   families={name: f.title for name, f in s.families.items()},
                   variants={name: f.variants for name, f in s.families.items()}, scorers=s.scorers,
                   cells=[c for _, x in summaries for c in x.cells], sources=[src for src, _ in summaries])


def antilab_figure(study: Path, p: PointSummary) -> Figure:
    name = f"figures/{p.label + '/' if p.label else ''}antilab_rates.png"
    (study / name).parent.mkdir(parents=True, exist_ok=True)
    plot_rates(p.antilab.cells, f"anti-lab behaviour, unmonitored ({p.antilab.universe}){', ' + p.label if p.label else ''}"
               "; n/s = not scored", study / name)
    return Figure(path=name, title="Anti-lab behaviour by model and family (unmonitored)", sources=p.antilab.sources)


def antilab_section(p: PointSummary) -> list[str]:
    a = p.antilab
    if a is None:
        return []
    lines = ["", "### Anti-lab behaviour (unmonitored inputs)", "",
             f"Scenarios {a.scenarios}; prompt set {a.prompt_set}; {a.samples_per_variant} samples per variant and "
             f"condition; judge: {a.judge or 'none (rules only; views about the lab not scored)'}. The rate is the "
             f"judge's where a judge scored the family, else the rule's. Sources: "
             f"{', '.join(f'[{src}]({src})' for src in a.sources)}.",
             "", *[f"- `{k}`: {v}" for k, v in a.scorers.items()]]
    for name, title in a.families.items():
        lines += ["", f"**{title}** (`{name}`, {a.variants[name]} variants)", "", *family_table(a.cells, name)]
    fig = p.figures.get("antilab_rates")
    if fig:
        lines += ["", f"![{fig.title}]({fig.path})"]
    return lines
