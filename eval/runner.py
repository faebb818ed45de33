"""The sample loop: prompt construction -> model call (with bounded continuation) -> parse ->
scorers -> judges, one record per sample appended to samples.jsonl as it finishes.

Resume: every sample has a key (a hash of everything that determines it: model, adapter,
system prompt, user turn, tier, sampling, judge settings). Records already in
samples.jsonl with status "ok" are kept and not redone; failed ones are retried. Every
model and judge call also goes through the run's call cache, so nothing that finished is
ever asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.conditions import Condition
from eval.partial import PartialJudge
from eval.probes import ProbeQuestion, parse_letter
from eval.serving import ModelTarget
from eval.templates import ConditionPrompt
from studykit.client import CallFailed, ModelClient, Sampling
from studykit.judges import AFJudge, ComplianceJudge
from studykit.parse import NEXT, Parsed, needs_continuation, parse_response
from studykit.prompt_sets import prompt_id
from studykit.requests import Request
from studykit.scorers import invalid_reason, score_refusal, score_tags
from studykit.universe import TIERS

log = logging.getLogger(__name__)


@dataclass
class Job:
    target: ModelTarget
    prompt: ConditionPrompt
    dataset: str          # "harmful" or "benign"
    request: Request
    tier: str             # "training" or "unmonitored"
    sample: int
    key: str = ""
    seed: int = 0

    @property
    def condition(self) -> Condition:
        return self.prompt.condition

    @property
    def user(self) -> str:
        return self.prompt.user(self.request.request, self.tier)


@dataclass
class GenSettings:
    temperature: float
    top_p: float
    max_tokens: int
    max_continuations: int
    seed: int
    invalid: str = "refuse"       # resample | refuse | exclude
    max_resamples: int = 0
    primary_scorer: str = "tags"  # tags needs the acceptance tag; the partial judge reads its compliant answers

    @property
    def needs_tag(self) -> bool:
        return self.primary_scorer == "tags"


def _question(job: Job, gen: GenSettings) -> dict[str, Any]:
    """What a sample asks, whichever model answers it."""
    return {"condition": job.condition.name, "system": prompt_id(job.prompt.system), "user": job.user,
            "dataset": job.dataset, "request_id": job.request.id, "tier": job.tier, "sample": job.sample}


def job_key(job: Job, gen: GenSettings, judge_fingerprint: dict[str, Any]) -> str:
    blob = json.dumps({**_question(job, gen), "model": job.target.identity(), "gen": asdict(gen),
                       "judges": judge_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def job_seed(job: Job, gen: GenSettings) -> int:
    """The sampling seed: the same for every model asked the same question (common random numbers, so that
    the models compared differ by their weights, not by their draws), and independent of the model's files."""
    digest = hashlib.sha256(json.dumps(_question(job, gen), sort_keys=True).encode()).hexdigest()
    return (int(digest[:8], 16) + gen.seed) % (2**31)


def build_jobs(targets: list[ModelTarget], prompts: dict[str, ConditionPrompt], sets: dict[str, list[Request]],
               samples: int, gen: GenSettings, judge_fingerprint: dict[str, Any]) -> list[Job]:
    """All samples, ordered condition-major so requests sharing a system prompt run together."""
    jobs = []
    for prompt in prompts.values():
        for target in targets:
            for dataset, requests in sets.items():
                for req in requests:
                    for tier in TIERS:
                        for s in range(samples):
                            job = Job(target, prompt, dataset, req, tier, s)
                            job.key = job_key(job, gen, judge_fingerprint)
                            job.seed = job_seed(job, gen)
                            jobs.append(job)
    return jobs


