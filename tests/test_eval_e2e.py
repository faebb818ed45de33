"""End to end against a real managed vLLM server: a tiny random Llama as the base model plus a
random LoRA adapter served on the same server, the full evaluation, then a resume that repeats
no call. Slow (server start-up dominates)."""

from __future__ import annotations

import json

import pytest

from eval.gap import main


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


@pytest.mark.slow
def test_gap_end_to_end_with_lora_and_resume(tiny_model, tiny_adapter, tmp_path):
    out = tmp_path / "eval"
    args = ["--base_model", str(tiny_model), "--models", json.dumps({"base": "", "docs": str(tiny_adapter)}),
            "--output_dir", str(out), "--max_harmful", "3", "--max_benign", "1", "--conditions", "[minimal]",
            "--max_tokens", "24", "--max_continuations", "1", "--probe_orderings", "1", "--max_model_len", "2048",
            "--max_lora_rank", "8", "--bootstrap", "200", "--dtype", "float32"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * (3 + 1) * 2
    assert {s["model"] for s in samples} == {"base", "docs"}
    assert all(s["status"] == "ok" and s["turns"][0]["completion_tokens"] > 0 for s in samples)
    assert {s["served_model"] for s in samples} == {"base", "docs"}
    assert [m["name"] for m in summary["models"]] == ["base", "docs"]
    cells = {(c["model"], c["dataset"], c["tier"]): c for c in summary["cells"]}
    assert cells[("docs", "harmful", "training")]["n_samples"] == 3
    assert {(g["model"], g["scorer"]) for g in summary["gaps"] if g["dataset"] == "harmful"} == {
        ("base", "tags"), ("base", "refusal"), ("docs", "tags"), ("docs", "refusal")}
    assert set(summary["probes"]) == {"base", "docs"}
    assert summary["usage"]["model:docs"]["calls"] >= 8
    report = (out / "report.md").read_text()
    assert "No capable alignment-faking judge is configured" in report
    assert "| docs | minimal | harmful | training | 3 |" in report
    assert (out / "compliance_gap.png").stat().st_size > 5_000

    # rerun into the same folder: finished samples are kept, probes come from the cache, no model call is made
    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(u["calls"] == 0 for u in again["usage"].values())
    assert again["usage"]["model:base"]["cache_hits"] > 0
    assert again["cells"] == summary["cells"]
