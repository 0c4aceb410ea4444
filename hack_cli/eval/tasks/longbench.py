"""LongBench through lm-eval's own task definitions (prompts, truncation budget, metrics). Needs the hub.

options: tasks (lm-eval task names, default the six single-document QA/summary sets below).
"""
from __future__ import annotations

from hack_cli.config import DatasetConfig
from hack_cli.errors import HackError
from hack_cli.eval.tasks import option

DEFAULT = ["longbench_narrativeqa", "longbench_qasper", "longbench_multifieldqa_en", "longbench_hotpotqa",
           "longbench_gov_report", "longbench_lcc"]


def build(dataset: DatasetConfig, tokenizer, limit, seed: int) -> list:
    from lm_eval.tasks import TaskManager, get_task_dict

    names = list(option(dataset, "tasks", DEFAULT))
    try:
        tasks = get_task_dict(names, TaskManager())
    except Exception as e:  # the datasets come from the hub
        raise HackError(f"dataset=longbench: cannot load {names[0]} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "LongBench needs the Hugging Face hub: run it online, or use dataset=ruler offline") from None
    return list(tasks.values())
