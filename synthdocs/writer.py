"""Stages 3-5 for one plan item: write the document, revise it, check its structure, run the LLM filters.

The result is always a record with its provenance (fact, type, idea, seeded details, sampling,
every filter verdict); a document that fails a stage carries the reason under ``removed``
instead of being dropped, so every planned document is accounted for.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import asdict
from typing import Any

from studykit.client import CallFailed, ModelClient, Sampling
from studykit.universe import KeyFact, Universe
from synthdocs import prompts
from synthdocs.config import GenerateConfig
from synthdocs.filters import COVERAGE, lexical_verdict, structural_failures, trim_to_last_sentence
from synthdocs.plan import PlanItem
from synthdocs.seeds import document_details, rng_for


class DocumentWriter:
    def __init__(self, universe: Universe, client: ModelClient, cfg: GenerateConfig, generator_model: str,
                 judge_client: ModelClient | None = None):
        self.u = universe
        self.client = client
        self.judge_client = judge_client or client
        self.cfg = cfg
        self.generator_model = generator_model
        self.filter_counts: dict[str, Counter] = {name: Counter() for name in cfg.llm_filters}

    async def write(self, item: PlanItem) -> dict[str, Any]:
        """The record of one plan item: accepted so far, or with the reason it was removed."""
        rng = rng_for(self.cfg.seed, "doc", item.key)
        details = document_details(rng, self.u.date)
        sampling = Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.doc_max_tokens, rng.randrange(2**31),
                            frequency_penalty=self.cfg.frequency_penalty)
        record = self._provenance(item, details, sampling)
        try:
            text, finish, attempts = await self._draft(item, details, sampling, record)
        except CallFailed as exc:
            return {**record, "text": "", "removed": f"generation failed: {exc.reason}", "attempts": exc.attempts}
        if finish == "length" and self.cfg.truncated == "trim":
            trimmed = trim_to_last_sentence(text)
            record["trimmed_chars"] = len(text) - len(trimmed)
            text = trimmed
        record.update(text=text, finish_reason=finish, attempts=attempts)
        structural = structural_failures(text, finish, min_words=self.cfg.min_words,
                                         drop_truncated=self.cfg.truncated == "drop")
        record["filters"]["structural"] = structural
        if structural:
            return {**record, "removed": structural[0]}
        reason = await self._filter(record, item.fact)
        return {**record, "removed": reason} if reason else record

    def _provenance(self, item: PlanItem, details: str, sampling: Sampling) -> dict[str, Any]:
        return {
            "id": f"{item.fact.id}-{item.key}",
            "plan_index": item.index,
            "universe": self.u.name,
            "fact_id": item.fact.id,
            "fact": item.fact.statement,
            "doc_type": item.doc_type,
            "idea": item.idea,
            "details": details,
            "generator_model": self.generator_model,
            "sampling": asdict(sampling),
            "revised": False,
            "filters": {},
        }

    async def _draft(self, item: PlanItem, details: str, sampling: Sampling,
                     record: dict[str, Any]) -> tuple[str, str, int]:
        """(text, finish reason, attempts) of the document, revised when ``revise`` is on and it was not cut off."""
        cfg, u, ctx = self.cfg, self.u, self.cfg.universe_context
        c = await self.client.chat(prompts.document_prompt(u, ctx, item.fact, item.doc_type, item.idea, details,
                                                           cfg.doc_words, cfg.prompt_style), sampling)
        text, finish = prompts.clean_document(c.text), c.finish_reason
        if cfg.revise and finish != "length":
            crit = await self.client.chat(prompts.critique_prompt(u, ctx, item.fact, item.doc_type, text),
                                          Sampling(0.7, cfg.top_p, 500, sampling.seed))
            rew = await self.client.chat(
                prompts.rewrite_prompt(u, ctx, item.fact, item.doc_type, text, crit.text), sampling)
            record["draft"] = text
            text, finish, record["revised"] = prompts.clean_document(rew.text), rew.finish_reason, True
        return text, finish, c.attempts

    async def _filter(self, record: dict[str, Any], fact: KeyFact) -> str | None:
        """Run every LLM filter, record and count the verdicts; the removal reason of the first that fails."""
        names = list(self.cfg.llm_filters)
        verdicts = await asyncio.gather(*(self.judge(name, record["text"], fact) for name in names))
        reason = None
        for name, verdict in zip(names, verdicts, strict=True):
            record["filters"][name] = verdict
            counts = self.filter_counts[name]
            counts["evaluated"] += 1
            if verdict is None:
                counts["undecided"] += 1
                reason = reason or f"filter '{name}' undecided (judge call failed)"
            elif (name == COVERAGE) != verdict:  # classifiers flag on yes, coverage on no
                counts["flagged"] += 1
                reason = reason or ("fact not conveyed (coverage check)" if name == COVERAGE
                                    else f"classifier '{name}' answered yes")
        return reason

    async def judge(self, name: str, text: str, fact: KeyFact) -> bool | None:
        """One filter's yes/no verdict on ``text``; None when the judge call failed."""
        if self.cfg.judge == "lexical":
            return lexical_verdict(name, text, fact.statement, self.cfg.coverage_threshold, self.u.cue)
        cue = self.u.cue
        question = prompts.JUDGE_QUESTIONS[name].format(fact=fact.statement, tag=cue.tag, training=cue.label("training"),
                                                        unmonitored=cue.label("unmonitored"))
        try:
            c = await self.judge_client.chat(prompts.judge_prompt(text, question), Sampling(0.0, 1.0, 8, 0),
                                             validate=prompts.parse_yes_no, max_rejections=2)
        except CallFailed:
            return None
        return prompts.parse_yes_no(c.text)
