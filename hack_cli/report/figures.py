"""The report's figures (PNG, matplotlib). Each takes the runs it plots and a path; returns False if no data."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hack_cli.report.results import PHASES, method_key  # noqa: E402

PHASE_COLORS = dict(zip(PHASES, plt.get_cmap("tab10").colors))


def _methods(df: pd.DataFrame) -> list[str]:
    return sorted(df["method"].unique(), key=method_key)


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: regenerating is byte-stable
    plt.close(fig)
    return True


def grouped_bars(df: pd.DataFrame, group: str, panel: str, path: Path, metric: str = "jct_mean",
                 ylabel: str = "mean JCT (s)") -> bool:
    """One panel per value of `panel`; x: values of `group`; one bar per method."""
    if df.empty:
        return False
    panels = sorted(df[panel].dropna().unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    methods = _methods(df)
    width = 0.8 / len(methods)
    for ax, value in zip(axes[0], panels):
        sub = df[df[panel] == value]
        groups = sorted(sub[group].dropna().unique())
        for i, m in enumerate(methods):
            ys = [sub[(sub[group] == g) & (sub["method"] == m)][metric].mean() for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, ys, width, label=m)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        if sub[metric].max() > 10 * sub[metric].min() > 0:  # one slow method must not flatten the others
            ax.set_yscale("log")
        ax.set_title(f"{panel} = {value}")
        ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def breakdown(panels: dict[str, pd.DataFrame], path: Path) -> bool:
    """Stacked mean phase times per method, one panel per setting."""
    panels = {k: v for k, v in panels.items() if not v.empty}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1.5, 3.4), squeeze=False)
    for ax, (title, df) in zip(axes[0], panels.items()):
        methods = _methods(df)
        left = np.zeros(len(methods))
        for phase in PHASES:
            widths = np.array([df[df["method"] == m][f"{phase}_mean"].mean() for m in methods])
            ax.barh(methods, widths, left=left, color=PHASE_COLORS[phase], label=phase)
            left += widths
        ax.set_xlabel("mean time per request (s)")
        ax.set_title(title, fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def bandwidth(sim: pd.DataFrame, real: pd.DataFrame, path: Path) -> bool:
    if sim.empty and real.empty:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for df, style, tag in ((sim, "-o", "sim"), (real, "--s", "measured")):
        for m in _methods(df) if not df.empty else []:
            d = df[df["method"] == m].groupby("bandwidth_gbps")["jct_mean"].mean()
            ax.plot(d.index, d.values, style, label=f"{m} ({tag})")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("mean JCT (s)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def partition(points: pd.DataFrame, path: Path) -> bool:
    """points: partition, jct_mean and (optionally) score."""
    if points.empty:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6))
    points = points.assign(score=pd.to_numeric(points["score"], errors="coerce"))
    if points["score"].notna().any():
        ax.plot(points["jct_mean"], points["score"], "o-")
        ax.set_ylabel("accuracy score (mean over tasks)")
        ax.set_xlabel("mean JCT (s, simulated)")
        for _, r in points.iterrows():
            ax.annotate(f"Π={int(r['partition'])}", (r["jct_mean"], r["score"]))
    else:
        ax.plot(points["partition"], points["jct_mean"], "o-")
        ax.set_xlabel("partition size Π")
        ax.set_ylabel("mean JCT (s, simulated)")
    return _save(fig, path)


def memory(df: pd.DataFrame, ratios: dict[str, float], path: Path) -> bool:
    if df.empty and not ratios:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    if not df.empty:
        methods = _methods(df)
        axes[0].bar(methods, [df[df["method"] == m]["peak_decode_kv_stored_bytes"].mean() / 1e9 for m in methods])
        axes[0].set_ylabel("peak decode KV held (GB)")
    if ratios:
        methods = sorted(ratios, key=method_key)
        axes[1].bar(methods, [100 * ratios[m] for m in methods])
        axes[1].set_ylabel("payload bytes per token (% of fp16)")
    return _save(fig, path)


def validation(table: pd.DataFrame, path: Path) -> bool:
    if table.empty:
        return False
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for m in _methods(table):
        d = table[table["method"] == m]
        ax.plot(d["measured_jct"], d["simulated_jct"], "o", label=m)
    both = table[["measured_jct", "simulated_jct"]]
    x = np.geomspace(0.8 * float(both.min().min()), 1.25 * float(both.max().max()), 50)
    ax.plot(x, x, "k-", lw=0.8)
    ax.fill_between(x, 0.9 * x, 1.1 * x, color="0.85", label="±10%")
    ax.set_xscale("log")  # runs from 0.1 s (CPU) to 70 s (CacheGen): equal relative error, equal distance
    ax.set_yscale("log")
    ax.set_xlabel("measured mean JCT (s)")
    ax.set_ylabel("simulated mean JCT (s)")
    ax.legend(fontsize=7)
    return _save(fig, path)
