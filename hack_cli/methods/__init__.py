"""KV methods as peers behind one interface (`base.KVMethod` / `base.LayerKV`).

Each method is a module exporting `Config` (its `quant` schema, a `QuantConfig` subclass) and `Method` (a `KVMethod`).
Add a method by adding a module, a line here and `conf/quant/<name>.yaml`.
"""
from __future__ import annotations

import importlib

from hack_cli.errors import ConfigError

METHODS: dict[str, str] = {
    "fp16": "hack_cli.methods.fp16",
    "hack": "hack_cli.methods.hack",
    "kivi": "hack_cli.methods.kivi",
    "kvquant": "hack_cli.methods.kvquant",
    "cachegen": "hack_cli.methods.cachegen",
    "fp8": "hack_cli.methods.fp8",
}


def _module(name):
    if name not in METHODS:
        raise ConfigError("quant.name", name, "expected one of " + ", ".join(METHODS))
    return importlib.import_module(METHODS[name])


def quant_schema(name: str) -> type:
    return _module(name).Config


def build_method(config):
    """A `KVMethod` from a validated quant config (an instance of the method's `Config`)."""
    return _module(config.name).Method(config)
