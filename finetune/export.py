"""Outputs for the evaluation stage: the LoRA adapter and a merged model folder vLLM can serve.

* ``adapter/``: ``save_pretrained`` of the PEFT adapter (what ``vllm --lora-modules`` loads),
  with the tokenizer (chat template included) and the generation config.
* ``merged/``: a complete Hugging Face model folder: the base model reloaded from disk on
  the main process, the adapter merged into it (``studykit.merge.merge_adapter``), saved with
  the tokenizer and a generation config whose EOS list contains the tokenizer's EOS. For full
  fine-tuning it is the trained model itself, saved like the adapter. Reloading instead of
  merging the training copy keeps this correct under FSDP and DeepSpeed ZeRO-3, where the
  training copy is sharded.

Every file is written by the main process only; the other processes wait at a barrier.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from studykit.merge import generation_config_for, replace_dir


def save_trained(trainer, out_dir: Path, base_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The trained weights (the adapter under LoRA, the whole model otherwise) with the tokenizer and the
    generation config, written next to ``out_dir`` and renamed into it (collective: call on every process)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))  # gathers sharded weights; writes on the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp)
        generation_config_for(base_dir, tokenizer).save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    trainer.accelerator.wait_for_everyone()
