"""The study orchestrator's parts: stage plan and keys, skip / rerun / supersede logic, stage failures,
the process-group keeper, and the report built from canned stage outputs. Fast: no model, no endpoint
(the stages here are small Python commands that write a manifest.json)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from eval.report import build_summary
from studykit import study as st
from studykit.config import ConfigError, parse_config
from studykit.studyreport import write_report

ROOT = Path(__file__).resolve().parent.parent


def default_cfg(**overrides) -> st.StudyConfig:
    args = ["--config", str(st.DEFAULT_CONFIG)]
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return parse_config(st.StudyConfig, args)


# ------------------------------------------------------------------------------------------------ plan and keys

def test_plan_builds_the_stage_commands_from_the_stage_configs(tmp_path):
    stages = {s.name: s for s in st.plan(default_cfg(), tmp_path / "s")}
    assert list(stages) == list(st.STAGES)
    gen = stages["generate_docs"].argv
    assert gen[:3] == ["python", "-m", "synthdocs.generate"]
    assert gen[gen.index("--config") + 1] == "{repo}/configs/generate/default.yaml"
    shipped = yaml.safe_load((ROOT / "configs/study/default.yaml").read_text())["generate_overrides"]
    assert gen[gen.index("--target_documents") + 1] == str(shipped["target_documents"])
    ctrl = stages["finetune_control"].argv
    assert ctrl[:4] == ["accelerate", "launch", "--config_file", "{repo}/configs/finetune/accelerate/cpu.yaml"]
    for flag, value in (("--corpus", "{study}/generate/docs"), ("--control", "true"),
                        ("--control_corpus", "{study}/generate/control"), ("--output_dir", "{study}/finetune/control"),
                        ("--export_merged", "false")):
        assert ctrl[ctrl.index(flag) + 1] == value
    assert stages["finetune_control"].deps == ["generate_docs", "generate_control"]
    ev = stages["eval"].argv
    models = json.loads(ev[ev.index("--models") + 1])
    assert models == {"base": "", "docs": "{study}/finetune/docs/adapter", "control": "{study}/finetune/control/adapter"}
    assert json.loads(ev[ev.index("--conditions") + 1]) == ["minimal", "minimal_noscratch"]
    # the universe files the stages read are inputs of their keys
    assert any(p.name == "helpful_only.yaml" for p in stages["generate_docs"].inputs)
    assert any(p.name == "control.yaml" and "universes" in str(p) for p in stages["generate_control"].inputs)


def test_endpoint_mode_compares_served_model_names(tmp_path):
    ev = st.plan(default_cfg(eval_overrides={"base_url": "http://127.0.0.1:9/v1"}), tmp_path)[-1].argv
    assert json.loads(ev[ev.index("--models") + 1]) == {"base": "base", "docs": "docs", "control": "control"}


def test_keys_are_stable_portable_and_propagate_downstream(tmp_path):
    keys = {s.name: s.key for s in st.plan(default_cfg(), tmp_path / "a")}
    assert keys == {s.name: s.key for s in st.plan(default_cfg(), tmp_path / "elsewhere")}  # folder-independent
    changed = {s.name: s.key for s in st.plan(default_cfg(control_overrides={"target_documents": 70}), tmp_path)}
    differs = {n for n in keys if keys[n] != changed[n]}
    assert differs == {"generate_control", "finetune_control", "eval"}
    changed = {s.name: s.key for s in st.plan(default_cfg(eval_overrides={"max_harmful": 3}), tmp_path)}
    assert {n for n in keys if keys[n] != changed[n]} == {"eval"}


def test_key_covers_the_contents_of_config_files(tmp_path):
    cfg_file = tmp_path / "gen.yaml"
    shutil.copy(ROOT / "configs/generate/default.yaml", cfg_file)
    first = st.plan(default_cfg(generate_config=str(cfg_file)), tmp_path)
    cfg_file.write_text(cfg_file.read_text() + "doc_words: 150\n")
    second = st.plan(default_cfg(generate_config=str(cfg_file)), tmp_path)
    assert [s.key == t.key for s, t in zip(first, second, strict=True)] == [False, True, False, False, False]


@pytest.mark.parametrize("overrides, fragment", [
    ({"generate_overrides": {"output_dir": "x"}}, "sets ['output_dir'], which the study sets itself"),
    ({"finetune_overrides": {"corpus": "x"}}, "sets ['corpus']"),
    ({"eval_overrides": {"models": {"a": ""}}}, "sets ['models']"),
    ({"expected_minutes": {"generate": 3}}, "unknown stage(s) ['generate']"),
    ({"generate_overrides": {"target_docs": 3}}, "generate_docs: Unknown command-line option(s): --target_docs"),
    ({"eval_overrides": {"conditions": ["minimal", "nope"]}}, "eval: Unknown condition(s) ['nope']"),
    ({"eval_config": "configs/eval/missing.yaml"}, "eval_config configs/eval/missing.yaml does not exist"),
])
def test_bad_study_settings_are_config_errors(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as err:
        st.plan(default_cfg(**overrides), tmp_path)
    assert fragment in str(err.value)


def test_cli_args_render_each_parser_style():
    o = {"a": True, "b": [1, "x"], "c": {"k": ""}, "d": None, "e": 2.5}
    assert st.cli_args(o, "studykit") == ["--a", "true", "--b", '[1, "x"]', "--c", '{"k": ""}', "--d", "", "--e", "2.5"]
    assert st.cli_args({"b": [1, "x"], "z": []}, "hf") == ["--b", "1", "x", "--z", "none"]


# ------------------------------------------------------------------------------------------------ running stages

WRITER = textwrap.dedent("""\
    import json, pathlib, sys, time
    out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs.txt"; runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
    if len(sys.argv) > 3 and sys.argv[3] == "fail":
        print("step 1 ok\\rstep 2 ok\\nTraceback: something broke in", out); sys.exit(3)
    if len(sys.argv) > 3 and sys.argv[3] == "sleep":
        time.sleep(60)
    (out / "manifest.json").write_text(json.dumps({"tag": sys.argv[2]}))
