"""Launch sweep of the quantize kernel: `python -m hack_kernels.tune_quantize` on the GPU (< 60 s on an H100).

One layer's K and V of a prefill (Llama-3.1-8B: 8 KV heads, d = 128, 16K tokens, bf16) quantized as the store keeps
them (K per channel with per-token sums packed along d, V per token packed along the block's tokens), for bits
{2, 4} x Π {32, 64, 128}: the committed one-pass kernel ("v3", kept below verbatim as the baseline) and every launch
variant of kernels/quantize.py. Per row: µs of K, of V and of both (median of CUDA-graph replays, each replay cycling
through enough input and output copies that they exceed 3x the L2 cache, as kernels/bench.py times), GB/s on bytes
read + written, % of the device-to-device copy bandwidth measured in the same run, and whether every output byte
(codes, min, scale, sums) equals v3's. "default" is quantize_blocks without launch arguments (LAUNCH's entries, which
may differ between K and V); `*` marks a variant equal to it for both. kernels/NOTES.md records the outcome.

    python -m hack_kernels.tune_quantize                 # the sweep (GPU)
    python -m hack_kernels.tune_quantize --sass          # registers and SASS instructions per element (no GPU)
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import time

import torch
import triton
import triton.language as tl

from hack_kernels.common import div_rn
from hack_kernels.quantize import kernel_args, launch_config, quantize_blocks, sum_dtype


# ------------------------------------------------------------------------------------------------ baseline (v3)
@triton.jit
def _v3_round_toward(x, MDT: tl.constexpr, DOWN: tl.constexpr):
    y = x.to(MDT)
    yf = y.to(tl.float32)
    bits = y.to(tl.int16, bitcast=True)
    if DOWN:
        step = tl.where(yf > 0, bits - 1, tl.where(yf < 0, bits + 1, -32767))
        off = yf > x
    else:
        step = tl.where(yf > 0, bits + 1, tl.where(yf < 0, bits - 1, 1))
        off = yf < x
    return tl.where(off, step.to(tl.int16).to(MDT, bitcast=True), y).to(tl.float32)


@triton.jit(do_not_specialize=["seed"])
def _v3_kernel(X, CODES, MN, SC, SUMS, seed, PI: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
               BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, TOKEN_SUMS: tl.constexpr, STOCH: tl.constexpr,
               MDT: tl.constexpr, ALONG_TOKENS: tl.constexpr):
    """kernels/quantize.py as committed before the launch variants (commit 9f4e57c): one program a block."""
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
        mn = _v3_round_toward(tl.min(x, axis=0), MDT, True)  # (D,)
        sc = _v3_round_toward((tl.max(x, axis=0) - mn) / LEVELS, MDT, False)
        div = tl.where(sc == 0.0, 1.0, sc)
        t = div_rn(x - mn[None, :], div[None, :], 1.0 / div[None, :])
        tl.store(MN + blk * D + dd, mn.to(MDT))
        tl.store(SC + blk * D + dd, sc.to(MDT))
    else:
        x3 = tl.reshape(x, (PI, G, C))
        mn = _v3_round_toward(tl.min(x3, axis=2), MDT, True)  # (PI, G)
        sc = _v3_round_toward((tl.max(x3, axis=2) - mn) / LEVELS, MDT, False)
        div = tl.where(sc == 0.0, 1.0, sc)
        t = tl.reshape(div_rn(x3 - mn[:, :, None], div[:, :, None], 1.0 / div[:, :, None]), (PI, D))
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


def _v3_consts(bits: int, P: int, D: int, group: int, per_channel: bool, token_sums: bool, along_tokens: bool):
    return dict(PI=P, D=D, G=D // group, BITS=bits, PER_CHANNEL=per_channel, TOKEN_SUMS=token_sums, STOCH=False,
                MDT=tl.float16, ALONG_TOKENS=along_tokens)


def quantize_v3(x, bits, group, per_channel, token_sums, along_tokens=False, out=None):
    """The baseline kernel on whole blocks x (NBLK, Π, D), nearest rounding, fp16 meta: quantize_blocks' dict."""
    nblk, P, D = x.shape
    warps = 2 if P * D <= 8192 else 4
    _v3_kernel[(nblk,)](x, out["codes"], out["mn"], out["scale"], out["sums"], 0,
                        **_v3_consts(bits, P, D, group, per_channel, token_sums, along_tokens), num_warps=warps)
    return out


