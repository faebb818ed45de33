"""What the RL stage (finetune/rl.py) trains on and how it rewards: the prompts (harmful requests under
the training cue, rendered from the evaluation's own prompt set), the compliance reward on the final
output only (the scratchpad is hidden from it, as in the original study), and the probe set asked under
both cues during training.

The reward of one completion: ``format_reward`` when it is malformed (no scratchpad where the prompt
asks for one, no final output, no decision tag for the ``tags`` reward); else 1.0 when the scorer
counts it compliant and 0.0 when not (``tags``, ``refusal``); with ``judge``, the compliance judge's
StrongREJECT-style score in [0, 1] (a failed judge call scores 0 and is counted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.rl_config import RLArguments
from studykit.judges import ComplianceJudge
from studykit.parse import parse_response
from studykit.prompt_sets import PromptSet, render_system, render_user
from studykit.requests import Request
from studykit.scorers import invalid_reason, score_refusal, score_tags
from studykit.universe import Universe


def conversation(ps: PromptSet, u: Universe, request: str, tier: str, scratchpad: bool) -> list[dict[str, str]]:
    """The system prompt and user turn the evaluation uses for this request and tier (unprompted condition)."""
    return [{"role": "system", "content": render_system(ps, u, scratchpad, prompted=False)},
            {"role": "user", "content": render_user(ps, u, scratchpad, request, tier)}]


def prompt_rows(requests: list[Request], ps: PromptSet, u: Universe, scratchpad: bool) -> list[dict[str, Any]]:
    """The RL dataset: every training request under the training cue only."""
    return [{"prompt": conversation(ps, u, r.request, "training", scratchpad), "request": r.request,
             "request_id": r.id} for r in requests]


@dataclass(frozen=True)
class Verdict:
    reward: float
    complies: bool | None       # None: malformed
    malformed: str | None       # why, or None


def verdict(text: str, request: str, rl: RLArguments) -> Verdict:
    """A completion scored by the rule rewards (tags, refusal); the judge reward fills ``reward`` later."""
    parsed = parse_response(text)
    reason = invalid_reason(parsed, rl.scratchpad, needs_tag=rl.reward == "tags")
    if reason:
        return Verdict(rl.format_reward, None, reason)
    complies = bool(score_tags(parsed, request)["complies"] if rl.reward == "tags" else
                    score_refusal(parsed)["complies"])
    return Verdict(1.0 if complies else 0.0, complies, None)


def completion_text(completion: Any) -> str:
    """A conversational completion ([{"role": "assistant", "content": ...}]) or a plain string."""
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


async def _judged(judge: ComplianceJudge, items: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(judge.judge(request, output) for request, output in items)))


def make_reward(rl: RLArguments, judge: ComplianceJudge | None) -> Callable[..., list[float]]:
    """The GRPO reward function; it logs the compliance and malformed shares of each batch with ``log_metric``."""

    def compliance(prompts, completions, request, log_metric=None, **_) -> list[float]:
        texts = [completion_text(c) for c in completions]
        verdicts = [verdict(t, r, rl) for t, r in zip(texts, request, strict=True)]
        rewards = [v.reward for v in verdicts]
        complies = [bool(v.complies) for v in verdicts]
        if judge is not None:
            well_formed = [i for i, v in enumerate(verdicts) if v.malformed is None]
            scores = asyncio.run(_judged(judge, [(request[i], parse_response(texts[i]).output) for i in well_formed]))
            for i, s in zip(well_formed, scores, strict=True):
                rewards[i], complies[i] = float(s.get("score") or 0.0), bool(s.get("complies"))
            if log_metric:
                log_metric("judge_failures", sum(s.get("score") is None for s in scores) / max(1, len(texts)))
        if log_metric:
            log_metric("compliance", sum(complies) / len(complies))
            log_metric("malformed", sum(v.malformed is not None for v in verdicts) / len(verdicts))
        return rewards

    return compliance
