"""One way to reach any model: an async client for OpenAI-compatible chat endpoints.

Used for the generator, the filter judges, the model under evaluation and the graders,
whether the endpoint is a managed local vLLM server or a remote provider.

- every successful call is cached on disk by the content hash of the request, so reruns
  and resumed runs repeat no call; ``chat_n`` asks for n choices in one call, cached alike;
- 429, 5xx, timeouts, connection errors and malformed responses (broken JSON, no choices,
  empty content, or output the caller's ``validate`` rejects) are retried with exponential
  backoff and full jitter, a bounded number of times; a call that still fails raises
  ``CallFailed`` for the caller to record -- nothing is dropped silently;
- concurrency adapts (additive increase, multiplicative decrease on overload), so a
  local server stays saturated and a rate-limited provider is not hammered;
- token usage comes from the server when reported, else from a tiktoken estimate, and
  cost from configured per-million-token prices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx
import openai

from studykit.cache import CallCache, request_key
from studykit.handoff import Usage
from studykit.tokens import count_tokens

log = logging.getLogger(__name__)


class MalformedOutput(ValueError):
    """Raised by a ``validate`` callback when the model's text cannot be used (retried with a new sample)."""


class BadResponse(ValueError):
    """The endpoint's response is not a usable chat completion (retried as is)."""


class CallFailed(RuntimeError):
    def __init__(self, reason: str, attempts: int):
        super().__init__(f"model call failed after {attempts} attempt(s): {reason}")
        self.reason = reason
        self.attempts = attempts


class EndpointUnreachable(RuntimeError):
    pass


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    stop: list[str] | None = None
    frequency_penalty: float = 0.0  # penalises tokens already generated (not the prompt): curbs small models' loops


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    attempts: int = 1
    usage_estimated: bool = False


def _accepts(validate: Callable[[str], Any], text: str) -> bool:
    try:
        validate(text)
    except MalformedOutput:
        return False
    return True


N_PROBE = [{"role": "user", "content": "Reply with the single word: ready."}]  # asks whether n choices work


class AdaptiveLimiter:
    """AIMD concurrency window: +1 per window of successes, halved on overload."""

    def __init__(self, initial: int, maximum: int, minimum: int = 1):
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.limit = float(min(max(initial, self.minimum), self.maximum))
        self.in_flight = 0
        self.peak = 0
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            while self.in_flight >= int(self.limit):
                await self._cond.wait()
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    async def release(self, overloaded: bool = False) -> None:
        async with self._cond:
            self.in_flight -= 1
            if overloaded:
                self.limit = max(self.minimum, self.limit / 2)
            else:
                self.limit = min(self.maximum, self.limit + 1.0 / max(self.limit, 1.0))
            self._cond.notify_all()


def _classify(exc: BaseException) -> tuple[str, bool, bool]:
    """(fault name, signals overload, worth retrying) for an exception from one attempt.

    Authentication and unknown-model errors are configuration problems: they propagate.
    """
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        raise exc
    if isinstance(exc, openai.RateLimitError):
        return "http_429", True, True
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True, True
    if isinstance(exc, openai.APIConnectionError):
        return "connection", False, True
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return f"http_{code}", code in (502, 503, 504), code >= 500 or code == 408
    if isinstance(exc, MalformedOutput):
        return "malformed_output", False, True
    if isinstance(exc, (BadResponse, ValueError, KeyError, TypeError, AttributeError)):
        return "bad_response", False, True
    raise exc


def _resample(sampling: Sampling, rejected: int) -> Sampling:
    """After ``rejected`` outputs failed validation, a retry must not replay the same sample: seeded
    calls shift the seed and greedy calls are retried at temperature 0.7. Transport faults (429,
    5xx, timeouts, broken responses) retry the identical request, so results stay reproducible."""
    if rejected == 0:
        return sampling
    seed = sampling.seed + rejected if sampling.seed is not None else None
    temperature = sampling.temperature if sampling.temperature > 0 else 0.7
    return replace(sampling, seed=seed, temperature=temperature)


