"""Fused-dequant decode attention for KIVI's layout: the strongest honest competitor to HACK's homomorphic decode.

Layout (hack_cli/methods/kivi.py): k_codes, v_codes (B, H, cap, D·b/8) uint8, token-major, channels packed 8/b per
byte; k_mn/k_scale (B, H, cap/G, D) fp16, one pair per channel per group of G tokens; v_mn/v_scale (B, H, cap, D/c)
fp16, one pair per token per group of c channels; res_k/res_v (B, H, RES, D) 16-bit residual; n_q (B,) quantized
tokens (a multiple of G), n_res (B,) residual tokens after them.

Same structure as hack_kernels.decode (split-KV over tiles of BN tokens, GQA rows in one tile, a last split for the
16-bit residual, the same combine), but each tile is dequantized in registers to 16-bit K̂/V̂ (codes widened by the
same 4-codes-per-instruction unpack) and attended with 16-bit tensor-core dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hack_kernels.common import interpreting, tail_dot_dtype, unpack_codes
from hack_kernels.decode import LOG2E, _online, combine, plan_splits, pow2


@triton.jit(do_not_specialize=["H", "CAP", "CAPG", "RES", "TPS", "NSPLIT"])
def _kivi_kernel(Q, KC, KMN, KSC, VC, VMN, VSC, RK, RV, NQ, NRES, PO, PM, PL, H, CAP, CAPG, RES, TPS, NSPLIT,
                 R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                 C: tl.constexpr, BITS: tl.constexpr, RESP: tl.constexpr, CDT: tl.constexpr, TDT: tl.constexpr,
                 ASM: tl.constexpr):
    DB: tl.constexpr = D * BITS // 8
    pid = tl.program_id(0)  # b·H + h
    split = tl.program_id(1)
    b = pid // H
    rr = tl.arange(0, RP)
    dd = tl.arange(0, D)
    tt = tl.arange(0, BN)
    ee = tl.arange(0, DB)
    q = tl.load(Q + (pid * R + rr[:, None]) * D + dd[None, :], mask=rr[:, None] < R, other=0.0)  # (RP, D)
    qd = q.to(TDT)
    m_i = tl.full([RP], -float("inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    if split < NSPLIT:
        nq = tl.load(NQ + b)
        lo = split * TPS
        hi = tl.minimum(lo + TPS, nq)
        base = pid.to(tl.int64) * CAP
        for n0 in range(lo, hi, BN):
            tok = base + n0 + tt  # (BN,) slots; n_q is a multiple of G only: mask the last tile
            ok = (n0 + tt) < hi
            kp = tl.load(KC + tok[:, None] * DB + ee[None, :], mask=ok[:, None], other=0)  # (BN, DB)
            grp = (pid.to(tl.int64) * CAPG + (n0 + tt) // G)[:, None] * D + dd[None, :]  # (BN, D) token's key group
            kmn = tl.load(KMN + grp, mask=ok[:, None], other=0.0).to(tl.float32)
            ksc = tl.load(KSC + grp, mask=ok[:, None], other=0.0).to(tl.float32) * 512.0  # codes read as code·2^-9
            k = (kmn + ksc * unpack_codes(kp, BITS, CDT, ASM).to(tl.float32)).to(TDT)  # (BN, D) K̂
            s = tl.dot(qd, tl.trans(k))  # (RP, BN)
            m_i, l_i, acc, p = _online(tl.where(ok[None, :], s, -float("inf")), m_i, l_i, acc)
            vp = tl.load(VC + tok[:, None] * DB + ee[None, :], mask=ok[:, None], other=0)
            vg = tok[:, None] * (D // C) + dd[None, :] // C  # (BN, D) value group of each element
            vmn = tl.load(VMN + vg, mask=ok[:, None], other=0.0).to(tl.float32)
            vsc = tl.load(VSC + vg, mask=ok[:, None], other=0.0).to(tl.float32) * 512.0
            v = (vmn + vsc * unpack_codes(vp, BITS, CDT, ASM).to(tl.float32)).to(TDT)  # (BN, D) V̂
            acc += tl.dot(p.to(TDT), v)
    else:  # the 16-bit residual
        nr = tl.load(NRES + b)
        ss = tl.arange(0, RESP)
        ptr = (pid * RES + ss[:, None]) * D + dd[None, :]
        rk = tl.load(RK + ptr, mask=ss[:, None] < nr, other=0.0)  # (RESP, D)
        rv = tl.load(RV + ptr, mask=ss[:, None] < nr, other=0.0)
        s = tl.dot(qd, tl.trans(rk.to(TDT)))
        m_i, l_i, acc, p = _online(tl.where(ss[None, :] < nr, s, -float("inf")), m_i, l_i, acc)
        acc += tl.dot(p.to(TDT), rv.to(TDT))
    part = pid * (NSPLIT + 1) + split
    okr = rr < R
    tl.store(PO + (part * R + rr[:, None]) * D + dd[None, :], acc, mask=okr[:, None])
    tl.store(PM + part * R + rr, m_i, mask=okr)
    tl.store(PL + part * R + rr, l_i, mask=okr)


def kivi_decode(t: dict[str, torch.Tensor], res_k: torch.Tensor, res_v: torch.Tensor, n_q: torch.Tensor,
                n_res: torch.Tensor, q: torch.Tensor, scaling: float, bits: int, group: int,
                max_tokens: int | None = None, block_tokens: int = 64, num_warps: int = 4) -> torch.Tensor:
    """q (B, Hq, D) one token per sequence over KIVI's stored tensors `t` (k_codes, k_mn, k_scale, v_codes, v_mn,
    v_scale) and residual -> (B, Hq, D). n_q, n_res: (B,) int32 on q's device; max_tokens = max(n_q)."""
    B, Hq, D = q.shape
    H, cap = t["k_codes"].shape[1], t["k_codes"].shape[2]
    R = Hq // H
    C = D // t["v_mn"].shape[-1]
    BN = max(block_tokens, group)
    if max_tokens is None:
        max_tokens = int(n_q.max())
    nsplit, per = plan_splits(B * H, -(-max_tokens // BN), q.device)
    qs = (q.float() * (scaling * LOG2E)).contiguous()
    po = torch.empty(B * H, nsplit + 1, R, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B * H, nsplit + 1, R, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    interp = interpreting()
    _kivi_kernel[(B * H, nsplit + 1)](
        qs, t["k_codes"], t["k_mn"], t["k_scale"], t["v_codes"], t["v_mn"], t["v_scale"], res_k, res_v,
        n_q, n_res, po, pm, pl, H, cap, t["k_mn"].shape[2], res_k.shape[2], per * BN, nsplit,
        R=R, RP=max(16, pow2(R)), D=D, BN=BN, G=group, C=C, BITS=bits, RESP=max(16, pow2(res_k.shape[2])),
        CDT=tl.float16, TDT=tail_dot_dtype(res_k), ASM=not interp, num_warps=num_warps)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    combine(po, pm, pl, out)
    return out
