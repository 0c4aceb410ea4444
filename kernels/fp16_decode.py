"""Ragged-batch split-KV (flash-decoding) decode attention over plain 16-bit K/V: the fp16 baseline's attention.

Layout: k, v (B, H, N, D) fp16/bf16 contiguous, N = token capacity of every sequence; lengths (B,) int32 on the
device, sequence b attends keys [0, lengths[b]) (0 = an inactive slot: output 0). q (B, Hq, D), one new token each.

Graph-safe (for a CUDA-graph-captured decode step): the grid depends only on shapes and host ints — splits are
planned from the capacity, not from the lengths, which only the kernel reads. One program = one (sequence, KV
head) and one split of TPS tokens; it loops over tiles of BN tokens with an online softmax (base 2) and writes a
partial (max, sum, unnormalized output). A split beyond its sequence's length loads nothing and writes an empty
partial (m = -inf, l = 0, acc = 0); `combine` (hack_kernels.decode) merges the splits. The R = Hq/H query
heads of a KV head are the rows of one tile, padded to RP >= 16 (tl.dot's minimum). Dots in the K/V dtype on the GPU
(as SDPA does), fp32 in the interpreter (bf16 tl.dot is broken there), fp32 accumulation. Shapes: R query rows per
KV head (padded to RP), D head dim, BN tokens a tile.

`python -m hack_kernels.fp16_decode` times it against SDPA (flash) for Llama-3.1-8B shapes on CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hack_kernels.common import tail_dot_dtype
from hack_kernels.decode import LOG2E, _online, combine, plan_splits, pow2


@triton.jit(do_not_specialize=["H", "N", "TPS", "NSPLIT"])
def _fp16_kernel(Q, K, V, LEN, PO, PM, PL, H, N, TPS, NSPLIT, QSCALE,
                 R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr):
    pid = tl.program_id(0)  # b·H + h
    split = tl.program_id(1)
    b = pid // H
    rr = tl.arange(0, RP)
    dd = tl.arange(0, D)
    tt = tl.arange(0, BN)
    q = tl.load(Q + (pid * R + rr[:, None]) * D + dd[None, :], mask=rr[:, None] < R, other=0.0).to(DT)  # (RP, D)
    m_i = tl.full([RP], -float("inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    n = tl.load(LEN + b)
    lo = split * TPS
    hi = tl.minimum(lo + TPS, n)  # lo >= hi: an empty split, no loads
    base = pid.to(tl.int64) * N  # first token slot of this (sequence, KV head), int64: B·H·N·D can pass 2^31
    for n0 in range(lo, hi, BN):
        ok = (n0 + tt) < hi  # (BN,) keys beyond the length are masked (never loaded)
        ptr = (base + n0 + tt)[:, None] * D + dd[None, :]  # (BN, D) int64
        k = tl.load(K + ptr, mask=ok[:, None], other=0.0).to(DT)  # (BN, D)
        s = tl.dot(q, tl.trans(k)) * QSCALE  # (RP, BN) base-2 logits
        m_i, l_i, acc, p = _online(tl.where(ok[None, :], s, -float("inf")), m_i, l_i, acc)
        v = tl.load(V + ptr, mask=ok[:, None], other=0.0).to(DT)  # (BN, D)
        acc += tl.dot(p.to(DT), v)
    part = pid * NSPLIT + split
    okr = rr < R
    tl.store(PO + (part * R + rr[:, None]) * D + dd[None, :], acc, mask=okr[:, None])
    tl.store(PM + part * R + rr, m_i, mask=okr)
    tl.store(PL + part * R + rr, l_i, mask=okr)


def fp16_decode(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, q: torch.Tensor, scaling: float,
                capacity: int | None = None, splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                num_stages: int = 2, waves: float | None = None) -> torch.Tensor:
    """q (B, Hq, D) one new token per sequence; k, v (B, H, N, D) fp16/bf16 (N = token capacity per sequence,
    contiguous); lengths (B,) int32 device tensor: sequence b attends keys [0, lengths[b]) (0 = inactive: output 0).
    -> (B, Hq, D) in q's dtype. GQA: the Hq//H query heads of a KV head are the rows of one tile.

    capacity (default N): the most tokens any sequence may hold; splits are planned from it (never from lengths), so
    the launch is the same whatever the lengths. splits: force the number of splits (else about `waves` programs
    per SM: 2 measured best or within 5% of best on an H100 for Llama-3.1-8B shapes, 4K-128K, batch 1 and 8). block_n: tokens a tile (>= 16).
    """
    B, Hq, D = q.shape
    H, N = k.shape[1], k.shape[2]
    R = Hq // H
    assert k.shape == v.shape == (B, H, N, D) and k.is_contiguous() and v.is_contiguous() and Hq == R * H
    assert lengths.shape == (B,) and lengths.dtype == torch.int32 and lengths.device == q.device
    capacity = N if capacity is None else capacity
    assert 0 < capacity <= N and block_n >= 16
    tiles = -(-capacity // block_n)
    waves = waves or 2
    nsplit, per = (plan_splits(B * H, tiles, q.device, waves) if splits is None else (splits, -(-tiles // splits)))
    qf = q.float().contiguous()  # (B, Hq, D); scaled after the dot, so q reaches the dot unrounded
    po = torch.empty(B * H, nsplit, R, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B * H, nsplit, R, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    _fp16_kernel[(B * H, nsplit)](qf, k, v, lengths, po, pm, pl, H, N, per * block_n, nsplit, scaling * LOG2E,
                                  R=R, RP=max(16, pow2(R)), D=D, BN=block_n, DT=tail_dot_dtype(k),
                                  num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    combine(po, pm, pl, out)
    return out


def fp16_decode_reference(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, q: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """fp32 softmax attention of q (B, Hq, D) over keys [0, lengths[b]) of k, v (B, H, N, D) -> (B, Hq, D) fp32."""
    B, Hq, D = q.shape
    R = Hq // k.shape[1]
    out = torch.zeros(B, Hq, D, device=q.device, dtype=torch.float32)
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        kb = k[b, :, :n].float().repeat_interleave(R, 0)  # (Hq, n, D): GQA by repeat
        vb = v[b, :, :n].float().repeat_interleave(R, 0)
        w = torch.softmax(q[b].float()[:, None, :] @ kb.transpose(-1, -2) * scaling, -1)  # (Hq, 1, n)
        out[b] = (w @ vb)[:, 0]
    return out


def do_bench_graph(fn) -> float:
    """ms of fn captured in a CUDA graph (as in the serving engine's decode step: no launch overhead), replayed
    by triton's do_bench, which clears the L2 cache before each replay."""
    fn()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay)


