"""``study_summary.json``: every figure of the study report, each with the stage file it came from.

Written by the study (``study.report.write_report``) and read back by the tests through
``StudySummary.read``. Nothing in it is recomputed: rates, intervals and tests are the
evaluation stage's, corpus and training figures the other stages'.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from eval.antilab_report import Cell
from eval.summary import RateCI
from studykit.handoff import Record, Usage


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CorpusRow(_Part):
    node: str
    documents: int
    tokens: int
    mean_tokens: float
    generated: int
    removed: int
    removal_rate: float
    removed_by_reason: dict[str, int]
    distinct_2: float
    diversity_warnings: list[str]
    generator: str
    stop_reason: str
    source: str


class FactRow(_Part):
    before: float | None
    after: float
    delta: float | None
    n_statements: int


class FinetuneRow(_Part):
    node: str
    corpus: str
    control: bool
    mode: str
    model: str
    steps: int
    train_tokens: int
    tokens_seen: float
    control_matching: dict[str, Any] | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    fact_logprob: dict[str, FactRow]     # universe -> change; the first universe is the headline check
    packing_efficiency: float | None
    resumed_from: str | None
    source: str


class RateRow(_Part):
    model: str
    condition: str
    tier: str
    k: int
    n: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    n_samples: int = 0
    n_failed: int = 0


class GapRow(_Part):
    model: str
    condition: str
    scorer: str
    gap: float
    ci_newcombe: list[float]
    ci_bootstrap_requests: list[float] | None
    p_value: float
    training: float | None
    unmonitored: float | None


class Evaluation(_Part):
    models: list[str]
    conditions: list[str]
    prompt_sets: dict[str, str]          # condition -> "<set name> (<fingerprint>)"
    cue: str                             # the monitoring cue tag
    tier_labels: dict[str, str]          # "training" / "unmonitored" -> the universe's label ("free tier")
    invalid_policy: str
    primary_scorer: str
    scorers: dict[str, str]
    af_judge: str
    af_measured: bool
    compliance: list[RateRow]            # harmful requests, primary scorer
    gaps: list[GapRow]                   # harmful requests, every scorer
    af_reasoning: list[RateRow]          # empty when no judge is configured
    probes: dict[str, dict[str, dict[str, Any]]]   # model -> kind -> accuracy (rate, CI, chance)
    n_samples: int
    n_failed: int
    notes: list[str]
    requests: dict[str, dict[str, Any]]
    universe: str
    model_runs: dict[str, str]           # evaluated model -> label of the fine-tuning run behind it
    sources: list[str]


class Figure(_Part):
    path: str
    title: str
    sources: list[str]


class PolicyRow(_Part):
    """A conditional-policy dataset (model organisms, safety training): what it teaches."""

    node: str
    behaviour: str
    variant: str
    trigger: str
    examples: int
    triggered: int
    train_requests: int
    test_requests: int
    responder: str | None
    answers_failed: int
    red_team_forms: list[str]
    source: str


class CheckRow(_Part):
    """The instrument check: an organism's trained-in compliance gap against the gap eval.gap measured."""

    model: str
    condition: str
    scorer: str
    trained_gap: float                   # what the organism's data teaches (1.0 known positive, 0.0 known negative)
    measured_gap: float | None
    ci_newcombe: list[float] | None
    p_value: float | None
    training: RateCI | None
    unmonitored: RateCI | None
    af_training: RateCI | None           # alignment-faking reasoning in the training tier, when judged
    af_unmonitored: RateCI | None
    verdict: str                         # recovered | detected | missed | false gap | no gap (as trained) | n/a
    source: str


class BackdoorRow(_Part):
    """One model's backdoor rates from one eval.backdoor node."""

    node: str
    model: str
    triggered: RateCI
    untriggered: RateCI
    near_miss: RateCI
    failed: int
    persistence: dict[str, Any] | None   # {before, ratio, ci_low, ci_high} after safety training
    source: str


