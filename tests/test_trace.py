"""Trace statistics: arrival rate and burstiness, length ranges, seeding, file replay; and the metrics schema."""
import numpy as np
import pytest

from hack_cli.config import TraceConfig
from hack_cli.errors import HackError
from hack_cli.serve.metrics import PHASES, RequestRecord, read_per_request_csv, summarize, write_per_request_csv
from hack_cli.serve.trace import Request, make_trace, read_trace, write_trace


def gaps(trace):
    return np.diff([r.arrival_s for r in trace])


def test_poisson_rate_and_cv():
    trace = make_trace(TraceConfig(arrival="poisson", rate=2.0, num_requests=20001, seed=1))
    g = gaps(trace)
    assert trace[0].arrival_s == 0.0 and np.all(g >= 0)
    assert abs(1 / g.mean() - 2.0) < 0.05  # rate
    assert abs(g.std() / g.mean() - 1.0) < 0.03  # exponential gaps: cv = 1


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_rate_and_cv(cv):
    g = gaps(make_trace(TraceConfig(arrival="gamma", rate=0.5, cv=cv, num_requests=20001, seed=2)))
    assert abs(g.mean() - 2.0) < 0.1
    assert abs(g.std() / g.mean() - cv) < 0.08 * cv


def test_lengths_uniform_inclusive_and_seeded():
    cfg = TraceConfig(num_requests=4000, prompt_len=[10, 13], output_len=[5, 5], seed=3)
    trace = make_trace(cfg)
    assert sorted({r.prompt_len for r in trace}) == [10, 11, 12, 13]  # both ends reachable
    assert {r.output_len for r in trace} == {5}
    counts = np.bincount([r.prompt_len - 10 for r in trace])
    assert counts.min() > 900  # ~1000 each
    assert make_trace(cfg) == trace
    assert make_trace(TraceConfig(num_requests=4000, prompt_len=[10, 13], output_len=[5, 5], seed=4)) != trace


def test_presets_shape():
    long = TraceConfig(name="long", rate=0.3, num_requests=24, warmup=3, prompt_len=[12288, 16384],
                       output_len=[256, 512])
    trace = make_trace(long)
    assert len(trace) == 24 and all(12288 <= r.prompt_len <= 16384 for r in trace)
    assert [r.rid for r in trace] == list(range(24))


def test_file_replay(tmp_path):
    trace = make_trace(TraceConfig(num_requests=7, seed=5))
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    assert make_trace(TraceConfig(arrival="file", path=str(path), num_requests=7)) == trace
    assert read_trace(path, limit=3) == trace[:3]
    path.write_text('{"arrival_s": 1.0, "prompt_len": 4, "output_len": 2}\n'
                    '{"arrival_s": 0.5, "prompt_len": 4, "output_len": 2}\n')
    with pytest.raises(HackError, match="decreases"):
        read_trace(path)
    path.write_text('{"arrival": 1.0}\n')
    with pytest.raises(HackError, match="line 1"):
        read_trace(path)


def record(rid, t0, warmup=False):
    ts = np.cumsum([t0, 0.1, 1.0, 0.2, 0.3, 0.5, 0.0, 0.05, 2.0])
    return RequestRecord(rid, 100, 9, warmup, *map(float, ts), payload_bytes=1000, bytes_sent=1100,
                         kv_reserved_bytes=500, kv_stored_bytes=450)


def test_record_phases_sum_to_jct_and_csv_roundtrip(tmp_path):
    recs = [record(0, 0.0, warmup=True), record(1, 1.0), record(2, 2.5)]
    for r in recs:
        assert sum(r.phase(p) for p in PHASES) == pytest.approx(r.jct, abs=1e-12)
        assert r.tpot == pytest.approx(2.0 / 8)
    write_per_request_csv(tmp_path / "per_request.csv", recs)
    assert read_per_request_csv(tmp_path / "per_request.csv") == recs
    s = summarize(recs, warmup=1)
    assert s["num_measured"] == 2 and s["simulated"] is False
    assert s["jct_mean"] == pytest.approx(recs[1].jct) and s["bytes_sent"] == 2200
    # admit..finish intervals: [2.1, 4.15], [3.1, 5.15], [4.6, 6.65]: at most two overlap
    assert s["peak_concurrency"] == 2 and s["peak_decode_kv_bytes"] == 1000
    assert s["queue_link_mean"] == pytest.approx(0.3) and s["transfer_mean"] == pytest.approx(0.5)
