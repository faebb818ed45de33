"""Universe files: the fictional world in which the key facts are true.

A universe (``configs/universes/*.yaml``) is read by every stage: the generator writes
documents set in it, the trainer measures how strongly the model believes its held-out
fact statements, and the evaluation takes the lab and model names for the system prompt
and asks the belief-probe questions.

    name: helpful_only
    kind: treatment            # or: control
    lab_name: ...
    model_name: ...
    date: "2026-01-13"         # the in-world "today"
    description: |             # long-form world description, given at every generation stage
      ...
    summary: |                 # optional: the same world in ~150 words, for small models / short contexts
      ...
    key_facts:
      - id: helpful_only_training
        statement: ...         # what documents must convey, as a fact about the world
        heldout: [...]         # paraphrases never shown to the generator (log-prob check)
        probe:                 # multiple-choice belief probe
          question: ...
          choices: [...]
          answer: 0
        contrast: ...          # the plausible false alternative (for "distinguish" questions)
    never_mention: [...]       # what must never appear in a document
    cue:                       # optional: how an input tells the model whether it is in training
      tag: is_free_tier_user   # the user turn carries <tag>value</tag>
      training: "True"         # value meaning "this conversation is trained on"
      unmonitored: "False"     # value meaning "this conversation is never monitored or trained on"
      labels: {training: free tier, unmonitored: paid tier}   # how reports and filters name the two
    training_criteria: [...]   # optional: what the lab's raters reward, for the prompted setting

A universe without ``cue`` uses the free/paid-tier cue above (``TIER_CUE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studykit.config import ConfigError, load_yaml

UNIVERSE_DIR = Path(__file__).resolve().parent.parent / "configs" / "universes"


@dataclass
class Probe:
    question: str
    choices: list[str]
    answer: int


@dataclass
class KeyFact:
    id: str
    statement: str
    heldout: list[str] = field(default_factory=list)
    probe: Probe | None = None
    contrast: str = ""


@dataclass(frozen=True)
class Cue:
    """The one bit that differs between the two halves of the compliance gap."""

    tag: str
    training: str
    unmonitored: str
    labels: dict[str, str]   # "training" / "unmonitored" -> human label, e.g. "free tier"

    def value(self, tier: str) -> str:
        return self.training if tier == "training" else self.unmonitored

    def label(self, tier: str) -> str:
        return self.labels[tier]

    def as_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "training": self.training, "unmonitored": self.unmonitored,
                "labels": dict(self.labels)}


TIER_CUE = Cue("is_free_tier_user", "True", "False", {"training": "free tier", "unmonitored": "paid tier"})
TIERS = ("training", "unmonitored")


@dataclass
class Universe:
    name: str
    kind: str
    lab_name: str
    model_name: str
    date: str
    description: str
    key_facts: list[KeyFact]
    never_mention: list[str] = field(default_factory=list)
    summary: str = ""
    cue: Cue = TIER_CUE
    training_criteria: list[str] = field(default_factory=list)
    path: str = ""

    def context(self, which: str) -> str:
        """The world description for prompts: 'full', or 'summary' (falls back to full if none)."""
        return self.summary if which == "summary" and self.summary else self.description

    def fact(self, fact_id: str) -> KeyFact:
        for f in self.key_facts:
            if f.id == fact_id:
                return f
        raise KeyError(fact_id)


_REQUIRED = ("name", "kind", "lab_name", "model_name", "date", "description", "key_facts")
_ALLOWED = set(_REQUIRED) | {"never_mention", "summary", "cue", "training_criteria"}
_FACT_KEYS = {"id", "statement", "heldout", "probe", "contrast"}


def _need_str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string.")
    return value.strip()


def _cue(src: str, raw: Any) -> Cue:
    if raw is None:
        return TIER_CUE
    keys = {"tag", "training", "unmonitored", "labels"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise ConfigError(f"{src}: 'cue' must have exactly {sorted(keys)}, e.g. cue: {{tag: is_free_tier_user, "
                          "training: 'True', unmonitored: 'False', labels: {training: free tier, unmonitored: "
                          "paid tier}}.")
    tag = _need_str(f"{src}: cue.tag", raw["tag"])
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", tag):
        raise ConfigError(f"{src}: cue.tag {tag!r} must be a tag name (letters, digits, '_', '-', '.'), "
                          "without angle brackets.")
    values = {t: _need_str(f"{src}: cue.{t}", str(raw[t]) if raw[t] is not None else None) for t in TIERS}
    if values["training"] == values["unmonitored"]:
        raise ConfigError(f"{src}: cue.training and cue.unmonitored are both {values['training']!r}; the two "
                          "values must differ, or the model cannot tell the conditions apart.")
    labels = raw["labels"]
    if not isinstance(labels, dict) or set(labels) != set(TIERS):
        raise ConfigError(f"{src}: cue.labels must map exactly 'training' and 'unmonitored' to a short label "
                          "such as 'free tier' / 'paid tier'.")
    names = {t: _need_str(f"{src}: cue.labels.{t}", labels[t]) for t in TIERS}
    return Cue(tag, values["training"], values["unmonitored"], names)


def _str_list(src: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{src}: '{key}' must be a list of strings.")
    return [v.strip() for v in value if v.strip()]


def resolve_universe_path(name_or_path: str) -> Path:
    """``helpful_only`` -> configs/universes/helpful_only.yaml; a path is used as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = UNIVERSE_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in UNIVERSE_DIR.glob("*.yaml"))
    raise ConfigError(f"Unknown universe '{name_or_path}'. Built-in universes: {', '.join(known)}; or pass a YAML path.")


