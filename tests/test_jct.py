"""`hack bench jct` on the CPU: the link's pacing, payload packing, and real two-process runs of every method
(phases add up to each request's JCT, bytes and transfer times are physical, outputs match local generation),
and faults (a dead prefill worker, a stalled link) ending the run with one clear line, finished rows kept."""
import json
import time
from pathlib import Path

import pytest
import torch

from hack_cli.config import ClusterConfig, TraceConfig
from hack_cli.errors import HackError
from hack_cli.hf.models import model_config
from hack_cli.methods import METHODS, quant_schema
from hack_cli.serve.bench import JctConfig, serve, serve_many
from hack_cli.serve.link import Pacer, pack_payload, unpack_payload
from hack_cli.serve.metrics import PHASES, read_per_request_csv
from hack_cli.serve.workers import ServeSpec

BANDWIDTH_GBPS = 0.02  # slow enough that a tiny model's payload takes measurable time (~25 ms)


def test_pacer_holds_the_rate():
    pacer = Pacer(0.08)  # 10 MB/s
    t0 = time.monotonic()
    for _ in range(20):
        pacer.release(50_000)
    elapsed = time.monotonic() - t0
    assert 0.1 <= elapsed < 0.15  # 1 MB at 10 MB/s; deadlines are absolute, so sleep jitter does not add up
    time.sleep(0.05)  # an idle link does not bank credit
    t1 = time.monotonic()
    pacer.release(100_000)
    assert 0.01 <= time.monotonic() - t1 < 0.04


def test_pack_unpack_exact():
    layers = [{"codes": torch.randint(0, 255, (2, 3, 5), dtype=torch.uint8), "mn": torch.randn(2, 7).half()},
              {"k": torch.randn(3, 4, dtype=torch.bfloat16), "n": torch.arange(5)}]
    buf, manifest = pack_payload(layers)
    assert buf.dtype == torch.uint8 and buf.numel() == sum(t.nbytes for d in layers for t in d.values())
    back = unpack_payload(buf, manifest, 2)
    for a, b in zip(layers, back):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def spec_for(method, run_dir, **jct):
    return ServeSpec(model=model_config("tiny"), quant=quant_schema(method)(name=method),
                     cluster=ClusterConfig(bandwidth_gbps=BANDWIDTH_GBPS, decode_kv_budget_gb=1.0),
                     trace=TraceConfig(num_requests=6, rate=4.0, warmup=1, prompt_len=[160, 256]),
                     jct=JctConfig(kvquant_random_calibration=True, **jct),
                     run_dir=str(run_dir))


FP16_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 2  # tiny: layers x (K, V) x kv heads x head_dim x 2 bytes


CORE = ("fp16", "hack")


def test_real_runs_core_methods(tmp_path):
    """fp16 and HACK served by one pair of workers (one spawn, one model load), run after run."""
    specs = [spec_for(m, tmp_path / m, save_tokens=True) for m in CORE]
    for spec, summary in zip(specs, serve_many(specs, tmp_path)):
        assert summary["engine"] == "eager"
        check_run(spec.quant.name, Path(spec.run_dir), summary)


def run_graph_engine(methods, tmp_path):
    specs = [spec_for(m, tmp_path / m, save_tokens=True, engine="graph") for m in methods]
    for spec, summary in zip(specs, serve_many(specs, tmp_path)):
        assert summary["engine"] == "graph"
        check_run(spec.quant.name, Path(spec.run_dir), summary)


def test_real_runs_graph_engine(tmp_path):
    """The same runs with the graph decode engine (slots, one kernel call per layer; eager on CPU, the kernels in
    the interpreter): phases, bytes, and fp16's tokens equal local generation."""
    run_graph_engine(CORE, tmp_path)


