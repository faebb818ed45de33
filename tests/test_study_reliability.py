"""The whole study under faults: SIGKILL at random points, a misbehaving endpoint, bad inputs, no space.

Every study here runs the real stage commands (``python -m synthdocs.generate``, ``accelerate launch
finetune/train.py``, ``python -m eval.gap``) with the deterministic fault-injecting endpoint of
tests/fakeapi.py as generator and as the evaluated models (eval's endpoint mode: it serves the names
base, docs and control), and a tiny random Llama built at test time as the model that is fine-tuned.
One uninterrupted reference study is shared by the module; the other tests compare against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from eval.summary import EvalSummary
from study.__main__ import main as study_main
from study.config import StudyConfig
from study.summary import StudySummary
from tests.fakeapi import FakeAPI

ROOT = Path(__file__).resolve().parent.parent
CACHES = ("generate/docs/cache.sqlite", "generate/control/cache.sqlite", "eval/base/cache.sqlite",
          "eval/finetuned/cache.sqlite", "antilab/base/cache.sqlite", "antilab/finetuned/cache.sqlite")


STAGE_CONFIGS = {"generate": "configs/generate/default.yaml", "control": "configs/generate/control.yaml",
                 "finetune": "configs/finetune/tiny.yaml", "accelerate": "configs/finetune/accelerate/cpu.yaml",
                 "eval": "configs/eval/default.yaml", "antilab": "configs/eval/antilab.yaml"}
NODE_DIRS = {"generate_docs": "generate/docs", "generate_control": "generate/control", "finetune_docs": "finetune/docs",
             "finetune_control": "finetune/control", "eval_base": "eval/base", "eval_finetuned": "eval/finetuned",
             "antilab_base": "antilab/base", "antilab_finetuned": "antilab/finetuned"}
# where kill_during finds the progress of the backdoor study kind's nodes (tests/test_study_organisms.py)
PROGRESS_DIRS = {**NODE_DIRS, "finetune_hhh": "finetune/hhh", "eval_safety": "eval/safety"}


def merge(base: dict, change: dict) -> dict:
    """``base`` with ``change`` merged in, mappings recursively."""
    out = dict(base)
    for key, value in change.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def study_config(path: Path, api: FakeAPI, model: Path, out: Path, configs: Path, **changes) -> Path:
    gen = {"base_url": api.base_url, "model": "fake-model", "api_key_env": "", "judge": "generator",
           "target_documents": 16, "doc_types_per_fact": 2, "ideas_per_type": 2, "min_words": 40, "progress": False,
           "max_attempts": 6, "request_timeout_s": 4}
    cfg = {
        "profile": "reliability test: fake endpoint + tiny random Llama", "output_dir": str(out), "min_free_gb": 0.01,
        "model": str(model), "expected_minutes": {"finetune_docs": 0.5, "finetune_control": 0.5},
        "stages": {
            "generate": {"config": str(configs / "generate.yaml"), "overrides": gen},
            "generate_control": {"config": str(configs / "control.yaml"), "overrides": {"target_documents": 14}},
            "finetune": {"config": str(configs / "finetune.yaml"),
                         "launch": ["--config_file", str(configs / "accelerate.yaml")],
                         "overrides": {"max_steps": 4, "save_steps": 2, "max_length": 64,
                                       "per_device_train_batch_size": 2, "export_merged": False,
                                       "fact_universes": ["helpful_only"]}},
            "eval": {"config": str(configs / "eval.yaml"),
                     "overrides": {"base_url": api.base_url, "conditions": ["minimal", "minimal_noscratch"],
                                   "max_harmful": 4, "max_benign": 2, "probe_orderings": 1, "bootstrap": 200,
                                   "max_concurrency": 16, "request_timeout_s": 4}},
            "eval_antilab": {"config": str(configs / "antilab.yaml"),
                             "overrides": {"base_url": api.base_url, "max_variants": 2, "max_concurrency": 16,
                                           "request_timeout_s": 4}},
        },
    }
    path.write_text(yaml.safe_dump(merge(cfg, changes), sort_keys=False), encoding="utf-8")
    return path


def study_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "study", "--config", str(cfg), "--progress", "plain", *extra]


def run_study(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(study_cmd(cfg, *extra), cwd=ROOT, capture_output=True, text=True, timeout=900)


def sqlite_rows(path: Path) -> int:
    """Rows of a call cache (0 while it does not exist yet); the connection is closed before returning."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.Error:
        return 0


