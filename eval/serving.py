"""Which models are compared and how they are reached.

With no ``base_url``, a managed vLLM server with prefix caching (the long system prompt is
computed once per model and condition and shared by every request) serves the models in one
of two ways. ``lora``: one server serves the base model and every LoRA adapter at once
(``--lora-modules``). ``merged``: each adapter is merged into the base model in fp32 (cached
under ``output_dir/merged/`` by the adapter's fingerprint) and each model is served by its
own server in turn. On a CPU, vLLM's LoRA path decodes about 16 times slower than the plain
model (measured: 7.3 vs 119.5 tokens/s for SmolLM2-135M with two adapters, rank limit 64),
so ``auto`` merges there and uses LoRA on a GPU. Merging in fp32 and serving in fp32 keeps
the adapter's small weight updates, which bf16 rounding of the merged weights would blur.
With ``base_url``, the evaluation uses an existing endpoint and each model is a served model
name there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from eval.config import EvalConfig
from studykit.client import ModelClient
from studykit.config import ConfigError
from studykit.embedded import resolve_model
from studykit.server import ServerSpec, VLLMServer, cuda_available
from studykit.server import send_seeds as server_send_seeds

log = logging.getLogger(__name__)


@dataclass
class ModelTarget:
    name: str            # name in reports
    served: str          # model name sent to the endpoint
    adapter: str = ""    # LoRA adapter folder ('' = base model or remote endpoint)
    lora_rank: int = 0
    fingerprint: str = ""  # changes when the adapter's files change, so a retrained adapter is not served from cache

    def as_dict(self) -> dict:
        return asdict(self)


def folder_fingerprint(path: Path) -> str:
    """Hash of the names, sizes and modification times of the files in an adapter folder."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def adapter_rank(path: Path) -> int:
    try:
        return int(json.loads((path / "adapter_config.json").read_text()).get("r") or 0)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read {path / 'adapter_config.json'}: {exc}.") from None


