"""Causal prefill of Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head dim 128) on the GPU: BF16 SDPA
(flash), HACK's small-tile kernel (int8 operands) and the large-tile kernel (fp16 operands) over a few
(block rows, warps, stages), 2-bit Π = 64, one sequence. Prints µs, TFLOP/s (causal: 2·2·Hq·D·T²/2 FLOPs), the
speed-up over SDPA and the relative error of the last 2048 query tokens against fp32 attention over the unquantized
K/V.

    python -m hack_kernels.prefill_sweep [--contexts 16384 4096] [--configs 64x4x2 128x8x2]

Every kernel variant is compiled first by a pool of processes (Triton's cache), so the sweep takes well under 90 s.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing as mp
import time

import torch

MODEL = "llama31_8b"
CONFIGS = ["64x4x2", "64x4x3", "128x8x2", "128x8x3"]  # block rows x num_warps x num_stages
TAIL = 2048  # query tokens the error is measured on


def _variants(configs: list[str]) -> list[tuple]:
    """(operand, block rows, warps, stages): the small-tile kernel (int8, its defaults), then fp16 per config."""
    return [("int8", None, None, None)] + [("fp16", *map(int, c.split("x"))) for c in configs]


def _warm(variant) -> None:
    """Compile one variant on a small store (the kernels' integer arguments are not specialized on)."""
    from hack_kernels import bench_data as bd
    from hack_kernels.prefill import hack_prefill

    op, rows, warps, stages = variant
    Hq, H, D = bd.SHAPES[MODEL]
    _, k, v = bd.realistic_kv(1, H, H, 700, D)
    q = torch.randn(1, Hq, 64, D, device="cuda", dtype=torch.bfloat16)
    hack_prefill(bd.hack_store(k, v, "channel", 2, 64), q, 0.1, torch.full((1,), 636, dtype=torch.int32,
                 device="cuda"), operand=op, block_rows=rows, num_warps=warps, num_stages=stages)
    torch.cuda.synchronize()


def case(T: int, variants: list[tuple], replays: int) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hack_kernels import bench_data as bd
    from hack_kernels.bench import time_graph
    from hack_kernels.prefill import hack_prefill

    Hq, H, D = bd.SHAPES[MODEL]
    scaling = 1 / math.sqrt(D)
    g = torch.Generator(device="cuda").manual_seed(0)
    _, k, v = bd.realistic_kv(1, H, H, T, D)
    q = torch.randn(1, Hq, T, D, generator=g, device="cuda", dtype=torch.bfloat16)
    q += k.repeat_interleave(Hq // H, 1) * 0.1  # queries that resemble their keys: a diagonal-heavy attention
    n = min(TAIL, T)
    kf, vf = (x.float().repeat_interleave(Hq // H, 1) for x in (k, v))
    ref = F.scaled_dot_product_attention(q[:, :, -n:].float(), kf, vf, scale=scaling, attn_mask=torch.ones(
        n, T, device="cuda", dtype=torch.bool).tril(T - n))  # (1, Hq, n, D) fp32
    del kf, vf
    flops = 4 * Hq * D * T * T / 2
    err = lambda out: ((out[:, :, -n:].float() - ref).norm() / ref.norm()).item()
    line = lambda name, us, e, base: print(f"T={T:6d} {name:<26} {us:10.1f} us {flops / us / 1e6:7.1f} TFLOP/s "
                                           f"x{base / us:5.2f} SDPA  err={e:.4f}", flush=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=True, enable_gqa=True)
        sdpa = time_graph([fn], replays, min_calls=1)
        line("bf16_sdpa", sdpa, err(fn()), sdpa)
    kv = bd.hack_store(k, v, "channel", 2, 64)
    pos0 = torch.zeros(1, dtype=torch.int32, device="cuda")
    for op, rows, warps, stages in variants:
        fn = lambda: hack_prefill(kv, q, scaling, pos0, operand=op, block_rows=rows, num_warps=warps,
                                  num_stages=stages)
        name = "old_int8" if rows is None else f"hack_{op}_bm{rows}_w{warps}_s{stages}"
        try:
            us = time_graph([fn], 3 if op == "int8" else replays, min_calls=1)
            line(name, us, err(fn()), sdpa)
        except Exception as e:  # one failing variant must not lose the others
            print(f"T={T:6d} {name:<26} FAILED {type(e).__name__}: {str(e)[-200:]}", flush=True)


def main(argv=None) -> None:
    import triton

    p = argparse.ArgumentParser(prog="python -m hack_kernels.prefill_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", nargs="+", type=int, default=[16384, 4096])
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="BLOCKROWSxWARPSxSTAGES of the large-tile kernel")
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="processes compiling the variants")
    a = p.parse_args(argv)
    t0 = time.time()
    print(f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    variants = _variants(a.configs)
    with cf.ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn")) as pool:
        for v, fut in [(v, pool.submit(_warm, v)) for v in variants]:
            try:
                fut.result()
            except Exception as e:  # the timed run reports it again
                print(f"compile failed for {v}: {type(e).__name__}: {str(e)[-300:]}", flush=True)
    print(f"compiled {len(variants)} variants in {time.time() - t0:.0f} s", flush=True)
    for T in a.contexts:
        case(T, variants, a.replays)
        torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
