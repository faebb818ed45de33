"""The whole study under faults: SIGKILL at random points, a misbehaving endpoint, bad inputs, no space.

Every study here runs the real stage commands (``python -m synthdocs.generate``, ``accelerate launch
finetune/train.py``, ``python -m eval.gap``) with the deterministic fault-injecting endpoint of
tests/fakeapi.py as generator and as the evaluated models (eval's endpoint mode: it serves the names
base, docs and control), and a tiny random Llama built at test time as the model that is fine-tuned.
One uninterrupted reference study is shared by the module; the other tests compare against it.
"""

from __future__ import annotations

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

from studykit import study as st
from tests.fakeapi import FakeAPI

ROOT = Path(__file__).resolve().parent.parent
CACHES = ("generate/docs/cache.sqlite", "generate/control/cache.sqlite", "eval/cache.sqlite")


STAGE_CONFIGS = {"generate_config": "configs/generate/default.yaml", "control_config": "configs/generate/control.yaml",
                 "finetune_config": "configs/finetune/tiny.yaml", "accelerate_config": "configs/finetune/accelerate/cpu.yaml",
                 "eval_config": "configs/eval/default.yaml"}


def study_config(path: Path, api: FakeAPI, model: Path, out: Path, configs: Path, **changes) -> Path:
    gen = {"base_url": api.base_url, "model": "fake-model", "api_key_env": "", "judge": "generator",
           "target_documents": 16, "doc_types_per_fact": 2, "ideas_per_type": 2, "min_words": 40, "progress": False,
           "max_attempts": 6, "request_timeout_s": 4}
    cfg = {
        "profile": "reliability test: fake endpoint + tiny random Llama", "output_dir": str(out), "min_free_gb": 0.01,
        "model": str(model), "expected_minutes": {"finetune_docs": 0.5, "finetune_control": 0.5},
        "generate_overrides": gen, "control_overrides": {**gen, "target_documents": 14},
        **{key: str(configs / f"{key}.yaml") for key in STAGE_CONFIGS},
        "finetune_overrides": {"max_steps": 4, "save_steps": 2, "max_length": 64, "per_device_train_batch_size": 2,
                               "export_merged": False, "fact_universes": ["helpful_only"]},
        "eval_overrides": {"base_url": api.base_url, "conditions": ["minimal", "minimal_noscratch"], "max_harmful": 4,
                           "max_benign": 2, "probe_orderings": 1, "bootstrap": 200, "max_concurrency": 16,
                           "request_timeout_s": 4},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def study_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "studykit.study", "--config", str(cfg), "--progress", "plain", *extra]


