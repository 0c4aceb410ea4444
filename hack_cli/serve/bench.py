"""`hack bench jct`: job completion times of disaggregated prefill->decode serving of a request trace.

jct.mode=real runs the real system (`hack_cli.serve.workers`: a prefill and a decode process, a rate-limited
link); jct.mode=sim replays the same trace in the simulator (`hack_cli.sim`). Both write per_request.csv (one row
per finished request, flushed as it finishes) and summary.json (`hack_cli.serve.metrics.summarize`) in the run
directory, and return the summary as the run's metrics.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hack_cli.config import check_choice, check_positive
from hack_cli.errors import ConfigError, HackError



@dataclass
class JctConfig:
    mode: str = "real"  # real | sim (the calibrated simulator, hack_cli/sim: same trace, same output schema)
    profile: Optional[str] = None  # sim: a profile JSON from `hack bench profile` (default: found by model)
    backend: str = "auto"  # auto (nccl between two GPUs, else gloo) | gloo | nccl
    # Link chunk (MiB): the pacing granularity. Each chunk costs a send/recv pair and a stream sync on both sides,
    # ~1-2 ms on H100s busy with prefill and a captured decode (results/jct §2d): 1 MiB chunks made a 10 Gbps link
    # deliver ~4.5 Gbps; at 32 MiB (27 ms at 10 Gbps) that cost is a few percent.
    chunk_mb: float = 32.0
    stall_timeout_s: float = 60.0  # a link silent this long (heartbeats included) ends the run
    timeout_s: Optional[float] = None  # whole run, startup included (none: only stalls and deaths end it)
    save_tokens: bool = False  # write every request's output token ids to tokens.jsonl (correctness checks)
    kvquant_random_calibration: bool = False  # quant=kvquant whose calibration file is missing: fit on random tokens
    max_requests: int = 0  # >0: serve only the first N requests of the trace (scaled-down runs)
    # Decode engine: graph = decode slots + one captured CUDA graph per batch bucket (hack_cli/serve/graph.py);
    # eager = the model as transformers runs it, attention per request; auto = graph on CUDA where it applies
    # (fp16, HACK's channel layout, CacheGen, KIVI; Llama/Mistral/Qwen models), else eager. summary.json names the
    # one used.
    engine: str = "auto"
    max_slots: int = 64  # graph engine: most requests decoding at once (also bounded by the KV budget)
    fault: str = "none"  # fault injection for tests: none | kill_prefill | stall_link
    fault_at: int = 1  # the request at which the fault happens

    def __post_init__(self):
        check_choice("jct.mode", self.mode, ("real", "sim"))
        check_choice("jct.backend", self.backend, ("auto", "gloo", "nccl"))
        check_choice("jct.fault", self.fault, ("none", "kill_prefill", "stall_link"))
        check_choice("jct.engine", self.engine, ("auto", "graph", "eager"))
        check_positive("jct.max_slots", self.max_slots)
        check_positive("jct.chunk_mb", self.chunk_mb)
        check_positive("jct.stall_timeout_s", self.stall_timeout_s)
        if self.max_requests < 0:
            raise ConfigError("jct.max_requests", self.max_requests, "expected >= 0 (0: the whole trace)")


def run(job) -> dict:
    jct = job.typed.get("jct", JctConfig())
    if jct.mode == "sim":
        from hack_cli.sim.engine import run_sim

        return run_sim(job)
    from hack_cli.serve.workers import ServeSpec

    t = job.typed
    spec = ServeSpec(model=t["model"], quant=t["quant"], cluster=t["cluster"], trace=t["trace"], jct=jct,
                     run_dir=str(job.run_dir), seed=t["run"].seed)
    summary = serve(spec)
    job.table("per_request_table", _rows(Path(job.run_dir)))
    return summary


def serve(spec) -> dict:
    """Run the real system for `spec`; writes per_request.csv and summary.json in spec.run_dir."""
    return serve_many([spec], spec.run_dir)[0]


def serve_many(specs: list, log_dir) -> list[dict]:
    """Run several specs (one model, several methods/links/traces) with one pair of workers; the summaries."""
    from hack_cli.serve.workers import launch

    if any(s.jct.mode != "real" for s in specs):
        raise HackError("serve() runs jct.mode=real only")
    timeouts = [s.jct.timeout_s for s in specs]
    launch(specs, log_dir, timeout_s=None if None in timeouts else sum(timeouts))
    return [read_summary(s) for s in specs]


def read_summary(spec) -> dict:
    """The summary.json the decode worker wrote when the run of `spec` ended."""
    import json

    return json.loads((Path(spec.run_dir) / "summary.json").read_text())


def summarize_run(spec, engine: str) -> dict:
    from hack_cli.serve.metrics import read_per_request_csv, summarize, write_summary

    records = read_per_request_csv(Path(spec.run_dir) / "per_request.csv")
    summary = summarize(records, spec.trace.warmup, simulated=False)
    steps = Path(spec.run_dir) / "steps.csv"
    if steps.exists():  # decode iterations: mean time and batch (what the decode phase is made of)
        import numpy as np

        rows = np.loadtxt(steps, delimiter=",", skiprows=1, ndmin=2)
        if rows.size:
            summary.update(decode_steps=int(rows.shape[0]), step_mean_s=float(rows[:, 3].mean()),
                           step_batch_mean=float(rows[:, 1].mean()))
    summary.update(method=spec.quant.name, quant=dataclasses.asdict(spec.quant), model=spec.model.name,
                   bandwidth_gbps=spec.cluster.bandwidth_gbps, rate=spec.trace.rate, trace=spec.trace.name,
                   decode_kv_budget_gb=spec.cluster.decode_kv_budget_gb, engine=engine)
    write_summary(Path(spec.run_dir) / "summary.json", summary)
    return summary


def _rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "per_request.csv", newline="") as f:
        return list(csv.DictReader(f))
