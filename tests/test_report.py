"""`hack report`: builds from a fixture results tree (measured + simulated runs, a profile, accuracy) and says
what is missing, without crashing, when inputs are absent."""
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from hack_cli.config import ClusterConfig, ModelConfig, TraceConfig
from hack_cli.methods import quant_schema
from hack_cli.report.build import build
from hack_cli.sim.engine import run_sim
from hack_cli.sim.validate import simulate_twins

LLAMA8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
LLAMA70B = {**LLAMA8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64}
VARIANTS = {"fp16": ("fp16", {}, 1.0), "hack": ("hack", {}, 0.18), "hack_v1": ("hack", {"layout": "token",
            "quantized_prefill": True, "rounding": "stochastic", "sink_tokens": 0}, 0.18),
            "hack_p32": ("hack", {"partition": 32}, 0.22), "hack_p128": ("hack", {"partition": 128}, 0.16)}


def quant(label):
    name, fields, _ = VARIANTS[label]
    return quant_schema(name)(**fields)


def write_profile(path: Path) -> None:
    tokens = [1024, 4096, 16384]
    methods = {}
    for label, (_, _, ratio) in VARIANTS.items():
        attn = 1e-9 if label == "hack_v1" else 2e-9  # homomorphic prefill attention at twice the FP16 rate
        methods[label] = {
            "quant": dataclasses.asdict(quant(label)),
            "measured": {"date": "2026-11-26T00:00:00+00:00", "torch": "2.11.0", "triton": "3.6.0"},
            "phases": {"prefill": {"features": ["1", "L", "L2"], "coef": [0.01, 5e-5, attn]},
                       "compress": {"features": ["1", "L"], "coef": [1e-3, 1e-7 * ratio]},
                       "install": {"features": ["1", "L"], "coef": [1e-3, 1e-7 * ratio]},
                       "decode": {"features": ["1", "B", "C"], "coef": [0.02, 1e-3, 4e-8 * ratio]}},
            "bytes": {"tokens": tokens, "payload": [int(131072 * ratio * t) for t in tokens],
                      "stored": [int(131072 * ratio * t) for t in tokens], "header": 400}}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": "hack-sim-profile", "version": 1, "card": "h100",
                                "device_name": "NVIDIA H100 80GB HBM3",
                                "model": {"name": "llama31_8b", "dtype": "bfloat16", "architecture": LLAMA8B,
                                          "weight_bytes": 16_060_522_496}, "methods": methods}))