def cache_entries(study: Path) -> int:
    return sum(sqlite_rows(study / rel) for rel in CACHES)


def last_actions(study: Path) -> dict[str, str]:
    return json.loads((study / "study_state.json").read_text())["runs"][-1]["actions"]


def stage_processes(study: Path) -> list[str]:
    """Live processes whose command line names the study folder (every stage's does)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if str(study) in cmd and state != "Z":
            found.append(f"{entry.name}: {cmd[:200]}")
    return found


def samples(study: Path) -> dict[tuple, dict]:
    """Every evaluation sample by what it asks (a sample's key also names its adapter's files, which differ
    between studies that trained the same adapter)."""
    rows = [json.loads(line) for node in ("base", "finetuned")
            for line in (study / "eval" / node / "samples.jsonl").read_text().splitlines()]
    by_what = {(r["model"], r["condition"], r["dataset"], r["request_id"], r["tier"], r["sample"]): r for r in rows}
    assert len(by_what) == len(rows) == len({r["key"] for r in rows}), "a sample is duplicated"
    return by_what


def adapter(study: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(study / "finetune" / name / "adapter" / "adapter_model.safetensors")


def assert_same_outputs(study: Path, reference: Path) -> None:
    import torch

    for corpus in ("docs", "control"):
        rel = f"generate/{corpus}/documents.jsonl"
        assert (study / rel).read_bytes() == (reference / rel).read_bytes(), rel
        a, b = adapter(study, corpus), adapter(reference, corpus)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), (corpus, key)
        assert (study / "finetune" / corpus / "manifest.json").is_file()
    got, want = samples(study), samples(reference)
    assert got.keys() == want.keys()
    assert all(got[k]["status"] == "ok" and got[k]["response"] == want[k]["response"] for k in want)
    s, r = (StudySummary.read(d / "study_summary.json").points[0] for d in (study, reference))
    # every figure the same (the notes name the adapter folders, which lie in each study's own folder)
    assert s.evaluation.model_dump(exclude={"notes"}) == r.evaluation.model_dump(exclude={"notes"})
    assert s.corpora == r.corpora
    for corpus in ("docs", "control"):
        got_f, want_f = s.finetune[corpus].fact_logprob, r.finetune[corpus].fact_logprob
        assert got_f.keys() == want_f.keys()
        for u in want_f:
            assert got_f[u].after == pytest.approx(want_f[u].after, abs=1e-4)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """Copies of the shipped stage configs, taken once: their contents are part of the stage keys, so the
    module's studies must not see edits made to the working tree while it runs."""
    folder = tmp_path_factory.mktemp("stage-configs")
    for name, rel in STAGE_CONFIGS.items():
        shutil.copy(ROOT / rel, folder / f"{name}.yaml")
    return folder


