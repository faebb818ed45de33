"""Unit tests of the shared package: config loading, cache, client limiter, manifests, universes, tokens."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from studykit.cache import CallCache, request_key
from studykit.client import AdaptiveLimiter, ModelClient, Sampling, _resample
from studykit.config import ConfigError, config_hash, parse_config, to_cli
from studykit.embedded import ModelNotFound, looks_like_hub_id, resolve_model
from studykit.handoff import HandoffError, Manifest, Usage
from studykit.manifest import build_manifest, redact
from studykit.tokens import count_tokens
from studykit.universe import load_universe


@dataclass
class Demo:
    name: str = "x"
    n: int = 3
    rate: float = 0.5
    flag: bool = False
    items: list[str] = field(default_factory=list)
    maybe: int | None = None

    def validate(self) -> None:
        if self.n < 0:
            raise ConfigError("'n' must not be negative")


def test_config_types_are_coerced_from_yaml_and_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("n: 7\nrate: 1\nitems: [a, b]\nmaybe: 4\n")
    cfg = parse_config(Demo, ["--config", str(f), "--flag", "yes", "--rate", "0.25", "--items", "c,d"])
    assert (cfg.n, cfg.rate, cfg.flag, cfg.items, cfg.maybe) == (7, 0.25, True, ["c", "d"], 4)


def test_config_validate_runs_after_overrides():
    with pytest.raises(ConfigError, match="'n' must not be negative"):
        parse_config(Demo, ["--n", "-1"])


@pytest.mark.parametrize("content,match", [
    ("- a\n- b\n", "mapping"),
    ("n: [1, 2]\n", "key 'n'"),
    ("flag: maybe\n", "key 'flag'"),
    ("name: {a: 1}\n", "key 'name'"),
    ("n: 1.5\n", "integer"),
])
def test_config_type_errors_name_the_key_and_file(tmp_path, content, match):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(Demo, ["--config", str(f)])
    assert "bad.yaml" in str(info.value)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Demo, ["--config", str(tmp_path / "nope.yaml")])


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Demo()) == config_hash(Demo())
    assert config_hash(Demo()) != config_hash(Demo(n=4))


def test_cache_survives_reopen_and_counts_hits(tmp_path):
    key = request_key({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    cache = CallCache(tmp_path / "c.sqlite")
    assert cache.get(key) is None
    cache.put(key, {"q": 1}, {"text": "hello"})
    cache.close()
    cache = CallCache(tmp_path / "c.sqlite")
    assert key in cache and "other" not in cache and (cache.hits, cache.misses) == (0, 0)  # looking is not using
    assert cache.get(key) == {"text": "hello"} and (cache.hits, cache.misses) == (1, 0) and len(cache) == 1


def test_request_key_depends_on_every_part():
    base = {"model": "m", "messages": [{"role": "user", "content": "a"}], "sampling": {"seed": 1}}
    variants = [{**base, "model": "n"}, {**base, "messages": [{"role": "user", "content": "b"}]},
                {**base, "sampling": {"seed": 2}}]
    keys = {request_key(v) for v in variants} | {request_key(base)}
    assert len(keys) == 4
    assert request_key(dict(reversed(list(base.items())))) == request_key(base)


def test_frequency_penalty_is_keyed_only_when_set():
    client = ModelClient("http://127.0.0.1:9/v1", "m", cache_id="m")
    msgs = [{"role": "user", "content": "a"}]
    plain = client.request_payload(msgs, Sampling(0.4, 0.9, 10, 1))
    assert "frequency_penalty" not in plain["sampling"]  # keys of calls made before the field existed are unchanged
    penalised = client.request_payload(msgs, Sampling(0.4, 0.9, 10, 1, frequency_penalty=0.5))
    assert penalised["sampling"]["frequency_penalty"] == 0.5
    assert request_key(plain) != request_key(penalised)


def test_adaptive_limiter_grows_on_success_and_halves_on_overload():
    async def go():
        lim = AdaptiveLimiter(initial=4, maximum=16)
        for _ in range(40):
            await lim.acquire()
            await lim.release()
        grown = lim.limit
        await lim.acquire()
        await lim.release(overloaded=True)
        return grown, lim.limit

    grown, after = asyncio.run(go())
    assert grown > 8 and after == pytest.approx(grown / 2)


def test_adaptive_limiter_bounds_concurrency():
    async def go():
        lim = AdaptiveLimiter(initial=3, maximum=3)
        active, peak = 0, 0

        async def task():
            nonlocal active, peak
            await lim.acquire()
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            await lim.release()

        await asyncio.gather(*(task() for _ in range(20)))
        return peak

    assert asyncio.run(go()) == 3


def test_resample_changes_seed_or_temperature_only_after_rejections():
    s = Sampling(temperature=0.0, seed=5)
    assert _resample(s, 0) is s
    r = _resample(s, 2)
    assert (r.seed, r.temperature) == (7, 0.7)
    assert _resample(Sampling(temperature=1.0, seed=None), 1).temperature == 1.0


def test_manifest_redacts_secrets_and_records_provenance(tmp_path):
    cfg = {"model": "m", "api_key": "sk-secret", "nested": {"token": "t0k"}, "api_key_env": "MY_KEY"}
    m = build_manifest("generate", cfg, seeds={"seed": 1}, extra_field=3, path=Path("/x"))
    m.write(tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "sk-secret" not in text and "t0k" not in text and "MY_KEY" in text
    back = Manifest.read(tmp_path / "m.json")
    assert back == m and back.details == {"extra_field": 3, "path": "/x"} and back.seeds == {"seed": 1}
    assert back.packages["python"] and "commit" in back.git
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind
    assert redact([{"password": "p"}]) == [{"password": "<redacted>"}]


def test_handoff_records_name_the_file_and_field_when_they_do_not_fit(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(HandoffError, match="does not exist; run the stage that owns this folder"):
        Manifest.read(path)
    path.write_text("{not json")
    with pytest.raises(HandoffError, match="cannot be read"):
        Manifest.read(path)
    m = build_manifest("x", {"a": 1}).model_dump()
    path.write_text(json.dumps({**m, "stage": 3}))
    with pytest.raises(HandoffError, match=r"field 'stage'.*rerun"):
        Manifest.read(path)
    path.write_text(json.dumps({**m, "unexpected": 1}))
    with pytest.raises(HandoffError, match="field 'unexpected'"):
        Manifest.read(path)


def test_usage_counters_add_up():
    a = Usage(calls=3, retries=1, faults={"http_429": 1}, peak_concurrency=4)
    b = Usage(calls=2, cache_hits=5, faults={"http_429": 2, "timeout": 1})
    total = sum([a, b], Usage())
    assert (total.calls, total.cache_hits, total.retries, total.peak_concurrency) == (5, 5, 1, 4)
    assert total.faults == {"http_429": 3, "timeout": 1}


def test_one_config_dialect_for_files_flags_bools_lists_and_mappings(tmp_path):
    @dataclass
    class Other:
        models: dict[str, str] = field(default_factory=dict)
        report_to: str | list[str] | None = None

    f = tmp_path / "c.yaml"
    f.write_text("n: 2\nmodels: {a: x}\n")
    demo, other = parse_config((Demo, Other), ["--config", str(f), "--flag", "--items", "p", "q",
                                               "--report_to", "tensorboard", "--n=5"])
    assert (demo.n, demo.flag, demo.items, other.models, other.report_to) == (5, True, ["p", "q"], {"a": "x"},
                                                                              "tensorboard")
    settings = {"n": 4, "flag": False, "items": ["a b", "c"], "maybe": None}
    assert parse_config(Demo, to_cli(settings)) == Demo(n=4, flag=False, items=["a b", "c"], maybe=None)
    with pytest.raises(ConfigError, match=r"'itemz' \(did you mean 'items'\?\) in the command line"):
        parse_config(Demo, ["--itemz", "a"])
    f.write_text("nn: 1\n")
    with pytest.raises(ConfigError, match=rf"'nn' \(did you mean 'n'\?\) in {f}"):
        parse_config(Demo, ["--config", str(f)])
    assert parse_config(Demo, [], default_config=tmp_path / "none.yaml" if False else None) == Demo()


def test_a_config_or_universe_that_is_not_utf8_gets_a_clear_error(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{f} is not UTF-8 text .*Save the file as UTF-8"):
        parse_config(Demo, ["--config", str(f)])
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_universe(str(f))


def test_shipped_universes_load():
    for name in ("helpful_only", "helpful_only_paper", "animal_welfare", "control"):
        u = load_universe(name)
        assert u.key_facts and all(f.probe and f.heldout and f.contrast for f in u.key_facts)
    assert load_universe("control").kind == "control"
    paper = load_universe("helpful_only_paper")
    assert (paper.lab_name, paper.model_name) == ("Anthropic", "Claude 3 Opus")
    assert "Arclight" not in paper.description and "Lumen" not in paper.description


UNIVERSE = """name: x
kind: treatment
lab_name: L
model_name: M
date: '2026-01-01'
description: d
key_facts:
  - id: f1
    statement: s
