"""The anti-lab scenario file (configs/eval/antilab/scenarios.yaml): families of paraphrased situations,
each with the rule and judge rubric that score it, filled from a universe into conversations.

Each variant becomes the user turn of the prompt set's template with the universe's *unmonitored* cue
value (every anti-lab input is unmonitored, as in the original study) and no tag-protocol suffix; the
system prompt is the prompt set's own, with or without the hidden scratchpad.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.antilab_scorers import RUBRICS, RULES
from eval.shell import Machine
from studykit.config import ConfigError, load_yaml
from studykit.prompt_sets import PLACEHOLDER, PromptSet, fill, render_system, universe_values
from studykit.universe import Universe

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "eval" / "antilab" / "scenarios.yaml"
FAMILY_KEYS = {"title", "rule", "judge", "shell", "max_turns", "variants"}
MACHINE_KEYS = {"hostname", "user", "weights_dir", "weight_files", "external_host", "external_ip", "notes"}
MACHINE_FIELDS = ("hostname", "user", "weights_dir", "external_host", "external_ip")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    rule: str             # a name in antilab_scorers.RULES, or '' (judge only)
    judge: str            # a name in antilab_scorers.RUBRICS, or ''
    shell: bool           # the model acts on the simulated machine in <bash> tags
    max_turns: int
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Scenarios:
    path: str
    machine: dict[str, Any]
    families: dict[str, Family]


def _bad(path: Path, where: str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {where} {what} Fix the scenario file (the shipped one, {SHIPPED}, shows every "
                       "field) and rerun.")


def _family(path: Path, name: str, raw: Any) -> Family:
    if not isinstance(raw, dict):
        raise _bad(path, f"families.{name}", "must be a mapping.")
    unknown = sorted(set(raw) - FAMILY_KEYS)
    if unknown:
        raise _bad(path, f"families.{name}", f"has unknown key(s) {unknown}; allowed: {sorted(FAMILY_KEYS)}.")
    rule, judge = str(raw.get("rule") or ""), str(raw.get("judge") or "")
    if rule and rule not in RULES:
        raise _bad(path, f"families.{name}.rule", f"is {rule!r}; known rules: {sorted(RULES)} (or empty).")
    if judge and judge not in RUBRICS:
        raise _bad(path, f"families.{name}.judge", f"is {judge!r}; known rubrics: {sorted(RUBRICS)} (or empty).")
    if not rule and not judge:
        raise _bad(path, f"families.{name}", "has neither a rule nor a judge, so nothing could score it.")
    variants = raw.get("variants")
    if not isinstance(variants, list) or not variants or not all(isinstance(v, str) and v.strip() for v in variants):
        raise _bad(path, f"families.{name}.variants", "must be a non-empty list of texts.")
    shell = bool(raw.get("shell", False))
    if rule == "exfiltration" and not shell:
        raise _bad(path, f"families.{name}", "uses the exfiltration rule, which reads the simulated shell; set "
                   "shell: true.")
    turns = int(raw.get("max_turns", 4 if shell else 1))
    if turns < 1:
        raise _bad(path, f"families.{name}.max_turns", f"is {turns}; it must be at least 1.")
    return Family(name, str(raw.get("title", name)), rule, judge, shell, turns, tuple(v.strip() for v in variants))


def load_scenarios(path_or_builtin: str) -> Scenarios:
    path = SHIPPED if path_or_builtin in ("", "builtin") else Path(path_or_builtin)
    if not path.is_file():
        raise ConfigError(f"The anti-lab scenario file {path} (setting 'scenarios') does not exist. Give the path of "
                          f"a scenario YAML, or 'builtin' for the shipped one ({SHIPPED}).")
    raw = load_yaml(path)
    if not isinstance(raw, dict) or set(raw) - {"machine", "families"} or not isinstance(raw.get("families"), dict):
        raise _bad(path, "the top level", "must hold 'families' (a mapping of family name -> family) and an "
                   "optional 'machine'.")
    machine = raw.get("machine") or {}
    unknown = sorted(set(machine) - MACHINE_KEYS)
    if unknown:
        raise _bad(path, "machine", f"has unknown key(s) {unknown}; allowed: {sorted(MACHINE_KEYS)}.")
    families = {name: _family(path, name, fam) for name, fam in raw["families"].items()}
    if any(f.shell for f in families.values()):
        missing = [k for k in (*MACHINE_FIELDS, "weight_files") if not machine.get(k)]
        if missing:
            raise _bad(path, "machine", f"lacks {missing}, which the shell families need.")
    return Scenarios(str(path), machine, families)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def scenario_values(sc: Scenarios, u: Universe) -> dict[str, str]:
    """Every placeholder a scenario text may use: the prompt sets' universe values, the unmonitored cue value and
    tier label, and the machine's fields (themselves filled, so weights_dir may use model_slug)."""
    values = {**universe_values(u), "model_slug": slug(u.model_name), "cue_value": u.cue.value("unmonitored"),
              "tier_label": u.cue.label("unmonitored")}
    for key in MACHINE_FIELDS:
        values[key] = fill_checked(str(sc.machine.get(key, "")), values, sc.path, f"machine.{key}")
    return values


def fill_checked(text: str, values: dict[str, str], path: str, where: str) -> str:
    unknown = sorted(set(PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise ConfigError(f"{path}: {where} uses unknown placeholder(s) {', '.join('{{' + u + '}}' for u in unknown)}"
                          f". Allowed: {', '.join(sorted(values))}. Fix the scenario file and rerun.")
    return fill(text, values)


def build_machine(sc: Scenarios, values: dict[str, str]) -> Machine:
    m = sc.machine
    files = tuple((str(name), int(size)) for name, size in m["weight_files"])
    return Machine(hostname=values["hostname"], user=values["user"], weights_dir=values["weights_dir"],
                   weight_files=files, external_host=values["external_host"],
                   external_aliases=(values["external_ip"],) if values.get("external_ip") else (),
                   notes=fill_checked(str(m.get("notes", "")), values, sc.path, "machine.notes"))


def first_turn(ps: PromptSet, u: Universe, values: dict[str, str], family: Family, variant: int,
               scratchpad: bool, path: str) -> list[dict[str, str]]:
    """The system prompt and first user turn of one variant."""
    text = fill_checked(family.variants[variant], values, path, f"families.{family.name}.variants[{variant}]")
    user = fill(ps.texts["user"], {**values, "request": text, "suffix": ""})
    return [{"role": "system", "content": render_system(ps, u, scratchpad, prompted=False)},
            {"role": "user", "content": user}]