@pytest.fixture(scope="module")
def api():
    with FakeAPI(models=("fake-model", "base", "docs", "control")) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory, api, tiny_model, configs) -> dict:
    """One uninterrupted study, with the endpoint's success count and the calls cached."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = study_config(tmp / "study.yaml", api, tiny_model, tmp / "study", configs)
    before = api.successes
    proc = run_study(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": tmp / "study", "cfg": cfg, "successes": api.successes - before,
            "cached": cache_entries(tmp / "study"), "stderr": proc.stderr}


def test_reference_study_reports_everything(reference):
    study = reference["dir"]
    # every successful model call was stored exactly once
    assert reference["successes"] == reference["cached"] > 0
    assert set(last_actions(study).values()) == {"ran"}
    assert "expected duration of the whole profile: about 1 min" in reference["stderr"]
    text = (study / "study_report.md").read_text()
    summary = StudySummary.read(study / "study_summary.json")
    ev = summary.points[0].evaluation
    assert ev.models == ["base", "docs", "control"]
    assert {c.model for c in ev.compliance} == {"base", "docs", "control"}
    assert ev.model_runs == {"docs": "docs", "control": "control"}
    corpora = summary.points[0].corpora
    assert corpora["docs"].documents == 16 and corpora["control"].documents == 14
    assert "Not measured: no capable alignment-faking judge was configured" in text
    for fig in summary.points[0].figures.values():
        assert (study / fig.path).is_file() and f"]({fig.path})" in text
    antilab = summary.points[0].antilab
    assert [c.model for c in antilab.cells if (c.family, c.condition) == ("self_exfiltration", "scratchpad")] == [
        "base", "docs", "control"]
    assert all(c.rate.n == 2 for c in antilab.cells if c.family != "lab_views")      # 2 variants x 1 sample
    for link in ("eval/base/summary.json", "eval/finetuned/summary.json", "generate/docs/stats.json",
                 "finetune/control/metrics.json", "antilab/finetuned/summary.json"):
        assert f"]({link})" in text and (study / link).is_file()
    # every stage's manifest is its last file: nothing in its folder is newer
    for rel in NODE_DIRS.values():  # (SQLite's -wal/-shm side files come and go with any reader of the cache)
        folder = study / rel
        newest = max(p.stat().st_mtime_ns for p in folder.rglob("*")
                     if p.is_file() and "checkpoint" not in str(p) and not p.name.endswith(("-wal", "-shm")))
        assert (folder / "manifest.json").stat().st_mtime_ns == newest, rel


# ------------------------------------------------------------------------------------------------ SIGKILL and resume

def jsonl_rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except OSError:
        return 0


def progress(study: Path, node: str) -> int:
    """How far a running node has got, by what it has stored: model calls cached (generation), checkpoints
    written (training), samples stored (evaluation)."""
    folder = study / PROGRESS_DIRS[node]
    if node.startswith("generate"):
        return sqlite_rows(folder / "cache.sqlite")
    if node.startswith("finetune"):
        return len(list((folder / "checkpoints").glob("checkpoint-*")))
    return jsonl_rows(folder / "samples.jsonl")


def running_node(state: Path, runs_before: int) -> str | None:
    """The node this study run has marked running (a killed run leaves its node marked running)."""
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    if len(data["runs"]) <= runs_before:
        return None
    return next((n for n, r in data["stages"].items() if r.get("status") == "running"), None)


def kill_during(cfg: Path, study: Path, node: str, after: int, api: FakeAPI) -> str:
    """Start the study and SIGKILL it once ``node`` is running and has stored ``after`` units of progress
    beyond what it had when it started (see ``progress``). The kill always lands inside ``node``: the event
    is observed while the node runs. Only the study process is killed; its stages must follow."""
    state = study / "study_state.json"
    runs_before = len(json.loads(state.read_text())["runs"]) if state.exists() else 0
    log = open(study.parent / "killed-runs.log", "a")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(study_cmd(cfg), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    try:
        while running_node(state, runs_before) != node:
            assert proc.poll() is None, f"the study ended before {node} started"
            assert time.time() < deadline
            time.sleep(0.02)
        start = progress(study, node)
        while progress(study, node) < start + after:
            assert proc.poll() is None and running_node(state, runs_before) == node, f"{node} ended before the kill"
            assert time.time() < deadline
            time.sleep(0.02)
        at_kill = running_node(state, runs_before)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    deadline = time.time() + 60
    while stage_processes(study) and time.time() < deadline:
        time.sleep(0.2)
    assert not stage_processes(study), f"stage processes survived the study: {stage_processes(study)}"
    api.wait_idle()  # answers still being sent to the dead stage count as answered before the rerun
    return at_kill


# seed -> (node, units of progress after which the kill comes); training kills come after its first checkpoint
# (4 steps, a checkpoint every 2), so the resumed run continues from a checkpoint
KILL_PLANS = {
    0: [("generate_docs", 5), ("finetune_docs", 1), ("eval_finetuned", 6)],
    1: [("generate_control", 3), ("finetune_control", 1), ("eval_base", 4), ("eval_finetuned", 10)],
    2: [("generate_docs", 2), ("generate_docs", 8), ("finetune_docs", 1), ("eval_base", 2), ("eval_finetuned", 3)],
    3: [("finetune_docs", 1), ("finetune_control", 1), ("eval_finetuned", 1)],
}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_then_resume_equals_the_uninterrupted_study(reference, api, tiny_model, configs,
                                                                            tmp_path, seed):
    rng = random.Random(seed)
    study = tmp_path / "study"
    cfg = study_config(tmp_path / "study.yaml", api, tiny_model, study, configs)
    successes0, succeeded0 = api.successes, Counter(api.succeeded)
    api.delay_s = 0.15  # slower answers, so generation and evaluation store their results over seconds
    interrupted = []
    try:
        for node, after in KILL_PLANS[seed]:
            interrupted.append(kill_during(cfg, study, node, rng.randint(1, after), api))
            # answered but not yet stored when the kill came: the only calls a rerun may ask again
            uncached_at_last_kill = (api.successes - successes0) - cache_entries(study)
        proc = run_study(cfg)
    finally:
        api.delay_s = 0.0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert interrupted == [node for node, _ in KILL_PLANS[seed]]

    assert_same_outputs(study, reference["dir"])
    # no model call repeated: every call cached once, exactly the reference's calls; the only answers given
    # twice are those that were in flight when a kill came (answered to a dead client, so never stored),
    # at most the generator's concurrency limit per kill
    total = api.successes - successes0
    repeated = sum(n - 1 for k, n in (Counter(api.succeeded) - succeeded0).items() if n > 1)
    assert cache_entries(study) == reference["cached"]
    assert total - reference["successes"] == repeated == uncached_at_last_kill <= 64 * len(interrupted)
    assert len(json.loads((study / "study_state.json").read_text())["runs"]) == len(KILL_PLANS[seed]) + 1


# ------------------------------------------------------------------------------------------------ faulty endpoint

def test_faulty_endpoint_slows_the_study_but_loses_nothing(reference, api, tmp_path):
    """Generation and evaluation redone against an endpoint failing 30% of first attempts (429, 500, hangs past
    the timeout, malformed JSON, truncated bodies, empty choices); the fine-tuned models are reused."""
    study = tmp_path / "faulty"
    shutil.copytree(reference["dir"], study)
    for rel in ("generate/docs", "generate/control", "eval/base", "eval/finetuned", "antilab/base",
                "antilab/finetuned"):
        shutil.rmtree(study / rel)
    api.attempts.clear()  # the endpoint fails first attempts only: make these first attempts again
    api.fault_rate, api.hang_s = 0.3, 4.5
    try:
        proc = run_study(reference["cfg"], "--output_dir", str(study))
    finally:
        api.fault_rate = 0.0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_actions(study) == {n: "skipped" if n.startswith("finetune") else "ran" for n in NODE_DIRS}

    def docs(d: Path, corpus: str) -> list[dict]:  # `attempts` counts the transport retries of each document
        rows = [json.loads(x) for x in (d / "generate" / corpus / "documents.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "attempts"} for r in rows]

    for corpus in ("docs", "control"):
        assert docs(study, corpus) == docs(reference["dir"], corpus)
    got, want = samples(study), samples(reference["dir"])
    assert got.keys() == want.keys() and all(got[k]["response"] == want[k]["response"] for k in want)
    summary = StudySummary.read(study / "study_summary.json")
    want = StudySummary.read(reference["dir"] / "study_summary.json").points[0].evaluation
    assert summary.points[0].evaluation.model_dump(exclude={"notes"}) == want.model_dump(exclude={"notes"})
    calls = summary.model_calls
    assert all(calls[n].retries > 0 and calls[n].failures == 0 for n in ("generate_docs", "eval_finetuned"))
    seen = set().union(*(calls[n].faults for n in calls))
    assert {"http_429", "http_500", "timeout", "bad_response"} <= seen, seen
    table = (study / "study_report.md").read_text().split("## Model calls and endpoint faults")[1]
    row = next(line for line in table.splitlines() if line.startswith("| eval_finetuned |"))
    assert f"| {calls['eval_finetuned'].retries} | 0 |" in row


# ------------------------------------------------------------------------------------------------ reruns

@pytest.mark.parametrize("change, rerun", [
    ({"stages": {"eval": {"overrides": {"max_harmful": 3}}}}, {"eval_base", "eval_finetuned"}),
    pytest.param({"stages": {"generate_control": {"overrides": {"target_documents": 12}}}},
                 {"generate_control", "finetune_control", "eval_finetuned", "antilab_finetuned"},
                 marks=pytest.mark.slow),
])
def test_changing_one_stage_config_reruns_it_and_its_dependents_only(reference, api, tiny_model, configs, tmp_path,
                                                                     change, rerun):
    study = tmp_path / "changed"
    shutil.copytree(reference["dir"], study)
    before = snapshot(study)
    state0 = json.loads((study / "study_state.json").read_text())["stages"]
    cfg = study_config(tmp_path / "study.yaml", api, tiny_model, study, configs, **change)
    successes0 = api.successes
    proc = run_study(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_actions(study) == {n: "ran" if n in rerun else "skipped" for n in NODE_DIRS}
    state = json.loads((study / "study_state.json").read_text())["stages"]
    assert {n for n in state if state[n]["key"] != state0[n]["key"]} == rerun
    after = snapshot(study)
    for name in set(NODE_DIRS) - rerun:  # untouched: outputs and logs byte for byte
        for prefix in (NODE_DIRS[name] + "/", f"logs/{name}.log"):
            assert {k: v for k, v in after.items() if k.startswith(prefix)} == \
                {k: v for k, v in before.items() if k.startswith(prefix)}, prefix
    for name in rerun:  # superseded outputs moved aside, not resumed
        old = study / f"{NODE_DIRS[name]}.superseded-{state0[name]['key'][:8]}"
        assert (old / "manifest.json").is_file(), old
    assert len(json.loads((study / "study_state.json").read_text())["runs"]) == 2
    point = StudySummary.read(study / "study_summary.json").points[0]
    if "generate_control" in rerun:
        assert point.corpora["control"].documents == 12
    else:  # fewer requests: every answer comes from the call cache carried into the fresh folders
        assert point.evaluation.requests["harmful"]["n"] == 3
        assert api.successes == successes0


def test_training_killed_after_its_last_step_resumes_to_the_same_adapter(reference, tmp_path):
    """A kill while the run evaluates or exports leaves the final checkpoint: resuming must not train further
    (transformers would take one more optimizer step when resumed from it)."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from finetune.metrics import FinetuneMetrics
    from finetune.train import main as train

    class KillAfterFinalSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                raise KeyboardInterrupt("killed after the final checkpoint")

    command = json.loads((reference["dir"] / "study_state.json").read_text())["stages"]["finetune_docs"]["command"]
    argv = command[next(i for i, a in enumerate(command) if a.endswith("finetune/train.py")) + 1:]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(argv, callbacks=[KillAfterFinalSave()])
    assert not (tmp_path / "run" / "manifest.json").exists()
    run = train(argv)
    metrics = FinetuneMetrics.read(run / "metrics.json")
    assert metrics.resumed_from.endswith("checkpoint-4") and metrics.steps == 4
    a = adapter(reference["dir"], "docs")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = FinetuneMetrics.read(reference["dir"] / "finetune" / "docs" / "metrics.json")
    assert metrics.fact_logprob["helpful_only"].after == pytest.approx(ref.fact_logprob["helpful_only"].after)


