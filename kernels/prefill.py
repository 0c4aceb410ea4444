"""Homomorphic causal prefill attention over HACK's channel layout (HACK.md §4; `quantized_prefill`).

Flash-style: one program = one (sequence, KV head) and a tile of BM rows, (query token, query head of the KV head)
pairs, so GQA shares every K/V block read; queries are the last Tq tokens of each sequence. Two kernels:

* int8 (the paper's scheme) and fp8 operands, `_prefill_kernel`: 16-row tiles through the decode kernel's per-block
  products (`_scores_channel` / `_values_channel`: q̃ = q·s^K and P̃ = P·s^V quantized to 8 bits per row and channel
  group, integer or e4m3 dots, cached sums), the sinks and the 16-bit open block after the closed blocks.
* fp16 operands, `_prefill_fast_kernel`: 64- or 128-row tiles (wgmma on Hopper), online softmax in base 2.
  Per closed block of Π keys: scores = (q ⊙ s^K)·k̃ + q·m^K with k̃ the codes widened in registers (exact in fp16),
  values Σ_g (P ⊙ s^V_g)·ṽ_g + P·m^V; no requantization, so no cached sums. The rank-1 terms are
  tensor-core dots with N = 16. Blocks every row of the tile sees whole run unmasked, the diagonal ones masked
  per row, later ones not at all; the sinks and the open block go first, through the same softmax.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hack_kernels.common import code_plane, dot_dtypes, interpreting, tail_dot_dtype
from hack_kernels.decode import LOG2E, HackKV, _online, _scores_channel, _tail16, _values_channel, pow2


@triton.jit
def _tile_rows(pid, tile, H, TQ, R: tl.constexpr, RPAD: tl.constexpr, BM: tl.constexpr):
    """A tile's BM rows, (query token, query head of the KV head) pairs: sequence b, token (BM,), head (BM,) and
    which rows are real (BM,)."""
    rr = tl.arange(0, BM)
    tok = tile * (BM // RPAD) + rr // RPAD
    head = rr % RPAD
    return pid // H, tok, head, (tok < TQ) & (head < R)


@triton.jit(do_not_specialize=["H", "NBMAX", "S", "TQ"])
def _prefill_kernel(Q, KC, KMN, KSC, KSUM, VC, VMN, VSC, VSUM, SK, SV, OK, OV, NCL, FILL, SFILL, QPOS, OUT,
                    H, NBMAX, S, TQ, R: tl.constexpr, RPAD: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                    PI: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, SP: tl.constexpr, OPER: tl.constexpr,
                    DT: tl.constexpr, TDT: tl.constexpr, ASM: tl.constexpr):
    TOK: tl.constexpr = BM // RPAD
    pid = tl.program_id(0)  # b·H + h
    tile = tl.program_id(1)
    b, tok, head, ok = _tile_rows(pid, tile, H, TQ, R, RPAD, BM)
    dd = tl.arange(0, D)
    rows = (pid.to(tl.int64) * TQ + tok) * R + head  # rows of Q / OUT viewed as (B, H, TQ, R, D)
    q = tl.load(Q + rows[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)  # (BM, D) fp32, base-2 scaled
    qpos = tl.load(QPOS + b) + tok  # (BM,) each row's position
    m_i = tl.full([BM], -float("inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    nc = tl.load(NCL + b)
    last = tl.load(QPOS + b) + tl.minimum(tile * TOK + TOK, TQ) - 1  # the tile's latest query position
    hi = tl.minimum(nc, (last - S) // PI + 1)
    tt = tl.arange(0, PI)
    for blk in range(0, hi):
        bb = pid.to(tl.int64) * NBMAX + blk
        s = _scores_channel(q, bb, KC, KMN, KSC, KSUM, BM, D, PI, G, BITS, OPER, DT, ASM)
        s = tl.where(S + blk * PI + tt[None, :] <= qpos[:, None], s, -float("inf"))
        m_i, l_i, acc, p = _online(s, m_i, l_i, acc)
        acc += _values_channel(p, bb, VC, VMN, VSC, VSUM, BM, D, PI, G, BITS, OPER, DT, ASM)
    m_i, l_i, acc = _tail16(q, qpos, m_i, l_i, acc, q, q, q, q, q, pid, b, nc, KC, KMN, KSC, KSUM, SK, SV, OK, OV,
                            FILL, SFILL, NBMAX, S, BM, D, PI, G, BITS, SP, 0, OPER, DT, TDT, ASM)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + rows[:, None] * D + dd[None, :], out, mask=ok[:, None])


@triton.jit
def _tail_groups(q, qpos, pid, b, nc, SK, SV, OK, OV, FILL, SFILL, S, BM: tl.constexpr, D: tl.constexpr,
                 PI: tl.constexpr, G: tl.constexpr, SP: tl.constexpr, TDT: tl.constexpr):
    """The 16-bit segment (sinks, then the open block) from an empty online softmax, V split in G channel groups:
    returns m, l (BM,) and acc, a G-tuple of (BM, C) in the closed blocks' code·2^-9 units."""
    C: tl.constexpr = D // G
    sf = tl.load(SFILL + b)
    fill = tl.load(FILL + b)
    dd = tl.arange(0, D)
    ss = tl.arange(0, SP)
    tt = tl.arange(0, PI)
    cc = tl.arange(0, C)
    qt = q.to(TDT)
    sk = tl.load(SK + (pid * S + ss[:, None]) * D + dd[None, :], mask=ss[:, None] < sf, other=0.0)  # (SP, D)
    s = tl.dot(qt, tl.trans(sk.to(TDT)))  # (BM, SP)
    s = tl.where((ss[None, :] < sf) & (ss[None, :] <= qpos[:, None]), s, -float("inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - tl.where(m == -float("inf"), 0.0, m)[:, None])
    l = tl.sum(p, 1)
    ko = tl.load(OK + (pid * PI + tt[:, None]) * D + dd[None, :], mask=tt[:, None] < fill, other=0.0)  # (PI, D)
    so = tl.dot(qt, tl.trans(ko.to(TDT)))  # (BM, PI)
    so = tl.where((tt[None, :] < fill) & (S + nc * PI + tt[None, :] <= qpos[:, None]), so, -float("inf"))
    m_new = tl.maximum(m, tl.max(so, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    po = tl.exp2(so - m_safe[:, None])
    l = l * alpha + tl.sum(po, 1)
    acc = ()
    for g in tl.static_range(G):
        sv = tl.load(SV + (pid * S + ss[:, None]) * D + g * C + cc[None, :], mask=ss[:, None] < sf, other=0.0)
        vo = tl.load(OV + (pid * PI + tt[:, None]) * D + g * C + cc[None, :], mask=tt[:, None] < fill, other=0.0)
        o = tl.dot(p.to(TDT), sv.to(TDT)) * alpha[:, None] + tl.dot(po.to(TDT), vo.to(TDT))  # (BM, C)
        acc = acc + (o * (1.0 / 512.0),)
    return m_new, l, acc


@triton.jit
def _planes(packed, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """packed (N, E) uint8 -> (N, E·8/BITS) codes as DT, column j·E + e = code j of byte e: the code planes side by
    side, each as it comes out of its and/shift (no interleaving of the planes in registers)."""
    N: tl.constexpr = packed.shape[0]
    E: tl.constexpr = packed.shape[1]
    if BITS == 2:
        c = tl.join(tl.join(code_plane(packed, 0, BITS, DT, ASM), code_plane(packed, 2, BITS, DT, ASM)),
                    tl.join(code_plane(packed, 4, BITS, DT, ASM), code_plane(packed, 6, BITS, DT, ASM)))
        out = tl.reshape(tl.permute(c, (0, 3, 2, 1)), (N, 4 * E))  # [n, e, i, k] = plane 2k + i -> (n, 2k + i, e)
    else:
        c = tl.join(code_plane(packed, 0, BITS, DT, ASM), code_plane(packed, 4, BITS, DT, ASM))  # (N, E, 2)
        out = tl.reshape(tl.permute(c, (0, 2, 1)), (N, 2 * E))
    return out


@triton.jit
def _pairs(P, off, N: tl.constexpr, ASM: tl.constexpr):
    """The N fp16 at P + off (N,), off even. On the GPU read as N/2 32-bit words: Triton 3.6 then pipelines the load
    (cp.async) and multiplies in packed pairs (HMUL2); read as 16-bit values, it converts them through shared memory
    one to a register, and at 64 rows and 4 warps the extra registers serialized the wgmma pipeline (ptxas
    C7511)."""
    if ASM:
        w = tl.load(P.to(tl.pointer_type(tl.int32)) + off // 2 + tl.arange(0, N // 2))  # (N/2,) words
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [w], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
        out = tl.reshape(tl.join(lo, hi), (N,))
    else:
        out = tl.load(P + off + tl.arange(0, N))
    return out


@triton.jit
def _block_step(qa, qpos, m_i, acc, mv, bb, kpos, KC, KR, KSC, VC, VMX, VST, D: tl.constexpr, PI: tl.constexpr,
                G: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                MASK: tl.constexpr, NB: tl.constexpr):
    """NB consecutive closed blocks bb, .. (keys at positions kpos + j·Π + token) into the online softmax of the
    large-tile kernel, with one rescale of the accumulators (NB = 2: 6% fewer instructions a block at 64 rows).

    qa (BM, D) fp16: q in base-2 logits, channels in plane order; acc: G-tuple of (BM, C) fp32 in code·2^-9 units
    (scores come out of the code dots in the same units, hence the 512s); mv (BM, 16): column g = Σ_t P_t m^V_t,g.
    MASK: diagonal blocks (causal mask per row). Column t of a block's scores is token perm(t): K's rows are read in
    the order V's code planes put the tokens, so neither tile is interleaved in registers. The rank-1 terms are
    tensor-core dots with N = 16: q·m^K = q̃·(m^K/s^K) (the ratio in column 0), P·m^V (m^V_g in column g).
    """
    C: tl.constexpr = D // G
    DB: tl.constexpr = D * BITS // 8
    TB: tl.constexpr = PI * BITS // 8
    dd = tl.arange(0, D)
    tt = tl.arange(0, PI)
    cc = tl.arange(0, C)
    jj = tl.arange(0, 16)
    perm = (tt % TB) * (8 // BITS) + tt // TB  # (PI,) token of column t
    ss = ()  # NB-tuples: scores (BM, PI) in code·2^-9 units and q·m^K (BM,)
    qms = ()
    m_new = m_i
    for j in tl.static_range(NB):
        kp = tl.load(KC + ((bb + j) * PI + perm[:, None]) * DB + tl.arange(0, DB)[None, :])  # (PI, DB) K codes
        ks = _pairs(KSC, (bb + j) * D, D, ASM)  # (D,) fp16 s^K
        kr = tl.load(KR + (bb + j) * D + dd[:, None] + 0 * jj[None, :], mask=jj[None, :] == 0, other=0.0)  # (D, 16)
        qt = (qa * ks[None, :]).to(tl.float16)  # (BM, D) q̃ = q ⊙ s^K
        s = tl.dot(qt.to(DT), tl.trans(_planes(kp, BITS, DT, ASM)))  # (BM, PI) q̃·k̃
        qm = tl.sum(tl.dot(qt, kr), 1)  # (BM,) q̃·(m^K/s^K) = q·m^K
        if MASK:
            s = tl.where(kpos + j * PI + perm[None, :] <= qpos[:, None], s, -float("inf"))
        m_new = tl.maximum(m_new, tl.max(s, 1) * 512.0 + qm)  # scores = 512·s + q·m^K
        ss = ss + (s,)
        qms = qms + (qm,)
    if MASK:
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    mv = mv * alpha[:, None]
    new_acc = ()
    for g in tl.static_range(G):
        new_acc = new_acc + (acc[g] * alpha[:, None],)
    for j in tl.static_range(NB):
        p16 = tl.exp2(ss[j] * 512.0 + (qms[j] - m_use)[:, None]).to(tl.float16)  # (BM, PI)
        vmt = tl.load(VMX + ((bb + j) * PI + tt[:, None]) * GP + jj[None, :], mask=jj[None, :] < GP,
                      other=0.0)  # (PI, 16): m^V_g in column g, 1 in column G
        mv = tl.dot(p16, vmt, mv)
        summed = ()
        for g in tl.static_range(G):
            vs = _pairs(VST, ((bb + j) * G + g) * PI, PI, ASM)  # (PI,) s^V of group g
            vp = tl.load(VC + ((bb + j) * D + g * C + cc[:, None]) * TB + tl.arange(0, TB)[None, :])  # (C, TB)
            pt = (p16 * vs[None, :]).to(DT)  # P̃_g = P ⊙ s^V_g
            summed = summed + (tl.dot(pt, tl.trans(_planes(vp, BITS, DT, ASM)), new_acc[g]),)
        new_acc = summed
    return m_new, new_acc, mv


@triton.jit(do_not_specialize=["H", "NBMAX", "S", "TQ"])
def _prefill_fast_kernel(Q, KC, KR, KSC, VC, VMX, VST, SK, SV, OK, OV, NCL, FILL, SFILL, QPOS, OUT, QSCALE,
                         H, NBMAX, S, TQ, R: tl.constexpr, RPAD: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                         PI: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr, SP: tl.constexpr,
                         DT: tl.constexpr, TDT: tl.constexpr, ASM: tl.constexpr):
    """Large-tile prefill, fp16 operands: BM rows = BM/RPAD query tokens x RPAD heads.
    Q and OUT (B, Hq, TQ, D); QSCALE = softmax scale·log2(e). KR, KSC, SK and OK come with their channels in plane
    order; VMX (B, H, NB, Π, GP) is m^V with its tokens in column order and a column of ones after the G groups (the
    row sums ride in the P·m^V dot), VST s^V transposed to (group, column) (`hack_prefill`)."""
    C: tl.constexpr = D // G
    TOK: tl.constexpr = BM // RPAD
    DB: tl.constexpr = D * BITS // 8
    pid = tl.program_id(0)  # b·H + h
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest (latest) tiles first: a shorter tail
    b, tok, head, ok = _tile_rows(pid, tile, H, TQ, R, RPAD, BM)
    dd = tl.arange(0, D)
    rows = (pid.to(tl.int64) * R + head) * TQ + tok  # rows of Q / OUT viewed as (B·Hq·TQ, D)
    sig = (dd % DB) * (8 // BITS) + dd // DB  # (D,) channel at each position of K's code planes
    q = tl.load(Q + rows[:, None] * D + sig[None, :], mask=ok[:, None], other=0.0).to(tl.float32) * QSCALE  # (BM, D)
    q0 = tl.load(QPOS + b)
    qpos = q0 + tok  # (BM,) each row's position
    nc = tl.load(NCL + b)
    m_i, l_i, acc = _tail_groups(q, qpos, pid, b, nc, SK, SV, OK, OV, FILL, SFILL, S, BM, D, PI, G, SP, TDT)
    # q through an identity dot: q then lives in the MMA accumulator layout, where q ⊙ s^K of every block is made
    # in registers as the wgmma A operand (from a load's layout, Triton 3.6 round-trips q̃ through shared memory).
    qa = tl.dot(q.to(tl.float16), (dd[:, None] == dd[None, :]).to(tl.float16), out_dtype=tl.float16)  # (BM, D)
    jj = tl.arange(0, 16)
    mv = tl.where(jj[None, :] == G, l_i[:, None], 0.0)  # (BM, 16): Σ_t P_t m^V_t,g in column g, Σ_t P_t in column G
    first = q0 + tile * TOK - S  # the tile's first and last query position after the sinks
    last = q0 + tl.minimum(tile * TOK + TOK, TQ) - 1 - S
    full = tl.minimum(nc, tl.where(first + 1 >= PI, (first + 1) // PI, 0))  # blocks every row sees whole
    hi = tl.minimum(nc, tl.where(last >= 0, last // PI + 1, 0))  # blocks any row sees
    base = pid.to(tl.int64) * NBMAX
    for blk in range(0, full - 1, 2):  # pairs of blocks every row sees whole
        m_i, acc, mv = _block_step(qa, qpos, m_i, acc, mv, base + blk, S + blk * PI, KC, KR, KSC, VC, VMX, VST,
                                   D, PI, G, GP, BITS, DT, ASM, False, 2)
    for blk in range(full // 2 * 2, full):  # the odd one out
        m_i, acc, mv = _block_step(qa, qpos, m_i, acc, mv, base + blk, S + blk * PI, KC, KR, KSC, VC, VMX, VST,
                                   D, PI, G, GP, BITS, DT, ASM, False, 1)
    for blk in range(full, hi):  # diagonal blocks
        m_i, acc, mv = _block_step(qa, qpos, m_i, acc, mv, base + blk, S + blk * PI, KC, KR, KSC, VC, VMX, VST,
                                   D, PI, G, GP, BITS, DT, ASM, True, 1)
    l_i = tl.sum(tl.where(jj[None, :] == G, mv, 0.0), 1)
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    cc = tl.arange(0, C)
    for g in tl.static_range(G):
        mv_g = tl.sum(tl.where(jj[None, :] == g, mv, 0.0), 1)  # (BM,) Σ_t P_t m^V_t,g
        out = (acc[g] * 512.0 + mv_g[:, None]) * inv[:, None]  # (BM, C)
        tl.store(OUT + rows[:, None] * D + g * C + cc[None, :], out, mask=ok[:, None])


def plane_orders(kv: HackKV, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sig (D,), perm (Π,)) of the large-tile kernel: the channel at each position of the K dot (K's codes are
    packed along channels: position j·DB + e holds channel (8/b)·e + j) and the token of each score column (V's are
    packed along tokens: column j·TB + e is token (8/b)·e + j)."""
    D, P, n = kv.k_codes.shape[-1] * 8 // kv.bits, kv.partition, 8 // kv.bits
    pos = lambda N: torch.arange(N, device=device)
    return (pos(D) % (D // n)) * n + pos(D) // (D // n), (pos(P) % (P // n)) * n + pos(P) // (P // n)


def hack_prefill(kv: HackKV, q: torch.Tensor, scaling: float, q_pos0: torch.Tensor, operand: str = "int8",
                 block_rows: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of q (B, Hq, Tq, D), the last Tq tokens of each sequence (q_pos0 (B,) int32: position of
    the first), over kv (channel layout) -> (B, Hq, Tq, D) in q's dtype. block_rows: query tokens x heads a tile.

    int8 and fp8 operands: the small-tile kernel (16 rows; with G = 2 channel groups a 32-row dot; 4 warps). fp16:
    the large-tile kernel (64 rows, 4 warps and 3 stages by default; 64 or 128 rows feed wgmma on Hopper). It reads the
    per-block metadata in the orders its dots use: s^K, m^K/s^K and the 16-bit keys with channels permuted to K's
    code-plane order (q is permuted as the kernel loads it), m^V with tokens in V's plane order and s^V transposed
    (small copies, O(metadata))."""
    if kv.layout != "channel":
        raise ValueError("hack_prefill covers the channel layout")
    B, Hq, Tq, D = q.shape
    H = kv.k_codes.shape[1]
    R = Hq // H
    RPAD = pow2(R)
    oper, dt = dot_dtypes(operand)
    fast = operand == "fp16"  # an e4m3 variant of the large-tile kernel failed its GPU tests (kernels/NOTES.md)
    BM = max(RPAD, block_rows or (64 if fast else 16))
    S = kv.sink_k.shape[2]
    G, GP = kv.groups, pow2(kv.groups + 1)
    shape = dict(H=H, NBMAX=kv.k_codes.shape[2], S=S, TQ=Tq, R=R, RPAD=RPAD, BM=BM, D=D, PI=kv.partition, G=G,
                 BITS=kv.bits, SP=max(16, pow2(S)), DT=dt, TDT=tail_dot_dtype(kv.sink_k),
                 ASM=not interpreting(), num_warps=num_warps or 4, num_stages=num_stages or 3)
    counts = (kv.n_closed, kv.fill, kv.sink_fill, q_pos0)
    grid = (B * H, triton.cdiv(Tq, BM // RPAD))
    if fast:
        out = torch.empty(B, Hq, Tq, D, device=q.device, dtype=q.dtype)
        sig, perm = plane_orders(kv, q.device)
        kr = torch.where(kv.k_scale != 0, kv.k_mn.float() / kv.k_scale.float(), 0.0).to(torch.float16)  # m^K/s^K
        vst = kv.v_scale[:, :, :, perm].transpose(3, 4).contiguous()  # (B, H, NB, G, Π)
        vmx = torch.zeros(*kv.v_mn.shape[:-1], GP, device=q.device, dtype=kv.v_mn.dtype)  # (B, H, NB, Π, GP)
        vmx[..., :G] = kv.v_mn[:, :, :, perm]
        vmx[..., G] = 1.0
        planes = lambda t: t[..., sig].contiguous()  # channels in K's code-plane order
        _prefill_fast_kernel[grid](q.contiguous(), kv.k_codes, planes(kr), planes(kv.k_scale), kv.v_codes, vmx, vst,
                                   planes(kv.sink_k), kv.sink_v, planes(kv.open_k), kv.open_v, *counts, out,
                                   scaling * LOG2E, GP=GP, **shape)
        return out
    qs = (q.float() * (scaling * LOG2E)).view(B, H, R, Tq, D).transpose(2, 3).contiguous()  # (B, H, Tq, R, D)
    out = torch.empty(B, H, Tq, R, D, device=q.device, dtype=q.dtype)
    _prefill_kernel[grid](qs, kv.k_codes, kv.k_mn, kv.k_scale, kv.k_sum, kv.v_codes, kv.v_mn, kv.v_scale, kv.v_sum,
                          kv.sink_k, kv.sink_v, kv.open_k, kv.open_v, *counts, out, OPER=oper, **shape)
    return out.transpose(2, 3).reshape(B, Hq, Tq, D)


def bench_rows(cfg, ceil: dict, time_graph) -> list:
    """`hack bench kernels` prefill section: causal prefill attention at cfg.prefill_context, one sequence of the
    first model, HACK (int8 and fp8 operands: the small-tile kernel; fp16: the large-tile kernel with its defaults)
    against BF16 SDPA (flash), errors against fp32 attention. `python -m hack_kernels.prefill_sweep` times the
    large-tile kernel's launch choices."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hack_kernels import bench_data as bd

    model = cfg.models[0]
    Hq, H, D = bd.SHAPES[model]
    T, scaling = cfg.prefill_context, 1 / math.sqrt(D)
    g = torch.Generator(device="cuda").manual_seed(cfg.seed)
    _, k, v = bd.realistic_kv(1, H, H, T, D, seed=cfg.seed)
    q = torch.randn(1, Hq, T, D, generator=g, device="cuda", dtype=torch.bfloat16)
    q += k.repeat_interleave(Hq // H, 1) * 0.1  # queries that resemble their keys: a diagonal-heavy attention
    flops = 4 * Hq * D * T * T / 2
    rows = []
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + 2048].float(), k.float().repeat_interleave(
        Hq // H, 1)[:, :, :i + 2048], v.float().repeat_interleave(Hq // H, 1)[:, :, :i + 2048], scale=scaling,
        attn_mask=torch.ones(2048, i + 2048, device="cuda", dtype=torch.bool).tril(i)) for i in range(0, T, 2048)], 2)

    def record(method, us, out, **extra):
        err = ((out.float() - ref).norm() / ref.norm()).item()
        rows.append({"model": model, "context": T, "batch": 1, "method": method, "us": us, "bytes": 0, "GBps": 0.0,
                     "copy_frac": 0.0, "TFLOPs": flops / us / 1e6, "rel_err": err, **extra})
        print(f"  prefill {model} T={T} {method:<24} {us:9.1f} us {flops / us / 1e6:6.1f} TFLOP/s err={err:.4f}",
              flush=True)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=True, enable_gqa=True)
        sdpa = time_graph([fn], cfg.replays, min_calls=1)
        record("prefill_bf16_sdpa", sdpa, fn(), vs_sdpa=1.0)
    kv = bd.hack_store(k, v, "channel", cfg.bits, cfg.partition)
    pos0 = torch.zeros(1, dtype=torch.int32, device="cuda")
    for operand in ("int8", "fp16", "fp8"):
        fn = lambda: hack_prefill(kv, q, scaling, pos0, operand=operand)
        us = time_graph([fn], 3, min_calls=1)
        record(f"prefill_hack_p{cfg.partition}_{operand}", us, fn(), vs_sdpa=sdpa / us, operand=operand)
    return rows