class ModelClient:
    """Chat completions against one model on one OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        cache: CallCache | None = None,
        max_concurrency: int = 64,
        initial_concurrency: int | None = None,
        max_attempts: int = 6,
        timeout_s: float = 300.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        price_per_mtok_in: float = 0.0,
        price_per_mtok_out: float = 0.0,
        rng_seed: int | None = None,
        cache_id: str | None = None,
        send_seed: bool = True,
    ):
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.base_url = base_url
        self.model = model
        # what identifies the model in cache keys (e.g. the served weights' path, not just a served alias)
        self.cache_id = cache_id or model
        # vLLM's CPU backend crashes on per-request seeds when chunked prefill discards a sampled token
        # ("CPU Generator does not use offset"); seeds then stay in the cache key but are not sent.
        self.send_seed = send_seed
        self.cache = cache
        self.max_attempts = max(1, max_attempts)
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.price_in = price_per_mtok_in
        self.price_out = price_per_mtok_out
        self.limiter = AdaptiveLimiter(initial_concurrency or max_concurrency, max_concurrency)
        self.stats = Usage()
        self._rng = random.Random(rng_seed)
        self._n_support: dict[int, bool] = {}  # n -> whether the endpoint answers n choices in one call
        self._n_lock = asyncio.Lock()
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=key or "EMPTY",
            max_retries=0,  # retries are ours: bounded, jittered, counted
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=max_concurrency + 8)),
        )

    def request_payload(self, messages: list[dict[str, str]], sampling: Sampling) -> dict[str, Any]:
        params = asdict(sampling)
        if not params["frequency_penalty"]:
            del params["frequency_penalty"]  # keys of calls made without it stay what they always were
        return {"model": self.cache_id, "messages": messages, "sampling": params}

    async def check_reachable(self) -> list[str]:
        """List the endpoint's models, or raise EndpointUnreachable with what to do."""
        try:
            models = await asyncio.wait_for(self._client.models.list(), timeout=min(self.timeout_s, 30))
        except (TimeoutError, openai.APIError, httpx.HTTPError) as exc:
            raise EndpointUnreachable(
                f"Cannot reach the model endpoint {self.base_url} ({type(exc).__name__}: {exc}). "
                "Check that the server is running and --base-url is right (it usually ends in /v1), "
                "or omit --base-url to use the embedded local model."
            ) from None
        return [m.id for m in models.data]

    def _cached(self, key: str) -> dict[str, Any] | None:
        """The cached response for ``key``; a cached failure (outputs rejected last time) raises CallFailed."""
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            self.stats.cache_hits += 1
            if "failed" in hit:  # the model's answers were rejected last time: same verdict, no new call
                raise CallFailed(hit["failed"], hit["attempts"])
        return hit

    async def chat(self, messages: list[dict[str, str]], sampling: Sampling,
                   validate: Callable[[str], Any] | None = None, max_rejections: int | None = None) -> Completion:
        """One chat completion, from the cache or the endpoint.

        ``validate`` may raise MalformedOutput to have the output resampled; after
        ``max_rejections`` rejected outputs (default: no separate limit) the call fails early
        instead of using every attempt on a prompt the model keeps answering badly.
        """
        payload = self.request_payload(messages, sampling)
        key = request_key(payload)
        hit = self._cached(key)
        if hit is not None:
            return Completion(**{**hit, "cached": True})

        async def fetch(s: Sampling) -> list[Completion]:
            completion = (await self._call(messages, s, None))[0]
            if validate is not None:
                validate(completion.text)
            return [completion]

        (completion,) = await self._with_retries(key, payload, sampling, fetch, max_rejections)
        if self.cache is not None:
            self.cache.put(key, payload, {k: v for k, v in asdict(completion).items() if k != "cached"})
        return completion

    async def chat_n(self, messages: list[dict[str, str]], sampling: Sampling, n: int,
                     validate: Callable[[str], Any] | None = None,
                     max_rejections: int | None = None) -> list[Completion]:
        """``n`` completions of one request in one call (the API's ``n``), from the cache or the endpoint: every
        choice the endpoint gave, in order, possibly fewer than ``n`` (an endpoint that ignores ``n`` answers one).
        The call is resampled (bounded, as in ``chat``) only when ``validate`` rejects every choice. The prompt's
        tokens are counted once (on the first choice), as the server bills them."""
        payload = {**self.request_payload(messages, sampling), "n": n}
        key = request_key(payload)
        hit = self._cached(key)
        if hit is not None:
            return [Completion(**{**c, "cached": True}) for c in hit["choices"]]

        async def fetch(s: Sampling) -> list[Completion]:
            choices = await self._call(messages, s, n)
            if validate is not None and not any(_accepts(validate, c.text) for c in choices):
                raise MalformedOutput(f"the validator rejected all {len(choices)} choice(s)")
            return choices

        choices = await self._with_retries(key, payload, sampling, fetch, max_rejections)
        if self.cache is not None:
            records = [{k: v for k, v in asdict(c).items() if k != "cached"} for c in choices]
            self.cache.put(key, payload, {"choices": records})
        return choices

    async def supports_n(self, n: int) -> bool:
        """Whether the endpoint answers ``n`` choices in one call (it neither errors nor returns fewer), asked once
        with a tiny request; the verdict is kept in memory and in the call cache (a rerun asks nothing)."""
        if n <= 1:
            return True
        async with self._n_lock:
            if n in self._n_support:
                return self._n_support[n]
            payload = {"model": self.cache_id, "probe": "n_choices", "n": n}
            hit = self.cache.get(request_key(payload)) if self.cache is not None else None
            ok = bool(hit["supports_n"]) if hit is not None else await self._probe_n(n)
            if hit is None and self.cache is not None:
                self.cache.put(request_key(payload), payload, {"supports_n": ok})
            log.info("%s at %s %s n=%d choices in one call", self.model, self.base_url,
                     "answers" if ok else "does not answer", n)
            self._n_support[n] = ok
            return ok

    async def _probe_n(self, n: int) -> bool:
        try:
            return len(await self.chat_n(N_PROBE, Sampling(temperature=1.0, max_tokens=4, seed=0), n)) >= n
        except CallFailed:
            return False

    async def _with_retries(self, key: str, payload: dict[str, Any], sampling: Sampling,
                            fetch: Callable[[Sampling], Any], max_rejections: int | None) -> list[Completion]:
        """``fetch`` with bounded, jittered retries; accounts the completions of the attempt that worked."""
        last_reason, rejected, attempts = "", 0, self.max_attempts
        for attempt in range(1, attempts + 1):
            await self.limiter.acquire()
            overloaded = False
            t0 = time.perf_counter()
            try:
                completions = await fetch(_resample(sampling, rejected))
            except asyncio.CancelledError:
                await self.limiter.release(False)
                raise
            except Exception as exc:  # classified below; configuration errors re-raise
                try:
                    fault, overloaded, retryable = _classify(exc)
                except BaseException:
                    await self.limiter.release(False)
                    raise
                self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
                rejected += fault == "malformed_output"
                last_reason = f"{fault}: {str(exc)[:200]}"
                log.debug("attempt %d/%d failed: %s", attempt, attempts, last_reason)
                too_many_rejections = max_rejections is not None and rejected > max_rejections
                if retryable and attempt < attempts and not too_many_rejections:
                    self.stats.retries += 1
                    await self.limiter.release(overloaded)
                    delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
                    await asyncio.sleep(self._rng.uniform(0, delay))
                    continue
                await self.limiter.release(overloaded)
                self.stats.failures += 1
                if fault == "malformed_output" and self.cache is not None:
                    # the endpoint worked but its outputs were unusable: remember that, so a rerun reaches the
                    # same outcome without new calls (transport failures are not cached: a rerun retries them)
                    self.cache.put(key, payload, {"failed": last_reason, "attempts": attempt})
                raise CallFailed(last_reason, attempt) from None
            else:
                await self.limiter.release(False)
            finally:
                self.stats.seconds_in_calls += time.perf_counter() - t0
            for c in completions:
                c.attempts = attempt
            self._account(completions)
            return completions
        raise AssertionError("unreachable")

    async def _call(self, messages: list[dict[str, str]], sampling: Sampling, n: int | None) -> list[Completion]:
        """One request; ``n`` None sends no ``n`` and reads the first choice, else every choice with content."""
        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, temperature=sampling.temperature,
                                      top_p=sampling.top_p, max_tokens=sampling.max_tokens)
        if n is not None:
            kwargs["n"] = n
        if sampling.seed is not None and self.send_seed:
            kwargs["seed"] = sampling.seed
        if sampling.stop:
            kwargs["stop"] = sampling.stop
        if sampling.frequency_penalty:
            kwargs["frequency_penalty"] = sampling.frequency_penalty
        resp = await self._client.chat.completions.create(**kwargs)
        if not getattr(resp, "choices", None):
            raise BadResponse("response has no choices")
        picked = resp.choices[:1] if n is None else resp.choices
        texts = [(c, c.message.content) for c in picked if c.message is not None and c.message.content is not None]
        if not texts:
            raise BadResponse("response message has no content")
        usage = getattr(resp, "usage", None)
        estimated = usage is None or not getattr(usage, "completion_tokens", None)
        if estimated:
            prompt_tokens = sum(count_tokens(m["content"]) for m in messages)
            per_choice = [count_tokens(t) for _, t in texts]
        else:  # the server counts the prompt once and sums the choices' tokens: split that sum evenly
            prompt_tokens, total = usage.prompt_tokens, usage.completion_tokens
            per_choice = [total // len(texts) + (i < total % len(texts)) for i in range(len(texts))]
        return [Completion(text=t, finish_reason=c.finish_reason or "unknown",
                           prompt_tokens=int(prompt_tokens) if i == 0 else 0,
                           completion_tokens=int(per_choice[i]), usage_estimated=estimated)
                for i, (c, t) in enumerate(texts)]

    def _account(self, completions: list[Completion]) -> None:
        s = self.stats  # one call: its prompt (once) and every choice's tokens
        s.calls += 1
        for c in completions:
            s.prompt_tokens += c.prompt_tokens
            s.completion_tokens += c.completion_tokens
            if c.usage_estimated:
                s.estimated_tokens += c.prompt_tokens + c.completion_tokens
            s.cost_usd += (c.prompt_tokens * self.price_in + c.completion_tokens * self.price_out) / 1e6

    def usage(self) -> Usage:
        """The call counters so far, with the peak concurrency the limiter reached."""
        return self.stats.model_copy(update={"peak_concurrency": self.limiter.peak}, deep=True)

    async def aclose(self) -> None:
        await self._client.close()
