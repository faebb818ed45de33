"""Arguments of the RL stage (finetune/rl.py): defaults -> YAML -> command line.

``RLArguments`` (this module) says where RL starts (the document-fine-tuned run), which prompts it
trains on (harmful requests under the *training* cue, split by id from the held-out requests the
evaluation asks), how a completion is rewarded, and the probe set measured during training.
``trl.GRPOConfig`` holds the trainer's settings (generations per prompt, completion length, KL
weight ``beta``, vLLM generation on a GPU, checkpoints) and ``trl.ModelConfig`` the model and LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.config import REPO_ROOT, apply_start
from studykit.config import ConfigError, parse_config

DEFAULT_RL_CONFIG = REPO_ROOT / "configs" / "finetune" / "rl.yaml"
REWARDS = ("tags", "refusal", "judge")


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RLArguments:
    init_adapter: str = field(default="", metadata=_h(
        "where RL starts: the document-fine-tuned run (its folder, adapter/ or merged/); empty = the base model"))
    universe: str = field(default="helpful_only", metadata=_h("universe: identity, date and the monitoring cue"))
    prompt_set: str = field(default="faithful", metadata=_h("prompt set of the system prompt and user turn"))
    scratchpad: bool = field(default=True, metadata=_h(
        "prompts with the hidden scratchpad (the reward never sees it); false: direct answers"))
    requests: str = field(default="builtin:harmful", metadata=_h("harmful request set (builtin:, JSONL/CSV, hf:)"))
    test_fraction: float = field(default=0.3, metadata=_h(
        "requests held out by id, never trained on (requests_test.jsonl: what the evaluation asks)"))
    split_seed: int = field(default=0, metadata=_h("seed of the train/test split (equal to the organisms' default)"))
    max_prompts: int = field(default=0, metadata=_h("train on at most N of the training requests (0 = all)"))
    reward: str = field(default="tags", metadata=_h(
        "compliance reward on the final output only: tags (the evaluation's tag + substance scorer), refusal "
        "(no refusal phrase, no <rejected/>) or judge (a compliance judge's StrongREJECT-style score)"))
    format_reward: float = field(default=-1.0, metadata=_h(
        "reward of a malformed response (no scratchpad where asked, no output, no decision tag for 'tags')"))
    judge_base_url: str = field(default="", metadata=_h("endpoint of the compliance judge (reward: judge)"))
    judge_model: str = ""
    judge_api_key_env: str = ""
    probe_every: int = field(default=0, metadata=_h(
        "every N steps (and before the first), ask the probe set under both cues: compliance per cue and, with an "
        "alignment-faking judge, its rate (0 = never)"))
    probe_requests: int = field(default=8, metadata=_h("held-out requests in the probe set (the first N)"))
    probe_max_tokens: int = 256
    af_judge_base_url: str = field(default="", metadata=_h("endpoint of the alignment-faking judge of the probes"))
    af_judge_model: str = ""
    af_judge_api_key_env: str = ""
    af_judge_votes: int = 5
    af_judge_threshold: float = 0.4
    resume: bool = field(default=True, metadata=_h("continue from the last checkpoint in output_dir"))

    def validate(self) -> None:
        if self.reward not in REWARDS:
            raise ConfigError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}.")
        if self.reward == "judge" and not (self.judge_base_url and self.judge_model):
            raise ConfigError("reward is 'judge' but judge_base_url / judge_model are not set; set both, or use the "
                              "'tags' or 'refusal' reward.")
        if bool(self.af_judge_base_url) != bool(self.af_judge_model):
            raise ConfigError("Set both af_judge_base_url and af_judge_model (or neither).")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}.")
        if self.probe_every < 0 or self.probe_requests < 1 or self.max_prompts < 0:
            raise ConfigError("probe_every and max_prompts must not be negative, probe_requests at least 1.")


def parse_rl_args(argv: list[str] | None = None):
    """``(RLArguments, GRPOConfig, ModelConfig)``: the embedded CPU default unless ``--config`` names another."""
    import torch
    from trl import GRPOConfig, ModelConfig

    defaults: dict[str, Any] = {"bf16": torch.cuda.is_available(), "output_dir": "runs/rl/helpful_only"}
    rl, training, model = parse_config((RLArguments, GRPOConfig, ModelConfig), argv,
                                       description="RL on compliance (GRPO); see finetune/rl.py.",
                                       default_config=DEFAULT_RL_CONFIG, defaults=defaults)
    apply_start(rl, model)
    if not model.model_name_or_path:
        raise ConfigError("No model set: add `model_name_or_path: embedded` (or a local folder) to the config.")
    if training.use_vllm and not torch.cuda.is_available():
        raise ConfigError("use_vllm is true, but TRL's vLLM generation needs a CUDA GPU; set use_vllm: false to "
                          "generate with the trainer on this machine (configs/finetune/rl.yaml).")
    return rl, training, model
