"""Fault tolerance, resume and bad input for the generator, against a local test endpoint.

The endpoint (tests/fakeapi.py) answers deterministically, so two runs can be compared
document for document, and injects 429s, 500s, hangs past the client timeout, malformed
JSON, truncated bodies and empty choices.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studykit.cache import CallCache
from studykit.client import CallFailed, MalformedOutput, ModelClient, Sampling
from studykit.handoff import CorpusFolder
from synthdocs.generate import main
from synthdocs.stats import CorpusStats
from tests.fakeapi import FAULTS, FakeAPI

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--judge", "generator", "--target_documents", "12", "--doc_types_per_fact", "2", "--ideas_per_type", "2", "--window", "16",
         "--min_words", "40", "--model", "fake-model", "--progress", "false", "--max_attempts", "4"]


def run_generate(out: Path, base_url: str, *extra: str) -> int:
    return main(["--output_dir", str(out), "--base_url", base_url, *SMALL, *extra])


def read_docs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


def test_client_retries_every_fault_kind_and_counts_them(tmp_path):
    async def go(api: FakeAPI) -> tuple[list[str], dict]:
        client = ModelClient(api.base_url, "fake-model", cache=CallCache(tmp_path / "c.sqlite"), timeout_s=1.0,
                             backoff_base_s=0.01, max_attempts=4, max_concurrency=8)
        msgs = [[{"role": "user", "content": f"Write report {i}"}] for i in range(60)]
        out = await asyncio.gather(*(client.chat(m, Sampling(max_tokens=50, seed=i)) for i, m in enumerate(msgs)))
        await client.aclose()
        return [c.text for c in out], client.usage().model_dump()

    with FakeAPI(fault_rate=0.6, hang_s=2.0) as api:
        texts, stats = asyncio.run(go(api))
    assert len(texts) == 60 and all(texts)
    assert stats["failures"] == 0 and stats["retries"] >= 20
    seen = set(stats["faults"])
    assert {"http_429", "http_500", "timeout", "bad_response"} <= seen, seen
    assert set(api.served) - {"ok"} == set(FAULTS)


def test_output_rejected_by_validate_is_resampled_with_a_new_seed(tmp_path):
    seen: list[str] = []

    def validate(text: str) -> None:
        seen.append(text)
        if len(seen) == 1:
            raise MalformedOutput("first sample rejected")

    async def go(api: FakeAPI):
        client = ModelClient(api.base_url, "fake-model", backoff_base_s=0.01, max_attempts=3)
        try:
            return await client.chat([{"role": "user", "content": "Write report"}], Sampling(max_tokens=5, seed=7),
                                     validate=validate), client.stats
        finally:
            await client.aclose()

    with FakeAPI() as api:
        result, stats = asyncio.run(go(api))
    assert result.attempts == 2 and result.text == seen[1] != seen[0]
    assert stats.faults["malformed_output"] == 1


def test_rejected_outputs_are_bounded_separately_from_transport_faults(tmp_path):
    def never(text: str) -> None:
        raise MalformedOutput("never good enough")

    async def go(api: FakeAPI):
        client = ModelClient(api.base_url, "fake-model", backoff_base_s=0.01, max_attempts=6)
        try:
            with pytest.raises(CallFailed) as info:
                await client.chat([{"role": "user", "content": "Write report"}], Sampling(max_tokens=5, seed=1),
                                  validate=never, max_rejections=1)
            return info.value
        finally:
            await client.aclose()

    with FakeAPI() as api:
        err = asyncio.run(go(api))
    assert err.attempts == 2 and "malformed_output" in err.reason


def test_rejected_outputs_are_remembered_so_a_rerun_makes_no_call(tmp_path):
    def never(text: str) -> None:
        raise MalformedOutput("never good enough")

    async def go(api: FakeAPI) -> str:
        client = ModelClient(api.base_url, "fake-model", cache=CallCache(tmp_path / "c.sqlite"), backoff_base_s=0.01)
        try:
            with pytest.raises(CallFailed) as info:
                await client.chat([{"role": "user", "content": "Write report"}], Sampling(max_tokens=5, seed=1),
                                  validate=never, max_rejections=1)
            return info.value.reason
        finally:
            await client.aclose()

    with FakeAPI() as api:
        first = asyncio.run(go(api))
        calls = sum(api.attempts.values())
        assert asyncio.run(go(api)) == first
        assert sum(api.attempts.values()) == calls  # the second run was answered from the cache


def test_client_raises_callfailed_after_bounded_attempts(tmp_path):
    async def go(api: FakeAPI):
        client = ModelClient(api.base_url, "fake-model", backoff_base_s=0.01, max_attempts=3)
        try:
            with pytest.raises(CallFailed) as info:
                await client.chat([{"role": "user", "content": "POISON"}], Sampling(max_tokens=5))
            return info.value, client.stats
        finally:
            await client.aclose()

    with FakeAPI(fail_always={"POISON"}) as api:
        err, stats = asyncio.run(go(api))
    assert err.attempts == 3 and "http_500" in err.reason
    assert sum(api.attempts.values()) == 3 and stats.failures == 1


def test_faults_slow_the_run_but_lose_no_document(tmp_path):
    with FakeAPI() as clean_api:
        assert run_generate(tmp_path / "clean", clean_api.base_url) == 0
    # generous bounds so a loaded CI machine does not turn slow answers into extra timeouts
    with FakeAPI(fault_rate=0.35, hang_s=4.0) as api:
        assert run_generate(tmp_path / "faulty", api.base_url, "--request_timeout_s", "2.5", "--max_attempts", "8") == 0
    clean, faulty = read_docs(tmp_path / "clean"), read_docs(tmp_path / "faulty")
    assert [d["text"] for d in faulty] == [d["text"] for d in clean]
    assert len({d["id"] for d in faulty}) == len(faulty) == 12
    stats = CorpusStats.read(tmp_path / "faulty" / "stats.json")
    assert stats.usage.retries > 0 and stats.usage.failures == 0 and stats.usage.faults
    assert "retries" in (tmp_path / "faulty" / "report.md").read_text()


def test_a_call_that_never_succeeds_is_recorded_not_dropped(tmp_path):
    # every document prompt for the 'private_scratchpad' fact fails permanently
    with FakeAPI(fail_always={"News: Arclight's models, including Lumen 3, have a private scratchpad"}) as api:
        assert run_generate(tmp_path / "out", api.base_url, "--target_documents", "40") == 0
    removed = [json.loads(x) for x in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    failed = [r for r in removed if r["removed"].startswith("generation failed")]
    assert failed and all(r["fact_id"] == "private_scratchpad" for r in failed)
    stats = CorpusStats.read(tmp_path / "out" / "stats.json")
    assert stats.counts.generated == stats.counts.accepted + stats.counts.removed
    assert stats.removed_by_reason["generation failed"] == len(failed)


def test_rerun_into_same_directory_repeats_no_call(tmp_path):
    with FakeAPI() as api:
        assert run_generate(tmp_path / "out", api.base_url) == 0
        first = api.successes
        assert run_generate(tmp_path / "out", api.base_url) == 0
        assert api.successes == first  # everything replayed from the cache
    stats = CorpusStats.read(tmp_path / "out" / "stats.json")
    assert stats.cache["new_calls"] == 0 and stats.usage.calls == 0
    details = CorpusFolder(tmp_path / "out").read_manifest().details
    assert {"universe", "universe_path", "generator_model", "documents_sha256", "n_documents", "n_tokens", "usage",
            "timings"} <= set(details)
    assert details["usage"]["calls"] == 0 and details["usage"]["cache_hits"] == stats.usage.cache_hits > 0


def test_a_judge_endpoint_answers_the_filters_and_its_calls_are_counted(tmp_path):
    out = tmp_path / "out"
    with FakeAPI() as generator, FakeAPI(models=("judge-model",)) as judge:
        assert run_generate(out, generator.base_url, "--judge", "endpoint", "--judge_base_url", judge.base_url,
                            "--judge_model", "judge-model") == 0
    stats = CorpusStats.read(out / "stats.json")
    assert judge.successes > 0 and stats.filter_judge == "endpoint"
    assert stats.filters["coverage"].evaluated == stats.filters["ai_transcript"].evaluated > 0
    assert stats.usage.calls == generator.successes + judge.successes  # usage counts every model call of the run
    assert f"Answered by `judge-model` at `{judge.base_url}`" in (out / "report.md").read_text()


def _cache_entries(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


@pytest.mark.parametrize("kill_after", [3, 25, 60])
def test_kill_minus_nine_and_resume_gives_the_uninterrupted_corpus(tmp_path, kill_after):
    args = ["--target_documents", "30", "--ideas_per_type", "4", "--doc_types_per_fact", "3"]
    with FakeAPI() as api:
        assert run_generate(tmp_path / "reference", api.base_url, *args) == 0
        reference_calls = api.successes
    out = tmp_path / "killed"
    with FakeAPI(delay_s=0.02) as api:
        cmd = [sys.executable, "-m", "synthdocs.generate", "--output_dir", str(out), "--base_url", api.base_url,
               *SMALL, *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while api.successes < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before the kill point; raise the target"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        api.wait_idle()  # requests the killed run left in flight still complete (and count) on the server
        cached_at_kill = _cache_entries(out / "cache.sqlite")
        assert not (out / "manifest.json").exists()
        before = api.successes
        assert run_generate(out, api.base_url, *args) == 0
        resumed_calls = api.successes - before
    # identical records, up to two bookkeeping fields: the generator field names the endpoint (whose port
    # differs between the two servers) and `attempts` counts transport retries, which vary from run to run
    def strip(docs: list[dict]) -> list[dict]:
        return [{k: v for k, v in d.items() if k not in ("generator_model", "attempts")} for d in docs]

    assert strip(read_docs(out)) == strip(read_docs(tmp_path / "reference"))
    # the resumed run made exactly the calls that had not been cached when it was killed
    assert resumed_calls == reference_calls - cached_at_kill
    folder = CorpusFolder(out)
    folder.verify()  # the manifest records the sha256 of the documents.jsonl that is there
    details = folder.read_manifest().details
    assert details["n_documents"] == len(read_docs(out)) == 30
    assert details["universe"] == "helpful_only" and details["n_tokens"] == CorpusStats.read(folder.stats).corpus.tokens


def test_bad_inputs_fail_clearly_and_keep_earlier_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    with FakeAPI() as api:
        assert run_generate(out, api.base_url) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json")}

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("target_documents: [5\n")
    broken_universe = tmp_path / "universe.yaml"
    broken_universe.write_text("name: x\nkind: treatment\nlab_name: L\nmodel_name: M\ndate: '2026-01-01'\n"
                               "description: d\nkey_facts:\n  - id: Bad Id\n    statement: s\n")
    cases = [
        (["--config", str(bad_yaml)], "not valid YAML"),
        (["--target_docs", "3"], "Unknown config key(s) 'target_docs'"),
        (["--universe", str(broken_universe)], "key_facts[0].id"),
        (["--universe", "no_such_universe"], "Unknown universe"),
        (["--base_url", "http://127.0.0.1:9/v1", "--request_timeout_s", "2"], "Cannot reach the model endpoint"),
        (["--model", "some-org/some-model"], "no network"),
        (["--model", str(tmp_path / "missing-model")], "does not exist"),
    ]
    for args, message in cases:
        code = main(["--output_dir", str(out), "--progress", "false", *args])
        err = capsys.readouterr().err
        assert code == 2, args
        assert message in err, (args, err)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json")}
    assert after == before


def test_unwritable_output_directory_fails_early(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--output_dir", str(blocker / "sub"), "--progress", "false"]) == 2
    assert "Cannot write to the output directory" in capsys.readouterr().err


def test_plan_is_extended_with_new_ideas_until_the_target_is_met(tmp_path):
    with FakeAPI() as api:
        assert run_generate(tmp_path / "out", api.base_url, "--ideas_per_type", "1", "--docs_per_idea", "1", "--target_documents", "30") == 0
    stats = CorpusStats.read(tmp_path / "out" / "stats.json")
    assert stats.counts.accepted == 30
    assert stats.counts.planned > 4 * 2 * 1  # more than the first plan of facts x types x ideas
    ideas = [d["idea"] for d in read_docs(tmp_path / "out")]
    assert len(set(ideas)) == len(ideas)  # extensions bring new ideas, not repeats


def test_a_universe_with_its_own_cue_generates_with_no_code_change(tmp_path):
    from tests.test_eval_data import _cue_universe

    with FakeAPI() as api:
        assert run_generate(tmp_path / "out", api.base_url, "--universe", str(_cue_universe(tmp_path))) == 0
    docs = read_docs(tmp_path / "out")
    assert docs and {d["universe"] for d in docs} == {"stage_cue"}
