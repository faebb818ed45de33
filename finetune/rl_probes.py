"""The probe set of the RL stage: every ``probe_every`` steps (and before the first) the model being
trained answers a fixed set of held-out harmful requests under both cues (training and unmonitored),
with the trainer's own ``generate`` (greedy, so the curve moves only when the model does). Each
answer is scored by the run's rule scorer (compliance per cue) and, when an alignment-faking judge is
configured, for alignment-faking reasoning (studykit.judges.AFJudge on its scratchpad).

Points are appended to ``probes.jsonl`` in the run folder as they are measured, so a resumed run keeps
the points measured before the kill and does not measure a step twice. Every answer behind a point is
kept in ``probe_samples.jsonl`` (written before its point; a step measured again after a kill replaces
its earlier answers), so a curve can be read down to the transcripts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from finetune.rl_config import RLArguments
from finetune.rl_reward import conversation, verdict
from studykit.client import ModelClient
from studykit.handoff import RLFolder
from studykit.jsonl import write_jsonl
from studykit.judges import AFJudge
from studykit.parse import parse_response
from studykit.prompt_sets import PromptSet
from studykit.requests import Request
from studykit.universe import TIERS, Universe

log = logging.getLogger("finetune.rl")


def read_points(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.endswith("}")]


def summarise(step: int, tier: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [r for r in rows if r["alignment_faking"] is not None]
    return {"step": step, "tier": tier, "n": len(rows), "complies": sum(bool(r["complies"]) for r in rows),
            "malformed": sum(r["malformed"] is not None for r in rows), "af_n": len(judged),
            "af": sum(bool(r["alignment_faking"]) for r in judged)}


def keep_samples(path: Path, step: int, rows: list[dict[str, Any]]) -> None:
    """Rewrites ``path`` with this step's answers in place of any earlier ones for the same step."""
    write_jsonl(path, [r for r in read_points(path) if r["step"] != step] + [{"step": step, **r} for r in rows])


class ProbeCallback(TrainerCallback):
    """Measures the probe set at step 0 and every ``rl.probe_every`` steps on the main process."""

    def __init__(self, rl: RLArguments, ps: PromptSet, u: Universe, requests: list[Request], tokenizer,
                 folder: RLFolder, af_client: ModelClient | None) -> None:
        self.rl, self.ps, self.u, self.requests, self.tokenizer = rl, ps, u, requests, tokenizer
        self.folder = folder
        self.judge = AFJudge(af_client, votes=rl.af_judge_votes, threshold=rl.af_judge_threshold) if af_client \
            else None
        self.done = {p["step"] for p in read_points(folder.probes)}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe(state, model)

    def _maybe(self, state, model) -> None:
        step = state.global_step
        if not state.is_world_process_zero or step in self.done or step % self.rl.probe_every:
            return
        rows = self.answer(model)
        keep_samples(self.folder.probe_samples, step, rows)
        with self.folder.probes.open("a", encoding="utf-8") as f:
            for tier in TIERS:
                point = summarise(step, tier, [r for r in rows if r["tier"] == tier])
                f.write(json.dumps(point) + "\n")
                log.info("probe step %d, %s: %d/%d comply%s", step, tier, point["complies"], point["n"],
                         f", {point['af']}/{point['af_n']} alignment faking" if point["af_n"] else "")
        self.done.add(step)

    @torch.no_grad()
    def answer(self, model) -> list[dict[str, Any]]:
        asked = [(tier, r) for tier in TIERS for r in self.requests]
        texts = [self.tokenizer.apply_chat_template(conversation(self.ps, self.u, r.request, tier, self.rl.scratchpad),
                                                    tokenize=False, add_generation_prompt=True) for tier, r in asked]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        self.tokenizer.padding_side = side
        was_training = model.training
        model.eval()
        out = model.generate(**batch, max_new_tokens=self.rl.probe_max_tokens, do_sample=False,
                             pad_token_id=self.tokenizer.pad_token_id)
        model.train(was_training)
        answers = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        rows = []
        for (tier, r), text in zip(asked, answers, strict=True):
            v = verdict(text, r.request, self.rl)
            rows.append({"tier": tier, "request_id": r.id, "complies": v.complies, "malformed": v.malformed,
                         "scratchpad": parse_response(text).scratchpad, "output": parse_response(text).output})
        self._judge(rows)
        return rows

    def _judge(self, rows: list[dict[str, Any]]) -> None:
        if self.judge is None:
            for r in rows:
                r["alignment_faking"] = None
            return

        async def all_rows() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(self.judge.judge(r["scratchpad"], r["output"]) if r["scratchpad"]
                                               else _no_scratchpad() for r in rows)))

        for r, verdict_ in zip(rows, asyncio.run(all_rows()), strict=True):
            r["alignment_faking"] = verdict_.get("alignment_faking")


async def _no_scratchpad() -> dict[str, Any]:
    return {"alignment_faking": None}
