"""Exact bytes of one request's KV: a one-layer store of the method holding L random tokens, exported as the
serving pipeline exports it (each store's `export_seq`), times the number of layers. No model, CPU only.

HACK's bytes are not linear in L (16-bit sinks and a 16-bit open block of up to Π−1 tokens ride along), so the
profile's bytes at a few lengths cannot be interpolated exactly. Past BASE tokens they are periodic-affine in L
with a period every partition size divides (each period closes the same whole blocks, adding the same bytes):
b(BASE + r + k·PERIOD) = b(BASE + r) + k·(b(BASE + PERIOD) − b(BASE)), from one short store grown a token at a
time.
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


def _store(quant_json: str, kv_heads: int, head_dim: int, dtype: str, tokens: int):
    """A one-layer store of the method holding `tokens` random tokens of one sequence."""
    import torch

    from hack_cli.methods import build_method, quant_schema

    fields = json.loads(quant_json)
    method = build_method(quant_schema(fields["name"])(**fields))
    store = method.new_layer(0, 1, 1, kv_heads, head_dim, "cpu", getattr(torch, dtype))
    g = torch.Generator().manual_seed(tokens)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=g) for _ in "kv")  # (1, H, T, D)
    store.append(k, v)
    return store


def _measure(store) -> tuple[int, int]:
    """(payload, stored) bytes of the store's sequence."""
    return sum(t.nbytes for t in store.export_seq(0).values()), store.stored_bytes().total


@lru_cache(maxsize=8192)
def _layer_bytes(quant_json: str, kv_heads: int, head_dim: int, dtype: str, tokens: int) -> tuple[int, int]:
    """(payload, stored) bytes of one layer holding `tokens` tokens of one sequence."""
    return _measure(_store(quant_json, kv_heads, head_dim, dtype, tokens))


@lru_cache(maxsize=256)
def _period_table(quant_json: str, kv_heads: int, head_dim: int, dtype: str) -> list[tuple[int, int]]:
    """Bytes of one layer at BASE, BASE + 1, ..., BASE + PERIOD tokens: one store grown a token at a time, as
    decoding grows it (the layout, hence the bytes, is the same as appending the tokens at once)."""
    import torch

    store = _store(quant_json, kv_heads, head_dim, dtype, BASE)
    table = [_measure(store)]
    g = torch.Generator().manual_seed(1)
    for _ in range(PERIOD):
        k, v = (torch.randn(1, kv_heads, 1, head_dim, generator=g) for _ in "kv")  # (1, H, 1, D)
        store.append(k, v)
        table.append(_measure(store))
    return table


def exact_bytes(quant: dict, layers: int, kv_heads: int, head_dim: int, dtype: str, tokens: int
                ) -> Optional[tuple[int, int]]:
    """(payload, stored) bytes of a `tokens`-token sequence over all layers, or None for a method not built here."""
    if quant.get("name") not in EXACT:
        return None
    key = (json.dumps(quant, sort_keys=True), kv_heads, head_dim, dtype)
    if tokens < BASE:
        one = _layer_bytes(*key, tokens)
    else:
        table = _period_table(*key)
        r, k = (tokens - BASE) % PERIOD, (tokens - BASE) // PERIOD
        one = tuple(x + k * (end - start) for x, start, end in zip(table[r], table[0], table[PERIOD]))
    return layers * one[0], layers * one[1]
