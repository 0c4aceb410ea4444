"""Launch-parameter sweep for the HACK decode kernel: `python -m hack_kernels.tune` on the GPU.

Times every (bits, Π, operand, blocks per iteration, num_warps, num_stages, maxnreg, waves) combination at a few
(context, batch) points of one model, next to BF16 SDPA in the same run, and prints one line per variant with its
relative error against fp32 attention over the unquantized K/V (kernels/NOTES.md records the outcome). Blocks per
iteration > 1 only exist for fp16 operands (the channel layout's fast path); other operands run 1. `--against FILE`
also times the `hack_decode` of another version of kernels/decode.py (`git show REV:kernels/decode.py > FILE`) at
its own defaults, in the same process on the same inputs: a before/after of a kernel change.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import sys

import torch


def main(argv=None) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hack_kernels import bench_data as bd
    from hack_kernels.bench import copies_for, time_graph
    from hack_kernels.decode import hack_decode

    p = argparse.ArgumentParser(prog="python -m hack_kernels.tune")
    p.add_argument("--model", default="llama31_8b")
    p.add_argument("--points", nargs="+", default=["131072x1", "131072x8", "32768x1"], help="CONTEXTxBATCH")
    p.add_argument("--operands", nargs="+", default=["int8", "fp16"])
    p.add_argument("--warps", nargs="+", type=int, default=[2])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--maxnreg", nargs="+", type=int, default=[0])
    p.add_argument("--waves", nargs="+", type=float, default=[0], help="programs per SM; 0: hack_decode's choice")
    p.add_argument("--blocks-per-iter", nargs="+", type=int, default=[1], help="NB (1, 2, 4); fp16 operands only")
    p.add_argument("--partition", nargs="+", type=int, default=[64])
    p.add_argument("--bits", nargs="+", type=int, default=[2])
    p.add_argument("--against", help="another kernels/decode.py whose hack_decode to time at its defaults")
    a = p.parse_args(argv)
    other = None
    if a.against:
        spec = importlib.util.spec_from_file_location("hack_kernels.decode_against", a.against)
        other = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up
        spec.loader.exec_module(other)
    Hq, H, D = bd.SHAPES[a.model]
    scaling = 1 / math.sqrt(D)
    err = lambda out: ((out.float() - ref).norm() / ref.norm()).item()
    print(f"card: {torch.cuda.get_device_name(0)}", flush=True)
    for point in a.points:
        ctx, batch = map(int, point.split("x"))
        q, k, v = bd.realistic_kv(batch, Hq, H, ctx, D)
        ref = bd.attention_fp32(q, k, v, scaling)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            q4 = q.view(batch, H, Hq // H, D)
            sdpa_fn = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scaling)
            sdpa = time_graph([sdpa_fn], 10)
            print(f"{a.model} ctx={ctx} B={batch}: bf16 SDPA {sdpa:.1f} us err={err(sdpa_fn().view(q.shape)):.4f}",
                  flush=True)
        for bits, part in itertools.product(a.bits, a.partition):
            kv = bd.hack_store(k, v, "channel", bits, part)
            nbytes, nc = bd.hack_bytes(kv), int(kv.n_closed[0])
            stores = [kv] + [bd.clone_store(kv) for _ in range(copies_for(nbytes) - 1)]
            print(f" {bits}-bit Π={part}: HACK reads {nbytes / 1e6:.1f} MB", flush=True)
            for op in a.operands if other else []:
                us = time_graph([lambda s=s: other.hack_decode(s, q, scaling, operand=op, max_blocks=nc)
                                 for s in stores], 10)
                print(f"  {op:<5} {a.against} (its defaults) {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s "
                      f"x{sdpa / us:.2f} SDPA err={err(other.hack_decode(kv, q, scaling, operand=op)):.4f}", flush=True)
            for op, nb, w, st, reg, wv in itertools.product(a.operands, a.blocks_per_iter, a.warps, a.stages,
                                                            a.maxnreg, a.waves):
                if nb > 1 and op != "fp16":
                    continue
                kw = dict(operand=op, max_blocks=nc, num_warps=w, num_stages=st, maxnreg=reg or None,
                          waves=wv or None, blocks_per_iter=nb)
                name = f"{op:<5} nb{nb} w{w} s{st} r{reg:<3} waves{wv:<4}"
                try:
                    us = time_graph([lambda s=s: hack_decode(s, q, scaling, **kw) for s in stores], 10)
                except Exception as e:
                    print(f"  {name}: FAILED {type(e).__name__}: {str(e)[-200:]}", flush=True)
                    continue
                print(f"  {name} {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s x{sdpa / us:.2f} SDPA "
                      f"err={err(hack_decode(kv, q, scaling, **kw)):.4f}", flush=True)
            del stores, kv
        del q, k, v, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
