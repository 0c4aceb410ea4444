"""Exact bytes of one request's KV: a one-layer store of the method holding L random tokens, exported as the
serving pipeline exports it (each store's `export_seq`), times the number of layers. No model, CPU only.

HACK's bytes are not linear in L (16-bit sinks and a 16-bit open block of up to Π−1 tokens ride along), so the
profile's bytes at a few lengths cannot be interpolated exactly. They are affine in L over every residue class
modulo a period that every partition size divides (closed blocks add a fixed number of bytes each): so a long
sequence's bytes come from two short stores, b(L) = b(r) + k·(b(r + PERIOD) − b(r)) with L = r + k·PERIOD.
Methods whose size depends on the values
(entropy-coded CacheGen) or on calibration data (KVQuant) are not built here: for them the simulator interpolates
the profile's measured bytes.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional

EXACT = ("fp16", "fp8", "kivi", "hack")
PERIOD = 128  # a multiple of every partition / group size (32, 64, 128)
BASE = 256  # past the sinks and KIVI's 16-bit residual window: from here on the bytes are periodic-affine


@lru_cache(maxsize=8192)
def _layer_bytes(quant_json: str, kv_heads: int, head_dim: int, dtype: str, tokens: int) -> tuple[int, int]:
    """(payload, stored) bytes of one layer holding `tokens` tokens of one sequence."""
    import torch

    from hack_cli.methods import build_method, quant_schema

    fields = json.loads(quant_json)
    method = build_method(quant_schema(fields["name"])(**fields))
    store = method.new_layer(0, 1, 1, kv_heads, head_dim, "cpu", getattr(torch, dtype))
    g = torch.Generator().manual_seed(tokens)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=g) for _ in "kv")  # (1, H, T, D)
    store.append(k, v)
    payload = sum(t.nbytes for t in store.export_seq(0).values())
    return payload, store.stored_bytes().total


def exact_bytes(quant: dict, layers: int, kv_heads: int, head_dim: int, dtype: str, tokens: int
                ) -> Optional[tuple[int, int]]:
    """(payload, stored) bytes of a `tokens`-token sequence over all layers, or None for a method not built here."""
    if quant.get("name") not in EXACT:
        return None
    key = (json.dumps(quant, sort_keys=True), kv_heads, head_dim, dtype)
    if tokens < BASE + PERIOD:
        one = _layer_bytes(*key, tokens)
    else:
        r = BASE + (tokens - BASE) % PERIOD
        k = (tokens - r) // PERIOD
        b0, b1 = _layer_bytes(*key, r), _layer_bytes(*key, r + PERIOD)
        one = tuple(x0 + k * (x1 - x0) for x0, x1 in zip(b0, b1))
    return layers * one[0], layers * one[1]
