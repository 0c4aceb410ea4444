"""Read what the report is built from: everything under `results/`, nothing else.

  results/jct/**/summary.json (+ config.yaml beside it)   measured serving runs (`hack bench jct`)
  results/sim/**/summary.json (+ config.yaml)             simulated runs (`hack bench jct jct.mode=sim`)
  A summary with `superseded_by` (a later run of the same setting; `superseded_because` says why) is skipped.
  results/profiles/*.json                                 cost profiles (`hack bench profile`)
  results/accuracy/**/accuracy_table.csv                  accuracy tables (`hack eval accuracy`)
The first folder under results/jct or results/sim names the run's bundle (e.g. results/sim/gpus/3 -> `gpus`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from hack_cli.sim.profile import method_label  # noqa: F401 (the labels the whole report uses)

METRICS = ("jct_mean", "jct_p50", "jct_p99", "ttft_mean", "tpot_mean", "queue_prefill_mean", "prefill_mean",
           "compress_mean", "queue_link_mean", "transfer_mean", "queue_decode_mean", "install_mean", "decode_mean",
           "bytes_sent_per_request", "payload_bytes", "peak_decode_kv_bytes", "peak_decode_kv_stored_bytes",
           "peak_concurrency", "num_requests", "num_measured")
PHASES = ("queue_prefill", "prefill", "compress", "queue_link", "transfer", "queue_decode", "install", "decode")
METHOD_ORDER = ("fp16", "fp8", "kivi", "kvquant", "cachegen", "hack_p32", "hack", "hack_fp16dot", "hack_p128",
                "hack_v1")


def method_key(label: str) -> tuple:
    return (METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def _run_row(results: Path, path: Path, simulated_dir: bool) -> dict:
    summary = json.loads(path.read_text())
    config_path = path.parent / "config.yaml"
    cfg = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    quant = cfg.get("quant") or summary.get("quant") or {"name": summary.get("method")}
    cluster, trace, model = cfg.get("cluster") or {}, cfg.get("trace") or {}, cfg.get("model") or {}
    rel = path.parent.relative_to(results)
    simulated = bool(summary.get("simulated", simulated_dir))
    row = {"bundle": rel.parts[1] if len(rel.parts) > 1 else rel.parts[0], "dir": str(rel),
           "simulated": simulated, "method": method_label(quant), "partition": quant.get("partition"),
           "model": summary.get("model") or model.get("name"), "trace": summary.get("trace") or trace.get("name"),
           "rate": summary.get("rate", trace.get("rate")),
           "bandwidth_gbps": summary.get("bandwidth_gbps", cluster.get("bandwidth_gbps")),
           "budget_gb": summary.get("decode_kv_budget_gb", cluster.get("decode_kv_budget_gb")),
           "prefill_gpu": summary.get("prefill_gpu", cluster.get("prefill_gpu")),
           "decode_gpu": summary.get("decode_gpu", cluster.get("decode_gpu")),
           "card": summary.get("card") or summary.get("profile_card") or cluster.get("prefill_gpu"),
           "measured_run": summary.get("measured_run"),  # a simulated twin's measured run (validation)
           "profile": summary.get("profile")}  # the profile a validation twin was simulated with
    row.update({k: summary.get(k) for k in METRICS})
    return row


def load_runs(results: Path) -> pd.DataFrame:
    """One row per serving run (measured or simulated) with its setting and summary metrics."""
    rows = []
    for sub, simulated in (("jct", False), ("sim", True)):
        for path in sorted((results / sub).rglob("summary.json")):
            if not json.loads(path.read_text()).get("superseded_by"):
                rows.append(_run_row(results, path, simulated))
    columns = ["bundle", "dir", "simulated", "method", "partition", "model", "trace", "rate", "bandwidth_gbps",
               "budget_gb", "prefill_gpu", "decode_gpu", "card", "measured_run", "profile", *METRICS]
    return pd.DataFrame(rows, columns=columns)


def load_profiles(results: Path) -> list[dict]:
    out = []
    for path in sorted((results / "profiles").glob("*.json")):
        data = json.loads(path.read_text())
        data["path"] = str(path.relative_to(results))
        out.append(data)
    return out


def load_accuracy(results: Path) -> pd.DataFrame:
    """Rows (task, method label as the accuracy table writes it, score, diff vs fp16, partition)."""
    frames = []
    for path in sorted((results / "accuracy").rglob("accuracy_table.csv")):
        df = pd.read_csv(path)
        df["source"] = str(path.relative_to(results))
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["task", "method", "score", "diff", "partition", "source"])
    df = pd.concat(frames, ignore_index=True)
    df["partition"] = [int(m.group(1)) if (m := re.search(r"-p(\d+)", str(x))) else None for x in df["method"]]
    return df


@dataclass
class Results:
    root: Path
    runs: pd.DataFrame
    profiles: list[dict]
    accuracy: pd.DataFrame

    @classmethod
    def load(cls, root) -> "Results":
        root = Path(root)
        return cls(root, load_runs(root), load_profiles(root), load_accuracy(root))

    def select(self, simulated=None, **where) -> pd.DataFrame:
        """Runs matching every `column=value` (a list or tuple value: any of them)."""
        df = self.runs
        if simulated is not None:
            df = df[df["simulated"] == simulated]
        for key, value in where.items():
            df = df[df[key].isin(value)] if isinstance(value, (list, tuple)) else df[df[key] == value]
        return df

    def bytes_per_token(self) -> dict[str, float]:
        """Payload bytes per prompt token relative to fp16, per method, from the GPU profile (4096 tokens or
        the nearest profiled length)."""
        for prof in self.profiles:
            methods = prof["methods"]
            if "fp16" not in methods or prof["card"] == "cpu":
                continue
            out = {}
            for label, entry in methods.items():
                tokens = entry["bytes"]["tokens"]
                i = min(range(len(tokens)), key=lambda j: abs(tokens[j] - 4096))
                j = min(range(len(methods["fp16"]["bytes"]["tokens"])),
                        key=lambda j: abs(methods["fp16"]["bytes"]["tokens"][j] - tokens[i]))
                out[method_label(entry["quant"])] = (entry["bytes"]["payload"][i] / tokens[i]) / (
                    methods["fp16"]["bytes"]["payload"][j] / methods["fp16"]["bytes"]["tokens"][j])
            return out
        return {}
