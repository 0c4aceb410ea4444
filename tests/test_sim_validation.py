"""The simulator against the real serving pipeline on this CPU: a CPU profile of the tiny model, real runs of
`hack bench jct` (two processes, gloo, paced link) and their simulated twins over the very same requests.

The CPU is shared (2 cores, other jobs), so compute times of the real run, whose two workers contend for the
cores, drift from the profile taken alone; the link is paced in wall-clock time and does not. The runs are
therefore link-bound (KV crossing a slow link, requests queueing for it, decode admission under a small budget),
which is what the simulator's logic has to get right: FCFS prefill, the link pipelined with the next prefill,
head-of-line admission, iteration-level batching.
"""
import dataclasses

import pytest
import torch
import yaml

from hack_cli.config import ClusterConfig, ModelConfig, TraceConfig
from hack_cli.methods import quant_schema
from hack_cli.serve.bench import JctConfig, serve_many
from hack_cli.serve.metrics import PHASES, read_per_request_csv, summarize
from hack_cli.serve.workers import ServeSpec
from hack_cli.sim.catalog import CATALOG_DIR
from hack_cli.sim.profile import ProfileConfig, load_profile, profile_all
from hack_cli.sim.validate import replay

RUNS = (("fp16", 0.01), ("hack", 0.002))  # (method, link Gbit/s): link-bound for both payload sizes


@pytest.mark.slow
def test_simulated_jct_matches_the_real_cpu_pipeline(tmp_path):
    model = ModelConfig(**yaml.safe_load((CATALOG_DIR.parent / "model" / "tiny.yaml").read_text()))
    trace = TraceConfig(name="val", rate=8.0, num_requests=12, warmup=2, prompt_len=[256, 1024], output_len=[4, 8])
    quants = {m: quant_schema(m)() for m, _ in RUNS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each serving worker does on a CPU
    try:
        profile_all(model, list(quants.items()), torch.device("cpu"),
                    ProfileConfig(lengths=[128, 256, 512, 1024], contexts=[256, 1024], batches=[1, 2, 4], repeats=3,
                                  out=str(tmp_path / "cpu_tiny.json")), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    profile = load_profile(tmp_path / "cpu_tiny.json")
    specs = [ServeSpec(model=model, quant=quants[m], trace=trace, jct=JctConfig(), run_dir=str(tmp_path / m),
                       cluster=ClusterConfig(bandwidth_gbps=bw, decode_kv_budget_gb=0.002)) for m, bw in RUNS]
    for spec, real in zip(specs, serve_many(specs, tmp_path)):
        records = read_per_request_csv(tmp_path / spec.quant.name / "per_request.csv")
        _, sim = replay(records, profile, dataclasses.asdict(spec.quant), spec.cluster.bandwidth_gbps, 0.002)
        sim = summarize(sim, trace.warmup, simulated=True)
        detail = ", ".join(f"{p} {real[p + '_mean']:.3f}/{sim[p + '_mean']:.3f}" for p in PHASES)
        print(f"{spec.quant.name}: mean JCT real {real['jct_mean']:.3f} s, simulated {sim['jct_mean']:.3f} s "
              f"({100 * (sim['jct_mean'] / real['jct_mean'] - 1):+.1f}%); phases real/sim: {detail}")
        assert sim["bytes_sent"] == pytest.approx(real["bytes_sent"], rel=0.01)
        assert sim["jct_mean"] == pytest.approx(real["jct_mean"], rel=0.15), f"{spec.quant.name}: {detail}"
        assert sim["queue_link_mean"] == pytest.approx(real["queue_link_mean"], rel=0.15, abs=0.02), detail
