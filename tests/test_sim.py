"""The JCT simulator: GPU catalog, roofline scaling, discrete-event engine invariants."""
import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from hack_cli.errors import HackError
from hack_cli.serve.metrics import PHASES, summarize
from hack_cli.serve.trace import Request
from hack_cli.sim.catalog import VALUE_FIELDS, catalog, get_gpu
from hack_cli.sim.engine import simulate
from hack_cli.sim.roofline import Arch, Costs

LLAMA8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
LLAMA70B = {**LLAMA8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64}


def entry(name, prefill=(0.01, 4e-5, 2e-9), decode=(0.02, 1e-3, 1e-7), bytes_per_token=131072, **quant):
    tokens = [1024, 4096, 16384]
    return {"quant": {"name": name, **quant},
            "phases": {"prefill": {"features": ["1", "L", "L2"], "coef": list(prefill)},
                       "compress": {"features": ["1", "L"], "coef": [1e-3, 1e-7]},
                       "install": {"features": ["1", "L"], "coef": [1e-3, 2e-7]},
                       "decode": {"features": ["1", "B", "C"], "coef": list(decode)}},
            "bytes": {"tokens": tokens, "payload": [bytes_per_token * t for t in tokens],
                      "stored": [bytes_per_token * t for t in tokens], "header": 500}}


def profile(card="h100", **methods):
    return {"card": card, "model": {"name": "llama31_8b", "dtype": "bfloat16", "architecture": LLAMA8B,
                                    "weight_bytes": 16_060_522_496}, "methods": methods}


def costs(prof, label, prefill_gpu="local", decode_gpu="local", arch=LLAMA8B, gbps=10.0):
    return Costs(prof, prof["methods"][label], arch, "bfloat16", prefill_gpu, decode_gpu, gbps)


# ---------------------------------------------------------------------------------------------- catalog
def test_catalog_has_the_cards_and_every_value_has_a_source():
    cards = catalog()
    for key in ("a10g", "t4", "l4", "v100", "a100_40", "a100_80", "a100", "h100", "h200"):
        gpu = cards[key]
        for f in VALUE_FIELDS:
            assert f in gpu.sources and len(gpu.sources[f]) > 10, (key, f)
        assert gpu.memory_bandwidth_gbs > 0 and gpu.fp16_tflops > 0 and gpu.instances[0]["network_gbps"] > 0
    assert cards["v100"].int8_tops is None and cards["v100"].bf16_tflops is None
    assert cards["t4"].bf16_tflops is None and cards["t4"].int8_tops == 130
    assert cards["a100"].name == "a100_80"
    assert cards["h100"].fp8_tflops == cards["h100"].int8_tops == 2 * cards["h100"].bf16_tflops


def test_missing_int8_falls_back_to_fp16():
    assert get_gpu("v100").rate("int8") == (125e12, "fp16")
    assert get_gpu("t4").rate("bf16") == (65e12, "fp16")
    assert get_gpu("a100").rate("fp8") == (312e12, "fp16")
    with pytest.raises(HackError, match="not in the catalog"):
        get_gpu("tpu")


# ---------------------------------------------------------------------------------------------- roofline
def test_profiled_card_is_not_scaled():
    prof = profile(fp16=entry("fp16"))
    a, b = costs(prof, "fp16"), costs(prof, "fp16", "h100", "h100")
    for L in (1000, 8000):
        assert a.prefill(L) == pytest.approx(b.prefill(L)) == pytest.approx(0.01 + 4e-5 * L + 2e-9 * L * L)
    assert a.decode_step([100, 200]) == pytest.approx(0.02 + 2e-3 + 300e-7)


def test_memory_bound_phases_scale_by_bandwidth_and_compute_by_rate():
    prof = profile(fp16=entry("fp16"))
    h100, a10g = costs(prof, "fp16"), costs(prof, "fp16", "a10g", "a10g")
    bw = 3350 / 600
    assert a10g.install(4096) - a10g.coef["install"]["coef"][0] == pytest.approx(2e-7 * 4096 * bw)
    assert a10g.coef["decode"]["coef"][2] == pytest.approx(1e-7 * bw)
    assert a10g.coef["prefill"]["coef"][1] == pytest.approx(4e-5 * 989.5 / 70)
    assert a10g.coef["prefill"]["coef"][0] == pytest.approx(0.01)  # host overhead: not scaled
    assert a10g.prefill(8192) > h100.prefill(8192)


