"""What a command's run function gets, and the frame every job runs in.

    def run(job: Job) -> dict:                        # flat metrics: numbers and strings
        samples = job.rows("samples")                 # <run dir>/samples.jsonl; on resume, holds what was done
        for item in job.progress(items, total=len(items), desc="samples"):
            if item.id in samples.done:
                continue
            samples.write({"key": item.id, "score": ...})
        job.table("per_task", [...])                  # <run dir>/per_task.csv and a W&B table
        return {"accuracy": mean(r["score"] for r in samples.rows)}

`execute` writes config.yaml before the run and metrics.json after it, and always finishes the W&B run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from hack_cli.config import LoggingConfig, validate
from hack_cli.store import RowLog, claim, write_csv, write_metrics
from hack_cli.tracking import Tracker


@dataclass
class Job:
    command: str  # e.g. eval_ppl
    cfg: DictConfig  # the resolved config, as saved in config.yaml
    typed: dict[str, Any]  # validated: typed["model"] a ModelConfig, typed["quant"] the method's Config, typed["run"]
    #                         the shared keys (seed, resume, out_dir), typed[<section>] the command's own settings
    run_dir: Path
    resume: bool
    tracker: Tracker
    _row_logs: dict[str, RowLog] = field(default_factory=dict, repr=False)

    def rows(self, name: str) -> RowLog:
        """The row log `<run dir>/<name>.jsonl`: `.write(row)` as each row is produced, `.done` keys to skip."""
        if name not in self._row_logs:
            self._row_logs[name] = RowLog(self.run_dir / f"{name}.jsonl")
        return self._row_logs[name]

    def log(self, metrics: dict[str, Any]) -> None:
        """Intermediate metrics to W&B (the final ones are what `run` returns)."""
        self.tracker.log(metrics)

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """A finished table: `<run dir>/<name>.csv` and a W&B table."""
        write_csv(self.run_dir / f"{name}.csv", rows)
        self.tracker.table(name, rows)

    def progress(self, iterable: Iterable, total: Optional[int] = None, desc: str = "") -> Iterable:
        """A progress bar on stderr, unless logging.progress=false."""
        from rich.console import Console
        from rich.progress import track

        enabled = self.typed.get("logging", LoggingConfig()).progress
        return track(iterable, description=desc, total=total, disable=not enabled, console=Console(stderr=True))

    def close(self) -> None:
        for log in self._row_logs.values():
            log.close()


def execute(cfg: DictConfig, run: Callable[[Job], dict]) -> dict:
    """Run one job inside Hydra: its run directory, config.yaml, W&B, the run function, metrics.json."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    typed = validate(cfg)
    resume = typed["run"].resume
    resolved = OmegaConf.to_container(cfg, resolve=True)
    claim(run_dir, resolved, resume)

    sweep = Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
    name = f"{sweep}/{hydra.job.num}" if sweep else run_dir.name
    wandb_settings = typed.get("logging", LoggingConfig()).wandb
    tracker = Tracker(wandb_settings, run_dir, name, group=sweep, job_type=cfg.command, config=resolved)
    job = Job(cfg.command, OmegaConf.create(resolved), typed, run_dir, resume, tracker)
    random.seed(typed["run"].seed)
    torch.manual_seed(typed["run"].seed)

    ok = False
    tracker.start()
    try:
        metrics = run(job)
        write_metrics(run_dir, metrics)
        tracker.log(metrics)
        ok = True
        return metrics
    finally:
        job.close()
        tracker.finish(ok)