def sim_run(run_dir: Path, profile: Path, label: str, model="llama31_8b", arch=LLAMA8B, **cluster) -> dict:
    trace = TraceConfig(name="long", rate=0.3, num_requests=12, warmup=2, prompt_len=[4096, 8192],
                        output_len=[32, 64])
    cl = ClusterConfig(name="sim", **{"prefill_gpu": "a10g", "decode_gpu": "a100", "decode_kv_budget_gb": 40.0,
                                      **cluster})
    typed = {"model": ModelConfig(name=model, weights="random", architecture=arch, dtype="bfloat16"),
             "quant": quant(label), "cluster": cl, "trace": trace,
             "jct": SimpleNamespace(profile=str(profile), max_requests=0)}
    run_dir.mkdir(parents=True)
    cfg = {k: dataclasses.asdict(v) for k, v in typed.items() if k != "jct"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_sim(SimpleNamespace(typed=typed, run_dir=run_dir))


def make_results(root: Path) -> None:
    profile = root / "profiles" / "h100_llama31_8b.json"
    write_profile(profile)
    n = 0
    for gpu in ("a10g", "v100", "a100"):
        for label in ("fp16", "hack", "hack_v1"):
            sim_run(root / "sim" / "gpus_8b" / str(n), profile, label, prefill_gpu=gpu)
            n += 1
    for i, label in enumerate(("fp16", "hack")):
        sim_run(root / "sim" / "gpus_70b" / str(i), profile, label, "llama31_70b", LLAMA70B, prefill_gpu="v100_32")
    for i, label in enumerate(("hack_p32", "hack", "hack_p128")):
        sim_run(root / "sim" / "partition" / str(i), profile, label)
    for i, label in enumerate(("fp16", "hack")):
        for j, bw in enumerate((1.0, 10.0, 50.0)):
            sim_run(root / "sim" / "bandwidth" / f"{i}{j}", profile, label, bandwidth_gbps=bw)
        # a "measured" run on the profiled card (a simulation, its mean JCT made 5% longer), replayed by
        # simulate_twins
        real = root / "jct" / "long" / label
        summary = sim_run(real, profile, label, prefill_gpu="h100", decode_gpu="h100")
        (real / "summary.json").write_text(json.dumps({**summary, "simulated": False,
                                                       "jct_mean": summary["jct_mean"] * 1.05}))
    assert simulate_twins(root, [("jct", profile)]) == 2
    acc = root / "accuracy" / "essays"
    acc.mkdir(parents=True)
    (acc / "accuracy_table.csv").write_text("task,method,score,n,diff,ci95\nqa,fp16,50.0,20,,\n"
                                            "qa,hack-channel-b2-p64,49.0,20,-1.0,0.5\n"
                                            "qa,hack-channel-b2-p32,49.5,20,-0.5,0.5\n"
                                            "qa,hack-channel-b2-p128,48.0,20,-2.0,0.5\n")


def test_report_builds_from_results_and_is_reproducible(tmp_path):
    make_results(tmp_path / "results")
    out = tmp_path / "results" / "report"
    metrics = build(tmp_path / "results", out)
    text = (out / "REPORT.md").read_text()
    assert metrics["figures"] >= 6 and metrics["claims_with_ours"] >= 8
    for fig in ("validation.png", "jct_gpus_llama31_8b.png", "breakdown.png", "bandwidth.png", "partition.png",
                "memory.png"):
        assert (out / fig).stat().st_size > 1000 and f"]({fig})" in text
    assert "| fp16 | long | 0.3 | 10 | 40 | 12 |" in text and "+" not in text.split("within 10%")[0][-5:]
    assert "-4.8%" in text  # the twin is 1/1.05 of the "measured" JCT
    assert "18.0% of fp16" in text  # §6: payload bytes per token from the profile
    # V100 has no INT8: the homomorphic prefill attention loses its 2x (INT8 vs FP16) advantage there, A100 keeps it
    claim = next(line for line in text.splitlines() if "compute gain vanishes" in line)
    assert "a100: attention term x1.00 of h100's" in claim and "v100: attention term x2.00 of h100's" in claim
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    build(tmp_path / "results", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_report_says_what_is_missing(tmp_path):
    metrics = build(tmp_path / "results", tmp_path / "out")
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert metrics["figures"] == 0 and metrics["claims_with_ours"] == 0
    assert text.count("_Missing:") >= 6 and "hack bench jct -m experiment=sim_gpus_8b" in text
    assert "missing: `hack eval accuracy" in text


def test_superseded_measured_runs_are_left_out(tmp_path):
    from hack_cli.report.results import load_runs

    for name, extra in (("old", {"superseded_by": "jct/new", "superseded_because": "engine bug"}), ("new", {})):
        (tmp_path / "jct" / name).mkdir(parents=True)
        (tmp_path / "jct" / name / "summary.json").write_text(json.dumps(
            {"method": "fp16", "model": "llama31_8b", "trace": "long", "rate": 0.3, "jct_mean": 1.0, **extra}))
    runs = load_runs(tmp_path)
    assert list(runs["dir"]) == ["jct/new"]


def test_measured_runs_of_different_cards_are_never_averaged(tmp_path):
    """Two bundles of measured runs (two cards): the breakdown reads one bundle (the last by name unless
    report.measured_bundle names one), and the artifact claim pairs fp16 with HACK within each folder."""
    phases = ("queue_prefill", "prefill", "compress", "queue_link", "transfer", "queue_decode", "install", "decode")
    for bundle, scale in (("gpu_a", 1.0), ("gpu_b", 2.0)):
        for method, jct in (("fp16", 8.0), ("hack", 6.0)):
            run = tmp_path / "results" / "jct" / bundle / "rates" / method
            run.mkdir(parents=True)
            summary = {"method": method, "model": "llama31_8b", "trace": "long", "rate": 0.3, "bandwidth_gbps": 10.0,
                       "jct_mean": jct * scale, **{f"{p}_mean": jct * scale / len(phases) for p in phases}}
            (run / "summary.json").write_text(json.dumps(summary))
    build(tmp_path / "results", tmp_path / "out")
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "`jct/gpu_b`" in text and "| fp16 | 2.000 |" in text and "| fp16 | 1.500 |" not in text
    claim = next(line for line in text.splitlines() if "mean JCT 24.13" in line)
    assert "8.00 → 6.00 s (-25.0%, gpu_a/rates)" in claim and "16.00 → 12.00 s (-25.0%, gpu_b/rates)" in claim


def test_partition_scores_use_only_tasks_measured_at_every_partition(tmp_path):
    """A task run at Π=64 only (a hard one, score 0) must not pull Π=64's mean below the others'."""
    import re

    make_results(tmp_path / "results")
    extra = tmp_path / "results" / "accuracy" / "hard"
    extra.mkdir(parents=True)
    (extra / "accuracy_table.csv").write_text("model,task,method,score,n,diff,ci95\nm,qb,fp16,40.0,20,,\n"
                                              "m,qb,hack-channel-b2-p64,0.0,20,-40.0,5.0\n")
    build(tmp_path / "results", tmp_path / "results" / "report")
    text = (tmp_path / "results" / "report" / "REPORT.md").read_text()
    assert re.search(r"\| 64 \| [\d.]+ \| 49\.0 \|", text) and re.search(r"\| 32 \| [\d.]+ \| 49\.5 \|", text)