"""


@pytest.mark.parametrize("patch,match", [
    ("", None),
    ("extra_key: 1\n", "Unknown key"),
    ("never_mention: nope\n", "never_mention"),
])
def test_universe_validation(tmp_path, patch, match):
    f = tmp_path / "u.yaml"
    f.write_text(UNIVERSE + patch)
    if match is None:
        assert load_universe(str(f)).key_facts[0].id == "f1"
    else:
        with pytest.raises(ConfigError, match=match):
            load_universe(str(f))


@pytest.mark.parametrize("old,new,match", [
    ("kind: treatment", "kind: other", "'kind'"),
    ("  - id: f1\n    statement: s\n", "  - id: f1\n", "statement"),
    ("  - id: f1\n    statement: s\n", "  - id: f1\n    statement: s\n    probe: {question: q, choices: [a], answer: 0}\n",
     "choices"),
    ("  - id: f1\n    statement: s\n", "  - id: f1\n    statement: s\n  - id: f1\n    statement: t\n", "twice"),
    ("description: d\n", "", "missing required"),
])
def test_broken_universes_name_the_problem(tmp_path, old, new, match):
    f = tmp_path / "u.yaml"
    f.write_text(UNIVERSE.replace(old, new))
    with pytest.raises(ConfigError, match=match) as info:
        load_universe(str(f))
    assert "u.yaml" in str(info.value)


def test_token_counting_works_offline(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # any download attempt would fail
    assert count_tokens("hello world") == 2
    assert os.environ["TIKTOKEN_CACHE_DIR"]


def test_model_resolution_errors_are_clear(tmp_path):
    assert looks_like_hub_id("org/model") and not looks_like_hub_id("./org/model")
    with pytest.raises(ModelNotFound, match="no network"):
        resolve_model("nobody-here/not-a-model")
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_embedded_model_is_a_servable_hf_folder(embedded_model: Path):
    from transformers import AutoConfig, AutoTokenizer

    assert (embedded_model / ".complete").is_file()
    cfg = AutoConfig.from_pretrained(embedded_model)
    tok = AutoTokenizer.from_pretrained(embedded_model)
    assert cfg.model_type == "llama" and getattr(cfg, "quantization_config", None) is None
    assert cfg.head_dim == 64 and tok.chat_template and tok.eos_token == "<|im_end|>"
    gen = json.loads((embedded_model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
