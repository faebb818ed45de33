"""``SFTTrainer`` that also counts real and padded tokens, so a run reports its padding.

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

import torch
from trl import SFTTrainer


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
        real = inputs["attention_mask"].sum().item() if "attention_mask" in inputs else ids.numel()
        self._local += torch.tensor([real, ids.numel()], dtype=torch.float64)
        return super().training_step(model, inputs, num_items_in_batch)

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
