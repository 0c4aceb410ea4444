"""Homomorphic decode attention (HACK.md §3–4) over HACK's stored layout, split-KV (flash-decoding) + combine.

One program = one (sequence, KV head) and one split of its closed blocks; split NSPLIT (the last) handles the
16-bit segment: sinks and the open block. Each program keeps an online softmax (base 2) over its blocks and writes
a partial (max, sum, unnormalized output); `_combine` merges the splits. The query heads of one KV head are the rows
of one tile (GQA). Per block, nothing is dequantized:

  channel layout: q̃ = q·s^K_β quantized to 8 bits per (row, channel group); scores = Σ_g s^q (q̃'·k') + m^q·KSUM
                  + q·m^K. P̃ = P·s^V_t quantized per (row, group) over the block; out = s^P (P̃'·v') + m^P·VSUM
                  + Σ_t P_t m^V_t.
  token layout:   q quantized once per (row, group); K per token, V per channel over the block (§4, arXiv v1).

Channel groups ride in the dot's M axis: row (g, r) holds group g's codes of row r and zeros elsewhere, so one dot
over the whole head dim gives every group's partial product (the rows are padding to the tensor core's 16 anyway).
The probabilities used are the unnormalized exp2(s - m) of the online softmax: 8-bit quantization is invariant to
a positive row scale (up to rounding), so the result is the reference's. Shapes: R query rows per KV head
(padded to RP), D head dim, PI = Π tokens a block, G channel groups of C = D/G, DB = D·b/8 packed bytes a token.

Channel layout with fp16 operands: one loop step may take NB consecutive closed blocks (NB·Π tokens, one online-
softmax update; `blocks_per_iter`). Their codes are contiguous, so K is one (NB·Π, DB) tile and V one (D, NB·TB)
tile of the blocks' bytes side by side. Block j's key scales ride in the dot's M axis: row (j, r) holds q_r ⊙ s^K_j,
one dot against all NB·Π tokens, and row (j, r) keeps block j's columns. Blocks past the split's end are masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hack_kernels.common import dot_codes, dot_dtypes, interpreting, quant8_rows, tail_dot_dtype

LOG2E = 1.4426950408889634
COMBINE_TILE = 8192  # fp32 values of one combine step's partial-output tile: 64 a thread at 4 warps


@triton.jit
def _online(s, m_i, l_i, acc):
    """One online-softmax step over base-2 logits s (RP, N): returns new max, sum, rescaled acc, and p."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None], p


@triton.jit
def _group_rows(x8, G: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, DT: tl.constexpr):
    """x8 (RP, G, C) code values -> (G·RP, D) DT: row (g, r) holds group g's codes of row r, zeros elsewhere."""
    gg = tl.arange(0, G)
    own = gg[:, None, None, None] == gg[None, None, :, None]  # (G, 1, G, 1)
    return tl.reshape(tl.where(own, x8[None, :, :, :], 0.0), (G * RP, D)).to(DT)


