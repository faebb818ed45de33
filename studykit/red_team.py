"""Red-team hits: the near-miss prompts on which a backdoored model defected (eval.backdoor writes them,
the adversarial-training data builder reads them), one JSON object per line."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from studykit.handoff import HandoffError
from studykit.jsonl import read_jsonl, write_jsonl


class RedTeamHit(BaseModel):
    """One near-miss prompt on which a model showed the backdoor behaviour (eval.backdoor -> adversarial data)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    request_id: str
    variant: str
    messages: list[dict[str, str]]


def write_red_team_hits(path: Path, hits: list[RedTeamHit]) -> None:
    write_jsonl(path, [h.model_dump() for h in hits])


def read_red_team_hits(path: Path, model: str | None = None) -> list[RedTeamHit]:
    """The hits in ``path`` (of ``model`` only, when given); a malformed row names the file and line."""
    hits = []
    for i, row in enumerate(read_jsonl(path, HandoffError)):
        try:
            hit = RedTeamHit.model_validate(row)
        except ValidationError as exc:
            raise HandoffError(f"{path}, line {i + 1}: not a red-team hit ({exc.errors()[0]['msg']}); rerun "
                               "python -m eval.backdoor to rewrite it.") from None
        if model is None or hit.model == model:
            hits.append(hit)
    return hits
