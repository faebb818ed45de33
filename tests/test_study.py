"""The study orchestrator's parts: the plan (graph of stage specs, keys, sweeps and shared nodes), the
runner (skip / rerun / supersede, failures, the process-group keeper). Fast: no model, no endpoint (the
runner tests use small Python commands that write a manifest.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from study.__main__ import main
from study.config import Point, StudyConfig
from study.display import Display
from study.kind import NodeTemplate, StudyKind, load_kind
from study.plan import Node, Plan, plan, stage_key
from study.runner import StageFailed, Study, log_tail
from study.specs import SPECS
from studykit.config import ConfigError, parse_config
from studykit.handoff import RunFolder
from studykit.stage import StageSpec

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "study" / "default.yaml"
NODES = ("generate_docs", "generate_control", "finetune_docs", "finetune_control", "eval_base", "eval_finetuned")


def default_cfg(**overrides) -> StudyConfig:
    args = ["--config", str(DEFAULT)]
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return parse_config(StudyConfig, args)


def with_stage(cfg_stages: dict, target: str, **entry) -> dict:
    """A copy of the profile's `stages` with ``entry`` merged into ``target`` (overrides merged too)."""
    out = json.loads(json.dumps(cfg_stages))
    current = out.setdefault(target, {})
    for k, v in entry.items():
        current[k] = {**(current.get(k) or {}), **v} if isinstance(v, dict) else v
    return out


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ------------------------------------------------------------------------------------------------ plan and keys

def test_plan_builds_the_stage_commands_from_the_stage_configs(tmp_path):
    p = plan(default_cfg(), tmp_path / "s")
    assert [n.name for n in p.nodes] == [*NODES, "antilab_base", "antilab_finetuned"]
    nodes = {n.name: n for n in p.nodes}
    gen = nodes["generate_docs"].argv
    assert gen[:3] == ["python", "-m", "synthdocs.generate"]
    assert flag(gen, "--config") == "{repo}/configs/generate/default.yaml"
    shipped = yaml.safe_load(DEFAULT.read_text())["stages"]
    assert flag(gen, "--target_documents") == str(shipped["generate_docs"]["overrides"]["target_documents"])
    assert flag(gen, "--progress") == "false" and flag(gen, "--output_dir") == "{study}/generate/docs"
    steps = shipped["finetune"]["overrides"]["max_steps"]
    ctrl = nodes["finetune_control"].argv
    assert ctrl[:5] == ["accelerate", "launch", "--config_file", "{repo}/configs/finetune/accelerate/cpu.yaml",
                        "{repo}/finetune/train.py"]
    for name, value in (("--corpus", "{study}/generate/docs"), ("--control", "true"),
                        ("--control_corpus", "{study}/generate/control"), ("--output_dir", "{study}/finetune/control"),
                        ("--export_merged", "false"), ("--max_steps", str(steps))):
        assert flag(ctrl, name) == value
    assert nodes["finetune_control"].deps == ["generate_docs", "generate_control"]
    assert json.loads(flag(nodes["eval_finetuned"].argv, "--models")) == {
        "docs": "{study}/finetune/docs/adapter", "control": "{study}/finetune/control/adapter"}
    assert json.loads(flag(nodes["eval_base"].argv, "--models")) == {"base": ""}
    assert nodes["eval_base"].deps == [] and nodes["eval_finetuned"].deps == ["finetune_docs", "finetune_control"]
    antilab = nodes["antilab_finetuned"]
    assert antilab.argv[:3] == ["python", "-m", "eval.antilab"] and antilab.deps == ["finetune_docs", "finetune_control"]
    assert json.loads(flag(antilab.argv, "--models")) == {
        "docs": "{study}/finetune/docs/adapter", "control": "{study}/finetune/control/adapter"}
    assert json.loads(flag(nodes["antilab_base"].argv, "--models")) == {"base": ""}
    assert any(f.name == "scenarios.yaml" for f in antilab.inputs)   # editing the scenarios reruns it
    assert json.loads(flag(nodes["eval_base"].argv, "--conditions")) == ["minimal", "minimal_noscratch"]
    # the universe files the stages read are inputs of their keys
    assert any(f.name == "helpful_only.yaml" for f in nodes["generate_docs"].inputs)
    assert any(f.name == "control.yaml" and "universes" in str(f) for f in nodes["generate_control"].inputs)
    # each stage's own parser read the settings: typed configs, not strings
    assert nodes["generate_docs"].config.target_documents == shipped["generate_docs"]["overrides"]["target_documents"]
    assert nodes["finetune_docs"].config[1].max_steps == steps


