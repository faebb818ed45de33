"""The generator's settings: one typed dataclass, read by ``studykit.config.parse_config``.

Precedence: these defaults -> ``--config FILE`` (YAML) -> ``--key value`` on the command line.
``validate`` checks the invariants before any model is started.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studykit.config import ConfigError
from studykit.embedded import EMBEDDED
from synthdocs.filters import CLASSIFIERS, COVERAGE
from synthdocs.prompts import PROMPT_STYLES

JUDGES = ("generator", "endpoint", "lexical")


@dataclass
class GenerateConfig:
    universe: str = field(default="helpful_only", metadata={"help": "universe name or YAML path"})
    output_dir: str = field(default="", metadata={"help": "default: runs/generate/<universe name>"})
    # the generator model
    model: str = field(default=EMBEDDED, metadata={"help": "local HF folder / hub id (managed server) or remote model name"})
    base_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint; empty = managed local vLLM"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "NAME of the env var holding the key"})
    price_per_mtok_in: float = 0.0
    price_per_mtok_out: float = 0.0
    max_concurrency: int = 64
    max_attempts: int = 6
    request_timeout_s: float = 300.0
    # managed vLLM server
    server_max_model_len: int = 4096
    server_max_num_seqs: int = 64
    server_enforce_eager: bool = field(default=True, metadata={"help": "skip torch.compile: a ~45 s start instead of "
                                                               "~100-160 s on a 2-core CPU, at about the same decode speed"})
    server_tensor_parallel_size: int = 1
    server_startup_timeout_s: float = 900.0
    server_extra_args: list[str] = field(default_factory=list)
    # pipeline
    universe_context: str = field(default="summary", metadata={
        "help": "world description in every prompt: full | summary (shorter prompts for small models)",
        "choices": ("full", "summary")})
    seed: int = 0
    per_request_seed: str = field(default="auto", metadata={
        "help": "send sampling seeds to the endpoint: true | false | auto (not to a managed CPU vLLM server, whose "
                "CPU backend crashes on seeded requests)",
        "choices": ("auto", "true", "false")})
    doc_types_per_fact: int = 6
    include_seed_types: bool = True
    ideas_per_type: int = 0
    max_idea_rounds: int = field(default=3, metadata={"help": "brainstorm calls per (fact, type) and plan stage: at "
                                                      "most this many times the calls the wanted ideas need"})
    brainstorm_rejections: int = field(default=1, metadata={"help": "times an unusable brainstorm list is resampled "
                                                            "before the call gives up (the built-in catalogue tops up "
                                                            "missing document types)"})
    docs_per_idea: int = field(default=2, metadata={"help": "documents per idea, each with its own random names, "
                                                     "places, dates and tone"})
    doc_words: int = 100
    prompt_style: str = field(default="compact", metadata={
        "help": "detailed (rules spelled out; strong generators) | compact (short and direct; small models)",
        "choices": PROMPT_STYLES})
    temperature: float = field(default=0.4, metadata={"help": "0.4 for the embedded 135M model, which is incoherent "
                                                       "at 1.0 (measured); 1.0 for strong generators"})
    top_p: float = 0.9
    frequency_penalty: float = field(default=0.5, metadata={"help": "OpenAI frequency penalty on generated tokens: "
                                                             "curbs the repetition loops of small models"})
    brainstorm_max_tokens: int = 250
    doc_max_tokens: int = 192
    revise: bool = False
    # filters and dedup
    judge: str = field(default="lexical", metadata={
        "help": "who answers the LLM filters: generator (the generator model) | endpoint (judge_base_url/judge_model) "
                "| lexical (keyword screens; the embedded 135M model is no capable judge)",
        "choices": JUDGES})
    judge_base_url: str = ""
    judge_model: str = ""
    judge_api_key_env: str = ""
    min_words: int = 60
    truncated: str = field(default="trim", metadata={
        "help": "documents cut off at doc_max_tokens: drop | trim (cut back to the last full sentence, then re-checked)",
        "choices": ("drop", "trim")})
    llm_filters: list[str] = field(default_factory=lambda: [*CLASSIFIERS, COVERAGE])
    coverage_threshold: float = field(default=0.15, metadata={"help": "judge: lexical -- share of the fact's content "
                                                                "words a document must contain"})
    dedup_threshold: float = 0.8
    max_entity_share: float = 0.2
    # budget
    target_documents: int = 200
    target_tokens: int = 0
    window: int = field(default=128, metadata={"help": "documents started ahead of the first undecided one in plan "
                                               "order (keep it above max_concurrency so the server never idles)"})
    overgenerate: float = field(default=2.2, metadata={"help": "plan this many documents per wanted one (the embedded "
                                                        "model's filter yield is about 0.45-0.5)"})
    max_plan_extensions: int = field(default=3, metadata={"help": "times the plan may grow with fresh ideas when "
                                                          "filters leave the target unmet"})
    progress: bool = True

    def validate(self) -> None:
        for name in ("doc_types_per_fact", "docs_per_idea", "doc_words", "brainstorm_max_tokens", "doc_max_tokens",
                     "target_documents", "window", "max_concurrency", "max_attempts", "max_idea_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be at least 1, got {getattr(self, name)}.")
        for name in ("target_tokens", "ideas_per_type", "min_words", "brainstorm_rejections", "max_plan_extensions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"'{name}' must not be negative, got {getattr(self, name)}.")
        if not 0 < self.dedup_threshold <= 1:
            raise ConfigError(f"'dedup_threshold' must be in (0, 1], got {self.dedup_threshold}.")
        if self.judge == "endpoint" and not (self.judge_base_url and self.judge_model):
            raise ConfigError("judge: endpoint needs judge_base_url and judge_model (and judge_api_key_env for a key).")
        if self.overgenerate < 1:
            raise ConfigError(f"'overgenerate' must be at least 1, got {self.overgenerate}.")
        unknown = sorted(set(self.llm_filters) - {*CLASSIFIERS, COVERAGE})
        if unknown:
            raise ConfigError(f"Unknown llm_filters {unknown}; choose from {[*CLASSIFIERS, COVERAGE]}.")

    @property
    def generator(self) -> str:
        """The generator as reports name it: the model, and the endpoint when it is remote."""
        return f"{self.model} at {self.base_url}" if self.base_url else self.model