def discover_adapters(auto: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Complete fine-tuning runs (manifest.json written last) -> {name: adapter folder}, plus notes."""
    found: dict[str, str] = {}
    notes: list[str] = []
    for name, run_dir in auto.items():
        run = Path(run_dir)
        adapter = run / "adapter"
        if (run / "manifest.json").is_file() and (adapter / "adapter_config.json").is_file():
            found[name] = str(adapter)
        elif run.exists():
            notes.append(f"fine-tuning run {run} is incomplete (no manifest.json or adapter); '{name}' skipped")
        else:
            notes.append(f"no fine-tuned adapter at {adapter}; '{name}' not evaluated")
    return found, notes


def resolve_targets(cfg: EvalConfig) -> tuple[list[ModelTarget], list[str]]:
    """The models to compare, with clear errors for missing adapters; plus notes for the report."""
    notes: list[str] = []
    if cfg.base_url:
        if not cfg.models:
            raise ConfigError("With base_url set, list the models to compare in 'models' (name -> served model name).")
        return [ModelTarget(name=n, served=s or n) for n, s in cfg.models.items()], notes
    models = dict(cfg.models)
    if not models:
        found, notes = discover_adapters(cfg.auto_adapters)
        models = {cfg.base_name: "", **found}
        if not found:
            notes.append("no complete fine-tuned adapter was found: the base model is evaluated alone")
    targets = []
    for name, adapter in models.items():
        if not adapter:
            targets.append(ModelTarget(name=name, served=cfg.base_name))
            continue
        path = Path(adapter)
        if not (path / "adapter_config.json").is_file():
            what = "does not exist" if not path.exists() else "has no adapter_config.json"
            raise ConfigError(f"Adapter for model '{name}' at {path} {what}. Point it at the 'adapter' folder of a "
                              "finished fine-tuning run (runs/finetune/<universe>/adapter) or a peft save_pretrained "
                              "folder.")
        rank = adapter_rank(path)
        if rank > cfg.max_lora_rank:
            raise ConfigError(f"Adapter '{name}' has LoRA rank {rank}, above max_lora_rank={cfg.max_lora_rank}; "
                              f"raise max_lora_rank to at least {rank}.")
        targets.append(ModelTarget(name=name, served=name, adapter=str(path.resolve()), lora_rank=rank,
                                   fingerprint=folder_fingerprint(path)))
    return targets, notes


def serve_merged(cfg: EvalConfig) -> bool:
    """Whether each adapter is merged and served alone (see the module docstring)."""
    if cfg.base_url:
        return False
    return cfg.serve_adapters == "merged" or (cfg.serve_adapters == "auto" and not cuda_available())


def server_groups(cfg: EvalConfig, targets: list[ModelTarget]) -> list[list[ModelTarget]]:
    """The models each server serves, in the order the servers run."""
    return [[t] for t in targets] if serve_merged(cfg) else [targets]


def merged_folder(cfg: EvalConfig, target: ModelTarget, out: Path) -> Path:
    """The target's adapter merged into the base model in fp32; reused while the adapter is unchanged."""
    import torch
    from transformers import AutoTokenizer

    from studykit.merge import merge_adapter

    folder = out / "merged" / f"{target.name}-{target.fingerprint}"
    if (folder / "config.json").is_file():  # merge_adapter renames a finished folder into place
        return folder
    base_dir = resolve_model(cfg.base_model)
    adapter = Path(target.adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base_dir)
    merge_adapter(base_dir, adapter, folder, torch.float32, tokenizer)
    for stale in folder.parent.glob(f"{target.name}-*"):  # earlier versions of this adapter
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def server_spec(cfg: EvalConfig, targets: list[ModelTarget], out: Path) -> ServerSpec:
    if len(targets) == 1 and targets[0].adapter and serve_merged(cfg):
        target = targets[0]
        model_dir, served, targets = merged_folder(cfg, target, out), target.served, []
    else:
        model_dir, served = resolve_model(cfg.base_model), cfg.base_name
    return ServerSpec(
        model=str(model_dir), served_name=served,
        lora_modules={t.name: t.adapter for t in targets if t.adapter},
        max_lora_rank=cfg.max_lora_rank, max_loras=cfg.max_loras, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs, tensor_parallel_size=cfg.tensor_parallel_size,
        data_parallel_size=cfg.data_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        seed=cfg.seed, enforce_eager=cfg.enforce_eager, extra_args=list(cfg.server_extra_args),
        startup_timeout_s=cfg.startup_timeout_s,
    )


@contextlib.contextmanager
def endpoint(cfg: EvalConfig, targets: list[ModelTarget], out: Path) -> Iterator[tuple[str, VLLMServer | None]]:
    """Yield (base_url, server or None): a managed vLLM server for ``targets``, or the configured endpoint."""
    if cfg.base_url:
        yield cfg.base_url, None
        return
    spec = server_spec(cfg, targets, out)
    log_name = f"vllm-server-{targets[0].name}.log" if serve_merged(cfg) else "vllm-server.log"
    with VLLMServer(spec, log_path=out / log_name) as server:
        yield server.base_url, server


def send_seeds(cfg: EvalConfig) -> bool:
    """Per-request seeds for this run (see studykit.server.send_seeds)."""
    return server_send_seeds(cfg.per_request_seed, remote=bool(cfg.base_url))


def model_client(cfg: EvalConfig, base_url: str, served: str, seeded: bool, **kwargs) -> ModelClient:
    return ModelClient(base_url, served, send_seed=seeded, **kwargs)


def check_served(available: list[str], targets: list[ModelTarget], base_url: str) -> None:
    missing = [t.served for t in targets if t.served not in available]
    if missing:
        raise ConfigError(f"Model(s) {missing} are not served at {base_url}; it serves {available}. "
                          "Fix the names in 'models' (name -> served model name).")
