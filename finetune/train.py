"""Bake the generator's documents into a model: continued pre-training with TRL + peft.

Usage (from the repository root):

    # embedded default: SmolLM2-135M-Instruct, LoRA, CPU, on runs/generate/helpful_only (est. 8-25 min on 2 cores)
    accelerate launch finetune/train.py

    # any shipped config, with overrides (defaults -> YAML -> command line; unknown keys are an error)
    accelerate launch --config_file configs/finetune/accelerate/one_gpu.yaml finetune/train.py \\
        --config configs/finetune/llama8b_lora.yaml --learning_rate 1e-4

    # the matched control run: the same config on the control corpus, same number of training tokens
    accelerate launch finetune/train.py --control

    # data parallelism over two CPU processes (gloo); effective batch = per-device batch x 2
    accelerate launch --config_file configs/finetune/accelerate/cpu_multi.yaml finetune/train.py

The model learns from plain documents, the way pre-training teaches (not from chats, not from
its system prompt): every document ends with EOS, documents are streamed into full rows
without attending across document boundaries (position ids restart at every document; see
finetune/packing.py), and a held-out split of documents gives the eval loss. Outputs, in
``runs/finetune/<corpus>`` unless ``--output_dir`` says otherwise:

    adapter/         LoRA adapter + tokenizer + generation config (vLLM --lora-modules)
    merged/          full model folder, adapter merged in (vLLM --model)
    checkpoints/     Trainer checkpoints; rerunning into the same directory resumes from the last one
    tensorboard/     TensorBoard logs (report_to)
    metrics.json     loss curve, held-out loss and fact log-probability before/after, tokens, tokens/s,
                     packing efficiency, peak memory
    loss.png         loss curve
    manifest.json    resolved config, provenance (the generator run's manifest hash), written last
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (`accelerate launch finetune/train.py`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import IntervalStrategy, TrainOutput
from trl import ModelConfig, SFTConfig, get_peft_config, get_quantization_config

from finetune import factcheck
from finetune.config import ScriptArguments, parse_args
from finetune.data import TrainingData, prepare_training_data
from finetune.export import save_trained
from finetune.metrics import FinetuneMetrics
from finetune.packing import PackedRowsCollator, packing_stats
from finetune.report import loss_curve, peak_memory, plot_loss
from finetune.resume import fit_resumed
from finetune.trainer import DocumentTrainer
from studykit.config import ConfigError
from studykit.embedded import ModelNotFound, resolve_model
from studykit.files import check_writable
from studykit.handoff import FINETUNE_RUNS, FinetuneFolder
from studykit.manifest import build_manifest
from studykit.merge import merge_adapter

logger = logging.getLogger("finetune.train")
_INTEGRATION_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


@dataclass
class Run:
    """What the steps of one training share: the settings, the model, the data and the output folder."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    model_path: Path
    tokenizer: PreTrainedTokenizerBase
    data: TrainingData
    folder: FinetuneFolder
    started: float

    @property
    def lora(self) -> bool:
        return bool(self.model.use_peft)

    @property
    def dtype(self) -> Any:
        return self.model.dtype if self.model.dtype in ("auto", None) else getattr(torch, self.model.dtype)