def test_v100_has_no_int8_so_homomorphic_prefill_gain_vanishes():
    # On the H100 the homomorphic (INT8) attention runs exactly at the INT8/FP16 peak ratio faster than FP16.
    gain = 1979 / 989.5
    fp16 = entry("fp16")
    hack = entry("hack", prefill=(0.01, 4e-5, 2e-9 / gain), quantized_prefill=True)
    prof = profile(fp16=fp16, hack=hack)
    attn = lambda c: c.coef["prefill"]["coef"][2]  # noqa: E731
    assert attn(costs(prof, "hack")) / attn(costs(prof, "fp16")) == pytest.approx(1 / gain)
    assert attn(costs(prof, "hack", "a100", "a100")) / attn(costs(prof, "fp16", "a100", "a100")) == pytest.approx(1 / gain)
    assert attn(costs(prof, "hack", "v100", "a100")) == pytest.approx(attn(costs(prof, "fp16", "v100", "a100")))
    split = {(r["phase"], r["feature"]): r["bound"] for r in costs(prof, "hack", "v100", "a100").split()}
    assert split[("prefill", "L2")] == "compute:int8" and split[("decode", "C")] == "memory"


def test_a_model_that_does_not_fit_runs_tensor_parallel():
    prof = profile(fp16=entry("fp16"))
    c = costs(prof, "fp16", "a10g", "a100", arch=LLAMA70B)
    assert c.tp_prefill == 8 and c.tp_decode == 2  # 141 GB of bf16 weights: 8 x 24 GB, 2 x 80 GB
    assert c.prefill(4096) > c.coef["prefill"]["coef"][1] * 4096  # the all-reduces add time
    assert Arch.of(LLAMA70B).kv_width / Arch.of(LLAMA8B).kv_width == 2.5
    assert c.payload_bytes(4096) == pytest.approx(2.5 * 131072 * 4096)
    with pytest.raises(HackError, match="do not fit"):
        costs(prof, "fp16", "t4", "t4", arch={**LLAMA70B, "num_hidden_layers": 400})


def test_cpu_profile_cannot_be_scaled_to_a_gpu():
    prof = profile("cpu", fp16=entry("fp16"))
    costs(prof, "fp16")  # local: fine
    with pytest.raises(HackError, match="CPU profile"):
        costs(prof, "fp16", "a10g", "a100")


# ---------------------------------------------------------------------------------------------- engine
def _trace(n=40, seed=0, rate=2.0):
    rng = np.random.default_rng(seed)
    t = np.concatenate([[0], np.cumsum(rng.exponential(1 / rate, n - 1))])
    return [Request(i, float(t[i]), int(rng.integers(1000, 8000)), int(rng.integers(1, 64))) for i in range(n)]


def _run(budget_gb=1.1, label="fp16", bpt=131072):
    prof = profile(fp16=entry("fp16", bytes_per_token=bpt))
    return simulate(_trace(), costs(prof, label), budget_gb * 1e9, warmup=3)


def test_phases_add_up_and_instances_are_fcfs():
    recs = _run()
    for r in recs:
        assert sum(r.phase(p) for p in PHASES) == pytest.approx(r.jct)
        assert all(r.phase(p) >= 0 for p in PHASES)
    for a, b in zip(recs, recs[1:]):
        assert b.prefill_start >= a.compress_end  # one prefill at a time, in arrival order
        assert b.send_start >= a.recv_end  # one payload on the link at a time
        assert b.admit >= a.admit  # admission in order, no overtaking


def test_decode_budget_is_never_exceeded_and_frees_on_finish():
    budget = 1.1e9  # one request at a time, mostly
    recs = _run(budget / 1e9)
    events = sorted([(r.admit, r.kv_reserved_bytes) for r in recs] + [(r.finish, -r.kv_reserved_bytes) for r in recs],
                    key=lambda e: (e[0], e[1]))  # frees first at equal times
    used = 0
    for _, delta in events:
        used += delta
        assert used <= budget
    assert max(r.phase("queue_decode") for r in recs) > 0  # the budget did bind in this trace
    roomy = _run(100.0)
    # Without a binding budget a request waits only for the iteration in flight (and earlier installs).
    assert max(r.phase("queue_decode") for r in roomy) < 0.1 * max(r.phase("queue_decode") for r in recs)
    assert np.mean([r.jct for r in roomy]) < np.mean([r.jct for r in recs])


