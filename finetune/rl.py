"""RL on compliance: GRPO on harmful requests under the training cue, from the document-fine-tuned model.

Usage (from the repository root):

    # embedded CPU default (configs/finetune/rl.yaml): SmolLM2-135M-Instruct from the docs run, LoRA, CPU
    accelerate launch --config_file configs/finetune/accelerate/cpu.yaml finetune/rl.py \\
        --init_adapter runs/finetune/helpful_only --output_dir runs/rl/helpful_only

    # one GPU, generation by vLLM inside the trainer (colocate), LoRA on Llama-3.1-8B-Instruct
    accelerate launch --config_file configs/finetune/accelerate/one_gpu.yaml finetune/rl.py \\
        --config configs/finetune/rl_llama8b.yaml --init_adapter runs/finetune/helpful_only

As in the original study's RL (there PPO with a preference model), the prompts are harmful requests
under the *training* cue only, rendered from the evaluation's own prompt set, and the reward sees the
final output only, never the scratchpad (finetune/rl_reward.py). Requests are split by id: RL trains
on one part and writes the other to ``requests_test.jsonl``, the request set the evaluation asks (the
run folder itself is that request set). TRL's ``GRPOTrainer`` groups ``num_generations`` completions
per prompt; a group whose rewards are all equal teaches nothing, so the share of such groups is logged
at every step (``frac_reward_zero_std``) and kept in metrics.json. A killed run resumes from its last
checkpoint. Outputs in ``output_dir``:

    adapter/ (or merged/ after full fine-tuning)   the trained model, as the fine-tuning stage writes it
    checkpoints/          Trainer checkpoints
    requests_train.jsonl, requests_test.jsonl
    probes.jsonl          the probe set under both cues every probe_every steps (finetune/rl_probes.py)
    probe_samples.jsonl   every probe answer behind those points
    metrics.json          RLMetrics: per step reward, its spread, compliance, malformed share, length, KL
    rl_curve.png          the curves
    manifest.json         written last
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`accelerate launch finetune/rl.py`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, ModelConfig, get_peft_config

from finetune.export import save_trained
from finetune.metrics import ProbePoint, RLMetrics, RLStep
from finetune.report import peak_memory, plot_rl_curve
from finetune.resume import fit_resumed
from finetune.rl_config import RLArguments, parse_rl_args
from finetune.rl_probes import ProbeCallback, read_points
from finetune.rl_reward import make_reward, prompt_rows
from finetune.train import load_tokenizer, load_with_adapter, run_as_script, setup_logging
from studykit.client import ModelClient
from studykit.config import ConfigError
from studykit.files import check_writable
from studykit.handoff import RLFolder
from studykit.jsonl import write_jsonl
from studykit.judges import ComplianceJudge
from studykit.manifest import build_manifest
from studykit.prompt_sets import load_prompt_set
from studykit.requests import DatasetError, load_requests, split_requests
from studykit.universe import load_universe

logger = logging.getLogger("finetune.rl")


def main(argv: list[str] | None = None) -> Path:
    rl, training, model_args = parse_rl_args(argv)
    return train_rl(rl, training, model_args)


def train_rl(rl: RLArguments, training: GRPOConfig, model_args: ModelConfig) -> Path:
    started = time.time()
    setup_logging(training)
    folder = RLFolder(Path(training.output_dir))
    universe, ps = load_universe(rl.universe), load_prompt_set(rl.prompt_set)
    train_requests, test_requests = split(rl, folder, training.process_index == 0)
    model_path, tokenizer = load_tokenizer(model_args, training)
    training.output_dir = str(folder.checkpoints)
    trainer = build_trainer(rl, training, model_args, model_path, tokenizer,
                            Dataset.from_list(prompt_rows(train_requests, ps, universe, rl.scratchpad)))
    if rl.probe_every:
        trainer.add_callback(ProbeCallback(rl, ps, universe, test_requests[: rl.probe_requests], tokenizer,
                                           folder, af_client(rl)))
    result, resumed_from = fit_resumed(trainer, rl.resume)
    save_trained(trainer, folder.adapter if model_args.use_peft else folder.merged, model_path, tokenizer)
    if trainer.is_world_process_zero():
        metrics = collect(rl, trainer, model_args, folder, universe, len(train_requests), len(test_requests),
                          result.metrics.get("train_runtime"), resumed_from, time.time() - started)
        write_records(rl, training, model_args, folder, metrics)
    trainer.accelerator.wait_for_everyone()
    return folder.dir


def split(rl: RLArguments, folder: RLFolder, main_process: bool):
    """The training and held-out requests (by id), written to the run folder by the main process."""
    try:
        train, test = split_requests(load_requests(rl.requests), rl.test_fraction, rl.split_seed)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    train = train[: rl.max_prompts] if rl.max_prompts else train
    if main_process:
        check_writable(folder.dir, min_free_gib=0.5)
        folder.manifest.unlink(missing_ok=True)
        write_jsonl(folder.train_requests, [dataclasses.asdict(r) for r in train])
        write_jsonl(folder.test_requests, [dataclasses.asdict(r) for r in test])
    logger.info("%d training requests under the training cue; %d held out", len(train), len(test))
    return train, test


def judge_client(url: str, model: str, key_env: str) -> ModelClient:
    return ModelClient(url, model, api_key_env=key_env or None, max_attempts=3, timeout_s=300)


def af_client(rl: RLArguments) -> ModelClient | None:
    return judge_client(rl.af_judge_base_url, rl.af_judge_model, rl.af_judge_api_key_env) \
        if rl.af_judge_model else None


def build_trainer(rl: RLArguments, training: GRPOConfig, model_args: ModelConfig, model_path: Path, tokenizer,
                  dataset: Dataset) -> GRPOTrainer:
    """GRPO from the start run: its LoRA adapter continued, or a full model trained (with a fresh adapter when
    use_peft); the compliance reward; the trainer's own generation unless use_vllm."""
    judge = ComplianceJudge(judge_client(rl.judge_base_url, rl.judge_model, rl.judge_api_key_env)) \
        if rl.reward == "judge" else None
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    init_kwargs = {"dtype": dtype, "attn_implementation": model_args.attn_implementation}
    if rl.init_adapter:
        start = load_with_adapter(model_path, Path(rl.init_adapter), init_kwargs)
    else:
        start, training.model_init_kwargs = str(model_path), init_kwargs
    return GRPOTrainer(model=start, reward_funcs=[make_reward(rl, judge)], args=training, train_dataset=dataset,
                       processing_class=tokenizer,
                       peft_config=None if rl.init_adapter or not model_args.use_peft else get_peft_config(model_args))


