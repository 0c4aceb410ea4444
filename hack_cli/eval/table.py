"""The accuracy table: tasks x KV-method configurations, each with its difference to fp16 and a 95% CI.

Built only from per-sample rows (`samples.jsonl` of one run or of every job of a sweep), paired over the documents
both methods answered. Scores are in points (0-100).

    python -m hack_cli.eval.table runs/eval_accuracy/<sweep dir>     # prints it; writes accuracy_table.{md,csv}
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from hack_cli.eval.metrics import paired_difference
from hack_cli.store import read_rows, write_csv

SAMPLES = "samples.jsonl"


def load_samples(dirs: Iterable[Path]) -> list[dict]:
    """Rows of `<dir>/samples.jsonl` and of `<dir>/<job>/samples.jsonl`, each (model, key) once."""
    rows, seen = [], set()
    for d in dirs:
        d = Path(d)
        for path in sorted([d / SAMPLES, *d.glob(f"*/{SAMPLES}")]):
            if not path.exists():
                continue
            for row in read_rows(path):  # a running or killed job's unfinished last line left out
                if (row["model"], row["key"]) not in seen:
                    seen.add((row["model"], row["key"]))
                    rows.append(row)
    return rows


def summarize(rows: list[dict], baseline: str = "fp16") -> list[dict]:
    """One entry per (model, task, method): n, score, and diff / ci95 / n_paired against `baseline` (points)."""
    scores: dict[tuple, dict] = defaultdict(dict)  # (model, task, method) -> {doc_id: score}
    for r in rows:
        scores[(r["model"], r["task"], r["method"])][r["doc_id"]] = r["score"]
    out = []
    for (model, task, method), by_doc in scores.items():
        entry = {"model": model, "task": task, "method": method, "n": len(by_doc),
                 "score": 100 * sum(by_doc.values()) / len(by_doc), "diff": None, "ci95": None, "n_paired": 0}
        base = scores.get((model, task, baseline))
        if base is not None and method != baseline:
            common = sorted(set(by_doc) & set(base))
            if common:
                d = paired_difference([by_doc[i] for i in common], [base[i] for i in common])
                entry.update(diff=100 * d["diff"], ci95=100 * d["ci95"], n_paired=d["n"])
        out.append(entry)
    return out


def to_markdown(summary: list[dict], baseline: str = "fp16") -> str:
    """Rows (model, task) x columns (baseline first, then methods by name): score, difference to the baseline ± its
    95% CI, and the number of documents it is paired over."""
    methods = sorted(dict.fromkeys(e["method"] for e in summary), key=lambda m: (m != baseline, m))
    cells = {(e["model"], e["task"], e["method"]): e for e in summary}
    lines = ["| model | task | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for model, task in dict.fromkeys((e["model"], e["task"]) for e in summary):
        row = []
        for m in methods:
            e = cells.get((model, task, m))
            if e is None:
                row.append("")
            elif e["diff"] is None:
                row.append(f"{e['score']:.1f} (n={e['n']})")
            else:
                row.append(f"{e['score']:.1f} ({e['diff']:+.1f} ± {e['ci95']:.1f}, n={e['n_paired']})")
        lines.append(f"| {model} | {task} | " + " | ".join(row) + " |")
    note = (f"\nScores in points (0-100). In parentheses: mean paired difference to {baseline} over the n documents both "
            "answered ± half-width of its 95% Student-t confidence interval on the per-document differences.\n")
    return "\n".join(lines) + "\n" + note


def write_table(rows: list[dict], out_dir: Path, baseline: str = "fp16") -> str:
    """accuracy_table.md and accuracy_table.csv in `out_dir`, from sample rows (`load_samples`)."""
    summary = summarize(rows, baseline)
    text = to_markdown(summary, baseline)
    (Path(out_dir) / "accuracy_table.md").write_text(text)
    write_csv(Path(out_dir) / "accuracy_table.csv", summary)
    return text


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit("usage: python -m hack_cli.eval.table RUN_OR_SWEEP_DIR [MORE_DIRS...] (table goes to the first)")
    missing = [a for a in argv if not Path(a).is_dir()]
    if missing:
        sys.exit(f"error: {missing[0]} is not a directory")
    rows = load_samples([Path(a) for a in argv])
    if not rows:
        sys.exit(f"error: no {SAMPLES} rows in {' '.join(argv)} or the run directories in it")
    print(write_table(rows, Path(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
