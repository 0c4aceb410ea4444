"""A simulator profile fitted to measured serving runs instead of isolated micro-measurements.

`hack bench profile` times prefill and decode steps in isolation. A measured JCT run (`hack bench jct`, or
`python -m hack_cli.serve.bench_gpu`) already records the same costs under serving conditions: every request's
prefill, compress and install time and payload bytes (`per_request.csv`), and every decode iteration's batch,
total context and seconds (`steps.csv`). This tool fits the profile's phase models to those records, per method,
with the same features and fit as `hack_cli.sim.profile`:

    python -m hack_cli.sim.fit_runs --model llama31_8b --card h100 --device-name "NVIDIA H100 80GB HBM3" \
        --out results/profiles/h100_llama31_8b_runs_r0.3.json results/jct/<dir>/llama31_8b/*_r0.3_*

Fit on some runs and replay others (`python -m hack_cli.sim.validate`) to validate the simulator on held-out work.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hack_cli.errors import HackError
from hack_cli.sim.profile import FORMAT, VERSION, fit, method_label


def prompt_points(run: Path) -> list[dict]:
    """One row per measured request (warm-up excluded: its first calls compile kernels): L, prefill, compress,
    install (s), payload and header bytes."""
    with open(run / "per_request.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["warmup"] == "False"]
    return [{"L": int(r["prompt_len"]), "prefill": float(r["prefill"]), "compress": float(r["compress"]),
             "install": float(r["install"]), "payload": int(r["payload_bytes"]),
             "header": int(r["bytes_sent"]) - int(r["payload_bytes"]), "stored": int(r["payload_bytes"])}
            for r in rows]


def decode_points(run: Path) -> list[dict]:
    """One row per decode iteration: B requests, C their total context, decode (s). Fitted unweighted: the steps
    that close a block (HACK every Π tokens of a request, KIVI every G) take 2-8x a plain step and hold 5-45% of the
    decode time of a run; a fit of relative error would track the plain steps and miss them."""
    steps = np.loadtxt(run / "steps.csv", delimiter=",", skiprows=1, ndmin=2)  # start, batch, context, seconds
    return [{"B": int(b), "C": int(c), "C_each": int(c) // max(int(b), 1), "decode": float(s)}
            for _, b, c, s in steps]


def method_entry(runs: list[Path]) -> dict:
    """The profile entry of one method from its measured runs."""
    from hack_cli.hf import make_method

    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    name = summaries[0]["method"]
    quant = summaries[0].get("quant") or dataclasses.asdict(make_method(name).config)  # runs before `quant` was kept
    prompt = [p for r in runs for p in prompt_points(r)]
    decode = [d for r in runs for d in decode_points(r)]
    if len(prompt) < 3 or len(decode) < 3:
        raise HackError(f"{name}: {len(prompt)} requests and {len(decode)} decode steps; need >= 3 of each to fit")
    by_len = sorted({p["L"]: p for p in prompt}.values(), key=lambda p: p["L"])
    return {"quant": quant,
            "measured": {"from_runs": [str(r) for r in runs], "date": datetime.now(timezone.utc).isoformat(
                timespec="seconds")},
            "points": {"prompt": prompt, "decode": decode},
            "phases": {**{p: fit(p, prompt) for p in ("prefill", "compress", "install")},
                       "decode": fit("decode", decode, relative=False)},
            "bytes": {"tokens": [p["L"] for p in by_len], "payload": [p["payload"] for p in by_len],
                      "stored": [p["stored"] for p in by_len], "header": int(np.mean([p["header"] for p in prompt])),
                      "exact": False}}


def build(model: str, card: str, device_name: str, runs: list[Path]) -> dict:
    """A profile (format of `hack_cli.sim.profile`) with one entry per method among `runs`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hack_cli.hf.models import model_config

    mc = model_config(model)
    arch = dict(mc.architecture)
    config = AutoConfig.for_model(**arch)
    with torch.device("meta"):  # parameter count without memory
        weight_bytes = sum(p.numel() * 2 for p in AutoModelForCausalLM.from_config(config).parameters())  # bf16
    by_method: dict[str, list[Path]] = {}
    for r in runs:
        summary = json.loads((r / "summary.json").read_text())
        by_method.setdefault(method_label(summary.get("quant") or {"name": summary["method"]}), []).append(r)
    return {"format": FORMAT, "version": VERSION, "card": card, "device_name": device_name,
            "model": {"name": model, "dtype": "bfloat16", "architecture": arch, "weight_bytes": int(weight_bytes)},
            "methods": {m: method_entry(rs) for m, rs in by_method.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="measured run directories (summary.json, per_request.csv, steps.csv)")
    p.add_argument("--model", required=True)
    p.add_argument("--card", required=True, help="catalog key of the card the runs were measured on, e.g. h100")
    p.add_argument("--device-name", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    profile = build(a.model, a.card, a.device_name, [Path(r) for r in a.runs])
    Path(a.out).write_text(json.dumps(profile, indent=1) + "\n")
    for m, e in profile["methods"].items():
        print(m, {k: [f"{c:.3g}" for c in v["coef"]] + [f"max_rel_err={v['max_rel_err']:.2f}"]
                  for k, v in e["phases"].items()})


if __name__ == "__main__":
    main()
