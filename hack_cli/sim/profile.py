"""`hack bench profile`: measure each method's serving costs on the device at hand, fit them, save a profile.

The profile (`results/profiles/<card>_<model>.json`, versioned) holds per method: the measured points, least-squares
fits (non-negative coefficients) of each phase over simple features of the work, and exact bytes per prompt
length. `hack_cli.sim.roofline` scales it to other GPUs and models; `hack_cli.sim.engine` replays traces with it.

    prefill(L)  = a + b·L + c·L²        compress(L) = a + b·L        install(L) = a + b·L
    decode(B, C) = a + b·B + c·C        (B requests in the batch, C their total context tokens)

Runs without Hydra on GPU machines (carry the omegaconf wheel for the method configs):

    python -m hack_cli.sim.profile --model llama31_8b --methods fp16,hack --device cuda:0 \\
        --lengths 1024,4096,8192,16384 --contexts 2048,16384 --batches 1,4,16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from hack_cli.errors import HackError

FORMAT, VERSION = "hack-sim-profile", 1
REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "results" / "profiles"
PHASE_FEATURES = {"prefill": ("1", "L", "L2"), "compress": ("1", "L"), "install": ("1", "L"), "decode": ("1", "B", "C")}


@dataclass
class ProfileConfig:
    """`profile:` section of `conf/bench_profile.yaml`."""

    lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])  # prompt lengths (prefill, bytes)
    contexts: list[int] = field(default_factory=lambda: [128, 1024])  # decode context per request
    batches: list[int] = field(default_factory=lambda: [1, 2, 4])  # decode batch sizes
    decode_steps: int = 3  # timed decode iterations per (batch, context) point
    repeats: int = 2  # timed prompts per length (median)
    label: Optional[str] = None  # the method's name in the profile (default `method_label`: hack, hack_v1, hack_p32)
    out: Optional[str] = None  # profile file (default results/profiles/<card>_<model>.json); merged into
    time_budget_s: float = 0.0  # stop measuring new points after this many seconds (0: no limit)
    quantized_prefill_max_len: int = 4096  # homomorphic prefill (reference) materializes L x L scores: cap L

    def __post_init__(self):
        for key in ("lengths", "contexts", "batches"):
            values = getattr(self, key)
            if not values or min(values) < 1:
                raise HackError(f"profile.{key}={list(values)!r} is not allowed: expected positive integers")
        if len(self.lengths) < 3 or len(self.contexts) * len(self.batches) < 3:
            raise HackError("profile needs >= 3 prompt lengths and >= 3 (batch, context) points to fit its phases")


def method_label(quant: dict) -> str:
    """fp16, kivi, ...; HACK: `hack` (artifact layout, Π=64), `hack_v1` (token layout), `hack_p32` (other Π),
    `hack_fp16dot` (decode kernel operands other than the paper's int8)."""
    name = quant.get("name") or "?"
    if name != "hack":
        return name
    label = "hack_v1" if quant.get("layout") == "token" else "hack"
    partition = quant.get("partition", 64)
    label = label if partition in (None, 64) else f"{label}_p{partition}"
    operand = quant.get("operand", "int8")
    return label if operand == "int8" else f"{label}_{operand}dot"


# ---------------------------------------------------------------------------------------------- fitting
def feature_matrix(features, rows: list[dict]) -> np.ndarray:
    value = {"1": lambda r: 1.0, "L": lambda r: r["L"], "L2": lambda r: float(r["L"]) ** 2,
             "B": lambda r: r["B"], "C": lambda r: r["C"]}
    return np.array([[value[f](r) for f in features] for r in rows], dtype=float)


def fit(phase: str, rows: list[dict], relative: bool = True) -> dict:
    """Non-negative least squares of `phase` times over its features, weighted to fit relative error (short
    prompts matter as much as long ones), or unweighted (`relative=False`: the mean, where rare slow points are
    real cost, e.g. the decode steps that close a block)."""
    from scipy.optimize import nnls

    features = PHASE_FEATURES[phase]
    X, y = feature_matrix(features, rows), np.array([r[phase] for r in rows], dtype=float)
    w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
    coef, _ = nnls(X * w[:, None], y * w)
    pred = X @ coef
    return {"features": list(features), "coef": [float(c) for c in coef],
            "max_rel_err": float(np.max(np.abs(pred - y) / np.maximum(y, 1e-12)))}


# ---------------------------------------------------------------------------------------------- files
def default_path(card: str, model: str) -> Path:
    return PROFILES / f"{card}_{model}.json"


def load_profile(path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise HackError(f"{path} is not a {FORMAT} v{VERSION} file")
    return data


def save_method(path: Path, header: dict, label: str, entry: dict) -> None:
    """Add (or replace) one method's entry in the profile at `path`."""
    data = load_profile(path) if path.exists() else {**header, "methods": {}}
    if data["model"]["architecture"] != header["model"]["architecture"] or data["card"] != header["card"]:
        raise HackError(f"{path} holds a profile of another card or architecture; choose profile.out")
    data["methods"][label] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def find_profile(model: str, path: Optional[str] = None, local: bool = False, directory: Path = PROFILES) -> dict:
    """The profile at `path`; else, for a `local` cluster, this machine's profile of `model`; else the GPU profile
    of `model`, else any GPU profile (the roofline scales it to the model)."""
    if path:
        return load_profile(path)
    profiles = [load_profile(f) for f in sorted(directory.glob("*.json"))]
    if local:
        import torch

        card = card_of(torch.device("cuda:0" if torch.cuda.is_available() else "cpu"))[0]
        groups = [[p for p in profiles if p["card"] == card and p["model"]["name"] == model]]
        where = f"a {card} profile of {model}"
    else:
        gpu = [p for p in profiles if p["card"] != "cpu"]
        groups = [[p for p in gpu if p["model"]["name"] == model], gpu]
        where = f"a GPU profile (of {model} or any model)"
    for group in groups:
        if group:
            return group[0]
    raise HackError(f"no {where} in {directory}: run `hack bench profile` (see results/profiles/README.md)")


def _with_defaults(quant: dict) -> dict:
    """A quant config with the fields its schema has gained since it was written (a profile's) at their defaults,
    which are what the code did before the field existed."""
    import dataclasses

    from hack_cli.methods import quant_schema

    schema = quant_schema(quant["name"])
    known = {f.name for f in dataclasses.fields(schema)}
    return {**dataclasses.asdict(schema(**{k: v for k, v in quant.items() if k in known})), **quant}


def method_entry(profile: dict, quant: dict) -> tuple[str, dict]:
    """(label, entry) of the profiled method whose quant config equals `quant` (seed, backend and calibration
    data aside: they do not change the costs)."""
    ignore = ("seed", "backend", "calibration")
    want = {k: v for k, v in _with_defaults(quant).items() if k not in ignore}
    for label, entry in profile["methods"].items():
        if {k: v for k, v in _with_defaults(entry["quant"]).items() if k not in ignore} == want:
            return label, entry
    have = ", ".join(f"{k} ({e['quant']})" for k, e in profile["methods"].items())
    raise HackError(f"the profile of {profile['model']['name']} on {profile['card']} has no method with quant "
                    f"{want}; it has: {have}. Profile it with `hack bench profile quant=...`")


# ---------------------------------------------------------------------------------------------- measuring
def versions(device) -> dict:
    import torch

    out = {"torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import transformers

    out["transformers"] = transformers.__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except OSError:
        commit = ""
    out["commit"] = commit if len(commit) == 40 else None  # a copy of the tree without its history has none
    out["device"] = str(device)
    return out


def card_of(device) -> tuple[str, str]:
    """(catalog key or sanitized device name, device name)."""
    import torch

    from hack_cli.sim.catalog import identify

    if device.type != "cuda":
        return "cpu", "cpu"
    name = torch.cuda.get_device_name(device)
    return identify(name) or "".join(c if c.isalnum() else "_" for c in name.lower()), name


def model_header(mc, model, card: str, device_name: str) -> dict:
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"format": FORMAT, "version": VERSION, "card": card, "device_name": device_name,
            "model": {"name": mc.name, "dtype": mc.dtype, "architecture": dict(mc.architecture),
                      "weight_bytes": int(weight_bytes)}}


def profile_method(model, method, device, cfg: ProfileConfig, deadline: float, log=print) -> Optional[dict]:
    """Measure and fit one method; None if the time budget ran out before enough points."""
    from hack_cli.sim.measure import measure_decode, measure_prompt

    lengths = sorted(cfg.lengths)
    if method.quantized_prefill:
        lengths = [L for L in lengths if L <= cfg.quantized_prefill_max_len]
    measure_prompt(model, method, device, lengths[0], 1)  # warm-up: kernels, allocator
    prompt, decode = [], []
    for L in lengths:
        if time.monotonic() > deadline:
            break
        prompt.append(measure_prompt(model, method, device, L, cfg.repeats))
        log(f"  {method.name} L={L}: " + ", ".join(f"{k}={prompt[-1][k]:.4f}s" for k in ("prefill", "compress", "install")))
    # What decode holds does not depend on how prefill attended: long contexts are prefilled with 16-bit attention.
    payload_method = None
    if method.quantized_prefill:
        from hack_cli.methods import build_method

        payload_method = build_method(dataclasses.replace(method.config, quantized_prefill=False))
    for C in sorted(cfg.contexts):
        if time.monotonic() > deadline:
            break
        decode += measure_decode(model, method, device, C, sorted(cfg.batches), cfg.decode_steps, payload_method)
        log(f"  {method.name} C={C}: " + ", ".join(f"B={r['B']}:{r['decode']:.4f}s" for r in decode if r["C_each"] == C))
    if len(prompt) < 3 or len(decode) < 3:
        return None
    quant = dataclasses.asdict(method.config)
    return {"quant": quant, "measured": versions(device),
            "points": {"prompt": prompt, "decode": decode},
            "phases": {**{p: fit(p, prompt) for p in ("prefill", "compress", "install")}, "decode": fit("decode", decode)},
            "bytes": {"tokens": [r["L"] for r in prompt], "payload": [r["payload"] for r in prompt],
                      "stored": [r["stored"] for r in prompt], "header": int(np.mean([r["header"] for r in prompt])),
                      "exact": exact_matches(quant, model, prompt[-1])}}


def exact_matches(quant: dict, model, row: dict) -> bool:
    """Whether `payload.exact_bytes` gives the bytes measured for this prompt (then the simulator uses it)."""
    from hack_cli.hf.attention import text_config
    from hack_cli.sim.payload import exact_bytes
    from hack_cli.sim.roofline import Arch

    arch = Arch.of(text_config(model).to_dict())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    exact = exact_bytes(quant, arch.layers, arch.kv_heads, arch.head_dim, dtype, row["L"])
    return exact is not None and exact == (row["payload"], row["stored"])


def random_calibration(quant, model, directory: Path):
    """KVQuant levels fitted on random tokens, as `hack bench jct jct.kvquant_random_calibration=true` does for
    random-weight timing runs (values do not matter for timing)."""
    import torch

    from hack_cli.hf.attention import NAME
    from hack_cli.methods.kvquant_calib import fit, save
    from hack_cli.serve.prefill import prompt_ids

    vocab = model.config.get_text_config().vocab_size
    seqs = torch.cat([prompt_ids(0, -2 - i, 512, vocab, "cpu") for i in range(2)])  # (2, 512)
    model.set_attn_implementation("sdpa")  # calibration reads a plain DynamicCache
    try:
        tensors, meta = fit(model, seqs, quant.bits, quant.outlier_fraction, 1, iters=20)
    finally:
        model.set_attn_implementation(NAME)
    path = directory / "kvquant_random_calibration.safetensors"
    save(path, tensors, meta)
    return dataclasses.replace(quant, calibration=str(path))


def profile_all(mc, quants: list[tuple[str, object]], device, cfg: ProfileConfig, log=print) -> tuple[Path, dict]:
    """Profile every (label, quant config) on one model; returns the profile path and the labels' fit errors."""
    import tempfile

    from hack_cli.methods import build_method
    from hack_cli.serve.workers import build_model

    start = time.monotonic()
    deadline = start + cfg.time_budget_s if cfg.time_budget_s > 0 else float("inf")
    model = build_model(mc, device)
    card, device_name = card_of(device)
    header = model_header(mc, model, card, device_name)
    path = Path(cfg.out) if cfg.out else default_path(card, mc.name)
    errors, scratch = {}, Path(tempfile.mkdtemp(prefix="hack_profile_"))
    for label, quant in quants:
        if time.monotonic() > deadline:
            log(f"  {label}: time budget spent; not profiled")
            continue
        log(f"profiling {label} on {device_name} ({time.monotonic() - start:.0f}s elapsed)")
        try:
            if quant.name == "kvquant" and quant.calibration is None:
                quant = random_calibration(quant, model, scratch)
            entry = profile_method(model, build_method(quant), device, cfg, deadline, log)
        except Exception as e:  # noqa: BLE001 - one method's failure (e.g. out of memory) must not lose the others
            log(f"  {label}: failed, not saved: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            continue
        if entry is None:
            log(f"  {label}: time budget spent before enough points; not saved")
            continue
        save_method(path, header, label, entry)
        errors[label] = {p: f["max_rel_err"] for p, f in entry["phases"].items()}
    return path, errors


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- entry points
def run(job) -> dict:
    """`hack bench profile`: profile `quant` on `model` and merge it into the profile file."""
    cfg: ProfileConfig = job.typed["profile"]
    quant = job.typed["quant"]
    label = cfg.label or method_label(dataclasses.asdict(quant))
    device = pick_device(job.typed["cluster"].prefill_device)
    path, errors = profile_all(job.typed["model"], [(label, quant)], device, cfg)
    if label not in errors:
        raise HackError(f"profile.time_budget_s={cfg.time_budget_s} ran out before {label} had enough points")
    return {"profile": str(path), **{f"max_rel_err_{p}": e for p, e in errors[label].items()}}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Optional[list[str]] = None) -> None:
    """Plain-argument entry point (no Hydra): conf/model/<name>.yaml and conf/quant/<preset>.yaml via PyYAML."""
    import yaml

    from hack_cli.config import ModelConfig
    from hack_cli.methods import quant_schema

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="conf/model/<name>.yaml (profiled with random weights)")
    p.add_argument("--methods", default="fp16,hack",
                   help="conf/quant presets, comma-separated, each with optional overrides: hack:partition=32")
    p.add_argument("--device", default="auto")
    defaults = ProfileConfig()
    p.add_argument("--lengths", type=_ints, default=defaults.lengths)
    p.add_argument("--contexts", type=_ints, default=defaults.contexts)
    p.add_argument("--batches", type=_ints, default=defaults.batches)
    p.add_argument("--decode-steps", type=int, default=defaults.decode_steps)
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--time-budget", type=float, default=0.0)
    p.add_argument("--quantized-prefill-max-len", type=int, default=defaults.quantized_prefill_max_len)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (the serving workers use cores/2)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    conf = REPO / "conf"
    raw = yaml.safe_load((conf / "model" / f"{a.model}.yaml").read_text())
    mc = ModelConfig(**{**raw, "weights": "random"})
    quants = []
    for spec in a.methods.split(","):
        preset, *overrides = spec.split(":")
        path = conf / "quant" / f"{preset}.yaml"
        fields = yaml.safe_load(path.read_text()) if path.exists() else {"name": preset}  # schema defaults
        # Hydra interpolations (kvquant's per-model calibration file) do not resolve here: the schema default
        # applies (no calibration: random-token levels, which is all a timing profile needs).
        fields = {k: v for k, v in fields.items() if not (isinstance(v, str) and "${" in v)}
        fields.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
        quant = quant_schema(fields["name"])(**fields)
        quants.append((method_label(dataclasses.asdict(quant)), quant))
    cfg = ProfileConfig(a.lengths, a.contexts, a.batches, a.decode_steps, a.repeats, None, a.out, a.time_budget,
                        a.quantized_prefill_max_len)
    path, errors = profile_all(mc, quants, pick_device(a.device), cfg)
    print(json.dumps({"profile": str(path), "max_rel_err": errors}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
