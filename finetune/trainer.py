"""``SFTTrainer`` that counts real and padded tokens, and a row-wise collator for packed batches.

``PackedRowsCollator`` is the packed-batch layout for attention kernels without varlen support
(SDPA and eager, i.e. every CPU run): TRL's padding-free collator flattens the whole batch into
one row, so attention costs (batch x length)^2; this collator keeps one row per packed
sequence, ``[batch, max_length]``, with position ids that restart at every document and no
attention mask. transformers turns restarting position ids into a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``), so no document attends across a boundary and
attention costs batch x length^2. Padding at the end of a short row gets position 0 at every
position, which makes each padding token its own one-token segment; its label is -100.

TRL's own ``num_tokens`` metric is reset when a run resumes and the Trainer's
``num_input_tokens_seen`` (mode "non_padding") mistakes EOS for padding when pad == eos.
This subclass counts, per optimizer micro-step, the positions the model computes
(``input_ids.numel()``) and the real tokens among them (attention mask, or every position
of a padding-free batch, which carries no padding). The cumulative counts are summed over
processes and written into each training log entry (``tokens_seen``, ``positions_seen``),
so they survive a resume through ``trainer_state.json``'s log history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

REAL_TOKENS = "num_real_tokens"  # collator -> trainer side channel, removed before the forward pass


@dataclass
class PackedRowsCollator:
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = DataCollatorForLanguageModeling(self.pad_token_id, padding_free=False, return_position_ids=True)(
            examples
        )
        batch.pop("attention_mask")
        # the first token of a document is not predicted from the end of the previous one
        batch["labels"][batch["position_ids"] == 0] = -100
        batch[REAL_TOKENS] = sum(len(e["input_ids"]) for e in examples)
        return batch


class DocumentTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._local = torch.zeros(2, dtype=torch.float64)  # real tokens, positions since the last log
        self._totals: list[float] | None = None  # cumulative over the run, restored from the log history
        self.session = {"tokens": 0.0, "positions": 0.0, "seconds": 0.0}
        self._t0: float | None = None

    def _restore_totals(self) -> list[float]:
        for entry in reversed(self.state.log_history):
            if "tokens_seen" in entry and entry.get("step", 0) <= self.state.global_step:
                return [float(entry["tokens_seen"]), float(entry["positions_seen"])]
        return [0.0, 0.0]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        ids = inputs["input_ids"]
        real = inputs.pop(REAL_TOKENS, None)
        if real is None:
            real = inputs["attention_mask"].sum().item() if "attention_mask" in inputs else ids.numel()
        self._local += torch.tensor([real, ids.numel()], dtype=torch.float64)
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(REAL_TOKENS, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs:  # training logs happen on every process: the reduce is safe
            if self._totals is None:
                self._totals = self._restore_totals()
            summed = self.accelerator.reduce(self._local.to(self.accelerator.device), "sum").cpu()
            self._local.zero_()
            self._totals = [self._totals[0] + summed[0].item(), self._totals[1] + summed[1].item()]
            self.session["tokens"] += summed[0].item()
            self.session["positions"] += summed[1].item()
            self.session["seconds"] = time.perf_counter() - (self._t0 or time.perf_counter())
            logs["tokens_seen"] = self._totals[0]
            logs["positions_seen"] = self._totals[1]
        super().log(logs, start_time)