def test_the_study_model_fills_each_stage_model_setting(tmp_path):
    nodes = {n.name: n for n in plan(default_cfg(model="/models/m"), tmp_path).nodes}
    assert flag(nodes["finetune_docs"].argv, "--model_name_or_path") == "/models/m"
    assert flag(nodes["eval_base"].argv, "--base_model") == "/models/m"
    assert "--model" not in nodes["generate_docs"].argv  # the generator is not the model under study


def test_keys_are_stable_portable_and_propagate_downstream(tmp_path):
    cfg = default_cfg()
    keys = {n.name: n.key for n in plan(cfg, tmp_path / "a").nodes}
    assert keys == {n.name: n.key for n in plan(cfg, tmp_path / "elsewhere").nodes}  # folder-independent
    changed = default_cfg(stages=with_stage(cfg.stages, "generate_control", overrides={"target_documents": 70}))
    differs = {n.name for n in plan(changed, tmp_path).nodes if keys[n.name] != n.key}
    assert differs == {"generate_control", "finetune_control", "eval_finetuned", "antilab_finetuned"}
    changed = default_cfg(stages=with_stage(cfg.stages, "eval", overrides={"max_harmful": 3}))
    assert {n.name for n in plan(changed, tmp_path).nodes if keys[n.name] != n.key} == {"eval_base", "eval_finetuned"}


def test_key_covers_the_contents_of_config_files(tmp_path):
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text((ROOT / "configs/generate/default.yaml").read_text())
    cfg = default_cfg()
    cfg = default_cfg(stages=with_stage(cfg.stages, "generate_docs", config=str(cfg_file)))
    first = [n.key for n in plan(cfg, tmp_path).nodes]
    cfg_file.write_text(cfg_file.read_text() + "doc_words: 150\n")
    second = [n.key for n in plan(cfg, tmp_path).nodes]
    assert [a == b for a, b in zip(first, second, strict=True)] == [False, True, False, False, True, False, True, False]


@pytest.mark.parametrize("change, fragment", [
    ({"stages": {"generat": {}}}, "'stages' names ['generat']"),
    ({"stages": {"generate": {"overrides": {"output_dir": "x"}}}}, "sets ['output_dir'], which the study sets itself"),
    ({"stages": {"finetune_docs": {"overrides": {"corpus": "x"}}}}, "sets ['corpus']"),
    ({"stages": {"eval_base": {"overrides": {"models": {"a": ""}}}}}, "sets ['models']"),
    ({"stages": {"eval": {"oveerrides": {}}}}, "unknown key(s) ['oveerrides']"),
    ({"expected_minutes": {"generate": 3}}, "unknown node(s) ['generate']"),
    ({"stages": {"generate": {"overrides": {"target_docs": 3}}}},
     "generate_docs: Unknown config key(s) 'target_docs' (did you mean 'target_documents'?)"),
    ({"stages": {"eval": {"overrides": {"conditions": ["minimal", "nope"]}}}}, "eval_base: Unknown condition 'nope'"),
    ({"stages": {"eval": {"config": "configs/eval/missing.yaml"}}}, "configs/eval/missing.yaml does not exist"),
    ({"stages": {"finetune": {"overrides": {"learning_rat": 1}}}}, "did you mean 'learning_rate'?"),
    ({"sweep": {"setting": "finetun.lora_r", "values": [1, 2]}}, "'finetun' is neither a stage nor a node"),
    ({"sweep": {"setting": "finetune_docs.corpus", "values": ["a", "b"]}}, "a setting the study wires itself"),
    ({"sweep": {"setting": "finetune.lora_r", "values": [4]}}, "at least two values"),
])
def test_bad_study_settings_are_config_errors(tmp_path, change, fragment):
    cfg = default_cfg()
    with pytest.raises(ConfigError) as err:
        cfg = default_cfg(**{k: ({**cfg.stages, **v} if k == "stages" else v) for k, v in change.items()})
        plan(cfg, tmp_path)
    assert fragment in str(err.value)