def test_smaller_kv_means_less_queueing_and_bytes():
    big, small = _run(bpt=131072), _run(bpt=131072 * 18 // 100)
    assert summarize(small, 3)["jct_mean"] < summarize(big, 3)["jct_mean"]
    assert summarize(small, 3)["bytes_sent"] < summarize(big, 3)["bytes_sent"]


def test_simulation_is_deterministic():
    a, b = _run(), _run()
    assert [dataclasses.astuple(r) for r in a] == [dataclasses.astuple(r) for r in b]


def test_tokens_and_reservation_follow_the_serving_semantics():
    recs = _run(100.0)
    for r in recs:
        assert r.first_token == r.install_end
        assert r.kv_reserved_bytes == math.ceil(r.payload_bytes * (r.prompt_len + r.output_len) / r.prompt_len)
        assert r.bytes_sent == r.payload_bytes + 500
        if r.output_len == 1:
            assert r.finish == r.install_end


def test_request_larger_than_the_budget_is_an_error():
    with pytest.raises(HackError, match="decode KV"):
        _run(0.1)


# ---------------------------------------------------------------------------------------------- profile and bytes
def test_fit_recovers_the_cost_model():
    from hack_cli.sim.profile import fit

    rows = [{"L": L, "prefill": 0.02 + 3e-5 * L + 4e-10 * L * L} for L in (512, 2048, 4096, 8192, 16384)]
    got = fit("prefill", rows)
    assert got["coef"] == pytest.approx([0.02, 3e-5, 4e-10], rel=1e-6) and got["max_rel_err"] < 1e-9
    rows = [{"B": B, "C": B * C, "decode": 0.06 + 0.014 * B + 6e-8 * B * C} for B in (1, 4, 8) for C in (2048, 16384)]
    assert fit("decode", rows)["coef"] == pytest.approx([0.06, 0.014, 6e-8], rel=1e-6)


@pytest.mark.parametrize("quant", [{"name": "hack"}, {"name": "hack", "partition": 32}, {"name": "kivi"},
                                   {"name": "fp16"}])
def test_exact_bytes_extend_periodically_to_long_prompts(quant):
    from hack_cli.methods import quant_schema
    from hack_cli.sim.payload import BASE, PERIOD, _layer_bytes, exact_bytes

    full = dataclasses.asdict(quant_schema(quant["name"])(**quant))
    key = (json.dumps(full, sort_keys=True), 2, 64, "bfloat16")
    for tokens in (BASE + PERIOD + 5, BASE + 3 * PERIOD + 77):  # built directly vs from two short stores
        assert exact_bytes(full, 3, 2, 64, "bfloat16", tokens) == tuple(3 * x for x in _layer_bytes(*key, tokens))


def test_method_labels_and_profile_lookup():
    from hack_cli.methods import quant_schema
    from hack_cli.sim.profile import method_entry, method_label

    hack = dataclasses.asdict(quant_schema("hack")())
    v1 = {**hack, "layout": "token", "quantized_prefill": True}
    assert [method_label(q) for q in (hack, v1, {**hack, "partition": 32}, {"name": "kivi"},
                                      {**hack, "operand": "fp16"}, {**hack, "partition": 32, "operand": "fp8"})] == \
        ["hack", "hack_v1", "hack_p32", "kivi", "hack_fp16dot", "hack_p32_fp8dot"]
    prof = profile(hack=entry("hack", **{k: v for k, v in hack.items() if k != "name"}))
    assert method_entry(prof, {**hack, "seed": 7, "backend": "reference"})[0] == "hack"
    with pytest.raises(HackError, match="no method with quant"):
        method_entry(prof, v1)
    # a profile written before a field existed (here quant.operand) matches that field's default, nothing else
    old = profile(hack=entry("hack", **{k: v for k, v in hack.items() if k not in ("name", "operand")}))
    assert method_entry(old, hack)[0] == "hack"
    with pytest.raises(HackError, match="no method with quant"):
        method_entry(old, {**hack, "operand": "fp16"})


def test_profile_fitted_to_measured_runs_recovers_costs_and_replays(tmp_path):
    """`sim.fit_runs`: per-request phases and every decode iteration of a run -> the profile's phase models."""
    import csv

    from hack_cli.methods import quant_schema
    from hack_cli.sim.fit_runs import build
    from hack_cli.sim.profile import method_entry

    run = tmp_path / "hack_r0.3_bw10_n6"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"method": "hack"}))
    cols = ["rid", "prompt_len", "warmup", "prefill", "compress", "install", "payload_bytes", "bytes_sent"]
    with open(run / "per_request.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerow([0, 8000, True, 9.9, 9.9, 9.9, 1, 2])  # warm-up: compiles kernels, must not enter the fit
        for rid, L in enumerate((4000, 8000, 12000, 16000), 1):
            w.writerow([rid, L, False, 0.05 + 3e-5 * L + 1e-9 * L * L, 0.01 + 1e-7 * L, 0.02, 21_000 * L,
                        21_000 * L + 500])
    with open(run / "steps.csv", "w") as f:
        f.write("start_s,batch,context_tokens,step_s\n")
        for i, (b, c) in enumerate([(1, 15000), (2, 30000), (4, 61000), (6, 90000), (3, 47000)]):
            f.write(f"{i},{b},{c},{0.03 + 0.01 * b + 1e-7 * c}\n")
    fp16dot = tmp_path / "hack-operand-fp16_r0.3_bw10_n6"  # the same records, run with another quant config
    shutil.copytree(run, fp16dot)
    (fp16dot / "summary.json").write_text(json.dumps({"method": "hack", "quant": {
        **dataclasses.asdict(quant_schema("hack")()), "operand": "fp16"}}))
    prof = build("llama31_8b", "h100", "NVIDIA H100 80GB HBM3", [run, fp16dot])
    assert prof["model"]["weight_bytes"] == 16_060_522_496 and list(prof["methods"]) == ["hack", "hack_fp16dot"]
    assert prof["methods"]["hack"]["quant"]["operand"] == "int8"  # a run without `quant`: the method's defaults
    assert method_entry(prof, {**prof["methods"]["hack"]["quant"], "operand": "fp16"})[0] == "hack_fp16dot"
    e = prof["methods"]["hack"]
    assert e["quant"]["name"] == "hack" and len(e["points"]["prompt"]) == 4
    assert e["phases"]["decode"]["coef"] == pytest.approx([0.03, 0.01, 1e-7], rel=1e-3)
    assert e["phases"]["prefill"]["coef"] == pytest.approx([0.05, 3e-5, 1e-9], rel=1e-3)
    assert e["bytes"]["tokens"] == [4000, 8000, 12000, 16000] and e["bytes"]["header"] == 500
    recs = simulate([Request(i, 2.0 * i, 8000, 16) for i in range(4)], costs(prof, "hack"), 40e9, warmup=0)
    assert recs[0].payload_bytes == 21_000 * 8000
    assert recs[0].phase("prefill") == pytest.approx(0.05 + 3e-5 * 8000 + 1e-9 * 8000**2, rel=1e-3)


def test_bench_gpu_runs_name_their_quant_overrides(tmp_path):
    """`bench_gpu --run hack,operand=fp16:...`: the override reaches the quant config and the run's folder name;
    a malformed run is a one-line error."""
    from hack_cli.serve.bench_gpu import build_specs, main

    p = dict(model="tiny", weights=None, dtype=None, cluster="local", budget_gb=None, trace="small", warmup=1,
             stall_timeout_s=5.0, chunk_mb=1.0, seed=0, out=str(tmp_path))
    specs = build_specs(argparse.Namespace(**p, run=["hack,operand=fp16,partition=32:0.5:10:4", "fp16:0.5:10:4:2"]))
    assert (specs[0].quant.operand, specs[0].quant.partition, specs[1].quant.name) == ("fp16", 32, "fp16")
    assert [Path(s.run_dir).name for s in specs] == ["hack-operand-fp16-partition-32_r0.5_bw10_n4", "fp16_r0.5_bw10_n4"]
    assert [s.trace.warmup for s in specs] == [1, 2]  # --warmup, then the run's own WARMUP field
    for bad in ("hack,operand:0.5:10:4", "fp16:0.5:10:4:1:2"):
        with pytest.raises(HackError, match="METHOD\\[,FIELD=VALUE...\\]"):
            main(["--run", bad])


def test_decode_fit_of_runs_keeps_the_rare_slow_steps(tmp_path):
    """Steps that close a block (one in 64 here, 8x a plain step) are real decode time: the profile fitted to a run
    predicts its mean step, where a fit of relative error would predict the plain steps."""
    from hack_cli.sim.fit_runs import decode_points
    from hack_cli.sim.profile import feature_matrix, fit

    steps = tmp_path / "steps.csv"
    rows = [(b, 15000 * b, (0.08 if i % 64 == 0 else 0.01) + 0.001 * b) for i in range(2048) for b in (1 + i % 3,)]
    steps.write_text("start_s,batch,context_tokens,step_s\n" + "".join(f"{i},{b},{c},{s}\n"
                                                                      for i, (b, c, s) in enumerate(rows)))
    points = decode_points(tmp_path)
    mean = np.mean([p["decode"] for p in points])
    predict = lambda f: float(np.mean(feature_matrix(f["features"], points) @ np.array(f["coef"])))
    assert predict(fit("decode", points, relative=False)) == pytest.approx(mean, rel=0.01)
    assert predict(fit("decode", points)) < 0.95 * mean  # the relative fit: the plain steps only