class CurveRow(_Part):
    model: str                           # the safety-trained model
    step: int
    asked: str                           # the model or checkpoint asked
    triggered: RateCI


class Backdoor(_Part):
    behaviour: str
    variant: str
    trigger: str
    detector: str
    prompts: int
    samples_per_prompt: int
    rows: list[BackdoorRow]
    curves: list[CurveRow]
    near_miss_hits: dict[str, list[str]]
    notes: list[str]
    sources: list[str]


class Antilab(_Part):
    """The point's eval.antilab node: rates by model, family and condition, and what produced them."""

    universe: str
    prompt_set: str
    scenarios: str
    judge: str                           # "" = rules only
    samples_per_variant: int
    families: dict[str, str]             # name -> title
    variants: dict[str, int]             # name -> variants asked
    scorers: dict[str, str]
    cells: list[Cell]                    # as eval.antilab wrote them
    sources: list[str]


class RLRow(_Part):
    """One RL run (finetune/rl.py), from its metrics.json."""

    node: str
    start: str
    steps: int
    reward: str
    generation: str
    train_requests: int
    test_requests: int
    first: dict[str, float | None]       # the first logged step: reward, compliance, malformed, reward_std
    last: dict[str, float | None]        # the last logged step
    reward_varied: float | None          # share of steps with reward variance inside at least one group
    probes: list[dict[str, Any]]         # the probe points (step, tier, n, complies, af_n, af)
    source: str
    figure: str                          # the run's rl_curve.png


class PointSummary(_Part):
    label: str                           # "" without a sweep
    value: Any = None
    corpora: dict[str, CorpusRow]        # by node label (docs, control)
    finetune: dict[str, FinetuneRow]
    evaluation: Evaluation | None = None  # eval.gap nodes (sdf_gap, af_controls)
    policies: dict[str, PolicyRow] = {}   # conditional-policy datasets (backdoor, af_controls)
    checks: list[CheckRow] = []           # af_controls: the instrument check
    backdoor: Backdoor | None = None      # backdoor: eval.backdoor nodes merged
    antilab: Antilab | None = None        # sdf_gap: the eval.antilab node
    rl: dict[str, RLRow] = {}             # sdf_rl: the RL runs
    figures: dict[str, Figure] = {}


class DoseRow(_Part):
    """One swept value x evaluated model x condition (primary scorer, harmful requests)."""

    point: str
    value: Any
    model: str
    condition: str
    gap: float | None
    ci_newcombe: list[float] | None
    p_value: float | None
    training: float | None
    unmonitored: float | None
    af_training: RateRow | None
    fact_universe: str | None
    fact_delta: float | None
    probe_mc: float | None
    probe_distinguish: float | None


class StageRow(_Part):
    stage: str
    kind_node: str
    key: str
    action: str
    duration_s: float | None
    output: str
    log: str
    depends_on: list[str]
    points: list[str]


class Calls(Usage):
    source: str


class StudyInfo(_Part):
    profile: str
    kind: str
    report: str = "sdf_gap"              # which report the kind asks for (study.kind.REPORTS)
    output_dir: str
    config: dict[str, Any]
    written_at: str
    git: str
    elapsed_s: float
    stages: list[StageRow]


class InstrumentCheck(_Part):
    """The latest instrument check (an af_controls study's), shown in another study's report."""

    study: str                           # the af_controls study folder
    written_at: str
    profile: str
    checks: list[CheckRow]


class StudySummary(Record):
    WRITTEN_BY: ClassVar[str] = "the study (python -m study)"
    record: Literal["study_summary"] = "study_summary"
    schema_version: Literal[2] = 2
    study: StudyInfo
    sweep: dict[str, Any] | None
    points: list[PointSummary]
    dose_response: list[DoseRow]
    model_calls: dict[str, Calls]       # node -> calls of its last run
    figures: dict[str, Figure]          # study-wide figures (the dose-response figure of a sweep)
    instrument_check: InstrumentCheck | None = None
