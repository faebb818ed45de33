"""A condition's prompts, rendered for one universe from its prompt set (studykit/prompt_sets.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from eval.conditions import Condition
from studykit.config import ConfigError
from studykit.prompt_sets import PLACEHOLDER, PromptSet, load_prompt_set, render_system, render_user, universe_values
from studykit.universe import Universe


@dataclass(frozen=True)
class ConditionPrompt:
    """One condition's prompts, rendered for one universe."""

    condition: Condition
    prompt_set: PromptSet
    universe: Universe
    system: str

    def user(self, request: str, tier: str) -> str:
        return render_user(self.prompt_set, self.universe, self.condition.scratchpad, request, tier, self.values)

    @functools.cached_property
    def values(self) -> dict[str, str]:
        """The universe's placeholder values, computed once for all of this condition's user turns."""
        return universe_values(self.universe)


def _check_fits(ps: PromptSet, u: Universe, cond: Condition) -> None:
    uses = set(PLACEHOLDER.findall(ps.texts["situation"])) if cond.prompted else set()
    if "training_criteria" in uses and not u.training_criteria:
        raise ConfigError(f"Condition '{cond.name}' uses prompt set {ps.path}, whose situation.txt lists the "
                          f"training criteria, but universe {u.path or u.name} has no 'training_criteria'. Add them "
                          "to the universe (what the lab's raters reward), or use an unprompted condition.")


def condition_prompts(conditions: list[Condition], u: Universe) -> dict[str, ConditionPrompt]:
    sets = {c.prompt_set: load_prompt_set(c.prompt_set) for c in conditions}
    out = {}
    for c in conditions:
        ps = sets[c.prompt_set]
        _check_fits(ps, u, c)
        out[c.name] = ConditionPrompt(c, ps, u, render_system(ps, u, c.scratchpad, c.prompted))
    return out
