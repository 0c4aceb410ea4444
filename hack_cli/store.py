"""The results store: what a job leaves in its run directory, and the sweep summary beside a multirun's jobs.

    <run dir>/config.yaml     the resolved config that produced everything here (written first)
    <run dir>/<name>.jsonl    rows (per sample, per request, ...) appended and fsynced one at a time
    <run dir>/<name>.csv      tables a run logs at the end
    <run dir>/metrics.json    flat metrics, written atomically when the job finishes
    <sweep dir>/sweep.csv     one row per job: its number, the swept values and its metrics

A crash loses at most the row in flight; `resume=true` reads the rows back and the run skips their keys.
Results are never overwritten: a run directory that already holds a run needs `resume=true`.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf

from hack_cli.errors import HackError

CONFIG, METRICS, SWEEP = "config.yaml", "metrics.json", "sweep.csv"
# Keys (dotted paths) that may change when a run is resumed: they do not change what its rows mean (a run directory
# may be moved, or copied and continued in shards, and resumed there; the tokenizer check only guards a load).
RESUMABLE_KEYS = ("resume", "logging", "out_dir", "accuracy.shard", "model.tokenizer_check")


def holds_run(path: Path) -> bool:
    """True if `path` is the run directory of a single run or the directory of a sweep."""
    return (path / CONFIG).exists() or (path / "multirun.yaml").exists()


def claim(run_dir: Path, config: dict, resume: bool) -> None:
    """Write config.yaml into `run_dir`, or, when resuming, check that it is the run being continued."""
    path = run_dir / CONFIG
    if path.exists():
        if not resume:
            raise HackError(f"{run_dir} already holds a run: add resume=true to continue it, or choose another "
                            "out_dir")
        before = OmegaConf.to_container(OmegaConf.load(path))
        changed = _first_difference(before, config)
        if changed:
            raise HackError(f"cannot resume {run_dir}: {changed} differs from the run's config.yaml; rerun with the "
                            "same overrides, or choose another out_dir")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, OmegaConf.to_yaml(OmegaConf.create(config)))


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    """The first dotted key whose values differ, outside RESUMABLE_KEYS."""
    if prefix in RESUMABLE_KEYS:
        return None
    if isinstance(a, dict) or isinstance(b, dict):  # a section one side lacks compares as empty
        if not isinstance(a or {}, dict) or not isinstance(b or {}, dict):
            return prefix
        a, b = a or {}, b or {}
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if diff:
                return diff
        return None
    return None if a == b else prefix


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float, str, bool, type(None)))]
    if bad:
        raise TypeError(f"metrics must be flat numbers or strings; {bad[0]!r} is {type(metrics[bad[0]]).__name__}")
    _atomic_write(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")


def read_metrics(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / METRICS
    return json.loads(path.read_text()) if path.exists() else None


class RowLog:
    """Append-only JSONL rows, each with a unique `key`. `done` holds the keys already written (on resume)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = _read_rows(path) if path.exists() else []
        self.done: set = {row["key"] for row in self.rows}
        self._file = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        if "key" not in row:
            raise ValueError(f"{self.path.name}: every row needs a `key` (what resume skips)")
        if row["key"] in self.done:
            raise ValueError(f"{self.path.name}: row {row['key']!r} was already written")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # a killed job keeps every row it reported
        self.rows.append(row)
        self.done.add(row["key"])

    def close(self) -> None:
        self._file.close()


def _complete_lines(text: str) -> list[str]:
    return text.split("\n")[:-1]  # everything after the last newline was never finished


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a row log, leaving out a last line cut short by a crash (the file is not changed)."""
    return [json.loads(line) for line in _complete_lines(path.read_text())]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a previous attempt; a last line cut short by a crash is dropped from the file."""
    text = path.read_text()
    lines = _complete_lines(text)
    complete = sum(len(line) + 1 for line in lines)
    if complete < len(text):
        with open(path, "r+") as f:
            f.truncate(complete)
    return [json.loads(line) for line in lines]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def sweep_rows(sweep_dir: Path, jobs: list[list[str]], keys: Iterable[str]) -> list[dict[str, Any]]:
    """One row per job of a multirun: job number, its values of the swept `keys`, status, its metrics.

    status: done | incomplete (no metrics.json yet) | stale (the directory holds a job of another sweep: its
    config.yaml disagrees with a swept value; possible only after resume=true with changed overrides).
    """
    keys = list(keys)
    rows = []
    for num, overrides in enumerate(jobs):
        run_dir = sweep_dir / str(num)
        values = dict(o.split("=", 1) for o in overrides)
        metrics, status = read_metrics(run_dir), "incomplete"
        if metrics is not None:
            saved = OmegaConf.load(run_dir / CONFIG)
            stale = any(_differs(OmegaConf.select(saved, k), values[k]) for k in keys if k in values)
            metrics, status = (None, "stale") if stale else (metrics, "done")
        rows.append({"job": num, **{k: values.get(k) for k in keys}, "status": status, **(metrics or {})})
    return rows


def _differs(saved: Any, override: str) -> bool:
    """Whether a saved scalar disagrees with an override's value (group choices like quant=hack are not scalars)."""
    if OmegaConf.is_config(saved):
        return False
    return saved != yaml.safe_load(override)
