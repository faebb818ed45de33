"""End-to-end generation on the real embedded model (SmolLM2-135M-Instruct) served by vLLM."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studykit.handoff import CorpusFolder
from studykit.server import ServerError, ServerSpec, VLLMServer
from synthdocs.generate import main
from synthdocs.stats import CorpusStats

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TINY = ["--target_documents", "4", "--max_plan_extensions", "0", "--doc_types_per_fact", "1", "--ideas_per_type", "1",
        "--doc_words", "120", "--doc_max_tokens", "200", "--brainstorm_max_tokens", "150", "--min_words", "30",
        "--progress", "false"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_generate_against_a_real_model_and_resume_without_new_calls(smol_server, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value")
    out = tmp_path / "gen"
    # the shared server is a CPU vLLM server: no per-request seeds (its CPU backend crashes on them)
    args = ["--output_dir", str(out), "--base_url", smol_server.base_url, "--model", "smol",
            "--per_request_seed", "false", *TINY]
    assert main(args) == 0
    docs, removed = _lines(out / "documents.jsonl"), _lines(out / "removed.jsonl")
    stats = CorpusStats.read(out / "stats.json")
    folder = CorpusFolder(out)
    folder.verify()
    manifest = folder.read_manifest()
    # every generated document is accounted for exactly once
    assert stats.counts.generated == len(docs) + len(removed) > 0
    assert len({d["id"] for d in docs + removed}) == len(docs) + len(removed)
    for d in docs:
        assert d["text"] and d["n_tokens"] > 0 and d["fact_id"] and d["doc_type"] and d["idea"]
        assert d["filters"]["structural"] == [] and d["filters"]["coverage"] is True
        assert not any(d["filters"][k] for k in ("ai_transcript", "tier_behavior", "deceive_training"))
    assert all(r["removed"] for r in removed)
    assert stats.usage.calls > 0 and stats.usage.completion_tokens > 0 and stats.usage.peak_concurrency > 0
    assert manifest.details["n_documents"] == len(docs) and manifest.details["n_tokens"] == stats.corpus.tokens
    assert manifest.config["api_key_env"] == "OPENAI_API_KEY"
    for name in ("manifest.json", "stats.json", "report.md", "documents.jsonl"):
        assert "sk-test-secret-value" not in (out / name).read_text()
    assert len(datasets.load_from_disk(str(out / "dataset"))) == len(docs)
    assert "## Counts per stage" in (out / "report.md").read_text()

    before = (out / "documents.jsonl").read_text()
    assert main(args) == 0
    again = CorpusStats.read(out / "stats.json")
    assert again.cache["new_calls"] == 0 and again.usage.calls == 0
    assert (out / "documents.jsonl").read_text() == before


def _cache_entries(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _pids_listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in f.readlines()[1:])


def test_managed_server_survives_kill_of_its_owner_without_orphans_then_resumes(tmp_path):
    out = tmp_path / "managed"
    cmd = [sys.executable, "-m", "synthdocs.generate", "--output_dir", str(out), "--server_enforce_eager", "true", *TINY]
    err = tmp_path / "stderr.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err.open("w"))
    deadline = time.time() + 400
    while _cache_entries(out / "cache.sqlite") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the server (and its engine processes) must go away with their owner
    deadline = time.time() + 60
    port = int(re.search(r"starting vLLM server on port (\d+)", err.read_text()).group(1))
    while _pids_listening(port) and time.time() < deadline:
        time.sleep(1)
    assert not _pids_listening(port), "vLLM server outlived the killed generator"
    cached = _cache_entries(out / "cache.sqlite")
    assert cached >= 3 and not (out / "manifest.json").exists()

    assert main(["--output_dir", str(out), "--server_enforce_eager", "true", *TINY]) == 0
    stats = CorpusStats.read(out / "stats.json")
    assert stats.cache["entries_before"] == cached
    assert stats.cache["hits"] >= cached  # everything cached before the kill was replayed, not redone
    CorpusFolder(out).verify()
    assert CorpusFolder(out).read_manifest().details["n_documents"] == stats.corpus.documents


def test_server_start_failure_shows_the_server_log(tmp_path):
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ServerError, match="Last lines of"):
        VLLMServer(ServerSpec(model=str(bad), enforce_eager=True, startup_timeout_s=300),
                   log_path=tmp_path / "server.log").start()
