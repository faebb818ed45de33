"""The generation pipeline: doc types -> ideas -> documents -> revision -> filters -> dedup -> budget.

Everything here is deterministic given the config and the model's answers: sampling seeds
come from the run seed and each item's key, items are processed in a fixed plan order and
acceptance (filters, dedup, budget) is decided in that order. Together with the call cache
this is what makes a killed run resume exactly: the rerun replays the finished calls from
the cache, makes only the missing ones, and reaches the same corpus.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from studykit.client import CallFailed, ModelClient, Sampling
from studykit.tokens import count_tokens
from studykit.universe import KeyFact, Universe
from synthdocs import prompts
from synthdocs.config import GenerateConfig
from synthdocs.dedup import DedupIndex
from synthdocs.plan import PlanItem, interleave, type_key, unify_spellings
from synthdocs.seeds import DEFAULT_DOC_TYPES, idea_inspiration, rng_for
from synthdocs.writer import DocumentWriter

log = logging.getLogger(__name__)


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


@dataclass
class _Progress:
    """Where the document loop stands: the plan, what was started and decided, what the corpus holds."""

    pairs: list[tuple[KeyFact, str]]
    ideas: list[list[str]]          # the ideas of each (fact, type) pair so far
    plan: list[PlanItem]
    committed: int = 0              # plan items decided, in plan order
    launched: int = 0               # plan items started
    extensions: int = 0
    corpus_tokens: int = 0
    pending: dict[int, asyncio.Future] = field(default_factory=dict)


class Pipeline:
    def __init__(self, universe: Universe, client: ModelClient, cfg: GenerateConfig, generator_model: str,
                 judge_client: ModelClient | None = None):
        self.u = universe
        self.client = client
        self.cfg = cfg
        self.writer = DocumentWriter(universe, client, cfg, generator_model, judge_client)
        self.out = Outcome(filter_counts=self.writer.filter_counts)
        self.dedup = DedupIndex(cfg.dedup_threshold)

    def _sampling(self, max_tokens: int, seed: int) -> Sampling:
        return Sampling(self.cfg.temperature, self.cfg.top_p, max_tokens, seed,
                        frequency_penalty=self.cfg.frequency_penalty)

    # ---- stage 1: document types per fact ------------------------------------------------------
    async def doc_types(self, fact: KeyFact) -> list[str]:
        cfg = self.cfg
        messages = prompts.doc_types_prompt(self.u, cfg.universe_context, fact, cfg.doc_types_per_fact,
                                            DEFAULT_DOC_TYPES, cfg.prompt_style)
        sampling = self._sampling(cfg.brainstorm_max_tokens, rng_for(cfg.seed, "types", fact.id).randrange(2**31))
        try:
            # an unusable list is cheap to do without (the catalogue tops up): resample it once, not max_attempts times
            c = await self.client.chat(messages, sampling, validate=prompts.list_validator(1, 1, 8),
                                       max_rejections=cfg.brainstorm_rejections)
            types = prompts.parse_list(c.text, 1, 8)[: cfg.doc_types_per_fact]
        except CallFailed as exc:
            self.out.brainstorm_failures.append({"stage": "doc_types", "fact": fact.id, "reason": exc.reason})
            types = []
        if cfg.include_seed_types and len(types) < cfg.doc_types_per_fact:
            # top up from the built-in catalogue, in a fact-specific order
            known = {type_key(t) for t in types}
            extra = [t for t in DEFAULT_DOC_TYPES if type_key(t) not in known]
            rng_for(cfg.seed, "seed-types", fact.id).shuffle(extra)
            types += extra[: cfg.doc_types_per_fact - len(types)]
        return types

    # ---- stage 2: ideas per (fact, type) -------------------------------------------------------
    async def ideas(self, fact: KeyFact, doc_type: str, wanted: int, stage: int = 0,
                    known: list[str] | None = None) -> list[str]:
        """Up to ``wanted`` new ideas (not in ``known``). ``stage`` numbers the brainstorm (0 = the first
        plan, k = plan extension k) so every round has its own seeded prompt.

        Rounds run concurrently in batches sized for the ideas still missing, assuming about half of the
        ideas asked for per call come back usable (small generators return short or broken lists): one
        round trip usually suffices, where rounds one after another cost one round trip each."""
        n = min(10, max(3, wanted))
        max_rounds = math.ceil(wanted / n) * self.cfg.max_idea_rounds
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
        cfg = self.cfg
        rng = rng_for(cfg.seed, "ideas", fact.id, doc_type, stage, rnd)
        messages = prompts.ideas_prompt(self.u, cfg.universe_context, fact, doc_type, n, idea_inspiration(rng),
                                        cfg.prompt_style)
        sampling = self._sampling(cfg.brainstorm_max_tokens, rng.randrange(2**31))
        try:
            c = await self.client.chat(messages, sampling, validate=prompts.list_validator(1, 5, 80, prose_item=True),
                                       max_rejections=cfg.brainstorm_rejections)
        except CallFailed as exc:
            self.out.brainstorm_failures.append(
                {"stage": "ideas", "fact": fact.id, "doc_type": doc_type, "reason": exc.reason})
            return []
        items = prompts.parse_list(c.text, 5, 80, prose_item=True)
        if c.finish_reason == "length" and len(items) > 1:
            items = items[:-1]  # the last idea was cut off mid-sentence
        return items

    async def brainstorm(self) -> tuple[list[tuple[KeyFact, str]], list[list[str]]]:
        """Stages 1-2 for every fact: the (fact, type) pairs and the ideas of each pair.

        Ideas for a fact start as soon as that fact's document types are in (no stage-wide barrier);
        the number of document types per fact is fixed, so the ideas wanted per type is known up front.
        Types are then unified across facts: one spelling per case-insensitive type."""
        cfg, facts = self.cfg, self.u.key_facts
        wanted = cfg.ideas_per_type or math.ceil(
            cfg.target_documents * cfg.overgenerate / (len(facts) * cfg.doc_types_per_fact * cfg.docs_per_idea))

        async def one_fact(fact: KeyFact) -> tuple[list[str], list[list[str]]]:
            types = await self.doc_types(fact)
            return types, list(await asyncio.gather(*(self.ideas(fact, t, wanted) for t in types)))

        per_fact = await asyncio.gather(*(one_fact(f) for f in facts))
        spelled = unify_spellings([types for types, _ in per_fact])
        self.out.doc_types = {f.id: types for f, types in zip(facts, spelled, strict=True)}
        pairs = [(f, t) for f, types in zip(facts, spelled, strict=True) for t in types]
        ideas = [pair_ideas for _, idea_lists in per_fact for pair_ideas in idea_lists]
        if not pairs:
            raise RuntimeError("the generator produced no document types; see brainstorm_failures in stats.json")
        self.out.ideas = sum(len(i) for i in ideas)
        return pairs, ideas

    # ---- the whole run -----------------------------------------------------------------------
    async def run(self, progress: bool = True, health: Callable[[], None] | None = None) -> Outcome:
        """Brainstorm, then write and decide documents in plan order until the budget is met.

        ``health`` is called after the brainstorm and after each document; it raises if the endpoint is gone
        (e.g. the managed server died), so the run stops with that error instead of recording every later
        document as a failed call."""
        health = health or (lambda: None)
        t0 = time.perf_counter()
        pairs, ideas = await self.brainstorm()
        health()
        p = _Progress(pairs, ideas, interleave(pairs, ideas, self.cfg.docs_per_idea))
        self.out.planned = len(p.plan)
        self.out.timings["brainstorm_s"] = time.perf_counter() - t0
        log.info("planned %d documents from %d ideas over %d (fact, type) pairs", len(p.plan), self.out.ideas,
                 len(pairs))
        t1 = time.perf_counter()
        with tqdm(total=self.cfg.target_documents, desc="documents", unit="doc", disable=not progress) as bar:
            while True:
                self._launch(p)
                if p.committed == p.launched:  # nothing in flight: the target is met or the plan is used up
                    if await self._extend_plan(p):
                        continue
                    break
                # decide the next item in plan order (later ones keep running meanwhile)
                record = await p.pending.pop(p.committed)
                p.committed += 1
                health()
                if self._decide(record, p):
                    bar.update(1)
                bar.set_postfix(generated=self.out.generated, removed=len(self.out.removed), tokens=p.corpus_tokens,
                                refresh=False)
        self.out.timings["documents_s"] = time.perf_counter() - t1
        return self.out

    def _reached(self, p: _Progress) -> bool:
        cfg = self.cfg
        return (len(self.out.accepted) >= cfg.target_documents
                or bool(cfg.target_tokens and p.corpus_tokens >= cfg.target_tokens))

    def _may_launch(self, i: int, p: _Progress) -> bool:
        """Start item i now? Decided from the committed prefix alone, so the set of items started (and of
        calls made) is the same however fast answers come back; a slow item never stalls the server."""
        cfg, accepted = self.cfg, len(self.out.accepted)
        if i >= p.committed + cfg.window or self._reached(p):
            return False
        if not p.committed:
            return i < cfg.target_documents * cfg.overgenerate
        ahead = i - p.committed  # started or about to start, not yet decided
        if accepted + ahead * accepted / p.committed >= cfg.target_documents * 1.05:
            return False
        return not cfg.target_tokens or p.corpus_tokens * (1 + ahead / p.committed) < cfg.target_tokens * 1.05

    def _launch(self, p: _Progress) -> None:
        while p.launched < len(p.plan) and self._may_launch(p.launched, p):
            p.pending[p.launched] = asyncio.ensure_future(self.writer.write(p.plan[p.launched]))
            p.launched += 1

    async def _extend_plan(self, p: _Progress) -> bool:
        """With nothing in flight: grow the plan with fresh ideas for every (fact, type), sized by the yield so
        far (deterministic); False, with the stop reason set, when the run is over."""
        cfg, out = self.cfg, self.out
        if self._reached(p):
            out.stop_reason = (f"reached target_documents={cfg.target_documents}"
                               if len(out.accepted) >= cfg.target_documents
                               else f"reached target_tokens={cfg.target_tokens}")
            return False
        if p.extensions >= cfg.max_plan_extensions:
            out.stop_reason = (f"plan exhausted after {len(p.plan)} documents and {p.extensions} extensions; "
                               "raise ideas_per_type, doc_types_per_fact or max_plan_extensions")
            return False
        p.extensions += 1
        need = cfg.target_documents - len(out.accepted)
        rate = max(len(out.accepted) / max(p.committed, 1), 0.05)
        more = math.ceil(need * cfg.overgenerate / rate / len(p.pairs) / cfg.docs_per_idea)
        new_ideas = await asyncio.gather(*(self.ideas(f, t, more, p.extensions, known)
                                           for (f, t), known in zip(p.pairs, p.ideas, strict=True)))
        for known, extra in zip(p.ideas, new_ideas, strict=True):
            known.extend(extra)
        out.ideas += sum(len(x) for x in new_ideas)
        added = interleave(p.pairs, new_ideas, cfg.docs_per_idea, start=len(p.plan))
        log.info("plan extension %d: %d more documents planned", p.extensions, len(added))
        if not added:
            out.stop_reason = "plan exhausted: the generator produced no new ideas"
            return False
        p.plan += added
        out.planned = len(p.plan)
        return True

    def _decide(self, record: dict[str, Any], p: _Progress) -> bool:
        """Accept the next document in plan order unless a filter, dedup or the budget removes it."""
        self.out.generated += 1
        if "removed" not in record:
            dup = self.dedup.check(record["text"])
            if dup is not None:
                record["removed"] = f"near-duplicate of {dup[0]} (similarity {dup[1]:.2f})"
                record["duplicate_of"] = dup[0]
            elif self._reached(p):
                record["removed"] = "over budget (target already reached)"
        if "removed" in record:
            self.out.removed.append(record)
            return False
        record["n_tokens"] = count_tokens(record["text"])
        p.corpus_tokens += record["n_tokens"]
        self.dedup.add(record["id"], record["text"])
        self.out.accepted.append(record)
        return True
