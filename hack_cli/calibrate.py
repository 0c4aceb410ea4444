"""`hack calibrate kvquant`: fit KVQuant's outlier thresholds and non-uniform levels for a model.

Takes `sequences` non-overlapping windows of `seq_len` tokens at seeded random places in the dataset text (the
Paul Graham essays by default), fits them (`hack_cli.methods.kvquant_calib.fit`) and writes a safetensors file
that `quant=kvquant quant.calibration=<file>` reads. Default file: results/calibration/kvquant/<model>.safetensors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hack_cli.config import ConfigError, check_choice, check_positive

DEFAULT_DIR = Path("results/calibration/kvquant")


@dataclass
class CalibrateConfig:
    bits: int = 2  # code width of the fitted levels (2^bits levels); must match quant.bits
    outlier_fraction: float = 0.01  # must match quant.outlier_fraction
    sink_tokens: int = 1  # leading tokens of each sequence left out (the store keeps them in 16 bits)
    sequences: int = 16  # calibration windows
    seq_len: int = 512  # tokens per window
    iters: int = 100  # Lloyd iterations at most
    output: Optional[str] = None  # default results/calibration/kvquant/<model name>.safetensors
    device: str = "auto"  # auto (cuda if present) | cpu | cuda[:N]

    def __post_init__(self):
        check_choice("calibrate.bits", self.bits, (2, 4, 8))
        if not 0 <= self.outlier_fraction < 0.5:
            raise ConfigError("calibrate.outlier_fraction", self.outlier_fraction, "expected 0 <= fraction < 0.5")
        if self.sink_tokens < 0:
            raise ConfigError("calibrate.sink_tokens", self.sink_tokens, "expected >= 0")
        for key in ("sequences", "seq_len", "iters"):
            check_positive(f"calibrate.{key}", getattr(self, key))
        if self.seq_len <= self.sink_tokens:
            raise ConfigError("calibrate.seq_len", self.seq_len, "expected more tokens than calibrate.sink_tokens")


def windows(tokens, count: int, length: int, seed: int):
    """(count, length) token ids: distinct non-overlapping windows of the text, chosen at random (seeded)."""
    import torch

    from hack_cli.errors import HackError

    n = tokens.numel() // length
    if n < count:
        raise HackError(f"calibration text has {tokens.numel()} tokens: too few for {count} windows of {length}")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.stack([tokens[i * length:(i + 1) * length] for i in pick.tolist()])


def run(job) -> dict:
    import torch

    from hack_cli.eval.text import read_text
    from hack_cli.hf import load_model
    from hack_cli.methods.kvquant_calib import fit, save

    cfg: CalibrateConfig = job.typed["calibrate"]
    mc = job.typed["model"]
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model, tok = load_model(mc, device)
    if tok is None:
        raise ConfigError("model.weights", mc.weights, "calibration needs a pretrained model with a tokenizer")
    tokens = torch.tensor(tok(read_text(job.typed["dataset"].path)).input_ids)  # (N,)
    seqs = windows(tokens, cfg.sequences, cfg.seq_len, job.typed["run"].seed)
    start = time.perf_counter()
    tensors, meta = fit(model, seqs, cfg.bits, cfg.outlier_fraction, cfg.sink_tokens, cfg.iters)
    meta.update(model=mc.name, dataset=job.typed["dataset"].name, seed=job.typed["run"].seed)
    path = Path(cfg.output) if cfg.output else DEFAULT_DIR / f"{mc.name}.safetensors"
    save(path, tensors, meta)
    job.table("value_levels", [{"layer": i, **{f"level_{j}": float(x) for j, x in enumerate(row)}}
                               for i, row in enumerate(tensors["value_levels"])])
    return {"calibration": str(path), "seconds": time.perf_counter() - start, "tokens": int(meta["tokens"]),
            "rope_check_rel_err": meta["rope_check_rel_err"], "bytes": path.stat().st_size}
