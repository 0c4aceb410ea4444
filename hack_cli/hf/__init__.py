"""Public Python entry point: run any supported Hugging Face causal LM with a KV method.

    from hack_cli.hf import load_model, make_method, make_cache, generate
    model, tok = load_model("smollm2")                       # or a ModelConfig
    method = make_method("hack", bits=2, partition=64)         # any `quant` config fields
    ids = tok("The quick brown fox", return_tensors="pt")
    out = generate(model, method, ids.input_ids, ids.attention_mask, max_new_tokens=16)

`make_cache(model, method, attention_mask)` gives a transformers `Cache` to pass as `past_key_values=` (or `cache=`)
to `model(...)` / `model.generate(...)` yourself; the model must first go through `prepare_model(model)`.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from hack_cli.hf.attention import NAME, check_supported, register, text_config  # noqa: F401 (re-exported)
from hack_cli.hf.cache import MethodCache
from hack_cli.hf.models import load_model


def make_method(name: str, **fields):
    """A KV method from its name and `quant` fields, validated like the CLI's config."""
    from omegaconf import OmegaConf

    from hack_cli.config import to_typed
    from hack_cli.methods import build_method, quant_schema

    return build_method(to_typed("quant", quant_schema(name), OmegaConf.create({"name": name, **fields})))


def prepare_model(model):
    """Route the model's attention through the KV methods (idempotent)."""
    check_supported(model)
    register()
    model.set_attn_implementation(NAME)
    return model


def make_cache(model, method, attention_mask: Optional[torch.Tensor] = None) -> MethodCache:
    return MethodCache(method, text_config(model).num_hidden_layers, attention_mask)


@torch.no_grad()
def generate(model, method, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
    """Greedy generation with the KV held (and attended) by `method`. Returns (B, T + new) token ids."""
    prepare_model(model)
    cache = {cache_keyword(model): make_cache(model, method, attention_mask)}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, **cache, **kwargs)


def cache_keyword(model) -> str:
    """transformers >= 5.2x names the cache argument `cache`; 5.17 still uses `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


__all__ = ["load_model", "make_method", "prepare_model", "make_cache", "cache_keyword", "generate", "text_config"]
