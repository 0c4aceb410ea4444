"""`hack bench kernels` (run(job)) and `python -m hack_kernels.bench` (no Hydra needed): decode attention of HACK
against BF16 SDPA, dequant+SDPA and KIVI's fused-dequant kernel, plus the quantize kernel, on real models' shapes.

Every time is the median over replays of a CUDA graph that calls the kernel once per input copy, with enough copies
that the inputs exceed 3x the L2 cache. Reported per row: µs per call, GB/s on the bytes the method must read, the
fraction of the device-to-device copy bandwidth measured in the same run, TFLOP/s, speed-ups against the baselines
of the same case, and the relative error against fp32 attention over the unquantized K/V. Writes bench.csv,
bench.json (rows + card + ceilings + command) and bench.png into the output directory, and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SECTIONS = ("ceilings", "decode", "variants", "quantize", "prefill", "errors")


@dataclass
class KernelBenchConfig:
    """The `kernels:` section of conf/bench_kernels.yaml."""

    models: list[str] = field(default_factory=lambda: ["llama31_8b", "llama31_70b"])
    contexts: list[int] = field(default_factory=lambda: [4096, 16384, 32768, 65536, 131072])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    partition: int = 64  # Π of the main sweep
    bits: int = 2
    operands: list[str] = field(default_factory=lambda: ["int8", "fp16", "fp8"])
    num_warps: list[int] = field(default_factory=lambda: [4])  # of the HACK decode kernel (main sweep)
    # variants: every Π × bits × layout at a few points of the first model (int8 and fp16 operands)
    variant_partitions: list[int] = field(default_factory=lambda: [32, 64, 128])
    variant_bits: list[int] = field(default_factory=lambda: [2, 4])
    variant_layouts: list[str] = field(default_factory=lambda: ["channel", "token"])
    variant_contexts: list[int] = field(default_factory=lambda: [32768, 131072])
    quantize_tokens: int = 16384
    quantize_warps: list[int] = field(default_factory=lambda: [0])  # 0: the kernel's own choice
    prefill_context: int = 16384
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    replays: int = 15
    compile_workers: int = 8  # processes that compile every kernel variant before timing starts
    time_budget_s: float = 600.0  # no new case starts after this
    seed: int = 0
    kv_file: str = ".kvcap/smollm2.pt"  # real Q/K/V for the errors section (python -m hack_kernels.capture_kv)

    def __post_init__(self):
        from hack_kernels.bench_data import SHAPES

        bad = [m for m in self.models if m not in SHAPES] + [s for s in self.sections if s not in SECTIONS]
        bad += [o for o in self.operands if o not in ("int8", "fp8", "fp16")]
        if bad:
            raise ValueError(f"kernels: unknown {bad}; models {sorted(SHAPES)}, sections {SECTIONS}, "
                             f"operands int8/fp8/fp16")


# ------------------------------------------------------------------------------------------------ timing
def time_graph(fns, replays: int, min_calls: int = 16) -> float:
    """Median µs per call of the callables `fns` (one per input copy), captured once in a CUDA graph of at least
    `min_calls` calls."""
    import torch

    for f in fns:  # compile and warm up outside the capture
        f()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    calls = fns * max(1, math.ceil(min_calls / len(fns)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    """Input copies so that one pass over all of them is >= 3x the L2 cache (at most 64)."""
    import torch

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(3 * l2 / max(nbytes, 1))))


def ceilings(replays: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 / int8 matmul rates, measured here."""
    import torch

    src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    us = time_graph([lambda: dst.copy_(src)], replays)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = time_graph([lambda: a @ b], replays)
    a8 = torch.randint(-128, 127, (8192, 8192), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-128, 127, (8192, 8192), device="cuda", dtype=torch.int8).t()
    mm8 = time_graph([lambda: torch._int_mm(a8, b8)], replays)
    return {"copy_GBps": 2 * src.nbytes / us / 1e3, "bf16_TFLOPs": 2 * 8192**3 / mm / 1e6,
            "int8_TOPs": 2 * 8192**3 / mm8 / 1e6}


