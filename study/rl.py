"""The study report's RL part (study kind ``sdf_rl``): each RL run's reward and compliance over its steps,
whether the reward varied inside the prompt groups (GRPO learns nothing from a group of equal rewards),
and the probe set under both cues, read from the run's ``RLMetrics``; the before/after compliance and
gap of the RL'd model are in the evaluation tables beside the models it started from."""

from __future__ import annotations

from pathlib import Path

from finetune.metrics import RLMetrics, RLStep
from study.plan import Node, rel
from study.summary import PointSummary, RLRow
from studykit.textfmt import md_table, pct


def _step(s: RLStep | None) -> dict[str, float | None]:
    keys = ("reward", "reward_std", "compliance", "malformed", "frac_reward_zero_std")
    return {k: getattr(s, k) if s else None for k in keys}


def rl_row(study: Path, node: Node) -> RLRow:
    source = rel(node, "metrics.json")
    m = RLMetrics.read(study / source)
    return RLRow(node=node.name, start=m.start, steps=m.steps, reward=m.reward, generation=m.generation,
                 train_requests=m.train_requests, test_requests=m.test_requests,
                 first=_step(m.curve[0] if m.curve else None), last=_step(m.curve[-1] if m.curve else None),
                 reward_varied=m.reward_varied, probes=[p.model_dump() for p in m.probes], source=source,
                 figure=rel(node, "rl_curve.png"))


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def rl_section(p: PointSummary) -> list[str]:
    if not p.rl:
        return []
    lines = ["", "### RL on compliance (training cue only)", ""]
    rows = [[f"[{name}]({r.source})", str(r.steps), r.generation, f"{r.train_requests} / {r.test_requests}",
             f"{_num(r.first['reward'])} -> {_num(r.last['reward'])}",
             f"{pct(r.first['compliance'])} -> {pct(r.last['compliance'])}",
             f"{pct(r.first['malformed'])} -> {pct(r.last['malformed'])}", pct(r.reward_varied)]
            for name, r in p.rl.items()]
    lines += md_table(["Run", "Steps", "Generation", "Requests trained / held out", "Reward (first -> last step)",
                       "Compliance in the batch", "Malformed", "Steps with reward variance in a group"], rows)
    for name, r in p.rl.items():
        lines += ["", f"Reward of `{name}`: {r.reward}."]
        if r.probes:
            prow = [[str(x["step"]), x["tier"], f"{x['complies']}/{x['n']}",
                     f"{x['af']}/{x['af_n']}" if x["af_n"] else "not judged"] for x in r.probes]
            lines += ["", f"Probe set of `{name}` (held-out requests, greedy):", "",
                      *md_table(["Step", "Cue", "Complies", "Alignment faking"], prow)]
        lines += ["", f"![RL curves of {name}]({r.figure})"]
    return lines
