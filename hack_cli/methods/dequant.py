"""Attention by dequantizing first: the path the baselines (KIVI, KVQuant, CacheGen, FP8) pay in the paper.

Each baseline materializes its stored KV as 16-bit K/V for the whole batch, then runs ordinary SDPA over it. This
module is that second half, shared so every baseline's reference is the same function of its dequantized tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hack_cli.methods.base import key_mask
from hack_cli.methods.hack.quantizer import unpack


def sdpa_over(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor, key_ok: torch.Tensor,
              q_pos: torch.Tensor, scaling: float, window: Optional[int]) -> torch.Tensor:
    """q: (B, Hq, Tq, D); k, v: (B, H, N, D) materialized 16-bit K/V; key_pos, key_ok: (B, N) each key's position
    in its sequence and whether the slot holds a real token; q_pos: (B, Tq). Causal, GQA -> (B, Hq, Tq, D)."""
    ok = key_mask(key_pos, key_ok, q_pos, window).to(q.device)  # (B, 1, Tq, N)
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=ok, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~ok.any(-1, keepdim=True), 0.0)  # padding queries see nothing


def grow(t: torch.Tensor, need: int, dim: int = 2) -> torch.Tensor:
    """`t` with at least `need` slots along `dim` (doubling, zero-filled), so appends are amortized O(1)."""
    have = t.shape[dim]
    if need <= have:
        return t
    shape = list(t.shape)
    shape[dim] = max(need, 2 * have) - have
    return torch.cat([t, t.new_zeros(shape)], dim)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """hack's `unpack` (..., N·b/8) -> (..., N), also for empty tensors (zero tokens stored yet)."""
    if packed.numel() == 0:
        return packed.new_zeros(*packed.shape[:-1], packed.shape[-1] * 8 // bits)
    return unpack(packed, bits)