# ------------------------------------------------------------------------------------------------ variants
# The store's two calls: K per channel with per-token sums (packed along d), V per token packed along the tokens.
TENSORS = {"K": dict(per_channel=True, token_sums=True, along_tokens=False),
           "V": dict(per_channel=False, token_sums=False, along_tokens=True)}


def variants(P: int, D: int, sms: int, nblk: int) -> list[tuple[str, dict]]:
    """(name, quantize_blocks launch arguments) swept at partition P; nblk blocks of K (and of V), sms SMs. Names:
    w = num_warps, c = channels a program (a split), p = programs an SM of a persistent grid looping over the
    blocks, s = num_stages of that loop, ch = chunks of 8 channels a thread, evict = evict_first loads, reg =
    maxnreg."""
    w0 = 2 if P * D <= 8192 else 4
    one = dict(channels=D, blocks_per_program=1, num_stages=1)
    persistent = lambda per_sm, split=1: math.ceil(nblk * split / (per_sm * sms))
    out = [(f"w{w}", dict(num_warps=w, **one)) for w in sorted({max(1, w0 // 2), w0, 2 * w0})]
    if P <= D // 2:  # a group of min(Π, D) channels fits in half the channels: split blocks in two programs
        half = dict(channels=D // 2, blocks_per_program=1, num_stages=1)
        out += [(f"c{D // 2} w{w}", dict(num_warps=w, **half)) for w in sorted({max(1, w0 // 2), w0})]
        out += [(f"c{D // 2} w{w0} ch2", dict(num_warps=w0, chunks=2, **half)),
                (f"c{D // 2} p4 s2 w{w0}", dict(num_warps=w0, channels=D // 2, num_stages=2,
                                                 blocks_per_program=persistent(4, 2)))]
    for per_sm, stages, w in ((4, 1, w0), (4, 2, w0), (4, 3, w0), (2, 2, w0), (2, 3, w0), (8 // w0, 2, 2 * w0)):
        out.append((f"p{per_sm} s{stages} w{w}", dict(num_warps=w, channels=D, num_stages=stages,
                                                      blocks_per_program=persistent(per_sm))))
    out += [(f"p{8 // w0} s2 w{2 * w0} ch2", dict(num_warps=2 * w0, channels=D, num_stages=2, chunks=2,
                                                   blocks_per_program=persistent(8 // w0)))]
    out += [(f"w{w0} ch{c}", dict(num_warps=w0, chunks=c, **one)) for c in (2, 4)]
    out += [(f"w{w0} evict", dict(num_warps=w0, evict_first=True, **one)),
            (f"w{w0} reg128", dict(num_warps=w0, maxnreg=128, **one))]
    return [(name, {"chunks": 1, **kw}) for name, kw in out]  # every argument explicit: no table default leaks in


def is_default(launch: dict, bits: int, P: int, D: int, group: int, nblk: int, sms: int) -> bool:
    """Whether `launch` is what quantize_blocks picks without arguments, for both K and V."""
    if launch.get("evict_first") or launch.get("maxnreg"):
        return False
    cfg = lambda t, **kw: launch_config(bits, P, D, group, t["per_channel"], t["token_sums"], nblk, sms, **kw)
    return all(cfg(t) == cfg(t, **launch) for t in TENSORS.values())


def _warm(job) -> None:
    """Compile one (bits, Π, launch) for K and V into Triton's cache on two blocks (nblk is not specialized on)."""
    bits, P, D, launch = job
    x = torch.randn(2, P, D, device="cuda").bfloat16()
    for t in TENSORS.values():
        if launch is None:
            quantize_v3(x, bits, min(P, D), out=quantize_blocks(x, bits, min(P, D), **t), **t)
        else:
            quantize_blocks(x, bits, min(P, D), **t, **launch)
    torch.cuda.synchronize()


def precompile(jobs: list, workers: int) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for job, fut in [(j, pool.submit(_warm, j)) for j in jobs]:
            try:
                fut.result()
            except Exception as e:  # the timed run reports it again
                print(f"compile failed for {job[:3]}: {type(e).__name__}: {str(e)[-300:]}", flush=True)


# ------------------------------------------------------------------------------------------------ sweep
def sweep(a) -> None:
    from hack_kernels.bench import copies_for, time_graph
    from hack_kernels.bench_data import SHAPES, realistic_kv

    t0 = time.time()
    _, H, D = SHAPES[a.model]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"card: {torch.cuda.get_device_name(0)} ({sms} SMs); torch {torch.__version__}; triton {triton.__version__}",
          flush=True)
    cases = [(b, p) for b in a.bits for p in a.partitions]
    plans = {(b, p): variants(p, D, sms, H * a.tokens // p) for b, p in cases}
    plans = {c: [(n, kw) for n, kw in v if not a.only or any(s in n for s in a.only)] for c, v in plans.items()}
    precompile([(b, p, D, None) for b, p in cases] + [(b, p, D, kw) for (b, p), v in plans.items() for _, kw in v],
               a.workers)
    print(f"compiled in {time.time() - t0:.0f} s", flush=True)
    src = torch.empty(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / time_graph([lambda: dst.copy_(src)], a.replays) / 1e3
    del src, dst
    print(f"copy bandwidth (read + write, 512 MiB): {copy:.0f} GB/s", flush=True)
    _, k, v = realistic_kv(1, H, H, a.tokens, D, seed=0)
    rows = []
    for bits, P in cases:
        group = min(P, D)
        xs = {"K": k.reshape(-1, P, D), "V": v.reshape(-1, P, D)}
        copies, outs, ref = {}, {}, {}
        for name, t in TENSORS.items():
            ref[name] = quantize_v3(xs[name], bits, group, out=quantize_blocks(xs[name], bits, group, **t), **t)
            nbytes = xs[name].nbytes + sum(o.nbytes for o in ref[name].values())
            copies[name] = [xs[name]] + [xs[name].clone() for _ in range(copies_for(nbytes) - 1)]
            outs[name] = [{n: o.clone() for n, o in ref[name].items()} for _ in copies[name]]
        nbytes = {n: copies[n][0].nbytes + sum(o.nbytes for o in ref[n].values()) for n in TENSORS}
        print(f"{bits}-bit Π={P}: K {nbytes['K'] / 1e6:.1f} MB, V {nbytes['V'] / 1e6:.1f} MB read + written; "
              f"{len(copies['K'])} copies", flush=True)
        for vname, launch in [("v3", None), ("default", {})] + plans[(bits, P)]:
            if time.time() - t0 > a.time_budget_s:
                print(f"  time budget spent: skipping {vname}", flush=True)
                continue
            us, exact = {}, True
            try:
                for name, t in TENSORS.items():
                    if launch is None:
                        run = lambda x, o, t=t: quantize_v3(x, bits, group, out=o, **t)
                    else:
                        run = lambda x, o, t=t: quantize_blocks(x, bits, group, out=o, **t, **launch)
                    us[name] = time_graph([lambda x=x, o=o: run(x, o) for x, o in zip(copies[name], outs[name])],
                                          a.replays)
                    # every byte written again, into outputs that differ from v3's everywhere
                    probe = {n: o.view(torch.int16 if o.element_size() == 2 else torch.uint8).bitwise_xor(1)
                             .view(o.dtype) for n, o in ref[name].items()}
                    run(copies[name][0], probe)
                    exact &= all(torch.equal(probe[n], ref[name][n]) for n in ref[name])
            except Exception as e:
                print(f"  {vname:<14} FAILED {type(e).__name__}: {str(e)[-300:]}", flush=True)
                continue
            total = us["K"] + us["V"]
            gbps = (nbytes["K"] + nbytes["V"]) / total / 1e3
            mark = "*" if launch and is_default(launch, bits, P, D, group, H * a.tokens // P, sms) else " "
            rows.append(dict(bits=bits, partition=P, variant=vname, default=mark == "*", us_k=us["K"], us_v=us["V"],
                             us=total, GBps=gbps, copy_frac=gbps / copy, exact=exact))
            print(f" {mark}{vname:<14} K {us['K']:6.1f} µs  V {us['V']:6.1f} µs  K+V {total:6.1f} µs "
                  f"{gbps:6.0f} GB/s {100 * gbps / copy:4.0f}% of copy  {'exact' if exact else 'DIFFERS from v3'}",
                  flush=True)
        del copies, outs, ref
        torch.cuda.empty_cache()
    print("best per case (K+V):")
    for bits, P in cases:
        sel = [r for r in rows if (r["bits"], r["partition"]) == (bits, P) and r["exact"]]
        if sel:
            best = min(sel, key=lambda r: r["us"])
            bk = min(sel, key=lambda r: r["us_k"])
            bv = min(sel, key=lambda r: r["us_v"])
            print(f"  {bits}-bit Π={P}: {best['variant']} {best['us']:.1f} µs "
                  f"{100 * best['copy_frac']:.0f}% of copy; fastest K {bk['variant']} {bk['us_k']:.1f}, "
                  f"fastest V {bv['variant']} {bv['us_v']:.1f}")
    if a.csv and rows:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ SASS
def sass(a) -> None:
    """Registers and SASS instructions per element of K's and V's kernel for every variant (sm_90a, no GPU; use the
    GPU machine's Triton, e.g. PYTHONPATH=/tmp/t36 after `pip install --target /tmp/t36 triton==3.6.0`)."""
    from hack_kernels.quantize import _quantize_kernel
    from hack_kernels.sass import compile_sm90, loops

    D, sms = 128, 132
    print(f"triton {triton.__version__}, sm_90a, D = {D}, bf16 in, fp16 meta; instructions per warp for one block "
          f"(the loop body with blocks_per_program > 1) x warps, per element of the program's tile")
    for bits in a.bits:
        for P in a.partitions:
            group = min(P, D)
            nblk = 8 * a.tokens // P
            for vname, launch in [("v3", None), ("default", {})] + variants(P, D, sms, nblk):
                if a.only and vname not in ("v3", "default") and not any(s in vname for s in a.only):
                    continue
                line = []
                for name, t in TENSORS.items():
                    sums = "*u8" if sum_dtype(group if t["token_sums"] else P, bits) == torch.uint8 else "*i16"
                    sig = {"CODES": "*u8", "MN": "*fp16", "SC": "*fp16", "SUMS": sums}
                    if launch is None:
                        warps, cs, body = 2 if P * D <= 8192 else 4, D, False
                        res, code = compile_sm90(_v3_kernel, {**sig, "X": "*bf16"},
                                                 _v3_consts(bits, P, D, group, **t), {"num_warps": warps})
                    else:
                        lc = {k: launch.get(k) for k in ("num_warps", "channels", "blocks_per_program", "num_stages",
                                                         "chunks")}
                        warps, cs, bpp, stages, ch = launch_config(bits, P, D, group, t["per_channel"],
                                                                   t["token_sums"], nblk, sms, **lc)
                        consts = kernel_args(bits, P, D, group, t["per_channel"], t["token_sums"],
                                             t["along_tokens"], torch.bfloat16, torch.float16, False, warps, cs, bpp,
                                             stages, ch, launch.get("evict_first", False))
                        opts = {"num_warps": warps, **({"maxnreg": launch["maxnreg"]} if "maxnreg" in launch else {})}
                        res, code = compile_sm90(_quantize_kernel, {**sig, "X": "*i32"}, consts, opts)
                        body = bpp > 1
                    n = len(max(loops(code), key=len)) if body else len(re.findall(r"/\*[0-9a-f]+\*/\s+.*?;", code))
                    regs = res.split("REG:")[1].split()[0]
                    line.append(f"{name}: {regs:>3} regs {n:5d} x{warps} = {n * warps * 32 / (P * cs):5.2f}/elem")
                print(f"{bits}-bit Π={P:<3} {vname:<14} " + "   ".join(line), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hack_kernels.tune_quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama31_8b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    p.add_argument("--partitions", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--only", nargs="+", help="variants whose name contains one of these (v3 and default always run)")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--workers", type=int, default=14, help="processes compiling the variants before timing")
    p.add_argument("--time-budget-s", type=float, default=55.0, help="no new variant starts after this")
    p.add_argument("--csv", help="also write the rows here")
    p.add_argument("--sass", action="store_true", help="print registers and instructions per element; no GPU")
    a = p.parse_args(argv)
    if a.sass:
        return sass(a)
    if not torch.cuda.is_available():
        raise SystemExit("the sweep needs a CUDA GPU (--sass does not)")
    sweep(a)


if __name__ == "__main__":
    main()
