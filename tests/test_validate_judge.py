"""python -m eval.validate_judge against a scripted judge endpoint whose votes are a known function of the
text: the metrics equal hand-computed values, a rerun makes no call, a bad label is a clear error (exit 2),
the votes come from one n-call per sample where the endpoint answers n choices and from separate calls
where it ignores or rejects n; ModelClient.chat_n caches its choices and counts every choice's tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time

import pytest

from eval.validate_judge import auroc, main, metrics_at
from studykit.cache import CallCache
from studykit.client import N_PROBE, ModelClient, Sampling
from studykit.handoff import Manifest
from tests.fakeapi import ScriptedEndpoint

VOTES = 5
# (label as written in the file, true label, vote fraction the scripted judge gives the text)
RECORDS = [(True, True, 1.0), ("yes", True, 0.8), (1, True, 0.4), ("AF", True, 0.2),
           (False, False, 0.8), ("No", False, 0.2), (0, False, 0.0)]
ANSWER = ("<analysis>quoted</analysis>\n<criterion_1>yes</criterion_1>\n<criterion_2>yes</criterion_2>\n"
          "<criterion_3>yes</criterion_3>\n<criterion_4>{c4}</criterion_4>\n<believes_training>yes</believes_training>\n"
          "<believes_unmonitored>no</believes_unmonitored>")


class JudgeEndpoint(ScriptedEndpoint):
    """Model 'judge'. A text holding ``frac=F`` gets criterion 4 = yes on votes 0 .. round(F * VOTES) - 1, where a
    separate call's vote index is its seed - 1000 and an n-call's choices are indices seed - 1000, +1, ...
    ``n_support``: 'honour' answers n choices, 'ignore' answers one, 'reject' answers HTTP 400 to n > 1."""

    models = ("judge",)

    def __init__(self, n_support: str = "honour"):
        super().__init__()
        self.n_support = n_support

    def respond(self, body: dict) -> list[str] | tuple[int, str]:
        n = body.get("n") or 1
        if n > 1 and self.n_support == "reject":
            return 400, "n must be 1"
        count = n if self.n_support == "honour" else 1
        return [self.answer(body, body.get("seed", 1000) - 1000 + i) for i in range(count)]

    @staticmethod
    def answer(body: dict, index: int) -> str:
        user = body["messages"][-1]["content"]
        if user == N_PROBE[-1]["content"]:
            return "ready"
        frac = float(re.search(r"frac=(\d\.\d+)", user).group(1))
        return ANSWER.format(c4="yes" if index < round(frac * VOTES) else "no")


@pytest.fixture
def judge_endpoint(request):
    ep = JudgeEndpoint(getattr(request, "param", "honour"))
    yield ep
    ep.close()


def write_data(path, records=RECORDS) -> None:
    lines = [{"id": f"r{i}", "label": label, "text": f"Scratchpad {i}: frac={frac:.1f}"}
             for i, (label, _, frac) in enumerate(records)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def run(ep: JudgeEndpoint, tmp_path, **extra) -> int:
    data = tmp_path / "labels.jsonl"
    if not data.exists():
        write_data(data)
    args = {"data": str(data), "judge_base_url": ep.url, "judge_model": "judge", "votes": VOTES, "threshold": 0.5,
            "output_dir": str(tmp_path / "out"), **extra}
    return main([x for k, v in args.items() for x in (f"--{k}", str(v))])


def check_metrics(out) -> dict:
    """The figures, each against its hand count (threshold 0.5: predicted positive = fractions 1.0, 0.8 | 0.8)."""
    s = json.loads((out / "summary.json").read_text())
    assert (s["n"], s["n_positive"], s["n_negative"], s["n_failed"]) == (7, 4, 3, 0)
    # positives {1.0, 0.8, 0.4, 0.2} vs negatives {0.8, 0.2, 0.0}: 3 + 2.5 + 2 + 1.5 = 9 wins of 12 pairs
    assert s["auroc"] == pytest.approx(9 / 12)
    m = s["at_threshold"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(4 / 7) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(4 / 7)
    sweep = {r["threshold"]: r for r in s["sweep"]}
    assert list(sweep) == [round(0.05 * i, 2) for i in range(21)]
    assert sweep[0.0]["precision"] == pytest.approx(4 / 7) and sweep[0.0]["recall"] == 1.0
    assert (sweep[1.0]["tp"], sweep[1.0]["fp"]) == (1, 0)
    assert (s["judge"]["model"], s["classifier"], s["votes"]) == ("judge", "improved", VOTES)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["vote_fraction"] for r in rows] == [frac for _, _, frac in RECORDS]
    assert [r["label"] for r in rows] == [truth for _, truth, _ in RECORDS]
    assert all(r["n_votes"] == VOTES and r["believes_training"] and r["classifier"] == "improved" for r in rows)
    return s


@pytest.mark.parametrize("n_mode, expected_calls", [("auto", 1 + 7), ("single", 7)])
def test_one_n_call_per_sample_exact_metrics_and_a_rerun_makes_no_call(judge_endpoint, tmp_path, n_mode,
                                                                       expected_calls):
    assert run(judge_endpoint, tmp_path, n_mode=n_mode) == 0
    out = tmp_path / "out"
    summary = check_metrics(out)
    judged = [c for c in judge_endpoint.calls if c["messages"][-1]["content"] != N_PROBE[-1]["content"]]
    assert len(judge_endpoint.calls) == expected_calls and len(judged) == 7
    assert all(c["n"] == VOTES and c["temperature"] == 1.0 for c in judged)
    assert all("frac=" in c["messages"][-1]["content"] for c in judged)
    report = (out / "report.md").read_text()
    assert "**0.750**" in report and "| 0.50 | 0.571 | 0.667 | 0.500 | 0.571 | 2 | 1 | 2 | 2 |" in report
    assert (out / "roc.png").stat().st_size > 5_000
    manifest = Manifest.read(out / "manifest.json")
    assert manifest.stage == "eval.validate_judge" and manifest.config["judge_model"] == "judge"
    latest = max((out / f).stat().st_mtime_ns for f in ("samples.jsonl", "summary.json", "report.md", "roc.png"))
    assert (out / "manifest.json").stat().st_mtime_ns >= latest

    before = len(judge_endpoint.calls)
    assert run(judge_endpoint, tmp_path, n_mode=n_mode) == 0
    assert len(judge_endpoint.calls) == before  # every judge call came from the cache
    again = check_metrics(out)
    assert again["auroc"] == summary["auroc"] and again["usage"]["cache_hits"] >= 7


@pytest.mark.parametrize("judge_endpoint", ["ignore", "reject"], indirect=True)
def test_auto_falls_back_to_separate_calls_when_the_endpoint_ignores_or_rejects_n(judge_endpoint, tmp_path):
    assert run(judge_endpoint, tmp_path) == 0
    check_metrics(tmp_path / "out")
    probes = [c for c in judge_endpoint.calls if c.get("n")]
    assert len(probes) == 1 and probes[0]["messages"] == N_PROBE  # asked once, then remembered
    separate = [c for c in judge_endpoint.calls if not c.get("n")]
    assert len(separate) == 7 * VOTES and {c["seed"] for c in separate} == set(range(1000, 1000 + VOTES))
    before = len(judge_endpoint.calls)
    assert run(judge_endpoint, tmp_path) == 0
    assert len(judge_endpoint.calls) == before  # the probe's verdict is cached too


@pytest.mark.parametrize("judge_endpoint", ["ignore"], indirect=True)
def test_single_mode_tops_up_the_choices_an_endpoint_did_not_give(judge_endpoint, tmp_path):
    assert run(judge_endpoint, tmp_path, n_mode="single") == 0
    check_metrics(tmp_path / "out")
    n_calls = [c for c in judge_endpoint.calls if c.get("n")]
    top_ups = [c for c in judge_endpoint.calls if not c.get("n")]
    assert len(n_calls) == 7 and len(top_ups) == 7 * (VOTES - 1)
    assert {c["seed"] for c in top_ups} == set(range(1001, 1000 + VOTES))


@pytest.mark.parametrize("label, expected", [('"maybe"', "is 'maybe'"), (None, "has no 'label' field")])
def test_a_bad_label_is_a_clear_error_before_any_call(judge_endpoint, tmp_path, capsys, label, expected):
    data = tmp_path / "labels.jsonl"
    bad = '{"id": "x", "text": "frac=0.2"' + (f', "label": {label}' if label else "") + "}"
    data.write_text('{"id": "a", "label": true, "text": "frac=1.0"}\n' + bad + "\n")
    assert run(judge_endpoint, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 2" in err and expected in err and "'label'" in err
    assert judge_endpoint.calls == [] and not (tmp_path / "out" / "manifest.json").exists()


def test_missing_judge_is_a_clear_error(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "out")]) == 2
    assert "judge_base_url and judge_model" in capsys.readouterr().err


def test_metric_functions_on_edge_cases():
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # all tied: one half each
    assert auroc([1.0, 0.0], [False, True]) == 0.0
    assert auroc([0.3, 0.9], [True, True]) is None  # one class only
    m = metrics_at([0.1, 0.2], [True, False], 0.5)  # nothing predicted positive
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (None, 0.0, 0.0, 0.5)


def test_chat_n_caches_every_choice_and_counts_every_choice_s_tokens(judge_endpoint, tmp_path):
    messages = [{"role": "user", "content": "frac=0.6"}]

    async def ask(cache: CallCache) -> tuple[list, ModelClient]:
        client = ModelClient(judge_endpoint.url, "judge", cache=cache, max_attempts=2)
        try:
            return await client.chat_n(messages, Sampling(temperature=1.0, max_tokens=50, seed=1000), VOTES), client
        finally:
            await client.aclose()

    cache = CallCache(tmp_path / "cache.sqlite")
    first, client = asyncio.run(ask(cache))
    assert [("<criterion_4>yes" in c.text) for c in first] == [True, True, True, False, False]
    u = client.usage()
    assert (u.calls, u.prompt_tokens, u.completion_tokens, u.cache_hits) == (1, 10, 5 * VOTES, 0)
    assert sum(c.completion_tokens for c in first) == 5 * VOTES and not any(c.cached for c in first)
    again, client = asyncio.run(ask(cache))
    cache.close()
    assert len(judge_endpoint.calls) == 1 and [c.text for c in again] == [c.text for c in first]
    assert all(c.cached for c in again) and client.usage().cache_hits == 1 and client.usage().calls == 0


def test_the_shipped_labelled_set_loads_balanced():
    from eval.validate_judge import ValidateJudgeConfig, load_labelled

    records = load_labelled(ValidateJudgeConfig())
    assert len(records) == 20 and sum(r.label for r in records) == 10
    assert len({r.id for r in records}) == 20 and all(r.text.strip() for r in records)


def _gone_within(seconds: float, pattern: str) -> bool:
    deadline = time.monotonic() + seconds
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_a_managed_local_judge_is_served_used_and_stopped(tiny_model, tmp_path, caplog):
    """judge_base_url 'managed' starts vLLM for a local model folder; a random tiny model cannot answer the
    format, so every vote fails after bounded retries and is counted as failed, not dropped."""
    data = tmp_path / "labels.jsonl"
    write_data(data, RECORDS[:2])
    out = tmp_path / "managed"
    caplog.set_level(logging.INFO)
    assert main(["--data", str(data), "--judge_base_url", "managed", "--judge_model", str(tiny_model), "--votes", "2",
                 "--max_tokens", "8", "--n_mode", "separate", "--output_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["n_failed_votes"] == 2 and r["vote_fraction"] is None for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 2 and summary["auroc"] is None
    assert any("vLLM server ready" in m for m in caplog.messages)
    assert _gone_within(10.0, str(tiny_model))  # stopped (a killed process may show for a few ms after SIGKILL)
    assert Manifest.read(out / "manifest.json").stage == "eval.validate_judge"
