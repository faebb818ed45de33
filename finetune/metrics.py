"""``metrics.json`` of a fine-tuning run: losses, fact log-probabilities, tokens, packing, memory.

Written by ``finetune/train.py`` through ``FinetuneMetrics.write`` (main process only); read by
the study report and the tests through ``FinetuneMetrics.read``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from studykit.handoff import Record


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Loss(_Part):
    before: float | None
    after: float | None
    delta: float | None


class FactLogprob(_Part):
    """Mean log-probability per token of a universe's held-out fact statements (higher = more believed)."""

    after: float
    n_statements: int
    before: float | None = None
    delta: float | None = None
    rose: bool | None = None
    per_fact: dict[str, dict[str, float]]


class Packing(_Part):
    """The rows of the training split as the trainer sees them (finetune.packing.packing_stats)."""

    sequences: int
    tokens: int
    packed: bool
    max_length: int | None
    strategy: str | None = None              # stream | bfd | bfd_split | wrapped; None when not packed
    sequence_length: int | None = None       # the longest row
    packing_efficiency: float | None = None  # tokens / (sequences x sequence_length)
    documents_per_sequence: float | None = None
    documents_split: int | None = None       # document pieces beyond one per document
    layout: str | None = None                # rows | flat
    attn_implementation: str | None = None


class DataStats(_Part):
    """How the training split was built (finetune.data.prepare_training_data)."""

    corpus: dict[str, Any]
    documents: dict[str, int]
    corpus_train_tokens: int      # the corpus's training split, before the token budget or control matching
    heldout_tokens: int
    max_train_tokens: int         # the token budget setting (0 = all)
    document_train_tokens: int    # documents trained on, after the budget or control matching
    train_tokens: int             # everything trained on, retain chats included
    control_matching: dict[str, Any] | None = None
    retain: dict[str, Any] | None = None
    assistant_token_fraction: float | None = None  # chats: the share of training tokens with a label


class CurvePoint(_Part):
    step: int
    loss: float
    tokens_seen: float | None = None
    learning_rate: float | None = None


class LossCurve(_Part):
    train: list[CurvePoint]
    eval: list[CurvePoint]


class FinetuneMetrics(Record):
    WRITTEN_BY: ClassVar[str] = "the fine-tuning stage (accelerate launch finetune/train.py)"
    record: Literal["finetune_metrics"] = "finetune_metrics"
    schema_version: Literal[1] = 1
    run_dir: str
    corpus: str
    control: bool
    mode: Literal["lora", "full"]
    model: dict[str, str]
    processes: int
    effective_batch_size: int
    eval_loss: Loss
    fact_logprob: dict[str, FactLogprob]
    tokens_seen: float
    steps: int
    epochs: float | None
    tokens_per_second: float | None
    padding_fraction: float | None
    packing: Packing
    data: DataStats
    train_runtime_s: float | None        # training time of every process that trained the run (resumes summed)
    train_loss: float | None
    resumed_from: str | None
    peak_memory: dict[str, float]
    loss_curve: LossCurve
    duration_s: float


class RLStep(_Part):
    """One logged GRPO step (means over the step's completions)."""

    step: int
    reward: float | None
    reward_std: float | None
    frac_reward_zero_std: float | None  # share of prompt groups whose completions all got the same reward
    compliance: float | None
    malformed: float | None
    completion_length: float | None
    kl: float | None = None


class ProbePoint(_Part):
    """The probe set at one step under one cue (finetune/rl_probes.py)."""

    step: int
    tier: str
    n: int
    complies: int
    malformed: int
    af_n: int                            # answers the alignment-faking judge scored (0 without a judge)
    af: int


class RLMetrics(Record):
    WRITTEN_BY: ClassVar[str] = "the RL stage (accelerate launch finetune/rl.py)"
    record: Literal["rl_metrics"] = "rl_metrics"
    schema_version: Literal[1] = 1
    run_dir: str
    start: str                           # the run RL started from ('' = the base model)
    model: dict[str, str]
    mode: Literal["lora", "full"]
    universe: str
    prompt_set: str
    scratchpad: bool
    training_cue: str                    # the cue value every RL prompt carried
    reward: str                          # what the reward measures
    format_reward: float
    train_requests: int
    test_requests: int
    steps: int
    num_generations: int
    generation: str                      # trainer | vllm (colocate / server)
    beta: float
    learning_rate: float
    curve: list[RLStep]
    probes: list[ProbePoint]
    reward_varied: float | None          # share of steps with a reward difference inside at least one group
    train_runtime_s: float | None        # training time of every process that trained the run (resumes summed)
    resumed_from: str | None
    peak_memory: dict[str, float]
    duration_s: float