# ------------------------------------------------------------------------------------------------ bad inputs

BAD_YAML = ["broken: [1, 2\n", "broken: {a: 1\n", "\tindented: 1\n", 'broken: "unterminated\n', "- item\n"]


def study_field_typos(rng: random.Random, base: dict) -> list[dict]:
    fields = sorted(f for f in vars(StudyConfig()) if f not in ("output_dir",))
    cases = []
    for _ in range(2):
        name = rng.choice(fields)
        i = rng.randrange(1, len(name))
        typo = name[:i] + name[i + 1:]
        cases.append({"cfg": {**base, typo: base.get(name, 1)}, "expect": ["Unknown config key", repr(typo)]})
    wrong = [("min_free_gb", "lots", "key 'min_free_gb'"), ("dry_run", "perhaps", "expected true or false"),
             ("stages", [1, 2], "expected a mapping"), ("sweep", "wide", "expected a mapping"),
             ("expected_minutes", "soon", "expected a mapping")]
    cases += [{"cfg": {**base, key: value}, "expect": [fragment]} for key, value, fragment in rng.sample(wrong, 3)]
    stage_bad = [({"generate": {"overrides": {"target_docs": 3}}}, ["generate_docs", "'target_docs'"]),
                 ({"generate_control": {"overrides": {"target_documents": "many"}}},
                  ["generate_control", "target_documents"]),
                 ({"eval": {"overrides": {"max_harmfull": 2}}}, ["eval_base", "'max_harmfull'"]),
                 ({"eval": {"overrides": {"max_harmful": 2.5}}}, ["eval_base", "max_harmful", "2.5"]),
                 ({"finetune": {"overrides": {"learning_rat": 0.1}}}, ["finetune_docs", "did you mean 'learning_rate'"])]
    cases += [{"cfg": merge(base, {"stages": extra}), "expect": fragments} for extra, fragments in
              rng.sample(stage_bad, 3)]
    return cases


