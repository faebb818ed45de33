"""Bake the generator's documents into a model: continued pre-training with TRL + peft.

Usage (from the repository root):

    # embedded default: SmolLM2-135M-Instruct, LoRA, CPU, on runs/generate/helpful_only (est. 8-25 min on 2 cores)
    accelerate launch finetune/train.py

    # any shipped config, with overrides (defaults -> YAML -> command line; unknown keys are an error)
    accelerate launch --config_file configs/finetune/accelerate/one_gpu.yaml finetune/train.py \\
        --config configs/finetune/llama8b_lora.yaml --learning_rate 1e-4

    # the matched control run: the same config on the control corpus, same number of training tokens
    accelerate launch finetune/train.py --control

The model learns from plain documents, the way pre-training teaches (not from chats, not from
its system prompt): every document ends with EOS, documents are packed into full sequences
without attending across document boundaries (padding-free batches with per-document position
ids), and a held-out split of documents gives the eval loss. Outputs, in
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
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`accelerate launch finetune/train.py`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import AutoTokenizer, TrainerCallback, TrainerState
from transformers.trainer_utils import IntervalStrategy, TrainOutput, get_last_checkpoint
from trl import get_peft_config, get_quantization_config

from finetune import factcheck
from finetune.config import parse_args
from finetune.data import packing_stats, prepare_training_data
from finetune.export import save_adapter, save_full_model
from finetune.report import loss_curve, peak_memory, plot_loss
from finetune.trainer import DocumentTrainer, PackedRowsCollator
from studykit.config import ConfigError
from studykit.embedded import ModelNotFound, resolve_model
from studykit.files import atomic_write_json
from studykit.handoff import FINETUNE_RUNS
from studykit.manifest import build_manifest
from studykit.merge import merge_adapter

logger = logging.getLogger("finetune.train")
_INTEGRATION_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Parse the arguments and train; returns the run directory."""
    script_args, training_args, model_args = parse_args(argv)
    return train(script_args, training_args, model_args, callbacks=callbacks)


