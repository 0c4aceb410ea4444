"""`hack eval accuracy`: task accuracy of a model whose KV goes through a method, on lm-eval tasks.

One job evaluates `quant`, the baseline method (`accuracy.baseline`, fp16) and any `accuracy.methods` on the same
documents, so a single run already gives paired differences (and the methods share each batch's 16-bit prefill). Every answer is a row of `samples.jsonl`, written as it is
produced (key = method/task/doc id), so `resume=true` continues a killed run where it stopped. A job of a multirun
also refreshes the sweep's `accuracy_table.md` from all its jobs' rows (`hack_cli.eval.table`).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hack_cli.config import check_choice, check_positive
from hack_cli.errors import HackError


@dataclass
class AccuracyConfig:
    """The `accuracy:` section of conf/eval_accuracy.yaml."""

    baseline: Optional[str] = "fp16"  # conf/quant config evaluated beside `quant` in the same job (null: none)
    methods: list[Any] = field(default_factory=list)  # more methods in the same job: {quant: <conf/quant name>,
    #                                                  <field>: value, ...}, e.g. {quant: hack, partition: 32}
    limit: Optional[int] = None  # documents per task (null: all)
    batch_size: int = 4  # prompts generated together (left padded)
    max_length: Optional[int] = None  # window in tokens, prompt + answer (null: model.max_context); longer prompts
    #                                   are cut in the middle
    chat_template: str = "auto"  # auto: for instruction tasks when the tokenizer has one | always | never
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    shard: list[int] = field(default_factory=lambda: [0, 1])  # [i, n]: this job answers batches i, i+n, i+2n, ...
    #                                                           (n jobs, each resuming a copy of the run directory)

    def __post_init__(self):
        check_positive("accuracy.batch_size", self.batch_size)
        if (len(self.shard) != 2 or not all(isinstance(x, int) for x in self.shard)
                or not 0 <= self.shard[0] < self.shard[1]):
            raise HackError(f"accuracy.shard: {list(self.shard)!r} is not allowed: expected [i, n] with 0 <= i < n")
        if self.limit is not None:
            check_positive("accuracy.limit", self.limit)
        if self.max_length is not None:
            check_positive("accuracy.max_length", self.max_length)
        check_choice("accuracy.chat_template", self.chat_template, ("auto", "always", "never"))
        for entry in self.methods:
            if not isinstance(entry, dict) or "quant" not in entry:
                raise HackError(f"accuracy.methods: {entry!r} is not allowed: expected {{quant: <conf/quant name>, "
                                "<field>: value, ...}")


def method_config(entry: dict, root: Optional[dict] = None):
    """A validated method config: conf/quant/<entry.quant>.yaml with the entry's other keys as overrides.

    Interpolations in the quant file (e.g. kvquant's `${model.name}` in its calibration path) resolve against `root`,
    the job's whole config."""
    import hack_conf
    from omegaconf import OmegaConf

    from hack_cli.config import to_typed
    from hack_cli.methods import METHODS, quant_schema

    overrides = {k: v for k, v in entry.items() if k != "quant"}
    path = Path(hack_conf.__file__).parent / "quant" / f"{entry['quant']}.yaml"
    if path.exists():
        node = OmegaConf.merge(OmegaConf.load(path), overrides)
    elif entry["quant"] in METHODS:  # a method without a conf/quant file: its schema's defaults
        node = OmegaConf.create({"name": entry["quant"], **overrides})
    else:
        raise HackError(f"accuracy.methods: no quant config {entry['quant']!r} in {path.parent}")
    whole = OmegaConf.merge(OmegaConf.create(root or {}), {"quant": node})
    node = OmegaConf.create(OmegaConf.to_container(whole, resolve=True)["quant"])
    return to_typed("quant", quant_schema(node.name), node)


def method_label(quant) -> str:
    """Short name of a method config for tables: name, layout, bits and partition where set (hack-channel-b2-p64),
    then HACK's departures from the artifact's settings: stochastic rounding (sr), sink tokens other than 4 (s0),
    homomorphic prefill (qp). `quant=hack_v1` is hack-token-b2-p64-sr-s0-qp; `quant=hack layout=token` changes the
    layout alone: hack-token-b2-p64."""
    parts = [quant.name]
    if getattr(quant, "layout", None):
        parts.append(quant.layout)
    if quant.bits is not None and quant.name != "fp16":
        parts.append(f"b{quant.bits}")
    if quant.partition is not None and quant.name != "fp16":
        parts.append(f"p{quant.partition}")
    if quant.name == "hack":
        parts += ["sr"] if quant.rounding == "stochastic" else []
        parts += [f"s{quant.sink_tokens}"] if quant.sink_tokens != 4 else []
        parts += ["qp"] if quant.quantized_prefill else []
    return "-".join(parts)


def uses_chat(task, tokenizer, mode: str) -> bool:
    if mode != "auto":
        return mode == "always"
    instruction = (task.config.metadata or {}).get("chat", True)
    return bool(instruction and getattr(tokenizer, "chat_template", None))


def requests(task, lm, mode: str, limit: Optional[int]) -> list:
    """The task's lm-eval `Instance`s (one generate_until request per document), prompts fully formatted."""
    from hack_cli.eval.tasks import task_limit

    chat = uses_chat(task, lm.tokenizer, mode)
    task.build_all_requests(limit=task_limit(task, limit), apply_chat_template=chat, chat_template=lm.apply_chat_template if chat else None)
    return task.instances


def evaluate(lm, methods: list[tuple[str, object, dict]], tasks: dict[str, tuple], samples, model_name: str, job,
             batch_size: int, shard: tuple[int, int] = (0, 1)) -> None:
    """Generate every (task, document, method) not yet in `samples`, a batch at a time, writing each row.

    Order: task, then batch of documents, then method, so that a run stopped early still has every method on the
    same documents (a paired table at any point). With `shard` (i, n), only batches i, i+n, ... of each task."""
    todo = []  # (label, quant dict, method, task name, task, batch of instances)
    index, count = shard
    for name, (task, instances) in tasks.items():
        ordered = sorted(instances, key=lambda i: -len(i.args[0]))  # similar lengths together: less padding
        for k in range(index * batch_size, len(ordered), count * batch_size):
            for label, method, quant in methods:
                left = [i for i in ordered[k:k + batch_size] if f"{label}/{name}/{i.doc_id}" not in samples.done]
                if left:
                    todo.append((label, quant, method, name, task, left))
    if not todo:
        return
    total = sum(len(batch) for *_, batch in todo)
    for label, quant, method, name, task, batch in job.progress(todo, total=len(todo), desc=f"{total} answers"):
        lm.method = method
        predictions = lm.generate_until(batch, disable_tqdm=True)
        for inst, prediction in zip(batch, predictions):
            result = task.process_results(inst.doc, [prediction])
            samples.write({"key": f"{label}/{name}/{inst.doc_id}", "model": model_name, "method": label, "task": name,
                           "doc_id": inst.doc_id, "quant": quant, "prediction": prediction,
                           "reference": str(task.doc_to_target(inst.doc)), "score": float(next(iter(result.values())))})


def method_list(cfg: AccuracyConfig, quant, root: dict) -> list[tuple[str, object, dict]]:
    """(label, method, config dict) for the baseline, `quant` and `accuracy.methods`, each label once."""
    from hack_cli.methods import build_method

    configs = ([method_config({"quant": cfg.baseline}, root)] if cfg.baseline else []) + [quant]
    configs += [method_config(dict(entry), root) for entry in cfg.methods]
    out: dict[str, tuple] = {}
    for c in configs:
        label, as_dict = method_label(c), dataclasses.asdict(c)
        if label in out and out[label][2] != as_dict:
            raise HackError(f"accuracy.methods: two different configs share the label {label!r}")
        out.setdefault(label, (label, build_method(c), as_dict))
    return list(out.values())


def run(job) -> dict:
    import torch

    from hack_cli.eval import table
    from hack_cli.eval.lm import KVMethodLM, byte_tokenizer
    from hack_cli.eval.tasks import build
    from hack_cli.hf import load_model

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task chatter about metadata and caching
    cfg: AccuracyConfig = job.typed["accuracy"]
    model_cfg, quant = job.typed["model"], job.typed["quant"]
    from omegaconf import OmegaConf

    root = OmegaConf.to_container(job.cfg, resolve=True)
    methods = method_list(cfg, quant, {k: v for k, v in root.items() if k != "quant"})  # errors before loading
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_cfg, device)
    tokenizer = tokenizer or byte_tokenizer()  # random-weight architectures come without one

    lm = KVMethodLM(model, tokenizer, methods[0][1], max_length=cfg.max_length or model_cfg.max_context,
                    batch_size=cfg.batch_size)
    built = build(job.typed["dataset"], tokenizer, cfg.limit, job.typed["run"].seed)
    tasks = {t.config.task: (t, requests(t, lm, cfg.chat_template, cfg.limit)) for t in built}
    samples = job.rows("samples")
    evaluate(lm, methods, tasks, samples, model_cfg.name, job, cfg.batch_size, tuple(cfg.shard))

    baseline = methods[0][0] if cfg.baseline else None
    summary = table.summarize(samples.rows, baseline or "")
    job.table("accuracy", summary)
    text = table.to_markdown(summary, baseline or "")
    (job.run_dir / "accuracy_table.md").write_text(text)
    print(text)
    if job.run_dir.name.isdigit():  # a job of a multirun: the sweep's table covers every job so far
        table.write_table(table.load_samples([job.run_dir.parent]), job.run_dir.parent)

    metrics = {}
    for e in summary:
        prefix = f"{e['task']}/{e['method']}"
        metrics.update({f"{prefix}/score": e["score"], f"{prefix}/n": e["n"]})
        if e["diff"] is not None:
            metrics.update({f"{prefix}/diff": e["diff"], f"{prefix}/ci95": e["ci95"]})
    return metrics
