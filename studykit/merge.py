"""Merge a LoRA adapter into its base model and save a folder vLLM can serve.

Used by the fine-tuning stage (its ``merged/`` export) and by the evaluation stage (which merges
each adapter before serving it on a CPU, where vLLM's LoRA path is slow). The base model is
reloaded from disk on the CPU and the merged folder is written next to its final place, then
renamed into it, so a killed merge never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def generation_config_for(model_dir: str | Path, tokenizer):
    """The model's generation config with the tokenizer's EOS (and pad) ids guaranteed to be in it."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    existing = gen.eos_token_id
    eos_ids = [existing] if isinstance(existing, int) else list(existing or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.insert(0, tokenizer.eos_token_id)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def merge_adapter(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype, tokenizer) -> None:
    """Reload the base model on the CPU, merge the adapter into it and save a servable folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log.info("merging %s into %s -> %s", adapter_dir, base_dir, merged_dir)
    tmp = merged_dir.with_name(merged_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map="cpu")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.generation_config = generation_config_for(base_dir, tokenizer)
    merged.config.use_cache = True
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, merged_dir)