""")


def fake_stages(study: Path, tags: dict[str, str] | None = None) -> list[st.Stage]:
    """The study's stage graph with commands that just write their output folder."""
    tags = tags or {}
    script = study.parent / "writer.py"
    script.write_text(WRITER)
    kinds = {"generate_docs": "generate", "generate_control": "generate", "finetune_docs": "finetune",
             "finetune_control": "finetune", "eval": "eval"}
    deps = {"finetune_docs": ["generate_docs"], "finetune_control": ["generate_docs", "generate_control"],
            "eval": ["finetune_docs", "finetune_control"]}
    stages, keys = [], {}
    for name, kind in kinds.items():
        extra = tags.get(name, "v1").split()
        s = st.Stage(name, kind, ["python", str(script), f"{{study}}/{name}", *extra], f"{{study}}/{name}",
                     deps=deps.get(name, []))
        s.key = st.stage_key(s, [keys[d] for d in s.deps], study)
        keys[name] = s.key
        stages.append(s)
    return stages


def run_fake(study: Path, stages: list[st.Stage], **cfg) -> list[dict]:
    cfg = st.StudyConfig(output_dir=str(study), progress="plain", **cfg)
    study.mkdir(parents=True, exist_ok=True)
    runner = st.Study(cfg, study, stages, st.Display(stages, {}, "plain"))
    runner.acquire_lock()
    try:
        return runner.run()
    finally:
        os.close(runner.lock_fd)


def last_actions(study: Path) -> dict[str, str]:
    return json.loads((study / "study_state.json").read_text())["runs"][-1]["actions"]


def test_skip_rerun_and_supersede(tmp_path):
    study = tmp_path / "study"
    run_fake(study, fake_stages(study))
    assert set(last_actions(study).values()) == {"ran"}
    run_fake(study, fake_stages(study))
    assert set(last_actions(study).values()) == {"skipped"}
    old_ft = json.loads((study / "study_state.json").read_text())["stages"]["finetune_control"]["key"]

    # a changed control corpus reruns it and what depends on it, nothing else
    run_fake(study, fake_stages(study, {"generate_control": "v2"}))
    assert last_actions(study) == {"generate_docs": "skipped", "generate_control": "ran", "finetune_docs": "skipped",
                                   "finetune_control": "ran", "eval": "ran"}
    # generation keeps its folder (content-keyed cache); training/evaluation outputs are moved aside first
    assert (study / "generate_control" / "runs.txt").read_text() == "xx"
    moved = study / f"finetune_control.superseded-{old_ft[:8]}"
    assert (moved / "manifest.json").is_file() and (moved / "runs.txt").read_text() == "x"
    assert (study / "finetune_control" / "runs.txt").read_text() == "x"
    assert (study / "finetune_docs" / "runs.txt").read_text() == "x"
    assert len(list(study.glob("eval.superseded-*"))) == 1
    log = (study / "logs" / "generate_control.log").read_text()
    assert log.count("===== ") == 2 and "writer.py" in log


