"""The GPU catalog (`conf/gpu/*.yaml`): peak dense tensor rates, memory, interconnect and instance network.

Plain PyYAML, no Hydra: the profiler runs on GPU machines that have no omegaconf.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from hack_cli.errors import HackError



def _conf_dir() -> Path:
    """`conf/` of this checkout, or the installed `hack_conf` package (found without importing it)."""
    spec = importlib.util.find_spec("hack_conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "conf"


CATALOG_DIR = _conf_dir() / "gpu"
VALUE_FIELDS = ("memory_gb", "memory_bandwidth_gbs", "fp16_tflops", "bf16_tflops", "int8_tops", "fp8_tflops",
                "fp32_tflops", "interconnect_gbs", "instances")
# Arithmetic a phase can run at -> the catalog field holding its peak rate.
RATE_FIELDS = {"fp16": "fp16_tflops", "bf16": "bf16_tflops", "int8": "int8_tops", "fp8": "fp8_tflops",
               "fp32": "fp32_tflops"}
# A card without tensor cores for an arithmetic runs it on the next path it has.
FALLBACK = {"int8": "fp16", "fp8": "fp16", "bf16": "fp16", "fp16": "fp32"}


@dataclass(frozen=True)
class GPU:
    name: str
    full_name: str
    memory_gb: float
    memory_bandwidth_gbs: float
    fp16_tflops: Optional[float]
    bf16_tflops: Optional[float]
    int8_tops: Optional[float]
    fp8_tflops: Optional[float]
    fp32_tflops: float
    interconnect_gbs: float  # GPU to GPU inside the instance, one direction
    instances: list  # cloud instances carrying it, smallest first: {name, gpus, network_gbps}
    sources: dict
    aliases: tuple = field(default=())

    def rate(self, arithmetic: str) -> tuple[float, str]:
        """Peak dense rate (ops/s) for `arithmetic` and the arithmetic it actually runs at (after fallbacks)."""
        kind = arithmetic
        while getattr(self, RATE_FIELDS[kind]) is None:
            kind = FALLBACK[kind]
        return getattr(self, RATE_FIELDS[kind]) * 1e12, kind

    @property
    def max_gpus(self) -> int:
        return max(i["gpus"] for i in self.instances)

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth in bytes/s."""
        return self.memory_bandwidth_gbs * 1e9

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


def _load(path: Path) -> GPU:
    raw = yaml.safe_load(path.read_text())
    missing = [k for k in VALUE_FIELDS if k not in raw]
    unsourced = [k for k in VALUE_FIELDS if k not in (raw.get("sources") or {})]
    if missing or unsourced:
        raise HackError(f"GPU catalog {path.name}: missing {missing or unsourced[0] + ' source'}")
    raw["aliases"] = tuple(raw.get("aliases") or ())
    return GPU(**raw)


def catalog(directory: Path = CATALOG_DIR) -> dict[str, GPU]:
    """Every card, keyed by its name and each of its aliases."""
    out: dict[str, GPU] = {}
    for path in sorted(directory.glob("*.yaml")):
        gpu = _load(path)
        for key in (gpu.name, *gpu.aliases):
            out[key] = gpu
    return out


def get_gpu(name: str) -> GPU:
    cards = catalog()
    if name not in cards:
        raise HackError(f"GPU {name!r} is not in the catalog (conf/gpu/): expected one of {', '.join(sorted(cards))}")
    return cards[name]


def identify(device_name: str) -> Optional[str]:
    """Catalog key of a torch device name ('NVIDIA H100 80GB HBM3' -> 'h100'), or None if unknown."""
    words = device_name.lower().replace("-", " ").split()
    if "a100" in words:
        return "a100_80" if any(w.startswith("80") for w in words) else "a100_40"
    if "v100" in words:
        return "v100_32" if any(w.startswith("32") for w in words) else "v100"
    return next((key for key in ("h200", "h100", "a10g", "l4", "t4", "v100") if key in words), None)