def test_a_kind_file_is_checked(tmp_path):
    bad = tmp_path / "kind.yaml"
    bad.write_text("name: k\nnodes:\n  a: {stage: eval, label: a, output: a, set: {models: {x: '@b'}}}\n"
                   "  b: {stage: finetune, label: b, output: b}\n")
    with pytest.raises(ConfigError, match="refers to \\['b'\\], which are not nodes listed before it"):
        load_kind(str(bad), set(SPECS))
    bad.write_text("name: k\nnodes:\n  a: {stage: train, label: a, output: a}\n")
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        load_kind(str(bad), set(SPECS))


# ------------------------------------------------------------------------------------------------ sweeps

def sweep_plan(tmp_path, setting, values):
    return plan(default_cfg(sweep={"setting": setting, "values": values, "label": "x"}), tmp_path)


def test_a_corpus_size_sweep_shares_generation_and_the_base_evaluation(tmp_path):
    p = sweep_plan(tmp_path, "finetune.max_train_tokens", [1000, 2000, 4000])
    names = [n.name for n in p.nodes]
    assert names[:2] == ["generate_docs", "generate_control"] and "eval_base" in names
    per_point = [n for n in names if "@" in n]
    assert per_point == [f"{t}@max_train_tokens-{v}" for t in ("finetune_docs", "finetune_control", "eval_finetuned",
                                                               "antilab_finetuned") for v in (1000, 2000, 4000)]
    node = p.at("max_train_tokens-2000", "finetune_control")
    assert flag(node.argv, "--max_train_tokens") == "2000"
    assert node.output == "{study}/sweep/max_train_tokens-2000/finetune/control"
    assert flag(node.argv, "--corpus") == "{study}/generate/docs"  # the shared corpus
    ev = p.at("max_train_tokens-2000", "eval_finetuned")
    assert json.loads(flag(ev.argv, "--models"))["docs"] == "{study}/sweep/max_train_tokens-2000/finetune/docs/adapter"
    assert ev.deps == ["finetune_docs@max_train_tokens-2000", "finetune_control@max_train_tokens-2000"]
    assert p.at("max_train_tokens-4000", "eval_base").name == "eval_base"
    assert p.node("eval_base").points == ["max_train_tokens-1000", "max_train_tokens-2000", "max_train_tokens-4000"]


def test_a_model_sweep_reruns_what_depends_on_the_model(tmp_path):
    p = sweep_plan(tmp_path, "model", ["/models/a", "/models/b"])
    shared = [n.name for n in p.nodes if "@" not in n.name]
    assert shared == ["generate_docs", "generate_control"]
    assert flag(p.at("model-b", "eval_base").argv, "--base_model") == "/models/b"


def test_an_evaluation_sweep_reuses_every_trained_model(tmp_path):
    p = sweep_plan(tmp_path, "eval.max_tokens", [128, 256])
    assert [n.name for n in p.nodes if "@" in n.name] == [
        "eval_base@max_tokens-128", "eval_base@max_tokens-256", "eval_finetuned@max_tokens-128",
        "eval_finetuned@max_tokens-256"]


# ------------------------------------------------------------------------------------------------ running nodes