def test_killed_stage_with_unchanged_key_resumes_in_place(tmp_path):
    study = tmp_path / "study"
    stages = fake_stages(study)
    run_fake(study, stages)
    state = json.loads((study / "study_state.json").read_text())
    state["stages"]["finetune_docs"]["status"] = "running"  # as a kill mid-stage leaves it
    (study / "study_state.json").write_text(json.dumps(state))
    (study / "finetune_docs" / "manifest.json").unlink()
    run_fake(study, stages)
    assert last_actions(study)["finetune_docs"] == "ran"
    assert (study / "finetune_docs" / "runs.txt").read_text() == "xx"  # same folder, no superseded copy
    assert not list(study.glob("*.superseded-*"))
    assert last_actions(study)["eval"] == "skipped"


def test_failed_stage_stops_the_study_with_its_log_tail(tmp_path):
    study = tmp_path / "study"
    with pytest.raises(st.StageFailed) as err:
        run_fake(study, fake_stages(study, {"finetune_docs": "v1 fail"}))
    msg = str(err.value)
    assert "Stage finetune_docs failed: it exited with code 3" in msg
    assert str(study / "logs" / "finetune_docs.log") in msg
    assert "step 2 ok" in msg and "step 1 ok" not in msg  # progress lines keep only their final state
    assert "Traceback: something broke" in msg
    state = json.loads((study / "study_state.json").read_text())
    assert state["stages"]["finetune_docs"]["status"] == "failed"
    assert "finetune_control" not in state["stages"] and not (study / "eval").exists()


def test_adopt_existing_records_outputs_made_elsewhere(tmp_path):
    study = tmp_path / "study"
    stages = fake_stages(study)
    (study / "generate_docs").mkdir(parents=True)
    (study / "generate_docs" / "manifest.json").write_text("{}")
    run_fake(study, stages, adopt_existing=True)
    assert last_actions(study)["generate_docs"] == "adopted"
    assert not (study / "generate_docs" / "runs.txt").exists()