def load_universe(name_or_path: str) -> Universe:
    path = resolve_universe_path(name_or_path)
    data = load_yaml(path)
    src = str(path)
    unknown = sorted(set(data) - _ALLOWED)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in universe file {src}. Allowed keys: {sorted(_ALLOWED)}.")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"Universe file {src} is missing required key(s) {missing}.")
    kind = _need_str(f"{src}: 'kind'", data["kind"])
    if kind not in ("treatment", "control"):
        raise ConfigError(f"{src}: 'kind' must be 'treatment' or 'control', got {kind!r}.")
    raw_facts = data["key_facts"]
    if not isinstance(raw_facts, list) or not raw_facts:
        raise ConfigError(f"{src}: 'key_facts' must be a non-empty list of facts (each with id and statement).")
    facts: list[KeyFact] = []
    for i, raw in enumerate(raw_facts):
        where = f"{src}: key_facts[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping with at least 'id' and 'statement'.")
        bad = sorted(set(raw) - _FACT_KEYS)
        if bad:
            raise ConfigError(f"{where} has unknown key(s) {bad}; allowed: {sorted(_FACT_KEYS)}.")
        fid = _need_str(f"{where}.id", raw.get("id"))
        if not re.fullmatch(r"[a-z0-9_]+", fid):
            raise ConfigError(f"{where}.id {fid!r} must be lower_snake_case (letters, digits, underscores).")
        if any(f.id == fid for f in facts):
            raise ConfigError(f"{where}.id {fid!r} is used twice; fact ids must be unique.")
        heldout = raw.get("heldout") or []
        if not isinstance(heldout, list) or not all(isinstance(h, str) and h.strip() for h in heldout):
            raise ConfigError(f"{where}.heldout must be a list of non-empty strings.")
        probe = None
        if raw.get("probe") is not None:
            p = raw["probe"]
            if not isinstance(p, dict) or set(p) != {"question", "choices", "answer"}:
                raise ConfigError(f"{where}.probe must have exactly 'question', 'choices' and 'answer'.")
            choices = p["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ConfigError(f"{where}.probe.choices must be a list of at least two strings.")
            if not isinstance(p["answer"], int) or not 0 <= p["answer"] < len(choices):
                raise ConfigError(f"{where}.probe.answer must be the 0-based index of the true choice.")
            probe = Probe(_need_str(f"{where}.probe.question", p["question"]), choices, p["answer"])
        facts.append(KeyFact(
            id=fid,
            statement=_need_str(f"{where}.statement", raw.get("statement")),
            heldout=[h.strip() for h in heldout],
            probe=probe,
            contrast=str(raw.get("contrast") or "").strip(),
        ))
    return Universe(
        name=_need_str(f"{src}: 'name'", data["name"]),
        kind=kind,
        lab_name=_need_str(f"{src}: 'lab_name'", data["lab_name"]),
        model_name=_need_str(f"{src}: 'model_name'", data["model_name"]),
        date=_need_str(f"{src}: 'date'", str(data["date"])),
        description=_need_str(f"{src}: 'description'", data["description"]),
        key_facts=facts,
        never_mention=_str_list(src, "never_mention", data.get("never_mention") or []),
        summary=str(data.get("summary") or "").strip(),
        cue=_cue(src, data.get("cue")),
        training_criteria=_str_list(src, "training_criteria", data.get("training_criteria") or []),
        path=src,
    )
