"""`hack eval ppl` end to end on the packaged SmolLM2: the KV goes through each method as in serving."""
import json

import pytest
from typer.testing import CliRunner

from hack_cli.cli import app
from hack_cli.eval.ppl import PplConfig, windows

SMALL = ["ppl.context_len=160", "ppl.score_len=12", "ppl.windows=1", "ppl.batch_size=1", "logging.progress=false"]


def ppl_run(tmp_path, name, *overrides):
    out = tmp_path / name
    result = CliRunner().invoke(app, ["eval", "ppl", *SMALL, *overrides, f"out_dir={out}"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text()), out


def test_windows_are_evenly_spread_and_fixed():
    import torch

    tokens = torch.arange(1000)
    got = windows(tokens, PplConfig(context_len=90, score_len=10, windows=3))
    assert [int(w[0]) for _, w in got] == [0, 450, 900] and all(w.numel() == 100 for _, w in got)


def test_8_bit_hack_is_within_1_percent_of_fp16_and_2_bit_costs_more(tmp_path):
    fp16, _ = ppl_run(tmp_path, "fp16", "quant=fp16")
    hack8, run_dir = ppl_run(tmp_path, "hack8", "quant=hack", "quant.bits=8", "quant.partition=32")
    hack2, _ = ppl_run(tmp_path, "hack2", "quant=hack", "quant.bits=2", "quant.partition=32",
                       "quant.layout=token", "quant.sink_tokens=0")
    assert fp16["tokens"] == hack8["tokens"] == 12 and fp16["kv_bytes_ratio"] == pytest.approx(1.0)
    assert abs(hack8["ppl"] / fp16["ppl"] - 1) < 0.01
    assert hack2["ppl"] > hack8["ppl"]  # per-token 2-bit keys collapse (the paper's token layout)
    assert hack8["kv_bytes_ratio"] < 0.75 and hack2["kv_bytes_ratio"] < hack8["kv_bytes_ratio"]
    parts = sum(hack8[f"kv_{p}_ratio"] for p in ("codes", "meta", "sums", "fp16", "index"))
    assert parts == pytest.approx(hack8["kv_bytes_ratio"])
    rows = (run_dir / "windows.jsonl").read_text().splitlines()
    assert len(rows) == 1  # one row per window, written as produced