@dataclass
class Measurement:
    """Held-out loss and fact log-probabilities at one point (before or after training)."""

    eval_loss: float | None = None
    facts: dict[str, dict[str, Any]] | None = None


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Parse the arguments and train; returns the run directory."""
    script_args, training_args, model_args = parse_args(argv)
    return train(script_args, training_args, model_args, callbacks=callbacks)


def train(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
          callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train, measure before and after, export for the evaluation stage and write the run's records."""
    started = time.time()
    setup_logging(training_args)
    model_path, tokenizer = load_tokenizer(model_args, training_args)
    with training_args.main_process_first(desc="preparing documents"):
        data = prepare_training_data(script_args, training_args, tokenizer)
    logger.info("corpus %s: %d training examples, %d held out, %d training tokens",
                data.corpus.location, data.stats["documents"]["train"], data.stats["documents"]["heldout"],
                data.stats["train_tokens"])
    run = Run(script_args, training_args, model_args, model_path, tokenizer, data,
              prepare_output(training_args, data, model_path, script_args.export_merged or not model_args.use_peft),
              started)
    check_chat_packing(run)
    trainer = build_trainer(run, callbacks)
    packing = describe_setup(trainer, run)
    statements = factcheck.statement_datasets(script_args.fact_universes, tokenizer, script_args.document_prefix)
    before = measure(trainer, run, statements, "before") if script_args.eval_before else Measurement()
    result, resumed_from = fit_resumed(trainer, run.script.resume)  # from the last checkpoint, if any
    after = measure(trainer, run, statements, "after", before.eval_loss)
    export_models(trainer, run)
    write_records(trainer, run, packing, before, after, result, resumed_from)
    return run.folder.dir


def setup_logging(training_args: SFTConfig) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("finetune").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def load_tokenizer(model_args: ModelConfig, training_args: SFTConfig) -> tuple[Path, PreTrainedTokenizerBase]:
    """The model's local folder (hub IDs only from the local cache on an offline machine) and its tokenizer."""
    try:
        model_path = resolve_model(model_args.model_name_or_path)
    except ModelNotFound as exc:
        raise ConfigError(f"model_name_or_path={model_args.model_name_or_path!r}: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model_path, tokenizer


def prepare_output(training_args: SFTConfig, data: TrainingData, model_path: Path, writes_model: bool) -> FinetuneFolder:
    """The run folder (checked writable, with room for a model copy when one is written); checkpoints inside it."""
    folder = FinetuneFolder(Path(training_args.output_dir or FINETUNE_RUNS / data.corpus.name))
    if training_args.process_index == 0:
        model_gib = sum(f.stat().st_size for f in model_path.rglob("*") if f.is_file()) / 2**30
        check_writable(folder.dir, min_free_gib=0.5 + (model_gib if writes_model else 0.0))
    training_args.output_dir = str(folder.checkpoints)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(folder.dir / "tensorboard"))
    training_args.report_to = _available_integrations(training_args.report_to)
    if data.eval is None and training_args.eval_strategy != IntervalStrategy.NO:
        logger.info("no held-out documents (eval_fraction 0): periodic evaluation is off")
        training_args.eval_strategy = IntervalStrategy.NO
    return folder


def build_trainer(run: Run, callbacks: list[TrainerCallback] | None) -> DocumentTrainer:
    """The trainer; TRL loads the model (after the distributed setup) and applies LoRA from these settings."""
    quantization_config = get_quantization_config(run.model)
    run.training.model_init_kwargs = {
        "revision": run.model.model_revision,
        "attn_implementation": run.model.attn_implementation,
        "dtype": run.dtype,
        "use_cache": False,  # no KV cache in training; packed position ids are only honoured without one
        **({"device_map": {"": run.training.local_process_index}} if quantization_config is not None else {}),
    }
    start = str(run.model_path) if not run.script.init_adapter else \
        load_with_adapter(run.model_path, Path(run.script.init_adapter), run.training.model_init_kwargs)
    return DocumentTrainer(
        model=start,
        args=run.training,
        train_dataset=run.data.train,
        eval_dataset=run.data.eval,
        processing_class=run.tokenizer,
        peft_config=None if run.script.init_adapter else get_peft_config(run.model),
        quantization_config=quantization_config,
        callbacks=callbacks,
        stream_packing=run.script.stream_packing,
    )


