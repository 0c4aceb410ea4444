"""Hydra glue: every command is a primary config in `conf/` plus a run function, launched by Hydra itself.

Before anything runs, `check` expands the sweep exactly as Hydra's basic sweeper will, composes every job and
validates it, so a bad value in job 7 of a sweep fails at once in one line instead of after six jobs. `launch`
then hands the same overrides to Hydra (`_run_hydra`, the machinery behind `@hydra.main`, without touching
sys.argv), which gives multirun its full semantics: comma lists, range(), glob(), group sweeps, experiment
bundles' `hydra.sweeper.params`, and launcher plugins (`hydra/launcher=joblib`, `submitit_slurm`).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import hack_conf
from omegaconf import DictConfig, OmegaConf, open_dict

from hack_cli.config import GROUP_SCHEMAS, SECTION_SCHEMAS, section_schema, validate
from hack_cli.errors import ConfigError, HackError

CONF_DIR = Path(hack_conf.__file__).parent

# Command (= primary config `conf/<command>.yaml`) -> its run function, `run(job: Job) -> dict` of flat metrics,
# and the name of its config section (schema in `hack_cli.config.SECTION_SCHEMAS`).
COMMANDS: dict[str, tuple[str, Optional[str]]] = {
    "eval_ppl": ("hack_cli.eval.ppl:run", "ppl"),
    "eval_accuracy": ("hack_cli.eval.accuracy:run", "accuracy"),
    "bench_jct": ("hack_cli.serve.bench:run", "jct"),
    "bench_kernels": ("hack_kernels.bench:run", "kernels"),
    "bench_profile": ("hack_cli.sim.profile:run", "profile"),
    "calibrate_kvquant": ("hack_cli.calibrate:run", "calibrate"),
    "report": ("hack_cli.report.build:run", "report"),
    "selftest": ("hack_cli.selftest:run", "selftest"),
}


def cli_name(command: str) -> str:
    return "hack " + command.replace("_", " ")


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing too
        return False


def run_function(command: str) -> Optional[Callable]:
    """The command's run function, or None while its module does not exist yet."""
    module, name = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module), name) if _exists(module) else None


def register_schemas(command: str) -> None:
    """Put the dataclass schemas in Hydra's ConfigStore as `schema/<group>`, `schema/quant/<option>` and
    `schema/<section>`. The primary configs merge them under each group's YAML, so every schema field is a key
    an override can set (`model.path=...`), and types are checked as Hydra composes. Launcher plugins carry the
    ConfigStore to their workers."""
    from hydra.core.config_store import ConfigStore

    from hack_cli.methods import quant_schema

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)
    for path in sorted((CONF_DIR / "quant").glob("*.yaml")):
        try:
            store.store(group="schema/quant", name=path.stem, node=quant_schema(OmegaConf.load(path).get("name")))
        except ConfigError:  # a config ahead of its method: validation names the problem if it is chosen
            continue
    section = COMMANDS[command][1]
    if section and _exists(SECTION_SCHEMAS[section].split(":")[0]):  # the YAML marks it `optional` until then
        store.store(group="schema", name=section, node=section_schema(section))


class JobFailed(BaseException):
    """A HackError raised in a job, carried to the CLI as one line. A BaseException, so it passes Hydra's per-job
    handler (which catches Exception to print a report of its own) like Ctrl-C does, and stops the sweep."""


def task(cfg: DictConfig) -> dict:
    """Hydra's task function for every command; module-level so launcher plugins can pickle it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from hack_cli.job import execute

    try:
        return execute(cfg, run_function(cfg.command))
    except HackError as e:
        hydra = HydraConfig.get()
        where = f"job {hydra.job.num} ({' '.join(hydra.overrides.task)}): " if hydra.mode == RunMode.MULTIRUN else ""
        raise JobFailed(f"{where}{e}") from None


# ---------------------------------------------------------------------------------------------- checking
def _one_line(e: Exception) -> str:
    """A Hydra/OmegaConf composition error as one line naming the override and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.removeprefix("schema/").rpartition("/")
        allowed = ", ".join(e.options or []) or f"none yet (no {group}/*.yaml)"
        return f"{group}={option} is not allowed: expected one of {allowed}"
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {lines[0]} (see hydra.cc override grammar)"
    if "Ambiguous value" in str(e):
        return f"{lines[0].split('argument ')[-1]} is a sweep: add -m (--multirun) to run one job per value"
    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):  # an override of a key that does not exist
        schema = getattr(cause, "object_type", None)
        known = ("expected one of " + ", ".join(f.name for f in dataclasses.fields(schema))
                 if dataclasses.is_dataclass(schema) else "see the keys with --cfg job")
        return f"{cause.full_key} is not a config key: {known}"
    if isinstance(cause, ValidationError):  # a value of the wrong type for its schema field
        return f"{cause.full_key}={cause.value!r} is not allowed: {str(cause).splitlines()[0]}"
    return ": ".join(lines[:2])


@contextmanager
def _one_line_errors():
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        raise HackError(_one_line(e)) from None


def _compose(command: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    register_schemas(command)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(command, overrides=overrides, return_hydra_config=True)


def expand(command: str, overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per job, in Hydra's job order (job N runs the N-th list)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return [overrides]
    with _one_line_errors():
        parser = OverridesParser.create(config_loader=_loader())  # glob() sweeps list a group's options with it
        fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
        # Like the basic sweeper: sweep params set in a config (experiment bundles) first, the command line after.
        params = _compose(command, fixed).hydra.sweeper.get("params") or {}
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + overrides)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _loader():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys whose values differ between jobs: the columns of sweep.csv."""
    keys = [o.split("=", 1)[0] for o in jobs[0]]
    return [k for i, k in enumerate(keys) if len({job[i] for job in jobs}) > 1]


def check(command: str, overrides: list[str], multirun: bool) -> list[tuple[list[str], dict]]:
    """Compose and validate every job of the command: (its overrides, its typed config) per job, in job order.
    Raises HackError (one line) at the first bad one. Hydra's own overrides (launcher, sweeper) compose too."""
    checked = []
    for job in expand(command, overrides, multirun):
        with _one_line_errors():
            cfg = _compose(command, job)
            with open_dict(cfg):
                del cfg["hydra"]
            checked.append((job, validate(cfg)))
    return checked


# ---------------------------------------------------------------------------------------------- launching
def launch(command: str, overrides: list[str], multirun: bool, show_cfg: Optional[str] = None,
           resolve: bool = False, package: Optional[str] = None) -> None:
    """Run the command through Hydra (or print its config with `show_cfg` = job | hydra | all)."""
    from hydra._internal.utils import _run_hydra, get_args_parser

    argv = list(overrides)
    if multirun:
        argv.append("--multirun")
    if show_cfg:
        argv += ["--cfg", show_cfg] + (["--resolve"] if resolve else []) + (["--package", package] if package else [])
    args = get_args_parser().parse_args(argv)
    register_schemas(command)
    _run_hydra(args=args, args_parser=get_args_parser(), task_function=task, config_path=str(CONF_DIR),
               config_name=command)