# ------------------------------------------------------------------------------------------------ decode
def decode_case(model: str, ctx: int, batch: int, hack_cfgs: list[tuple], cfg: KernelBenchConfig, ceil: dict) -> list:
    """One (model, context, batch): the baselines and every HACK (layout, bits, Π, operand) of hack_cfgs."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hack_kernels import bench_data as bd
    from hack_kernels.decode import hack_decode
    from hack_kernels.dequant import dequant_kivi
    from hack_kernels.kivi_decode import kivi_decode

    Hq, H, D = bd.SHAPES[model]
    R, scaling = Hq // H, 1 / math.sqrt(D)
    q, k, v = bd.realistic_kv(batch, Hq, H, ctx, D, seed=cfg.seed)
    ref = bd.attention_fp32(q, k, v, scaling)
    flops = 4 * batch * Hq * ctx * D
    rows = []

    def record(method, us, nbytes, out, **extra):
        err = ((out.float() - ref).norm() / ref.norm()).item()
        rows.append({"model": model, "context": ctx, "batch": batch, "method": method, "us": us,
                     "bytes": nbytes, "GBps": nbytes / us / 1e3, "copy_frac": nbytes / us / 1e3 / ceil["copy_GBps"],
                     "TFLOPs": flops / us / 1e6, "rel_err": err, **extra})
        print(f"  {model} ctx={ctx} B={batch} {method:<28} {us:9.1f} us {nbytes / us / 1e3:7.0f} GB/s err={err:.4f}",
              flush=True)

    # BF16 SDPA (flash): the query heads of a KV head as R query rows of one (non-causal) attention
    sdpa_bytes = k.nbytes + v.nbytes
    n = copies_for(sdpa_bytes)
    kvs = [(k, v)] + [(k.clone(), v.clone()) for _ in range(n - 1)]
    q4 = q.view(batch, H, R, D)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fns = [lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q4, kk, vv, scale=scaling) for kk, vv in kvs]
        us = time_graph(fns, cfg.replays)
        record("bf16_sdpa", us, sdpa_bytes, fns[0]().reshape(batch, Hq, D))
    del kvs, fns

    # KIVI: dequantize to bf16 then SDPA, and the fused-dequant kernel
    kt, res_k, res_v, nq, nres = bd.kivi_store(k, v, bits=2, group=32)
    n_q, n_r = int(nq[0]), int(nres[0])
    kb = bd.kivi_bytes(kt, res_k, n_r)
    kh = torch.empty_like(k)
    vh = torch.empty_like(v)
    kh[:, :, n_q:], vh[:, :, n_q:] = k[:, :, n_q:], v[:, :, n_q:]  # the residual, materialized once

    def deq_sdpa():  # materialize the quantized part into the 16-bit buffers, then SDPA over everything
        dequant_kivi(kt, n_q, 2, 32, out=(kh, vh))
        return F.scaled_dot_product_attention(q4, kh, vh, scale=scaling)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        us = time_graph([deq_sdpa], cfg.replays)
        record("kivi_dequant+sdpa", us, kb + 2 * sdpa_bytes, deq_sdpa().reshape(batch, Hq, D))
    del kh, vh
    n = copies_for(kb)
    stores = [(kt, res_k, res_v)] + [bd.clone_store((kt, res_k, res_v)) for _ in range(n - 1)]
    fns = [lambda s=s: kivi_decode(s[0], s[1], s[2], nq, nres, q, scaling, 2, 32, max_tokens=n_q) for s in stores]
    us = time_graph(fns, cfg.replays)
    record("kivi_fused", us, kb, fns[0]())
    base = {r["method"]: r["us"] for r in rows}
    del stores, fns

    for layout, bits, part, operand, nw in hack_cfgs:
        kv = bd.hack_store(k, v, layout, bits, part)
        hb = bd.hack_bytes(kv)
        n = copies_for(hb)
        stores = [kv] + [bd.clone_store(kv) for _ in range(n - 1)]
        nc = int(kv.n_closed[0])
        fns = [lambda s=s: hack_decode(s, q, scaling, operand=operand, max_blocks=nc, num_warps=nw) for s in stores]
        us = time_graph(fns, cfg.replays)
        record(f"hack_{layout}_b{bits}_p{part}_{operand}_w{nw}", us, hb, fns[0](), layout=layout, bits=bits,
               partition=part, operand=operand, num_warps=nw, vs_sdpa=base["bf16_sdpa"] / us,
               vs_dequant=base["kivi_dequant+sdpa"] / us, vs_fused=base["kivi_fused"] / us)
        del stores, fns
    for r in rows[:3]:
        r["vs_sdpa"] = base["bf16_sdpa"] / r["us"]
    return rows


# ------------------------------------------------------------------------------------------------ quantize
def quantize_rows(cfg: KernelBenchConfig, ceil: dict) -> list:
    """Quantize one layer's fresh K and V (a prefill of quantize_tokens) into HACK's channel layout."""
    import torch

    from hack_kernels.bench_data import SHAPES, realistic_kv
    from hack_kernels.quantize import quantize_blocks

    rows = []
    _, H, D = SHAPES[cfg.models[0]]
    _, k, v = realistic_kv(1, H, H, cfg.quantize_tokens, D, seed=cfg.seed)
    for bits in sorted({cfg.bits, *cfg.variant_bits}):
        for part in sorted({cfg.partition, *cfg.variant_partitions}):
            for nw in cfg.quantize_warps:
                c = min(part, D)
                kb, vb = (x.reshape(-1, part, D) for x in (k, v))
                outs = {}

                def step():
                    outs["k"] = quantize_blocks(kb, bits, c, per_channel=True, token_sums=True, num_warps=nw or None)
                    outs["v"] = quantize_blocks(vb, bits, c, per_channel=False, token_sums=False, num_warps=nw or None,
                                                along_tokens=True)  # as the store keeps V

                us = time_graph([step], cfg.replays)
                nbytes = k.nbytes + v.nbytes + sum(t.nbytes for o in outs.values() for t in o.values())
                rows.append({"model": cfg.models[0], "context": cfg.quantize_tokens, "batch": 1, "method":
                             f"quantize_b{bits}_p{part}_w{nw}", "us": us, "bytes": nbytes, "GBps": nbytes / us / 1e3,
                             "copy_frac": nbytes / us / 1e3 / ceil["copy_GBps"], "bits": bits, "partition": part,
                             "num_warps": nw})
                print(f"  quantize K+V b{bits} Π={part} w{nw}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s "
                      f"({rows[-1]['copy_frac']:.0%} of copy)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ errors
def error_cfgs(cfg: KernelBenchConfig) -> list:
    """HACK configurations of the errors section: every Π and bits, all operands in the channel layout."""
    parts = sorted({cfg.partition, *cfg.variant_partitions})
    out = [("channel", b, p, op, 2) for b in (2, 4) for p in parts for op in ("int8", "fp16", "fp8")]
    return out + [("token", b, cfg.partition, "int8", 2) for b in (2, 4) if "token" in cfg.variant_layouts]


def error_rows(cfg: KernelBenchConfig) -> list:
    """Relative error of every method against fp32 attention over the unquantized K/V, on real attention inputs
    (kv_file): each captured query of a layer is one decode step over the context before the captured queries."""
    import torch
    import torch.nn.functional as F

    from hack_kernels import bench_data as bd
    from hack_kernels.decode import hack_decode
    from hack_kernels.kivi_decode import kivi_decode

    data = torch.load(cfg.kv_file)
    rows, errs = [], {}
    for li, layer in enumerate(data["layers"]):
        q = data["q"][li].cuda().transpose(0, 1).contiguous()  # (Q, Hq, D): one sequence per query
        Qn, Hq, D = q.shape
        N = data["k"].shape[2] - Qn
        k, v = (data[x][li, :, :N].cuda()[None].expand(Qn, -1, -1, -1).contiguous() for x in "kv")  # (Q, H, N, D)
        H, scaling = k.shape[1], 1 / math.sqrt(D)
        ref = bd.attention_fp32(q, k, v, scaling)
        err = lambda out: ((out.float() - ref).norm() / ref.norm()).item()
        outs = {"bf16_sdpa": F.scaled_dot_product_attention(q.view(Qn, H, Hq // H, D).bfloat16(), k.bfloat16(),
                                                            v.bfloat16(), scale=scaling).reshape(Qn, Hq, D)}
        for bits in (2, 4):
            kt, rk, rv, nq, nr = bd.kivi_store(k, v, bits=bits, group=32)
            outs[f"kivi_b{bits}_g32"] = kivi_decode(kt, rk, rv, nq, nr, q, scaling, bits, 32)
        for layout, bits, part, op, nw in error_cfgs(cfg):
            kv = bd.hack_store(k, v, layout, bits, part)
            outs[f"hack_{layout}_b{bits}_p{part}_{op}"] = hack_decode(kv, q, scaling, operand=op, num_warps=nw)
        for name, out in outs.items():
            errs.setdefault(name, []).append(err(out))
    for name, e in errs.items():
        rows.append({"model": "smollm2_real", "context": N, "batch": Qn, "method": name, "us": float("nan"),
                     "bytes": 0, "GBps": float("nan"), "copy_frac": float("nan"), "rel_err": sum(e) / len(e),
                     "rel_err_layers": " ".join(f"{x:.4f}" for x in e)})
        print(f"  real K/V ({data['source']}, layers {data['layers']}): {name:<28} err={sum(e) / len(e):.4f}",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ compile
def _warm(job) -> None:
    """Compile (into Triton's on-disk cache) every kernel one process of `precompile` is given, on tiny inputs:
    the kernels' integer arguments are not specialized on, so the real runs hit the same cache entries."""
    import torch

    from hack_kernels import bench_data as bd
    from hack_kernels.decode import hack_decode
    from hack_kernels.dequant import dequant_kivi
    from hack_kernels.kivi_decode import kivi_decode
    from hack_kernels.quantize import quantize_blocks

    model, hcfgs, quant, kivi_bits, prefill_ops = job
    Hq, H, D = bd.SHAPES[model]
    q, k, v = bd.realistic_kv(1, Hq, H, 700, D)
    for bits in kivi_bits:
        kt, rk, rv, nq, nr = bd.kivi_store(k, v, bits=bits)
        kivi_decode(kt, rk, rv, nq, nr, q, 0.1, bits, 32)
        if bits == 2:
            dequant_kivi(kt, int(nq[0]), 2, 32, out=(torch.empty_like(k), torch.empty_like(v)))
    for layout, bits, part, operand, nw in hcfgs:
        hack_decode(bd.hack_store(k, v, layout, bits, part), q, 0.1, operand=operand, num_warps=nw)
    for bits, part, nw in quant:
        for per_channel in (True, False):
            quantize_blocks(k[0, :, :part * 4].reshape(-1, part, D), bits, min(part, D), per_channel, per_channel,
                            num_warps=nw or None, along_tokens=not per_channel)
    for op in prefill_ops:
        from hack_kernels.prefill import hack_prefill

        kv = bd.hack_store(k, v, "channel", 2, 64)
        hack_prefill(kv, q[:, :, None].expand(-1, -1, 8, -1).contiguous(), 0.1, torch.full((1,), 692, dtype=torch.int32,
                     device=q.device), operand=op)
    torch.cuda.synchronize()


def precompile(cfg: KernelBenchConfig, cases: list) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = {(m, (), (), (2,), ()) for m, *_ in cases}  # KIVI's kernels per attention shape
    for m, _, _, hcfgs in cases:
        jobs |= {(m, (h,), (), (), ()) for h in hcfgs}
    if "quantize" in cfg.sections:
        parts = sorted({cfg.partition, *cfg.variant_partitions})
        jobs |= {(cfg.models[0], (), ((b, p, w),), (), ()) for b in sorted({cfg.bits, *cfg.variant_bits})
                 for p in parts for w in cfg.quantize_warps}
    if "errors" in cfg.sections and Path(cfg.kv_file).exists():
        jobs |= {("smollm2", (h,), (), (), ()) for h in error_cfgs(cfg)} | {("smollm2", (), (), (2, 4), ())}
    if "prefill" in cfg.sections:
        jobs |= {(cfg.models[0], (), (), (), (op,)) for op in ("int8", "fp16", "fp8")}
    with cf.ProcessPoolExecutor(cfg.compile_workers, mp_context=mp.get_context("spawn")) as pool:
        for job, fut in [(j, pool.submit(_warm, j)) for j in sorted(jobs, key=str)]:
            try:
                fut.result()
            except Exception as e:  # the timed run will report it again
                print(f"compile failed for {job}: {type(e).__name__}: {str(e)[-300:]}", flush=True)


# ------------------------------------------------------------------------------------------------ driver
def run_bench(cfg: KernelBenchConfig, out_dir, command: str = "") -> dict:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("hack bench kernels needs a CUDA GPU (run it through the device tool)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    t0 = time.time()
    meta = {"card": card, "command": command, "torch": torch.__version__, "config": asdict(cfg)}
    import triton

    meta["triton"] = triton.__version__
    print(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    ceil = ceilings(cfg.replays) if "ceilings" in cfg.sections else {"copy_GBps": float("nan")}
    meta["ceilings"] = ceil
    print(f"ceilings: {ceil}", flush=True)
    rows = []
    main = [("channel", cfg.bits, cfg.partition, op, w) for op in cfg.operands for w in cfg.num_warps]
    nw = cfg.num_warps[0]
    variants = [(lay, b, p, op, nw) for lay in cfg.variant_layouts for b in cfg.variant_bits
                for p in cfg.variant_partitions for op in ("int8", "fp16")]
    variants = [v for v in variants if v not in main]
    cases = []
    if "decode" in cfg.sections:
        cases += [(m, c, b, main) for m in cfg.models for c in cfg.contexts for b in cfg.batches]
    if "variants" in cfg.sections:
        cases += [(cfg.models[0], c, b, variants) for c in cfg.variant_contexts for b in cfg.batches]
    precompile(cfg, cases)
    print(f"compiled in {time.time() - t0:.0f} s", flush=True)
    for model, ctx, batch, hcfgs in cases:
        if time.time() - t0 > cfg.time_budget_s:
            print(f"time budget spent: skipping {model} ctx={ctx} B={batch}", flush=True)
            continue
        try:
            rows += decode_case(model, ctx, batch, hcfgs, cfg, ceil)
        except Exception as e:  # one failing case must not lose the others
            print(f"FAILED {model} ctx={ctx} B={batch}: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        write(out, rows, meta)
    if "quantize" in cfg.sections:
        rows += quantize_rows(cfg, ceil)
    if "errors" in cfg.sections:
        if Path(cfg.kv_file).exists():
            rows += error_rows(cfg)
        else:
            print(f"errors: no {cfg.kv_file} (python -m hack_kernels.capture_kv)", flush=True)
    if "prefill" in cfg.sections:
        try:
            from hack_kernels.prefill import bench_rows
            rows += bench_rows(cfg, ceil, time_graph)
        except ImportError as e:
            print(f"prefill: not available ({e})", flush=True)
    write(out, rows, meta)
    plot(out, rows, card)
    print(table(rows, card))
    return summary(rows, cfg)


def write(out: Path, rows: list, meta: dict) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("model", "context", "batch", "method"), k))
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    (out / "bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


def summary(rows: list, cfg: KernelBenchConfig) -> dict:
    """Flat metrics: speed-ups of the main HACK configuration (int8) at each (model, context, batch)."""
    name = f"hack_channel_b{cfg.bits}_p{cfg.partition}_int8_w{cfg.num_warps[0]}"
    out = {}
    for r in rows:
        if r["method"] == name:
            key = f"{r['model']}_{r['context'] // 1024}k_b{r['batch']}"
            out[f"{key}_vs_sdpa"] = round(r["vs_sdpa"], 3)
            out[f"{key}_vs_fused"] = round(r["vs_fused"], 3)
    return out


def table(rows: list, card: str) -> str:
    lines = [f"card: {card}",
             f"{'model':<12}{'ctx':>7}{'B':>3} {'method':<30}{'us':>9}{'GB/s':>7}{'copy%':>6}{'xSDPA':>7}"
             f"{'xFused':>7}{'err':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<12}{r['context']:>7}{r['batch']:>3} {r['method']:<30}{r['us']:>9.1f}"
                     f"{r['GBps']:>7.0f}{100 * r['copy_frac']:>6.0f}{r.get('vs_sdpa', float('nan')):>7.2f}"
                     f"{r.get('vs_fused', float('nan')):>7.2f}{r.get('rel_err', float('nan')):>8.4f}")
    return "\n".join(lines)


def plot(out: Path, rows: list, card: str) -> None:
    """bench.png: speed-up over BF16 SDPA against context for the methods of the main sweep, one panel per (model,
    batch); bench_variants.png: every HACK variant (Π, bits, layout, operand) at the variant points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "vs_sdpa" in r and not r["method"].startswith("prefill")]
    spans = {}
    for r in timed:
        spans.setdefault((r["model"], r["method"]), set()).add(r["context"])
    main = [r for r in timed if len(spans[(r["model"], r["method"])]) > 2]
    panels = sorted({(r["model"], r["batch"]) for r in main})
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (model, batch) in zip(axes[0], panels):
            sel = [r for r in main if r["model"] == model and r["batch"] == batch]
            for method in sorted({r["method"] for r in sel}):
                pts = sorted({(r["context"], r["vs_sdpa"]) for r in sel if r["method"] == method})
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.axhline(1, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model}, batch {batch}")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("speed-up vs BF16 SDPA")
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"decode attention, {card}")
        fig.tight_layout()
        fig.savefig(out / "bench.png", dpi=120)
    var = [r for r in timed if r["method"].startswith("hack") and len(spans[(r["model"], r["method"])]) <= 2]
    points = sorted({(r["model"], r["context"], r["batch"]) for r in var})
    if points:
        fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 6), squeeze=False)
        for ax, (model, ctx, batch) in zip(axes[0], points):
            sel = sorted((r for r in timed if (r["model"], r["context"], r["batch"]) == (model, ctx, batch)
                          and r["method"].startswith("hack")), key=lambda r: r["method"])
            ax.barh([r["method"][5:] for r in sel], [r["vs_sdpa"] for r in sel])
            ax.axvline(1, color="gray", lw=0.8)
            ax.tick_params(axis="y", labelsize=6)
            ax.set_title(f"{model}, {ctx // 1024}K, batch {batch}", fontsize=8)
            ax.set_xlabel("speed-up vs BF16 SDPA")
        fig.suptitle(f"HACK decode variants, {card}")
        fig.tight_layout()
        fig.savefig(out / "bench_variants.png", dpi=120)


def run(job) -> dict:
    """`hack bench kernels`: the `kernels:` section, results into the run directory."""
    from hack_cli.errors import HackError

    cfg = job.typed.get("kernels", KernelBenchConfig())
    try:
        return run_bench(cfg, job.run_dir, command="hack bench kernels")
    except RuntimeError as e:
        raise HackError(str(e)) from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hack_kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_kernels")
    for f in ("models", "contexts", "batches", "operands", "sections", "variant_partitions", "variant_bits",
              "variant_layouts", "variant_contexts"):
        p.add_argument("--" + f.replace("_", "-"), nargs="+")
    p.add_argument("--num-warps", nargs="+", type=int)
    p.add_argument("--quantize-warps", nargs="+", type=int)
    for f in ("partition", "bits", "quantize_tokens", "replays", "seed", "compile_workers"):
        p.add_argument("--" + f.replace("_", "-"), type=int)
    p.add_argument("--time-budget-s", type=float)
    p.add_argument("--kv-file")
    p.add_argument("--replot", metavar="BENCH_JSON", help="only redraw the plots of a finished run into --out")
    args = vars(p.parse_args(argv))
    out, replot = args.pop("out"), args.pop("replot")
    if replot:
        data = json.loads(Path(replot).read_text())
        Path(out).mkdir(parents=True, exist_ok=True)
        plot(Path(out), data["rows"], data["card"])
        print(table(data["rows"], data["card"]))
        return
    ints = {"contexts", "batches", "variant_partitions", "variant_bits", "variant_contexts"}
    kw = {k: ([int(x) for x in v] if k in ints else v) for k, v in args.items() if v is not None}
    run_bench(KernelBenchConfig(**kw), out, command="python -m hack_kernels.bench " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