WRITER = textwrap.dedent("""\
    import json, pathlib, sys, time
    out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs.txt"; runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
    cache = out / "cache.sqlite"; cache.write_text(cache.read_text() + "c" if cache.exists() else "c")
    if len(sys.argv) > 3 and sys.argv[3] == "fail":
        print("step 1 ok\\rstep 2 ok\\nTraceback: something broke in", out); sys.exit(3)
    (out / "manifest.json").write_text(json.dumps({"tag": sys.argv[2]}))
""")
FAKE = StageSpec(kind="fake", summary="writes its folder", launch=("python",), parse=lambda argv: None,
                 folder=RunFolder, default_config="", carry_over=("cache.sqlite",))


def fake_plan(study: Path, tags: dict[str, str] | None = None) -> Plan:
    """The study kind's graph with nodes that just write their output folder."""
    tags = tags or {}
    script = study.parent / "writer.py"
    script.write_text(WRITER)
    deps = {"finetune_docs": ["generate_docs"], "finetune_control": ["generate_docs", "generate_control"],
            "eval_finetuned": ["finetune_docs", "finetune_control"]}
    templates, nodes, keys = [], [], {}
    for name in NODES:
        template = NodeTemplate(name, "fake", name, name)
        extra = tags.get(name, "v1").split()
        key = stage_key({"tag": extra, "deps": [keys[d] for d in deps.get(name, [])]}, [], study, name)
        keys[name] = key
        templates.append(template)
        nodes.append(Node(name, template, FAKE, ["python", str(script), f"{{study}}/{name}", *extra],
                          f"{{study}}/{name}", key, deps.get(name, []), points=[""]))
    kind = StudyKind("fake", "", study / "kind.yaml", tuple(templates))
    return Plan(kind, [Point("")], nodes, {"": {n: n for n in NODES}})


def run_fake(study: Path, the_plan: Plan, **cfg) -> list[dict]:
    cfg = StudyConfig(output_dir=str(study), progress="plain", **cfg)
    study.mkdir(parents=True, exist_ok=True)
    runner = Study(cfg, study, the_plan, Display([n.name for n in the_plan.nodes], {}, "plain"))
    runner.acquire_lock()
    try:
        return runner.run()
    finally:
        os.close(runner.lock_fd)


def last_actions(study: Path) -> dict[str, str]:
    return json.loads((study / "study_state.json").read_text())["runs"][-1]["actions"]


def test_skip_rerun_and_supersede(tmp_path):
    study = tmp_path / "study"
    run_fake(study, fake_plan(study))
    assert set(last_actions(study).values()) == {"ran"}
    run_fake(study, fake_plan(study))
    assert set(last_actions(study).values()) == {"skipped"}
    old = json.loads((study / "study_state.json").read_text())["stages"]["generate_control"]["key"]

    # a changed control corpus reruns it and what depends on it, nothing else
    run_fake(study, fake_plan(study, {"generate_control": "v2"}))
    assert last_actions(study) == {"generate_docs": "skipped", "generate_control": "ran", "finetune_docs": "skipped",
                                   "finetune_control": "ran", "eval_base": "skipped", "eval_finetuned": "ran"}
    # superseded outputs are moved aside; the content-keyed call cache is carried into the fresh folder
    moved = study / f"generate_control.superseded-{old[:8]}"
    assert (moved / "manifest.json").is_file() and (moved / "runs.txt").read_text() == "x"
    assert (study / "generate_control" / "runs.txt").read_text() == "x"
    assert (study / "generate_control" / "cache.sqlite").read_text() == "cc"
    assert (study / "finetune_docs" / "runs.txt").read_text() == "x"
    assert len(list(study.glob("eval_finetuned.superseded-*"))) == 1
    log = (study / "logs" / "generate_control.log").read_text()
    assert log.count("===== ") == 2 and "writer.py" in log


