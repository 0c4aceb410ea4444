"""Any local JSONL as a task: `dataset=jsonl dataset.path=FILE dataset.metric=exact_match|f1|rouge1|edit_sim`.

Each line: {"context": str, "question": str (or "input"), "answers": [str, ...]}. The prediction is scored against
every answer and the best counts (LongBench's convention). options: max_gen_toks (default 32), name (task name).
"""
from __future__ import annotations

import json
from pathlib import Path

from hack_cli.config import DatasetConfig
from hack_cli.errors import HackError
from hack_cli.eval import metrics
from hack_cli.eval.tasks import make_task, option

PROMPT = "{context}\n\nAnswer the question based on the text above, as briefly as possible.\nQuestion: {question}"


def read_jsonl(path: Path) -> list[dict]:
    """Records with `context`, `question` and `answers`; a malformed line fails naming its line number."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise HackError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise HackError(f"{where}: expected a JSON object with context, question (or input), answers")
            question = record.get("question", record.get("input"))
            answers = record.get("answers")
            if not isinstance(record.get("context"), str) or not isinstance(question, str):
                raise HackError(f"{where}: needs string fields `context` and `question` (or `input`)")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise HackError(f"{where}: `answers` must be a non-empty list of strings")
            docs.append({"context": record["context"], "question": question, "answers": answers})
    if not docs:
        raise HackError(f"{path}: no records")
    return docs


def build(dataset: DatasetConfig, tokenizer, limit, seed: int) -> list:
    if not dataset.path:
        raise HackError("dataset=jsonl needs dataset.path=FILE (one JSON object per line)")
    if dataset.metric not in metrics.METRICS:
        raise HackError(f"dataset.metric={dataset.metric!r} is not allowed: expected one of {', '.join(metrics.METRICS)}")
    path = Path(dataset.path).expanduser()
    name = option(dataset, "name", path.stem)
    short = dataset.metric in ("exact_match", "f1")  # short answers: only the first line counts

    def score(doc, prediction):
        prediction = prediction.strip()
        return metrics.best_over_references(dataset.metric, prediction.split("\n")[0] if short else prediction,
                                            doc["answers"])

    return [make_task(name, read_jsonl(path), text=lambda d: PROMPT.format(**d), score=score,
                      target=lambda d: " | ".join(d["answers"]), max_gen_toks=option(dataset, "max_gen_toks", 32))]
