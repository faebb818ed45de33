"""Which models are compared and how they are reached.

A model is the base model (``''``), a LoRA adapter folder, or a full model folder (``config.json``
and no ``adapter_config.json``: the output of full fine-tuning). With no ``base_url``, managed
vLLM servers with prefix caching (the long system prompt is computed once per model and
condition and shared by every request) serve them. Adapters are served in one of two ways.
``lora``: one server serves the base model and every LoRA adapter at once (``--lora-modules``).
``merged``: each adapter is merged into the base model in fp32 (cached under
``output_dir/merged/`` by the adapter's fingerprint) and each model is served by its own server
in turn. On a CPU, vLLM's LoRA path decodes about 16 times slower than the plain model
(measured: 7.3 vs 119.5 tokens/s for SmolLM2-135M with two adapters, rank limit 64), so
``auto`` merges there and uses LoRA on a GPU. Merging in fp32 and serving in fp32 keeps the
adapter's small weight updates, which bf16 rounding of the merged weights would blur. A full
model folder always gets a server of its own.

With ``base_url``, the evaluation uses an existing endpoint and each model is a served model
name there; a local adapter or model folder in ``models`` means the endpoint serves that folder
under the model's name (its fingerprint then keys the call cache, so a retrained folder is asked
again).
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

from eval.config import ServingConfig
from studykit.cache import CallCache
from studykit.client import ModelClient
from studykit.config import ConfigError
from studykit.embedded import resolve_model
from studykit.handoff import FinetuneFolder
from studykit.server import ServerSpec, VLLMServer, cuda_available
from studykit.server import send_seeds as server_send_seeds

log = logging.getLogger(__name__)


@dataclass
class ModelTarget:
    name: str            # name in reports
    served: str          # model name sent to the endpoint
    adapter: str = ""    # LoRA adapter folder ('' = base model, a full model folder, or a served name)
    lora_rank: int = 0
    weights: str = ""    # full model folder (full fine-tuning output), served by its own server
    fingerprint: str = ""  # changes when the folder's files change, so retrained weights are not served from cache

    def as_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What the model is, without where its folder lies: a study folder moved or copied elsewhere keeps
        its sample keys and call cache (the fingerprint changes when the folder's files change)."""
        kind = "adapter" if self.adapter else "model folder" if self.weights else "served"
        return {"name": self.name, "served": self.served, "kind": kind, "lora_rank": self.lora_rank,
                "fingerprint": self.fingerprint}


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


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def is_model_folder(path: Path) -> bool:
    """A full Hugging Face model folder (what full fine-tuning writes), not a LoRA adapter."""
    return (path / "config.json").is_file() and not is_adapter(path)


