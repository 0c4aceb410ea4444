"""Simulated vs measured JCT on the card the profile was taken on: `results/sim/validation.md`.

Pairs every measured run (`results/jct/**`) with the simulated run of the same setting in
`results/sim/validation/**` (method, model, trace, rate, bandwidth, budget, number of requests).

    python -m hack_cli.sim.validate [results]
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

KEYS = ["method", "model", "trace", "rate", "bandwidth_gbps", "budget_gb", "num_requests"]
TOLERANCE = 0.10  # the target: mean JCT within 10%


def validation_table(results) -> pd.DataFrame:
    """results: `hack_cli.report.results.Results`. One row per measured run with a simulated twin."""
    real = results.select(False)
    sim = results.select(True, bundle="validation")
    if real.empty or sim.empty:
        return pd.DataFrame(columns=[*KEYS, "measured_jct", "simulated_jct", "error"])
    cols = ["jct_mean", "jct_p99", "ttft_mean", "transfer_mean", "decode_mean", "queue_decode_mean"]
    both = real[KEYS + cols].merge(sim[KEYS + cols], on=KEYS, suffixes=("_real", "_sim"))
    both = both.rename(columns={"jct_mean_real": "measured_jct", "jct_mean_sim": "simulated_jct"})
    both["error"] = both["simulated_jct"] / both["measured_jct"] - 1
    return both.sort_values(["trace", "rate", "bandwidth_gbps", "method"]).reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return ("No measured run has a simulated twin yet: measured runs come from `hack bench jct` on 2 GPUs "
                "(results/jct/), their twins from `hack bench jct -m experiment=sim_validation` "
                "(results/sim/validation/).\n")
    lines = ["| method | trace | rate | Gbit/s | budget GB | n | measured JCT (s) | simulated JCT (s) | error | "
             "P99 meas/sim (s) | TTFT meas/sim (s) | within 10% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        ok = "yes" if abs(r["error"]) <= TOLERANCE else "**no**"
        lines.append(f"| {r['method']} | {r['trace']} | {r['rate']} | {r['bandwidth_gbps']:g} | {r['budget_gb']:g} | "
                     f"{int(r['num_requests'])} | {r['measured_jct']:.2f} | {r['simulated_jct']:.2f} | "
                     f"{100 * r['error']:+.1f}% | {r['jct_p99_real']:.2f} / {r['jct_p99_sim']:.2f} | "
                     f"{r['ttft_mean_real']:.2f} / {r['ttft_mean_sim']:.2f} | {ok} |")
    worst = table["error"].abs().max()
    lines.append(f"\n{len(table)} pairs; largest |error| {100 * worst:.1f}% "
                 f"({'all' if worst <= TOLERANCE else 'not all'} within {100 * TOLERANCE:.0f}%).\n")
    return "\n".join(lines)


def main(argv=None) -> None:
    from hack_cli.report.results import Results

    root = Path((argv or sys.argv[1:] or ["results"])[0])
    results = Results.load(root)
    text = "# Simulator validation: simulated vs measured mean JCT\n\n" + to_markdown(validation_table(results))
    (root / "sim").mkdir(parents=True, exist_ok=True)
    (root / "sim" / "validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