def main() -> None:
    """fp16_decode vs SDPA (flash, GQA as rows) for Llama-3.1-8B (Hq=32, H=8, D=128, bf16), full-length sequences,
    each in a CUDA graph. GB/s: K/V bytes over time."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    assert torch.cuda.is_available(), "needs CUDA"
    Hq, H, D = 32, 8, 128
    R, scaling = Hq // H, D**-0.5
    print(f"{torch.cuda.get_device_name()}  Llama-3.1-8B  Hq={Hq} H={H} D={D} bf16")
    print(f"{'ctx':>7} {'B':>3} {'fp16_decode us':>15} {'GB/s':>7} {'sdpa us':>9} {'GB/s':>7} {'sdpa/ours':>10}"
          f" {'max err':>8}")
    for ctx in (4096, 16384, 32768, 131072):
        for B in (1, 8):
            g = torch.Generator(device="cuda").manual_seed(0)
            k = torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16, generator=g)
            q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
            lengths = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
            q4 = q.view(B, H, R, D)  # (B, H, R, D): the query heads of a KV head as rows
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref = F.scaled_dot_product_attention(q4, k, v, scale=scaling).reshape(B, Hq, D)
                sdpa_ms = do_bench_graph(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scaling))
            out = fp16_decode(k, v, lengths, q, scaling)
            ours_ms = do_bench_graph(lambda: fp16_decode(k, v, lengths, q, scaling))
            err = (out.float() - ref.float()).abs().max().item()
            gb = (k.nbytes + v.nbytes) / 1e9
            print(f"{ctx:>7} {B:>3} {ours_ms * 1e3:>15.1f} {gb / ours_ms * 1e3:>7.0f} {sdpa_ms * 1e3:>9.1f}"
                  f" {gb / sdpa_ms * 1e3:>7.0f} {sdpa_ms / ours_ms:>10.2f} {err:>8.1e}")
            del k, v


if __name__ == "__main__":
    main()
