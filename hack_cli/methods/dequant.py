"""Attention by dequantizing first: the path the baselines (KIVI, KVQuant, CacheGen, FP8) pay in the paper.

Each baseline materializes its stored KV as 16-bit K/V for the whole batch, then runs ordinary SDPA over it. This
module is that second half, shared so every baseline's reference is the same function of its dequantized tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hack_cli.methods.base import grown_capacity, key_mask
from hack_cli.methods.hack.quantizer import unpack

# cuDNN's SDPA builds a new plan for every new key length: ~1.5 ms of host time per call on an H100 (measured,
# results/jct/README.md), i.e. every decode step of a server whose contexts grow by one token. Decode attention
# over stored K/V uses the other fused backends.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_over(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor, key_ok: torch.Tensor,
              q_pos: torch.Tensor, scaling: float, window: Optional[int]) -> torch.Tensor:
    """q: (B, Hq, Tq, D); k, v: (B, H, N, D) materialized 16-bit K/V; key_pos, key_ok: (B, N) each key's position
    in its sequence and whether the slot holds a real token (host tensors); q_pos: (B, Tq). Causal, GQA ->
    (B, Hq, Tq, D).

    The mask is built on the host and never read back from the device (no synchronization per layer). When every
    query sees every key (decode over equal lengths) there is no mask at all, and the query heads of a KV head go in
    as rows of one (B, H, G*Tq, D) query, so CUDA runs its fused flash kernel without expanding K/V to Hq heads."""
    B, Hq, Tq, D = q.shape
    H = k.shape[1]
    ok = key_mask(key_pos, key_ok, q_pos, window)  # (B, 1, Tq, N) host
    k, v = k.to(q.dtype), v.to(q.dtype)
    if bool(ok.all()):
        rows = q.reshape(B, H, Hq // H * Tq, D)  # (B, H, G*Tq, D): query head h*G+g is row g*Tq+t of KV head h
        with sdpa_kernel(NO_CUDNN):
            out = F.scaled_dot_product_attention(rows, k, v, scale=scaling)
        return out.reshape(B, Hq, Tq, D)
    with sdpa_kernel(NO_CUDNN):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ok.to(q.device), scale=scaling, enable_gqa=Hq != H)
    seen = ok.any(-1, keepdim=True)  # (B, 1, Tq, 1) host
    return out if bool(seen.all()) else out.masked_fill(~seen.to(q.device), 0.0)  # padding queries see nothing


def grow(t: torch.Tensor, need: int, dim: int = 2) -> torch.Tensor:
    """`t` with at least `need` slots along `dim`, zero-filled, grown by `grown_capacity` (steps of >= 64)."""
    have = t.shape[dim]
    if need <= have:
        return t
    shape = list(t.shape)
    shape[dim] = grown_capacity(have, need, 64) - have
    return torch.cat([t, t.new_zeros(shape)], dim)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """hack's `unpack` (..., N·b/8) -> (..., N), also for empty tensors (zero tokens stored yet)."""
    if packed.numel() == 0:
        return packed.new_zeros(*packed.shape[:-1], packed.shape[-1] * 8 // bits)
    return unpack(packed, bits)