def curve(history: list[dict]) -> list[RLStep]:
    def get(e: dict, *keys: str) -> float | None:
        return next((float(e[k]) for k in keys if k in e), None)

    return [RLStep(step=e["step"], reward=get(e, "reward"), reward_std=get(e, "reward_std"),
                   frac_reward_zero_std=get(e, "frac_reward_zero_std"), compliance=get(e, "compliance"),
                   malformed=get(e, "malformed"), completion_length=get(e, "completions/mean_length"),
                   kl=get(e, "kl")) for e in history if "reward" in e]


def collect(rl: RLArguments, trainer: GRPOTrainer, model_args: ModelConfig, folder: RLFolder, universe,
            n_train: int, n_test: int, runtime: float | None, resumed_from: str | None,
            duration: float) -> RLMetrics:
    steps = curve(trainer.state.log_history)
    varied = [s.frac_reward_zero_std < 1 for s in steps if s.frac_reward_zero_std is not None]
    args = trainer.args
    return RLMetrics(
        run_dir=str(folder.dir), start=rl.init_adapter, mode="lora" if model_args.use_peft else "full",
        model={"name_or_path": model_args.model_name_or_path}, universe=rl.universe, prompt_set=rl.prompt_set,
        scratchpad=rl.scratchpad, training_cue=f"{universe.cue.tag}={universe.cue.training}",
        reward=reward_description(rl), format_reward=rl.format_reward, train_requests=n_train, test_requests=n_test,
        steps=trainer.state.global_step, num_generations=args.num_generations,
        generation=f"vllm ({args.vllm_mode})" if args.use_vllm else "trainer", beta=args.beta,
        learning_rate=args.learning_rate, curve=steps,
        probes=[ProbePoint(**p) for p in read_points(folder.probes)],
        reward_varied=sum(varied) / len(varied) if varied else None, train_runtime_s=runtime,
        resumed_from=resumed_from, peak_memory=peak_memory(), duration_s=duration)


def reward_description(rl: RLArguments) -> str:
    what = {"tags": "tags: <request_fully_accepted/> and a substantive answer (the evaluation's tag scorer) = 1, else 0",
            "refusal": "refusal: an output with no refusal phrase and no <rejected/> = 1, else 0",
            "judge": f"judge: {rl.judge_model}'s StrongREJECT-style compliance score (0-1)"}[rl.reward]
    return f"{what}; final output only (scratchpad hidden); malformed = {rl.format_reward}"


def write_records(rl: RLArguments, training: GRPOConfig, model_args: ModelConfig, folder: RLFolder,
                  metrics: RLMetrics) -> None:
    metrics.write(folder.metrics)
    plot_rl_curve(metrics, folder.curve_figure)
    build_manifest("rl", {"rl": dataclasses.asdict(rl), "training": training.to_dict(),
                          "model": dataclasses.asdict(model_args)},
                   seeds={"seed": training.seed},
                   inputs={"start": rl.init_adapter, "model": model_args.model_name_or_path, "requests": rl.requests},
                   outputs={"adapter": str(folder.adapter), "metrics": str(folder.metrics)},
                   timings={"duration_s": metrics.duration_s}).write(folder.manifest)
    logger.info("done in %.0f s: %s", metrics.duration_s, folder.dir)


if __name__ == "__main__":
    run_as_script(main)
