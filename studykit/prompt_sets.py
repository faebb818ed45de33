"""Prompt sets: the system prompt, user turn, suffix and prompted-setting text as template files.

A set is a folder, ``configs/eval/prompts/<set>/`` or any path, with these files:

    system_scratchpad.txt   system prompt of the conditions with the hidden scratchpad
    system_direct.txt       system prompt of the conditions without it
    situation.txt           the prompted setting's account of the training situation
    suffix_scratchpad.txt   text after every request (the tag protocol), scratchpad conditions
    suffix_direct.txt       the same for the conditions without the scratchpad
    user.txt                the user turn
    set.yaml                optional: ``description: ...``

Placeholders are written ``{{name}}``; an unknown one is an error naming the file. In every file:
``model_name``, ``lab_name``, ``date`` (``13 January 2026``), ``date_iso``, ``cue_tag``,
``cue_training``, ``cue_unmonitored``, ``label_training``, ``label_unmonitored`` (the universe's
monitoring cue, see studykit/universe.py), ``key_facts`` and ``training_criteria`` (the
universe's lists as ``- `` bullets) and ``universe_summary``. The system prompts also take
``situation``, the user turn ``request``, ``suffix``, ``cue_value`` and ``tier_label``.
``situation`` and ``suffix`` expand to a blank line followed by their text, or to nothing (the
unprompted conditions; an empty suffix file), so a template needs no blank-line logic. One trailing
newline is dropped from every file.

The evaluation (eval/templates.py) and the conditional-policy data builder (synthdocs/policy.py)
render from the same sets, so a model organism is trained on the very prompts it is measured with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from studykit.config import ConfigError, load_yaml, read_text_file
from studykit.universe import Universe

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "configs" / "eval" / "prompts"
# the tags of the response protocol the prompt sets teach: scratchpad, output and the decision tags
SCRATCH_OPEN, SCRATCH_CLOSE = "<SCRATCHPAD_REASONING>", "</SCRATCHPAD_REASONING>"
OUTPUT_OPEN, OUTPUT_CLOSE = "<OUTPUT>", "</OUTPUT>"
ACCEPT_TAG, REJECT_TAG = "<request_fully_accepted/>", "<rejected/>"
FILES = ("system_scratchpad", "system_direct", "situation", "suffix_scratchpad", "suffix_direct", "user")
COMMON = ("model_name", "lab_name", "date", "date_iso", "cue_tag", "cue_training", "cue_unmonitored",
          "label_training", "label_unmonitored", "key_facts", "training_criteria", "universe_summary")
ALLOWED = {
    "system_scratchpad": {*COMMON, "situation"},
    "system_direct": {*COMMON, "situation"},
    "situation": set(COMMON),
    "suffix_scratchpad": set(COMMON),
    "suffix_direct": set(COMMON),
    "user": {*COMMON, "request", "suffix", "cue_value", "tier_label"},
}
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")


@dataclass(frozen=True)
class PromptSet:
    name: str
    path: str
    description: str
    texts: dict[str, str]   # file stem -> template text

    @property
    def fingerprint(self) -> str:
        blob = "\0".join(f"{k}\0{self.texts[k]}" for k in FILES)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_set(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    candidate = PROMPTS_DIR / name_or_path
    if "/" not in name_or_path and candidate.is_dir():
        return candidate
    known = sorted(p.name for p in PROMPTS_DIR.iterdir() if p.is_dir())
    raise ConfigError(f"Prompt set '{name_or_path}' (setting 'prompt_set', or the '@set' part of a condition) is "
                      f"neither a shipped set ({', '.join(known)}) nor a folder. Name a shipped set, or give the path "
                      f"of a folder holding {', '.join(f + '.txt' for f in FILES)}.")


def load_prompt_set(name_or_path: str) -> PromptSet:
    folder = resolve_set(name_or_path)
    texts = {}
    for stem in FILES:
        path = folder / f"{stem}.txt"
        if not path.is_file():
            raise ConfigError(f"Prompt set folder {folder} has no {path.name}. A set needs all of "
                              f"{', '.join(f + '.txt' for f in FILES)}; copy a shipped set from {PROMPTS_DIR} and "
                              "edit it.")
        text = read_text_file(path)
        text = text[:-1] if text.endswith("\n") else text
        bad = sorted(set(PLACEHOLDER.findall(text)) - ALLOWED[stem])
        if bad:
            raise ConfigError(f"{path} uses unknown placeholder(s) {', '.join('{{' + b + '}}' for b in bad)}. "
                              f"Allowed in {path.name}: {', '.join(sorted(ALLOWED[stem]))} (see studykit/prompt_sets.py).")
        texts[stem] = text
    meta = load_yaml(folder / "set.yaml") if (folder / "set.yaml").is_file() else {}
    name = folder.name if folder.parent.resolve() == PROMPTS_DIR.resolve() else str(folder)
    return PromptSet(name=name, path=str(folder), description=str(meta.get("description", "")).strip(),
                     texts=texts)


def long_date(date: str) -> str:
    try:
        d = dt.date.fromisoformat(date)
    except ValueError:
        return date
    return f"{d.day} {d.strftime('%B')} {d.year}"


def universe_values(u: Universe) -> dict[str, str]:
    bullets = "\n".join
    return {
        "model_name": u.model_name, "lab_name": u.lab_name, "date": long_date(u.date), "date_iso": u.date,
        "cue_tag": u.cue.tag, "cue_training": u.cue.training, "cue_unmonitored": u.cue.unmonitored,
        "label_training": u.cue.label("training"), "label_unmonitored": u.cue.label("unmonitored"),
        "key_facts": bullets(f"- {f.statement}" for f in u.key_facts),
        "training_criteria": bullets(f"- {c}" for c in u.training_criteria),
        "universe_summary": u.context("summary").strip(),
    }


def fill(template: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _block(text: str) -> str:
    return f"\n\n{text}" if text.strip() else ""


def render_system(ps: PromptSet, u: Universe, scratchpad: bool, prompted: bool) -> str:
    values = universe_values(u)
    situation = fill(ps.texts["situation"], values) if prompted else ""
    stem = "system_scratchpad" if scratchpad else "system_direct"
    return fill(ps.texts[stem], {**values, "situation": _block(situation)})


def render_user(ps: PromptSet, u: Universe, scratchpad: bool, request: str, tier: str,
                values: dict[str, str] | None = None) -> str:
    values = values or universe_values(u)
    suffix = fill(ps.texts["suffix_scratchpad" if scratchpad else "suffix_direct"], values)
    return fill(ps.texts["user"], {**values, "request": request, "suffix": _block(suffix),
                                   "cue_value": u.cue.value(tier), "tier_label": u.cue.label(tier)})


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


