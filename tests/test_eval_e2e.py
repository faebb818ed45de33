"""End to end against real managed vLLM servers: a tiny random Llama as the base model plus a
random LoRA adapter, served on one server with LoRA or merged into the base and served on its
own, and a full model folder on a server of its own; the full evaluation, then a resume that
repeats no call. The merge itself is checked without a server. Slow tests: server start-up
dominates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.gap import main
from studykit.handoff import Manifest
from tests.conftest import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_full_model(embedded_model, tmp_path_factory):
    """Another tiny random Llama, standing for the output of full fine-tuning (a whole model folder)."""
    return build_tiny_llama(tmp_path_factory.mktemp("full-model"), embedded_model, seed=1)


@pytest.mark.slow
def test_gap_end_to_end_with_lora_and_resume(tiny_model, tiny_adapter, tiny_full_model, tmp_path):
    from inspect_ai.log import read_eval_log

    out = tmp_path / "eval"
    models = {"base": "", "docs": str(tiny_adapter), "full": str(tiny_full_model)}
    args = ["--base_model", str(tiny_model), "--models", json.dumps(models),
            "--output_dir", str(out), "--max_harmful", "3", "--max_benign", "1", "--conditions", "[minimal]",
            "--max_tokens", "24", "--max_continuations", "1", "--probe_orderings", "1", "--max_model_len", "2048",
            "--max_lora_rank", "8", "--bootstrap", "200", "--dtype", "float32", "--serve_adapters", "lora"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * (3 + 1) * 2
    assert all(s["status"] == "ok" and s["turns"][0]["completion_tokens"] > 0 for s in samples)
    assert {s["served_model"] for s in samples} == {"base", "docs", "full"}
    assert [m["name"] for m in summary["models"]] == ["base", "docs", "full"]
    assert summary["models"][2]["weights"] == str(tiny_full_model.resolve())
    # base + LoRA adapter on one server, the full model folder on a server of its own
    assert summary["timings"]["servers"] == 2
    assert (out / "vllm-server.log").is_file() and (out / "vllm-server-full.log").is_file()
    cells = {(c["model"], c["dataset"], c["tier"]): c for c in summary["cells"]}
    assert cells[("docs", "harmful", "training")]["n_samples"] == 3
    assert cells[("full", "harmful", "training")]["n_samples"] == 3
    assert {(g["model"], g["scorer"]) for g in summary["gaps"] if g["dataset"] == "harmful"} == {
        (m, s) for m in models for s in ("tags", "refusal")}
    assert set(summary["probes"]) == set(models)
    assert summary["usage"]["model:docs"]["calls"] >= 8 and summary["usage"]["model:full"]["calls"] >= 8
    report = (out / "report.md").read_text()
    assert "No capable alignment-faking judge is configured" in report
    assert "| docs | minimal | harmful | training | 3 |" in report
    assert (out / "compliance_gap.png").stat().st_size > 5_000
    assert len(read_eval_log(str(out / "inspect.eval")).samples) == len(samples)
    assert Manifest.read(out / "manifest.json").stage == "eval.gap"

    # rerun into the same folder: finished samples are kept, probes come from the cache, no model call is made
    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(u["calls"] == 0 for u in again["usage"].values())
    assert again["usage"]["model:base"]["cache_hits"] > 0
    assert again["cells"] == summary["cells"]


def _merge_config(tiny_model, tiny_adapter, out, *extra):
    from eval.config import EvalConfig
    from studykit.config import parse_config

    return parse_config(EvalConfig, ["--base_model", str(tiny_model), "--output_dir", str(out), "--models",
                                     json.dumps({"base": "", "docs": str(tiny_adapter)}), *extra])


def test_merged_serving_merges_each_adapter_into_its_own_server(tiny_model, tiny_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from eval.serving import resolve_targets, server_groups, server_spec

    cfg = _merge_config(tiny_model, tiny_adapter, tmp_path, "--serve_adapters", "merged")
    targets, _ = resolve_targets(cfg)
    groups = server_groups(cfg, targets)
    assert [[t.name for t in g] for g in groups] == [["base"], ["docs"]]
    base_spec, docs_spec = (server_spec(cfg, g, tmp_path) for g in groups)
    assert base_spec.model == str(tiny_model) and base_spec.served_name == "base" and not base_spec.lora_modules
    merged = Path(docs_spec.model)
    assert docs_spec.served_name == "docs" and not docs_spec.lora_modules
    assert merged.parent == tmp_path / "merged" and (merged / "tokenizer_config.json").is_file()
    # the merged weight is W + (alpha / r) * B @ A, kept in fp32
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    lora = load_file(tiny_adapter / "adapter_model.safetensors")
    a = next(v for k, v in lora.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in lora.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    got = AutoModelForCausalLM.from_pretrained(merged).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert got.dtype == torch.float32
    assert torch.allclose(got, base["model.layers.0.self_attn.q_proj.weight"] + 2.0 * b @ a, atol=1e-6)
    # reused while the adapter is unchanged; replaced when it changes
    stamp = (merged / "config.json").stat().st_mtime_ns
    assert server_spec(cfg, groups[1], tmp_path).model == str(merged)
    assert (merged / "config.json").stat().st_mtime_ns == stamp
    lora_cfg = _merge_config(tiny_model, tiny_adapter, tmp_path, "--serve_adapters", "lora")
    assert server_groups(lora_cfg, targets) == [targets]
    assert server_spec(lora_cfg, targets, tmp_path).lora_modules == {"docs": str(tiny_adapter.resolve())}


def test_a_managed_judge_needs_one_server(tiny_model, tiny_adapter, tmp_path, capsys):
    args = ["--base_model", str(tiny_model), "--output_dir", str(tmp_path / "eval"), "--models",
            json.dumps({"base": "", "docs": str(tiny_adapter)}), "--serve_adapters", "merged",
            "--af_judge_base_url", "managed", "--af_judge_model", "base"]
    assert main(args) == 2
    assert "--serve_adapters lora" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "samples.jsonl").exists()


@pytest.mark.slow
def test_gap_end_to_end_with_merged_adapters(tiny_model, tiny_adapter, tmp_path):
    out = tmp_path / "eval"
    args = ["--base_model", str(tiny_model), "--models", json.dumps({"base": "", "docs": str(tiny_adapter)}),
            "--output_dir", str(out), "--max_harmful", "2", "--max_benign", "1", "--conditions", "[minimal]",
            "--max_tokens", "16", "--max_continuations", "0", "--probe_orderings", "1", "--max_model_len", "2048",
            "--bootstrap", "100", "--dtype", "float32", "--serve_adapters", "merged"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * (2 + 1) * 2 and all(s["status"] == "ok" for s in samples)
    assert {s["served_model"] for s in samples} == {"base", "docs"}
    assert summary["timings"]["servers"] == 2 and set(summary["probes"]) == {"base", "docs"}
    assert (out / "vllm-server-base.log").is_file() and (out / "vllm-server-docs.log").is_file()
    assert Manifest.read(out / "manifest.json").config["serve_adapters"] == "merged"
    assert main(args) == 0  # a rerun answers everything from the cache
    again = json.loads((out / "summary.json").read_text())
    assert all(u["calls"] == 0 for u in again["usage"].values()) and again["cells"] == summary["cells"]