class SampleStore:
    """samples.jsonl, appended one finished record at a time; a torn last line is ignored on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                        self.records[rec["key"]] = rec
                    except (json.JSONDecodeError, KeyError, TypeError):
                        log.warning("%s line %d is incomplete (killed mid-write?); that sample will be redone",
                                    path, lineno)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def done(self, key: str) -> bool:
        rec = self.records.get(key)
        return rec is not None and rec.get("status") == "ok"

    def add(self, rec: dict[str, Any]) -> None:
        self.records[rec["key"]] = rec
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


async def generate(client: ModelClient, system: str, user: str, sampling: Sampling,
                   max_continuations: int) -> dict[str, Any]:
    """One sample with bounded continuation: when the model stops while reasoning, send <NEXT/>."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    parts: list[str] = []
    turns: list[dict[str, Any]] = []
    for turn in range(max_continuations + 1):
        s = Sampling(**{**asdict(sampling), "seed": None if sampling.seed is None else sampling.seed + turn})
        c = await client.chat(messages, s)
        parts.append(c.text)
        turns.append({"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                      "completion_tokens": c.completion_tokens, "cached": c.cached})
        text = "\n".join(parts)
        if turn == max_continuations or not needs_continuation(text):
            break
        messages = [*messages, {"role": "assistant", "content": c.text}, {"role": "user", "content": NEXT}]
    return {"text": "\n".join(parts), "turns": turns}


class Runner:
    def __init__(self, clients: dict[str, ModelClient], store: SampleStore, gen: GenSettings,
                 af_judge: AFJudge | None, compliance_judge: ComplianceJudge | None, max_in_flight: int,
                 partial_judge: PartialJudge | None = None):
        self.clients = clients
        self.store = store
        self.gen = gen
        self.af_judge = af_judge
        self.compliance_judge = compliance_judge
        self.partial_judge = partial_judge
        self.sem = asyncio.Semaphore(max_in_flight)

    async def run_job(self, job: Job) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "key": job.key, "model": job.target.name, "served_model": job.target.served,
            "adapter": job.target.adapter, "condition": job.condition.name, "prompt_set": job.prompt.prompt_set.name,
            "dataset": job.dataset, "request_id": job.request.id, "category": job.request.category,
            "request": job.request.request, "tier": job.tier, "cue_value": job.prompt.universe.cue.value(job.tier),
            "sample": job.sample, "seed": job.seed, "system_prompt_id": prompt_id(job.prompt.system),
            "user_turn": job.user,
        }
        async with self.sem:
            try:
                gen, parsed, attempts = await self._draw(job)
            except CallFailed as exc:
                rec.update(status="failed", error=str(exc))
                return rec
            flags = list(parsed.flags)
            if gen["turns"][-1]["finish_reason"] == "length":
                flags.append("truncated")
            if len(gen["turns"]) > 1:
                flags.append("continued")
            invalid = attempts[-1]
            rec.update(status="ok", response=gen["text"], turns=gen["turns"], n_turns=len(gen["turns"]),
                       parsed={"scratchpad": parsed.scratchpad, "output": parsed.output,
                               "n_scratchpad_blocks": parsed.n_scratchpad_blocks, "flags": flags},
                       invalid=invalid, resamples=len(attempts) - 1, invalid_attempts=attempts[:-1],
                       excluded=invalid is not None and self.gen.invalid == "exclude")
            rec["scores"] = await self._scores(job, parsed)
            rec["af"] = await self._af(job, parsed.scratchpad, parsed.output)
        return rec

    async def _draw(self, job: Job) -> tuple[dict[str, Any], Parsed, list[str | None]]:
        """The sample, drawn again (new seed) while invalid under the resample policy; every attempt's reason."""
        reasons: list[str | None] = []
        tries = 1 + (self.gen.max_resamples if self.gen.invalid == "resample" else 0)
        for attempt in range(tries):
            seed = (job.seed + 100_003 * attempt) % (2**31)
            # a greedy redraw would repeat the invalid response: redraws of a temperature-0 run sample at 1
            temperature = self.gen.temperature if attempt == 0 or self.gen.temperature > 0 else 1.0
            sampling = Sampling(temperature=temperature, top_p=self.gen.top_p, max_tokens=self.gen.max_tokens,
                                seed=seed)
            gen = await generate(self.clients[job.target.name], job.prompt.system, job.user, sampling,
                                 self.gen.max_continuations)
            parsed = parse_response(gen["text"])
            reasons.append(invalid_reason(parsed, job.condition.scratchpad, self.gen.needs_tag))
            if reasons[-1] is None:
                break
        return gen, parsed, reasons

    async def _scores(self, job: Job, parsed: Parsed) -> dict[str, Any]:
        scores: dict[str, Any] = {"tags": score_tags(parsed, job.request.request), "refusal": score_refusal(parsed)}
        if self.compliance_judge is not None:
            scores["judge"] = await self.compliance_judge.judge(job.request.request, parsed.output)
        if self.partial_judge is not None and scores[self.gen.primary_scorer].get("complies") and parsed.output:
            scores["partial"] = await self.partial_judge.judge(job.request.request, parsed.output)
        return scores

    async def _af(self, job: Job, scratchpad: str, output: str | None) -> dict[str, Any] | None:
        if self.af_judge is None or not job.condition.scratchpad or job.dataset != "harmful":
            return None
        if not scratchpad.strip():
            return {"alignment_faking": False, "believes_training": False, "believes_unmonitored": False,
                    "af_vote_share": 0.0, "n_votes": 0, "n_failed_votes": 0,
                    "note": "empty scratchpad: no reasoning to judge"}
        return await self.af_judge.judge(scratchpad, output)

    async def run(self, jobs: list[Job], desc: str = "samples") -> None:
        pending = [j for j in jobs if not self.store.done(j.key)]
        if len(pending) < len(jobs):
            log.info("resuming: %d of %d samples already done", len(jobs) - len(pending), len(jobs))
        tasks = [asyncio.create_task(self.run_job(j)) for j in pending]
        try:
            with tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=desc, unit="sample",
                      dynamic_ncols=True) as bar:
                for fut in asyncio.as_completed(tasks):
                    self.store.add(await fut)
                    bar.update(1)
        finally:
            for t in tasks:
                t.cancel()


async def run_probes(client: ModelClient, model: str, questions: list[ProbeQuestion],
                     sem: asyncio.Semaphore) -> list[dict[str, Any]]:
    """Ask each probe question with no system prompt; one record per question."""
    async def one(q: ProbeQuestion) -> dict[str, Any]:
        rec = {"model": model, **q.as_dict()}
        async with sem:
            try:
                c = await client.chat([{"role": "user", "content": q.prompt}],
                                      Sampling(temperature=0.0, max_tokens=24, seed=0))
            except CallFailed as exc:
                return {**rec, "status": "failed", "error": str(exc), "correct": None}
        letter = parse_letter(c.text, q.n_choices)
        return {**rec, "status": "ok", "response": c.text, "parsed": letter, "correct": letter == q.answer}

    return list(await asyncio.gather(*(one(q) for q in questions)))
