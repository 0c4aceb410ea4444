"""Weights & Biases, one W&B run per job: `logging.wandb.mode` = offline (default) | online | disabled.

wandb is imported only when a run is started, so disabled runs (tests, GPU machines without it) never load it.
Offline runs live in `<run dir>/wandb/offline-run-*` and upload later with `wandb sync`. Online mode that has
no API key or cannot reach the server says so in one line and logs offline instead, losing nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from hack_cli.config import WandbConfig

INIT_TIMEOUT_S = 30  # wandb's default (90 s) is a long wait for a job that then runs offline anyway


class Tracker:
    def __init__(self, settings: WandbConfig, run_dir: Path, name: str, group: Optional[str], job_type: str,
                 config: dict[str, Any]):
        self.settings, self.run_dir = settings, run_dir
        self.init_args = dict(project=settings.project, entity=settings.entity, group=settings.group or group,
                              job_type=job_type, name=name, tags=list(settings.tags), config=config,
                              dir=str(run_dir))
        self.run = None

    def start(self) -> None:
        if self.settings.mode == "disabled":
            return
        import wandb

        if self.settings.mode == "online":
            try:
                self.run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S),
                                      **self.init_args)
                return
            except wandb.errors.Error as e:
                reason = str(e).splitlines()[0]
                print(f"W&B online unavailable ({reason}); logging offline to {self.run_dir}/wandb, upload later "
                      f"with `wandb sync {self.run_dir}/wandb/offline-run-*`", file=sys.stderr)
        # Silent: wandb's banner would bury the job's own output; the README says where offline runs live.
        self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **self.init_args)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            self.run.summary.update(metrics)

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.run is not None and rows:
            import wandb

            columns = list(dict.fromkeys(k for row in rows for k in row))
            self.run.log({name: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