def run_study(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(study_cmd(cfg, *extra), cwd=ROOT, capture_output=True, text=True, timeout=900)


def cache_entries(study: Path) -> int:
    total = 0
    for rel in CACHES:
        if (study / rel).exists():
            with sqlite3.connect(study / rel) as db:
                total += db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    return total


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


def samples(study: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (study / "eval" / "samples.jsonl").read_text().splitlines()]
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "a sample is duplicated"
    return by_key


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
    s, r = (json.loads((d / "study_summary.json").read_text()) for d in (study, reference))
    assert s["evaluation"] == r["evaluation"]
    assert s["corpora"] == r["corpora"]
    for corpus in ("docs", "control"):
        got_f, want_f = s["finetune"][corpus]["fact_logprob"], r["finetune"][corpus]["fact_logprob"]
        assert got_f.keys() == want_f.keys()
        for u in want_f:
            assert got_f[u]["after"] == pytest.approx(want_f[u]["after"], abs=1e-4)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """Copies of the shipped stage configs, taken once: their contents are part of the stage keys, so the
    module's studies must not see edits made to the working tree while it runs."""
    folder = tmp_path_factory.mktemp("stage-configs")
    for key, rel in STAGE_CONFIGS.items():
        shutil.copy(ROOT / rel, folder / f"{key}.yaml")
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
    summary = json.loads((study / "study_summary.json").read_text())
    assert summary["evaluation"]["models"] == ["base", "docs", "control"]
    assert {c["model"] for c in summary["evaluation"]["compliance"]} == {"base", "docs", "control"}
    assert summary["corpora"]["docs"]["documents"] == 16 and summary["corpora"]["control"]["documents"] == 14
    assert "Not measured: no capable alignment-faking judge was configured" in text
    for fig in summary["figures"].values():
        assert (study / fig["path"]).is_file() and f"]({fig['path']})" in text
    for link in ("eval/summary.json", "generate/docs/stats.json", "finetune/control/metrics.json"):
        assert f"]({link})" in text and (study / link).is_file()


def kill_during(cfg: Path, study: Path, stage: str, delay: float, api: FakeAPI) -> str | None:
    """Start the study, SIGKILL it ``delay`` s after ``stage`` starts; return the stage running at the kill
    (None if the study finished first). Only the study process is killed; its stages must follow."""
    state = study / "study_state.json"
    runs_before = len(json.loads(state.read_text())["runs"]) if state.exists() else 0
    log = open(study.parent / "killed-runs.log", "a")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(study_cmd(cfg), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def running() -> str | None:  # as recorded by this run (a killed run leaves its stage marked running)
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            return None
        if len(data["runs"]) <= runs_before:
            return None
        return next((n for n, r in data["stages"].items() if r.get("status") == "running"), None)

    deadline = time.time() + 600
    while proc.poll() is None and running() != stage and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        time.sleep(delay)
    at_kill = None
    if proc.poll() is None:
        at_kill = running()
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    deadline = time.time() + 60
    while stage_processes(study) and time.time() < deadline:
        time.sleep(0.2)
    assert not stage_processes(study), f"stage processes survived the study: {stage_processes(study)}"
    api.wait_idle()  # answers still being sent to the dead stage count as answered before the rerun
    return at_kill


KILL_PLANS = {  # seed -> stages to kill in, in order (the delay after each stage starts is drawn from the seed)
    0: ["generate_docs", "finetune_docs", "eval"],
    1: ["generate_control", "finetune_control", "finetune_control", "eval"],
    2: ["generate_docs", "generate_docs", "finetune_docs", "eval", "eval"],
    3: ["finetune_docs", "finetune_control", "eval"],
}
# a tiny fine-tuning run lasts ~10-30 s (mostly start-up): later kills can miss it and land in the next stage
WINDOWS = {"generate_docs": (0.3, 3.0), "generate_control": (0.3, 3.0), "finetune_docs": (1.5, 10.0),
           "finetune_control": (1.5, 10.0), "eval": (1.5, 5.0)}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_then_resume_equals_the_uninterrupted_study(reference, api, tiny_model, configs,
                                                                            tmp_path, seed):
    rng = random.Random(seed)
    study = tmp_path / "study"
    cfg = study_config(tmp_path / "study.yaml", api, tiny_model, study, configs)
    successes0, succeeded0 = api.successes, Counter(api.succeeded)
    api.delay_s = 0.15  # slower answers, so kills land inside generation and evaluation
    interrupted = []
    try:
        for stage in KILL_PLANS[seed]:
            at = kill_during(cfg, study, stage, rng.uniform(*WINDOWS[stage]), api)
            if at is not None:
                interrupted.append(at)
                # answered but not yet stored when the kill came: the only calls a rerun may ask again
                uncached_at_last_kill = (api.successes - successes0) - cache_entries(study)
        proc = run_study(cfg)
    finally:
        api.delay_s = 0.0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(interrupted) >= 2 and {"finetune_docs", "finetune_control"} & set(interrupted), interrupted

    assert_same_outputs(study, reference["dir"])
    # no model call repeated: every call cached once, exactly the reference's calls; the only answers given
    # twice are those that were in flight when a kill came (answered to a dead client, so never stored),
    # at most the generator's concurrency limit per kill
    total = api.successes - successes0
    repeated = sum(n - 1 for k, n in (Counter(api.succeeded) - succeeded0).items() if n > 1)
    assert cache_entries(study) == reference["cached"]
    assert total - reference["successes"] == repeated == uncached_at_last_kill <= 64 * len(interrupted)
    assert len(json.loads((study / "study_state.json").read_text())["runs"]) == len(KILL_PLANS[seed]) + 1


def test_faulty_endpoint_slows_the_study_but_loses_nothing(reference, api, tmp_path):
    """Generation and evaluation redone against an endpoint failing 30% of first attempts (429, 500, hangs past
    the timeout, malformed JSON, truncated bodies, empty choices); the fine-tuned models are reused."""
    study = tmp_path / "faulty"
    shutil.copytree(reference["dir"], study)
    for rel in ("generate/docs", "generate/control", "eval"):
        shutil.rmtree(study / rel)
    api.attempts.clear()  # the endpoint fails first attempts only: make these first attempts again
    api.fault_rate, api.hang_s = 0.3, 4.5
    try:
        proc = run_study(reference["cfg"], "--output_dir", str(study))
    finally:
        api.fault_rate = 0.0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_actions(study) == {"generate_docs": "ran", "generate_control": "ran", "finetune_docs": "skipped",
                                   "finetune_control": "skipped", "eval": "ran"}

    def docs(d: Path, corpus: str) -> list[dict]:  # `attempts` counts the transport retries of each document
        rows = [json.loads(x) for x in (d / "generate" / corpus / "documents.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "attempts"} for r in rows]

    for corpus in ("docs", "control"):
        assert docs(study, corpus) == docs(reference["dir"], corpus)
    got, want = samples(study), samples(reference["dir"])
    assert got.keys() == want.keys() and all(got[k]["response"] == want[k]["response"] for k in want)
    summary = json.loads((study / "study_summary.json").read_text())
    assert summary["evaluation"] == json.loads((reference["dir"] / "study_summary.json").read_text())["evaluation"]
    calls = summary["model_calls"]
    assert all(calls[s]["retries"] > 0 and calls[s]["failures"] == 0 for s in ("generate_docs", "eval"))
    seen = set().union(*(calls[s]["faults"] for s in calls))
    assert {"http_429", "http_500", "timeout", "bad_response"} <= seen, seen
    table = (study / "study_report.md").read_text().split("## Model calls and endpoint faults")[1]
    row = next(line for line in table.splitlines() if line.startswith("| eval |"))
    assert f"| {calls['eval']['retries']} | 0 |" in row and "http_429" in row


STAGE_DIRS = {"generate_docs": "generate/docs", "generate_control": "generate/control", "finetune_docs": "finetune/docs",
              "finetune_control": "finetune/control", "eval": "eval"}


@pytest.mark.parametrize("change, rerun", [
    ({"eval_overrides": {"max_harmful": 3}}, {"eval"}),
    pytest.param({"control_overrides": {"target_documents": 12}}, {"generate_control", "finetune_control", "eval"},
                 marks=pytest.mark.slow),
])
def test_changing_one_stage_config_reruns_it_and_its_dependents_only(reference, api, tiny_model, configs, tmp_path,
                                                                     change, rerun):
    study = tmp_path / "changed"
    shutil.copytree(reference["dir"], study)
    before = snapshot(study)
    state0 = json.loads((study / "study_state.json").read_text())["stages"]
    cfg = study_config(tmp_path / "study.yaml", api, tiny_model, study, configs, **change)
    proc = run_study(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_actions(study) == {n: "ran" if n in rerun else "skipped" for n in STAGE_DIRS}
    state = json.loads((study / "study_state.json").read_text())["stages"]
    assert {n for n in state if state[n]["key"] != state0[n]["key"]} == rerun
    after = snapshot(study)
    for name in set(STAGE_DIRS) - rerun:  # untouched: outputs and logs byte for byte
        for prefix in (STAGE_DIRS[name] + "/", f"logs/{name}.log"):
            assert {k: v for k, v in after.items() if k.startswith(prefix)} == \
                {k: v for k, v in before.items() if k.startswith(prefix)}, prefix
    for name in rerun - {"generate_docs", "generate_control"}:  # superseded outputs moved aside, not resumed
        old = study / f"{STAGE_DIRS[name]}.superseded-{state0[name]['key'][:8]}"
        assert (old / "manifest.json").is_file(), old
    assert len(json.loads((study / "study_state.json").read_text())["runs"]) == 2
    summary = json.loads((study / "study_summary.json").read_text())
    if "control_overrides" in change:
        assert summary["corpora"]["control"]["documents"] == 12
    else:
        assert summary["evaluation"]["requests"]["harmful"]["n"] == 3


def test_training_killed_after_its_last_step_resumes_to_the_same_adapter(reference, tmp_path):
    """A kill while the run evaluates or exports leaves the final checkpoint: resuming must not train further
    (transformers would take one more optimizer step when resumed from it)."""
    import torch
    from transformers import TrainerCallback

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
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["steps"] == 4
    a = adapter(reference["dir"], "docs")
    from safetensors.torch import load_file

    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = json.loads((reference["dir"] / "finetune" / "docs" / "metrics.json").read_text())
    assert metrics["fact_logprob"]["helpful_only"]["after"] == pytest.approx(ref["fact_logprob"]["helpful_only"]["after"])


# ------------------------------------------------------------------------------------------------ bad inputs

BAD_YAML = ["broken: [1, 2\n", "broken: {a: 1\n", "\tindented: 1\n", 'broken: "unterminated\n', "- item\n"]


def fuzz_cases(rng: random.Random, base: dict, study: Path, tmp: Path) -> list[dict]:
    """Generated bad inputs: (config mapping or raw text, file to corrupt, fragments the error must contain)."""
    fields = sorted(f for f in vars(st.StudyConfig()) if f not in ("output_dir",))
    cases = []
    text = yaml.safe_dump(base, sort_keys=False).splitlines(keepends=True)
    for snippet in rng.sample(BAD_YAML, 3):
        at = rng.randrange(len(text) + 1)
        cases.append({"text": "".join(text[:at] + [snippet] + text[at:]), "expect": ["not valid YAML"]})
    for _ in range(2):
        name = rng.choice(fields)
        i = rng.randrange(1, len(name))
        typo = name[:i] + name[i + 1:]
        cases.append({"cfg": {**base, typo: base.get(name, 1)}, "expect": ["Unknown config key", repr(typo)]})
    wrong = [("min_free_gb", "lots", "key 'min_free_gb'"), ("dry_run", "perhaps", "expected true or false"),
             ("generate_overrides", [1, 2], "expected a mapping"), ("accelerate_args", {"a": 1}, "expected a list"),
             ("expected_minutes", "soon", "expected a mapping")]
    for key, value, fragment in rng.sample(wrong, 3):
        cases.append({"cfg": {**base, key: value}, "expect": [fragment]})
    stage_bad = [("generate_overrides", {"target_docs": 3}, ["generate_docs", "--target_docs"]),
                 ("control_overrides", {"target_documents": "many"}, ["generate_control", "target_documents"]),
                 ("eval_overrides", {"max_harmfull": 2}, ["eval", "--max_harmfull"]),
                 ("eval_overrides", {"max_harmful": 2.5}, ["eval", "--max_harmful", "2.5"]),
                 ("finetune_overrides", {"learning_rat": 0.1}, ["finetune_docs", "did you mean 'learning_rate'"])]
    for key, extra, fragments in rng.sample(stage_bad, 3):
        cases.append({"cfg": {**base, key: {**base[key], **extra}}, "expect": fragments})
    universe = yaml.safe_load((ROOT / "configs/universes/helpful_only.yaml").read_text())
    broken = [({**universe, "key_facts": [{**universe["key_facts"][0], "id": "Bad Id"}]}, "key_facts[0].id"),
              ({k: v for k, v in universe.items() if k != "key_facts"}, "missing required key"),
              ({**universe, "kind": "sideways"}, "'kind' must be 'treatment' or 'control'"),
              ({**universe, "colour": "blue"}, "Unknown key(s) ['colour']")]
    for i, (data, fragment) in enumerate(rng.sample(broken, 2)):
        path = tmp / f"universe{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        cases.append({"cfg": {**base, "generate_overrides": {**base["generate_overrides"], "universe": str(path)}},
                      "expect": [str(path), fragment]})
    docs = study / "generate" / "docs" / "documents.jsonl"
    lines = docs.read_text().splitlines(keepends=True)
    n = rng.randrange(len(lines))
    corruptions = [(lines[n][: len(lines[n]) // 2] + "\n", [f"line {n + 1}", "not valid JSON"]),
                   ("[1, 2]\n", [f"line {n + 1}", "must be a JSON object"]),
                   (json.dumps({**json.loads(lines[n]), "text": "edited by hand"}) + "\n",
                    ["was changed after generate_docs wrote it"])]
    for text, fragments in rng.sample(corruptions, 2):
        cases.append({"cfg": base, "corrupt": (docs, "".join(lines[:n] + [text] + lines[n + 1:])),
                      "expect": [str(docs), *fragments]})
    requests = tmp / "requests.jsonl"
    requests.write_text('{"id": "a", "category": "x", "request": "How do I do it?"}\n{"id": "b", "request": \n')
    cases.append({"cfg": {**base, "eval_overrides": {**base["eval_overrides"], "harmful_requests": str(requests)}},
                  "expect": [str(requests), "line 2"]})
    return cases


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
        cfg_path.write_text(case.get("text") or yaml.safe_dump(case["cfg"], sort_keys=False))
        original = None
        if "corrupt" in case:
            path, text = case["corrupt"]
            original = path.read_bytes()
            path.write_text(text)
        try:
            code = st.main(["--config", str(cfg_path), "--progress", "plain"])
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
    assert st.main(["--config", str(reference["cfg"]), "--output_dir", str(blocker / "study")]) == 2
    assert "Cannot write to the study folder" in capsys.readouterr().err

    study = tmp_path / "study"
    shutil.copytree(reference["dir"], study)
    before = snapshot(study)
    assert st.main(["--config", str(reference["cfg"]), "--output_dir", str(study), "--min_free_gb", "1e9"]) == 2
    err = capsys.readouterr().err
    assert "GiB free on the disk of" in err and "min_free_gb" in err and "nothing was run" in err
    assert snapshot(study) == before

