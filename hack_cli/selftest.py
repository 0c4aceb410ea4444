"""`hack selftest` (hidden): HACK's quantizer on random tensors, one row per step, in seconds and without a model.

Real work with honest numbers — reconstruction error against the rounding bound, code sums against the codes,
bytes against FP16 — so the tests of multirun, the results store, W&B and resume run the harness end to end.
Each step draws its own seeded tensor, so a resumed run writes exactly the rows an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from hack_cli.config import check_positive
from hack_cli.errors import ConfigError, HackError
from hack_cli.methods.hack.quantizer import META_DTYPES, dequantize, pack, quantize


@dataclass
class SelftestConfig:
    steps: int = 8  # rows: one random tensor quantized per step
    numel: int = 4096  # elements per tensor (a multiple of quant.partition)

    def __post_init__(self):
        check_positive("selftest.steps", self.steps)
        check_positive("selftest.numel", self.numel)


def step_row(step: int, numel: int, quant, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(1, numel, generator=gen)  # (1, N)
    codes, mn, scale, sums = quantize(x, quant.bits, quant.partition, quant.rounding, META_DTYPES[quant.meta_dtype],
                                      generator=gen)  # (1, N), (1, N/Π) x3
    err = (dequantize(codes, mn, scale, quant.partition) - x).abs()  # (1, N)
    err_over_scale = err.reshape(-1, quant.partition) / scale.float().reshape(-1, 1)  # (N/Π, Π)
    nbytes = pack(codes, quant.bits).numel() + mn.numel() * mn.element_size() + scale.numel() * scale.element_size() \
        + sums.numel() * sums.element_size()
    return {
        "key": step,
        "rmse": err.pow(2).mean().sqrt().item(),
        "max_err_over_scale": err_over_scale.max().item(),
        "sums_ok": bool((codes.reshape(-1, quant.partition).sum(-1) == sums.reshape(-1).int()).all()),
        "bytes": nbytes,
    }


def run(job) -> dict:
    cfg, quant = job.typed["selftest"], job.typed["quant"]
    if quant.name != "hack":
        raise HackError(f"hack selftest exercises HACK's quantizer: use quant=hack (got quant={quant.name})")
    if cfg.numel % quant.partition:
        raise ConfigError("selftest.numel", cfg.numel, f"expected a multiple of quant.partition={quant.partition}")

    rows = job.rows("steps")
    for step in job.progress(range(cfg.steps), total=cfg.steps, desc="selftest"):
        if step not in rows.done:
            rows.write(step_row(step, cfg.numel, quant, job.typed["run"].seed))
    # Round to nearest errs by at most half a step, stochastic rounding by less than one step.
    bound = 0.5 if quant.rounding == "nearest" else 1.0
    worst = max(r["max_err_over_scale"] for r in rows.rows)
    return {
        "steps": len(rows.rows),
        "rmse": sum(r["rmse"] for r in rows.rows) / len(rows.rows),
        "max_err_over_scale": worst,
        "within_bound": worst <= bound + 1e-3,  # + fp16 rounding of the stored min and scale
        "sums_ok": all(r["sums_ok"] for r in rows.rows),
        "bytes_vs_fp16": rows.rows[0]["bytes"] / (cfg.numel * 2),
    }