def discover_models(auto: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Complete fine-tuning runs (manifest.json written last) -> {name: adapter or full model folder}, plus notes."""
    found: dict[str, str] = {}
    notes: list[str] = []
    for name, run_dir in auto.items():
        run = FinetuneFolder(Path(run_dir))
        if run.complete() and run.has_adapter():
            found[name] = str(run.adapter)
        elif run.complete() and is_model_folder(run.merged):
            found[name] = str(run.merged)
        elif run.dir.exists():
            notes.append(f"fine-tuning run {run.dir} is incomplete (no manifest.json, adapter or merged model); "
                         f"'{name}' skipped")
        else:
            notes.append(f"no fine-tuning run at {run.dir}; '{name}' not evaluated")
    return found, notes


def local_target(cfg: ServingConfig, name: str, ref: str) -> ModelTarget:
    """A model on the managed server(s): the base model (''), a LoRA adapter or a full model folder."""
    if not ref:
        return ModelTarget(name=name, served=cfg.base_name)
    path = Path(ref)
    run = FinetuneFolder(path)  # a run folder (an RL run's, which a study hands on whole) means its model
    if not is_adapter(path) and not is_model_folder(path) and (run.has_adapter() or is_model_folder(run.merged)):
        path = run.adapter if run.has_adapter() else run.merged
    if is_adapter(path):
        rank = adapter_rank(path)
        if rank > cfg.max_lora_rank:
            raise ConfigError(f"Adapter '{name}' has LoRA rank {rank}, above max_lora_rank={cfg.max_lora_rank}; "
                              f"raise max_lora_rank to at least {rank}.")
        return ModelTarget(name=name, served=name, adapter=str(path.resolve()), lora_rank=rank,
                           fingerprint=folder_fingerprint(path))
    if is_model_folder(path):
        return ModelTarget(name=name, served=name, weights=str(path.resolve()), fingerprint=folder_fingerprint(path))
    what = "does not exist" if not path.exists() else \
        "has neither adapter_config.json (a LoRA adapter) nor config.json (a full model)"
    raise ConfigError(f"Model '{name}' at {path} {what}. Point it at the 'adapter' folder of a finished fine-tuning "
                      "run (runs/finetune/<universe>/adapter), its 'merged' folder after full fine-tuning, a peft "
                      "save_pretrained folder or a Hugging Face model folder; '' is the base model.")


def endpoint_targets(cfg: ServingConfig) -> tuple[list[ModelTarget], list[str]]:
    """Models at an existing endpoint: served names, or local folders the endpoint serves under the model's name."""
    if not cfg.models:
        raise ConfigError("With base_url set, list the models to compare in 'models' (name -> served model name).")
    targets: list[ModelTarget] = []
    notes: list[str] = []
    for name, ref in cfg.models.items():
        path = Path(ref) if ref else None
        if path is None or not (is_adapter(path) or is_model_folder(path)):
            targets.append(ModelTarget(name=name, served=ref or name))
            continue
        folder, adapter = str(path.resolve()), is_adapter(path)
        targets.append(ModelTarget(name=name, served=name, adapter=folder if adapter else "",
                                   lora_rank=adapter_rank(path) if adapter else 0, weights="" if adapter else folder,
                                   fingerprint=folder_fingerprint(path)))
        how = f"--lora-modules {name}={folder}" if adapter else f"--model {folder} --served-model-name {name}"
        notes.append(f"Model '{name}' is the local folder {path}: the endpoint {cfg.base_url} is asked for it under "
                     f"the name '{name}' and must serve that folder under that name (vLLM: {how}).")
    return targets, notes


def resolve_targets(cfg: ServingConfig) -> tuple[list[ModelTarget], list[str]]:
    """The models to compare, with clear errors for missing folders; plus notes for the report."""
    if cfg.base_url:
        return endpoint_targets(cfg)
    models, notes = dict(cfg.models), []
    if not models:
        found, notes = discover_models(cfg.auto_adapters)
        models = {cfg.base_name: "", **found}
        if not found:
            notes.append("no complete fine-tuning run was found: the base model is evaluated alone")
    return [local_target(cfg, name, ref) for name, ref in models.items()], notes


def cache_identity(cfg: ServingConfig, target: ModelTarget) -> str:
    """What names a target's weights in the call cache's keys: the served alias alone is not enough when the
    base model, an adapter or a model folder changes behind the same name."""
    if cfg.base_url:
        return f"{target.served}#{target.fingerprint}" if target.fingerprint else target.served
    if target.weights:
        return f"{target.served}@model-folder:{cfg.dtype}#{target.fingerprint}"
    mode = " merged" if serve_merged(cfg) else ""  # merged weights answer (slightly) differently from LoRA
    lora = "+lora" if target.adapter else ""
    return f"{target.served}@{resolve_model(cfg.base_model)}:{cfg.dtype}{lora}#{target.fingerprint}{mode}"


def serve_merged(cfg: ServingConfig) -> bool:
    """Whether each adapter is merged and served alone (see the module docstring)."""
    if cfg.base_url:
        return False
    return cfg.serve_adapters == "merged" or (cfg.serve_adapters == "auto" and not cuda_available())


def server_groups(cfg: ServingConfig, targets: list[ModelTarget]) -> list[list[ModelTarget]]:
    """The models each server serves, in the order the servers run (one group for an existing endpoint)."""
    if cfg.base_url:
        return [targets]
    if serve_merged(cfg):
        return [[t] for t in targets]
    shared = [t for t in targets if not t.weights]  # the base model and its LoRA adapters
    return ([shared] if shared else []) + [[t] for t in targets if t.weights]


def serves_alone(cfg: ServingConfig, group: list[ModelTarget]) -> bool:
    """Whether this server serves one model of its own (a merged adapter or a full model folder)."""
    return len(group) == 1 and (bool(group[0].weights) or serve_merged(cfg))


def merged_folder(cfg: ServingConfig, target: ModelTarget, out: Path) -> Path:
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


def server_spec(cfg: ServingConfig, targets: list[ModelTarget], out: Path) -> ServerSpec:
    if len(targets) == 1 and targets[0].weights:
        model_dir, served, targets = Path(targets[0].weights), targets[0].served, []
    elif len(targets) == 1 and targets[0].adapter and serve_merged(cfg):
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
def endpoint(cfg: ServingConfig, targets: list[ModelTarget], out: Path) -> Iterator[tuple[str, VLLMServer | None]]:
    """Yield (base_url, server or None): a managed vLLM server for ``targets``, or the configured endpoint."""
    if cfg.base_url:
        yield cfg.base_url, None
        return
    spec = server_spec(cfg, targets, out)
    log_name = f"vllm-server-{targets[0].name}.log" if serves_alone(cfg, targets) else "vllm-server.log"
    with VLLMServer(spec, log_path=out / log_name) as server:
        yield server.base_url, server


def send_seeds(cfg: ServingConfig) -> bool:
    """Per-request seeds for this run (see studykit.server.send_seeds)."""
    return server_send_seeds(cfg.per_request_seed, remote=bool(cfg.base_url))


def target_clients(cfg: ServingConfig, base_url: str, targets: list[ModelTarget], cache: CallCache,
                   seed: int) -> dict[str, ModelClient]:
    """One client per compared model, all keyed into ``cache`` by the model's identity."""
    seeded = send_seeds(cfg)
    return {t.name: ModelClient(base_url, t.served, send_seed=seeded, api_key_env=cfg.api_key_env or None,
                                cache=cache, max_concurrency=cfg.max_concurrency, timeout_s=cfg.request_timeout_s,
                                max_attempts=4, rng_seed=seed, cache_id=cache_identity(cfg, t))
            for t in targets}


def check_served(available: list[str], targets: list[ModelTarget], base_url: str) -> None:
    missing = [t.served for t in targets if t.served not in available]
    if missing:
        raise ConfigError(f"Model(s) {missing} are not served at {base_url}; it serves {available}. "
                          "Fix the names in 'models' (name -> served model name).")
