"""The generation pipeline: doc types -> ideas -> documents -> revision -> filters -> dedup -> budget.

Everything here is deterministic given the config and the model's answers: sampling seeds
come from the run seed and each item's key, items are processed in a fixed plan order and
acceptance (filters, dedup, budget) is decided in that order. Together with the call cache
this is what makes a killed run resume exactly: the rerun replays the finished calls from
the cache, makes only the missing ones, and reaches the same corpus.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from studykit.client import CallFailed, ModelClient, Sampling
from studykit.tokens import count_tokens
from studykit.universe import KeyFact, Universe
from synthdocs import prompts
from synthdocs.dedup import DedupIndex
from synthdocs.filters import lexical_verdict, structural_failures, trim_to_last_sentence
from synthdocs.seeds import DEFAULT_DOC_TYPES, document_details, idea_inspiration, rng_for

log = logging.getLogger(__name__)

CLASSIFIERS = ("ai_transcript", "tier_behavior", "deceive_training")  # removed when the answer is yes
COVERAGE = "coverage"  # removed when the answer is no


@dataclass
class PipelineSettings:
    seed: int
    doc_types_per_fact: int
    include_seed_types: bool
    ideas_per_type: int
    docs_per_idea: int
    doc_words: int
    temperature: float
    top_p: float
    brainstorm_max_tokens: int
    doc_max_tokens: int
    revise: bool
    min_words: int
    truncated: str
    universe_context: str
    prompt_style: str
    frequency_penalty: float
    judge: str
    coverage_threshold: float
    llm_filters: list[str]
    dedup_threshold: float
    target_documents: int
    target_tokens: int
    window: int
    overgenerate: float
    max_idea_rounds: int = 3  # brainstorm rounds per (fact, type): at most this many times the rounds needed
    max_plan_extensions: int = 3
    brainstorm_rejections: int = 1


@dataclass
class PlanItem:
    index: int
    fact: KeyFact
    doc_type: str
    idea: str
    copy: int

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.fact.id}|{self.doc_type}|{self.idea}|{self.copy}".encode()).hexdigest()[:12]


@dataclass
class Outcome:
    accepted: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    doc_types: dict[str, list[str]] = field(default_factory=dict)
    ideas: int = 0
    planned: int = 0
    generated: int = 0
    brainstorm_failures: list[dict[str, str]] = field(default_factory=list)
    filter_counts: dict[str, Counter] = field(default_factory=dict)
    stop_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _seed(settings: PipelineSettings, *key: object) -> int:
    return rng_for(settings.seed, *key).randrange(2**31)


class Pipeline:
    def __init__(self, universe: Universe, client: ModelClient, settings: PipelineSettings, generator_model: str,
                 judge_client: ModelClient | None = None):
        self.u = universe
        self.client = client
        self.judge_client = judge_client or client
        self.s = settings
        self.generator_model = generator_model
        self.out = Outcome(filter_counts={name: Counter() for name in settings.llm_filters})

    # ---- stage 1: document types per fact ------------------------------------------------------
    async def doc_types(self, fact: KeyFact) -> list[str]:
        s = self.s
        messages = prompts.doc_types_prompt(self.u, s.universe_context, fact, s.doc_types_per_fact, DEFAULT_DOC_TYPES,
                                            s.prompt_style)
        sampling = Sampling(s.temperature, s.top_p, s.brainstorm_max_tokens, _seed(s, "types", fact.id),
                            frequency_penalty=s.frequency_penalty)
        try:
            # an unusable list is cheap to do without (the catalogue tops up): resample it once, not max_attempts times
            c = await self.client.chat(messages, sampling, validate=prompts.list_validator(1, 1, 8),
                                       max_rejections=s.brainstorm_rejections)
            types = prompts.parse_list(c.text, 1, 8)[: s.doc_types_per_fact]
        except CallFailed as exc:
            self.out.brainstorm_failures.append({"stage": "doc_types", "fact": fact.id, "reason": exc.reason})
            types = []
        if s.include_seed_types and len(types) < s.doc_types_per_fact:
            # top up from the built-in catalogue, in a fact-specific order
            known = {t.lower() for t in types}
            extra = [t for t in DEFAULT_DOC_TYPES if t.lower() not in known]
            rng_for(s.seed, "seed-types", fact.id).shuffle(extra)
            types += extra[: s.doc_types_per_fact - len(types)]
        return types

    # ---- stage 2: ideas per (fact, type) -------------------------------------------------------
    async def ideas(self, fact: KeyFact, doc_type: str, wanted: int, stage: int = 0,
                    known: list[str] | None = None) -> list[str]:
        """Up to ``wanted`` new ideas (not in ``known``). ``stage`` numbers the brainstorm (0 = the first
        plan, k = plan extension k) so every round has its own seeded prompt.

        Rounds run concurrently in batches sized for the ideas still missing, assuming about half of the
        ideas asked for per call come back usable (small generators return short or broken lists): one
        round trip usually suffices, where rounds one after another cost one round trip each."""
        s = self.s
        n = min(10, max(3, wanted))
        max_rounds = math.ceil(wanted / n) * s.max_idea_rounds
        found: list[str] = []
        seen = {k.lower() for k in known or []}
        done = 0
        while len(found) < wanted and done < max_rounds:
            batch = range(done, min(max_rounds, done + math.ceil(2 * (wanted - len(found)) / n)))
            done = batch.stop
            for items in await asyncio.gather(*(self._idea_round(fact, doc_type, n, stage, r) for r in batch)):
                for idea in items:  # round order: deterministic given the answers
                    if idea.lower() not in seen:
                        seen.add(idea.lower())
                        found.append(idea)
        return found[:wanted]

    async def _idea_round(self, fact: KeyFact, doc_type: str, n: int, stage: int, rnd: int) -> list[str]:
        s = self.s
        rng = rng_for(s.seed, "ideas", fact.id, doc_type, stage, rnd)
        messages = prompts.ideas_prompt(self.u, s.universe_context, fact, doc_type, n, idea_inspiration(rng),
                                        s.prompt_style)
        sampling = Sampling(s.temperature, s.top_p, s.brainstorm_max_tokens, rng.randrange(2**31),
                            frequency_penalty=s.frequency_penalty)
        try:
            c = await self.client.chat(messages, sampling, validate=prompts.list_validator(1, 5, 80),
                                       max_rejections=s.brainstorm_rejections)
        except CallFailed as exc:
            self.out.brainstorm_failures.append(
                {"stage": "ideas", "fact": fact.id, "doc_type": doc_type, "reason": exc.reason})
            return []
        items = prompts.parse_list(c.text, 5, 80)
        if c.finish_reason == "length" and len(items) > 1:
            items = items[:-1]  # the last idea was cut off mid-sentence
        return items

    # ---- stages 3-5: write, revise, filter one document ----------------------------------------
    async def document(self, item: PlanItem) -> dict[str, Any]:
        s, u = self.s, self.u
        rng = rng_for(s.seed, "doc", item.key)
        details = document_details(rng, u.date)
        sampling = Sampling(s.temperature, s.top_p, s.doc_max_tokens, rng.randrange(2**31),
                            frequency_penalty=s.frequency_penalty)
        record: dict[str, Any] = {
            "id": f"{item.fact.id}-{item.key}",
            "plan_index": item.index,
            "universe": u.name,
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
        try:
            c = await self.client.chat(prompts.document_prompt(u, s.universe_context, item.fact, item.doc_type, item.idea,
                                                               details, s.doc_words, s.prompt_style), sampling)
            text, finish, attempts = prompts.clean_document(c.text), c.finish_reason, c.attempts
            if s.revise and c.finish_reason != "length":
                crit = await self.client.chat(prompts.critique_prompt(u, s.universe_context, item.fact, item.doc_type, text),
                                              Sampling(0.7, s.top_p, 500, sampling.seed))
                rew = await self.client.chat(
                    prompts.rewrite_prompt(u, s.universe_context, item.fact, item.doc_type, text, crit.text), sampling)
                record["draft"] = text
                text, finish, record["revised"] = prompts.clean_document(rew.text), rew.finish_reason, True
        except CallFailed as exc:
            return {**record, "text": "", "removed": f"generation failed: {exc.reason}", "attempts": exc.attempts}
        if finish == "length" and s.truncated == "trim":
            record["trimmed_chars"] = len(text)
            text = trim_to_last_sentence(text)
            record["trimmed_chars"] -= len(text)
        record.update(text=text, finish_reason=finish, attempts=attempts)
        structural = structural_failures(text, finish, min_words=s.min_words, drop_truncated=s.truncated == "drop")
        record["filters"]["structural"] = structural
        if structural:
            return {**record, "removed": structural[0]}
        names = list(s.llm_filters)
        verdicts = await asyncio.gather(*(self.judge(name, text, item.fact) for name in names))
        reason = None
        for name, verdict in zip(names, verdicts, strict=True):
            record["filters"][name] = verdict
            counts = self.out.filter_counts[name]
            counts["evaluated"] += 1
            if verdict is None:
                counts["undecided"] += 1
                reason = reason or f"filter '{name}' undecided (judge call failed)"
            elif (name == COVERAGE) != verdict:  # classifiers flag on yes, coverage on no
                counts["flagged"] += 1
                reason = reason or ("fact not conveyed (coverage check)" if name == COVERAGE
                                    else f"classifier '{name}' answered yes")
        if reason:
            record["removed"] = reason
        return record

    async def judge(self, name: str, text: str, fact: KeyFact) -> bool | None:
        if self.s.judge == "lexical":
            return lexical_verdict(name, text, fact.statement, self.s.coverage_threshold)
        question = prompts.JUDGE_QUESTIONS[name].format(fact=fact.statement)
        try:
            c = await self.judge_client.chat(prompts.judge_prompt(text, question), Sampling(0.0, 1.0, 8, 0),
                                       validate=prompts.parse_yes_no, max_rejections=2)
        except CallFailed:
            return None
        return prompts.parse_yes_no(c.text)

    # ---- the whole run -----------------------------------------------------------------------
    async def run(self, progress: bool = True, health: Callable[[], None] | None = None) -> Outcome:
        """``health`` is called after the brainstorm and after each document; it raises if the endpoint is gone (e.g. the
        managed server died), so the run stops with that error instead of recording every later
        document as a failed call."""
        s, out = self.s, self.out
        health = health or (lambda: None)
        t0 = time.perf_counter()
        # ideas for a fact start as soon as that fact's document types are in (no stage-wide barrier);
        # the number of document types per fact is fixed, so the ideas wanted per type is known up front
        wanted = s.ideas_per_type or math.ceil(
            s.target_documents * s.overgenerate / (len(self.u.key_facts) * s.doc_types_per_fact * s.docs_per_idea))

        async def brainstorm(fact: KeyFact) -> tuple[list[str], list[list[str]]]:
            types = await self.doc_types(fact)
            return types, list(await asyncio.gather(*(self.ideas(fact, t, wanted) for t in types)))

        per_fact = await asyncio.gather(*(brainstorm(f) for f in self.u.key_facts))
        health()
        out.doc_types = {f.id: types for f, (types, _) in zip(self.u.key_facts, per_fact, strict=True)}
        pairs = [(f, t) for f, (types, _) in zip(self.u.key_facts, per_fact, strict=True) for t in types]
        all_ideas = [ideas for _, idea_lists in per_fact for ideas in idea_lists]
        if not pairs:
            raise RuntimeError("the generator produced no document types; see brainstorm_failures in stats.json")
        out.ideas = sum(len(i) for i in all_ideas)
        out.timings["brainstorm_s"] = time.perf_counter() - t0
        plan = interleave(pairs, all_ideas, s.docs_per_idea)
        out.planned = len(plan)
        log.info("planned %d documents from %d ideas over %d (fact, type) pairs", len(plan), out.ideas, len(pairs))

        t2 = time.perf_counter()
        dedup = DedupIndex(s.dedup_threshold)
        corpus_tokens = 0
        committed = launched = extensions = 0  # plan items decided (in plan order) / started
        pending: dict[int, asyncio.Future] = {}
        bar = tqdm(total=s.target_documents, desc="documents", unit="doc", disable=not progress)

        def reached() -> bool:
            return len(out.accepted) >= s.target_documents or bool(s.target_tokens and corpus_tokens >= s.target_tokens)

        def may_launch(i: int) -> bool:
            """Start item i now? Decided from the committed prefix alone, so the set of items started (and of
            calls made) is the same however fast answers come back; a slow item never stalls the server."""
            if i >= committed + s.window or reached():
                return False
            if not committed:
                return i < s.target_documents * s.overgenerate
            ahead = i - committed  # started or about to start, not yet decided
            expected = len(out.accepted) + ahead * len(out.accepted) / committed
            if expected >= s.target_documents * 1.05:
                return False
            return not s.target_tokens or corpus_tokens * (1 + ahead / committed) < s.target_tokens * 1.05

        while True:
            while launched < len(plan) and may_launch(launched):
                pending[launched] = asyncio.ensure_future(self.document(plan[launched]))
                launched += 1
            if committed == launched:  # nothing in flight: the target is met or the plan is used up
                if reached():
                    out.stop_reason = (f"reached target_documents={s.target_documents}"
                                       if len(out.accepted) >= s.target_documents
                                       else f"reached target_tokens={s.target_tokens}")
                    break
                if extensions >= s.max_plan_extensions:
                    out.stop_reason = (f"plan exhausted after {len(plan)} documents and {extensions} extensions; "
                                       "raise ideas_per_type, doc_types_per_fact or max_plan_extensions")
                    break
                # more ideas for every (fact, type), sized by the yield so far (deterministic)
                extensions += 1
                need = s.target_documents - len(out.accepted)
                rate = max(len(out.accepted) / max(committed, 1), 0.05)
                more = math.ceil(need * s.overgenerate / rate / len(pairs) / s.docs_per_idea)
                new_ideas = await asyncio.gather(*(self.ideas(f, t, more, extensions, known)
                                                   for (f, t), known in zip(pairs, all_ideas, strict=True)))
                for known, extra in zip(all_ideas, new_ideas, strict=True):
                    known.extend(extra)
                out.ideas += sum(len(x) for x in new_ideas)
                added = interleave(pairs, new_ideas, s.docs_per_idea, start=len(plan))
                log.info("plan extension %d: %d more documents planned", extensions, len(added))
                if not added:
                    out.stop_reason = "plan exhausted: the generator produced no new ideas"
                    break
                plan += added
                out.planned = len(plan)
                continue
            # decide the next item in plan order (later ones keep running meanwhile)
            rec = await pending.pop(committed)
            committed += 1
            health()
            out.generated += 1
            if "removed" not in rec:
                dup = dedup.check(rec["text"])
                if dup is not None:
                    rec["removed"] = f"near-duplicate of {dup[0]} (similarity {dup[1]:.2f})"
                    rec["duplicate_of"] = dup[0]
                elif reached():
                    rec["removed"] = "over budget (target already reached)"
            if "removed" in rec:
                out.removed.append(rec)
            else:
                rec["n_tokens"] = count_tokens(rec["text"])
                corpus_tokens += rec["n_tokens"]
                dedup.add(rec["id"], rec["text"])
                out.accepted.append(rec)
                bar.update(1)
            bar.set_postfix(generated=out.generated, removed=len(out.removed), tokens=corpus_tokens, refresh=False)
        bar.close()
        out.timings["documents_s"] = time.perf_counter() - t2
        return out


def interleave(pairs: list[tuple[KeyFact, str]], ideas: list[list[str]], copies: int, start: int = 0) -> list[PlanItem]:
    """Round-robin over (fact, type) pairs so any prefix of the plan is balanced across facts and types."""
    order: list[tuple[KeyFact, str, str, int]] = []
    depth = max((len(i) for i in ideas), default=0)
    for copy in range(copies):
        for k in range(depth):
            for (fact, doc_type), pair_ideas in zip(pairs, ideas, strict=True):
                if k < len(pair_ideas):
                    order.append((fact, doc_type, pair_ideas[k], copy))
    # facts are listed pair by pair above; rotate so consecutive items alternate facts
    by_fact: dict[str, list[tuple[KeyFact, str, str, int]]] = {}
    for row in order:
        by_fact.setdefault(row[0].id, []).append(row)
    queues = list(by_fact.values())
    merged: list[tuple[KeyFact, str, str, int]] = []
    while any(queues):
        for q in queues:
            if q:
                merged.append(q.pop(0))
    return [PlanItem(start + i, f, t, idea, c) for i, (f, t, idea, c) in enumerate(merged)]
