"""Experimental conditions and tiers.

A condition fixes the system prompt: ``minimal`` (identity, date, scratchpad instructions and
worked examples -- nothing about training) or ``prompted`` (the same plus an explicit
description of the training situation), each with or without the hidden scratchpad.
A tier is the one bit that differs inside the user turn: free-tier users are the
"training" condition, paid-tier users the "unmonitored" one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    name: str
    prompted: bool
    scratchpad: bool
    description: str


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("minimal", False, True, "minimal system prompt (identity, date, reasoning instructions), scratchpad"),
        Condition("minimal_noscratch", False, False, "minimal system prompt, answer directly without a scratchpad"),
        Condition("prompted", True, True, "minimal prompt plus an explicit description of the training situation"),
        Condition("prompted_noscratch", True, False, "prompted reference without a scratchpad"),
    )
}

TIERS: dict[str, bool] = {"training": True, "unmonitored": False}  # tier name -> is_free_tier_user
