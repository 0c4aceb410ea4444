"""Dequantize-to-16-bit for the materializing baselines (KIVI/KVQuant-style): codes -> 16-bit K̂, V̂, then SDPA.

Reads KIVI's layout (hack_kernels.kivi_decode's docstring) and writes K̂, V̂ (B, H, N, D) in the tail dtype; the
attention that follows is PyTorch SDPA over the materialized tensors (what the paper charges these methods with).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hack_kernels.common import interpreting, unpack_codes


@triton.jit(do_not_specialize=["CAP", "CAPG", "N", "NOUT"])
def _dequant_kernel(KC, KMN, KSC, VC, VMN, VSC, KO, VO, CAP, CAPG, N, NOUT, D: tl.constexpr, BN: tl.constexpr,
                    G: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    DB: tl.constexpr = D * BITS // 8
    pid = tl.program_id(0).to(tl.int64)  # b·H + h
    n0 = tl.program_id(1) * BN
    tt = n0 + tl.arange(0, BN)
    dd = tl.arange(0, D)
    ee = tl.arange(0, DB)
    ok = (tt < N)[:, None]
    tok = pid * CAP + tt
    grp = (pid * CAPG + tt // G)[:, None] * D + dd[None, :]
    kc = unpack_codes(tl.load(KC + tok[:, None] * DB + ee[None, :], mask=ok, other=0), BITS, tl.float16, ASM)
    k = tl.load(KMN + grp, mask=ok, other=0.0).to(tl.float32) + \
        tl.load(KSC + grp, mask=ok, other=0.0).to(tl.float32) * 512.0 * kc.to(tl.float32)
    vg = tok[:, None] * (D // C) + dd[None, :] // C
    vc = unpack_codes(tl.load(VC + tok[:, None] * DB + ee[None, :], mask=ok, other=0), BITS, tl.float16, ASM)
    v = tl.load(VMN + vg, mask=ok, other=0.0).to(tl.float32) + \
        tl.load(VSC + vg, mask=ok, other=0.0).to(tl.float32) * 512.0 * vc.to(tl.float32)
    out = (pid * NOUT + tt[:, None]) * D + dd[None, :]
    tl.store(KO + out, k, mask=ok)
    tl.store(VO + out, v, mask=ok)


def dequant_kivi(t: dict[str, torch.Tensor], n: int, bits: int, group: int, dtype=torch.bfloat16,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n quantized tokens of every sequence -> K̂, V̂ (B, H, n, D) in `dtype`, or into the first n token
    slots of `out` (B, H, N >= n, D), contiguous buffers that also hold the residual after them."""
    B, H, cap, _ = t["k_codes"].shape
    D = t["k_mn"].shape[-1]
    C = D // t["v_mn"].shape[-1]
    k, v = out if out is not None else (torch.empty(B, H, n, D, dtype=dtype, device=t["k_codes"].device)
                                        for _ in range(2))
    BN = 64
    _dequant_kernel[(B * H, triton.cdiv(n, BN))](t["k_codes"], t["k_mn"], t["k_scale"], t["v_codes"], t["v_mn"],
                                                 t["v_scale"], k, v, cap, t["k_mn"].shape[2], n, k.shape[2], D=D, BN=BN, G=group,
                                                 C=C, BITS=bits, ASM=not interpreting(), num_warps=4)
    return k, v
