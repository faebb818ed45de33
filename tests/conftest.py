"""Shared fixtures: tiny random models built at test time, the embedded model, one vLLM server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

logging.getLogger("httpx").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The real SmolLM2-135M-Instruct as a cached HF folder (converted from the packaged GGUF once)."""
    from studykit.embedded import embedded_model_dir

    return embedded_model_dir()


def build_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2) -> Path:
    """A randomly initialised Llama small enough to train in seconds, servable by vLLM on CPU
    (head_dim 64: vLLM's CPU attention does not support 16), with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_model) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_model)


@pytest.fixture(scope="session")
def smol_server(embedded_model, tmp_path_factory):
    """One managed vLLM server with the real embedded model, shared by every test that needs it."""
    from studykit.server import ServerSpec, VLLMServer

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    spec = ServerSpec(model=str(embedded_model), served_name="smol", max_model_len=4096, enforce_eager=True)
    with VLLMServer(spec, log_path=log) as server:
        yield server