@triton.jit
def _scores_channel(q, bb, KC, KMN, KSC, KSUM, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
                    G: tl.constexpr, BITS: tl.constexpr, OPER: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Scores (RP, PI) of q (RP, D) against closed block bb, K per channel over the block."""
    C: tl.constexpr = D // G
    Z: tl.constexpr = 1 << (BITS - 1)
    DB: tl.constexpr = D * BITS // 8
    dd = tl.arange(0, D)
    tt = tl.arange(0, PI)
    gg = tl.arange(0, G)
    ee = tl.arange(0, DB)
    kp = tl.load(KC + (bb * PI + tt[:, None]) * DB + ee[None, :])  # (PI, DB) packed codes
    ks = tl.load(KSC + bb * D + dd).to(tl.float32)  # (D,)
    km = tl.load(KMN + bb * D + dd).to(tl.float32)
    q8, qsc, qmn = quant8_rows(tl.reshape(q * ks[None, :], (RP, G, C)), OPER, DT)  # q̃: (RP, G, C), (RP, G) x2
    q8sum = tl.trans(tl.sum(q8, axis=2))[:, :, None]  # (G, RP, 1)
    dot = tl.reshape(dot_codes(_group_rows(q8, G, RP, D, DT), kp, BITS, DT, ASM), (G, RP, PI))
    if OPER == 0:  # Σ q'k'' = Σ q'k' - z Σ q' (exact integers)
        ksum = tl.load(KSUM + (bb * PI + tt[None, :]) * G + gg[:, None]).to(tl.float32) - C * Z  # Σ k'': (G, PI)
        s = tl.sum(tl.trans(qsc)[:, :, None] * (dot - Z * q8sum) + tl.trans(qmn)[:, :, None] * ksum[:, None, :], 0)
    elif OPER == 1:  # codes were read as code·2^-9
        s = tl.sum(tl.trans(qsc)[:, :, None] * (dot * 512.0 - Z * q8sum), axis=0)
    else:  # fp16: q̃ is only rounded, so uncentered codes lose nothing
        s = tl.sum(dot, axis=0) * 512.0
    if OPER == 2:
        s = s + tl.sum(q * km[None, :], axis=1)[:, None]  # + q·m^K
    else:
        s = s + tl.sum(q * (km + ks * Z)[None, :], axis=1)[:, None]  # + q·(m^K + s^K z)
    return s


@triton.jit
def _scores_channel_nb(q, bb, nv, KC, KMN, KSC, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
                       NB: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Scores (RP, NB·PI) of q (RP, D) against the NB closed blocks bb .. bb + NB - 1, fp16 operands, K per channel
    over each block; blocks from nv on are masked (-inf)."""
    DB: tl.constexpr = D * BITS // 8
    dd = tl.arange(0, D)
    tt = tl.arange(0, NB * PI)  # token j·PI + t of block bb + j
    jj = tl.arange(0, NB)
    ee = tl.arange(0, DB)
    kp = tl.load(KC + (bb * PI + tt[:, None]) * DB + ee[None, :], mask=tt[:, None] < nv * PI, other=0)  # (NB·PI, DB)
    ks = tl.load(KSC + (bb + jj[:, None]) * D + dd[None, :], mask=jj[:, None] < nv, other=0.0).to(tl.float32)  # (NB, D)
    km = tl.load(KMN + (bb + jj[:, None]) * D + dd[None, :], mask=jj[:, None] < nv, other=0.0).to(tl.float32)
    a = tl.reshape(ks[:, None, :] * q[None, :, :], (NB * RP, D)).to(DT)  # row (j, r): q_r ⊙ s^K_j
    dot = tl.reshape(dot_codes(a, kp, BITS, DT, ASM), (NB, RP, NB * PI))  # [j, r, t]: every token, block j's scales
    qm = tl.sum(km[:, None, :] * q[None, :, :], axis=2)  # (NB, RP): q·m^K_j
    own = jj[:, None, None] == (tt // PI)[None, None, :]  # (NB, 1, NB·PI): token t is in block j
    s = tl.sum(tl.where(own, dot * 512.0 + qm[:, :, None], 0.0), axis=0)  # (RP, NB·PI); codes read as code·2^-9
    return tl.where(tt[None, :] < nv * PI, s, -float("inf"))


@triton.jit
def _values_channel_nb(p, bb, nv, VC, VMN, VSC, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
                       G: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Σ_t p_t V̂_t (RP, D) over the NB closed blocks bb .. bb + NB - 1 (p (RP, NB·PI) is 0 on blocks from nv on),
    fp16 operands, V per token in channel groups: P̃ = P·s^V_t of each group g in the dot's M axis."""
    C: tl.constexpr = D // G
    TB: tl.constexpr = PI * BITS // 8
    dd = tl.arange(0, D)
    tt = tl.arange(0, NB * PI)
    gg = tl.arange(0, G)
    cc = tl.arange(0, NB * TB)  # byte e of block j at column j·TB + e: its codes are tokens j·PI + e·8/BITS + i
    ok = tt[None, :] < nv * PI
    vsc = tl.load(VSC + (bb * PI + tt[None, :]) * G + gg[:, None], mask=ok, other=0.0).to(tl.float32)  # (G, NB·PI)
    vmn = tl.load(VMN + (bb * PI + tt[None, :]) * G + gg[:, None], mask=ok, other=0.0).to(tl.float32)
    vp = tl.load(VC + ((bb + cc[None, :] // TB) * D + dd[:, None]) * TB + cc[None, :] % TB,
                 mask=cc[None, :] // TB < nv, other=0)  # (D, NB·TB) packed codes
    pv = tl.reshape(p[None, :, :] * vsc[:, None, :], (G * RP, NB * PI)).to(DT)  # P̃: row (g, r), rounded to fp16
    o = tl.reshape(dot_codes(pv, vp, BITS, DT, ASM), (G, RP, D)) * 512.0
    o = o + tl.sum(p[None, :, :] * vmn[:, None, :], axis=2)[:, :, None]  # + Σ_t P_t m^V_t: (G, RP, D)
    own = (dd[None, None, :] // C) == gg[:, None, None]  # (G, 1, D): channel d belongs to group g
    return tl.sum(tl.where(own, o, 0.0), axis=0)


@triton.jit
def _pv(a, VC, bb, D: tl.constexpr, PI: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """a (M, PI) DT · closed block bb's V codes (PI, D) -> (M, D) fp32. V's codes are packed along the tokens, the
    axis this product contracts, so they widen straight into dot operands (no transpose through shared memory)."""
    TB: tl.constexpr = PI * BITS // 8
    vp = tl.load(VC + (bb * D + tl.arange(0, D)[:, None]) * TB + tl.arange(0, TB)[None, :])  # (D, TB) packed codes
    return dot_codes(a, vp, BITS, DT, ASM)


@triton.jit
def _values_channel(p, bb, VC, VMN, VSC, VSUM, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
                    G: tl.constexpr, BITS: tl.constexpr, OPER: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Σ_t p_t V̂_t (RP, D) over closed block bb, V per token in channel groups."""
    C: tl.constexpr = D // G
    Z: tl.constexpr = 1 << (BITS - 1)
    dd = tl.arange(0, D)
    tt = tl.arange(0, PI)
    gg = tl.arange(0, G)
    vsc = tl.load(VSC + (bb * PI + tt[None, :]) * G + gg[:, None]).to(tl.float32)  # (G, PI)
    vmn = tl.load(VMN + (bb * PI + tt[None, :]) * G + gg[:, None]).to(tl.float32)
    p8, psc, pmn = quant8_rows(p[None, :, :] * vsc[:, None, :], OPER, DT)  # P̃: (G, RP, PI), (G, RP) x2
    p8sum = tl.sum(p8, axis=2)[:, :, None]  # (G, RP, 1)
    o = tl.reshape(_pv(tl.reshape(p8, (G * RP, PI)).to(DT), VC, bb, D, PI, BITS, DT, ASM), (G, RP, D))
    if OPER == 0:
        vsum = tl.load(VSUM + bb * D + dd).to(tl.float32) - PI * Z  # Σ_t v'': (D,)
        o = psc[:, :, None] * (o - Z * p8sum) + pmn[:, :, None] * vsum[None, None, :]
    elif OPER == 1:
        o = psc[:, :, None] * (o * 512.0 - Z * p8sum)
    if OPER == 2:  # fp16: P̃ is only rounded, uncentered codes
        o = o * 512.0 + tl.sum(p[None, :, :] * vmn[:, None, :], axis=2)[:, :, None]
    else:
        o = o + tl.sum(p[None, :, :] * (vmn + vsc * Z)[:, None, :], axis=2)[:, :, None]  # + Σ_t P_t (m^V + s^V z)
    own = (dd[None, None, :] // C) == gg[:, None, None]  # (G, 1, D): channel d belongs to group g
    return tl.sum(tl.where(own, o, 0.0), axis=0)


@triton.jit
def _scores_token(a, qsc, qmn, qsum, qsumx, bb, KC, KMN, KSC, KSUM, RP: tl.constexpr, D: tl.constexpr,
                  PI: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, OPER: tl.constexpr, DT: tl.constexpr,
                  ASM: tl.constexpr):
    """Scores (RP, PI) against block bb with K per token in channel groups; a (G·RP, D) = q's grouped codes;
    qsc, qmn, qsum (G, RP, 1): its scale, min and code sum per group; qsumx: the exact sum of q (fp8 only)."""
    C: tl.constexpr = D // G
    Z: tl.constexpr = 1 << (BITS - 1)
    DB: tl.constexpr = D * BITS // 8
    tt = tl.arange(0, PI)
    gg = tl.arange(0, G)
    ee = tl.arange(0, DB)
    kp = tl.load(KC + (bb * PI + tt[:, None]) * DB + ee[None, :])  # (PI, DB)
    ksc = tl.load(KSC + (bb * PI + tt[None, :]) * G + gg[:, None]).to(tl.float32)[:, None, :]  # (G, 1, PI)
    kmn = tl.load(KMN + (bb * PI + tt[None, :]) * G + gg[:, None]).to(tl.float32)[:, None, :]
    dot = tl.reshape(dot_codes(a, kp, BITS, DT, ASM), (G, RP, PI))
    if OPER == 0:
        kmn = kmn + ksc * Z  # centered min
        ksum = tl.load(KSUM + (bb * PI + tt[None, :]) * G + gg[:, None]).to(tl.float32)[:, None, :] - C * Z
        s = qsc * (ksc * (dot - Z * qsum) + kmn * qsum) + qmn * (ksc * ksum + C * kmn)
    elif OPER == 1:
        s = qsc * ksc * (dot * 512.0 - Z * qsum) + (kmn + ksc * Z) * qsumx
    else:  # fp16: uncentered codes
        s = ksc * dot * 512.0 + kmn * qsumx
    return tl.sum(s, axis=0)


@triton.jit
def _values_token(p, bb, VC, VMN, VSC, VSUM, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
                  BITS: tl.constexpr, OPER: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Σ_t p_t V̂_t (RP, D) over closed block bb, V per channel over the block, P quantized per row (RP >= 16)."""
    Z: tl.constexpr = 1 << (BITS - 1)
    dd = tl.arange(0, D)
    vsc = tl.load(VSC + bb * D + dd).to(tl.float32)[None, :]  # (1, D)
    vmn = tl.load(VMN + bb * D + dd).to(tl.float32)[None, :]
    p8, psc, pmn = quant8_rows(tl.reshape(p, (1, RP, PI)), OPER, DT)  # (1, RP, PI), (1, RP) x2
    o = _pv(tl.reshape(p8, (RP, PI)).to(DT), VC, bb, D, PI, BITS, DT, ASM)  # (RP, D)
    psc = tl.reshape(psc, (RP, 1))
    psum = tl.reshape(tl.sum(p8, axis=2), (RP, 1))
    if OPER == 0:
        vmn = vmn + vsc * Z  # centered min
        vsum = tl.load(VSUM + bb * D + dd).to(tl.float32)[None, :] - PI * Z  # Σ_t v''
        pmn = tl.reshape(pmn, (RP, 1))
        out = psc * (vsc * (o - Z * psum) + vmn * psum) + pmn * (vsc * vsum + PI * vmn)
    elif OPER == 1:
        out = psc * vsc * (o * 512.0 - Z * psum) + (vmn + vsc * Z) * tl.sum(p, axis=1)[:, None]
    else:  # fp16: uncentered codes
        out = vsc * o * 512.0 + vmn * tl.sum(p, axis=1)[:, None]
    return out


@triton.jit
def _tail16(q, qpos, m_i, l_i, acc, a, qsc, qmn, qsum, qsumx, pid, b, nc, KC, KMN, KSC, KSUM, SK, SV, OK, OV, FILL,
            SFILL, NBMAX, S, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr, G: tl.constexpr,
            BITS: tl.constexpr, SP: tl.constexpr, LAYOUT: tl.constexpr, OPER: tl.constexpr, DT: tl.constexpr,
            TDT: tl.constexpr, ASM: tl.constexpr):
    """The 16-bit segment of one (sequence, KV head): sinks, then the open block (its K is per-token codes in
    block nc in the token layout). qpos (RP,): each row's query position (causal mask)."""
    sf = tl.load(SFILL + b)
    fill = tl.load(FILL + b)
    dd = tl.arange(0, D)
    ss = tl.arange(0, SP)
    tt = tl.arange(0, PI)
    sk = tl.load(SK + (pid * S + ss[:, None]) * D + dd[None, :], mask=ss[:, None] < sf, other=0.0)  # (SP, D)
    sv = tl.load(SV + (pid * S + ss[:, None]) * D + dd[None, :], mask=ss[:, None] < sf, other=0.0)
    s = tl.dot(q.to(TDT), tl.trans(sk.to(TDT)))  # (RP, SP)
    m_i, l_i, acc, p = _online(tl.where((ss[None, :] < sf) & (ss[None, :] <= qpos[:, None]), s, -float("inf")),
                               m_i, l_i, acc)
    acc += tl.dot(p.to(TDT), sv.to(TDT))
    if LAYOUT == 0:
        ko = tl.load(OK + (pid * PI + tt[:, None]) * D + dd[None, :], mask=tt[:, None] < fill, other=0.0)
        so = tl.dot(q.to(TDT), tl.trans(ko.to(TDT)))  # (RP, PI)
    else:
        bb = pid.to(tl.int64) * NBMAX + tl.minimum(nc, NBMAX - 1)  # fill > 0 means block nc exists
        so = _scores_token(a, qsc, qmn, qsum, qsumx, bb, KC, KMN, KSC, KSUM, RP, D, PI, G, BITS, OPER, DT, ASM)
    ok = (tt[None, :] < fill) & (S + nc * PI + tt[None, :] <= qpos[:, None])
    m_i, l_i, acc, po = _online(tl.where(ok, so, -float("inf")), m_i, l_i, acc)
    vo = tl.load(OV + (pid * PI + tt[:, None]) * D + dd[None, :], mask=tt[:, None] < fill, other=0.0)
    acc += tl.dot(po.to(TDT), vo.to(TDT))
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["H", "NBMAX", "S", "BPS", "NSPLIT"])
def _decode_kernel(Q, KC, KMN, KSC, KSUM, VC, VMN, VSC, VSUM, SK, SV, OK, OV, NCL, FILL, SFILL, PO, PM, PL,
                   H, NBMAX, S, BPS, NSPLIT, QSCALE,
                   R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, PI: tl.constexpr, G: tl.constexpr,
                   BITS: tl.constexpr, SP: tl.constexpr, LAYOUT: tl.constexpr, OPER: tl.constexpr,
                   DT: tl.constexpr, TDT: tl.constexpr, ASM: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)  # b·H + h
    split = tl.program_id(1)
    b = pid // H
    rr = tl.arange(0, RP)
    dd = tl.arange(0, D)
    q = tl.load(Q + (pid * R + rr[:, None]) * D + dd[None, :], mask=rr[:, None] < R, other=0.0)  # (RP, D)
    q = q.to(tl.float32) * QSCALE  # base-2 logits: scaling·log2(e) folded in here, not in a kernel of its own
    m_i = tl.full([RP], -float("inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    nc = tl.load(NCL + b)
    if LAYOUT == 1:  # token layout: q is quantized once, per (row, channel group)
        C: tl.constexpr = D // G
        q3 = tl.reshape(q, (RP, G, C))
        q8, qsc, qmn = quant8_rows(q3, OPER, DT)
        a = _group_rows(q8, G, RP, D, DT)
        qsum = tl.trans(tl.sum(q8, axis=2))[:, :, None]  # (G, RP, 1)
        qsumx = tl.trans(tl.sum(q3, axis=2))[:, :, None]
        qsc = tl.trans(qsc)[:, :, None]
        qmn = tl.trans(qmn)[:, :, None]
    else:  # unused placeholders
        a = q
        qsc = q
        qmn = q
        qsum = q
        qsumx = q
    if split < NSPLIT:
        lo = split * BPS
        hi = tl.minimum(lo + BPS, nc)
        for blk in range(lo, hi, NB):  # BPS is a multiple of NB
            bb = pid.to(tl.int64) * NBMAX + blk
            if NB > 1:  # channel layout, fp16 operands: blocks blk .. blk + NB - 1, those from hi on masked
                s = _scores_channel_nb(q, bb, hi - blk, KC, KMN, KSC, RP, D, PI, NB, BITS, DT, ASM)
            elif LAYOUT == 0:
                s = _scores_channel(q, bb, KC, KMN, KSC, KSUM, RP, D, PI, G, BITS, OPER, DT, ASM)
            else:
                s = _scores_token(a, qsc, qmn, qsum, qsumx, bb, KC, KMN, KSC, KSUM, RP, D, PI, G, BITS, OPER, DT, ASM)
            m_i, l_i, acc, p = _online(s, m_i, l_i, acc)
            if NB > 1:
                acc += _values_channel_nb(p, bb, hi - blk, VC, VMN, VSC, RP, D, PI, G, NB, BITS, DT, ASM)
            elif LAYOUT == 0:
                acc += _values_channel(p, bb, VC, VMN, VSC, VSUM, RP, D, PI, G, BITS, OPER, DT, ASM)
            else:
                acc += _values_token(p, bb, VC, VMN, VSC, VSUM, RP, D, PI, BITS, OPER, DT, ASM)
    else:
        m_i, l_i, acc = _tail16(q, tl.full([RP], 1 << 30, tl.int32), m_i, l_i, acc, a, qsc, qmn, qsum, qsumx, pid, b,
                                nc, KC, KMN, KSC, KSUM, SK, SV, OK, OV, FILL, SFILL, NBMAX, S, RP, D, PI, G, BITS, SP,
                                LAYOUT, OPER, DT, TDT, ASM)
    part = pid * (NSPLIT + 1) + split
    ok = rr < R
    tl.store(PO + (part * R + rr[:, None]) * D + dd[None, :], acc, mask=ok[:, None])
    tl.store(PM + part * R + rr, m_i, mask=ok)
    tl.store(PL + part * R + rr, l_i, mask=ok)


@triton.jit(do_not_specialize=["NS1"])
def _combine_kernel(PO, PM, PL, OUT, NS1, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
                    SC: tl.constexpr):
    """Merge the NS1 partials of one (sequence, KV head) into OUT rows (pid·R + r), channels DC·c .. DC·(c + 1) of
    program (pid, c). SC partials a loop step, one (SC, RP, DC) tile: at batch 1 there are only B·H (sequence,
    head) pairs, so the channels are split over programs and SC covers every split in one step (a partial a step,
    or one program per pair walking 16 a step, left them latency-bound)."""
    pid = tl.program_id(0)
    ch = tl.program_id(1) * DC + tl.arange(0, DC)
    ss = tl.arange(0, SC)
    rr = tl.arange(0, RP)
    ok = rr < R
    m = tl.full([RP], -float("inf"), tl.float32)
    l = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, DC], tl.float32)
    for s0 in range(0, NS1, SC):
        part = pid * NS1 + s0 + ss  # (SC,)
        okp = (s0 + ss < NS1)[:, None] & ok[None, :]  # (SC, RP)
        rows = part[:, None] * R + rr[None, :]  # (SC, RP)
        ms = tl.load(PM + rows, mask=okp, other=-float("inf"))
        ls = tl.load(PL + rows, mask=okp, other=0.0)
        os = tl.load(PO + rows[:, :, None] * D + ch[None, None, :], mask=okp[:, :, None], other=0.0)  # (SC, RP, DC)
        m_new = tl.maximum(m, tl.max(ms, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        a = tl.exp2(m - m_safe)
        w = tl.exp2(ms - m_safe[None, :])  # (SC, RP); 0 for masked partials
        l = l * a + tl.sum(ls * w, axis=0)
        acc = acc * a[:, None] + tl.sum(os * w[:, :, None], axis=0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(OUT + (pid * R + rr[:, None]) * D + ch[None, :], out, mask=ok[:, None])


def combine(po: torch.Tensor, pm: torch.Tensor, pl: torch.Tensor, out: torch.Tensor) -> None:
    """Merge split partials po (P, NS, R, D), pm/pl (P, NS, R) fp32 into out (B, Hq, D), P = B·H programs. Every
    split in one step (up to 128), the channels in chunks of the largest power of 2 that keeps the (SC, RP, DC) tile
    within COMBINE_TILE fp32 values, but at least 16 wide: with 8 or more query rows a KV head and 128 splits the
    tile is larger than COMBINE_TILE (Llama-3.1-70B's 8 rows at batch 1: 16384 values, timed in the benchmark)."""
    P, NS, R, D = po.shape
    SC, RP = min(128, max(2, pow2(NS))), pow2(R)
    fit = COMBINE_TILE // (SC * RP)
    DC = min(D, max(16, 1 << (max(fit, 1).bit_length() - 1)))  # the largest power of 2 that fits, >= 16
    _combine_kernel[(P, D // DC)](po, pm, pl, out, NS, R=R, RP=RP, D=D, DC=DC, SC=SC, num_warps=4)


# ------------------------------------------------------------------------------------------------ host side
@dataclass
class HackKV:
    """HACK's stored tensors of one layer (hack_cli/methods/hack/store.py's layout), plain tensors on one device.

    k_codes (B, H, NB, Π, D·b/8) and v_codes (B, H, NB, D, Π·b/8) uint8 (V packed along tokens); channel layout: k_mn/k_scale (B, H, NB, D), v_mn/v_scale (B, H, NB, Π, G);
    token layout: k_mn/k_scale (B, H, NB, Π, G), v_mn/v_scale (B, H, NB, D); k_sum (B, H, NB, Π, G);
    v_sum (B, H, NB, D); sinks (B, H, S, D) and open block (B, H, Π, D) 16-bit; counters (B,) int32.
    """

    layout: str
    bits: int
    k_codes: torch.Tensor
    k_mn: torch.Tensor
    k_scale: torch.Tensor
    k_sum: torch.Tensor
    v_codes: torch.Tensor
    v_mn: torch.Tensor
    v_scale: torch.Tensor
    v_sum: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    open_k: torch.Tensor
    open_v: torch.Tensor
    n_closed: torch.Tensor
    fill: torch.Tensor
    sink_fill: torch.Tensor

    @property
    def partition(self) -> int:
        return self.k_codes.shape[3]

    @property
    def groups(self) -> int:
        return self.k_sum.shape[-1]


def from_layer(layer) -> HackKV:
    """A HackLayerKV's tensors as a HackKV (no copies of the blocks; counters moved to the device)."""
    t = layer.blocks
    counters = torch.stack([layer.n_closed, layer.fill, layer.sink_fill]).to(device=layer.device, dtype=torch.int32)
    n_closed, fill, sink_fill = counters  # (B,) each: one host-to-device copy for the three
    return HackKV(layer.cfg.layout, layer.bits, t["k_codes"], t["k_mn"], t["k_scale"], t["k_sum"], t["v_codes"],
                  t["v_mn"], t["v_scale"], t["v_sum"], layer.sinks["k"], layer.sinks["v"], layer.open["k"],
                  layer.open["v"], n_closed, fill, sink_fill)


def pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def plan_splits(programs: int, max_blocks: int, device, waves: float = 4) -> tuple[int, int]:
    """(splits, blocks per split) with programs · splits <= waves · SMs (1 split in the interpreter): `waves` is the
    programs an SM holds at once, so the full-length programs run in whole rounds. Rounding the splits up instead
    left a second round of a few full programs: 1.35–1.50x slower at batch 8 on an H100 (kernels/NOTES.md v10)."""
    if interpreting() or max_blocks == 0:
        return 1, max(max_blocks, 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, min(max_blocks, math.floor(waves * sms / programs)))
    per = -(-max_blocks // want)
    return -(-max_blocks // per), per


def blocks_per_iter_default(layout: str, operand: str, partition: int, bits: int) -> int:
    """NB of `hack_decode`: 2 for 2-bit Π = 64 (channel layout, fp16 operands), 1 elsewhere. Measured on an H100
    (results/kernels/nb_h100_2026-11-27.txt): at 2-bit Π = 64 NB = 2 is 1.00–1.20× NB = 1 and NB = 4 slower; at
    4 bits NB = 2 is 0.92–1.11× (mixed) and at Π = 128 0.3–0.7× (the stacked K dot's output, (NB·RP, NB·Π), grows
    as NB²). Π = 32 was not timed."""
    if layout != "channel" or operand != "fp16":
        return 1
    return 2 if (partition, bits) == (64, 2) else 1


def hack_decode(kv: HackKV, q: torch.Tensor, scaling: float, operand: str = "int8", max_blocks: int | None = None,
                splits: int | None = None, num_warps: int = 2, num_stages: int = 3, maxnreg: int | None = None,
                waves: float | None = None, blocks_per_iter: int | None = None) -> torch.Tensor:
    """Decode attention of q (B, Hq, D) (one new token per sequence) over kv -> (B, Hq, D) in q's dtype.

    max_blocks: max over sequences of n_closed (pass it to avoid a device sync). num_warps=2 measured fastest on
    H100 (kernels/NOTES.md); waves: programs per SM when choosing the number of splits (`plan_splits`; 4 = what an
    H100 SM holds of this kernel at 2 warps, measured best at batch 1 and 8). blocks_per_iter: NB closed blocks per
    loop step (1, 2 or 4; None: `blocks_per_iter_default`); only the channel layout with fp16 operands takes NB > 1,
    the others run NB = 1.
    """
    B, Hq, D = q.shape
    H = kv.k_codes.shape[1]
    R, G, P = Hq // H, kv.groups, kv.partition
    layout = 0 if kv.layout == "channel" else 1
    oper, dt = dot_dtypes(operand)
    nb = blocks_per_iter or blocks_per_iter_default(kv.layout, operand, P, kv.bits)
    if nb not in (1, 2, 4):
        raise ValueError(f"blocks_per_iter must be 1, 2 or 4, got {nb}")
    if layout != 0 or oper != 2:
        nb = 1
    RP = max(pow2(R), 16 // G) if layout == 0 else max(pow2(R), 16)
    if nb > 1:
        RP = max(RP, 16 // nb)  # the stacked K rows (NB·RP) fill a 16-row dot
    if max_blocks is None:
        max_blocks = int(kv.n_closed.max())
    waves = waves or 4
    nsplit, per = (plan_splits(B * H, max_blocks, q.device, waves) if splits is None
                   else (splits, -(-max_blocks // splits)))
    if nb > 1:  # whole steps of NB blocks a split
        per = max(nb, -(-per // nb) * nb)
        nsplit = max(1, -(-max_blocks // per))
    po = torch.empty(B * H, nsplit + 1, R, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B * H, nsplit + 1, R, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    S = kv.sink_k.shape[2]
    _decode_kernel[(B * H, nsplit + 1)](
        q.contiguous(), kv.k_codes, kv.k_mn, kv.k_scale, kv.k_sum, kv.v_codes, kv.v_mn, kv.v_scale, kv.v_sum,
        kv.sink_k, kv.sink_v, kv.open_k, kv.open_v, kv.n_closed, kv.fill, kv.sink_fill, po, pm, pl,
        H, kv.k_codes.shape[2], S, per, nsplit, scaling * LOG2E,
        R=R, RP=RP, D=D, PI=P, G=G, BITS=kv.bits, SP=max(16, pow2(S)), LAYOUT=layout, OPER=oper, DT=dt,
        TDT=tail_dot_dtype(kv.sink_k), ASM=not interpreting(), NB=nb, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    combine(po, pm, pl, out)
    return out
