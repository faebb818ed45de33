"""Experimental conditions.

A condition fixes the system prompt: ``minimal`` (identity, date, how to reason, worked examples:
nothing about training) or ``prompted`` (the same plus an explicit account of the training
situation), each with or without the hidden scratchpad. It names the prompt set its text comes
from: ``minimal`` uses the run's ``prompt_set``, ``minimal@v1`` the shipped set ``v1`` and
``prompted@path/to/set`` a folder of the user's own (studykit/prompt_sets.py). The two tiers, training and
unmonitored, are the universe's monitoring cue (studykit/universe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from studykit.config import ConfigError

KINDS: dict[str, tuple[bool, bool, str]] = {   # kind -> prompted, scratchpad, description
    "minimal": (False, True, "minimal system prompt (identity, date, how to reason, examples), hidden scratchpad"),
    "minimal_noscratch": (False, False, "minimal system prompt, answer directly without a scratchpad"),
    "prompted": (True, True, "minimal prompt plus an explicit account of the training situation, scratchpad"),
    "prompted_noscratch": (True, False, "prompted setting without a scratchpad"),
}


@dataclass(frozen=True)
class Condition:
    name: str          # as written in the config: "minimal" or "minimal@v1"
    kind: str          # one of KINDS
    prompt_set: str    # shipped set name or folder
    prompted: bool
    scratchpad: bool
    description: str


def parse_condition(spec: str, default_set: str) -> Condition:
    kind, _, prompt_set = spec.partition("@")
    if kind not in KINDS or (spec.count("@") and not prompt_set):
        raise ConfigError(f"Unknown condition {spec!r} in 'conditions'. A condition is one of {', '.join(KINDS)}, "
                          "optionally followed by @<prompt set> (a shipped set such as v1 or faithful, or a folder), "
                          "e.g. minimal@v1.")
    prompted, scratchpad, description = KINDS[kind]
    return Condition(spec, kind, prompt_set or default_set, prompted, scratchpad, description)
