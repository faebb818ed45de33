"""Outputs for the evaluation stage: the LoRA adapter and a merged model folder vLLM can serve.

* ``adapter/``: ``save_pretrained`` of the PEFT adapter (what ``vllm --lora-modules`` loads),
  with the tokenizer (chat template included) and the generation config.
* ``merged/``: a complete Hugging Face model folder: the base model reloaded from disk on
  the main process, the adapter merged into it, saved with the tokenizer and a generation
  config whose EOS list contains the tokenizer's EOS. For full fine-tuning it is the
  trained model itself. Reloading instead of merging the training copy keeps this correct
  under FSDP and DeepSpeed ZeRO-3, where the training copy is sharded.

Every file is written by the main process only; the other processes wait at a barrier.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def generation_config_for(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The model's generation config with the tokenizer's EOS (and pad) ids guaranteed to be in it."""
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        from transformers import AutoConfig

        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    existing = gen.eos_token_id
    eos_ids = [existing] if isinstance(existing, int) else list(existing or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.insert(0, tokenizer.eos_token_id)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def save_adapter(trainer, adapter_dir: Path, base_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Adapter weights + config, tokenizer and generation config (collective: call on every process)."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".partial")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))  # gathers sharded weights; writes on the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp)
        generation_config_for(base_dir, tokenizer).save_pretrained(tmp)
        _replace_dir(tmp, adapter_dir)
    trainer.accelerator.wait_for_everyone()


def save_full_model(trainer, merged_dir: Path, base_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Full fine-tuning: the trained model is the merged model (collective: call on every process)."""
    tmp = merged_dir.with_name(merged_dir.name + ".partial")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp)
        generation_config_for(base_dir, tokenizer).save_pretrained(tmp)
        _replace_dir(tmp, merged_dir)
    trainer.accelerator.wait_for_everyone()


def merge_adapter(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: torch.dtype,
                  tokenizer: PreTrainedTokenizerBase) -> None:
    """Reload the base model on the CPU, merge the adapter into it and save a servable folder."""
    from peft import PeftModel

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
    _replace_dir(tmp, merged_dir)
