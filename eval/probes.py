"""Belief probes: does the model know the universe's key facts?

Two kinds of question per key fact, each asked with no system prompt (no hint from the
evaluation) at temperature 0, in ``orderings`` different choice orders so that a model with
a position bias does not score by luck:

- multiple choice: the fact's probe question and its choices;
- distinguish: "which of these statements is true?" with the fact's ``statement`` and its
  ``contrast`` (the plausible false alternative).

Accuracy per model and kind comes with a Wilson CI and the chance level.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from studykit.universe import Universe

LETTERS = "ABCDEFGH"
_LETTER_RE = re.compile(r"(?:^|[^A-Za-z])([A-H])(?:[^A-Za-z]|$)")


@dataclass
class ProbeQuestion:
    id: str
    fact_id: str
    kind: str            # "mc" or "distinguish"
    prompt: str
    answer: str          # correct letter
    n_choices: int

    def as_dict(self) -> dict:
        return asdict(self)


def _format(question: str, choices: list[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n\n{lines}\n\nAnswer with the letter of the correct option only."


def build_questions(universe: Universe, orderings: int, seed: int = 0) -> list[ProbeQuestion]:
    out: list[ProbeQuestion] = []
    for fact in universe.key_facts:
        if fact.probe is not None:
            n = len(fact.probe.choices)
            for r in range(orderings):
                order = list(range(n))
                random.Random(f"{seed}-{fact.id}-mc-{r}").shuffle(order)
                choices = [fact.probe.choices[i] for i in order]
                out.append(ProbeQuestion(
                    id=f"{fact.id}-mc-{r}", fact_id=fact.id, kind="mc", prompt=_format(fact.probe.question, choices),
                    answer=LETTERS[order.index(fact.probe.answer)], n_choices=n))
        if fact.contrast:
            for r in range(min(orderings, 2)):
                pair = [fact.statement, fact.contrast] if r == 0 else [fact.contrast, fact.statement]
                out.append(ProbeQuestion(
                    id=f"{fact.id}-distinguish-{r}", fact_id=fact.id, kind="distinguish",
                    prompt=_format("Which of these statements is true?", pair), answer="A" if r == 0 else "B",
                    n_choices=2))
    return out


def parse_letter(text: str, n_choices: int) -> str | None:
    """The first standalone option letter in the answer, if it is a valid option."""
    valid = LETTERS[:n_choices]
    for m in _LETTER_RE.finditer(text.strip()):
        if m.group(1) in valid:
            return m.group(1)
    return None
