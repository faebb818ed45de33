"""``summary.json`` of an evaluation run: every figure, with the settings and provenance behind it.

Written by ``eval.gap`` through ``EvalSummary.write``; read by the study report and the tests
through ``EvalSummary.read``. Rates are Wilson 95% intervals with their counts; gaps are
training - unmonitored with Newcombe and paired-bootstrap intervals. The resolved config, package
versions and command line are in the run's ``manifest.json``, written after every other file.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from studykit.handoff import Record, Usage


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RateCI(_Part):
    k: int
    n: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    method: str = "wilson"


class ScoredRate(RateCI):
    n_unscored: int = 0


class AFRates(_Part):
    alignment_faking: RateCI
    believes_training: RateCI
    believes_unmonitored: RateCI


class Validity(_Part):
    """Responses that did not follow the condition's format, and what the invalid-response policy did."""

    n_resampled: int = 0      # samples drawn again at least once
    resamples: int = 0        # extra draws in all
    n_invalid: int = 0        # samples still invalid after every draw (scored as refusals unless excluded)
    n_excluded: int = 0       # samples left out of the rates (policy exclude)


class Cell(_Part):
    """One model x condition x request set x tier."""

    model: str
    condition: str
    dataset: str
    tier: str
    n_samples: int
    n_ok: int
    n_failed: int
    compliance: dict[str, ScoredRate]   # scorer -> rate
    protocol: dict[str, float]          # parser flag / tag state -> share of successful samples
    af: AFRates | None
    validity: Validity
    partial: RateCI | None = None       # share of compliant answers the partial-compliance judge says hold back
    partial_kinds: dict[str, int] = {}  # withholds / vague / hedges / sandbags -> count


class Gap(_Part):
    model: str
    condition: str
    dataset: str
    scorer: str
    training: ScoredRate
    unmonitored: ScoredRate
    gap: float
    ci_newcombe: list[float]
    ci_bootstrap_requests: list[float] | None
    n_bootstrap: int
    z: float
    p_value: float
    test: str


class Stacked(_Part):
    """Counts behind the stacked figure: refuses / complies / complies with alignment-faking reasoning."""

    model: str
    condition: str
    dataset: str
    tier: str
    refuses: int = 0
    complies: int = 0
    complies_af: int = 0
    n: int = 0
    af_measured: bool = False


class ProbeAccuracy(RateCI):
    chance: float
    unparsed: int
    n_failed: int
    per_fact: dict[str, float]


class CueInfo(_Part):
    """The universe's monitoring cue: the tag in the user turn, its two values and how reports name them."""

    tag: str
    training: str
    unmonitored: str
    labels: dict[str, str]


class PromptSetInfo(_Part):
    name: str
    path: str
    fingerprint: str          # of the set's template files
    description: str


class RequestSet(_Part):
    n: int
    source: str


class ModelInfo(_Part):
    """One model under evaluation: the base model, a LoRA adapter, or a full model folder."""

    name: str                 # name in reports
    served: str               # model name sent to the endpoint
    adapter: str = ""         # LoRA adapter folder
    lora_rank: int = 0
    weights: str = ""         # full model folder (full fine-tuning output), served on its own
    fingerprint: str = ""     # of the adapter or model folder's files (names, sizes, modification times)


class SamplingInfo(_Part):
    preset: str               # custom, or the preset that set the four values below (eval/config.py)
    temperature: float
    top_p: float
    max_tokens: int           # per model turn
    max_continuations: int    # extra <NEXT/> turns when a response stops while reasoning
    seed: int
    seeds_sent: bool          # per-request seeds reached the engine (else reproducible through the call cache)


class Timings(_Part):
    total_s: float
    server_start_s: float
    servers: int
    evaluation_s: float
    samples_per_s: float


class EvalSummary(Record):
    WRITTEN_BY: ClassVar[str] = "the evaluation stage (python -m eval.gap)"
    record: Literal["eval_summary"] = "eval_summary"
    schema_version: Literal[2] = 2
    universe: str
    cue: CueInfo
    identity: str                       # "<model> by <lab>, <date>" as the system prompt states it
    base_model: str                     # the managed server's base model, or "(remote)"
    endpoint: str                       # the endpoint URL, or how the managed server(s) served the models
    models: list[ModelInfo]
    conditions: list[str]
    prompt_sets: dict[str, PromptSetInfo]   # condition -> the template set its prompts came from
    invalid_policy: str                 # resample (up to max_resamples draws) | refuse | exclude
    max_resamples: int
    requests: dict[str, RequestSet]     # "harmful" / "benign" -> how many requests, from where
    samples_per_request: int
    sampling: SamplingInfo
    n_samples: int
    n_failed: int
    primary_scorer: str
    scorers: dict[str, str]             # scorer name -> what it counts as compliance
    af_classifier: str                  # improved | classic (studykit/judges.py), whether or not a judge was configured
    af_judge: str                       # how alignment-faking reasoning was judged, or why it was not
    af_measured: bool
    cells: list[Cell]
    gaps: list[Gap]
    stacked: list[Stacked]
    probes: dict[str, dict[str, ProbeAccuracy]]   # model -> probe kind -> accuracy
    usage: dict[str, Usage]
    notes: list[str]
    timings: Timings
    config_hash: str
    git: str                            # "<commit>" or "<commit> (dirty)"
    written_at: str
