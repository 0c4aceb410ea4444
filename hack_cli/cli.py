"""The `hack` command line: one Typer command per primary config in `conf/`, launched through Hydra."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hack_cli.errors import HackError
from hack_cli.launch import JobFailed, check, cli_name, launch, run_function, swept_keys
from hack_cli.store import SWEEP, holds_run, read_metrics, sweep_rows, write_csv

console = Console()

OVERRIDES_HELP = ("Hydra overrides: pick a config per group (quant=hack model=tiny), set any key "
                  "(quant.partition=32), add a key (+key=value), remove one (~key). With -m, comma lists, "
                  "range(a,b[,step]) and glob(*) sweep: one job per combination.")

app = typer.Typer(
    help="HACK: homomorphic KV-cache quantization for disaggregated LLM inference, and the methods it competes "
         "with. Every command reads its config from conf/ (see it with --cfg job), takes Hydra overrides, and "
         "writes config.yaml, metrics.json and its rows under runs/ (choose with out_dir=PATH).",
    epilog="Examples: [bold]hack eval accuracy[/bold] (the embedded default, offline) · "
           "[bold]hack eval ppl -m quant=hack quant.bits=8,4,2[/bold] (a sweep) · "
           "[bold]hack bench jct --cfg job[/bold] (show the config) · [bold]hack eval --help[/bold]",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False, rich_markup_mode="rich")
eval_app = typer.Typer(help="Model quality with each KV method: perplexity, task accuracy.", no_args_is_help=True)
bench_app = typer.Typer(help="Speed: disaggregated serving JCT, attention kernels, cost profiles.",
                        no_args_is_help=True)
calibrate_app = typer.Typer(help="Fit what a method needs before it runs.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")
app.add_typer(calibrate_app, name="calibrate")


class CfgKind(str, Enum):
    job = "job"
    hydra = "hydra"
    all = "all"


def _add(parent: typer.Typer, name: str, command: str, summary: str, examples: list[str], hidden=False) -> None:
    """Register `hack ... <name>` for primary config `conf/<command>.yaml`."""
    lines = "\n\n".join(f"  [bold]{cli_name(command)} {e}[/bold]" if e else f"  [bold]{cli_name(command)}[/bold]"
                        for e in examples)

    def cmd(
        overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep: run one job per combination of "
                                      "the overrides' values, with Hydra's launcher (hydra/launcher=joblib: in "
                                      "parallel; submitit_slurm: on a SLURM cluster); writes sweep.csv."),
        cfg: Optional[CfgKind] = typer.Option(None, "--cfg", "-c", help="Print the composed config (job: yours; "
                                              "hydra: Hydra's; all: both) and exit without running."),
        resolve: bool = typer.Option(False, "--resolve", help="With --cfg: resolve ${...} interpolations."),
        package: Optional[str] = typer.Option(None, "--package", "-p", help="With --cfg: print only this key."),
    ):
        _run(command, overrides or [], multirun, cfg.value if cfg else None, resolve, package)

    parent.command(name, help=f"{summary}\n\nExamples:\n\n{lines}", hidden=hidden)(cmd)


_add(eval_app, "ppl", "eval_ppl",
     "Perplexity on long text with the context's KV going through a method, as in serving: prefill into the "
     "compressed cache, then score the continuation through decode-path attention.",
     ["quant=fp16", "-m quant=hack quant.bits=8,4,2 quant.layout=token,channel", "model=gemma3_270m"])
_add(eval_app, "accuracy", "eval_accuracy",
     "Task accuracy (lm-eval) with the KV going through a method. With no overrides: the packaged SmolLM2 on "
     "an offline suite, in minutes on a CPU.",
     ["", "-m quant=fp16,hack quant.partition=32,64,128", "quant=hack quant.bits=4 out_dir=runs/acc4"])
_add(bench_app, "jct", "bench_jct",
     "Disaggregated serving: a prefill worker and a decode worker, the KV sent over a rate-limited link, "
     "requests from a trace; job completion time and its phases per request.",
     ["model=tiny trace=small", "-m quant=fp16,hack cluster.bandwidth_gbps=1,10,50 trace=long"])
_add(bench_app, "kernels", "bench_kernels",
     "Attention kernels of every method on real models' attention shapes (GPU): time per call and achieved "
     "bandwidth.",
     ["", "-m model=llama31_8b,qwen3_8b quant.partition=32,64,128"])
_add(bench_app, "profile", "bench_profile",
     "Measure a method's costs on this GPU (prefill, decode steps, compression, bytes per token) for the JCT "
     "simulator.",
     ["model=llama31_8b model.weights=random"])
_add(calibrate_app, "kvquant", "calibrate_kvquant",
     "Fit KVQuant's non-uniform levels and outlier thresholds for a model on calibration text.",
     ["model=smollm2"])
_add(app, "report", "report",
     "Build the Markdown report and its figures from results/: the paper's claims beside our numbers.",
     [""])
_add(app, "selftest", "selftest",
     "HACK's quantizer on random tensors, one row per step: exercises runs, sweeps, W&B and resume.",
     ["", "-m quant.bits=2,4,8 out_dir=/tmp/selftest"], hidden=True)


def _run(command: str, overrides: list[str], multirun: bool, show_cfg: Optional[str], resolve: bool,
         package: Optional[str]) -> None:
    out_dir = None
    try:
        checked = check(command, overrides, multirun)
        if show_cfg:
            launch(command, checked[0][0], False, show_cfg=show_cfg, resolve=resolve, package=package)
            return
        if run_function(command) is None:
            raise HackError(f"{cli_name(command)}: not implemented yet")
        first = checked[0][1]["run"]
        out_dir = Path(first.out_dir)  # resolved once, so every job of a sweep shares the timestamp
        # Both checked before Hydra writes anything into out_dir.
        if first.resume and not holds_run(out_dir):
            raise HackError(f"resume=true: {out_dir} holds no run to continue; add out_dir=<the run's directory>")
        if holds_run(out_dir) and not first.resume:
            raise HackError(f"{out_dir} already holds a run: add resume=true to continue it, or choose another "
                            "out_dir")
        jobs = [job for job, _ in checked]
        console.print(f"{cli_name(command)}: {len(jobs)} job{'s' * (len(jobs) > 1)} -> {out_dir}", highlight=False)
        given = any(o.split("=", 1)[0] == "out_dir" for o in overrides)
        try:
            launch(command, overrides + ([] if given else [f"out_dir={out_dir}"]), multirun)
        finally:
            if multirun and out_dir.exists():
                _summarize_sweep(out_dir, jobs)
        if not multirun:
            _print_metrics(out_dir)
    except (HackError, JobFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        where = f"out_dir={out_dir} resume=true" if out_dir else "resume=true and the same out_dir"
        print(f"interrupted: finished rows are saved; rerun the same command with {where} to continue",
              file=sys.stderr)
        raise typer.Exit(130)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_metrics(run_dir: Path) -> None:
    metrics = read_metrics(run_dir) or {}
    table = Table("metric", "value", title=f"{run_dir}", title_justify="left")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value))
    console.print(table)


def _summarize_sweep(sweep_dir: Path, jobs: list[list[str]]) -> None:
    rows = sweep_rows(sweep_dir, jobs, swept_keys(jobs))
    write_csv(sweep_dir / SWEEP, rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title=f"{sweep_dir / SWEEP}", title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")  # wrap long names rather than cut them
    for row in rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    console.print(table)


def main() -> None:
    app()