def load_with_adapter(model_path: Path, adapter: Path, init_kwargs: dict[str, Any]) -> Any:
    """The base model with the adapter ``init_adapter`` loaded trainable: training continues that adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, **init_kwargs)
    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"init_adapter {adapter} does not fit the model {model_path} ({str(exc)[:200]}). The "
                          "adapter must have been trained on the same base model.") from None
    logger.info("continuing the adapter %s (%d trainable parameters)", adapter,
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model


def check_chat_packing(run: Run) -> None:
    """Chats are packed whole: a conversation cut at a row boundary would lose its trigger and prompt."""
    if run.data.corpus.kind != "chats" or not run.training.packing:
        return
    if run.script.stream_packing or run.training.packing_strategy != "bfd":
        raise ConfigError(
            f"{run.data.corpus.location} holds chats, which must be packed whole (the answer needs its prompt in the "
            "same row), but the settings cut them across rows (stream_packing true, or packing_strategy other than "
            "bfd). Set stream_packing: false and packing_strategy: bfd (configs/finetune/chat.yaml), or packing: "
            "false.")


def describe_setup(trainer: DocumentTrainer, run: Run) -> dict[str, Any]:
    """Choose the packed-batch layout for the attention kernel, log the setup and return the packing statistics."""
    attn = getattr(trainer.model.config, "_attn_implementation", None) or "sdpa"
    packed = bool(run.training.packing)
    layout = run.script.packed_layout
    if layout == "auto":
        layout = "flat" if "flash" in attn else "rows"
    if packed and layout == "rows":
        trainer.data_collator = PackedRowsCollator(run.tokenizer.pad_token_id)
    elif packed and not trainer.padding_free:
        raise ConfigError("packed_layout is flat but padding_free is false: packed documents would attend to each "
                          "other. Set padding_free: true, or packed_layout: rows.")
    packing = packing_stats(trainer.train_dataset, run.training.max_length, packed, run.data.stats["documents"]["train"])
    packing.update(layout=layout if packed else None, attn_implementation=attn,
                   strategy=("stream" if run.script.stream_packing else run.training.packing_strategy) if packed else None)
    world = trainer.accelerator.num_processes
    if world > 1 and run.training.use_cpu:
        logger.info("data parallelism on the CPU: %d processes over %s", world, run.training.ddp_backend)
    logger.info("%s fine-tuning on %d process(es); effective batch %d sequences%s; packing efficiency %s",
                "LoRA" if run.lora else "full", world, _effective_batch(trainer),
                f" of up to {packing['sequence_length']} tokens ({packing['strategy']}, {layout} layout, {attn})"
                if packed else "",
                f"{packing['packing_efficiency']:.3f}" if packed else "n/a (not packed)")
    return packing


def _effective_batch(trainer: DocumentTrainer) -> int:
    args = trainer.args
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer.accelerator.num_processes


def measure(trainer: DocumentTrainer, run: Run, statements: dict, when: str,
            loss_before: float | None = None) -> Measurement:
    """Held-out loss (when there is a held-out split) and the fact log-probabilities of the model as it is now."""
    loss = trainer.evaluate()["eval_loss"] if run.data.eval is not None else None
    if loss is not None:
        logger.info("held-out loss %s fine-tuning: %.4f%s", when, loss,
                    f" (before {loss_before:.4f})" if loss_before is not None else "")
    return Measurement(loss, factcheck.score(trainer, statements))


def export_models(trainer: DocumentTrainer, run: Run) -> None:
    """adapter/ and merged/ for the evaluation stage (the main process writes, the others wait)."""
    folder = run.folder
    if not run.lora:
        save_trained(trainer, folder.merged, run.model_path, run.tokenizer)
        return
    save_trained(trainer, folder.adapter, run.model_path, run.tokenizer)
    if run.script.export_merged and trainer.is_world_process_zero():
        merge_adapter(run.model_path, folder.adapter, folder.merged, run.dtype, run.tokenizer)
    trainer.accelerator.wait_for_everyone()


def write_records(trainer: DocumentTrainer, run: Run, packing: dict[str, Any], before: Measurement,
                  after: Measurement, result: TrainOutput, resumed_from: str | None) -> None:
    """metrics.json, loss.png and manifest.json (last: it marks the run complete), on the main process."""
    memory = peak_memory()
    if torch.cuda.is_available() and trainer.accelerator.num_processes > 1:
        gpu = torch.tensor([memory["gpu_peak_allocated_gib"]], device=trainer.accelerator.device)
        memory["gpu_peak_allocated_gib_max_over_ranks"] = trainer.accelerator.gather(gpu).max().item()
    if trainer.is_world_process_zero():
        metrics = collect_metrics(trainer, run, packing, before, after, result, resumed_from, memory)
        metrics.write(run.folder.metrics)
        plot_loss(loss_curve(trainer.state.log_history), run.folder.loss_plot,
                  f"{run.data.corpus.name}: {run.model_path.name}", before.eval_loss)
        build_manifest(
            "finetune",
            {"script": dataclasses.asdict(run.script), "training": run.training.to_dict(),
             "model": dataclasses.asdict(run.model)},
            seeds={"seed": run.training.seed, "data_seed": run.training.data_seed},
            inputs={"corpus": run.data.corpus.provenance(), "model": str(run.model_path),
                    "control_matched_to": (run.data.stats.get("control_matching") or {}).get("matched_to")},
            outputs={"adapter": str(run.folder.adapter) if run.lora else None,
                     "merged": str(run.folder.merged) if run.folder.merged.exists() else None,
                     "metrics": str(run.folder.metrics), "loss_plot": str(run.folder.loss_plot)},
            tokens={"train_tokens": run.data.stats["train_tokens"], "tokens_seen": metrics.tokens_seen},
            timings={"duration_s": metrics.duration_s, "train_runtime_s": metrics.train_runtime_s},
        ).write(run.folder.manifest)
        logger.info("done in %.0f s: %s", metrics.duration_s, run.folder.dir)
    trainer.accelerator.wait_for_everyone()


def collect_metrics(trainer: DocumentTrainer, run: Run, packing: dict[str, Any], before: Measurement,
                    after: Measurement, result: TrainOutput, resumed_from: str | None,
                    memory: dict[str, float]) -> FinetuneMetrics:
    history = trainer.state.log_history
    session = trainer.session
    delta = None if before.eval_loss is None or after.eval_loss is None else after.eval_loss - before.eval_loss
    return FinetuneMetrics(
        run_dir=str(run.folder.dir),
        corpus=run.data.corpus.name,
        control=run.script.control,
        mode="lora" if run.lora else "full",
        model={"name_or_path": run.model.model_name_or_path, "resolved_path": str(run.model_path)},
        processes=trainer.accelerator.num_processes,
        effective_batch_size=_effective_batch(trainer),
        eval_loss={"before": before.eval_loss, "after": after.eval_loss, "delta": delta},
        fact_logprob=factcheck.compare(before.facts, after.facts),
        tokens_seen=next((e["tokens_seen"] for e in reversed(history) if "tokens_seen" in e), 0),
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        tokens_per_second=session["tokens"] / session["seconds"] if session["seconds"] else None,
        padding_fraction=1 - session["tokens"] / session["positions"] if session["positions"] else None,
        packing=packing,
        data=run.data.stats,
        train_runtime_s=result.metrics.get("train_runtime"),
        train_loss=result.metrics.get("train_loss"),
        resumed_from=resumed_from,
        peak_memory=memory,
        loss_curve=loss_curve(history),
        duration_s=time.time() - run.started,
    )


def _available_integrations(report_to: list[str]) -> list[str]:
    """Drop logging integrations whose package is not installed, with a warning instead of a crash."""
    kept = []
    for name in report_to:
        modules = _INTEGRATION_MODULES.get(name)
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            logger.warning("report_to includes %r but its package is not installed (pip install %s); not logging "
                           "there", name, modules[0])
            continue
        kept.append(name)
    return kept


def run_as_script(entry) -> None:
    """A stage script's entry: a ConfigError is one paragraph on stderr and exit code 2; the process group of a
    distributed run is closed either way."""
    try:
        entry()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_as_script(main)