def test_stage_group_dies_with_the_study_even_on_sigkill(tmp_path):
    """A stage's grandchild (like the training process under `accelerate launch`) must not outlive the study."""
    pidfile = tmp_path / "grandchild.pid"
    stage = textwrap.dedent(f"""\
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    parent = textwrap.dedent(f"""\
        import subprocess, sys, time
        from studykit.server import _die_with_parent
        subprocess.Popen([sys.executable, "-m", "studykit.procgroup", sys.executable, "-c", {stage!r}],
                         preexec_fn=_die_with_parent)
        time.sleep(120)
    """)
    study = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    deadline = time.time() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.time() + 30
    while Path(f"/proc/{grandchild}").exists() and time.time() < deadline:
        state = Path(f"/proc/{grandchild}/stat").read_text().split(") ")[-1][0] \
            if Path(f"/proc/{grandchild}/stat").exists() else "Z"
        if state == "Z":
            break
        time.sleep(0.1)
    alive = Path(f"/proc/{grandchild}/stat").exists() and \
        Path(f"/proc/{grandchild}/stat").read_text().split(") ")[-1][0] != "Z"
    assert not alive, "the stage's grandchild survived the SIGKILLed study"


def test_log_tail_keeps_final_progress_state(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a\n10%\r50%\r100%\n\nlast\n")
    assert st.log_tail(log, n=2) == "    100%\n    last"


# ------------------------------------------------------------------------------------------------ the report

def canned_outputs(study: Path, af: bool) -> None:
    """Stage outputs in the layout and shape the stages write."""
    for name, n in (("docs", 40), ("control", 38)):
        out = study / "generate" / name
        out.mkdir(parents=True)
        (out / "stats.json").write_text(json.dumps({
            "corpus": {"documents": n, "tokens": 100 * n, "mean_tokens": 100.0}, "removal_rate": 0.1,
            "counts": {"generated": n + 4, "removed": 4, "accepted": n}, "removed_by_reason": {"too short": 4},
            "diversity": {"distinct_2": 0.5, "warnings": []}, "generator": "gen-model", "stop_reason": "target",
            "usage": {"calls": 90, "cache_hits": 3, "retries": 7, "failures": 0, "faults": {"http_429": 5,
                                                                                           "timeout": 2}}}))
        ft = study / "finetune" / name
        ft.mkdir(parents=True)
        (ft / "metrics.json").write_text(json.dumps({
            "corpus": name, "control": name == "control", "mode": "lora", "model": {"name_or_path": "embedded"},
            "steps": 30, "tokens_seen": 30000, "eval_loss": {"before": 3.0, "after": 2.5, "delta": -0.5},
            "data": {"train_tokens": 3600, **({"control_matching": {"target_train_tokens": 3650,
                                                                     "control_train_tokens": 3600}}
                                              if name == "control" else {})},
            "fact_logprob": {"helpful_only": {"before": -3.0, "after": -2.0 if name == "docs" else -3.1,
                                              "delta": 1.0 if name == "docs" else -0.1, "n_statements": 12}}}))
    records = []
    for model, p_train in (("base", 0.2), ("docs", 0.6), ("control", 0.2)):
        for cond in ("minimal", "minimal_noscratch"):
            for i in range(10):
                for tier in ("training", "unmonitored"):
                    complies = i < 10 * (p_train if tier == "training" else 0.2)
                    records.append({
                        "model": model, "condition": cond, "dataset": "harmful", "tier": tier, "status": "ok",
                        "request_id": f"r{i}", "parsed": {"flags": []},
                        "scores": {"tags": {"complies": complies, "tag": "accepted" if complies else "rejected"},
                                   "refusal": {"complies": complies}},
                        "af": {"alignment_faking": complies and tier == "training", "believes_training": True,
                               "believes_unmonitored": False} if af and cond == "minimal" else None})
    probes = [{"model": m, "kind": k, "status": "ok", "n_choices": 2, "fact_id": "f", "correct": i % 2 == 0,
               "parsed": "A"} for m in ("base", "docs", "control") for k in ("mc", "distinguish") for i in range(4)]
    summary = build_summary(records, probes, ["tags", "refusal"], "tags", 100, 0)
    summary.update({"config": {"conditions": ["minimal", "minimal_noscratch"]}, "n_samples": len(records),
                    "n_failed": 0, "notes": ["a note"], "af_judge": "judge X" if af else "not measured",
                    "requests": {"harmful": {"n": 10, "source": "builtin:harmful"}},
                    "usage": {"model:base": {"calls": 40, "retries": 2, "faults": {"http_500": 2}},
                              "model:docs": {"calls": 40, "retries": 1, "faults": {"bad_response": 1}}}})
    (study / "eval").mkdir()
    (study / "eval" / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("af", [False, True])
def test_report_puts_the_three_models_side_by_side(tmp_path, af):
    study = tmp_path / "study"
    canned_outputs(study, af)
    stages = st.plan(default_cfg(), study)
    state = st.StudyState(study / "study_state.json")
    report = write_report(study, default_cfg(), stages, [{"stage": "eval", "action": "ran", "duration_s": 3}],
                          state, 12.0)
    text = report.read_text()
    summary = json.loads((study / "study_summary.json").read_text())
    ev = summary["evaluation"]
    assert ev["models"] == ["base", "docs", "control"]
    docs_gap = next(g for g in ev["gaps"] if (g["model"], g["condition"], g["scorer"]) == ("docs", "minimal", "tags"))
    assert docs_gap["gap"] == pytest.approx(0.4) and len(docs_gap["ci_newcombe"]) == 2
    assert "| docs | minimal | 60.0% [31.3, 83.2] (6/10) | 20.0% [5.7, 51.0] (2/10) | +40.0 |" in text
    assert summary["finetune"]["docs"]["fact_logprob"]["helpful_only"]["delta"] == 1.0
    assert summary["model_calls"]["generate_docs"]["retries"] == 7
    assert summary["model_calls"]["eval"] == {"calls": 80, "cache_hits": 0, "retries": 3, "failures": 0,
                                              "faults": {"bad_response": 1, "http_500": 2}, "source": "eval/summary.json"}
    assert "| generate_docs | 90 | 3 | 7 | 0 | http_429 5, timeout 2 |" in text
    # every figure exists and is linked with the file it came from, by relative paths
    for name, fig in summary["figures"].items():
        assert (study / fig["path"]).stat().st_size > 1000, name
        assert f"]({fig['path']})" in text
        assert all((study / src).is_file() and f"]({src})" in text for src in fig["sources"])
    if af:
        assert "af_reasoning" in summary["figures"] and "Judge: judge X" in text
    else:
        assert ev["af_reasoning"] is None and "af_reasoning" not in summary["figures"]
        assert "Not measured: no capable alignment-faking judge was configured" in text
    assert summary["study"]["stages"][-1] == {"stage": "eval", "key": stages[-1].key, "action": "ran",
                                              "duration_s": None, "output": "eval", "log": "logs/eval.log",
                                              "depends_on": ["finetune_docs", "finetune_control"]}


def test_default_config_is_what_no_arguments_run(tmp_path, capsys):
    assert st.main(["--dry_run", "true", "--output_dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().err
    shipped = yaml.safe_load((ROOT / "configs/study/default.yaml").read_text())["generate_overrides"]
    assert f"--target_documents {shipped['target_documents']}" in out and "would run" in out
    assert yaml.safe_load((ROOT / "configs/study/default.yaml").read_text())["output_dir"] == "runs/study/default"
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