def train(script_args, training_args, model_args, callbacks: list[TrainerCallback] | None = None) -> Path:
    started = time.time()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("finetune").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())

    # 1. Model and tokenizer (a local folder; hub IDs only from the local cache on an offline machine)
    try:
        model_path = resolve_model(model_args.model_name_or_path)
    except ModelNotFound as exc:
        raise ConfigError(f"model_name_or_path={model_args.model_name_or_path!r}: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # 2. Documents: tokenized (each ends with EOS), held-out split, control token matching, retain mix
    with training_args.main_process_first(desc="preparing documents"):
        data = prepare_training_data(script_args, training_args, tokenizer)
    logger.info("corpus %s: %d training documents, %d held out, %d training tokens",
                data.corpus.location, data.stats["documents"]["train"], data.stats["documents"]["heldout"],
                data.stats["train_tokens"])

    # 3. Where everything goes: the run directory, with the Trainer's checkpoints in checkpoints/
    run_dir = Path(training_args.output_dir or FINETUNE_RUNS / data.corpus.name)
    training_args.output_dir = str(run_dir / "checkpoints")
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    training_args.report_to = _available_integrations(training_args.report_to)
    if data.eval is None and training_args.eval_strategy != IntervalStrategy.NO:
        logger.info("no held-out documents (eval_fraction 0): periodic evaluation is off")
        training_args.eval_strategy = IntervalStrategy.NO

    # 4. Model loading and LoRA (TRL builds the model from these, after the distributed setup)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": dtype,
        "use_cache": False,  # no KV cache in training; packed position ids are only honoured without one
        **({"device_map": {"": training_args.local_process_index}} if quantization_config is not None else {}),
    }
    peft_config = get_peft_config(model_args)
    trainer = DocumentTrainer(
        model=str(model_path),
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
        callbacks=callbacks,
    )
    attn = getattr(trainer.model.config, "_attn_implementation", None) or "sdpa"
    layout = script_args.packed_layout
    if layout == "auto":
        layout = "flat" if "flash" in attn else "rows"
    if training_args.packing and layout == "rows":
        trainer.data_collator = PackedRowsCollator(tokenizer.pad_token_id)
    world = trainer.accelerator.num_processes
    effective_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    packed = bool(training_args.packing)
    packing = packing_stats(trainer.train_dataset, training_args.max_length, packed)
    packing["layout"] = layout if packed else None
    packing["attn_implementation"] = attn
    logger.info("%s fine-tuning on %d process(es); effective batch %d sequences%s; packing efficiency %s",
                "LoRA" if peft_config else "full", world, effective_batch,
                f" of up to {training_args.max_length} tokens ({layout} layout, {attn})" if packed else "",
                f"{packing['packing_efficiency']:.3f}" if packed else "n/a (not packed)")

    # 5. Before: held-out loss and fact log-probabilities of the base model
    statements = factcheck.statement_datasets(script_args.fact_universes, tokenizer, script_args.document_prefix)
    eval_before = facts_before = None
    if script_args.eval_before:
        if data.eval is not None:
            eval_before = trainer.evaluate()["eval_loss"]
            logger.info("held-out loss before fine-tuning: %.4f", eval_before)
        facts_before = factcheck.score(trainer, statements)

    # 6. Train, resuming from the last checkpoint of an earlier run into the same directory
    last = None
    if script_args.resume and Path(training_args.output_dir).is_dir():
        last = get_last_checkpoint(training_args.output_dir)
        if last:
            logger.info("resuming from %s", last)
    if last and _at_max_steps(last, training_args.max_steps) and not (trainer.is_fsdp_enabled
                                                                      or trainer.is_deepspeed_enabled):
        # killed after the last step (while evaluating or exporting): transformers would take one more optimizer
        # step when resumed from the final checkpoint, so its weights are loaded instead of training again
        logger.info("%s is the final step (max_steps %d): loading it without training", last,
                    training_args.max_steps)
        trainer._load_from_checkpoint(last)
        trainer.state = TrainerState.load_from_json(os.path.join(last, "trainer_state.json"))
        result = TrainOutput(trainer.state.global_step, None, {})
    else:
        result = trainer.train(resume_from_checkpoint=last)

    # 7. After
    eval_after = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    facts_after = factcheck.score(trainer, statements)
    if eval_after is not None:
        logger.info("held-out loss after fine-tuning: %.4f%s", eval_after,
                    f" (before {eval_before:.4f})" if eval_before is not None else "")

    # 8. Export for the evaluation stage: adapter/ and merged/ (main process writes, others wait)
    adapter_dir, merged_dir = run_dir / "adapter", run_dir / "merged"
    if peft_config is not None:
        save_adapter(trainer, adapter_dir, model_path, tokenizer)
        if script_args.export_merged and trainer.is_world_process_zero():
            merge_adapter(model_path, adapter_dir, merged_dir, dtype, tokenizer)
        trainer.accelerator.wait_for_everyone()
    else:
        save_full_model(trainer, merged_dir, model_path, tokenizer)

    # 9. Metrics, plot and manifest (manifest last: it marks the run complete)
    session = trainer.session
    memory = peak_memory()
    if torch.cuda.is_available() and world > 1:
        gpu = torch.tensor([memory["gpu_peak_allocated_gib"]], device=trainer.accelerator.device)
        memory["gpu_peak_allocated_gib_max_over_ranks"] = trainer.accelerator.gather(gpu).max().item()
    if trainer.is_world_process_zero():
        curve = loss_curve(trainer.state.log_history)
        facts = factcheck.compare(facts_before, facts_after)
        headline = script_args.fact_universes[0] if script_args.fact_universes else None
        tokens_seen = next((e["tokens_seen"] for e in reversed(trainer.state.log_history) if "tokens_seen" in e), 0)
        metrics = {
            "run_dir": str(run_dir),
            "corpus": data.corpus.name,
            "control": script_args.control,
            "mode": "lora" if peft_config else "full",
            "model": {"name_or_path": model_args.model_name_or_path, "resolved_path": str(model_path)},
            "processes": world,
            "effective_batch_size": effective_batch,
            "eval_loss": {"before": eval_before, "after": eval_after,
                          "delta": None if eval_before is None or eval_after is None else eval_after - eval_before},
            "fact_logprob": facts,
            "fact_check": ({"universe": headline, **{k: v for k, v in facts[headline].items() if k != "per_fact"}}
                           if headline in facts else None),
            "tokens_seen": tokens_seen,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "tokens_per_second": session["tokens"] / session["seconds"] if session["seconds"] else None,
            "padding_fraction": 1 - session["tokens"] / session["positions"] if session["positions"] else None,
            "packing": packing,
            "data": data.stats,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "train_loss": result.metrics.get("train_loss"),
            "resumed_from": last,
            "peak_memory": memory,
            "loss_curve": curve,
            "duration_s": time.time() - started,
        }
        atomic_write_json(run_dir / "metrics.json", metrics)
        plot_loss(curve, run_dir / "loss.png", f"{data.corpus.name}: {model_path.name}", eval_before)
        manifest = build_manifest(
            "finetune",
            {"script": dataclasses.asdict(script_args), "training": training_args.to_dict(),
             "model": dataclasses.asdict(model_args)},
            seeds={"seed": training_args.seed, "data_seed": training_args.data_seed},
            inputs={"corpus": data.corpus.provenance(), "model": str(model_path),
                    "control_matched_to": data.stats.get("control_matching", {}).get("matched_to")},
            outputs={"adapter": str(adapter_dir) if peft_config else None,
                     "merged": str(merged_dir) if (merged_dir.exists()) else None,
                     "metrics": str(run_dir / "metrics.json"), "loss_plot": str(run_dir / "loss.png")},
            tokens={"train_tokens": data.stats["train_tokens"], "tokens_seen": tokens_seen},
            timings={"duration_s": metrics["duration_s"], "train_runtime_s": metrics["train_runtime_s"]},
        )
        manifest.write(run_dir / "manifest.json")
        logger.info("done in %.0f s: %s", metrics["duration_s"], run_dir)
    trainer.accelerator.wait_for_everyone()
    return run_dir


def _at_max_steps(checkpoint: str, max_steps: int) -> bool:
    """Whether a Trainer checkpoint was written at the run's last step (max_steps > 0)."""
    try:
        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    except (OSError, ValueError):
        return False
    return max_steps > 0 and state.global_step >= max_steps


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


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
