"""HACK's quantizer (HACK.md §2): asymmetric b-bit codes per partition, packed 8/b per byte, with code sums.

All functions partition the *last* axis into groups of `group` elements; callers move the axis they partition.
"""
from __future__ import annotations

from typing import Optional

import torch

from hack_cli.errors import HackError

META_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise HackError(f"non-finite values in {where}: the model produced inf/NaN before KV quantization")


def sum_dtype(count: int, bits: int) -> torch.dtype:
    """Smallest integer type that holds a sum of `count` codes of `bits` bits (uint8 at 2 bits, Π<=85)."""
    return torch.uint8 if count * (2**bits - 1) <= 255 else torch.int16


def round_toward(x: torch.Tensor, dtype: torch.dtype, direction: int) -> torch.Tensor:
    """x (fp32) in `dtype`, rounded down (direction -1) or up (+1) instead of to nearest."""
    y = x.to(dtype)
    off = (y.float() > x) if direction < 0 else (y.float() < x)
    step = torch.nextafter(y, torch.full_like(y, direction * float("inf")))
    return torch.where(off, step, y)


def quantize(x: torch.Tensor, bits: int, group: int, rounding: str, meta_dtype: torch.dtype = torch.float16,
             generator: Optional[torch.Generator] = None, where: str = "tensor"):
    """Quantize groups of `group` consecutive elements of the last axis.

    x: (..., N) -> codes (..., N) uint8 in [0, 2^b), mn (..., N/group), scale (..., N/group) in `meta_dtype`,
    sums (..., N/group) integer. Codes are computed against the *stored* (rounded) min and scale, so that
    dequantization by `mn + scale * code` is exactly what every consumer sees.
    """
    check_finite(x, where)
    n = x.shape[-1]
    if n % group:
        raise HackError(f"{where}: an axis of {n} elements does not split into partitions of {group}")
    xg = x.float().reshape(*x.shape[:-1], n // group, group)  # (..., G, group)
    lo, hi = xg.amin(-1), xg.amax(-1)  # (..., G)
    levels = 2**bits - 1
    # Round the stored min down and the stored scale up, so every value lands inside [mn, mn + levels * scale]
    # and no code is clamped (the error bound holds even for tiny, subnormal 16-bit scales).
    mn = round_toward(lo, meta_dtype, -1)
    scale = round_toward((hi - mn.float()) / levels, meta_dtype, +1)
    # A constant partition divides by 1 (HACK.md: "if s == 0 use s = 1"), gets all-zero codes, and stores s = 0:
    # the same dequantized values, but a stored 1 would dominate the scales that HACK folds into q and P.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    t = (xg - mn.float()[..., None]) / divisor.float()[..., None]  # (..., G, group)
    if rounding == "nearest":
        t = t + 0.5
    elif rounding == "stochastic":
        t = t + torch.rand(t.shape, generator=generator, device=t.device)
    else:
        raise HackError(f"unknown rounding {rounding!r}")
    codes = t.floor_().clamp_(0, levels).to(torch.uint8)  # (..., G, group)
    sums = codes.sum(-1, dtype=torch.int32).to(sum_dtype(group, bits))  # (..., G)
    return codes.reshape(x.shape), mn, scale, sums


def dequantize(codes: torch.Tensor, mn: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """codes (..., N), mn/scale (..., N/group) -> (..., N) fp32. Used by tests and the requantization ablation only."""
    c = codes.float().reshape(*codes.shape[:-1], -1, group)
    return (mn.float()[..., None] + scale.float()[..., None] * c).reshape(codes.shape)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., N) codes in [0, 2^b) -> (..., N*b/8) uint8; element j of a byte sits at bits [j*b, (j+1)*b)."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)  # (..., N/per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    return (c << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., N*b/8) uint8 -> (..., N) uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    c = (packed[..., None] >> shifts) & (2**bits - 1)  # (..., N*b/8, per)
    return c.reshape(*packed.shape[:-1], -1)


def quantize_int8(x: torch.Tensor, group: int):
    """On-the-fly 8-bit quantization of Q or P (round to nearest), codes stored as int8 with the offset folded.

    x: (..., N) -> codes (..., N) int8 in [-128, 127], mn (..., N/group) fp32, scale (..., N/group) fp32 with
    x ≈ mn + scale * code.
    """
    n = x.shape[-1]
    xg = x.float().reshape(*x.shape[:-1], n // group, group)  # (..., G, group)
    lo, hi = xg.amin(-1), xg.amax(-1)  # (..., G)
    scale = (hi - lo) / 255
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = ((xg - lo[..., None]) / scale[..., None] + 0.5).floor_().clamp_(0, 255) - 128  # (..., G, group)
    return codes.to(torch.int8).reshape(x.shape), lo + 128 * scale, scale