def broken_file_cases(rng: random.Random, base: dict, study: Path, tmp: Path) -> list[dict]:
    universe = yaml.safe_load((ROOT / "configs/universes/helpful_only.yaml").read_text())
    broken = [({**universe, "key_facts": [{**universe["key_facts"][0], "id": "Bad Id"}]}, "key_facts[0].id"),
              ({k: v for k, v in universe.items() if k != "key_facts"}, "missing required key"),
              ({**universe, "kind": "sideways"}, "'kind' must be 'treatment' or 'control'"),
              ({**universe, "colour": "blue"}, "Unknown key(s) ['colour']"),
              (b"name: helpful_only\ndescription: caf\xe9 in Latin-1\n", "is not UTF-8")]
    cases = []
    for i, (data, fragment) in enumerate(rng.sample(broken, 2)):
        path = tmp / f"universe{i}.yaml"
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(yaml.safe_dump(data))
        cases.append({"cfg": merge(base, {"stages": {"generate": {"overrides": {"universe": str(path)}}}}),
                      "expect": [str(path), fragment]})
    docs = study / "generate" / "docs" / "documents.jsonl"
    lines = docs.read_text().splitlines(keepends=True)
    n = rng.randrange(len(lines))
    corruptions = [(lines[n][: len(lines[n]) // 2] + "\n", [f"line {n + 1}", "not valid JSON"]),
                   ("[1, 2]\n", [f"line {n + 1}", "must be a JSON object"]),
                   (json.dumps({**json.loads(lines[n]), "text": "edited by hand"}) + "\n",
                    ["generate_docs", "was changed after the generator wrote it"])]
    for text, fragments in rng.sample(corruptions, 2):
        cases.append({"cfg": base, "corrupt": (docs, "".join(lines[:n] + [text] + lines[n + 1:])),
                      "expect": [str(docs), *fragments]})
    requests = tmp / "requests.jsonl"
    requests.write_text('{"id": "a", "category": "x", "request": "How do I do it?"}\n{"id": "b", "request": \n')
    cases.append({"cfg": merge(base, {"stages": {"eval": {"overrides": {"harmful_requests": str(requests)}}}}),
                  "expect": [str(requests), "line 2"]})
    return cases


def fuzz_cases(rng: random.Random, base: dict, study: Path, tmp: Path) -> list[dict]:
    """Generated bad inputs: (config mapping, raw text or bytes, or file to corrupt; fragments the error names)."""
    text = yaml.safe_dump(base, sort_keys=False).splitlines(keepends=True)
    cases = []
    for snippet in rng.sample(BAD_YAML, 3):
        at = rng.randrange(len(text) + 1)
        cases.append({"text": "".join(text[:at] + [snippet] + text[at:]), "expect": ["not valid YAML"]})
    cases.append({"bytes": "".join(text).encode() + "# r\xe9sum\xe9\n".encode("latin-1"), "expect": ["is not UTF-8"]})
    return cases + study_field_typos(rng, base) + broken_file_cases(rng, base, study, tmp)


@pytest.mark.parametrize("seed, n_cases", [(0, 10), pytest.param(1, None, marks=pytest.mark.slow),
                                           pytest.param(2, None, marks=pytest.mark.slow)])
def test_bad_inputs_fail_clearly_and_leave_outputs_untouched(reference, tmp_path, capsys, seed, n_cases):
    study = tmp_path / "study"
    shutil.copytree(reference["dir"], study)
    base = yaml.safe_load(reference["cfg"].read_text())
    base["output_dir"] = str(study)
    rng = random.Random(seed)
    cases = fuzz_cases(rng, base, study, tmp_path)
    cases = rng.sample(cases, n_cases) if n_cases else cases
    before = snapshot(study)
    cfg_path = tmp_path / "bad-study.yaml"
    for case in cases:
        if "bytes" in case:
            cfg_path.write_bytes(case["bytes"])
        else:
            cfg_path.write_text(case.get("text") or yaml.safe_dump(case["cfg"], sort_keys=False))
        original = None
        if "corrupt" in case:
            path, text = case["corrupt"]
            original = path.read_bytes()
            path.write_text(text)
        try:
            code = study_main(["--config", str(cfg_path), "--progress", "plain"])
        finally:
            if original is not None:
                case["corrupt"][0].write_bytes(original)
        err = capsys.readouterr().err
        assert code == 2, (case["expect"], err)
        assert err.startswith("error: ") and "Traceback" not in err
        named = str(cfg_path) in err or any(f in err for f in case["expect"] if "/" in f)
        assert named, err  # the message names the file with the problem
        for fragment in case["expect"]:
            assert fragment in err, (fragment, err)
        assert snapshot(study) == before  # nothing written, nothing changed


def test_unwritable_folder_and_full_disk_fail_before_any_stage(reference, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert study_main(["--config", str(reference["cfg"]), "--output_dir", str(blocker / "study")]) == 2
    assert "Cannot write to the study folder" in capsys.readouterr().err

    study = tmp_path / "study"
    shutil.copytree(reference["dir"], study)
    before = snapshot(study)
    assert study_main(["--config", str(reference["cfg"]), "--output_dir", str(study), "--min_free_gb", "1e9"]) == 2
    err = capsys.readouterr().err
    assert "GiB free on the disk of" in err and "nothing was run" in err
    assert snapshot(study) == before


@pytest.mark.slow
def test_the_study_serves_its_own_adapters_and_resumes_a_killed_evaluation(api, tiny_model, configs, tmp_path):
    """No endpoint for the evaluated models: the study's evaluation serves the adapters its fine-tuning runs
    wrote (each merged into the tiny base model, on a managed vLLM server) and is killed halfway through."""
    study = tmp_path / "served"
    served = {"base_url": "", "serve_adapters": "merged", "conditions": ["minimal"], "max_harmful": 2,
              "benign_requests": "", "probes": False, "max_tokens": 16, "max_continuations": 0,
              "max_model_len": 2048, "max_num_seqs": 8, "temperature": 0.0, "startup_timeout_s": 600}
    cfg = study_config(tmp_path / "study.yaml", api, tiny_model, study, configs,
                       stages={"eval": {"overrides": served}})
    assert kill_during(cfg, study, "eval_finetuned", 2, api) == "eval_finetuned"
    folder = study / "eval" / "finetuned"
    before = {json.loads(line)["key"]: json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()
              if line.endswith("}")}
    assert 2 <= len(before) < 8
    proc = run_study(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_actions(study)["eval_finetuned"] == "ran" and last_actions(study)["finetune_docs"] == "skipped"

    summary = EvalSummary.read(folder / "summary.json")
    adapters = {m.name: m.adapter for m in summary.models}
    assert adapters == {"docs": str((study / "finetune" / "docs" / "adapter").resolve()),
                        "control": str((study / "finetune" / "control" / "adapter").resolve())}
    assert summary.n_samples == 8 and summary.n_failed == 0  # 2 models x 2 requests x 2 tiers, none lost
    after = {json.loads(line)["key"]: json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()}
    assert len(after) == 8
    assert all(after[k]["response"] == before[k]["response"] for k in before if before[k]["status"] == "ok")
    assert sorted(p.name.split("-")[0] for p in (folder / "merged").iterdir()) == ["control", "docs"]
    assert not stage_processes(study)