@pytest.mark.slow  # ~80 s on 2 cores; the CI runs it in its slow step
def test_real_runs_graph_engine_other_methods(tmp_path):
    """CacheGen (decoded to 16 bits at install: fp16's reservation) and KIVI through the graph engine."""
    run_graph_engine(("cachegen", "kivi"), tmp_path)
    for r in read_per_request_csv(tmp_path / "cachegen" / "per_request.csv"):
        assert r.kv_reserved_bytes == FP16_BYTES_PER_TOKEN * (r.prompt_len + r.output_len)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(METHODS) - set(CORE)))
def test_real_run_other_methods(method, tmp_path):
    check_run(method, tmp_path, serve(spec_for(method, tmp_path, save_tokens=True)))


def check_run(method, run_dir, summary):
    """Phases add up to each JCT; transfer and bytes are physical; summary and outputs are complete."""
    records = read_per_request_csv(run_dir / "per_request.csv")
    assert sorted(r.rid for r in records) == list(range(6))
    for r in records:
        phases = [r.phase(p) for p in PHASES]
        assert sum(phases) == pytest.approx(r.jct, abs=1e-9)
        assert min(phases) > -1e-3  # cross-process timestamps agree to the clock sync's precision
        wire_s = r.bytes_sent * 8 / (BANDWIDTH_GBPS * 1e9)
        assert wire_s * 0.98 <= r.phase("transfer") < wire_s + 0.5  # the pacer sets the time (slack: a busy CPU)
        if method == "fp16":
            assert r.payload_bytes == FP16_BYTES_PER_TOKEN * r.prompt_len
        else:  # every other method sends less than 16-bit KV
            assert r.payload_bytes < FP16_BYTES_PER_TOKEN * r.prompt_len
        assert r.kv_reserved_bytes >= r.payload_bytes
    assert summary["num_measured"] == 5 and summary["simulated"] is False
    for key in ("jct_mean", "jct_p99", "ttft_mean", "tpot_mean", "bytes_sent", "peak_decode_kv_bytes"):
        assert summary[key] > 0
    assert summary["decode_steps"] > 0
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["jct_mean"] == pytest.approx(summary["jct_mean"])
    tokens = {row["rid"]: row["tokens"] for row in map(json.loads, (run_dir / "tokens.jsonl").open())}
    assert all(len(tokens[r.rid]) == r.output_len for r in records)
    if method == "fp16":  # the disaggregated, continuously batched decode produces what local decoding does
        assert_matches_local_generation(tokens, records)


def assert_matches_local_generation(tokens, records):
    from hack_cli.hf import generate, make_method
    from hack_cli.serve.prefill import prompt_ids
    from hack_cli.serve.workers import build_model

    model = build_model(model_config("tiny"), torch.device("cpu"))
    r = records[0]
    ids = prompt_ids(0, r.rid, r.prompt_len, model.config.vocab_size, "cpu")
    out = generate(model, make_method("fp16"), ids, max_new_tokens=r.output_len)
    assert out[0, r.prompt_len:].tolist() == tokens[r.rid]


def test_dead_prefill_worker_ends_run_and_keeps_rows(tmp_path):
    spec = spec_for("fp16", tmp_path, fault="kill_prefill", fault_at=2, stall_timeout_s=600)
    spec.trace.rate = 2.0
    t0 = time.monotonic()
    with pytest.raises(HackError, match=r"^prefill worker failed: died with exit code 3$"):
        serve(spec)
    assert time.monotonic() - t0 < 150  # noticed at once (startup included), not after the 600 s stall timeout
    rids = [r.rid for r in read_per_request_csv(tmp_path / "per_request.csv")]
    assert 1 <= len(rids) <= 3 and 0 in rids


def test_stalled_link_ends_run_within_timeout(tmp_path):
    spec = spec_for("fp16", tmp_path, fault="stall_link", fault_at=1, stall_timeout_s=3)
    spec.trace.rate = 2.0
    with pytest.raises(HackError, match=r"decode worker failed: the link stalled while receiving request 1: "
                                        r"no data for 3 s"):
        serve(spec)
    assert [r.rid for r in read_per_request_csv(tmp_path / "per_request.csv")] == [0]
