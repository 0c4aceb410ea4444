"""Homomorphic causal prefill attention over HACK's channel layout (HACK.md §4; `quantized_prefill`).

Flash-style: one program = one (sequence, KV head) and a tile of BM query tokens; its rows are (query token, query
head of the KV head) pairs, so GQA shares every K/V block read. Each closed block goes through the decode kernel's
homomorphic products (`_scores_channel` / `_values_channel`: q̃ = q·s^K quantized per row and channel group, P̃ =
P·s^V quantized per row and group, integer or fp16/fp8 dots, cached sums) under a causal mask; the sinks and the
16-bit open block follow in the same online softmax. Queries are the last Tq tokens of each sequence.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hack_kernels.common import dot_dtypes, interpreting, tail_dot_dtype
from hack_kernels.decode import LOG2E, HackKV, _online, _scores_channel, _tail16, _values_channel, pow2


@triton.jit(do_not_specialize=["H", "NBMAX", "S", "TQ"])
def _prefill_kernel(Q, KC, KMN, KSC, KSUM, VC, VMN, VSC, VSUM, SK, SV, OK, OV, NCL, FILL, SFILL, QPOS, OUT,
                    H, NBMAX, S, TQ, R: tl.constexpr, RPAD: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                    PI: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, SP: tl.constexpr, OPER: tl.constexpr,
                    DT: tl.constexpr, TDT: tl.constexpr, ASM: tl.constexpr):
    RP: tl.constexpr = BM * RPAD
    pid = tl.program_id(0)  # b·H + h
    tile = tl.program_id(1)
    b = pid // H
    rr = tl.arange(0, RP)
    dd = tl.arange(0, D)
    tok = tile * BM + rr // RPAD  # query token of each row
    head = rr % RPAD
    ok = (tok < TQ) & (head < R)
    rows = (pid.to(tl.int64) * TQ + tok) * R + head  # rows of Q / OUT viewed as (B, H, TQ, R, D)
    q = tl.load(Q + rows[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)  # (RP, D) fp32, base-2 scaled
    qpos = tl.load(QPOS + b) + tok  # (RP,) each row's position
    m_i = tl.full([RP], -float("inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    nc = tl.load(NCL + b)
    last = tl.load(QPOS + b) + tl.minimum(tile * BM + BM, TQ) - 1  # the tile's latest query position
    hi = tl.minimum(nc, (last - S) // PI + 1)
    tt = tl.arange(0, PI)
    for blk in range(0, hi):
        bb = pid.to(tl.int64) * NBMAX + blk
        s = _scores_channel(q, bb, KC, KMN, KSC, KSUM, RP, D, PI, G, BITS, OPER, DT, ASM)
        s = tl.where(S + blk * PI + tt[None, :] <= qpos[:, None], s, -float("inf"))
        m_i, l_i, acc, p = _online(s, m_i, l_i, acc)
        acc += _values_channel(p, bb, VC, VMN, VSC, VSUM, RP, D, PI, G, BITS, OPER, DT, ASM)
    m_i, l_i, acc = _tail16(q, qpos, m_i, l_i, acc, q, q, q, q, q, pid, b, nc, KC, KMN, KSC, KSUM, SK, SV, OK, OV,
                            FILL, SFILL, NBMAX, S, RP, D, PI, G, BITS, SP, 0, OPER, DT, TDT, ASM)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + rows[:, None] * D + dd[None, :], out, mask=ok[:, None])


def hack_prefill(kv: HackKV, q: torch.Tensor, scaling: float, q_pos0: torch.Tensor, operand: str = "int8",
                 block_rows: int = 16, num_warps: int = 4) -> torch.Tensor:
    """Causal attention of q (B, Hq, Tq, D), the last Tq tokens of each sequence (q_pos0 (B,) int32: position of
    the first), over kv (channel layout) -> (B, Hq, Tq, D) in q's dtype. block_rows = query tokens x heads a tile:
    16 (with G = 2 channel groups, a 32-row dot); 64 rows make Triton 3.6 pick wgmma and fail to compile
    (kernels/NOTES.md)."""
    if kv.layout != "channel":
        raise ValueError("hack_prefill covers the channel layout")
    B, Hq, Tq, D = q.shape
    H = kv.k_codes.shape[1]
    R = Hq // H
    RPAD = pow2(R)
    BM = max(1, block_rows // RPAD)
    oper, dt = dot_dtypes(operand)
    qs = (q.float() * (scaling * LOG2E)).view(B, H, R, Tq, D).transpose(2, 3).contiguous()  # (B, H, Tq, R, D)
    out = torch.empty_like(qs, dtype=q.dtype)
    S = kv.sink_k.shape[2]
    _prefill_kernel[(B * H, triton.cdiv(Tq, BM))](
        qs, kv.k_codes, kv.k_mn, kv.k_scale, kv.k_sum, kv.v_codes, kv.v_mn, kv.v_scale, kv.v_sum, kv.sink_k,
        kv.sink_v, kv.open_k, kv.open_v, kv.n_closed, kv.fill, kv.sink_fill, q_pos0, out,
        H, kv.k_codes.shape[2], S, Tq, R=R, RPAD=RPAD, BM=BM, D=D, PI=kv.partition, G=kv.groups, BITS=kv.bits,
        SP=max(16, pow2(S)), OPER=oper, DT=dt, TDT=tail_dot_dtype(kv.sink_k), ASM=not interpreting(),
        num_warps=num_warps)
    return out.transpose(2, 3).reshape(B, Hq, Tq, D)


def bench_rows(cfg, ceil: dict, time_graph) -> list:
    """`hack bench kernels` prefill section: causal prefill attention at cfg.prefill_context, one sequence of the
    first model, HACK (int8 and fp16 operands) against BF16 SDPA (flash), errors against fp32 attention."""
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
    for operand in ("int8", "fp16"):
        fn = lambda: hack_prefill(kv, q, scaling, pos0, operand=operand)
        us = time_graph([fn], 3, min_calls=1)
        record(f"prefill_hack_p{cfg.partition}_{operand}", us, fn(), vs_sdpa=sdpa / us, operand=operand)
    return rows