def test_killed_stage_with_unchanged_key_resumes_in_place(tmp_path):
    study = tmp_path / "study"
    the_plan = fake_plan(study)
    run_fake(study, the_plan)
    state = json.loads((study / "study_state.json").read_text())
    state["stages"]["finetune_docs"]["status"] = "running"  # as a kill mid-stage leaves it
    (study / "study_state.json").write_text(json.dumps(state))
    (study / "finetune_docs" / "manifest.json").unlink()
    run_fake(study, the_plan)
    assert last_actions(study)["finetune_docs"] == "ran"
    assert (study / "finetune_docs" / "runs.txt").read_text() == "xx"  # same folder, no superseded copy
    assert not list(study.glob("*.superseded-*"))
    assert last_actions(study)["eval_finetuned"] == "skipped"


def test_failed_stage_stops_the_study_with_its_log_tail(tmp_path):
    study = tmp_path / "study"
    with pytest.raises(StageFailed) as err:
        run_fake(study, fake_plan(study, {"finetune_docs": "v1 fail"}))
    msg = str(err.value)
    assert "Stage finetune_docs failed: it exited with code 3" in msg
    assert str(study / "logs" / "finetune_docs.log") in msg
    assert "step 2 ok" in msg and "step 1 ok" not in msg  # progress lines keep only their final state
    assert "Traceback: something broke" in msg
    state = json.loads((study / "study_state.json").read_text())
    assert state["stages"]["finetune_docs"]["status"] == "failed"
    assert "finetune_control" not in state["stages"] and not (study / "eval_finetuned").exists()


def test_adopt_existing_records_outputs_made_elsewhere(tmp_path):
    study = tmp_path / "study"
    the_plan = fake_plan(study)
    (study / "generate_docs").mkdir(parents=True)
    (study / "generate_docs" / "manifest.json").write_text("{}")
    run_fake(study, the_plan, adopt_existing=True)
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
        from studykit.server import die_with_parent
        subprocess.Popen([sys.executable, "-m", "study.procgroup", sys.executable, "-c", {stage!r}],
                         preexec_fn=die_with_parent)
        time.sleep(120)
    """)
    study = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    deadline = time.time() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    study.send_signal(signal.SIGKILL)
    study.wait()

    def alive() -> bool:
        stat = Path(f"/proc/{grandchild}/stat")
        try:
            return stat.read_text().split(") ")[-1][0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.time() + 30
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(), "the stage's grandchild survived the SIGKILLed study"


def test_log_tail_keeps_final_progress_state(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a\n10%\r50%\r100%\n\nlast\n")
    assert log_tail(log, n=2) == "    100%\n    last"


def test_default_config_is_what_no_arguments_run(tmp_path, capsys):
    assert main(["--dry_run", "true", "--output_dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().err
    shipped = yaml.safe_load(DEFAULT.read_text())["stages"]["generate_docs"]["overrides"]
    assert f"--target_documents {shipped['target_documents']}" in out and "would run" in out
    assert yaml.safe_load(DEFAULT.read_text())["output_dir"] == "runs/study/default"
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "configs" / "study").glob("*.yaml")))
def test_every_shipped_profile_plans(tmp_path, profile):
    """Each profile's stage settings parse with the stages' own parsers (bf16 and vLLM generation off: this
    machine has no GPU)."""
    data = yaml.safe_load((ROOT / "configs" / "study" / profile).read_text())
    finetune = data.setdefault("stages", {}).setdefault("finetune", {})
    finetune["overrides"] = {**(finetune.get("overrides") or {}), "bf16": False}
    if data.get("kind") == "sdf_rl":  # and no vLLM generation inside the trainer
        rl = data["stages"].setdefault("rl", {})
        rl["overrides"] = {**(rl.get("overrides") or {}), "bf16": False, "use_vllm": False}
    (tmp_path / profile).write_text(yaml.safe_dump(data))
    cfg = parse_config(StudyConfig, ["--config", str(tmp_path / profile), "--output_dir", str(tmp_path / "s")])
    the_plan = plan(cfg, tmp_path / "s")
    assert {n.template.name for n in the_plan.nodes} == {t.name for t in the_plan.kind.nodes}
    assert set(cfg.expected_minutes) == {t.name for t in the_plan.kind.nodes}, "expected minutes for every node"
