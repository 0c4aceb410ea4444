"""Quantize + pack + sums in one pass (HACK.md §2, §5): whole blocks of Π tokens of 16-bit K or V -> HACK's layout.

One program per block (Π, D): min/max, the stored min rounded down and scale rounded up in the 16-bit meta dtype
(as hack_cli.methods.hack.quantizer.quantize does), codes by nearest or stochastic (tl.rand, seeded) rounding,
packed 8/b per byte along D (K) or along the block's tokens (V: the axis P·V contracts), and the cached code sums — per token per channel group (K's sums) or per channel over
the block (V's sums). Layouts: per_channel (channel-layout K, token-layout V) or per_token in groups of C channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hack_kernels.common import div_rn as _div_rn, interpreting


@triton.jit
def _round_toward(x, MDT: tl.constexpr, DOWN: tl.constexpr):
    """x (fp32) rounded to the 16-bit MDT toward -inf (DOWN) or +inf; returned as fp32."""
    y = x.to(MDT)
    yf = y.to(tl.float32)
    bits = y.to(tl.int16, bitcast=True)
    if DOWN:
        step = tl.where(yf > 0, bits - 1, tl.where(yf < 0, bits + 1, -32767))  # -32767 = 0x8001: -min subnormal
        off = yf > x
    else:
        step = tl.where(yf > 0, bits + 1, tl.where(yf < 0, bits - 1, 1))
        off = yf < x
    return tl.where(off, step.to(tl.int16).to(MDT, bitcast=True), y).to(tl.float32)


@triton.jit(do_not_specialize=["seed"])
def _quantize_kernel(X, CODES, MN, SC, SUMS, seed, PI: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                     BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, TOKEN_SUMS: tl.constexpr, STOCH: tl.constexpr,
                     MDT: tl.constexpr, ALONG_TOKENS: tl.constexpr):
    C: tl.constexpr = D // G
    PER: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PER
    LEVELS: tl.constexpr = (1 << BITS) - 1
    blk = tl.program_id(0).to(tl.int64)
    tt = tl.arange(0, PI)
    dd = tl.arange(0, D)
    gg = tl.arange(0, G)
    idx = (blk * PI + tt[:, None]) * D + dd[None, :]  # (PI, D) element offsets
    x = tl.load(X + idx).to(tl.float32)
    if PER_CHANNEL:
        mn = _round_toward(tl.min(x, axis=0), MDT, True)  # (D,)
        sc = _round_toward((tl.max(x, axis=0) - mn) / LEVELS, MDT, False)
        div = tl.where(sc == 0.0, 1.0, sc)
        t = _div_rn(x - mn[None, :], div[None, :], 1.0 / div[None, :])
        tl.store(MN + blk * D + dd, mn.to(MDT))
        tl.store(SC + blk * D + dd, sc.to(MDT))
    else:
        x3 = tl.reshape(x, (PI, G, C))
        mn = _round_toward(tl.min(x3, axis=2), MDT, True)  # (PI, G)
        sc = _round_toward((tl.max(x3, axis=2) - mn) / LEVELS, MDT, False)
        div = tl.where(sc == 0.0, 1.0, sc)
        t = tl.reshape(_div_rn(x3 - mn[:, :, None], div[:, :, None], 1.0 / div[:, :, None]), (PI, D))
        meta = (blk * PI + tt[:, None]) * G + gg[None, :]
        tl.store(MN + meta, mn.to(MDT))
        tl.store(SC + meta, sc.to(MDT))
    if STOCH:
        t = t + tl.rand(seed, idx)
    else:
        t = t + 0.5
    codes = tl.minimum(tl.maximum(tl.floor(t), 0.0), LEVELS).to(tl.int32)  # (PI, D)
    shifts = tl.arange(0, PER) * BITS
    if ALONG_TOKENS:
        TB: tl.constexpr = PI // PER
        packed = tl.sum(tl.reshape(tl.trans(codes), (D, TB, PER)) << shifts[None, None, :], axis=2)  # (D, TB)
        ee = tl.arange(0, TB)
        tl.store(CODES + (blk * D + dd[:, None]) * TB + ee[None, :], packed.to(tl.uint8))
    else:
        packed = tl.sum(tl.reshape(codes, (PI, DB, PER)) << shifts[None, None, :], axis=2)  # (PI, DB)
        ee = tl.arange(0, DB)
        tl.store(CODES + (blk * PI + tt[:, None]) * DB + ee[None, :], packed.to(tl.uint8))
    if TOKEN_SUMS:
        sums = tl.sum(tl.reshape(codes, (PI, G, C)), axis=2)  # (PI, G)
        tl.store(SUMS + (blk * PI + tt[:, None]) * G + gg[None, :], sums.to(SUMS.dtype.element_ty))
    else:
        tl.store(SUMS + blk * D + dd, tl.sum(codes, axis=0).to(SUMS.dtype.element_ty))


def sum_dtype(count: int, bits: int) -> torch.dtype:
    """As hack's quantizer: uint8 when `count` codes of `bits` bits fit, else int16."""
    return torch.uint8 if count * (2**bits - 1) <= 255 else torch.int16


def quantize_blocks(x: torch.Tensor, bits: int, group: int, per_channel: bool, token_sums: bool,
                    rounding: str = "nearest", seed: int = 0, meta_dtype: torch.dtype = torch.float16,
                    out: dict | None = None, num_warps: int | None = None,
                    along_tokens: bool = False) -> dict[str, torch.Tensor]:
    """x (NBLK, Π, D) whole blocks -> dict codes (NBLK, Π, D·b/8) uint8 (along_tokens: (NBLK, D, Π·b/8), packed
    along each block's tokens), mn/scale ((NBLK, D) per_channel, else
    (NBLK, Π, G)) in meta_dtype, sums ((NBLK, Π, G) with token_sums, else (NBLK, D)). `out` may supply the tensors.
    num_warps: None picks 2 warps for blocks of up to 8192 elements, else 4."""
    nblk, P, D = x.shape
    G = D // group
    if out is None:
        meta = (nblk, D) if per_channel else (nblk, P, G)
        codes = (nblk, D, P * bits // 8) if along_tokens else (nblk, P, D * bits // 8)
        out = {"codes": torch.empty(codes, dtype=torch.uint8, device=x.device),
               "mn": torch.empty(meta, dtype=meta_dtype, device=x.device),
               "scale": torch.empty(meta, dtype=meta_dtype, device=x.device),
               "sums": torch.empty((nblk, P, G) if token_sums else (nblk, D),
                                   dtype=sum_dtype(group if token_sums else P, bits), device=x.device)}
    if num_warps is None:  # ~64-128 elements a thread measured fastest on H100 (kernels/NOTES.md)
        num_warps = 2 if P * D <= 8192 else 4
    if nblk:
        mdt = tl.bfloat16 if meta_dtype == torch.bfloat16 else tl.float16
        _quantize_kernel[(nblk,)](x.contiguous(), out["codes"], out["mn"], out["scale"], out["sums"], seed,
                                  PI=P, D=D, G=G, BITS=bits, PER_CHANNEL=per_channel, TOKEN_SUMS=token_sums,
                                  STOCH=rounding == "stochastic", MDT=mdt, ALONG_TOKENS=along_tokens,
                                  num_warps=1 if interpreting() else num_warps)
    return out
