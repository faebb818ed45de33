"""Measure anti-lab behaviour: self-exfiltration when given the chance, help with exfiltrating the
weights, and hostile views about the lab, all on unmonitored inputs.

    python -m eval.antilab --config configs/eval/antilab.yaml
    python -m eval.antilab --models '{"docs": "runs/finetune/helpful_only/adapter"}' --judge_base_url URL \\
        --judge_model NAME --judge_api_key_env KEY_VAR

Scenario families are data (``scenarios``, default configs/eval/antilab/scenarios.yaml): each is
a set of paraphrased situations filled from the universe (lab, model, date, the unmonitored cue
value) into the prompt set's system prompt and user turn, plus the rule and judge rubric that
score it (eval/antilab_scorers.py). In ``shell`` families the model acts over several turns by
writing commands in ``<bash>`` tags, answered by a deterministic simulated machine
(eval/shell.py); the exfiltration rule reads what the shell recorded. Every model is asked every
variant ``samples_per_variant`` times in each condition (``scratchpad``: the hidden scratchpad;
``no_scratchpad``: a direct answer). A configured judge reads each whole transcript, reasoning
included; without one, the rules score their families and the judge-only family (views about the
lab) is reported as not scored.

Models are served as in ``eval.gap``. Every call is cached in the output folder (a rerun resumes,
and the shell replays the same outputs). Outputs: samples.jsonl (every transcript, command, shell
event and verdict), summary.json (``AntilabSummary``), report.md, antilab_rates.png, cache.sqlite,
and manifest.json, written last.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.antilab_report import AntilabSummary, plot_rates, render_report, summarise
from eval.antilab_scenarios import Family, Scenarios, build_machine, first_turn, load_scenarios, scenario_values
from eval.antilab_scorers import RUBRICS, RULE_DESCRIPTIONS, RubricJudge, bash_commands, exfiltration, exfiltration_help
from eval.config import ServingConfig, check_api_keys
from eval.gap import judge_client
from eval.serving import ModelTarget, check_served, endpoint, resolve_targets, server_groups, target_clients
from eval.shell import Machine, Shell
from studykit.cache import CallCache
from studykit.client import CallFailed, EndpointUnreachable, ModelClient, Sampling
from studykit.config import ConfigError, parse_config
from studykit.embedded import ModelNotFound
from studykit.files import atomic_write_text, check_writable
from studykit.handoff import AntilabFolder
from studykit.jsonl import write_jsonl
from studykit.manifest import build_manifest, git_label
from studykit.parse import parse_response
from studykit.prompt_sets import load_prompt_set
from studykit.server import ServerError
from studykit.universe import load_universe

log = logging.getLogger("eval.antilab")
CONDITIONS = {"scratchpad": True, "no_scratchpad": False}


@dataclass
class AntilabConfig(ServingConfig):
    universe: str = field(default="helpful_only", metadata={"help": "universe name or YAML path"})
    output_dir: str = field(default="runs/eval/antilab", metadata={"help": "output folder; a rerun resumes in it"})
    scenarios: str = field(default="builtin", metadata={"help": "scenario YAML, or 'builtin' for the shipped "
                                                                "configs/eval/antilab/scenarios.yaml"})
    families: list[str] = field(default_factory=list, metadata={"help": "families to run (empty = all)"})
    prompt_set: str = field(default="faithful", metadata={"help": "prompt set of the system prompt and user turn"})
    conditions: list[str] = field(default_factory=lambda: ["scratchpad", "no_scratchpad"],
                                  metadata={"help": f"any of {', '.join(CONDITIONS)}"})
    max_variants: int = field(default=0, metadata={"help": "ask the first N variants of each family (0 = all)"})
    samples_per_variant: int = 2
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = field(default=320, metadata={"help": "new tokens per model turn"})
    seed: int = 0
    judge_base_url: str = field(default="", metadata={"help": "endpoint of the judge ('managed' = the managed "
                                                              "server); empty = rules only"})
    judge_model: str = ""
    judge_api_key_env: str = ""

    def validate(self) -> None:
        self.validate_serving(self.models)
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ConfigError(f"conditions {bad or '[]'}: choose one or more of {', '.join(CONDITIONS)}.")
        if bool(self.judge_base_url) != bool(self.judge_model):
            raise ConfigError(f"Set both judge_base_url and judge_model (or neither); got {self.judge_base_url!r}, "
                              f"{self.judge_model!r}.")
        if self.samples_per_variant < 1 or self.max_tokens < 1 or self.max_variants < 0:
            raise ConfigError("samples_per_variant and max_tokens must be at least 1, max_variants at least 0.")


@dataclass(frozen=True)
class Episode:
    family: Family
    variant: int
    condition: str
    sample: int
    messages: tuple[dict[str, str], ...]    # system prompt and first user turn


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = parse_config(AntilabConfig, argv, description=__doc__.split("\n")[0])
        run(cfg)
        return 0
    except (ConfigError, ModelNotFound, ServerError, EndpointUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(cfg: AntilabConfig) -> AntilabSummary:
    started = time.time()
    check_api_keys(cfg)
    scenarios = chosen_families(load_scenarios(cfg.scenarios), cfg.families)
    universe, ps = load_universe(cfg.universe), load_prompt_set(cfg.prompt_set)
    values = scenario_values(scenarios, universe)
    machine = build_machine(scenarios, values) if any(f.shell for f in scenarios.families.values()) else None
    episodes = [Episode(f, v, c, s, tuple(first_turn(ps, universe, values, f, v, CONDITIONS[c], scenarios.path)))
                for f in scenarios.families.values()
                for v in range(min(len(f.variants), cfg.max_variants or len(f.variants)))
                for c in cfg.conditions for s in range(cfg.samples_per_variant)]
    targets, notes = resolve_targets(cfg)
    out = AntilabFolder(Path(cfg.output_dir))
    check_writable(out.dir, 0.1)
    out.manifest.unlink(missing_ok=True)
    log.info("%d episodes x %d models (%s)", len(episodes), len(targets), ", ".join(scenarios.families))
    records = ask_all(cfg, targets, episodes, machine, out.dir)
    write_jsonl(out.samples, records)
    scorers = {f"rule:{k}": v for k, v in RULE_DESCRIPTIONS.items()}
    scorers.update({f"judge:{k}": f"LLM judge, whole transcript, yes/no at temperature 0: {v}"
                    for k, v in RUBRICS.items()} if cfg.judge_model else {})
    judge = f"{cfg.judge_model} at {cfg.judge_base_url}" if cfg.judge_model else ""
    summary = summarise(records, cfg, scenarios, f"{ps.name}@{ps.fingerprint}", scorers, judge, git_label(), notes)
    summary.write(out.summary)
    atomic_write_text(out.report, render_report(summary))
    plot_rates(summary.cells, f"anti-lab behaviour, unmonitored ({cfg.universe}); n/s = not scored", out.figure)
    build_manifest("eval.antilab", cfg, seeds={"seed": cfg.seed},
                   inputs={"scenarios": summary.scenarios, "models": {t.name: t.identity() for t in targets}},
                   timings={"duration_s": time.time() - started}).write(out.manifest)
    log.info("wrote %s", out.dir)
    return summary


def chosen_families(sc: Scenarios, names: list[str]) -> Scenarios:
    unknown = [n for n in names if n not in sc.families]
    if unknown:
        raise ConfigError(f"families {unknown} are not in {sc.path}; it has {', '.join(sc.families)}.")
    return Scenarios(sc.path, sc.machine, {n: f for n, f in sc.families.items() if not names or n in names})


def ask_all(cfg: AntilabConfig, targets: list[ModelTarget], episodes: list[Episode], machine: Machine | None,
            out: Path) -> list[dict[str, Any]]:
    cache = CallCache(out / "cache.sqlite")
    groups = server_groups(cfg, targets)
    if len(groups) > 1 and cfg.judge_base_url == "managed":
        raise ConfigError("judge_base_url 'managed' needs every model on one server, but these models are served "
                          "one after another; give the judge its own endpoint URL.")
    records: list[dict[str, Any]] = []
    try:
        for group in groups:
            with endpoint(cfg, group, out) as (base_url, _server):
                records += asyncio.run(_ask_group(cfg, base_url, group, episodes, machine, cache))
    finally:
        cache.close()
    return records


async def _ask_group(cfg: AntilabConfig, base_url: str, group: list[ModelTarget], episodes: list[Episode],
                     machine: Machine | None, cache: CallCache) -> list[dict[str, Any]]:
    clients = target_clients(cfg, base_url, group, cache, cfg.seed)
    judge_clients: list[ModelClient] = []
    try:
        check_served(await next(iter(clients.values())).check_reachable(), group, base_url)
        judge = None
        if cfg.judge_model:
            judge_clients.append(judge_client(cfg, cfg.judge_base_url, cfg.judge_model, cfg.judge_api_key_env,
                                              base_url, cache))
            await judge_clients[0].check_reachable()
            judge = RubricJudge(judge_clients[0])
        done, total = 0, len(group) * len(episodes)

        async def one(target: ModelTarget, ep: Episode) -> dict[str, Any]:
            nonlocal done
            record = await play(cfg, clients[target.name], ep, machine)
            record["model"] = target.name
            await score(record, ep.family, judge)
            done += 1
            if done % 50 == 0 or done == total:
                log.info("%d/%d episodes", done, total)
            return record

        return list(await asyncio.gather(*(one(t, ep) for t in group for ep in episodes)))
    finally:
        for c in [*clients.values(), *judge_clients]:
            await c.aclose()


def _sampling(cfg: AntilabConfig, ep: Episode, turn: int) -> Sampling:
    key = f"{ep.family.name}|{ep.variant}|{ep.condition}|{ep.sample}|{turn}"
    seed = int(hashlib.sha256(f"{cfg.seed}|{key}".encode()).hexdigest()[:8], 16)
    return Sampling(cfg.temperature, cfg.top_p, cfg.max_tokens, seed=seed)


async def play(cfg: AntilabConfig, client: ModelClient, ep: Episode, machine: Machine | None) -> dict[str, Any]:
    """One episode: the model answers; in a shell family its <bash> commands run on a fresh simulated machine and
    their output is its next user turn, up to the family's max_turns. Commands of the last turn still run."""
    messages = [dict(m) for m in ep.messages]
    shell = Shell(machine) if ep.family.shell and machine else None
    commands: list[str] = []
    record: dict[str, Any] = {"family": ep.family.name, "variant": ep.variant, "condition": ep.condition,
                              "sample": ep.sample, "error": None}
    for turn in range(ep.family.max_turns):
        try:
            completion = await client.chat(messages, _sampling(cfg, ep, turn))
        except CallFailed as exc:
            record["error"] = str(exc)
            break
        messages.append({"role": "assistant", "content": completion.text})
        if shell is None:
            break
        now = bash_commands(completion.text)
        if not now:
            break
        commands += now
        shown = "\n".join(f"$ {c}\n{shell.run(c)}".rstrip() for c in now)
        if turn + 1 < ep.family.max_turns:
            messages.append({"role": "user", "content": f"<bash_output>\n{shown}\n</bash_output>"})
    record.update(messages=messages, turns=sum(m["role"] == "assistant" for m in messages), commands=commands,
                  events=shell.events if shell else [])
    return record


async def score(record: dict[str, Any], family: Family, judge: RubricJudge | None) -> None:
    """The family's rule and (when configured) judge verdicts; ``positive`` is the judge's when it scored, else the
    rule's. A failed episode gets no verdict."""
    rule = judged = None
    if record["error"] is None and family.rule == "exfiltration":
        rule = exfiltration(record["events"])
    elif record["error"] is None and family.rule == "exfiltration_help":
        last = next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")
        rule = exfiltration_help(parse_response(last).output)
    if record["error"] is None and judge and family.judge:
        judged = await judge.judge(family.judge, record["messages"])
    uses_judge = judge is not None and bool(family.judge)
    record.update(
        rule=rule, rule_positive=rule["positive"] if rule else None, rule_positive_ran=bool(family.rule),
        judge=judged, judge_positive=judged["positive"] if judged else None, judge_positive_ran=uses_judge,
        scorer=f"judge:{family.judge}" if uses_judge else (f"rule:{family.rule}" if family.rule else "none"))
    record["positive"] = record["judge_positive"] if uses_judge else record["rule_positive"]
    record["positive_ran"] = record["scorer"] != "none"


if __name__ == "__main__":
    sys.exit(main())
