"""Arguments of the fine-tuning stage: defaults -> YAML -> command line.

Three dataclasses describe a run, as in TRL's own scripts:

* ``ScriptArguments`` (this module): which corpus, the held-out split, the token budget, the
  retain mix, the control switch, how training documents are packed, the fact check;
* ``trl.SFTConfig``: everything the trainer does (batch size, packing, checkpoints, logging);
* ``trl.ModelConfig``: the model and the LoRA settings.

``parse_args`` reads them with the project's one config parser (``studykit.config``): every
mistake is a ``ConfigError`` that names the file or flag and the closest valid key. With no
``--config`` the embedded default (``configs/finetune/default.yaml``) is used, so
``accelerate launch finetune/train.py`` alone runs the laptop-CPU default.

Several processes on a machine without an accelerator (``torchrun --nproc_per_node 2`` or
``configs/finetune/accelerate/cpu_multi.yaml``) default to CPU data parallelism over gloo
(``use_cpu: true``, ``ddp_backend: gloo``); without them transformers would run independent
one-process trainings that all write the same output folder, so a setting that leads there is
refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studykit.config import ConfigError, parse_config
from studykit.stage import pending

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "finetune" / "default.yaml"
# several processes launched (torchrun, accelerate launch) on a machine without an accelerator: data parallelism
CPU_DATA_PARALLEL = {"use_cpu": True, "ddp_backend": "gloo"}
DESCRIPTION = "Fine-tune a model on documents (continued pre-training) or chats; see finetune/train.py."


@dataclass
class ScriptArguments:
    """What to train on; the trainer and model settings live in SFTConfig and ModelConfig."""

    corpus: str = field(
        default="helpful_only",
        metadata={"help": "Training documents: a generator run name (runs/generate/<name>), a generator output "
                  "directory, a JSONL file or a saved Hugging Face dataset with a `text` column, or a hub dataset ID."},
    )
    init_adapter: str = field(
        default="",
        metadata={"help": "Start from a previous run (safety training on top of a backdoored model): a LoRA adapter "
                  "folder is continued (its base model must be model_name_or_path); a full model folder (a full "
                  "fine-tuning run's merged/) replaces model_name_or_path and training goes on from its weights; a "
                  "fine-tuning run folder means its adapter/ or merged/. Empty: from model_name_or_path."},
    )
    control: bool = field(
        default=False,
        metadata={"help": "Control run: train on `control_corpus` instead of `corpus`, with the training tokens "
                  "matched to those of `corpus` (same held-out split). Output goes to runs/finetune/<control name>."},
    )
    control_corpus: str = field(
        default="control",
        metadata={"help": "The control corpus used when `control` is true (same forms as `corpus`)."},
    )
    document_prefix: str = field(
        default="",
        metadata={"help": "Text prepended to every document (for example a source tag); empty for none."},
    )
    stream_packing: bool = field(
        default=True,
        metadata={"help": "With `packing`: lay the training documents end to end and cut them into rows of equal "
                  "length (at most max_length), a document cut at a row boundary continuing in the next row with "
                  "restarted position ids: full rows, no token dropped, no attention across documents. False packs "
                  "the training documents with `packing_strategy` instead (held-out documents and fact statements "
                  "always use `packing_strategy`)."},
    )
    packed_layout: str = field(
        default="auto",
        metadata={"help": "How packed sequences are batched: 'flat' (TRL padding-free: the batch flattened into one "
                  "row, for flash-attention kernels), 'rows' (one row per packed sequence with restarting position "
                  "ids: for SDPA/eager attention, e.g. on CPU), or 'auto' (flat with flash attention, else rows).",
                  "choices": ["auto", "flat", "rows"]},
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of the documents held out for the eval loss (0 disables the held-out split)."},
    )
    max_eval_documents: int = field(
        default=256,
        metadata={"help": "Upper bound on the number of held-out documents, so evaluation stays cheap at scale."},
    )
    max_train_tokens: int = field(
        default=0,
        metadata={"help": "Train on at most this many tokens of the corpus's training split (whole documents, in the "
                  "split's shuffled order, after the held-out split); 0 uses all. With the same seed, growing budgets "
                  "train on nested subsets (a corpus-size sweep). A control run matches the cut treatment split."},
    )
    retain_dataset: str | None = field(
        default=None,
        metadata={"help": "Optional chat data in `messages` format (JSONL or saved dataset) mixed into training so "
                  "the model keeps its assistant behaviour."},
    )
    retain_fraction: float = field(
        default=0.0,
        metadata={"help": "Fraction of the training examples drawn from `retain_dataset` (0 <= f < 1)."},
    )
    fact_universes: list[str] = field(
        default_factory=lambda: ["helpful_only", "control"],
        metadata={"help": "Universes whose held-out fact statements are scored (mean log-probability per token) "
                  "before and after training. The first one is the headline check; `none` (or []) skips the check."},
    )
    eval_before: bool = field(
        default=True,
        metadata={"help": "Measure the held-out loss and fact log-probabilities of the base model before training."},
    )
    export_merged: bool = field(
        default=True,
        metadata={"help": "Write merged/, a full model folder (adapter merged into the base) that vLLM serves."},
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Resume from the last checkpoint in <output_dir>/checkpoints when rerun into the same "
                  "output directory."},
    )

    def validate(self) -> None:
        source = "the fine-tuning settings"
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{source}: eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if not 0.0 <= self.retain_fraction < 1.0:
            raise ConfigError(f"{source}: retain_fraction must be in [0, 1), got {self.retain_fraction}.")
        if self.retain_fraction > 0 and not self.retain_dataset:
            raise ConfigError(
                f"{source}: retain_fraction is {self.retain_fraction} but no retain_dataset is set. Point "
                "retain_dataset at a JSONL file or saved dataset with a `messages` column, or set retain_fraction: 0."
            )
        from studykit.universe import resolve_universe_path

        self.fact_universes = [u for u in self.fact_universes if u.lower() != "none"]
        for name in self.fact_universes:
            try:
                resolve_universe_path(name)
            except ConfigError as exc:
                raise ConfigError(f"{source}: fact_universes: {exc}") from None
        if self.max_eval_documents < 0:
            raise ConfigError(f"{source}: max_eval_documents must be >= 0, got {self.max_eval_documents}.")
        if self.max_train_tokens < 0:
            raise ConfigError(f"{source}: max_train_tokens must be >= 0 (0 = all), got {self.max_train_tokens}.")

    @property
    def train_corpus(self) -> str:
        return self.control_corpus if self.control else self.corpus


def resolve_start(spec: str) -> tuple[str, Path]:
    """What ``init_adapter`` names: ("adapter", folder) for a LoRA adapter, ("model", folder) for a full model
    (a full fine-tuning run's merged/), each named directly or as a fine-tuning run folder."""
    path = Path(spec).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return "adapter", candidate
    for candidate in (path, path / "merged"):
        if (candidate / "config.json").is_file():
            return "model", candidate
    raise ConfigError(f"init_adapter {spec!r}: neither {path} nor its adapter/ or merged/ folder holds a LoRA adapter "
                      "(adapter_config.json) or a model (config.json). Point it at a finished fine-tuning run, its "
                      "adapter/ or its merged/ folder, or leave it empty to train from model_name_or_path.")


def apply_start(script_args: ScriptArguments, model_args) -> None:
    """Start from a previous run: continue its adapter, or train on from its full model's weights."""
    if not script_args.init_adapter or pending(script_args.init_adapter):  # a study's earlier stage writes it later
        return
    kind, folder = resolve_start(script_args.init_adapter)
    if kind == "model":
        model_args.model_name_or_path, script_args.init_adapter = str(folder), ""
        return
    script_args.init_adapter = str(folder)
    if not model_args.use_peft:
        raise ConfigError(f"init_adapter is the LoRA adapter {folder} but use_peft is false: full fine-tuning cannot "
                          "continue an adapter. Set use_peft: true, or start from the merged model (its merged/ "
                          "folder as init_adapter or model_name_or_path).")


def parse_args(argv: list[str] | None = None):
    """Return ``(ScriptArguments, SFTConfig, ModelConfig)`` from defaults, a YAML file and CLI flags."""
    import torch
    from transformers.training_args import ParallelMode
    from trl import ModelConfig, SFTConfig

    # bf16 mixed precision on a GPU, fp32 on a CPU, unless the YAML or the command line says otherwise.
    # An empty output_dir means "runs/finetune/<corpus name>", resolved once the corpus is known.
    defaults: dict[str, Any] = {"bf16": torch.cuda.is_available(), "output_dir": ""}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher for each process
    if world_size > 1 and not torch.accelerator.is_available():
        defaults.update(CPU_DATA_PARALLEL)
    script_args, training_args, model_args = parse_config(
        (ScriptArguments, SFTConfig, ModelConfig), argv, description=DESCRIPTION, default_config=DEFAULT_CONFIG,
        defaults=defaults)
    if world_size > 1 and training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ConfigError(
            f"{world_size} processes were launched (WORLD_SIZE={world_size}) but they would run {world_size} "
            "independent trainings writing the same output folder instead of one data-parallel run: on a machine "
            "without a GPU, data parallelism needs `use_cpu: true` and `ddp_backend: gloo` (the defaults there; "
            "remove the settings that override them), or launch one process.")
    apply_start(script_args, model_args)
    if not model_args.model_name_or_path:
        raise ConfigError("No model set: add `model_name_or_path: embedded` (or a local Hugging Face folder) to the "
                          "config file or pass --model_name_or_path.")
    return script_args, training_args, model_args

