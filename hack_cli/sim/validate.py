"""Simulated vs measured JCT on the card the profile was taken on: `results/sim/validation.md`.

For every measured run (`results/jct/**/summary.json` with its `per_request.csv`), the simulator replays the very
same requests (arrival, prompt and output lengths, warm-up flags) with the same method, link bandwidth and decode
budget, on the profiled card itself (no scaling), into `results/sim/validation/<same path>/`; the table pairs
each measured run with its twin.

    python -m hack_cli.sim.validate --pair jct/<GPU runs>=results/profiles/h100_llama31_8b.json \
        --pair jct/<CPU runs>=results/profiles/cpu_tiny.json
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

PHASES = ("queue_prefill", "prefill", "compress", "queue_link", "transfer", "queue_decode", "install", "decode")
KEYS = ["method", "model", "trace", "rate", "bandwidth_gbps", "budget_gb", "num_requests"]
TOLERANCE = 0.10  # the target: mean JCT within 10%


def validation_table(results) -> pd.DataFrame:
    """results: `hack_cli.report.results.Results`. One row per measured run with a simulated twin."""
    real = results.select(False)
    sim = results.select(True, bundle="validation")
    if real.empty or sim.empty:
        return pd.DataFrame(columns=[*KEYS, "measured_jct", "simulated_jct", "error"])
    cols = ["jct_mean", "jct_p99", "ttft_mean", "tpot_mean", *[f"{p}_mean" for p in PHASES]]
    both = real[["dir"] + KEYS + cols].merge(sim[["measured_run", "card", "profile"] + cols], left_on="dir",
                                             right_on="measured_run", suffixes=("_real", "_sim"))
    both = both.rename(columns={"jct_mean_real": "measured_jct", "jct_mean_sim": "simulated_jct"})
    both["error"] = both["simulated_jct"] / both["measured_jct"] - 1
    return both.sort_values(["card", "model", "trace", "rate", "bandwidth_gbps", "method"]).reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return ("No measured run has a simulated twin yet: measured runs come from `hack bench jct` on 2 GPUs "
                "(results/jct/), their twins from `python -m hack_cli.sim.validate` (results/sim/validation/).\n")
    lines = ["| device | measured run (results/jct/) | profile of the twin | model | method | trace | rate | Gbit/s | "
             "budget GB | n | measured JCT (s) | simulated JCT (s) | error | P99 meas/sim (s) | TTFT meas/sim (s) | "
             "TPOT meas/sim (ms) | within 10% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        ok = "yes" if abs(r["error"]) <= TOLERANCE else "**no**"
        run = r["dir"].removeprefix("jct/")
        profile = f"`{Path(r['profile']).name}`" if isinstance(r["profile"], str) else "—"
        lines.append(f"| {r['card']} | `{run}` | {profile} | {r['model']} | {r['method']} | {r['trace']} | {r['rate']} | "
                     f"{r['bandwidth_gbps']:g} | {r['budget_gb']:g} | "
                     f"{int(r['num_requests'])} | {r['measured_jct']:.2f} | {r['simulated_jct']:.2f} | "
                     f"{100 * r['error']:+.1f}% | {r['jct_p99_real']:.2f} / {r['jct_p99_sim']:.2f} | "
                     f"{r['ttft_mean_real']:.2f} / {r['ttft_mean_sim']:.2f} | "
                     f"{1e3 * r['tpot_mean_real']:.0f} / {1e3 * r['tpot_mean_sim']:.0f} | {ok} |")
    worst = table["error"].abs().max()
    lines.append(f"\n{len(table)} pairs; largest |error| {100 * worst:.1f}% "
                 f"({'all' if worst <= TOLERANCE else 'not all'} within {100 * TOLERANCE:.0f}%).\n")
    lines += ["Where the difference comes from: mean seconds per request in each phase, measured / simulated.\n",
              "| device | measured run | method | trace | rate | " + " | ".join(PHASES) + " |",
              "|---|---|---|---|---|" + "---|" * len(PHASES)]
    for _, r in table.iterrows():
        lines.append(f"| {r['card']} | `{r['dir'].removeprefix('jct/')}` | {r['method']} | {r['trace']} | {r['rate']} | " + " | ".join(
            f"{r[p + '_mean_real']:.3f} / {r[p + '_mean_sim']:.3f}" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


def replay(records: list, profile: dict, quant: dict, bandwidth_gbps: float, budget_gb: float) -> tuple[str, list]:
    """Simulate the requests of a measured run (its `RequestRecord`s: arrival, lengths, warm-up flags) with
    `quant` on the profiled card itself; returns (profile label, simulated records)."""
    from hack_cli.serve.trace import Request
    from hack_cli.sim.engine import simulate
    from hack_cli.sim.profile import method_entry
    from hack_cli.sim.roofline import Costs

    records = sorted(records, key=lambda r: r.rid)
    requests = [Request(r.rid, r.arrival, r.prompt_len, r.output_len) for r in records]
    label, entry = method_entry(profile, quant)
    card = "local" if profile["card"] == "cpu" else profile["card"]
    costs = Costs(profile, entry, profile["model"]["architecture"], profile["model"]["dtype"], card, card,
                  bandwidth_gbps, budget_gb)
    return label, simulate(requests, costs, budget_gb * 1e9, sum(r.warmup for r in records))


def simulate_twins(root: Path, pairs: list[tuple[str, Path]]) -> int:
    """Write the simulated twin of every measured run under `results/<prefix>` for each (prefix, profile) pair —
    the profile taken on the run's kind of device (a measured summary does not name its device) and of its
    model; returns how many."""
    from hack_cli.sim.profile import load_profile

    count = 0
    for prefix, profile_path in pairs:
        profile = load_profile(profile_path)
        for path in sorted((root / prefix).rglob("summary.json")):
            count += _twin(root, path, profile, str(profile_path))
    return count


def _twin(root: Path, path: Path, profile: dict, profile_path: str) -> int:
    """The twin of the measured run whose summary is at `path` (0 if it is not a run of the profile's model)."""
    import json

    import yaml

    from hack_cli.methods import quant_schema
    from hack_cli.serve.metrics import read_per_request_csv, summarize, write_per_request_csv, write_summary
    from hack_cli.sim.profile import REPO

    real = json.loads(path.read_text())
    csv_path = path.parent / "per_request.csv"
    if real.get("simulated") or not csv_path.exists() or real.get("model") != profile["model"]["name"]:
        return 0
    records = read_per_request_csv(csv_path)
    quant = real.get("quant")  # runs from before summaries kept it ran the method's conf/quant defaults
    if quant is None:
        quant_file = REPO / "conf" / "quant" / f"{real['method']}.yaml"
        quant = yaml.safe_load(quant_file.read_text()) if quant_file.exists() else {"name": real["method"]}
        quant = {k: v for k, v in quant.items() if not (isinstance(v, str) and "${" in v)}  # Hydra-only values
        quant = dataclasses.asdict(quant_schema(quant["name"])(**quant))
    label, sim = replay(records, profile, quant, real["bandwidth_gbps"], real["decode_kv_budget_gb"])
    out = root / "sim" / "validation" / path.parent.relative_to(root / "jct")
    out.mkdir(parents=True, exist_ok=True)
    write_per_request_csv(out / "per_request.csv", sim)
    summary = summarize(sim, sum(r.warmup for r in records), simulated=True)
    summary.update({k: real[k] for k in ("method", "model", "trace", "rate", "bandwidth_gbps",
                                         "decode_kv_budget_gb") if k in real},
                   method_label=label, profile_card=profile["card"], prefill_gpu=profile["card"],
                   decode_gpu=profile["card"], measured_run=str(path.parent.relative_to(root)), profile=profile_path)
    write_summary(out / "summary.json", summary)
    return 1


def main(argv=None) -> None:
    import argparse

    from hack_cli.report.results import Results

    p = argparse.ArgumentParser(description="simulated twins of the measured JCT runs, and the comparison table")
    p.add_argument("--results", default="results")
    p.add_argument("--pair", action="append", default=[], metavar="PREFIX=PROFILE",
                   help="measured runs under results/PREFIX replayed with PROFILE, e.g. "
                        "jct/gpu_h100x2_2026-11-26_first/llama31_8b=results/profiles/h100_llama31_8b.json")
    a = p.parse_args(argv)
    root = Path(a.results)
    pairs = [(x.split("=", 1)[0], Path(x.split("=", 1)[1])) for x in a.pair]
    print(f"simulated {simulate_twins(root, pairs)} measured runs")
    results = Results.load(root)
    text = ("# Simulator validation: simulated vs measured mean JCT\n\nEach measured run of `results/jct/` (see its "
            "README for the card and the run's known issues) against its simulated twin: the same requests, "
            "method, link and budget through the simulator with a profile of that model taken on the same kind "
            "of device (named per row, in `results/profiles/`), unscaled. Regenerate with "
            "`python -m hack_cli.sim.validate --pair ...` (`results/sim/README.md` lists the pairs).\n\n"
            + to_markdown(validation_table(results)))
    (root / "sim").mkdir(parents=True, exist_ok=True)
    (root / "sim" / "validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
