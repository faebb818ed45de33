"""Resuming a run from its checkpoints, including checkpoints a kill left half-written.

The Trainer writes a checkpoint straight into ``checkpoint-<step>/`` and its ``trainer_state.json``
after the weights, optimizer, scheduler and RNG states, so a checkpoint without a readable
``trainer_state.json`` was cut short. Resuming skips such checkpoints (the main process deletes
them) and continues from the newest complete one. Each checkpoint also carries the training time so far
(``TrainingClock``), so a run killed and resumed reports the time of all its processes, not only the last.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import TrainOutput

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _state(checkpoint: Path) -> TrainerState | None:
    try:
        return TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    except (OSError, ValueError):
        return None


def last_complete_checkpoint(folder: Path, remove_incomplete: bool) -> str | None:
    """The newest checkpoint in ``folder`` whose trainer state was written; incomplete newer ones are removed
    when ``remove_incomplete`` (pass True on the main process only)."""
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    for _, checkpoint in sorted(found, reverse=True):
        if _state(checkpoint) is not None:
            return str(checkpoint)
        log.warning("%s was cut short (no trainer_state.json): resuming from an earlier checkpoint", checkpoint)
        if remove_incomplete:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def at_final_step(checkpoint: str) -> bool:
    """Whether a checkpoint was written at the run's last optimizer step (then resuming must not train again)."""
    state = _state(Path(checkpoint))
    return state is not None and state.max_steps > 0 and state.global_step >= state.max_steps


class TrainingClock(TrainerCallback, ExportableState):
    """Training time summed over every process that trained a run. The Trainer stores ``state()`` in each
    checkpoint's ``trainer_state.json``; a resumed process starts from the time saved in the checkpoint it resumed
    from, so work lost after that checkpoint is not counted."""

    def __init__(self) -> None:
        self.prior_s = 0.0
        self.began: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.prior_s = saved_train_time(state) or 0.0
        self.began = time.monotonic()

    def total_s(self) -> float:
        return self.prior_s + (time.monotonic() - self.began if self.began is not None else 0.0)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"elapsed_s": round(self.total_s(), 3)}}


def saved_train_time(state: TrainerState) -> float | None:
    """The training time a trainer state carries from its ``TrainingClock`` (None where it has none)."""
    saved = (state.stateful_callbacks or {}).get(TrainingClock.__name__) or {}
    if isinstance(saved, list):
        saved = saved[-1] if saved else {}
    elapsed = saved.get("attributes", {}).get("elapsed_s")
    return None if elapsed is None else float(elapsed)


def fit_resumed(trainer, resume: bool):
    """Train, resuming from the last complete checkpoint in the trainer's output folder when ``resume``; returns
    (TrainOutput, the checkpoint resumed from or None). A run killed after its last step (while exporting or
    writing its records) is loaded from its final checkpoint without training again: transformers would take one
    more optimizer step when resumed from it. The result's ``train_runtime`` is the training time of every process
    that trained the run (``TrainingClock``)."""
    trainer.add_callback(TrainingClock())
    last = None
    if resume:
        last = last_complete_checkpoint(Path(trainer.args.output_dir), trainer.is_world_process_zero())
        trainer.accelerator.wait_for_everyone()
    if last:
        log.info("resuming from %s", last)
    if last and at_final_step(last) and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        log.info("%s is the final step: loading it without training", last)
        trainer._load_from_checkpoint(last)
        trainer.state = TrainerState.load_from_json(os.path.join(last, "trainer_state.json"))
        return TrainOutput(trainer.state.global_step, None, {"train_runtime": saved_train_time(trainer.state)}), last
    result = trainer.train(resume_from_checkpoint=last)
    # looked up again: with restore_callback_states_from_checkpoint the Trainer swaps in a restored instance
    clock = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingClock))
    result.metrics["train_runtime"] = round(clock.total_s(), 3)
    return result, last
