"""``SFTTrainer`` that packs training documents by streaming them and counts real and padded tokens.

With ``stream_packing`` the training split is packed by ``finetune.packing.pack_stream`` (full
rows, documents continued across row boundaries) instead of TRL's ``packing_strategy``, which
still packs the held-out documents and the fact statements (each one whole unless longer than
``max_length``), so the held-out loss is measured on whole documents.

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

from finetune.packing import REAL_TOKENS, pack_stream


class DocumentTrainer(SFTTrainer):
    def __init__(self, *args, stream_packing: bool = True, **kwargs) -> None:
        self.stream_packing = stream_packing  # read by _prepare_dataset, which the parent's __init__ calls
        super().__init__(*args, **kwargs)
        self._local = torch.zeros(2, dtype=torch.float64)  # real tokens, positions since the last log
        self._totals: list[float] | None = None  # cumulative over the run, restored from the log history
        self.session = {"tokens": 0.0, "positions": 0.0, "seconds": 0.0}
        self._t0: float | None = None

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if packing and self.stream_packing and dataset_name == "train":
            return pack_stream(dataset, args.max_length)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

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
